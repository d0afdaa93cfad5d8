"""`subllm bench quality`: model A and model B trained alike, validation loss at equal tokens.

Both models are trained by `subllm.train.train` (the recipe of `subllm train`) on one
prepared data directory with the same settings: token budget, sequence length, batch size,
seed (so the same training and validation batches in the same order), AdamW and
learning-rate schedule; each in its own run directory, OUT/runs/A and OUT/runs/B. The
trainings are interleaved at the evaluation points (A up to the point, then B, then B
first, ...; an exact resume each time), so validation loss is measured at the same token
counts on the same batches for both. `train_s` is the sum of the training loop's step
times (no evaluation, checkpoints or model building); `wall_s` includes them; the median
step time is given too. Ratios are B / A. Writes quality.json, quality.md and
quality_curves.png; with --seeds N, one such folder per seed and quality_seeds.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from subllm.bench import common
from subllm.bench.common import Col
from subllm.errors import SubLLMError
from subllm.flags import non_negative_float, non_negative_int, positive_float, positive_int
from subllm.model.config import PRESETS, ModelConfig
from subllm.train.config import DEFAULT_DATA_DIR, TrainConfig, build_model_config, check_config

DEFAULT_PAIR = "llama-tiny,subllm-tiny"
LOSS_TOLERANCE = 0.02  # issue 6: SUBLLM's validation loss within 2 % of LLaMA's
RUN_NAMES = {"a": "A", "b": "B"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR,
                   help=f"A,B: presets or YAML/JSON model config files (default {DEFAULT_PAIR}); "
                        "the vocabulary follows the data")
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR), metavar="DATA_DIR",
                   help=f"prepared data directory (default {DEFAULT_DATA_DIR}, prepared from the "
                        "Python standard library on first use)")
    p.add_argument("--tokens", type=positive_int, required=True, metavar="N",
                   help="training tokens per model (rounded down to whole steps)")
    p.add_argument("--seq-len", type=positive_int, default=256, metavar="N")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="sequences per step (default 16)")
    p.add_argument("--lr", type=positive_float, default=2e-3, metavar="F",
                   help="peak learning rate (default 2e-3)")
    p.add_argument("--min-lr", type=non_negative_float, default=None, metavar="F",
                   help="learning rate at the end of the cosine (default lr / 10)")
    p.add_argument("--warmup", type=non_negative_int, default=None, metavar="N",
                   help="linear warm-up steps (default 10 %% of the steps)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, metavar="F")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0, metavar="F")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--evals", type=positive_int, default=None, metavar="N",
                      help="validation points, evenly spaced in tokens (default 10)")
    when.add_argument("--eval-every-tokens", type=positive_int, default=None, metavar="N",
                      help="validate every N training tokens (and at the end)")
    p.add_argument("--eval-batches", type=positive_int, default=20, metavar="N",
                   help="validation batches of --batch-size x --seq-len tokens (default 20)")
    common.add_flags(p, seed={"help": "seed of the weights and the data order (default 0)"})
    p.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                   help="repeat with seeds SEED, SEED+1, ... (in OUT/seed-S/) and summarise "
                        "them (default 1: one run in OUT)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast dtype; auto = bf16 on GPUs that have it, else fp32")
    common.add_flags(p, threads={"type": positive_int, "help": "torch CPU threads (default: "
                                                              "torch's)"})
    common.add_out_argument(p, "quality", "; runs go to OUT/runs/A, B")


# ---- settings ------------------------------------------------------------------------


def model_settings(spec: str, seq_len: int) -> tuple[str, dict[str, Any], Any]:
    """A preset or config file as (TrainConfig.preset, TrainConfig.model, ModelConfig): a
    file becomes a full override of a preset's fields, without its vocab_size (both models
    get the data's); the context is raised to --seq-len if needed."""
    config = ModelConfig.load(spec)  # ConfigError (a SubLLMError) naming the problem
    if spec in PRESETS:
        preset, overrides = spec, {}
    else:
        overrides = config.to_dict()
        overrides.pop("vocab_size")
        preset = "subllm-tiny" if config.is_subllm else "llama-tiny"  # every field overridden
    if seq_len > config.max_seq_len:
        overrides["max_seq_len"] = seq_len
    return preset, overrides, config


