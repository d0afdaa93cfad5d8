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
                                               "overhead", "train", "infer", "mst", "estimate"}
    report = json.loads((out / "gpu.json").read_text())
    assert list(report["parts"]) == ["tests", "overhead", "train", "infer", "mst", "estimate"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part)
    assert (out / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mst | ok |" in (out / "gpu.md").read_text()
    # every part wrote its own outputs, at the sizes of the real run's flags
    train = json.loads((out / "train" / "train.json").read_text())
    assert train["batch_sizes"] == [1, "max"] and not train["partial"]
    one, most = train["cases"]  # batch 1, and the planner's largest batch in --memory-budget
    assert one["batch_size"] == 1 and most["batch_size"] > 1 and most["asked"] == ["max"]
    overhead = json.loads((out / "overhead" / "overhead.json").read_text())
    assert [p["label"] for p in overhead["parts"]] == ["train L=64", "decode B=1", "decode B=8"]
    infer = json.loads((out / "infer" / "infer.json").read_text())
    assert [c["batch_size"] for c in infer["cases"]] == [1, 2]
    mst = json.loads((out / "mst" / "mst.json").read_text())
    rows = {c["mode"]: c for c in mst["cases"]}
    assert set(rows) == {"mst", "native", "cce", "liger", "mini-s"}
    assert rows["mst"]["ok"] and rows["native"]["ok"]
    assert rows["mst"]["grad_rel_error"] < 1e-4 and rows["native"]["grad_rel_error"] < 1e-4
    assert rows["mini-s"]["error"].startswith("not available")
    for peer in ("cce", "liger"):  # a peer that cannot run here is a row saying why
        assert rows[peer]["ok"] or rows[peer]["error"].startswith("not available"), rows[peer]
    assert (out / "estimate" / "estimate.json").is_file()
    tests = (out / "tests" / "pytest.txt").read_text()
    assert " skipped" in tests or " passed" in tests


def test_the_real_sizes_parse_and_the_smoke_run_takes_their_flags(tmp_path):
    """Every part's real command line is one `subllm` accepts (checked here, where it cannot
    run), and the smoke run passes each of its flags too (bench estimate's --dtype aside:
    the smoke run's device decides it)."""
    from subllm.bench.gpu import PARTS, SIZES, _argv
    from subllm.cli import build_parser

    def flags(argv):
        return {a for a in argv if a.startswith("--")}

    for part in PARTS[1:]:
        argv = _argv(part, "cuda", False, tmp_path / part)
        build_parser(argv).parse_args(argv)  # exits 2 on a flag it does not know
        smoke, real = SIZES[part]
        assert flags(real) - {"--dtype"} <= flags(smoke), part
    assert "--batch-sizes" in SIZES["train"][1] and "max" in SIZES["train"][1][
        SIZES["train"][1].index("--batch-sizes") + 1]


def test_the_default_budget_fits_one_device_command():
    from subllm.bench.gpu import DEFAULT_BUDGET_S, PARTS, SHARES

    assert DEFAULT_BUDGET_S <= 540  # a lent device runs one command for at most 600 s
    assert set(SHARES) == set(PARTS) and sum(SHARES.values()) == pytest.approx(1.0)


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
