"""`subllm bench gpu`: everything a CPU cannot show, in one command, on one CUDA device.

Parts, each run through the `subllm` CLI in a subprocess with its outputs in OUT/<part>/,
each reported as ok / failed / skipped / timed out with its wall time:

  tests      the tests marked `cuda` (tests/test_cuda.py of this checkout), by pytest
  overhead   `bench overhead`, llama-1.3b (A) vs subllm-1.3b (B), bf16: per training step
             (4k tokens, batch 1) and decoding step (4096-token prompt, batch 1 and 8) the
             aten ops, CUDA kernels, host syncs, host (enqueue) and device time, and the
             kernels whose device time differs most between B and A: the profile that
             says where B's step time goes
  train      `bench train`, llama-1.3b (A) vs subllm-1.3b (B), bf16 autocast, at 4k and 8k
             tokens, at batch 1 and at the largest batch at which both models' steps fit in
             90 % of the GPU (the planner's pick, backed off to 3/4 if it runs out of memory
             all the same): time per step, tokens/s, MFU and each model's peak memory (a
             fresh subprocess per case), and their B/A ratios
  infer      `bench infer` with the same pair (B with random weights, no calibration):
             prefill time and decode time per token after prompts of 512 and 4096 tokens, at
             batch 1 and 8, 64 new tokens, and the KV-cache bytes; B/A ratios (no peak
             memory subprocesses: they would not fit the budget)
  mst        `bench mst`: a step (forward + backward) of MsT against the same MsT body with
             the peers' fused losses (torch's native linear_cross_entropy, Cut Cross-Entropy,
             Liger-Kernel; mini-s is reported unavailable) on a Llama-3-8B-shaped head: a
             2-block Hugging Face Llama of width 4096 with its 128256-token vocabulary, at
             8k and 16k tokens: time, peak memory, and loss / gradient errors against the
             unpatched model at 4k tokens; a peer that is not installed is a row saying so
  estimate   `bench estimate`: the memory planner against the measured peaks of a 1.3B
             training step (both models, standard mode, bf16, 4k tokens), the planner that
             picks train's largest batch

OUT/gpu.json, gpu.md and gpu.png summarise. `--budget` bounds the whole command (default
540 s, inside the 600 s a lent device runs one command): each part gets a share of the time
left and is stopped, with its workers, past it; `bench train` writes its cases as it goes,
so a stopped train part keeps the cases it finished. `make bench-gpu` installs the peers
first (Makefile). `--smoke` runs every part at tiny sizes with the same flags (on the CPU
when there is no GPU): it checks the command, and its figures mean nothing.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from subllm.bench import common
from subllm.flags import positive_float

PARTS = ("tests", "overhead", "train", "infer", "mst", "estimate")
# each part's share of the budget (of what is left when it starts, over the parts to come),
# after the wall times expected on one H100: tests ~20 s; overhead ~40 s; train ~180 s
# (three cases at 1.3B, two peak-memory subprocesses each); infer ~40 s; mst ~140 s (nine
# subprocesses); estimate ~50 s (two subprocesses). Unused time passes on to the parts after.
SHARES = {"tests": 0.07, "overhead": 0.08, "train": 0.37, "infer": 0.12, "mst": 0.25,
          "estimate": 0.11}
DEFAULT_BUDGET_S = 540.0  # a lent device runs one command for at most 600 s
# a tiny Hugging Face Llama for the smoke run's `bench mst`
SMOKE_HF = "hf-llama:dim=32,layers=1,vocab=300,ffn=64,heads=2,kv_heads=1"
# Llama-3-8B's shape where the loss is: its width, heads and vocabulary, two blocks
LLAMA3_8B_HEAD = "hf-llama:dim=4096,layers=2,vocab=128256,ffn=14336,heads=32,kv_heads=8"
MST_PEERS = "native,cce,liger,mini-s"
# each benchmark part's sizes: (--smoke, the real run); the smoke run takes the same flags
SIZES = {
    "overhead": (["--pair", "llama-tiny,subllm-tiny", "--size", "full", "--seq-len", "64",
                  "--prompt-len", "16", "--batch-sizes", "1,8", "--steps", "1", "--warmup", "1"],
                 ["--pair", "llama-1.3b,subllm-1.3b", "--size", "full", "--seq-len", "4096",
                  "--prompt-len", "4096", "--batch-sizes", "1,8", "--steps", "3",
                  "--warmup", "2"]),
    "train": (["--pair", "llama-tiny,subllm-tiny", "--seq-lens", "64", "--batch-sizes", "1,max",
               "--memory-budget", "256MB", "--steps", "1", "--warmup", "0", "--skip-memory"],
              ["--pair", "llama-1.3b,subllm-1.3b", "--seq-lens", "4096,8192",
               "--batch-sizes", "1,max", "--steps", "4", "--warmup", "2"]),
    "infer": (["--pair", "llama-tiny,subllm-tiny", "--prompt-lens", "32", "--batch-sizes", "1,2",
               "--new-tokens", "4", "--repeats", "1", "--calibrate-steps", "0",
               "--skip-memory"],
              ["--pair", "llama-1.3b,subllm-1.3b", "--prompt-lens", "512,4096",
               "--batch-sizes", "1,8", "--new-tokens", "64", "--repeats", "2",
               "--calibrate-steps", "0", "--skip-memory"]),
    "mst": (["--model", SMOKE_HF, "--seq-lens", "64", "--modes", "mst", "--peers", MST_PEERS,
             "--steps", "1", "--warmup", "0", "--exact-len", "32"],
            ["--model", LLAMA3_8B_HEAD, "--seq-lens", "8192,16384", "--modes", "mst",
             "--peers", MST_PEERS, "--steps", "3", "--warmup", "1", "--exact-len", "4096"]),
    "estimate": (["--model", "llama-tiny", "--seq-lens", "64", "--modes", "standard"],
                 ["--model", "llama-1.3b", "--model", "subllm-1.3b", "--seq-lens", "4096",
                  "--modes", "standard", "--dtype", "bf16"]),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, on the CPU when no GPU is visible (checks the command)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default cuda (--smoke: cuda when visible, else cpu)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    common.add_out_argument(p, "gpu", "; each part in OUT/<part>/. The committed results are "
                            "written only when asked: --out docs/benchmarks/gpu (make bench-gpu)")
    p.add_argument("--budget", type=positive_float, default=DEFAULT_BUDGET_S, metavar="S",
                   help=f"seconds for the whole command (default {DEFAULT_BUDGET_S:.0f})")


def _argv(part: str, device: str, smoke: bool, out: Path) -> list[str]:
    """The `subllm` command line of one part (bench estimate takes its dtype in SIZES)."""
    dtype = [] if part == "estimate" else ["--dtype", "bf16" if device == "cuda" else "fp32"]
    return ["bench", part, *SIZES[part][0 if smoke else 1], "--device", device, *dtype,
            "--out", str(out)]


def _bounded(cmd: list[str], timeout: float, **kwargs: Any) -> tuple[int | None, str, str]:
    """(exit code, or None when it outlived `timeout` seconds and was killed with everything
    it started; stdout; stderr) of cmd, run in its own session."""
    proc = subprocess.Popen(cmd, stdout=kwargs.pop("stdout", subprocess.PIPE),
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out or "", err or ""
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return None, out or "", err or ""


def _status(code: int | None, timeout: float, ok_codes: tuple[int, ...], output: str
            ) -> dict[str, Any]:
    """A part's status and detail: its last line of output unless it is ok."""
    if code is None:
        return {"status": "timed out", "detail": f"stopped after its {timeout:.0f} s share"}
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else f"exit code {code}"
    return {"status": "ok" if code in ok_codes else "failed", "detail": detail}