def eval_steps(steps: int, tokens_per_step: int, evals: int | None,
               every_tokens: int | None) -> list[int]:
    """The steps after which both models are validated (always including the last)."""
    if every_tokens is not None:
        if every_tokens < tokens_per_step:
            raise SubLLMError(
                f"--eval-every-tokens {every_tokens} is less than one step ({tokens_per_step} "
                "tokens = batch size x sequence length); raise it"
            )
        points = list(range(every_tokens // tokens_per_step, steps + 1,
                            every_tokens // tokens_per_step))
    else:
        n = 10 if evals is None else evals
        points = [round(i * steps / n) for i in range(1, n + 1)]
    return sorted({p for p in points if p > 0} | {steps})


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings both models get, with the flags' defaults filled in; `--seeds`
    reuses a seed's report only if these match."""
    tokens_per_step = args.batch_size * args.seq_len
    steps = args.tokens // tokens_per_step
    if steps < 1:
        raise SubLLMError(
            f"--tokens {args.tokens} is less than one step ({tokens_per_step} tokens = "
            f"--batch-size {args.batch_size} x --seq-len {args.seq_len}); raise --tokens"
        )
    return {"steps": steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "lr": args.lr, "min_lr": args.lr / 10 if args.min_lr is None else args.min_lr,
            "warmup": max(1, steps // 10) if args.warmup is None else args.warmup,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed,
            "eval_steps": eval_steps(steps, tokens_per_step, args.evals, args.eval_every_tokens)}


def _ensure_data(data_dir: Path) -> Any:
    """Load the data directory; the default one is prepared on first use (as `subllm train`)."""
    from subllm.train.data import load_data, prepare, print_summary

    if not (data_dir / "meta.json").exists() and data_dir == DEFAULT_DATA_DIR:
        print(f"preparing the default corpus (Python standard library) into {data_dir}",
              file=sys.stderr, flush=True)
        print_summary(prepare(data_dir), data_dir)
    return load_data(data_dir)


# ---- the measurement -----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.seeds == 1:
        return _run_one(args)
    out = Path(args.out)
    reports = []
    for seed in range(args.seed, args.seed + args.seeds):
        one = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": 1,
                                    "out": str(out / f"seed-{seed}")})
        done = _finished_seed(one)
        if done is not None:  # a stopped study, or seeds run side by side, pick up here
            print(f"bench quality: seed {seed} already measured with these settings in "
                  f"{one.out}; reusing it", flush=True)
        else:
            code = _run_one(one)
            if code:
                return code
            done = json.loads((Path(one.out) / "quality.json").read_text())
        reports.append(done)
    summary = seeds_summary(reports)
    print(seeds_line(summary))
    common.write_outputs(out, "quality_seeds", summary, render_seeds_markdown(summary), plot_seeds)
    return 0


def _finished_seed(args: argparse.Namespace) -> dict[str, Any] | None:
    """The complete report in `args.out` when it was measured with the settings `args`
    asks for (an earlier or parallel `--seed S --out OUT/seed-S`), None when there is none;
    one with other settings is an error, not silently mixed in."""
    path = Path(args.out) / "quality.json"
    if not path.is_file():
        return None
    want = {"pair": list(common.parse_pair(args.pair, DEFAULT_PAIR)), **_plan(args)}
    try:
        report = json.loads(path.read_text())
        have = {"pair": [report["a"]["spec"], report["b"]["spec"]],
                **{k: report["settings"][k] for k in want if k != "pair"}}
    except (OSError, ValueError, KeyError, TypeError):
        raise SubLLMError(f"{path} is not a complete bench quality report; remove "
                          f"{args.out} to measure seed {args.seed} again") from None
    differ = [k for k in want if have[k] != want[k]]
    if differ:
        raise SubLLMError(f"{path} was measured with other settings ({differ[0]} "
                          f"{have[differ[0]]!r}, asked {want[differ[0]]!r}); choose a new "
                          f"--out or remove {args.out}")
    return report


def _run_one(args: argparse.Namespace) -> int:
    """One comparison (one seed) into args.out; returns the exit code."""
    import torch

    from subllm.train import checkpoint as ckpt
    from subllm.train.loop import train
    from subllm.train.runtime import Dist, autocast_dtype, pick_device

    specs = common.parse_pair(args.pair, DEFAULT_PAIR)
    models = {k: model_settings(spec, args.seq_len) for k, spec in zip("ab", specs, strict=True)}
    settings = _plan(args)
    steps, stops = settings["steps"], settings["eval_steps"]
    tokens_per_step = args.batch_size * args.seq_len
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = _ensure_data(Path(args.data))
    if len(data.tokens("train")) < args.seq_len + 1:
        raise SubLLMError(
            f"the training split of {args.data} has {len(data.tokens('train'))} tokens, fewer "
            f"than one sequence of --seq-len {args.seq_len}; lower --seq-len or prepare more data"
        )
    out = Path(args.out)
    runs = {k: out / "runs" / name for k, name in RUN_NAMES.items()}
    for run_dir in runs.values():
        if ckpt.latest_checkpoint(run_dir) is not None:
            raise SubLLMError(f"{run_dir} already holds a run; choose a new --out or remove it")

    def train_config(key: str, stop_at: int | None = None, resume: bool = False) -> TrainConfig:
        preset, overrides, _ = models[key]
        return TrainConfig(
            data=str(data.path), out=str(runs[key]), preset=preset, model=dict(overrides),
            seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=1, max_steps=steps,
            stop_at=stop_at, lr=args.lr, min_lr=settings["min_lr"], warmup=settings["warmup"],
            weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            eval_every=0,  # each segment ends with one evaluation
            eval_batches=args.eval_batches, save_every=0, keep_checkpoints=1, log_every=1,
            seed=args.seed, device=args.device, dtype=args.dtype, resume=resume)

    configs = {}  # every check that can fail before anything trains
    for key in models:
        cfg = train_config(key)
        check_config(cfg)
        configs[key] = build_model_config(cfg, data)
    device = pick_device(args.device, Dist())
    dtype = "bf16" if autocast_dtype(args.dtype, device) is not None else "fp32"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SubLLMError(f"cannot create --out {out} ({e.strerror}); choose a writable "
                          "folder") from None

    print(f"bench quality: A = {specs[0]}, B = {specs[1]}; {steps} steps of {args.batch_size} x "
          f"{args.seq_len} = {steps * tokens_per_step:,} tokens each, validation after steps "
          f"{', '.join(map(str, stops))}; runs in {out / 'runs'}", flush=True)
    wall: dict[str, list[float]] = {"a": [], "b": []}
    start = 0
    for i, stop in enumerate(stops):
        for key in common.alternating(("a", "b"), i):
            t0 = time.perf_counter()
            result = train(train_config(key, stop_at=stop, resume=i > 0))
            wall[key].append(time.perf_counter() - t0)
            if result.get("interrupted"):
                print(f"bench quality: interrupted; the partial runs are in {out / 'runs'}",
                      file=sys.stderr, flush=True)
                return 128 + int(result.get("signal") or 15)
        print(f"bench quality: {stop * tokens_per_step:,} tokens (step {stop}/{steps}) done; "
              f"segment {stop - start} steps", flush=True)
        start = stop

    report = build_report(args, settings, data, configs, runs, wall, device.type, dtype)
    print(summary_line(report))
    common.write_outputs(out, "quality", report, render_markdown(report), plot,
                         "quality_curves.png")
    return 0


def read_run(run_dir: Path, tokens_per_step: int, wall: list[float], stops: list[int]
             ) -> tuple[list[dict[str, Any]], list[float]]:
    """(validation points of one run with the training time up to each, every step's time)."""
    from subllm.train.runtime import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    step_time = {r["step"]: tokens_per_step / r["tokens_per_s"] for r in records
                 if "tokens_per_s" in r}
    val = {r["step"]: r for r in records if "val_loss" in r}
    missing = [s for s in stops if s not in val] + [s for s in range(1, stops[-1] + 1)
                                                    if s not in step_time]
    if missing:
        raise SubLLMError(f"{run_dir / 'metrics.jsonl'} lacks step {missing[0]}; the run is "
                          "incomplete, run the bench again with a new --out")
    curve, elapsed, cum_wall, prev = [], 0.0, 0.0, 0
    for stop, seg_wall in zip(stops, wall, strict=True):
        elapsed += sum(step_time[s] for s in range(prev + 1, stop + 1))
        cum_wall += seg_wall
        r = val[stop]
        curve.append({"step": stop, "tokens": stop * tokens_per_step, "train_s": elapsed,
                      "wall_s": cum_wall, "val_loss": r["val_loss"],
                      "val_perplexity": r["val_perplexity"],
                      "val_kept_fractions": r.get("val_kept_fractions", [])})
        prev = stop
    return curve, [step_time[s] for s in range(1, stops[-1] + 1)]


def loss_at_time(curve: list[dict[str, Any]], seconds: float) -> float | None:
    """Validation loss linearly interpolated in training time; None outside the curve."""
    pts = [(p["train_s"], p["val_loss"]) for p in curve]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:], strict=False):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    if pts and math.isclose(seconds, pts[-1][0]):
        return pts[-1][1]
    return None


