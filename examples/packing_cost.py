"""What packed rows cost (docs/design.md §3.10): a training step (forward, backward, AdamW) of
a preset on windows of a prepared corpus, with `document_ids` (--packing documents) and without
(--packing none), taking turns step by step; median times and their ratio. Writes
packing_cost.json and packing_cost.md into --out.

    python examples/packing_cost.py --data data/default --presets llama-tiny,subllm-tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from subllm.model import ModelConfig, SubLLM, document_ids
from subllm.train.data import load_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/default")
    p.add_argument("--presets", default="llama-tiny,subllm-tiny")
    p.add_argument("--seq-lens", default="256,1024")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="bench-out/packing-cost")
    a = p.parse_args()
    data = load_data(a.data)
    tokens, eot = data.tokens("train"), data.eot_id
    g = torch.Generator().manual_seed(0)
    rows = []
    for preset in a.presets.split(","):
        for L in map(int, a.seq_lens.split(",")):
            torch.manual_seed(0)
            cfg = ModelConfig.from_dict({**ModelConfig.preset(preset).to_dict(),
                                         "vocab_size": data.vocab_size, "max_seq_len": L})
            model = SubLLM(cfg).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            times: dict[str, list[float]] = {"none": [], "documents": []}
            docs_per_row = []
            for step in range(a.steps + 1):
                starts = torch.randint(0, len(tokens) - L, (a.batch_size,), generator=g)
                x = torch.stack([torch.from_numpy(tokens[s:s + L].astype("int64"))
                                 for s in starts.tolist()])
                docs = document_ids(x, eot)
                docs_per_row.append(float((docs[:, -1] + 1).float().mean()))
                order = ("none", "documents") if step % 2 else ("documents", "none")
                for mode in order:
                    model.set_step(step)
                    t = time.perf_counter()
                    kw = {"document_ids": docs} if mode == "documents" else {}
                    model(x, labels=x, **kw).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step:  # the first round warms up
                        times[mode].append(time.perf_counter() - t)
            none, packed = (statistics.median(times[k]) for k in ("none", "documents"))
            rows.append({"preset": preset, "seq_len": L, "batch_size": a.batch_size,
                         "documents_per_row": statistics.mean(docs_per_row),
                         "step_s_none": none, "step_s_documents": packed,
                         "ratio": packed / none})
            print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    (out / "packing_cost.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                      indent=2) + "\n")
    lines = ["| preset | seq len | documents / row | step, none (s) | step, documents (s) | "
             "documents / none |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['seq_len']} | {r['documents_per_row']:.1f} | "
              f"{r['step_s_none']:.3f} | {r['step_s_documents']:.3f} | {r['ratio']:.3f} |"
              for r in rows]
    (out / "packing_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
