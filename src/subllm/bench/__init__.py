"""`subllm bench <name>`: benchmarks that write JSON, a Markdown table and plots (DESIGN 5).

Each benchmark is a module in this package with `HELP` (one line), `add_arguments(parser)`
and `run(args) -> int`; add a new one by listing it in `BENCHMARKS`. A module that holds
several benchmarks names each as `module:OBJECT`, an object with the same attributes and
its description in `DOC`.
"""

from __future__ import annotations

import argparse
import importlib

# sub-verb -> module implementing it
BENCHMARKS: dict[str, str] = {
    "mst": "subllm.bench.mst",
    "train": "subllm.bench.pair:TRAIN",
    "infer": "subllm.bench.pair:INFER",
    "quality": "subllm.bench.quality",
    "estimate": "subllm.bench.estimate",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` verb and one sub-verb per entry of BENCHMARKS."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: speed and memory, written as JSON + Markdown + PNG",
        description="Run a benchmark; results go to --out as JSON, a Markdown table and plots.",
    )
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(parser))
    for name, target in BENCHMARKS.items():
        module_name, _, attr = target.partition(":")
        bench = importlib.import_module(module_name)
        if attr:
            bench = getattr(bench, attr)
        p = sub.add_parser(name, help=bench.HELP, description=getattr(bench, "DOC", bench.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        bench.add_arguments(p)
        p.set_defaults(func=bench.run)

    def _usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_usage)
