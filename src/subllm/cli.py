"""`subllm <verb>`: the command-line tool, a table of verbs imported on use.

Each verb is a module of `subllm.commands` with `add_arguments(parser)` and `run(args)`;
only the verb being run is imported, and command modules import the heavy code (torch,
transformers) inside `run`, after the flags are parsed and checked. So `subllm --help`
and a bad flag cost a fraction of a second. User errors (`SubLLMError`) become one line
on stderr with exit code 2; an operating-system error (no space left, a read-only or
occupied path, ...) and a damaged safetensors file become one line with exit code 1. Each
verb writes its outputs atomically, so such a failure leaves the previous output as it was.
Ctrl-C, at any moment from the first import on, is the one line `subllm VERB: interrupted`
and exit code 130 (`subllm.interrupt`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import faulthandler
import importlib
import os
import signal
import sys
import threading
import types
import warnings

from subllm import interrupt

# verb -> (module in subllm.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "info": ("info", "parameters, structure and compute of a preset or config"),
    "estimate": ("estimate", "predicted peak training memory and the longest sequence that fits"),
    "bench": ("bench", "benchmarks: speed and memory, written as JSON + Markdown + PNG"),
    "prepare": ("prepare", "tokenize a corpus for training"),
    "train": ("train", "train a SUBLLM or LLaMA model (no arguments: the built-in demo)"),
    "generate": ("generate", "stream text from a trained checkpoint"),
    "serve": ("serve", "an OpenAI-compatible server for a checkpoint, batching requests"),
    "eval": ("eval", "validation loss and perplexity of a checkpoint"),
    "export": ("export", "write a checkpoint as a Hugging Face model directory"),
    "convert": ("convert", "turn a Llama or a SUBLLM-release checkpoint into a Hugging Face "
                           "SubLLM directory"),
}


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _verb_of(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in VERBS else None
        if arg in ("-h", "--help"):
            return None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the verb named in `argv` (all verbs when None) gets its flags."""
    parser = Parser(
        prog="subllm",
        description="Train and run SUBLLM / LLaMA models and Mini-Sequence Transformer patches.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    chosen = _verb_of(argv) if argv is not None else None
    for verb, (module_name, help_text) in VERBS.items():
        if argv is not None and verb != chosen:
            sub.add_parser(verb, help=help_text, add_help=False)
            continue
        module = importlib.import_module(f"subllm.commands.{module_name}")
        p = sub.add_parser(verb, help=help_text, description=module.DESCRIPTION,
                           formatter_class=getattr(module, "FORMATTER",
                                                   argparse.HelpFormatter))
        if getattr(module, "TAKES_REST", False):  # a verb with sub-verbs builds only one
            rest = argv[argv.index(verb) + 1:] if argv is not None else None
            module.add_arguments(p, rest)
        else:
            module.add_arguments(p)
        p.set_defaults(func=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `subllm` with `argv` (default: the command line); the exit code. Ctrl-C at any
    point is the line `subllm VERB: interrupted` and 130 (subllm.interrupt)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = _verb_of(argv)
    interrupt.verb = verb
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while a verb ran, or any time in a caller's process
        print(f"subllm{' ' + verb if verb else ''}: interrupted", file=sys.stderr)
        return 130


class _VerbInterrupts:
    """While a verb works in the command, Ctrl-C raises KeyboardInterrupt (cleanups run,
    `train` saves) instead of exiting at once as it does while the command loads.

    Not inside an import, though: raised there, it can crash a C extension halfway through
    its initialisation (torch aborts) or be swallowed by it (torch clears one raised while
    it imports numpy). There it is raised as the outermost import returns; a second Ctrl-C
    raises at once. And should a library swallow it anyway (Python only reports one raised
    in a weakref callback), the verb ends as interrupted, whatever it returned or raised."""

    def __enter__(self) -> _VerbInterrupts:
        self.pressed = self.deferred = False
        self.active = signal.getsignal(signal.SIGINT) is interrupt.interrupted
        if self.active:
            self.unraisable = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.pressed = True
        outer = None  # the outermost import running now
        while frame is not None:
            if (frame.f_code.co_name == "_find_and_load"
                    and frame.f_code.co_filename.startswith("<frozen importlib")):
                outer = frame
            frame = frame.f_back
        if outer is None or self.deferred or sys.gettrace() is not None:
            raise KeyboardInterrupt
        self.deferred = True
        outer.f_trace_lines = False
        outer.f_trace = self._at_return
        sys.settrace(_untraced)  # tracing on for this thread, for `outer` alone

    def _at_return(self, frame: types.FrameType, event: str, arg: object) -> object:
        if event == "return":
            sys.settrace(None)
            raise KeyboardInterrupt
        return self._at_return

    def _unraisable(self, info: object) -> None:
        if not (self.pressed and isinstance(getattr(info, "exc_value", None),
                                            KeyboardInterrupt)):
            self.unraisable(info)

    def __exit__(self, kind: type | None, *_: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, interrupt.interrupted)
            sys.unraisablehook = self.unraisable
            if self.deferred:
                sys.settrace(None)
        if self.pressed and kind is not KeyboardInterrupt:
            raise KeyboardInterrupt from None


def _untraced(frame: types.FrameType, event: str, arg: object) -> None:
    """The global trace function while a Ctrl-C waits for an import: no frame is traced."""
    return None


def _main(argv: list[str]) -> int:
    from subllm.errors import SubLLMError, SubLLMWarning, os_error_in, os_error_line

    # transformers' own progress bars ("Writing model shards", "Loading weights") would
    # bury our one-line messages; the CLI prints its own progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # `kill -USR1 PID` prints where every thread of a running subllm is (a stuck rank of a
    # distributed run, a slow step) to stderr, and the process goes on
    if hasattr(faulthandler, "register") and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):  # stderr without a file descriptor
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    plain = warnings.formatwarning

    def one_line(message, category, *rest, **kw) -> str:  # ours: one line, no source line
        if issubclass(category, SubLLMWarning):
            return f"subllm {args.verb}: warning: {message}\n"
        return plain(message, category, *rest, **kw)

    warnings.formatwarning = one_line
    try:
        with _VerbInterrupts():
            return int(args.func(args) or 0)
    except SubLLMError as e:
        print(f"subllm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the operating system said no: one line, not a traceback
        print(f"subllm {args.verb}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        cause = os_error_in(e)  # a full disk under a library's own error (safetensors, torch)
        if cause is not None and type(e).__name__ in ("SafetensorError", "RuntimeError"):
            print(f"subllm {args.verb}: error: {os_error_line(cause)}", file=sys.stderr)
            return 1
        if type(e).__name__ != "SafetensorError":  # a damaged .safetensors file
            raise
        print(f"subllm {args.verb}: error: a safetensors file is damaged or unreadable "
              f"({str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})",
              file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = plain
        _drop_dynamo_exit_report()


def _drop_dynamo_exit_report() -> None:
    """torch._dynamo (imported by torch.distributed and others) registers an exit handler
    that imports `tabulate` to log compile times at INFO level, which we never show. An
    import at interpreter exit can deadlock with the threads torch.distributed leaves
    (seen in a torchrun rank that finished its work, then hung at exit): drop it."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is not None and hasattr(utils, "dump_compile_times"):
        atexit.unregister(utils.dump_compile_times)


if __name__ == "__main__":
    sys.exit(main())
