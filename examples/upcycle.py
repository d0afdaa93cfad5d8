"""The upcycling recipe, measured: a Llama / Qwen2 / Qwen3 / Mistral source -> SUBLLM.

For each family: train a small source model of that family on the prepared data (so the
source is a trained model, not a random one), write it with `transformers`' own class
(`to_hf` + `save_pretrained`), convert it with `subllm convert --from-hf --structure S`,
and continue training with `subllm train --init-from`, once with a router warm-up
(`--train-only-routers N`) and once without, for 10 N steps; as the reference, the source
itself (converted all-`T`) trained the same 10 N steps. Reported: the validation loss of
the source (computed by the `transformers` model itself, and by `subllm eval` on its
all-`T` conversion) and of each run at step 0, N and 10 N, on the same validation
batches, and the final eval-mode kept fraction. Writes OUT/upcycle.json and OUT/upcycle.md.

    python examples/upcycle.py --data data/default --out bench-out/upcycle --router-steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from subllm.cli import main
from subllm.interop.llama import to_hf
from subllm.model.config import ModelConfig
from subllm.model.subllm import SubLLM
from subllm.train import checkpoint as ckpt
from subllm.train.data import load_data, val_batches

# The source models: 4 blocks, grouped KV heads, each with its family's features.
SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=344, max_seq_len=512)
FAMILIES = {
    "llama": dict(hf_family="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2": dict(hf_family="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "qwen3": dict(hf_family="qwen3", qk_norm=True, head_dim=48, tie_embeddings=True,
                  rope_theta=1e6),
    "mistral": dict(hf_family="mistral", sliding_window=256),
}


def train(args: argparse.Namespace, out: Path, steps: int, **flags: object) -> None:
    if args.reuse and (out / "metrics.jsonl").is_file():
        return  # --reuse: a finished run of an earlier invocation
    argv = ["train", "--data", str(args.data), "--out", str(out), "--max-steps", str(steps),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--eval-batches", str(args.eval_batches), "--save-every", "0", "--log-every", "10",
            "--device", "cpu", "--seed", "0"]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0


def val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


@torch.no_grad()
def hf_val_loss(model_dir: Path, args: argparse.Namespace) -> float:
    """The loss of a `transformers` model on the validation batches `subllm eval` uses."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = load_data(Path(args.data))
    total = n = 0.0
    for batch in val_batches(data.tokens("val"), args.batch_size, args.seq_len,
                             args.eval_batches):
        logits = model(batch).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        n += batch[:, 1:].numel()
    return total / n


def eval_dir(model_dir: Path, args: argparse.Namespace, out: Path) -> float:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--checkpoint", str(model_dir), "--data", str(args.data),
                     "--batches", str(args.eval_batches), "--batch-size", str(args.batch_size),
                     "--seq-len", str(args.seq_len), "--device", "cpu", "--json"]) == 0
    text = buf.getvalue()
    result = json.loads(text[text.index("{"):])
    out.write_text(json.dumps(result, indent=2))
    return result["val_loss"]


