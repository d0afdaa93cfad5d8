"""`subllm bench startup`: how long a fresh process takes to start, import and fail.

Every case runs in a new Python process, `--repeats` times, the cases interleaved; the
report gives the median and the minimum wall time of each: an empty interpreter (the
floor), `import torch` and `import transformers` (what the CLI avoids), `import subllm`,
`subllm --help`, and one-line errors of several verbs; with --baseline, also with another
checkout's package, and the ratios. Writes startup.json, startup.md and startup.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from subllm.bench import common
from subllm.errors import SubLLMError
from subllm.flags import positive_int

PY = [sys.executable, "-c"]
CLI = [sys.executable, "-m", "subllm"]


def cases(tmp: Path) -> list[tuple[str, list[str], int]]:
    """(name, argv, expected exit code)."""
    missing = str(tmp / "missing.yaml")
    return [
        ("python (empty)", [*PY, "pass"], 0),
        ("import torch", [*PY, "import torch"], 0),
        ("import transformers", [*PY, "import transformers"], 0),
        ("import subllm", [*PY, "import subllm"], 0),
        ("subllm --help", [*CLI, "--help"], 0),
        ("subllm info subllm-1.3b", [*CLI, "info", "subllm-1.3b"], 0),
        ("subllm train --seq-len -3", [*CLI, "train", "--seq-len", "-3"], 2),
        ("subllm train --config missing.yaml", [*CLI, "train", "--config", missing], 2),
        ("subllm info no-such-preset", [*CLI, "info", "no-such-preset"], 2),
        ("subllm generate (no --checkpoint)", [*CLI, "generate"], 2),
        ("subllm bench --help", [*CLI, "bench", "--help"], 0),
    ]


def time_once(argv: list[str], expected: int, pythonpath: str | None = None) -> float:
    """Seconds one run of argv took; raise unless it exited with `expected`."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath is not None else {})}
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    elapsed = time.perf_counter() - t0
    if out.returncode != expected:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SubLLMError(f"`{' '.join(argv[1:])}` exited {out.returncode}, expected "
                          f"{expected}: {tail[0]}")
    return elapsed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="runs of each case, interleaved (default 5)")
    p.add_argument("--baseline", metavar="SRC_DIR",
                   help="also time every case with the package in SRC_DIR (another checkout's "
                        "src/), interleaved, and report the ratios")
    common.add_out_argument(p, "startup")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SubLLMError(f"--out {out} is a file; pass a directory")
    if args.baseline is not None and not (Path(args.baseline) / "subllm").is_dir():
        raise SubLLMError(f"--baseline {args.baseline} holds no subllm package; pass the "
                          "src/ directory of another checkout")
    out.mkdir(parents=True, exist_ok=True)
    variants = {"this": None} | ({"baseline": str(Path(args.baseline).resolve())}
                                 if args.baseline else {})
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(Path(tmp))
        times = {(v, name): [] for v in variants for name, _, _ in todo}
        for _ in range(args.repeats):
            for name, argv, expected in todo:
                for v, path in variants.items():
                    times[v, name].append(time_once(argv, expected, path))
    rows = []
    for name, _, _ in todo:
        row: dict[str, Any] = {"case": name}
        for v in variants:
            t = times[v, name]
            row[v] = {"median_s": statistics.median(t), "min_s": min(t), "runs": t}
        if "baseline" in row:
            row["ratio"] = row["this"]["median_s"] / row["baseline"]["median_s"]
        rows.append(row)
    report: dict[str, Any] = {"benchmark": "startup", "command": common.command_line("startup"),
                              "machine": common.machine_info("cpu"), "repeats": args.repeats,
                              "baseline": variants.get("baseline"), "cases": rows}
    print(render_markdown(report))
    common.write_outputs(out, "startup", report, render_markdown(report), plot)
    return 0


def render_markdown(report: dict[str, Any]) -> str:
    m, base, fmt = report["machine"], report["baseline"] is not None, common.fmt
    rows = [[r["case"], fmt(r["this"]["median_s"]), fmt(r["this"]["min_s"])]
            + ([fmt(r["baseline"]["median_s"]), fmt(r["ratio"])] if base else [])
            for r in report["cases"]]
    lines = [f"# Start-up time ({report['repeats']} fresh processes per case)", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, "
             f"transformers {m['transformers']}, Python {m['python']}."]
    if base:
        lines += ["", f"Baseline: the package in `{report['baseline']}`, run interleaved."]
    lines += ["", *common.table("case | median (s) | min (s)"
                                + (" | baseline median (s) | ratio" if base else ""),
                                "lrr" + ("rr" if base else ""), rows)]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    rows = report["cases"][::-1]
    y = list(range(len(rows)))
    fig, ax = common.pyplot().subplots(figsize=(8.5, 0.5 * len(rows) + 1.4))
    if report["baseline"] is not None:
        ax.barh([i + 0.2 for i in y], [r["baseline"]["median_s"] for r in rows], height=0.4,
                color="tab:gray", label="baseline")
        ax.barh([i - 0.2 for i in y], [r["this"]["median_s"] for r in rows], height=0.4,
                color="tab:blue", label="this checkout")
    else:
        ax.barh(y, [r["this"]["median_s"] for r in rows], color="tab:blue",
                label="this checkout")
    ax.set_yticks(y, [r["case"] for r in rows])
    ax.axvline(1.0, color="tab:red", linestyle="--", linewidth=1, label="1 s")
    ax.set_xlabel("median wall time of a fresh process (s)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    common.save_figure(fig, path)
