"""What the rank rule costs at prefill (docs/design.md §3.8): one eval-mode forward of a
preset at each length, selecting with the rank rule (inference's) and with top-k
(training's, the cheapest selection), and the rank rule's own time on the outermost
subsampler's scores. Writes rank_cost.json and rank_cost.md into --out.

    python examples/rank_cost.py --preset subllm-tiny --lengths 4096,16384,32768
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from subllm.model import ModelConfig, SubLLM
from subllm.model.subsample import causal_rank_keep, keep_within_band, selection_rule


def _best(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls, in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="subllm-tiny")
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench-out/rank-cost")
    a = p.parse_args()
    torch.manual_seed(0)
    config = ModelConfig.preset(a.preset)
    rows = []
    for L in map(int, a.lengths.split(",")):
        config.max_seq_len = max(config.max_seq_len, L)
        model = SubLLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (1, L))
        s = torch.randn(1, L)
        with torch.no_grad():
            rank = _best(lambda: model(ids), a.repeats)  # noqa: B023 (called here)
            with selection_rule(model, "top_k"):
                top_k = _best(lambda: model(ids), a.repeats)  # noqa: B023
            rule = _best(lambda: keep_within_band(causal_rank_keep(s, None, 0.64),  # noqa: B023
                                                  None, 0.64, 0.02), a.repeats)
        rows.append({"preset": a.preset, "tokens": L, "forward_rank_s": rank,
                     "forward_top_k_s": top_k, "rank_rule_s": rule,
                     "rank_rule_share": rule / rank})
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    (out / "rank_cost.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"Machine: {machine}", "", "| preset | tokens | forward, rank rule (s) | "
             "forward, top-k (s) | rank rule on one row (s) | its share of the forward |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['tokens']} | {r['forward_rank_s']:.3f} | "
              f"{r['forward_top_k_s']:.3f} | {r['rank_rule_s']:.4f} | "
              f"{100 * r['rank_rule_share']:.2f} % |" for r in rows]
    (out / "rank_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
