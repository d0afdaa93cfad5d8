"""`subllm bench mst`: training-step time and peak memory, standard vs checkpointing vs MsT.

Every (mode, sequence length) case runs in a fresh Python subprocess, so that its peak
memory is its own: on a GPU `torch.cuda.max_memory_allocated`, on a CPU the process's
peak resident set (VmHWM), reported raw beside the resident set right after the
model was built. Modes:

  standard       the model as built, no activation checkpointing
  checkpointing  block-level activation checkpointing (non-reentrant)
  mst            subllm.mst.apply_mst: mini-sequence MLP + chunked LM-head loss + checkpointing

A step is one forward + backward with labels (no optimizer). With --memory-budget the
longest sequence that trains under the budget is searched per mode (doubling, then
bisection on multiples of 256). Models: a subllm preset, a Hugging Face config.json,
or a built-in spec `hf-llama:dim=256,layers=4,vocab=128256[,ffn=..,heads=..,kv_heads=..]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import threading
import time
from pathlib import Path
from typing import Any

from subllm.atomic import write_atomic
from subllm.bench.worker import run_worker, worker_entry
from subllm.errors import SubLLMError

HELP = "time and peak memory of a training step: standard / checkpointing / MsT"
MODES = ("standard", "checkpointing", "mst")
GRANULE = 256  # the budget search works on multiples of this
_OVER_BUDGET_EXIT = 3  # a worker's exit code when its resident set crossed the budget


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


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'8GB', '8 GiB', '512MB', '1.5G' -> bytes (binary units: 1 GB = 2**30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise SubLLMError(f"--memory-budget {text!r}: write a positive size such as 8GB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_lengths(text: str) -> list[int]:
    try:
        lens = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SubLLMError(f"--seq-lens {text!r}: write comma-separated integers") from None
    if not lens or any(n <= 1 for n in lens):
        raise SubLLMError(f"--seq-lens {text!r}: every length must be an integer >= 2")
    return sorted(set(lens))


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise SubLLMError(f"--modes {text!r}: choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

_SPEC_KEYS = {"dim": "hidden_size", "layers": "num_hidden_layers", "vocab": "vocab_size",
              "ffn": "intermediate_size", "heads": "num_attention_heads",
              "kv_heads": "num_key_value_heads"}


def _parse_spec(spec: str) -> dict[str, int]:
    """'hf-llama:dim=256,layers=4,vocab=128256' -> LlamaConfig keyword arguments."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    values: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, _, val = item.partition("=")
        if key not in _SPEC_KEYS or not val.isdigit() or int(val) <= 0:
            raise SubLLMError(
                f"--model {spec!r}: bad item {item!r}; use positive integers for "
                f"{', '.join(_SPEC_KEYS)}"
            )
        values[_SPEC_KEYS[key]] = int(val)
    dim = values.setdefault("hidden_size", 256)
    values.setdefault("num_hidden_layers", 4)
    values.setdefault("vocab_size", 128256)
    # Llama-3's proportions: ffn = 3.5 d, head size 64, 4x grouped KV heads
    values.setdefault("intermediate_size", int(3.5 * dim))
    values.setdefault("num_attention_heads", max(1, dim // 64))
    values.setdefault("num_key_value_heads", max(1, values["num_attention_heads"] // 4))
    return values


def check_model(spec: str) -> str:
    """Say early (in the parent) what kind of model `spec` is; raise if it is none."""
    if spec.startswith("hf-llama"):
        _parse_spec(spec)
        return "hf-spec"
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return "hf-config"
    if path.suffix == ".json" and path.is_file():
        return "hf-config"
    from subllm.model.config import PRESETS

    if spec in PRESETS:
        return "preset"
    raise SubLLMError(
        f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), not a Hugging Face config "
        "file, and not a spec like hf-llama:dim=256,layers=4,vocab=128256"
    )


def build_model(spec: str, seq_len: int) -> Any:
    """A randomly initialised model (no downloads)."""
    import torch  # noqa: F401  (imported for its side effects on transformers)

    kind = check_model(spec)
    if kind == "preset":
        from subllm.model import SubLLM
        from subllm.model.config import ModelConfig

        cfg = ModelConfig.preset(spec)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))
        return SubLLM(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if kind == "hf-spec":
        config = LlamaConfig(**_parse_spec(spec), max_position_embeddings=max(8192, seq_len),
                             pad_token_id=0)
    else:
        path = Path(spec)
        config = AutoConfig.from_pretrained(path if path.is_dir() else str(path))
    if getattr(config, "max_position_embeddings", seq_len) < seq_len:
        config.max_position_embeddings = seq_len
    return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------
# one case, in its own process
# --------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set since its exec: VmHWM of /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries that over fork + exec, so a worker started by a
    big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def _watch_rss(limit: int) -> None:
    """Exit the worker at once when its resident set passes `limit` (the budget, or a
    safety margin below the machine's memory), instead of waiting for the OOM killer."""
    def loop() -> None:
        while True:
            if _rss_bytes() > limit:
                os._exit(_OVER_BUDGET_EXIT)
            time.sleep(0.005)

    threading.Thread(target=loop, daemon=True).start()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build the model, then warm-up + timed forward/backward steps. Runs in the worker."""
    import torch

    device = torch.device(case["device"])
    budget = case.get("budget")
    if device.type == "cpu":
        avail = _mem_available()
        limit = min(budget, avail) if budget else avail
        if limit:
            _watch_rss(limit)
    seq_len, batch = case["seq_len"], case["batch_size"]
    torch.manual_seed(0)
    model = build_model(case["model"], seq_len).to(device)
    model.train()
    mode = case["mode"]
    from subllm.model.mst import apply_mst, enable_checkpointing

    if mode == "checkpointing":
        enable_checkpointing(model)
    elif mode == "mst":
        apply_mst(model, checkpointing=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)

    if device.type == "cuda":
        torch.cuda.synchronize()
        if budget:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = peak_rss_bytes()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    times = []
    loss = float("nan")
    for i in range(case["warmup"] + case["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= case["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {"ok": True, "loss": loss, "time_per_step_s": sum(times) / len(times),
            "step_times_s": times, "peak_mem_bytes": peak, "baseline_mem_bytes": baseline}


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 9 // 10  # keep 10% for everyone else
    except OSError:
        return None
    return None


def measure(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result (never raises)."""
    over = {_OVER_BUDGET_EXIT: "over the memory limit (stopped by the resident-set watchdog)"}
    return {**case, **run_worker("subllm.bench.mst", case, timeout, exit_reasons=over)}


# --------------------------------------------------------------------------------------
# the budget search
# --------------------------------------------------------------------------------------


def longest_under_budget(fits: Any, budget_max_len: int, start: int = GRANULE) -> tuple[int, list]:
    """Longest multiple of GRANULE in [GRANULE, budget_max_len] for which fits(L) is True,
    assuming fits is monotone: double from `start` until it fails, then bisect.
    Returns (length or 0 when even `start` fails, [(length, fits)] in probe order)."""
    probes: list[tuple[int, bool]] = []

    def probe(n: int) -> bool:
        ok = bool(fits(n))
        probes.append((n, ok))
        return ok

    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    n = start
    while hi is None:
        n = min(n, budget_max_len)
        if not probe(n):
            hi = n
        elif n == budget_max_len:
            return n, probes
        else:
            lo, n = n, n * 2
    while hi - lo > GRANULE:
        mid = (lo + hi) // 2 // GRANULE * GRANULE  # a multiple strictly between lo and hi
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "device": device}
    try:
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG under a temporary name, then rename it into place."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


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
            + f" | {_gb(c.get('peak_mem_bytes'))} | {_gb(c.get('baseline_mem_bytes'))} | "
            + (f"{r['memory']:.3f}" if "memory" in r else "-") + " | "
            + (f"{r['time']:.3f}" if "time" in r else "-") + " | "
            + ("" if c["ok"] else c.get("error", "failed")) + " |"
        )
    if report.get("budget"):
        lines += ["", f"Longest trainable sequence under {_gb(report['budget']['bytes'])} GiB "
                      f"(multiples of {GRANULE}, searched up to {report['budget']['max_len']}):",
                  "", "| mode | longest seq len | x standard |", "|---|---:|---:|"]
        best = report["budget"]["longest"]
        base = best.get("standard")
        for mode, n in best.items():
            ratio = f"{n / base:.1f}" if base else "-"
            lines.append(f"| {mode} | {n} | {ratio} |")
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
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
    lengths = parse_lengths(args.seq_lens)
    modes = parse_modes(args.modes)
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    for name in ("batch_size", "steps", "max_search_len"):
        if getattr(args, name) <= 0:
            raise SubLLMError(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.case_timeout <= 0:
        raise SubLLMError("--warmup must be >= 0 and --case-timeout positive")
    check_model(args.model)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SubLLMError("--device cuda: no CUDA GPU is visible; use --device cpu")
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
                f"{r['time_per_step_s']:.3f} s/step  peak {_gb(r['peak_mem_bytes'])} GiB"
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

    write_atomic(out / "mst.json", json.dumps(report, indent=2))
    write_atomic(out / "mst.md", render_markdown(report))
    render_plot(report, out / "mst_memory.png")
    print(f"wrote {out / 'mst.json'}, {out / 'mst.md'}, {out / 'mst_memory.png'}")
    return 0


if __name__ == "__main__":
    worker_entry(run_case, "mst")