def run_family(family: str, args: argparse.Namespace) -> dict:
    root = Path(args.out) / family
    n = args.router_steps
    # 1. a trained source model of the family, in transformers' own class
    settings = root / "source.yaml"
    if root.exists() and not args.reuse:  # this script's own earlier output
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    model = {**SHAPE, **FAMILIES[family], "structure": "T" * SHAPE["n_layers"]}
    settings.write_text(yaml.safe_dump({"preset": "llama-tiny", "model": model}))
    train(args, root / "source-run", args.source_steps, config=settings, lr=2e-3,
          warmup=20, eval_every=0)
    saved = ckpt.latest_checkpoint(root / "source-run")
    config = ModelConfig.from_dict(ckpt.load_model_config(saved))
    ours = SubLLM(config)
    ours.load_state_dict(ckpt.load_weights(saved), strict=False)
    hf = to_hf(ours)
    src = root / "source-hf"
    hf.save_pretrained(src)
    data = load_data(Path(args.data))
    PreTrainedTokenizerFast(tokenizer_file=str(data.tokenizer_path),
                            eos_token="<|endoftext|>").save_pretrained(src)
    source_loss = hf_val_loss(src, args)
    # the all-T conversion is the source itself: the same loss through subllm's own eval
    same = root / "converted-all-T"
    assert main(["convert", "--from-hf", str(src), "--out", str(same), "--force"]) == 0
    all_t_loss = eval_dir(same, args, root / "all-T-eval.json")
    # 2. convert into a SUBLLM; 3. continue training, with and without the router warm-up
    conv = root / "converted"
    assert main(["convert", "--from-hf", str(src), "--structure", args.structure,
                 "--keep", str(args.keep), "--out", str(conv), "--force"]) == 0
    step0 = eval_dir(conv, args, root / "converted-eval.json")
    runs = {}
    # the reference: the source itself trained the same steps (what the SUBLLM costs)
    plans = [("router warm-up", "run-warmup", conv, n, step0),
             ("no warm-up", "run-plain", conv, 0, step0)]
    if not args.no_reference:
        plans.append(("source continued (all-T)", "run-source", same, 0, all_t_loss))
    for name, folder, start, warm, first in plans:
        run = root / folder
        t0 = time.perf_counter()
        train(args, run, 10 * n, init_from=start, train_only_routers=warm, lr=args.lr,
              warmup=5, min_lr=args.lr / 10, eval_every=n)
        losses = val_losses(run)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        kept = ([r["val_kept_fractions"] for r in records if "val_kept_fractions" in r]
                or [[]])[-1]
        runs[name] = {"val_loss": {0: first, n: losses[n], 10 * n: losses[10 * n]},
                      "val_loss_all": losses, "final_val_kept_fractions": kept,
                      "seconds": time.perf_counter() - t0}
    return {"family": family, "hf_class": type(hf).__name__, "source_val_loss": source_loss,
            "all_T_val_loss": all_t_loss,
            "source_steps": args.source_steps, "runs": runs}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    n = args.router_steps
    lines = [
        f"Structure `{args.structure}`, keep {args.keep}; sources trained {args.source_steps} "
        f"steps; continued training at lr {args.lr} for {10 * n} steps; batch "
        f"{args.batch_size} x {args.seq_len} tokens; validation loss on {args.eval_batches} "
        "batches (the same for every model).",
        "",
        f"| family (class) | source (all-T converted) | run | step 0 | step {n} (N) | "
        f"step {10 * n} (10N) | eval kept |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, run in r["runs"].items():
            v = run["val_loss"]
            kept = ", ".join(f"{k:.2f}" for k in run["final_val_kept_fractions"]) or "-"
            lines.append(f"| {r['family']} ({r['hf_class']}) | {r['source_val_loss']:.4f} "
                         f"({r['all_T_val_loss']:.4f}) | "
                         f"{name} | {v[0]:.3f} | {v[n]:.3f} | {v[10 * n]:.3f} | {kept} |")
    return "\n".join(lines) + "\n"


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared data (subllm prepare)")
    p.add_argument("--out", default="bench-out/upcycle")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--router-steps", type=int, default=20, help="N")
    p.add_argument("--source-steps", type=int, default=400)
    p.add_argument("--structure", default="T(TT)T")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--reuse", action="store_true",
                   help="keep the finished runs of an earlier invocation in --out")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference run (the source trained the same steps)")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = [run_family(f, args) for f in args.families.split(",")]
    out = Path(args.out)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "args": vars(args), "results": results}
    (out / "upcycle.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "upcycle.md").write_text(markdown(results, args))
    print(markdown(results, args))
    assert all(math.isfinite(r["source_val_loss"]) for r in results)


if __name__ == "__main__":
    cli()
