"""`subllm bench mst`: training-step time and peak memory, standard vs checkpointing vs MsT.

Every (mode, sequence length) case runs in a fresh Python subprocess, so that its peak
memory is its own: on a GPU `torch.cuda.max_memory_allocated`, on a CPU the process's
peak resident set (VmHWM), reported raw beside the resident set right after the
model was built. Modes:

  standard       the model as built, no activation checkpointing
  checkpointing  block-level activation checkpointing (non-reentrant)
  mst            subllm.model.mst.apply_mst: mini-sequence MLP + chunked LM-head loss
                 + checkpointing

A step is one forward + backward with labels (no optimizer). With --memory-budget the
longest sequence that trains under the budget is searched per mode (doubling, then
bisection on multiples of 256). Models: a subllm preset, a Hugging Face config.json,
or a built-in spec `hf-llama:dim=256,layers=4,vocab=128256[,ffn=..,heads=..,kv_heads=..]`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from subllm.bench.common import (
    GRANULE,
    MODES,
    apply_mode,
    autocast,
    build_model,
    check_cuda,
    check_model,
    fmt_gib,
    longest_under_budget,
    machine_info,
    memory_now,
    memory_peak,
    parse_ints,
    parse_modes,
    peak_rss_bytes,
    pyplot,
    reset_peak,
    run_worker,
    save_figure,
    sync,
    watch_memory,
    worker_entry,
    write_outputs,
)
from subllm.errors import SubLLMError
from subllm.planner import parse_memory

HELP = "time and peak memory of a training step: standard / checkpointing / MsT"


# --------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="preset name, path to a Hugging Face config.json, or "
                        "hf-llama:dim=256,layers=4,vocab=128256")
    p.add_argument("--seq-lens", default="1024,2048,4096",
                   help="comma-separated sequence lengths (default: 1024,2048,4096)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--memory-budget", default=None,
                   help="e.g. 8GB: also search the longest trainable sequence under it")
    p.add_argument("--max-search-len", type=int, default=131072,
                   help="upper end of the --memory-budget search (default 131072)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast over fp32 weights (mixed precision)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--case-timeout", type=float, default=3600.0,
                   help="seconds before a case is abandoned (default 3600)")
    p.add_argument("--out", default="bench-out/mst", help="output folder (default bench-out/mst)")


# --------------------------------------------------------------------------------------
# one case, in its own process
# --------------------------------------------------------------------------------------


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build the model, then warm-up + timed forward/backward steps. Runs in the worker."""
    import torch

    device, budget = case["device"], case.get("budget")
    if device == "cpu":
        watch_memory(budget)
    seq_len, batch = case["seq_len"], case["batch_size"]
    torch.manual_seed(0)
    model = build_model(case["model"], seq_len).to(device).train()
    apply_mode(model, mst=case["mode"] == "mst", checkpointing=case["mode"] != "standard")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if device == "cuda" and budget:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    # on a CPU the peak resident set so far: the model built, nothing run
    baseline = memory_now(device) if device == "cuda" else peak_rss_bytes()
    reset_peak(device)

    # Not subllm.train.loop.train_step: this step has no optimizer (forward with labels +
    # backward only), so that the modes differ in activations alone.
    times, loss = [], float("nan")
    for i in range(case["warmup"] + case["steps"]):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, case["dtype"]):
            out = model(input_ids=ids, labels=ids).loss
        out.backward()
        model.zero_grad(set_to_none=True)
        loss = float(out)
        del out
        sync(device)
        if i >= case["warmup"]:
            times.append(time.perf_counter() - t0)
    return {"ok": True, "loss": loss, "time_per_step_s": sum(times) / len(times),
            "step_times_s": times, "peak_mem_bytes": memory_peak(device),
            "baseline_mem_bytes": baseline}


