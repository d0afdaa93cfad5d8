"""`subllm bench <name>`: benchmarks that write JSON, a Markdown table and plots.

Each benchmark is a module here with `add_arguments(parser)` and `run(args) -> int`, its
module docstring being its description (a module holding several names each as
`module:OBJECT`, an object with those attributes and `DOC`); add one by listing it in
`BENCHMARKS`. Each writes to `--out`, by default ./bench-out/<name> under the current
directory. What they share is in common.py.
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
    "serve": ("subllm.bench.serve",
              "subllm serve under concurrent streaming clients: tokens/s, TTFT, latency, A vs B"),
    "quality": ("subllm.bench.quality",
                "validation loss at equal tokens and training time: A and B trained alike"),
    "startup": ("subllm.bench.startup",
                "start-up time of fresh processes: import subllm, subllm --help, errors"),
    "estimate": ("subllm.bench.estimate",
                 "the memory planner (subllm estimate) against measured training peaks"),
    "prepare": ("subllm.bench.prepare",
                "tokens/s of subllm prepare (--workers 1, 2, ...) vs a plain tokenizer loop"),
    "overhead": ("subllm.bench.overhead",
                 "ops (kernels), host time and host syncs per training and decoding step: A vs B"),
    "gpu": ("subllm.bench.gpu",
            "one CUDA device, one command: cuda tests, 1.3B train + decode, MsT, the planner"),
}
