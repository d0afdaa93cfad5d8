"""`subllm bench gpu --smoke`: the one-command GPU benchmark, run at tiny sizes on whatever
device there is, so that the command cannot rot where no GPU is."""

from __future__ import annotations

import json

import pytest

from subllm.cli import main


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path, monkeypatch, bench_cwd):
    """Run as documented (no --out), from a temporary current directory: every output lands
    in ./bench-out/gpu, and nothing in the checkout changes (the committed results in
    docs/benchmarks/gpu are written only by an explicit --out)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with bench_cwd(tmp_path / "cwd") as cwd:
        assert main(["bench", "gpu", "--smoke"]) == 0
    out = cwd / "bench-out" / "gpu"
    assert {p.name for p in cwd.iterdir()} == {"bench-out"}  # nothing beside it either
    assert {p.name for p in (cwd / "bench-out").iterdir()} == {"gpu"}
    assert {p.name for p in out.iterdir()} == {"gpu.json", "gpu.md", "gpu.png", "tests",
                                               "train", "infer", "mst", "estimate"}
    report = json.loads((out / "gpu.json").read_text())
    assert list(report["parts"]) == ["tests", "train", "infer", "mst", "estimate"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part)
    assert (out / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mst | ok |" in (out / "gpu.md").read_text()
    # every part wrote its own outputs
    assert (out / "train" / "train.json").is_file() and (out / "infer" / "infer.json").is_file()
    mst = json.loads((out / "mst" / "mst.json").read_text())
    rows = {c["mode"]: c for c in mst["cases"]}
    assert rows["mst"]["ok"] and rows["native"]["ok"]
    assert rows["mst"]["grad_rel_error"] < 1e-4 and rows["native"]["grad_rel_error"] < 1e-4
    assert rows["mini-s"]["error"].startswith("not available")
    assert (out / "estimate" / "estimate.json").is_file()
    tests = (out / "tests" / "pytest.txt").read_text()
    assert " skipped" in tests or " passed" in tests


def test_bench_gpu_without_a_gpu_is_one_line(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "gpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bench_gpu_budget_stops_parts_that_do_not_fit(tmp_path, monkeypatch):
    """A part that outlives its share of --budget is stopped (with its workers) and reported
    as timed out; the command still writes its report, ends in time and exits 1."""
    import time

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "gpu"
    t0 = time.perf_counter()
    assert main(["bench", "gpu", "--smoke", "--parts", "train,estimate", "--budget", "3",
                 "--out", str(out)]) == 1
    wall = time.perf_counter() - t0
    report = json.loads((out / "gpu.json").read_text())
    assert [p["status"] for p in report["parts"].values()] == ["timed out", "timed out"]
    assert wall < 3 + 10  # the budget plus process teardown and the report
    assert not (out / "train" / "train.json").exists()  # stopped before it wrote anything
    assert "| train | timed out |" in (out / "gpu.md").read_text()
