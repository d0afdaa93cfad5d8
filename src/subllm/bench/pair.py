"""`subllm bench train` and `subllm bench infer`: model A against model B, side by side.

Both models live in one process and take turns step by step (A B, then B A, ...); every
figure is the median over the timed steps and every ratio is B / A. Peak memory: one short
extra run per (model, case) in a fresh subprocess (`torch.cuda.max_memory_allocated` on a
GPU, the peak resident set on a CPU); train runs them after every case was timed, with its
own models freed, so that each has the device to itself.

train   one optimizer step (forward with labels, backward, AdamW) on random tokens, per
        (length, batch size); on a GPU (or with --peak-tflops) also the MFU. `--batch-sizes
        1,max`: also the largest batch at which both models' steps fit the memory, found by
        the planner (subllm.planner.largest_batch) and backed off to 3/4 on a GPU that runs
        out of memory all the same. Writes train.json, train.md, train_ratios.png.
infer   prefill, then greedy decoding with the KV cache: prefill time, decode time per
        token, KV-cache bytes, and B's kept fractions on the prompts and decoded tokens
        (with a warning when one is off its keep ratio). B has random weights, is trained
        briefly first (--calibrate-steps) or is a trained run (--checkpoint-b). Writes
        infer.json, infer.md and infer_ratios.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import fmean, median
from types import SimpleNamespace
from typing import Any

from subllm.atomic import write_atomic
from subllm.bench import common
from subllm.bench.common import Col, off_keep  # noqa: F401  (off_keep: tests import it here)
from subllm.errors import SubLLMError
from subllm.model.config import ModelConfig, Segment
from subllm.planner import fmt_bytes, largest_batch, parse_memory, training_flops_per_token
from subllm.train.config import TrainConfig

DEFAULT_PAIR = "llama-small,subllm-small"
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
OFF_KEEP_WARNING = "kept fractions off the keep ratio: ratios flattered/penalised"
OFF_KEEP_DECODE_WARNING = ("kept fractions of the decoded tokens off the keep ratio: decode "
                           "ratio flattered/penalised")
MAX = "max"  # the --batch-sizes entry the planner resolves, per length
BACK_OFF = 0.75  # a planned batch out of GPU memory retries at this fraction of itself

# ---- shared by train and infer ------------------------------------------------------


def _pair_arguments(p: argparse.ArgumentParser, name: str, case_timeout: float) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR,
                   help=f"A,B: presets or YAML/JSON model config files (default {DEFAULT_PAIR})")
    common.add_flags(p, "device", "dtype", "threads", "seed",
                     case_timeout={"default": case_timeout})
    p.add_argument("--skip-memory", action="store_true",
                   help="do not run the peak-memory subprocesses")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak TFLOP/s for the MFU (default {H100_BF16_TFLOPS:g}, H100 bf16 "
                        "dense); on a CPU the MFU is reported only when this is given")
    common.add_out_argument(p, name)


def _check_common(args: argparse.Namespace) -> None:
    common.require_positive(args, "steps", "batch_size", "repeats", "threads", "peak_tflops",
                            "case_timeout")
    common.require_positive(args, "warmup", minimum=0)
    common.check_cuda(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def measure_memory(case: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one memory case (run_memory_case) in a fresh interpreter; never raises."""
    return common.run_worker("subllm.bench.pair", case, args.case_timeout,
                             common.worker_env(args.threads))


def _report(bench: str, args: argparse.Namespace, a: dict, b: dict, **fields: Any
            ) -> dict[str, Any]:
    import torch

    return {**common.report_head(bench, args.device, torch.get_num_threads()),
            "dtype": args.dtype, "a": a, "b": b, **fields}


def _header(report: dict[str, Any]) -> list[str]:
    memory = ("torch.cuda.max_memory_allocated" if report["device"] == "cuda"
              else "peak resident set of a fresh subprocess per case (includes Python + torch, "
                   "about the same for both)")
    title = (f"subllm bench {report['bench']} — A = {report['a']['spec']}, "
             f"B = {report['b']['spec']}")
    return [*common.markdown_head(title, report),
            "A and B alternate step by step in one process; times are medians of the timed "
            f"steps; ratios are B / A. Peak memory: {memory}.", ""]


def _plot_ratios(report: dict[str, Any], path: Path, x_key: str, x_label: str,
                 series: dict[str, str],
                 groups: dict[str, Callable[[dict[str, Any]], bool]] | None = None) -> None:
    """B/A ratio against length; one line per series and group (label: its cases, e.g. one
    batch size's). With several groups, a group has one colour and a series one style."""
    fig, ax = common.pyplot().subplots(figsize=(6.5, 4.2))
    groups = groups or {"": lambda c: True}
    styles = ("-", "--", ":", "-.")
    for i, (key, label) in enumerate(series.items()):
        for j, (group, member) in enumerate(groups.items()):
            pts = sorted((c[x_key], c["ratios"][key]) for c in report["cases"]
                         if c["ratios"].get(key) is not None and member(c))
            look = {"color": f"C{j}", "ls": styles[i % len(styles)]} if len(groups) > 1 else {}
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", **look,
                        label=label + (f", {group}" if group else ""))
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    common.save_axes(ax, path, x_label, f"{report['b']['spec']} / {report['a']['spec']}",
                     f"{report['bench']}: B/A — {report['device']}, {report['dtype']}",
                     legend={"fontsize": 8})