def measure(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result (never raises)."""
    return {**case, **run_worker("subllm.bench.mst", case, timeout)}


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# subllm bench mst — {report['model']}",
        "",
        f"Machine: {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPUs), torch {m['torch']}, "
        f"transformers {m['transformers']}; device {report['device']}, dtype {report['dtype']}, "
        f"batch {report['batch_size']}. Peak memory: "
        + ("torch.cuda.max_memory_allocated" if report["device"] == "cuda"
           else "peak resident set of the case's process (VmHWM)")
        + "; ratios are against `standard` at the same length.",
        "",
        "| mode | seq len | time/step (s) | peak mem (GiB) | after build (GiB) "
        "| mem / standard | time / standard | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        r = report["ratios"].get(c["mode"], {}).get(str(c["seq_len"]), {})
        lines.append(
            f"| {c['mode']} | {c['seq_len']} | "
            + (f"{c['time_per_step_s']:.3f}" if c["ok"] else "-")
            + f" | {fmt_gib(c.get('peak_mem_bytes'))} | {fmt_gib(c.get('baseline_mem_bytes'))} | "
            + (f"{r['memory']:.3f}" if "memory" in r else "-") + " | "
            + (f"{r['time']:.3f}" if "time" in r else "-") + " | "
            + ("" if c["ok"] else c.get("error", "failed")) + " |"
        )
    if report.get("budget"):
        lines += ["", f"Longest trainable sequence under {fmt_gib(report['budget']['bytes'])} GiB "
                      f"(multiples of {GRANULE}, searched up to {report['budget']['max_len']}):",
                  "", "| mode | longest seq len | x standard |", "|---|---:|---:|"]
        best = report["budget"]["longest"]
        base = best.get("standard")
        for mode, n in best.items():
            ratio = f"{n / base:.1f}" if base else "-"
            lines.append(f"| {mode} | {n} | {ratio} |")
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for mode in report["modes"]:
        pts = sorted((c["seq_len"], c["peak_mem_bytes"] / 2**30) for c in report["cases"]
                     if c["mode"] == mode and c["ok"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
    if report.get("budget"):
        ax.axhline(report["budget"]["bytes"] / 2**30, color="grey", ls="--", label="budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"{report['model']} — {report['device']}, {report['dtype']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _ratios(cases: list[dict[str, Any]], base: str = "standard",
            ) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {seq_len: {"memory": x, "time": y}}}, each against mode `base` at that length."""
    std = {c["seq_len"]: c for c in cases if c["mode"] == base and c["ok"]}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c in cases:
        s = std.get(c["seq_len"])
        if c["ok"] and s:
            out.setdefault(c["mode"], {})[str(c["seq_len"])] = {
                "memory": c["peak_mem_bytes"] / s["peak_mem_bytes"],
                "time": c["time_per_step_s"] / s["time_per_step_s"],
            }
    return out


# --------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    lengths = parse_ints(args.seq_lens, "--seq-lens", minimum=2)
    modes = parse_modes(args.modes)
    budget = (parse_memory(args.memory_budget, "--memory-budget")
              if args.memory_budget is not None else None)
    for name in ("batch_size", "steps", "max_search_len"):
        if getattr(args, name) <= 0:
            raise SubLLMError(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.case_timeout <= 0:
        raise SubLLMError("--warmup must be >= 0 and --case-timeout positive")
    check_model(args.model)
    check_cuda(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = {"model": args.model, "device": args.device, "dtype": args.dtype,
            "batch_size": args.batch_size}
    cases = []
    for n in lengths:
        for mode in modes:
            case = {**base, "mode": mode, "seq_len": n, "steps": args.steps,
                    "warmup": args.warmup}
            r = measure(case, args.case_timeout)
            print(f"  {mode:>13} L={n:<7} " + (
                f"{r['time_per_step_s']:.3f} s/step  peak {fmt_gib(r['peak_mem_bytes'])} GiB"
                if r["ok"] else f"failed: {r['error']}"), flush=True)
            cases.append(r)

    report: dict[str, Any] = {**base, "modes": modes, "seq_lens": lengths,
                              "machine": machine_info(args.device), "cases": cases,
                              "ratios": _ratios(cases),
                              "ratios_vs_checkpointing": _ratios(cases, "checkpointing")}
    if budget is not None:
        longest, probes = {}, {}
        for mode in modes:
            def fits(n: int, mode: str = mode) -> bool:
                r = measure({**base, "mode": mode, "seq_len": n, "steps": 1, "warmup": 0,
                             "budget": budget}, args.case_timeout)
                ok = r["ok"] and r["peak_mem_bytes"] <= budget
                print(f"  budget {mode:>13} L={n:<7} {'fits' if ok else 'does not fit'}",
                      flush=True)
                return ok

            longest[mode], probes[mode] = longest_under_budget(
                fits, args.max_search_len // GRANULE * GRANULE)
        report["budget"] = {"bytes": budget, "max_len": args.max_search_len,
                            "longest": longest, "probes": probes}

    paths = write_outputs(out, "mst", report, render_markdown(report), render_plot,
                          "mst_memory.png")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    worker_entry(run_case, "mst")
