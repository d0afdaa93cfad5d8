"""The user-facing exception types, and the one line an operating-system error becomes.

The types live with the model (`subllm.model.errors`), which must import nothing from
outside its own package."""

from __future__ import annotations

import errno
import os
import re

from subllm.model.errors import ConfigError, SubLLMError, SubLLMWarning

__all__ = ["ConfigError", "SubLLMError", "SubLLMWarning", "os_error_in", "os_error_line"]

_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "over the disk quota: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: choose another output path",
    errno.EACCES: "permission denied: choose a path you can write",
    errno.EPERM: "operation not permitted: choose a path you can write",
    errno.EEXIST: "something is in the way: remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "a directory stands where a file was expected",
}


def os_error_line(e: OSError) -> str:
    """What the operating system refused, where, and what to do about it."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    hint = _OS_HINTS.get(e.errno or 0)
    return f"{e.strerror or e}{where}" + (f"; {hint}" if hint else "")


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error ends its text


def os_error_in(e: BaseException) -> OSError | None:
    """The operating-system error behind `e`, or None: `e` itself, the OSError it was raised
    from or while handling (torch's C++ writer turns a failed write into a RuntimeError whose
    context is the OSError), or the one a Rust library names in its text (safetensors:
    "... No space left on device (os error 28)"). So a full disk is said to be one, not
    reported as a damaged file."""
    for _ in range(4):  # the chain of causes, not further
        if isinstance(e, OSError):
            return e
        found = _RUST_OS_ERROR.search(str(e))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            return None
        e = nxt
    return None
