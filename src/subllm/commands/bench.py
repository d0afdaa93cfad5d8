"""`subllm bench <name>`: benchmarks that write JSON, a Markdown table and plots.

Every benchmark writes to --out, by default ./bench-out/<name> under the current directory
(`subllm.bench.common.default_out`); results committed under docs/benchmarks are written
only by an explicit --out.

The benchmarks are listed in `subllm.bench.BENCHMARKS`; only the one being run is
imported.
"""

from __future__ import annotations

import argparse
import importlib

from subllm.bench import BENCHMARKS
from subllm.errors import SubLLMError

TAKES_REST = True  # add_arguments(parser, rest): see subllm.cli
DESCRIPTION = ("Run a benchmark; results go to --out (default ./bench-out/BENCH, under the "
               "current directory) as JSON, a Markdown table and plots.")


def _load(target: str):
    module_name, _, attr = target.partition(":")
    bench = importlib.import_module(module_name)
    return getattr(bench, attr) if attr else bench


def add_arguments(parser: argparse.ArgumentParser, rest: list[str] | None = None) -> None:
    """rest: the command line after `bench`; only the benchmark it names is imported and
    gets its flags (None: all of them)."""
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(parser))
    chosen = next((a for a in rest if not a.startswith("-")), None) if rest else None
    for name, (target, help_text) in BENCHMARKS.items():
        if rest is not None and name != chosen:  # listed by its help line, not imported
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        bench = _load(target)
        p = sub.add_parser(name, help=help_text,
                           description=getattr(bench, "DOC", bench.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        bench.add_arguments(p)
        p.set_defaults(func=bench.run, _parser=p)

    def _usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_usage)


def run(args: argparse.Namespace) -> int:
    # a named benchmark sets its own `func`; with none named, `func` is this function
    if getattr(args, "func", None) is run or getattr(args, "bench", None) is None:
        raise SubLLMError(f"name a benchmark: {', '.join(BENCHMARKS)} (see `subllm bench "
                          "--help`)")
    return args.func(args)
