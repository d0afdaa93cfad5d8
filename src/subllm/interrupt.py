"""Ctrl-C in the `subllm` command: one line and exit 130, at any moment.

`import subllm` imports this module first. When the process is the command (its console
script, or `python -m subllm`), a SIGINT from then on writes `subllm VERB: interrupted`
(`subllm: interrupted` before the verb is known) and exits 130 at once while the command
loads, parses its flags or exits: nothing is written in those phases, and an import
interrupted halfway would otherwise end in its traceback. While a verb's `run` works,
`subllm.cli.main` hands Ctrl-C back to Python's KeyboardInterrupt, so that cleanups run
(temporary outputs removed, `train` saves) before the same line. A library
`import subllm` changes nothing.
"""

from __future__ import annotations

import os
import sys

# the verb being run, once `subllm.cli.main` knows it (for the line)
verb: str | None = None
_ENTRY_MODULES = ("subllm", "subllm.cli")


def is_command() -> bool:
    """This process is the `subllm` command: its console script (`sys.argv[0]` names it),
    or `python -m subllm`, whose package is imported while `sys.argv[0]` is still "-m"."""
    if sys.argv[:1] == ["-m"]:
        args = list(getattr(sys, "orig_argv", ()))
        pairs = zip(args, args[1:], strict=False)
        return any(f"{a} {b}" in (f"-m {m}" for m in _ENTRY_MODULES) for a, b in pairs) or any(
            a in (f"-m{m}" for m in _ENTRY_MODULES) for a in args)
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return name.split(".")[0] in ("subllm", "subllm-script")


def interrupted(signum: int, frame: object) -> None:
    """The command's SIGINT handler outside a verb's work: the line, then exit 130."""
    for stream in (sys.stdout, sys.stderr):  # what was printed before stays printed
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or busy stream: exit all the same
            pass
    try:
        os.write(2, f"subllm{' ' + verb if verb else ''}: interrupted\n".encode())
    finally:
        os._exit(130)


def install() -> None:
    """Make `interrupted` the SIGINT handler, unless SIGINT is not Python's to handle (a
    parent made the process ignore it, as shells do for background jobs)."""
    try:  # the C module: `signal` would first build its enums, with Ctrl-C still unhandled
        import _signal as signal
    except ImportError:  # pragma: no cover - not CPython
        import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, interrupted)
        except ValueError:  # not the main thread of the main interpreter
            pass


if is_command():
    install()
