"""`subllm bench overhead`: the fixed cost of a step, model A against model B.

A SUBLLM's step does work a LLaMA of the same size does not: the subsamplers' scoring,
top-k, gathers, the upsampling's scatter-add, the balancer. At a batch of 1 that is little
arithmetic but many operations, each a kernel launch on a GPU and some Python on the host.
This benchmark counts and times that fixed cost, per step:

ops       aten operators dispatched in one step (a TorchDispatchMode counting each): on a
          GPU each is about one kernel launch; also split by phase (forward and the step's
          bookkeeping, backward, optimizer) and by operator
kernels   CUDA kernels (and copies) in one step, from torch.profiler, and each kernel's
          device time: the Markdown lists those whose time differs most between B and A
          (where B's step goes); CUDA only
host_ms   median wall time of the step's Python call. On CUDA it is not synchronised at
          its end, so it is the host's time to enqueue the step; step_ms is the same call
          waited for (the device's time). On a CPU the two are one.
syncs     host syncs in one step (torch.cuda.set_sync_debug_mode("warn")); CUDA only. On a
          CPU, tests/model/test_host_syncs.py checks them with the meta device.

Parts: a training step (subllm.train.loop.train_step on random tokens, AdamW, no gradient
clipping: the step `subllm bench train` times) at --seq-len x --batch-size, and a decoding
step (model(token, cache=cache) after a --prompt-len prefill) at each of --batch-sizes. A
and B take turns step by step; ratios are B / A. `--size tiny` (the default on a CPU)
shrinks both models to dim 64, 4 heads, ffn 128, vocab 1024, keeping their layers,
structure, keep ratios and routing settings, so that the arithmetic is negligible and what
is left is the fixed cost; `--size full` (the default on CUDA) runs the pair as given.
Writes overhead.json, overhead.md and overhead.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from statistics import fmean, median
from typing import Any

from subllm.bench import common
from subllm.errors import SubLLMError
from subllm.model.config import ModelConfig

DOC = __doc__
DEFAULT_PAIR = "llama-1.3b,subllm-1.3b"
SIZES = ("tiny", "full")
# --size tiny: a step whose arithmetic is negligible (layers and routing are kept)
TINY = {"dim": 64, "n_heads": 4, "ffn_dim": 128, "vocab_size": 1024, "head_dim": None}
TINY_KV_HEADS = 2  # for a model that groups its KV heads
# each model runs --steps steps this many times over after its warm-up: timed, counted for
# ops, and on CUDA profiled for kernels and watched for syncs (a step's counts can vary: a
# SUBLLM decoding a few rows runs only the blocks of the segments its token enters)
PASSES = 4
PHASES = ("forward", "backward", "optimizer")
SYNC_WORD = "synchroniz"  # in the warning set_sync_debug_mode("warn") gives per host sync
TOP_OPS = 8  # operators per part in the Markdown: those B dispatches most more often than A
TOP_KERNELS = 15  # kernels per part in the Markdown (CUDA): largest device-time differences
Step = Callable[[], Any]


# ---- flags ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR,
                   help=f"A,B: presets or YAML/JSON model config files (default {DEFAULT_PAIR})")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="tiny: dim 64, 4 heads, ffn 128, vocab 1024, the layers and routing "
                        "kept (the fixed cost alone); full: the models as given (default: "
                        "tiny on a CPU, full on CUDA)")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="tokens per row of the training step (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=512,
                   help="tokens of the prompt prefilled before the decoding steps "
                        "(default %(default)s)")
    p.add_argument("--batch-sizes", default="1,8",
                   help="comma-separated rows of the decoding step (default %(default)s)")
    common.add_flags(p, "device", "dtype", "seed",
                     batch_size={"help": "rows of the training step (default %(default)s)"},
                     threads={"help": "torch CPU threads (default: torch's)"},
                     steps={"default": 5}, warmup={"default": 2})
    common.add_out_argument(p, "overhead")


def _check(args: argparse.Namespace) -> list[int]:
    """Refuse bad flags (one line each) before any model is built; the decoding batch
    sizes."""
    common.require_positive(args, "steps", "batch_size", "threads")
    common.require_positive(args, "warmup", minimum=0)
    common.require_positive(args, "seq_len", "prompt_len", minimum=2)
    batch_sizes = common.parse_ints(args.batch_sizes, "--batch-sizes")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SubLLMError(f"--out {out} is a file; pass a directory")
    common.check_cuda(args.device)
    return batch_sizes


# ---- models --------------------------------------------------------------------------


def shrink(config: ModelConfig) -> ModelConfig:
    """`config` at --size tiny: TINY's widths, grouped KV heads kept grouped; the layers,
    structure, keep ratios and every routing setting as they were."""
    grouped = config.n_kv_heads != config.n_heads
    kv_heads = TINY_KV_HEADS if grouped else TINY["n_heads"]
    return dataclasses.replace(config, **TINY, n_kv_heads=kv_heads).validate()


def model_configs(specs: tuple[str, str], size: str, max_len: int) -> dict[str, ModelConfig]:
    """{"a": ..., "b": ...}: the pair's configs holding `max_len` tokens, shrunk at tiny."""
    configs = {key: common.load_config(spec, max_len)
               for key, spec in zip("ab", specs, strict=True)}
    return {key: shrink(c) if size == "tiny" else c for key, c in configs.items()}