# ---- train --------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    common.add_flags(p, "seq_lens", "steps", "warmup",
                     batch_size={"default": None, "help": "the same as --batch-sizes N"})
    p.add_argument("--batch-sizes", default=None,
                   help=f"comma-separated batch sizes, each a positive integer or {MAX}: the "
                        "largest batch at which both models' steps fit the memory at that "
                        "length, by the planner's estimate (default 1)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help=f"what --batch-sizes {MAX} fills, e.g. 24GB (default: 90%% of the "
                        "GPU's total memory, or of the CPU's available memory)")
    p.add_argument("--mst", action="store_true", help="apply subllm.model.mst.apply_mst to both")
    p.add_argument("--checkpointing", action="store_true",
                   help="block-level activation checkpointing for both")
    p.add_argument("--compile", choices=("both", "b"), default=None,
                   help="torch.compile the blocks of both models, or of B only (--pair X,X: "
                        "compiled vs eager)")
    p.add_argument("--schedule-step", type=int, default=0,
                   help="set_step value of the first step (balancer / bypass schedules; default 0)")
    _pair_arguments(p, "train", case_timeout=3600.0)


def parse_batch_sizes(text: str) -> list[int | str]:
    """'4,max,1' -> [1, 4, 'max']: positive integers (sorted, unique), then max when given;
    raise on anything else."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items or any(x != MAX and not (x.isascii() and x.isdigit() and int(x) >= 1)
                        for x in items):
        raise SubLLMError(f"--batch-sizes {text!r}: write comma-separated positive integers "
                          f"or {MAX}, e.g. 1,{MAX}")
    sizes: list[int | str] = sorted({int(x) for x in items if x != MAX})
    return sizes + [MAX] if MAX in items else sizes


def train_batch_sizes(args: argparse.Namespace) -> list[int | str]:
    """The batch sizes of `bench train`, from --batch-sizes or --batch-size (not both)."""
    if args.batch_size is not None and args.batch_sizes is not None:
        raise SubLLMError("--batch-size N means --batch-sizes N: give one of the two")
    if args.batch_size is not None:
        common.require_positive(args, "batch_size")
        return [args.batch_size]
    return parse_batch_sizes("1" if args.batch_sizes is None else args.batch_sizes)


def memory_budget(device: str, asked: str | None) -> tuple[int | None, str]:
    """(bytes `--batch-sizes max` may fill, where that figure comes from): --memory-budget,
    else 90 % of the GPU's total memory, or of the CPU's available memory (None: unknown).
    The total, not what is free: the planner counts both models' weights itself."""
    if asked is not None:
        return parse_memory(asked, "--memory-budget"), "--memory-budget"
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1] * 9 // 10, "90 % of the GPU's total memory"
    return common.mem_available(), "90 % of the CPU's available memory"


def plan_max_batch(configs: dict[str, ModelConfig], seq_len: int, args: argparse.Namespace,
                   budget: int | None) -> dict[str, Any]:
    """The planner's largest batch at `seq_len` for both models in one process (1, with a
    note, when it cannot say or when not even batch 1 is predicted to fit)."""
    if budget is None:
        print(f"note: L={seq_len}: the available memory is unknown; {MAX} = 1 (give "
              "--memory-budget)", flush=True)
        return {"batch_size": 1, "budget_bytes": None, "fits": False}
    # --dtype bf16 is autocast over fp32 weights: the planner's "mixed" precision
    fit = largest_batch([configs["a"], configs["b"]], seq_len, budget, dtype=args.dtype,
                        precision="mixed", checkpointing=args.checkpointing, mst=args.mst,
                        device=args.device)
    plan = {"batch_size": max(fit["batch_size"], 1), "budget_bytes": budget,
            "need_bytes": fit["need_bytes"], "fits": fit["batch_size"] > 0,
            "capped": fit["capped"]}
    if not plan["fits"]:
        print(f"note: L={seq_len}: not even batch 1 is predicted to fit in "
              f"{fmt_bytes(budget)} (the step needs {fmt_bytes(fit['need_bytes'])}); "
              f"{MAX} = 1", flush=True)
    return plan


