"""`subllm bench startup`: fresh-process timings written as JSON, Markdown and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from subllm.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_bench_startup_writes_every_case_against_a_baseline(tmp_path, capsys,
                                                            bench_cwd) -> None:
    # no --out, from a temporary current directory: ./bench-out/startup, checkout untouched
    with bench_cwd(tmp_path / "cwd") as cwd:
        assert main(["bench", "startup", "--repeats", "1", "--baseline", str(SRC)]) == 0
    out = cwd / "bench-out" / "startup"
    assert [p.name for p in cwd.iterdir()] == ["bench-out"]
    report = json.loads((out / "startup.json").read_text())
    cases = {r["case"]: r for r in report["cases"]}
    assert {"import subllm", "subllm --help", "import torch",
            "subllm train --seq-len -3"} <= set(cases)
    for r in cases.values():
        assert r["this"]["median_s"] > 0 and r["baseline"]["median_s"] > 0
        assert r["ratio"] == pytest.approx(r["this"]["median_s"] / r["baseline"]["median_s"])
    assert (out / "startup.md").read_text().count("\n|") == len(cases) + 2  # header, rule, cases
    assert (out / "startup.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_startup_refuses_a_baseline_without_the_package(tmp_path, capsys) -> None:
    assert main(["bench", "startup", "--baseline", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no subllm package" in err[0]
    assert not (tmp_path / "o").exists()