def _run_tests(out: Path, timeout: float) -> dict[str, Any]:
    """pytest -m cuda on this checkout's tests/test_cuda.py, run in OUT without cache or
    bytecode files (the checkout is only read); its log goes to OUT/pytest.txt."""
    tests = Path(__file__).resolve().parents[3] / "tests" / "test_cuda.py"
    if not tests.is_file():
        return {"status": "skipped", "detail": f"{tests} not found: run from a checkout"}
    out.mkdir(parents=True, exist_ok=True)
    code, stdout, stderr = _bounded([sys.executable, "-m", "pytest", "-rs", "-m", "cuda", "-p",
                                     "no:cacheprovider", str(tests)], timeout,
                                    cwd=out.resolve(),
                                    env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    (out / "pytest.txt").write_text(stdout + stderr)
    return _status(code, timeout, (0, 5), stdout + stderr)  # 5: nothing collected


def _run_cli(argv: list[str], timeout: float) -> dict[str, Any]:
    """`subllm ARGV` in a subprocess: its output goes to ours, its last error line into the
    report."""
    code, _, stderr = _bounded([sys.executable, "-m", "subllm", *argv], timeout,
                               stdout=None)
    sys.stderr.write(stderr)
    result = _status(code, timeout, (0,), stderr)
    if code is None:
        result["detail"] += " (raise --budget)"
    elif code == 0:
        result["detail"] = ""
    return result


def render_markdown(report: dict[str, Any]) -> str:
    rows = []
    for name, r in report["parts"].items():
        what = r.get("detail") or ""
        if r.get("argv"):
            what = f"`subllm {' '.join(r['argv'])}`" + (f" — {what}" if what else "")
        rows.append([name, r["status"], f"{r.get('wall_s', 0):.1f}", what])
    lines = [f"# subllm bench gpu{' --smoke' if report['smoke'] else ''}", "",
             f"{common.machine_line(report)} Command: `{report['command']}`. Each part's own "
             "tables: OUT/<part>/.", "",
             *common.table("part | status | wall (s) | command / detail", "llrl", rows), "",
             f"Total: {report['total_s']:.0f} s (budget {report.get('budget_s', 0):.0f} s)."]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    fig, ax = common.pyplot().subplots(figsize=(6, 3))
    parts = report["parts"]
    ax.barh(list(parts), [r.get("wall_s", 0.0) for r in parts.values()],
            color=["tab:green" if r["status"] == "ok" else "tab:red" for r in parts.values()])
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"subllm bench gpu — {report['device']}")
    fig.tight_layout()
    common.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    parts = common.parse_names(args.parts, "--parts", PARTS)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if (not args.smoke or torch.cuda.is_available()) else "cpu"
    common.check_cuda(device)  # without --smoke a GPU is the point: say so in one line
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results: dict[str, Any] = {}
    for i, part in enumerate(parts):
        t0 = time.perf_counter()
        left = args.budget - (t0 - t_all)
        share = max(1.0, left * SHARES[part] / sum(SHARES[p] for p in parts[i:]))
        print(f"== {part} (up to {share:.0f} s)", flush=True)
        if part == "tests":
            r = _run_tests(out / "tests", share)
        else:
            argv = _argv(part, device, args.smoke, out / part)
            r = {"argv": argv, **_run_cli(argv, share)}
        r["wall_s"] = time.perf_counter() - t0
        print(f"   {part}: {r['status']} in {r['wall_s']:.1f} s"
              + (f" ({r['detail']})" if r.get("detail") else ""), flush=True)
        results[part] = r
    report = {**common.report_head("gpu", device), "smoke": args.smoke, "budget_s": args.budget,
              "parts": results, "total_s": time.perf_counter() - t_all}
    common.write_outputs(out, "gpu", report, render_markdown(report), render_plot)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1