def backing_off(run: Callable[[int], Any], batch: int, free: Callable[[], None]
                ) -> tuple[int, Any]:
    """(b, run(b)) for the first b, from `batch` down to BACK_OFF of the last each time
    (free() before each retry), at which run does not run out of GPU memory; an
    out-of-memory error at batch 1 is raised."""
    import torch

    while True:
        try:
            return batch, run(batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # outside the except block: the error's frames, and the tensors they hold, are gone
        smaller = max(1, int(batch * BACK_OFF))
        print(f"    out of GPU memory at batch {batch}: retrying at {smaller}", flush=True)
        free()
        batch = smaller


def _free_after_oom(pair: SimpleNamespace) -> None:
    """Give back what a step that ran out of GPU memory left behind: gradients, optimizer
    state (an AdamW step cut short can leave it half made; it is made again at the next
    step) and the allocator's cached blocks."""
    import torch

    for key, model in pair.models.items():
        model.zero_grad(set_to_none=True)
        pair.optimizers[key].state.clear()
    gc.collect()
    torch.cuda.empty_cache()


def build_train_model(config: ModelConfig, device: str, mst: bool, checkpointing: bool,
                      compile: bool = False) -> Any:
    from subllm.model import SubLLM
    from subllm.model.mst import compile_blocks

    with common.on_device(device):
        model = common.apply_mode(SubLLM(config), mst=mst, checkpointing=checkpointing)
    model = model.to(device).train()
    return compile_blocks(model) if compile else model


def _time_steps(pair: SimpleNamespace, seq_len: int, batch: int, args: argparse.Namespace
                ) -> dict[str, list[float]]:
    """Each model's step times at (batch, seq_len), the two alternating step by step."""
    import torch

    g = torch.Generator().manual_seed(args.seed + seq_len)
    ids = torch.randint(0, pair.vocab, (batch, seq_len), generator=g).to(args.device)

    def step(key: str, i: int) -> float:
        return common.timed_train_step(pair.models[key], pair.optimizers[key], ids,
                                       args.schedule_step + i, args.device, pair.amp)[0]

    return common.alternate(list(pair.models), args.steps, step, warmup=args.warmup)


def _train_case(pair: SimpleNamespace, seq_len: int, batch: int, asked: int | str,
                plan: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """One (length, batch) case: step times, tokens/s, MFU and their ratios (the peak
    memory comes later: _train_memory). A planned batch out of GPU memory backs off
    (backing_off); any other is an error."""
    import torch

    def run(b: int) -> dict[str, list[float]]:
        return _time_steps(pair, seq_len, b, args)

    try:
        if plan is not None and args.device == "cuda":
            used, times = backing_off(run, batch, lambda: _free_after_oom(pair))
        else:
            used, times = batch, run(batch)
    except torch.cuda.OutOfMemoryError:
        raise SubLLMError(f"out of GPU memory at L={seq_len}, batch {batch}: use smaller "
                          "--batch-sizes or --seq-lens, or add --mst / --checkpointing"
                          ) from None
    case: dict[str, Any] = {"seq_len": seq_len, "batch_size": used, "asked": [asked],
                            "batch_source": "asked" if plan is None else "planner"}
    if plan is not None:
        case["planner"] = plan
    if used != batch:
        case["backed_off_from"] = batch
    tokens = used * seq_len
    for key in ("a", "b"):
        med = median(times[key])
        case[key] = {"step_times_s": times[key], "time_per_step_s": med,
                     "tokens_per_s": tokens / med}
        if pair.peak_tflops is not None:
            flops = training_flops_per_token(pair.configs[key], seq_len)["total"]
            case[key]["mfu"] = flops * tokens / med / (pair.peak_tflops * 1e12)
    a, b = case["a"], case["b"]
    case["ratios"] = {
        "time_per_step": common.ratio(b["time_per_step_s"], a["time_per_step_s"]),
        "time_per_step_paired": common.paired_ratio(times["b"], times["a"]),
        "tokens_per_s": common.ratio(b["tokens_per_s"], a["tokens_per_s"]),
        "peak_mem": None}
    return case


def _train_memory(case: dict[str, Any], pair: SimpleNamespace, args: argparse.Namespace
                  ) -> None:
    """Each model's peak memory in the case's step, in a fresh subprocess, and their ratio."""
    for key in ("a", "b"):
        case[key]["memory"] = measure_memory(
            {"kind": "train", "config": pair.configs[key].to_dict(), "seq_len": case["seq_len"],
             "batch_size": case["batch_size"],
             **{k: getattr(args, k) for k in ("device", "dtype", "mst", "checkpointing",
                                              "seed")},
             "compile": pair.compiled[key], "first_step": args.schedule_step}, args)
    case["ratios"]["peak_mem"] = common.ratio(case["b"]["memory"].get("peak_mem_bytes"),
                                              case["a"]["memory"].get("peak_mem_bytes"))


def _release_models(pair: SimpleNamespace) -> None:
    """Drop both models and their optimizers (and, on a GPU, the allocator's cache), so that
    a memory subprocess has the device to itself: on one H100, the 1.3B pair's weights and
    AdamW state beside a step at the largest batch would not fit."""
    pair.models.clear()
    pair.optimizers.clear()
    gc.collect()
    if common.sync(pair.device) is not None:
        import torch

        torch.cuda.empty_cache()


def _print_train_case(c: dict[str, Any]) -> None:
    a, b, r = c["a"], c["b"], c["ratios"]
    print(f"  L={c['seq_len']:<6} B={batch_label(c):<8} A {a['time_per_step_s']:.3f} s/step  "
          f"B {b['time_per_step_s']:.3f} s/step  B/A {r['time_per_step']:.3f} "
          f"(paired {r['time_per_step_paired']:.3f})", flush=True)


def _print_train_memory(c: dict[str, Any]) -> None:
    mem = {k: c[k]["memory"] for k in "ab"}
    if all(m["ok"] for m in mem.values()):
        text = (f"A {common.fmt_gib(mem['a']['peak_mem_bytes'])} GiB  B "
                f"{common.fmt_gib(mem['b']['peak_mem_bytes'])} GiB  B/A "
                f"{common.fmt(c['ratios']['peak_mem'])}")
    else:
        text = "; ".join(f"{k.upper()} {m['error']}" for k, m in mem.items() if not m["ok"])
    print(f"  L={c['seq_len']:<6} B={batch_label(c):<8} peak memory {text}", flush=True)


def run_train(args: argparse.Namespace) -> int:
    import torch

    lengths = common.parse_ints(args.seq_lens, "--seq-lens", minimum=2)
    batch_sizes = train_batch_sizes(args)
    specs = dict(zip("ab", common.parse_pair(args.pair), strict=True))
    _check_common(args)
    if args.memory_budget is not None and MAX not in batch_sizes:
        raise SubLLMError(f"--memory-budget is what --batch-sizes {MAX} fills: add {MAX} to "
                          "--batch-sizes, or drop --memory-budget")
    budget, budget_source = (memory_budget(args.device, args.memory_budget)
                             if MAX in batch_sizes else (None, None))
    if args.compile:
        if args.warmup < 1:
            raise SubLLMError("--compile needs --warmup >= 1 (the first step compiles)")
        from subllm.model.mst import check_compile_available

        check_compile_available(args.device)
    compiled = {"a": args.compile == "both", "b": args.compile is not None}
    configs = {k: common.load_config(spec, max(lengths)) for k, spec in specs.items()}
    if configs["a"].vocab_size != configs["b"].vocab_size:
        print(f"note: A and B have different vocabularies ({configs['a'].vocab_size} vs "
              f"{configs['b'].vocab_size}); tokens are drawn below the smaller", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = args.peak_tflops or H100_BF16_TFLOPS
    report_mfu = args.device == "cuda" or args.peak_tflops is not None

    models, optimizers = {}, {}
    for key, config in configs.items():
        torch.manual_seed(args.seed)
        models[key] = build_train_model(config, args.device, args.mst, args.checkpointing,
                                        compiled[key])
        optimizers[key] = common.adamw(models[key], args.device)
    pair = SimpleNamespace(models=models, optimizers=optimizers, configs=configs,
                           compiled=compiled, device=args.device,
                           amp=common.amp_dtype(args.dtype),
                           vocab=min(c.vocab_size for c in configs.values()),
                           peak_tflops=peak if report_mfu else None)
    a, b = [common.model_summary(specs[k], configs[k], models[k].num_params()) for k in "ab"]
    report = _report("train", args, a, b, batch_sizes=batch_sizes, steps=args.steps,
                     warmup=args.warmup, mst=args.mst, checkpointing=args.checkpointing,
                     compile=args.compile, schedule_step=args.schedule_step, seq_lens=lengths,
                     peak_tflops=pair.peak_tflops, memory_budget_bytes=budget,
                     memory_budget_source=budget_source, partial=True, cases=[])
    _measure_train_cases(pair, report, args, budget, out)
    if not args.skip_memory:
        _release_models(pair)
        for case in report["cases"]:
            _train_memory(case, pair, args)
            _print_train_memory(case)
            _write_partial(out, report)
    report["partial"] = False
    common.write_outputs(out, "train", report, render_train_markdown(report),
                         lambda r, p: _plot_ratios(
                             r, p, "seq_len", "sequence length (tokens)",
                             {"time_per_step": "time per step", "peak_mem": "peak memory"},
                             train_batch_groups(r)),
                         "train_ratios.png")
    return 0


def _measure_train_cases(pair: SimpleNamespace, report: dict[str, Any],
                         args: argparse.Namespace, budget: int | None, out: Path) -> None:
    """Every (length, batch size) case into report["cases"], sorted, the outputs so far
    written after each (_write_partial). Every length at the smaller batches first, so that
    a run stopped early (bench gpu's budget) has their ratios; max is measured once when it
    comes to a batch size already asked for."""
    cases = report["cases"]
    for asked in report["batch_sizes"]:
        for n in report["seq_lens"]:
            plan = plan_max_batch(pair.configs, n, args, budget) if asked == MAX else None
            batch = plan["batch_size"] if plan else int(asked)
            same = next((c for c in cases if (c["seq_len"], c["batch_size"]) == (n, batch)),
                        None)
            if same is not None:
                same["asked"].append(asked)
                same.update(batch_source="planner", planner=plan)
                print(f"  L={n:<6} {MAX} = batch {batch}, measured above", flush=True)
                continue
            case = _train_case(pair, n, batch, asked, plan, args)
            _print_train_case(case)
            cases.append(case)
            cases.sort(key=lambda c: (c["seq_len"], c["batch_size"]))
            _write_partial(out, report)


def _write_partial(out: Path, report: dict[str, Any]) -> None:
    """train.json and train.md of the cases so far (no plot): a run stopped midway leaves
    what it measured."""
    write_atomic(out / "train.json", json.dumps(report, indent=2))
    write_atomic(out / "train.md", render_train_markdown(report))


def _asked(case: dict[str, Any]) -> list[int | str]:
    """The --batch-sizes entries a case answers (a report from before --batch-sizes: its
    batch size)."""
    return case.get("asked") or [case["batch_size"]]


def batch_label(case: dict[str, Any]) -> str:
    """A case's batch size, and how it was chosen: '4', '3 (max)', '1 (1 and max)',
    '3 (max, backed off from 4)'."""
    asked = _asked(case)
    notes = [MAX if asked == [MAX] else " and ".join(map(str, asked))] if MAX in asked else []
    if case.get("backed_off_from"):
        notes.append(f"backed off from {case['backed_off_from']}")
    return str(case["batch_size"]) + (f" ({', '.join(notes)})" if notes else "")


def train_batch_groups(report: dict[str, Any]) -> dict[str, Callable[[dict[str, Any]], bool]]:
    """One plot line per --batch-sizes entry: 'B=1', ..., and 'max = 3/1' (the batch max
    came to at each length, shortest first)."""
    groups = {}
    for asked in report.get("batch_sizes") or [report.get("batch_size", 1)]:
        def member(c: dict[str, Any], asked: int | str = asked) -> bool:
            return asked in _asked(c)

        if asked == MAX:
            found = [c["batch_size"] for c in sorted(report["cases"], key=lambda c: c["seq_len"])
                     if member(c)]
            label = f"{MAX} = " + "/".join(map(str, found))
        else:
            label = f"B={asked}"
        groups[label] = member
    return groups


TRAIN_COLUMNS = [
    Col("seq len", "seq_len"), Col("batch", batch_label),
    Col("A s/step", "a.time_per_step_s", "{:.3f}"), Col("B s/step", "b.time_per_step_s", "{:.3f}"),
    Col("time B/A", "ratios.time_per_step", "**{:.3f}**"),
    Col("paired B/A", "ratios.time_per_step_paired", "{:.3f}"),
    Col("A tok/s", "a.tokens_per_s", "{:.0f}"), Col("B tok/s", "b.tokens_per_s", "{:.0f}"),
    Col("A peak GiB", "a.memory.peak_mem_bytes", common.fmt_gib),
    Col("B peak GiB", "b.memory.peak_mem_bytes", common.fmt_gib),
    Col("mem B/A", "ratios.peak_mem", "{:.3f}"),
]
MFU_COLUMNS = [Col("A MFU", "a.mfu", "{:.1%}"), Col("B MFU", "b.mfu", "{:.1%}")]


def _batch_sentence(report: dict[str, Any]) -> str:
    """How the batch sizes were chosen, for the table's preamble."""
    sizes = report.get("batch_sizes") or [report.get("batch_size", 1)]
    text = "Batch " + ", ".join(map(str, sizes))
    if MAX not in sizes:
        return text + "."
    budget = report.get("memory_budget_bytes")
    where = (f"{fmt_bytes(budget)} ({report.get('memory_budget_source')})"
             if budget else "an unknown memory (max = 1)")
    return (text + f": `{MAX}` is, per length, the largest batch at which both models' "
            f"steps fit in {where} by the planner's estimate (each model's peak plus the "
            "other's weights and AdamW state, as both share the process); a planned batch "
            f"that runs out of GPU memory all the same retries at {BACK_OFF:g} of itself.")


def render_train_markdown(report: dict[str, Any]) -> str:
    mfu = MFU_COLUMNS if report.get("peak_tflops") is not None else []
    partial = (["**Partial: the run stopped before it finished (cases, or their peak memory, "
                "missing).**", ""] if report.get("partial") else [])
    lines = _header(report) + partial + [
        _batch_sentence(report) + f" {report['steps']} timed steps after {report['warmup']} "
        f"warm-up; forward + backward + AdamW; mst={report['mst']}, "
        f"checkpointing={report['checkpointing']}, compile={report.get('compile')}; "
        "random tokens. `time B/A` is the ratio of the medians, `paired B/A` the median over "
        "the rounds of B / A within a round.",
        "",
        *common.columns(TRAIN_COLUMNS + mfu, report["cases"]),
    ]
    return "\n".join(lines) + "\n"


# ---- infer --------------------------------------------------------------------------


def add_b_arguments(p: argparse.ArgumentParser) -> None:
    """How B gets its weights: a trained run, or a brief calibration (infer, serve)."""
    p.add_argument("--checkpoint-b", default=None, metavar="RUN_DIR",
                   help="B = this trained run (its newest checkpoint); A gets B's shape")
    p.add_argument("--calibrate-steps", type=int, default=300,
                   help="without --checkpoint-b: train a SUBLLM B this many AdamW steps first "
                        "(0: random weights; default 300)")
    p.add_argument("--calibrate-seq-len", type=int, default=64)
    p.add_argument("--calibrate-batch-size", type=int, default=4)
    p.add_argument("--calibrate-lr", type=float, default=2e-3)


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lens", default="512,2048",
                   help="comma-separated prompt lengths (default 512,2048)")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="greedy tokens decoded after each prompt (default 64)")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--decode-input", choices=("greedy", "text"), default="greedy",
                   help="tokens fed back while decoding: the greedy choice, or the prompt "
                        "text's continuation")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed prefills per model and case (default 3)")
    add_b_arguments(p)
    p.add_argument("--calibrate-balancer-strength", type=float, default=None,
                   help="balancer_strength during calibration only (default: the model's)")
    p.add_argument("--calibrate-shift", action="store_true",
                   help="shift B's scores so that its kept fractions on each case's prompts "
                        "are its keep ratios (calibrated / zero thresholds; the rank rule "
                        "needs no shift and skips it)")
    p.add_argument("--data", default=None, metavar="DATA_DIR",
                   help="a prepared data dir (`subllm prepare`): calibration text and prompts; "
                        "without it, the bytes of the Python standard library")
    _pair_arguments(p, "infer", case_timeout=1800.0)


