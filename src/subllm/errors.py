"""The user-facing exception types, and the one line an operating-system error becomes.

The types live with the model (`subllm.model.errors`), which must import nothing from
outside its own package."""

from __future__ import annotations

import errno

from subllm.model.errors import ConfigError, SubLLMError

__all__ = ["ConfigError", "SubLLMError", "os_error_line"]

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
