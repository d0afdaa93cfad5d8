"""Does the model that serves keep what the model that trained kept? (docs/design.md §3.8)

Trains each setup x learning rate x seed with `subllm train`, validating every `--every`
steps, and tabulates the eval-mode kept fraction of every subsampling module against its
keep ratio: the final value and the worst from `--from-step` on, with the train/inference
loss gap. Writes routing_study.json and routing_study.md into --out.

    subllm prepare --out data/default            # the built-in corpus (stdlib source)
    python examples/routing_study.py --setups toy,tiny --lrs 1e-3,3e-3 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SETUPS = {  # the routing issue's setups
    "toy": {"preset": "subllm-tiny", "seq-len": 128, "batch-size": 8,
            "model": {"dim": 64, "n_heads": 4, "ffn_dim": 176, "n_layers": 4,
                      "structure": "T(TT)T", "keep": 0.6}},
    "tiny": {"preset": "subllm-tiny", "seq-len": 256, "batch-size": 16},
    "small": {"preset": "subllm-small", "seq-len": 256, "batch-size": 8},
}
KEEP = {"toy": 0.6, "tiny": 0.64, "small": 0.64}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default="toy,tiny")
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--from-step", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--data", default="data/default")
    p.add_argument("--out", default="bench-out/routing")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setup in a.setups.split(","):
        for lr in a.lrs.split(","):
            for seed in a.seeds.split(","):
                name = f"{setup}-lr{lr}-s{seed}"
                settings = {**SETUPS[setup], "data": a.data, "lr": float(lr),
                            "min-lr": float(lr) / 10, "seed": int(seed), "max-steps": a.steps,
                            "eval-every": a.every, "eval-batches": a.eval_batches,
                            "save-every": 0, "log-every": a.every}
                (out / f"{name}.yaml").write_text(yaml.safe_dump(settings))
                run = out / name
                if not _finished(run, a.steps):  # a study stopped half-way picks up here
                    shutil.rmtree(run, ignore_errors=True)  # no checkpoints: start it again
                    subprocess.run([sys.executable, "-m", "subllm", "train", "--config",
                                    str(out / f"{name}.yaml"), "--out", str(run)], check=True)
                evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text()
                         .splitlines()]
                evals = [r for r in evals if "val_kept_fractions" in r]
                keep = KEEP[setup]
                late = [r for r in evals if r["step"] >= a.from_step]
                rows.append({
                    "setup": setup, "lr": float(lr), "seed": int(seed), "keep": keep,
                    "final": evals[-1]["val_kept_fractions"],
                    "worst_after": max(abs(f - keep) for r in late
                                       for f in r["val_kept_fractions"]),
                    "gap": evals[-1].get("val_gap"), "val_loss": evals[-1]["val_loss"],
                    "evals": {r["step"]: r["val_kept_fractions"] for r in evals}})
                print(name, rows[-1]["final"], f"worst {rows[-1]['worst_after']:.3f}",
                      flush=True)
                _write(out, rows, a.from_step)


def _finished(run: Path, steps: int) -> bool:
    """Whether `run` already holds a validation point at its last step."""
    try:
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):  # none yet, or a line cut short by a kill
        return False
    return any(r.get("step") == steps and "val_kept_fractions" in r for r in records)


def _write(out: Path, rows: list[dict], from_step: int) -> None:
    (out / "routing_study.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| setup | lr | seed | keep | final kept (per module) | worst from step "
             f"{from_step} | gap | val loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['lr']:g} | {r['seed']} | {r['keep']} | "
                     f"{' / '.join(f'{f:.3f}' for f in r['final'])} | {r['worst_after']:.3f} | "
                     f"{100 * (r['gap'] or 0):+.2f} % | {r['val_loss']:.3f} |")
    (out / "routing_study.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
