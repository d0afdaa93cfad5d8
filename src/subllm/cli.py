"""`subllm <verb>`: the command-line tool.

Each verb lives next to the code it drives and contributes its parser through a
`register(subparsers)` function; this file only assembles them and turns user errors
into one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) for every verb that works. Modules register their own parsers.
VERB_MODULES = [
    "subllm.info",
    "subllm.estimate",
    "subllm.bench",
    "subllm.data",
    "subllm.train",
    "subllm.generate",
    "subllm.hf.export",
    "subllm.convert",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="subllm",
        description="Train and run SUBLLM / LLaMA models and Mini-Sequence Transformer patches.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from subllm.errors import SubLLMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SubLLMError as e:
        print(f"subllm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"subllm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