def build_model(config: ModelConfig, device: str, seed: int) -> Any:
    """A randomly initialised SubLLM (a plain LLaMA when the structure has no segment)."""
    import torch

    from subllm.model import SubLLM

    torch.manual_seed(seed)  # A and B start from the same random state
    with common.on_device(device):
        model = SubLLM(config)
    return model.to(device)


# ---- one step, measured ----------------------------------------------------------------


def time_step(fn: Step, device: str) -> tuple[float, float]:
    """(host seconds, step seconds) of one call: the host's time ends when the call returns
    (on CUDA: when the step is enqueued), the step's when the device has finished too (on a
    CPU, the same)."""
    common.sync(device)
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    common.sync(device)
    return host, time.perf_counter() - t0


def count_ops(fn: Step, optimizer: Any = None) -> dict[str, Any]:
    """The aten operators one call of fn dispatches: in all, per phase (backward: while the
    autograd engine runs a node; optimizer: inside `optimizer.step`; forward: the rest),
    those that only make a view (host work, no kernel) and per operator."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: Counter[str] = Counter()
    phases: Counter[str] = Counter({p: 0 for p in PHASES})
    where = {"optimizer": False}
    views = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            nonlocal views
            ops[str(func.overloadpacket)] += 1
            views += func.is_view
            if where["optimizer"]:
                phases["optimizer"] += 1
            elif torch._C._current_autograd_node() is not None:
                phases["backward"] += 1
            else:
                phases["forward"] += 1
            return func(*args, **(kwargs or {}))

    hooks = []
    if optimizer is not None:
        hooks = [optimizer.register_step_pre_hook(lambda *_: where.update(optimizer=True)),
                 optimizer.register_step_post_hook(lambda *_: where.update(optimizer=False))]
    try:
        with Count():
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return {"ops": sum(ops.values()), "ops_by_phase": dict(phases), "view_ops": views,
            "op_counts": dict(ops.most_common())}


def profile_kernels(fn: Step) -> tuple[int, dict[str, list[float]]]:
    """(CUDA kernels, memory copies and sets of one call, {kernel name: [calls, device
    ms]}) as torch.profiler sees them: where a step's device time goes."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    times: dict[str, list[float]] = {}
    for e in kernels:
        entry = times.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us() / 1e3
    return len(kernels), times


def count_syncs(fn: Step) -> int:
    """Host syncs of one call: CUDA warns at each in sync debug mode "warn"."""
    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not one per source line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_WORD in str(w.message).lower() for w in caught)


def mean_counts(counts: list[dict[str, Any]]) -> dict[str, Any]:
    """count_ops of several steps as one: each figure the mean per step; `ops_runs` each
    step's total."""
    n = len(counts)

    def mean(field: str) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for c in counts:
            totals.update(c[field])
        return {k: v / n for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))}

    ops = [c["ops"] for c in counts]
    return {"ops": fmean(ops), "ops_runs": ops, "ops_by_phase": mean("ops_by_phase"),
            "view_ops": fmean(c["view_ops"] for c in counts), "op_counts": mean("op_counts")}