def stdlib_byte_stream(vocab_size: int, max_bytes: int = 4_000_000) -> Any:
    """A learnable token stream without a tokenizer: bytes of the stdlib's source files,
    each byte one token id (modulo the vocabulary)."""
    import numpy as np
    import torch

    from subllm.train.data import default_corpus_files

    chunks, total = [], 0
    for path in default_corpus_files():
        with contextlib.suppress(OSError):
            chunks.append(path.read_bytes())
            total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total < 4096:
        raise SubLLMError("no Python standard-library sources found for the synthetic token "
                          "stream; pass --data DATA_DIR")
    arr = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64) % vocab_size
    return torch.from_numpy(arr)


def token_streams(args: argparse.Namespace, vocab_size: int) -> tuple[Any, Any, str]:
    """(training stream, held-out stream, source) of 1-D LongTensors of token ids."""
    import numpy as np
    import torch

    if args.data is not None:
        from subllm.train.data import load_data

        data = load_data(args.data)
        if data.vocab_size > vocab_size:
            raise SubLLMError(
                f"{args.data} has {data.vocab_size} token ids but model B's vocabulary is "
                f"{vocab_size}; use a model with vocab_size >= {data.vocab_size}"
            )
        train, val = (torch.from_numpy(np.asarray(data.tokens(split), dtype=np.int64))
                      for split in ("train", "val"))
        return train, val, f"data dir {args.data}"
    stream = stdlib_byte_stream(vocab_size)
    cut = int(len(stream) * 0.9)
    return stream[:cut], stream[cut:], "bytes of the Python standard library (synthetic)"


