"""Does the model that serves keep what the model that trained kept? (docs/design.md §3.8)

Trains each setup x learning rate x seed with `subllm train`, validating every `--every`
steps, and tabulates the eval-mode kept fraction of every subsampling module against its
keep ratio: the final value and the worst from `--from-step` on, with the train/inference
loss gap. Writes routing_study.json and routing_study.md into --out.

    subllm prepare --out data/default            # the built-in corpus (stdlib source)
    python examples/routing_study.py --setups toy,tiny --lrs 1e-3,3e-3 --seeds 0,1,2,3,4

`--variants` ablates the routing stack (design.md §3.8): each variant is the default model
with one mechanism changed (`VARIANTS`), and the table adds the mean step time.

    python examples/routing_study.py --setups toy,tiny --lrs 3e-3 --seeds 0,1 \
        --variants full,no-cutoff,paper
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
# The routing ablation (design.md §3.8): model-config overrides per variant; "no_cutoff" is
# not a config field but runs the training with the calibrated cut-off switched off (the
# scores, and so the upsampling weights, unshifted), see `_worker`. The published ablation
# ran at commit af17813, which also had the variants no-quota ({"rank_quota_rate": 0}),
# leak ({"weight_leak": 0.1}) and bare (no-quota and no-cutoff), since retired.
VARIANTS = {
    "full": {},
    "no-cutoff": {"no_cutoff": True},
    "paper": {"balancer": "paper"},
}


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
    p.add_argument("--variants", default="full")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setup, lr, seed, variant in [(s, lr, seed, v) for v in a.variants.split(",")
                                     for s in a.setups.split(",") for lr in a.lrs.split(",")
                                     for seed in a.seeds.split(",")]:
        name = f"{setup}-lr{lr}-s{seed}" + ("" if variant == "full" else f"-{variant}")
        over = dict(VARIANTS[variant])
        no_cutoff = over.pop("no_cutoff", False)
        settings = {**SETUPS[setup], "data": a.data, "lr": float(lr),
                    "min-lr": float(lr) / 10, "seed": int(seed), "max-steps": a.steps,
                    "eval-every": a.every, "eval-batches": a.eval_batches,
                    "save-every": 0, "log-every": 10}
        if over:
            settings["model"] = {**settings.get("model", {}), **over}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(settings))
        run = out / name
        if not _finished(run, a.steps):  # a study stopped half-way picks up here
            shutil.rmtree(run, ignore_errors=True)  # no checkpoints: start it again
            cmd = [sys.executable, __file__, "--worker"] if no_cutoff else [
                sys.executable, "-m", "subllm"]
            subprocess.run([*cmd, "train", "--config", str(out / f"{name}.yaml"),
                            "--out", str(run)], check=True)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text()
                   .splitlines()]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        evals = [r for r in records if "val_kept_fractions" in r]
        keep = KEEP[setup]
        late = [r for r in evals if r["step"] >= a.from_step]
        rows.append({
            "variant": variant, "setup": setup,
            "tokens_per_s": statistics.median(speeds) if speeds else None, "lr": float(lr),
            "seed": int(seed), "keep": keep,
            "final": evals[-1]["val_kept_fractions"],
            "worst_after": max(abs(f - keep) for r in late
                               for f in r["val_kept_fractions"]),
            "gap": evals[-1].get("val_gap"),
            "worst_gap": max(abs(r.get("val_gap") or 0) for r in late),
            "val_loss": evals[-1]["val_loss"],
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
    lines = [f"| variant | setup | lr | seed | keep | final kept (per module) | worst from "
             f"step {from_step} | gap | largest gap from step {from_step} | val loss | "
             "tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['setup']} | {r['lr']:g} | {r['seed']} | "
                     f"{r['keep']} | {' / '.join(f'{f:.3f}' for f in r['final'])} | "
                     f"{r['worst_after']:.3f} | {100 * (r['gap'] or 0):+.2f} % | "
                     f"{100 * r['worst_gap']:.2f} % | {r['val_loss']:.3f} | "
                     f"{r['tokens_per_s'] or 0:,.0f} |")
    (out / "routing_study.md").write_text("\n".join(lines) + "\n")


def _worker() -> int:
    """`subllm` with the rank rule's calibrated cut-off switched off (variant no-cutoff)."""
    from subllm.cli import main as cli
    from subllm.model import subsample

    init = subsample.Subsampler.__init__

    def no_cutoff(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.calibrated = False

    subsample.Subsampler.__init__ = no_cutoff
    return cli(sys.argv[2:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker())
    main()