def build_report(args: argparse.Namespace, settings: dict[str, Any], data: Any,
                 configs: dict[str, Any], runs: dict[str, Path], wall: dict[str, list[float]],
                 device: str, dtype: str) -> dict[str, Any]:
    """Everything measured, as one JSON-able dict; `settings` is the plan both trained by."""
    import torch

    from subllm.model import SubLLM
    from subllm.train.data import val_batches

    specs = dict(zip(("a", "b"), common.parse_pair(args.pair, DEFAULT_PAIR), strict=True))
    steps, stops = settings["steps"], settings["eval_steps"]
    tokens_per_step = args.batch_size * args.seq_len
    read = {k: read_run(runs[k], tokens_per_step, wall[k], stops) for k in runs}
    curves = {k: curve for k, (curve, _) in read.items()}
    summaries, final = {}, {}
    for k, config in configs.items():
        with torch.device("meta"):
            n_params = SubLLM(config).num_params()
        summaries[k] = {**common.model_summary(specs[k], config, n_params), "run_dir": str(runs[k])}
        last = curves[k][-1]
        final[k] = {"val_loss": last["val_loss"], "val_perplexity": last["val_perplexity"],
                    "train_s": last["train_s"], "wall_s": last["wall_s"],
                    "overhead_s": last["wall_s"] - last["train_s"],
                    "tokens_per_s": last["tokens"] / last["train_s"],
                    "median_step_s": statistics.median(read[k][1]),
                    "eval_kept_fractions": last["val_kept_fractions"]}
    a, b = final["a"], final["b"]
    # equal time: the slower model's loss interpolated at the faster one's training time
    t_eq = min(a["train_s"], b["train_s"])
    equal_time = {"train_s": t_eq, "a_val_loss": loss_at_time(curves["a"], t_eq),
                  "b_val_loss": loss_at_time(curves["b"], t_eq)}
    equal_time["val_loss_ratio"] = common.ratio(equal_time["b_val_loss"], equal_time["a_val_loss"])
    q = common.ratios(b, a, {"val_loss": "val_loss", "val_perplexity": "val_perplexity",
                      "train_time": "train_s", "wall_time": "wall_s",
                      "tokens_per_s": "tokens_per_s", "median_step_time": "median_step_s"})
    q["val_loss_per_point"] = [pb["val_loss"] / pa["val_loss"]
                               for pa, pb in zip(curves["a"], curves["b"], strict=True)]
    target = {"loss_tolerance": LOSS_TOLERANCE,
              "loss_within": q["val_loss"] <= 1 + LOSS_TOLERANCE,
              "less_time": q["train_time"] < 1.0}
    target["met"] = target["loss_within"] and target["less_time"]
    warnings, slashed = [], common.slashed
    for k in ("a", "b"):
        keeps, kept = summaries[k]["keep"], final[k]["eval_kept_fractions"]
        if keeps and kept and common.off_keep(kept, keeps):
            warnings.append(
                f"{RUN_NAMES[k]}'s eval-mode kept fractions {slashed(kept)} are off its keep "
                f"ratios {slashed(keeps, 'g')} (by more than {common.KEPT_TOLERANCE}): its "
                "validation runs more (or fewer) tokens through the segments than training")
    val = val_batches(data.tokens("val"), args.batch_size, args.seq_len, args.eval_batches)
    windows = max(1, int(data.meta["tokens"]["train"]) // args.seq_len - 1)  # an epoch's
    return {
        **common.report_head("quality", device, torch.get_num_threads()),
        "dtype": dtype, "a": summaries["a"], "b": summaries["b"],
        "settings": {
            "data": str(data.path), "data_train_tokens": int(data.meta["tokens"]["train"]),
            "data_val_tokens": int(data.meta["tokens"]["val"]),
            "vocab_size": data.vocab_size, "data_sources": data.meta.get("sources"),
            "tokens_asked": args.tokens, "tokens": steps * tokens_per_step,
            "tokens_per_step": tokens_per_step, "epochs": steps * args.batch_size / windows,
            **settings,
            "eval_batches": len(val), "val_tokens_per_eval": sum(int(x.numel()) for x in val),
            "schedule": "interleaved at the evaluation points (A B, B A, ...), exact resume",
            "timing": "train_s = sum of the training loop's step times (batch, forward, "
                      "backward, clip, AdamW), without evaluation, checkpoints and model "
                      "building; wall_s = all of a model's segments"},
        "curves": curves, "final": final, "ratios": q, "equal_time": equal_time,
        "target": target, "kept_tolerance": common.KEPT_TOLERANCE, "warnings": warnings,
    }


# ---- outputs -------------------------------------------------------------------------


def _kept(fractions: list[float]) -> str:
    return common.slashed(fractions) or "-"


def summary_line(r: dict[str, Any]) -> str:
    a, b, q, t = r["final"]["a"], r["final"]["b"], r["ratios"], r["target"]
    return (f"val loss A {a['val_loss']:.4f}, B {b['val_loss']:.4f} (B/A {q['val_loss']:.4f}); "
            f"train time A {a['train_s']:.1f} s, B {b['train_s']:.1f} s (B/A "
            f"{q['train_time']:.3f}); B eval kept {_kept(b['eval_kept_fractions'])}; "
            f"target (loss within {t['loss_tolerance']:.0%}, less time): "
            + ("MET" if t["met"] else "MISSED"))


MODEL_COLUMNS = [
    Col("model", lambda m: f"{m['name']} {m['spec']}", align="l"),
    Col("structure", "structure", "`{}`", "l"),
    Col("parameters", "parameters", "{:,}"), Col("val loss", "val_loss", "{:.4f}"),
    Col("perplexity", "val_perplexity", "{:.2f}"),
    Col("train s", "train_s", "{:.1f}"), Col("wall s", "wall_s", "{:.1f}"),
    Col("median step s", "median_step_s", "{:.3f}"),
    Col("tokens/s", "tokens_per_s", "{:,.0f}"),
    Col("eval kept", lambda m: _kept(m["eval_kept_fractions"]) + (
        f" (keep {common.slashed(m['keep'], 'g')})" if m["keep"] else ""), align="l"),
]
POINT_COLUMNS = [
    Col("tokens", "a.tokens", "{:,}"),
    Col("A val loss", "a.val_loss", "{:.4f}"), Col("B val loss", "b.val_loss", "{:.4f}"),
    Col("B/A", "ratio", "{:.4f}"),
    Col("A ppl", "a.val_perplexity", "{:.2f}"), Col("B ppl", "b.val_perplexity", "{:.2f}"),
    Col("A train s", "a.train_s", "{:.1f}"), Col("B train s", "b.train_s", "{:.1f}"),
]


def render_markdown(r: dict[str, Any]) -> str:
    s, q, t, eq = r["settings"], r["ratios"], r["target"], r["equal_time"]
    lines = [
        *common.markdown_head(f"subllm bench quality — A = {r['a']['spec']}, "
                              f"B = {r['b']['spec']}", r),
        f"Data: {s['data']} ({s['data_train_tokens']:,} train / {s['data_val_tokens']:,} val "
        f"tokens, vocab {s['vocab_size']}). Each model: {s['steps']} steps of "
        f"{s['batch_size']} x {s['seq_len']} = {s['tokens']:,} tokens ({s['epochs']:.2f} "
        f"epochs), AdamW lr {s['lr']:g} -> {s['min_lr']:g} (cosine, {s['warmup']} warm-up "
        f"steps), weight decay {s['weight_decay']:g}, clip {s['grad_clip']:g}, seed "
        f"{s['seed']}: the same batches in the same order for both. Validation: "
        f"{s['eval_batches']} batches ({s['val_tokens_per_eval']:,} tokens), the same for both.",
        "The trainings alternate at the validation points; `train s` = sum of the step times "
        "(without evaluation and checkpoints), `wall s` = with them, `median step s` = the "
        "median step time (less sensitive to other load on a shared machine). Ratios are B / A.",
        "",
    ]
    for w in r["warnings"]:
        lines += [f"**WARNING: {w}.**", ""]
    models = [{**r[k], **r["final"][k], "name": name} for k, name in RUN_NAMES.items()]
    points = [{"a": pa, "b": pb, "ratio": x} for pa, pb, x in
              zip(r["curves"]["a"], r["curves"]["b"], q["val_loss_per_point"], strict=True)]
    lines += [
        *common.columns(MODEL_COLUMNS, models),
        "",
        f"**B/A: val loss {q['val_loss']:.4f}, perplexity {q['val_perplexity']:.4f}, training "
        f"time {q['train_time']:.3f} (wall {q['wall_time']:.3f}, median step "
        f"{q['median_step_time']:.3f}), tokens/s {q['tokens_per_s']:.3f}.** At equal "
        f"training time ({eq['train_s']:.1f} s, the faster model's total; the other's loss "
        f"interpolated linearly between validation points): "
        f"A {common.fmt(eq['a_val_loss'], '.4f')}, B {common.fmt(eq['b_val_loss'], '.4f')}, B/A "
        f"{common.fmt(eq['val_loss_ratio'], '.4f')}.",
        "",
        f"Target (B's validation loss within {t['loss_tolerance']:.0%} of A's at equal tokens, "
        f"in less time): loss {'met' if t['loss_within'] else 'missed'} "
        f"({q['val_loss'] - 1:+.2%}), time {'met' if t['less_time'] else 'missed'} "
        f"({q['train_time'] - 1:+.1%}): **{'MET' if t['met'] else 'MISSED'}**.",
        "",
        *common.columns(POINT_COLUMNS, points),
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Validation loss (perplexity on the right axis) against tokens and training time."""
    import numpy as np
    from matplotlib.ticker import LogLocator

    fig, axes = common.pyplot().subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_key, label in ((axes[0], "tokens", "training tokens"),
                             (axes[1], "train_s", "training time (s, without evaluation)")):
        for k, marker in (("a", "o"), ("b", "s")):
            pts = r["curves"][k]
            ax.plot([p[x_key] for p in pts], [p["val_loss"] for p in pts], marker=marker,
                    ms=4, label=f"{RUN_NAMES[k]}: {Path(r[k]['spec']).name}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ppl = ax.secondary_yaxis("right", functions=(
            lambda x: np.exp(np.minimum(x, 700.0)), lambda y: np.log(np.maximum(y, 1e-300))))
        ppl.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ppl.set_ylabel("perplexity" if ax is axes[1] else "")
    axes[0].set_ylabel("validation loss (nats / token)")
    axes[0].legend()
    q = r["ratios"]
    fig.suptitle(f"bench quality — {r['device']}, {r['settings']['tokens']:,} tokens each; "
                 f"B/A loss {q['val_loss']:.4f}, time {q['train_time']:.3f}", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


# ---- --seeds: the comparison repeated ------------------------------------------------

def seeds_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over the seeds' reports of the final validation loss, training time
    and their B / A ratios."""
    first = reports[0]
    per_seed = [{"seed": r["settings"]["seed"],
                 "a_val_loss": r["final"]["a"]["val_loss"],
                 "b_val_loss": r["final"]["b"]["val_loss"],
                 "a_train_s": r["final"]["a"]["train_s"], "b_train_s": r["final"]["b"]["train_s"],
                 "val_loss_ratio": r["ratios"]["val_loss"],
                 "train_time_ratio": r["ratios"]["train_time"],
                 "b_eval_kept_fractions": r["final"]["b"]["eval_kept_fractions"]}
                for r in reports]
    stats = {}
    for k in list(per_seed[0])[1:-1]:  # the figures, not the seed and the kept fractions
        values = [row[k] for row in per_seed]
        stats[k] = {"mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    tol = first["target"]["loss_tolerance"]
    return {"bench": "quality_seeds", "machine": first["machine"], "command": first["command"],
            "a": first["a"], "b": first["b"], "settings": first["settings"],
            "device": first["device"], "dtype": first["dtype"], "seeds": per_seed,
            "stats": stats, "loss_tolerance": tol,
            "within_tolerance": stats["val_loss_ratio"]["mean"] <= 1 + tol,
            "curves": {r["settings"]["seed"]: r["curves"] for r in reports}}


def seeds_line(r: dict[str, Any]) -> str:
    q, t = r["stats"]["val_loss_ratio"], r["stats"]["train_time_ratio"]
    return (f"over {len(r['seeds'])} seeds: B/A val loss {q['mean']:.4f} +- {q['std']:.4f} "
            f"(range {q['min']:.4f}-{q['max']:.4f}), B/A train time {t['mean']:.3f} +- "
            f"{t['std']:.3f}; B within {r['loss_tolerance']:.0%} of A on average: "
            f"{'yes' if r['within_tolerance'] else 'no'}")


SEED_COLUMNS = [
    Col("seed", "seed"),
    Col("A val loss", "a_val_loss", "{:.4f}"), Col("B val loss", "b_val_loss", "{:.4f}"),
    Col("B/A loss", "val_loss_ratio", "{:.4f}"),
    Col("A train s", "a_train_s", "{:.1f}"), Col("B train s", "b_train_s", "{:.1f}"),
    Col("B/A time", "train_time_ratio", "{:.3f}"),
    Col("B eval kept", "b_eval_kept_fractions", _kept, "l"),
]


def render_seeds_markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    stats = [[k, *(f"{v[x]:.4f}" for x in ("mean", "std", "min", "max"))]
             for k, v in r["stats"].items()]
    lines = [f"# subllm bench quality over {len(r['seeds'])} seeds — A = {r['a']['spec']}, "
             f"B = {r['b']['spec']}", "",
             common.machine_line(r),
             f"Each seed: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} = "
             f"{s['tokens']:,} tokens per model (details in seed-S/quality.md).", "",
             *common.columns(SEED_COLUMNS, r["seeds"]), "",
             *common.table("| mean | std | min | max", "lrrrr", stats), "",
             seeds_line(r) + "."]
    return "\n".join(lines) + "\n"


def plot_seeds(r: dict[str, Any], path: Path) -> None:
    """Validation loss against tokens, one line per model and seed."""
    fig, ax = common.pyplot().subplots(figsize=(7, 4.2))
    for seed, curves in r["curves"].items():
        for k, style in (("a", "o-"), ("b", "s--")):
            pts = curves[k]
            ax.plot([p["tokens"] for p in pts], [p["val_loss"] for p in pts], style, ms=3,
                    alpha=0.8, label=f"{RUN_NAMES[k]} seed {seed}")
    q = r["stats"]["val_loss_ratio"]
    ax.set_title(f"B/A val loss {q['mean']:.4f} +- {q['std']:.4f} over {len(r['seeds'])} "
                 "seeds", fontsize=10)
    common.save_axes(ax, path, "training tokens", "validation loss (nats / token)",
                     legend={"fontsize": 7})