def _windows(stream: Any, batch: int, length: int, g: Any) -> Any:
    import torch

    hi = len(stream) - length
    if hi <= 0:  # a short held-out split: wrap around
        stream = stream.repeat(length // max(len(stream), 1) + 2)
        hi = len(stream) - length
    starts = torch.randint(0, hi, (batch,), generator=g).tolist()
    return torch.stack([stream[s:s + length] for s in starts])


def calibrate(model: Any, stream: Any, held_out: Any, steps: int, seq_len: int, batch: int,
              lr: float, device: str, seed: int, strength: float | None = None
              ) -> dict[str, Any]:
    """Train `model` briefly (AdamW, warm-up + cosine, set_step each step; balancer strength
    `strength` meanwhile, when given); the record, with eval kept fractions at ten points."""
    import torch

    from subllm.train.loop import lr_at, train_step

    tc = TrainConfig(lr=lr, min_lr=lr / 10, warmup=max(1, steps // 10), max_steps=steps,
                     weight_decay=0.1)
    optimizer = common.adamw(model, device, tc)
    g = torch.Generator().manual_seed(seed)
    probe = _windows(held_out, 4, min(512, model.config.max_seq_len), g).to(device)
    history = []
    t0 = time.perf_counter()
    own_strength = model.config.balancer_strength
    if strength is not None:  # ScoreBalancer reads it from the config
        model.config.balancer_strength = strength
    try:
        for step in range(steps):
            model.train()
            model.set_step(step)
            x = _windows(stream, batch, seq_len, g)
            result = train_step(model, optimizer, [x], device=torch.device(device),
                                grad_clip=1.0, lr=lr_at(step, tc))
            if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                model.eval()
                with torch.no_grad():
                    fr = model(probe).kept_fractions
                loss = float(result.loss)
                history.append({"step": step + 1, "loss": loss, "eval_kept_fractions": fr})
                print(f"  calibrate step {step + 1}/{steps}: loss {loss:.3f}, eval kept "
                      f"{common.slashed(fr)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        model.config.balancer_strength = own_strength
    model.eval()
    return {"steps": steps, "seq_len": seq_len, "batch_size": batch, "lr": lr,
            "balancer_strength": own_strength if strength is None else strength,
            "seconds": time.perf_counter() - t0, "history": history,
            "final_eval_kept_fractions": history[-1]["eval_kept_fractions"] if history else None}


def shift_scores_to_keep(model: Any, probe: Any, iters: int = 40) -> list[dict[str, float]]:
    """Under a threshold rule (calibrated or zero), move each subsampler's eval kept fraction
    on `probe` onto its keep ratio, outer segment first: add a * u to the scorer's weight,
    u = mean input / |mean input|^2 (every score moves by about a), a bisected."""
    import torch

    shifts = []
    model.eval()
    for j, sub in enumerate(model.subsamplers):
        seen: list[tuple[Any, Any]] = []
        handle = sub.register_forward_pre_hook(
            lambda module, args, seen=seen: seen.append((args[0].detach(), args[1])))
        with torch.no_grad():
            model(probe)
        handle.remove()
        if not seen:  # the segment got no tokens
            continue
        x, valid = seen[0]
        x = (x[valid] if valid is not None else x.flatten(0, 1)).float()  # real tokens only
        w = sub.score.weight.detach()[0].float()  # (d,)
        u = x.mean(0)
        u = u / u.pow(2).sum().clamp_min(1e-12)
        s, t = x @ w, x @ u  # score = s + a * t (minus a calibrated cut-off)
        if sub.calibrated:
            s = s - float(sub.cutoff)

        def frac(a: float, s: Any = s, t: Any = t) -> float:
            return float((s + a * t > 0).float().mean())

        lo, hi = -(float(s.abs().max()) * 4 + 1.0), float(s.abs().max()) * 4 + 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if frac(mid) < sub.keep else (lo, mid)
        a = (lo + hi) / 2
        with torch.no_grad():
            sub.score.weight[0] += (a * u).to(sub.score.weight.dtype)
        shifts.append({"segment": j, "shift": a, "before": frac(0.0), "after": frac(a)})
    return shifts


def time_infer_pair(models: dict[str, Any], prompts: Any, new_tokens: int, repeats: int,
                    device: str, dtype: str, forced: Any = None) -> dict[str, Any]:
    """Per model: prefill times (`repeats`, alternating), then decode times with the models
    taking turns token by token (feeding back the greedy token, or `forced`), KV bytes and
    kept counts."""
    import torch

    names = list(models)
    res: dict[str, Any] = {n: {"decode_step_kept": []} for n in names}
    entered: dict[str, list[list[float]]] = {n: [] for n in names}
    caches: dict[str, Any] = {}
    nxt: dict[str, Any] = {}

    def prefill(n: str, _: int) -> float:
        seconds, out = common.timed(device, lambda: models[n](prompts, use_cache=True))
        caches[n], nxt[n] = out.cache, out.logits[:, -1].argmax(-1)
        res[n]["prompt_kept_fractions"] = out.kept_fractions
        res[n]["prompt_kv_bytes"] = int(out.cache.nbytes(models[n].block_levels))
        return seconds

    def decode(n: str, i: int) -> float:
        def step() -> Any:
            fed = nxt[n] if forced is None else forced[:, i]
            out = models[n](fed[:, None], cache=caches[n])
            nxt[n] = out.logits[:, -1].argmax(-1)
            return out

        seconds, out = common.timed(device, step)
        res[n]["decode_step_kept"].append([float(k.sum()) for k in out.kept])
        entered[n].append([float(e.sum()) for e in out.entered])
        return seconds

    with torch.no_grad(), common.autocast(device, dtype):
        for n in names:  # warm-up: one prefill and two decode steps, untimed
            out = models[n](prompts, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            for _ in range(2):
                tok = models[n](tok[:, None], cache=out.cache).logits[:, -1].argmax(-1)
        prefill_s = common.alternate(names, repeats, prefill)
        # the first new token comes from the prefill
        decode_s = common.alternate(names, new_tokens - 1, decode)
    for n in names:
        kept = [sum(col) for col in zip(*res[n]["decode_step_kept"], strict=True)]
        ent = [sum(col) for col in zip(*entered[n], strict=True)]
        res[n].update(prefill_s=prefill_s[n], decode_s=decode_s[n],
                      kv_bytes=int(caches[n].nbytes(models[n].block_levels)),
                      decode_kept_fractions=[k / max(e, 1.0)
                                             for k, e in zip(kept, ent, strict=True)])
    return res


def _load_b(args: argparse.Namespace, max_len: int) -> tuple[Any, Any, str]:
    """(config, model or None, description) of B from --checkpoint-b or the pair."""
    if args.checkpoint_b is None:
        return None, None, ""
    from subllm.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(args.checkpoint_b)
    model = ckpt.load_model(path, args.device)
    model.config.max_seq_len = max(model.config.max_seq_len, max_len)  # RoPE is computed
    return model.config, model, str(path)


def _a_shaped_like(config_a: Any, config_b: Any) -> Any:
    """A's config with B's shape: A's speed does not depend on its weights."""
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
             "tie_embeddings", "max_seq_len", "rope_theta", "norm_eps")
    d = {**config_a.to_dict(), **{k: getattr(config_b, k) for k in shape}}
    if not config_a.is_subllm:
        d["structure"] = "T" * config_b.n_layers
    elif config_a.n_layers != config_b.n_layers:
        raise SubLLMError(
            f"--checkpoint-b has {config_b.n_layers} blocks but A ({config_a.structure}) has "
            f"{config_a.n_layers}; use a LLaMA preset for A"
        )
    return ModelConfig.from_dict(d)


def run_infer(args: argparse.Namespace) -> int:
    import torch

    from subllm.model import SubLLM

    prompt_lens = common.parse_ints(args.prompt_lens, "--prompt-lens", minimum=1)
    batch_sizes = common.parse_ints(args.batch_sizes, "--batch-sizes", minimum=1)
    spec_a, spec_b = common.parse_pair(args.pair)
    if args.new_tokens < 2:
        raise SubLLMError(f"--new-tokens must be >= 2 (one from the prefill, then decoding), "
                          f"got {args.new_tokens}")
    common.require_positive(args, "calibrate_steps", minimum=0)
    common.require_positive(args, "calibrate_seq_len", "calibrate_batch_size", "calibrate_lr")
    _check_common(args)
    max_len = max(prompt_lens) + args.new_tokens

    config_b, model_b, b_source = _load_b(args, max_len)
    config_a = common.load_config(spec_a, max_len)
    if config_b is None:
        config_b = common.load_config(spec_b, max_len)
    else:
        config_a = _a_shaped_like(config_a, config_b)
        spec_b = f"{spec_b} (weights: {b_source})"
    calibrating = model_b is None and args.calibrate_steps > 0 and config_b.is_subllm
    if calibrating and args.calibrate_seq_len > config_b.max_seq_len:
        raise SubLLMError(f"--calibrate-seq-len exceeds B's context {config_b.max_seq_len}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device

    torch.manual_seed(args.seed)
    with common.on_device(device):
        model_a = SubLLM(config_a).to(device).eval()
    if model_b is None:
        torch.manual_seed(args.seed + 1)
        with common.on_device(device):
            model_b = SubLLM(config_b).to(device)
    vocab = min(config_a.vocab_size, config_b.vocab_size)

    # text for the calibration and the prompts
    held_out, prompt_source, calibration = None, "random tokens", None
    if args.data is not None or calibrating:
        train_stream, held_out, prompt_source = token_streams(args, vocab)
    if calibrating:
        print(f"calibrating B ({spec_b}) for {args.calibrate_steps} steps on {prompt_source}",
              flush=True)
        calibration = calibrate(model_b, train_stream, held_out, args.calibrate_steps,
                                args.calibrate_seq_len, args.calibrate_batch_size,
                                args.calibrate_lr, device, args.seed,
                                args.calibrate_balancer_strength)
        calibration["source"] = prompt_source
    model_b.eval()
    b_state = "trained checkpoint" if args.checkpoint_b else (
        "calibrated" if calibration else "random init")

    keeps = common.keep_ratios(config_b)
    shift = args.calibrate_shift and config_b.is_subllm
    if shift and config_b.threshold == "rank":  # a rank does not move when every score does
        print("note: --calibrate-shift skipped: B keeps tokens by the rank rule, which keeps "
              "its keep ratios without it", flush=True)
        shift = False
    if shift:
        b_state += " + scores shifted onto the keep ratios on each case's prompts"
        scorers = [sub.score.weight.detach().clone() for sub in model_b.subsamplers]
    g = torch.Generator().manual_seed(args.seed)
    cases = []
    with tempfile.TemporaryDirectory(prefix="subllm-bench-infer-") as tmp:
        files = {"b": Path(tmp) / "b.pt", "prompts": Path(tmp) / "prompts.pt"}
        for plen in prompt_lens:
            for bs in batch_sizes:
                shape = (bs, plen + args.new_tokens)
                text = (_windows(held_out, *shape, g) if held_out is not None
                        else torch.randint(0, vocab, shape, generator=g)).to(device)
                prompts = text[:, :plen]
                forced = text[:, plen:-1] if args.decode_input == "text" else None
                shifts = None
                if shift:  # from the calibrated weights, on this case's prompts
                    with torch.no_grad(), common.autocast(device, args.dtype):
                        for sub, w in zip(model_b.subsamplers, scorers, strict=True):
                            sub.score.weight.copy_(w)
                        shifts = shift_scores_to_keep(model_b, prompts)
                if not args.skip_memory and b_state != "random init":
                    torch.save(model_b.state_dict(), files["b"])
                res = time_infer_pair({"a": model_a, "b": model_b}, prompts, args.new_tokens,
                                      args.repeats, device, args.dtype, forced)
                case = _infer_case(plen, bs, res, keeps, segment_parents(config_b))
                case["score_shifts"] = shifts
                if not args.skip_memory:
                    torch.save({"prompts": prompts.cpu(),
                                "forced": None if forced is None else forced.cpu()},
                               files["prompts"])
                    _infer_memory(case, args, {"a": config_a, "b": config_b}, files)
                _print_infer_case(case)
                cases.append(case)

    a, b = (common.model_summary(spec, config, model.num_params()) for spec, config, model
            in ((spec_a, config_a, model_a), (spec_b, config_b, model_b)))
    b["state"] = b_state
    warnings = sorted({w for c in cases for w in c["warnings"]})
    report = _report("infer", args, a, b, new_tokens=args.new_tokens, repeats=args.repeats,
                     decode_input=args.decode_input, prompt_lens=prompt_lens,
                     batch_sizes=batch_sizes, prompt_source=prompt_source, keep_ratios=keeps,
                     kept_tolerance=common.KEPT_TOLERANCE, calibration=calibration,
                     warnings=warnings, cases=cases)
    for w in warnings:
        print(f"WARNING: {w}", flush=True)
    common.write_outputs(out, "infer", report, render_infer_markdown(report),
                         lambda r, p: _plot_ratios(
                             r, p, "prompt_len", "prompt length (tokens)",
                             {"decode_per_token": "decode time / token (medians)",
                              "decode_at_keep": "decode time / token at the keep ratios",
                              "prefill": "prefill time", "kv_bytes": "KV-cache bytes"},
                             groups=_infer_batch_groups(r["cases"])),
                         "infer_ratios.png")
    return 0


def _infer_batch_groups(cases: list[dict[str, Any]]
                        ) -> dict[str, Callable[[dict[str, Any]], bool]] | None:
    """One plot line per batch size, when there are several."""
    sizes = sorted({c["batch_size"] for c in cases})
    if len(sizes) < 2:
        return None
    return {f"batch {b}": lambda c, b=b: c["batch_size"] == b for b in sizes}


def _infer_memory(case: dict[str, Any], args: argparse.Namespace, configs: dict[str, Any],
                  files: dict[str, Path]) -> None:
    """Each model's peak memory on the case's prompts (files["prompts"]), in a fresh
    interpreter; B with the weights in files["b"] when they were saved."""
    for key, config in configs.items():
        weights = files["b"] if key == "b" and files["b"].is_file() else None
        case[key]["memory"] = measure_memory(
            {"kind": "infer", "config": config.to_dict(), "device": args.device,
             "dtype": args.dtype, "prompts": str(files["prompts"]),
             "new_tokens": args.new_tokens, "seed": args.seed,
             "weights": str(weights) if weights else None}, args)
    case["ratios"]["peak_mem"] = common.ratio(case["b"]["memory"].get("peak_mem_bytes"),
                                              case["a"]["memory"].get("peak_mem_bytes"))


def segment_parents(config: Any) -> list[int | None]:
    """Index of the segment directly enclosing each segment (None: top level)."""
    parents: list[int | None] = [None] * len(config.segments)

    def walk(items: list, parent: int | None) -> None:
        for item in items:
            if isinstance(item, Segment):
                parents[item.index] = parent
                walk(item.children, item.index)

    walk(config.tree, None)
    return parents


def decode_at_keep(times: list[float], step_kept: list[list[float]], keeps: list[float],
                   parents: list[int | None]) -> float | None:
    """B's decode time per token had it kept exactly its keep ratios (batch 1): the median
    time of each path a token took (which segments kept it) weighted by the path's
    probability under the keep ratios; None when a likely path was never seen."""
    by_path: dict[tuple[bool, ...], list[float]] = {}
    for t, kept in zip(times, step_kept, strict=True):
        by_path.setdefault(tuple(k > 0 for k in kept), []).append(t)
    total = 0.0
    for path_bits in range(2 ** len(keeps)):
        path = tuple(bool(path_bits >> j & 1) for j in range(len(keeps)))
        p = 1.0
        for j, kept in enumerate(path):
            entered = parents[j] is None or path[parents[j]]
            if not entered and kept:
                p = 0.0
            elif entered:
                p *= keeps[j] if kept else 1.0 - keeps[j]
        if p == 0.0:
            continue
        if path not in by_path:
            return None
        total += p * median(by_path[path])
    return total


def _infer_case(plen: int, bs: int, res: dict[str, Any], keeps: list[float],
                parents: list[int | None] | None = None) -> dict[str, Any]:
    case: dict[str, Any] = {"prompt_len": plen, "batch_size": bs}
    for key in ("a", "b"):
        r = res[key]
        case[key] = {
            "prefill_times_s": r["prefill_s"], "prefill_s": median(r["prefill_s"]),
            "decode_times_s": r["decode_s"], "decode_per_token_s": median(r["decode_s"]),
            "decode_mean_per_token_s": fmean(r["decode_s"]),
            **{k: r[k] for k in ("kv_bytes", "prompt_kv_bytes", "prompt_kept_fractions",
                                 "decode_kept_fractions")},
        }
    a, b = case["a"], case["b"]
    case["ratios"] = {
        **common.ratios(b, a, {"prefill": "prefill_s", "decode_per_token": "decode_per_token_s",
                               "decode_mean_per_token": "decode_mean_per_token_s"}),
        "decode_paired": common.paired_ratio(b["decode_times_s"], a["decode_times_s"]),
        "decode_at_keep": None,
        "kv_bytes": common.ratio(b["kv_bytes"], a["kv_bytes"]),
        "peak_mem": None,
    }
    if bs == 1 and keeps and parents is not None:
        step_kept = res["b"]["decode_step_kept"]
        est = decode_at_keep(b["decode_times_s"], step_kept, keeps, parents)
        b["decode_at_keep_per_token_s"] = est
        paths: dict[str, list[float]] = {}
        for t, kept in zip(b["decode_times_s"], step_kept, strict=True):
            paths.setdefault("".join("1" if k > 0 else "0" for k in kept), []).append(t)
        b["decode_path_times_s"] = {  # "10": kept by segment 0, dropped by segment 1
            p: {"steps": len(ts), "median": median(ts)} for p, ts in sorted(paths.items())}
        case["ratios"]["decode_at_keep"] = common.ratio(est, a["decode_per_token_s"])
    case["kept_fractions"] = b["prompt_kept_fractions"]
    case["keep_ratios"] = keeps
    case["warnings"] = []
    if common.off_keep(b["prompt_kept_fractions"], keeps):
        case["warnings"].append(OFF_KEEP_WARNING)
    if b["decode_kept_fractions"] and common.off_keep(b["decode_kept_fractions"], keeps):
        case["warnings"].append(OFF_KEEP_DECODE_WARNING)
    return case


def _print_infer_case(c: dict[str, Any]) -> None:
    r, fmt = c["ratios"], common.fmt
    print(f"  P={c['prompt_len']:<6} B={c['batch_size']:<3} prefill B/A {fmt(r['prefill'])}  "
          f"decode/token B/A {fmt(r['decode_per_token'])} "
          f"(paired {fmt(r['decode_paired'])}, mean {fmt(r['decode_mean_per_token'])}, "
          f"at keep {fmt(r['decode_at_keep'])})"
          f"  KV B/A {fmt(r['kv_bytes'])}  kept {common.slashed(c['kept_fractions']) or '-'} "
          f"(keep {common.slashed(c['keep_ratios'], 'g') or '-'})"
          + "".join("\n    <-- " + w.upper() for w in c["warnings"]), flush=True)


INFER_COLUMNS = [
    Col("prompt", "prompt_len"), Col("batch", "batch_size"),
    Col("A prefill s", "a.prefill_s", "{:.3f}"), Col("B prefill s", "b.prefill_s", "{:.3f}"),
    Col("prefill B/A", "ratios.prefill", "{:.3f}"),
    Col("A ms/token", lambda c: 1e3 * c["a"]["decode_per_token_s"], "{:.2f}"),
    Col("B ms/token", lambda c: 1e3 * c["b"]["decode_per_token_s"], "{:.2f}"),
    Col("decode B/A", "ratios.decode_per_token", "**{:.3f}**"),
    Col("paired", "ratios.decode_paired", "{:.3f}"),
    Col("mean", "ratios.decode_mean_per_token", "{:.3f}"),
    Col("at keep", "ratios.decode_at_keep", "{:.3f}"),
    Col("KV B/A", "ratios.kv_bytes", "{:.3f}"), Col("mem B/A", "ratios.peak_mem", "{:.3f}"),
    Col("B kept (prompt)", "b.prompt_kept_fractions", common.slashed, "l"),
    Col("B kept (decode)", "b.decode_kept_fractions", common.slashed, "l"),
]


def render_infer_markdown(report: dict[str, Any]) -> str:
    cal, slashed = report.get("calibration"), common.slashed
    lines = _header(report)
    for w in report["warnings"]:
        lines += [f"**WARNING: {w}** (tolerance {report['kept_tolerance']}).", ""]
    lines += [
        f"B: {report['b']['state']}"
        + (f", {cal['steps']} calibration steps (seq {cal['seq_len']} x batch "
           f"{cal['batch_size']}, lr {cal['lr']:g}, balancer strength "
           f"{cal['balancer_strength']:g}) on {cal['source']}; final eval kept fractions "
           + slashed(cal["final_eval_kept_fractions"]) if cal else "") + ".",
        f"Prompts: {report['prompt_source']}; {report['new_tokens']} new tokens, fed back: "
        + ("the greedy choice" if report["decode_input"] == "greedy"
           else "the text's continuation (--decode-input text)") + "; "
        f"prefill median of {report['repeats']}; decode: ratio of the medians over the decode "
        "steps, `paired` = median of B / A within a round, `mean` = ratio of the means (a "
        "SUBLLM's per-token time is bimodal: a token its subsampler drops skips the segment), "
        "`at keep` = B's median time of each path a decoded token can take (which segments "
        "kept it) weighted by that path's probability under the keep ratios, over A's median "
        "(batch 1). Keep ratios " + slashed(report["keep_ratios"], "g") + ".",
        "",
        *common.columns(INFER_COLUMNS, report["cases"]),
    ]
    return "\n".join(lines) + "\n"


# ---- the memory worker (one case per fresh interpreter) -----------------------------


def run_memory_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from subllm.model import SubLLM

    device = case["device"]
    if device == "cpu":
        common.watch_memory()
    torch.manual_seed(case["seed"])
    config = ModelConfig.from_dict(case["config"])
    if case["kind"] == "train":
        model = build_train_model(config, device, case["mst"], case["checkpointing"],
                                  case.get("compile", False))
        optimizer = common.adamw(model, device)
    elif case.get("weights"):  # one copy of the weights: no transient second copy
        with torch.device("meta"):
            model = SubLLM(config)
        model.load_state_dict(torch.load(case["weights"], weights_only=True, mmap=True),
                              assign=True)
        model = model.to(device).eval()
    else:
        with common.on_device(device):
            model = SubLLM(config).to(device).eval()
    common.reset_peak(device)
    baseline = common.memory_now(device)
    if case["kind"] == "train":
        g = torch.Generator().manual_seed(case["seed"] + case["seq_len"])
        ids = torch.randint(0, config.vocab_size, (case["batch_size"], case["seq_len"]),
                            generator=g).to(device)
        for i in range(2):  # the second step holds AdamW's state as well as activations
            common.timed_train_step(model, optimizer, ids, case["first_step"] + i, device,
                                    common.amp_dtype(case["dtype"]))
    else:
        text = torch.load(case["prompts"], weights_only=True)
        forced = None if text["forced"] is None else text["forced"].to(device)
        time_infer_pair({"m": model}, text["prompts"].to(device), case["new_tokens"], 1,
                        device, case["dtype"], forced)
    return {"ok": True, "peak_mem_bytes": common.memory_peak(device),
            "baseline_mem_bytes": baseline}


# the two sub-verbs listed in subllm.bench.BENCHMARKS (as pair:TRAIN and pair:INFER)
TRAIN = SimpleNamespace(DOC=__doc__, add_arguments=add_train_arguments, run=run_train)
INFER = SimpleNamespace(DOC=__doc__, add_arguments=add_infer_arguments, run=run_infer)

if __name__ == "__main__":
    common.worker_entry(run_memory_case, "train|infer")
