"""Writing files and directories so that a reader never sees half of one.

A file is written under a temporary name in its own directory and renamed into place
(`os.replace` is atomic on POSIX); a directory is built as a hidden sibling and renamed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from subllm.errors import SubLLMError


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int, exiting: bool = True) -> bool:
    """Whether process `pid` runs. A zombie does not: a killed process whose parent died too
    waits for init to reap it, which some container inits never do, and its pid would hold
    a run's lock forever. But a zombie thread-group leader whose other threads have not
    finished exiting still holds its files (and so its locks): that one counts as alive,
    unless `exiting` is False (asking whether the process has begun to exit)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False  # gone since the signal check
    except OSError:
        return True  # no /proc (macOS): the signal check is all there is
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    zombie = fields.get("State", "").split()[:1] == ["Z"]
    return not zombie or (exiting and int(fields.get("Threads", "1").strip() or 1) > 1)


_STAGING = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)(-.*)?$")


def remove_stale(out: Path) -> None:
    """Remove staging directories of `out` left by killed processes (`.NAME.tmp-PID-*`)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = _STAGING.match(p.name)
        if m and m["name"] == out.name and p.is_dir() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished directory `tmp` to `out`, replacing an old `out` only with `force`."""
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory holds nothing to lose
    if out.exists():  # checked before the work too; re-checked here against a race
        if not force:
            raise SubLLMError(f"{out} exists; pass --force to replace it")
        _check_replaceable(out)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Build the directory `out` in a hidden sibling; it replaces `out` when the block ends
    without an error and is removed when it fails, so `out` is complete or untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp made it private; the result is an ordinary directory
        replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_not_overlapping(out: Path, inputs: Iterable[str | Path | None],
                          flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the inputs: replacing it
    would destroy what is being read."""
    o = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).resolve()
        if o == i or o in i.parents or i in o.parents:
            how = "is" if o == i else ("contains" if o in i.parents else "lies inside")
            raise SubLLMError(f"{flag} {out} {how} the input {inp}; writing it would destroy "
                              "the input: choose a directory outside it")


def check_out_dir(out: str | Path, force: bool,
                  inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """The output directory, checked before any work: not a file, not one of (or inside, or
    around) the `inputs`, and empty, or with `force` an earlier export/convert."""
    if not str(out).strip():
        raise SubLLMError("--out is empty; pass a directory path")
    out = Path(out)
    check_not_overlapping(out, inputs)
    if out.exists() and not out.is_dir():
        raise SubLLMError(f"--out {out} is a file; pass a directory path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SubLLMError(f"--out {out} exists and is not empty; pass --force to replace "
                              "it")
        _check_replaceable(out)
    return out


# What `subllm export` / `convert` leave in every directory they write: --force replaces
# only a directory that holds it (or an empty one), never one subllm did not write.
MARKER = ".subllm-export.json"


def write_marker(directory: Path, verb: str) -> None:
    """Mark `directory` as written by `subllm <verb>` (and when)."""
    import json
    from importlib import metadata

    try:
        version = metadata.version("subllm")
    except metadata.PackageNotFoundError:  # run from a source tree, not installed
        version = "(source tree)"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (directory / MARKER).write_text(json.dumps(
        {"written_by": f"subllm {version} {verb}", "at": when}, indent=2) + "\n")


def _written_by_subllm(path: Path) -> bool:
    """Whether `path` is an earlier `subllm export` / `convert` output: it holds our marker,
    or (written before the marker existed) a config.json of model_type "subllm". A
    Llama, Mistral or Qwen directory is not one, whatever else it holds."""
    import json

    for name, ours in ((MARKER, lambda d: str(d.get("written_by", "")).startswith("subllm")),
                       ("config.json", lambda d: d.get("model_type") == "subllm")):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and ours(data):
            return True
    return False


def _check_replaceable(out: Path) -> None:
    if not _written_by_subllm(out):
        raise SubLLMError(f"--out {out} was not written by subllm export/convert (no "
                          f"{MARKER}, no SubLLM config.json); --force replaces only an earlier "
                          "export or conversion: choose another --out, or remove it yourself")


LOCK_FILE = ".lock"
LOCK_RELEASE_WAIT = 15.0  # seconds to wait for a dead holder's lock to be released


@contextmanager
def dir_lock(path: str | Path, what: str,
             hint: str = "wait for it or choose another --out") -> Iterator[Path]:
    """Hold an exclusive `flock` on `path/.lock` (holding this process's pid) for the block;
    the file is removed on release, so the directory is left as it was.

    The kernel drops the lock when the process dies, so a lock left by a killed process
    never blocks the next one; while a holder that has died is still exiting (its other
    threads, or a child that inherited the descriptor), this waits up to
    LOCK_RELEASE_WAIT seconds for the release. Raises SubLLMError, naming the holder's pid,
    when a live process holds it."""
    import fcntl  # POSIX only; imported here so the module loads everywhere

    path = Path(path)
    lock = path / LOCK_FILE
    dying = time.monotonic() + LOCK_RELEASE_WAIT
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SubLLMError(f"cannot lock {path} ({e.strerror}); choose a writable "
                              "directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if (holder.isdigit() and not _alive(int(holder), exiting=False)
                    and time.monotonic() < dying):
                # The holder has died; the kernel drops the lock when the last of its
                # threads (or a child that inherited the descriptor) has exited.
                time.sleep(0.05)
                continue
            raise SubLLMError(f"{path} is in use by another {what} (pid {holder}); "
                              f"{hint}") from None
        try:  # the holder we waited on may have removed the file we opened: open it anew
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: nobody else can hold this file
        os.close(fd)  # releases the lock
