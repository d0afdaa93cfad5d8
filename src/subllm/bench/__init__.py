"""`subllm bench <name>`: benchmarks that write JSON, a Markdown table and plots.

Each benchmark is a module in this package with `add_arguments(parser)` and
`run(args) -> int` (its description: the module docstring); add a new one by listing it,
with its one-line help, in `BENCHMARKS`. A module that holds several benchmarks names each
as `module:OBJECT`, an object with the same attributes and its description in `DOC`. Each
writes to `--out`, by default ./bench-out/<name> under the current directory
(`common.add_out_argument`); nothing in the checkout is written unless `--out` points
there. What they share (flags, models, the paired runner, outputs) is in common.py.
"""

from __future__ import annotations

# sub-verb -> (module implementing it, one-line help); `subllm.commands.bench` imports only
# the one being run
BENCHMARKS: dict[str, tuple[str, str]] = {
    "mst": ("subllm.bench.mst",
            "time and peak memory of a training step: standard / checkpointing / MsT"),
    "train": ("subllm.bench.pair:TRAIN",
              "training step time, tokens/s, peak memory and MFU: model A vs model B"),
    "infer": ("subllm.bench.pair:INFER",
              "prefill time, decode time per token, KV-cache bytes, peak memory: A vs B"),
    "quality": ("subllm.bench.quality",
                "validation loss at equal tokens and training time: A and B trained on the "
                "same data"),
    "startup": ("subllm.bench.startup",
                "start-up time of fresh processes: import subllm, subllm --help, one-line "
                "errors"),
    "estimate": ("subllm.bench.estimate",
                 "the memory planner (subllm estimate) against peaks measured in training "
                 "steps"),
    "gpu": ("subllm.bench.gpu",
            "one CUDA device, one command: cuda tests, 1.3B SUBLLM/LLaMA train + decode, MsT vs "
            "peers, the planner (--smoke: tiny, any device)"),
}