def measure_part(steps: dict[str, Step], args: argparse.Namespace,
                 optimizers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per model: host (and on CUDA device) times of --steps steps, A and B alternating
    after the warm-up; then the mean ops of --steps more, and on CUDA the mean kernels and
    syncs of --steps more each; the B / A ratios."""
    times = common.alternate(list(steps), args.steps,
                             lambda key, _: time_step(steps[key], args.device),
                             warmup=args.warmup)
    part: dict[str, Any] = {}
    for key, fn in steps.items():
        host = [h * 1e3 for h, _ in times[key]]
        optimizer = (optimizers or {}).get(key)
        counts = [count_ops(fn, optimizer) for _ in range(args.steps)]
        entry = {**mean_counts(counts), "kernels": None, "syncs": None,
                 "host_ms": median(host), "host_ms_runs": host}
        if args.device == "cuda":
            device_ms = [s * 1e3 for _, s in times[key]]
            profiles = [profile_kernels(fn) for _ in range(args.steps)]
            kernels = [n for n, _ in profiles]
            syncs = [count_syncs(fn) for _ in range(args.steps)]
            entry.update(step_ms=median(device_ms), step_ms_runs=device_ms,
                         kernels=fmean(kernels), kernels_runs=kernels,
                         kernel_times=profiles[-1][1], syncs=fmean(syncs), syncs_runs=syncs)
        part[key] = entry
    part["ratios"] = common.ratios(part["b"], part["a"], {
        "ops": "ops", "kernels": "kernels", "host_ms": "host_ms", "step_ms": "step_ms"})
    return part


# ---- the parts -------------------------------------------------------------------------


def train_steps(models: dict[str, Any], optimizers: dict[str, Any], args: argparse.Namespace
                ) -> dict[str, Step]:
    """Per model, one training step on its own fixed random batch, the schedules' step
    advancing by one each call as in training."""
    import torch

    from subllm.train.loop import train_step

    device, amp = torch.device(args.device), common.amp_dtype(args.dtype)
    steps = {}
    for key, model in models.items():
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                            generator=g).to(device)
        counter = itertools.count()

        def step(model: Any = model, opt: Any = optimizers[key], ids: Any = ids,
                 counter: Any = counter) -> Any:
            model.set_step(next(counter))
            return train_step(model, opt, [ids], device=device, amp=amp, grad_clip=None)

        steps[key] = step
    return steps


def decode_steps(models: dict[str, Any], batch: int, args: argparse.Namespace
                 ) -> dict[str, Step]:
    """Per model, after an untimed prefill of `batch` random prompts: one decoding step,
    each call feeding the next of its random tokens (made beforehand: no op of the step's
    own) and growing the cache by one."""
    import torch

    g = torch.Generator().manual_seed(args.seed + batch)
    calls = args.warmup + PASSES * args.steps
    steps = {}
    for key, model in models.items():
        vocab = model.config.vocab_size
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=g)
        tokens = iter([torch.randint(0, vocab, (batch, 1), generator=g).to(args.device)
                       for _ in range(calls)])
        with torch.no_grad(), common.autocast(args.device, args.dtype):
            cache = model(prompts.to(args.device), use_cache=True, logits_to_keep=1).cache

        def step(model: Any = model, cache: Any = cache, tokens: Any = tokens) -> Any:
            with torch.no_grad(), common.autocast(args.device, args.dtype):
                return model(next(tokens), cache=cache)

        steps[key] = step
    return steps


def measure(models: dict[str, Any], batch_sizes: list[int], args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """The training part, then one decoding part per batch size, each printed as done."""
    for model in models.values():
        model.train()
    optimizers = {key: common.adamw(model, args.device) for key, model in models.items()}
    parts = [{"part": "train", "label": f"train L={args.seq_len}", "seq_len": args.seq_len,
              "batch_size": args.batch_size,
              **measure_part(train_steps(models, optimizers, args), args, optimizers)}]
    _say(parts[-1])
    del optimizers  # their moments: room for the caches
    gc.collect()
    for model in models.values():
        model.eval()
    for batch in batch_sizes:
        parts.append({"part": "decode", "label": f"decode B={batch}", "batch_size": batch,
                      "prompt_len": args.prompt_len,
                      **measure_part(decode_steps(models, batch, args), args)})
        _say(parts[-1])
        gc.collect()
    return parts


def _say(part: dict[str, Any]) -> None:
    a, b, r = part["a"], part["b"], part["ratios"]
    print(f"{part['label']}, batch {part['batch_size']}: ops A {count(a['ops'])}, "
          f"B {count(b['ops'])} "
          f"(B/A {common.fmt(r['ops'], '.2f')}); host ms A {a['host_ms']:.2f}, "
          f"B {b['host_ms']:.2f} (B/A {common.fmt(r['host_ms'], '.2f')})", flush=True)


# ---- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    batch_sizes = _check(args)
    specs = common.parse_pair(args.pair, DEFAULT_PAIR)
    size = args.size or ("full" if args.device == "cuda" else "tiny")
    decode_len = args.prompt_len + args.warmup + PASSES * args.steps
    configs = model_configs(specs, size, max(args.seq_len, decode_len))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = {key: build_model(c, args.device, args.seed) for key, c in configs.items()}
    summaries = {key: common.model_summary(spec, configs[key], models[key].num_params())
                 for key, spec in zip("ab", specs, strict=True)}
    parts = measure(models, batch_sizes, args)
    report = {**common.report_head("overhead", args.device, torch.get_num_threads()),
              "dtype": args.dtype, "size": size, **summaries, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "prompt_len": args.prompt_len,
              "batch_sizes": batch_sizes, "steps": args.steps, "warmup": args.warmup,
              "parts": parts}
    markdown = render_markdown(report)
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_outputs(out, "overhead", report, markdown, plot)
    return 0


# ---- outputs ---------------------------------------------------------------------------


def count(x: float | None) -> str:
    """A mean count per step: whole when it is (every step alike), else to one decimal."""
    if x is None:
        return "-"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _table_columns(report: dict[str, Any]) -> list[common.Col]:
    """part, ops, host ms; kernels, device ms and syncs where measured (CUDA)."""
    Col = common.Col
    parts = report["parts"]

    def pair(name: str, field: str, fmt: Any, ratio: bool = True) -> list[common.Col]:
        cols = [Col(f"A {name}", f"a.{field}", fmt), Col(f"B {name}", f"b.{field}", fmt)]
        return cols + ([Col("B/A", f"ratios.{field}", "{:.2f}")] if ratio else [])

    cols = [Col("part", "label", align="l"), *pair("ops", "ops", count)]
    if any(p["a"]["kernels"] is not None for p in parts):
        cols += pair("kernels", "kernels", count)
    cols += pair("host ms", "host_ms", "{:.2f}")
    if any("step_ms" in p["a"] for p in parts):
        cols += pair("step ms", "step_ms", "{:.2f}")
    if any(p["a"]["syncs"] is not None for p in parts):
        cols += pair("syncs", "syncs", count, ratio=False)
    return cols


def _phase_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for part in report["parts"]:
        for phase in PHASES:
            a, b = part["a"]["ops_by_phase"][phase], part["b"]["ops_by_phase"][phase]
            if a or b:
                rows.append([part["label"], phase, count(a), count(b), count(b - a)])
        a, b = part["a"]["view_ops"], part["b"]["view_ops"]
        rows.append([part["label"], "views, of all phases", count(a), count(b),
                     count(b - a)])
    return rows


def _extra_op_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Per part, the TOP_OPS operators B dispatches most more often than A."""
    rows = []
    for part in report["parts"]:
        a, b = part["a"]["op_counts"], part["b"]["op_counts"]
        more = sorted(((b[op] - a.get(op, 0), op) for op in b), key=lambda t: (-t[0], t[1]))
        rows += [[part["label"], f"`{op}`", count(a.get(op, 0)), count(b[op]), count(d)]
                 for d, op in more[:TOP_OPS] if d > 0]
    return rows


def _kernel_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Per part, the TOP_KERNELS kernels whose device time differs most between B and A
    (CUDA: the profile that says where B's step time goes)."""
    rows = []
    for part in report["parts"]:
        a, b = part["a"].get("kernel_times"), part["b"].get("kernel_times")
        if a is None or b is None:
            continue
        names = set(a) | set(b)
        diff = sorted(names, key=lambda k: -abs(b.get(k, [0, 0.0])[1] - a.get(k, [0, 0.0])[1]))
        for name in diff[:TOP_KERNELS]:
            (na, ta), (nb, tb) = a.get(name, [0, 0.0]), b.get(name, [0, 0.0])
            rows.append([part["label"], f"`{name[:70]}`", f"{na} / {nb}", f"{ta:.3f}",
                         f"{tb:.3f}", f"{tb - ta:+.3f}"])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    a, b = report["a"], report["b"]
    title = f"subllm bench overhead — A = {a['spec']}, B = {b['spec']} ({report['size']})"
    size = ("tiny: dim 64, 4 heads, ffn 128, vocab 1024, the layers, structure, keep and "
            "routing of the pair kept" if report["size"] == "tiny" else "full: as given")
    cuda = report["device"] == "cuda"
    host = ("host ms: the step's Python call, not synchronised at its end (the time to "
            "enqueue it); step ms: the same, synchronised" if cuda
            else "host ms: wall time of the step (on a CPU, host and device time are one)")
    syncs = ("syncs: host syncs per step (torch.cuda.set_sync_debug_mode)." if cuda else
             "Kernels and syncs are measured on CUDA only; on a CPU, "
             "tests/model/test_host_syncs.py checks the syncs with the meta device.")
    lines = [
        *common.markdown_head(title, report),
        f"Models {size} ({a['parameters']:,} and {b['parameters']:,} parameters). Training "
        f"step: {report['batch_size']} x {report['seq_len']} tokens, AdamW, no clipping; "
        f"decoding step: one token per row after a {report['prompt_len']}-token prefill. "
        f"{report['warmup']} warm-up and {report['steps']} timed steps, A and B alternating; "
        "times are medians, ratios B / A.", "",
        f"ops: aten operators dispatched per step (on a GPU, about one kernel each), the "
        f"mean of {report['steps']} steps counted after the timed ones (a SUBLLM decoding a "
        "few rows asks the host which segments its token enters and runs only their blocks: "
        f"its count varies from step to step); {host}. {syncs}", "",
        *common.columns(_table_columns(report), report["parts"]), "",
        "## Operators per phase", "",
        "Views (a view, reshape, slice, ...) launch no kernel on a GPU: host work only.", "",
        *common.table("part | phase | A ops | B ops | B − A", "llrrr", _phase_rows(report)),
        "", f"## Operators B dispatches more often than A (top {TOP_OPS} per part)", "",
        *common.table("part | operator | A | B | B − A", "llrrr", _extra_op_rows(report))]
    kernels = _kernel_rows(report)
    if kernels:
        lines += ["", f"## Kernels whose device time differs most, B against A (top "
                  f"{TOP_KERNELS} per part; one profiled step)", "",
                  *common.table("part | kernel | calls A / B | A ms | B ms | B − A ms",
                                "llrrrr", kernels)]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Ops per step and host ms per step, A and B side by side for each part."""
    parts = report["parts"]
    x = range(len(parts))
    fig, axes = common.pyplot().subplots(1, 2, figsize=(10, 4.2))
    for ax, field, label in ((axes[0], "ops", "aten ops per step"),
                             (axes[1], "host_ms", "host ms per step (median)")):
        for offset, key, color in ((-0.2, "a", "tab:gray"), (0.2, "b", "tab:blue")):
            ax.bar([i + offset for i in x], [p[key][field] for p in parts], width=0.4,
                   color=color, label=f"{key.upper()} = {report[key]['spec']}")
        for i, p in enumerate(parts):
            r = p["ratios"][field]
            if r is not None:
                top = max(p["a"][field], p["b"][field])
                ax.annotate(f"{r:.2f}x", (i, top), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [p["label"] for p in parts])
        if field == "host_ms":  # a long training step would flatten the decoding steps
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"subllm bench overhead ({report['size']}, {report['device']}, "
                 f"{report['dtype']}): B/A above the bars")
    fig.tight_layout()
    common.save_figure(fig, path)
