"""`subllm bench prepare`: prepare's tokens/s against a plain tokenizer loop, written as JSON,
Markdown and PNG (a smoke test on a tiny corpus)."""

from __future__ import annotations

import json

import pytest

from subllm.cli import main


def test_bench_prepare_times_every_case_on_the_same_documents(tmp_path, write_corpus,
                                                             bench_cwd, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus", 6)
    # no --out, from a temporary current directory: ./bench-out/prepare, checkout untouched
    with bench_cwd(tmp_path / "cwd") as cwd:
        assert main(["bench", "prepare", "--input", str(corpus), "--vocab-size", "300",
                     "--workers", "1", "--repeats", "2"]) == 0
    out = cwd / "bench-out" / "prepare"
    report = json.loads((out / "prepare.json").read_text())
    cases = {r["case"]: r for r in report["cases"]}
    assert list(cases) == ["loop", "encode_batch", "prepare -w 1"]
    assert report["documents"] == 6 and report["tokens"] > 0 and report["machine"]["cpu_count"]
    for r in cases.values():
        assert len(r["runs_s"]) == 2 and r["best_s"] == min(r["runs_s"]) > 0
        assert r["tokens_per_s"] == pytest.approx(report["tokens"] / r["best_s"])
    assert cases["loop"]["vs_loop"] == 1.0
    markdown = (out / "prepare.md").read_text()
    assert markdown.count("\n|") == len(cases) + 2 and "prepare -w 1" in markdown
    assert (out / "prepare.png").read_bytes()[:4] == b"\x89PNG"
    assert "tokens/s" in capsys.readouterr().out
