"""Where every `subllm bench <verb>` writes: ./bench-out/<verb> under the current directory
unless --out says otherwise, so that running a benchmark as documented never overwrites
the results committed under docs/benchmarks. (The end-to-end runs of each verb, in the
other files here, run without --out from a temporary directory and check that the
checkout is untouched: see conftest.py.)"""

from __future__ import annotations

import argparse

import pytest

from subllm.bench import BENCHMARKS
from subllm.commands.bench import _load


@pytest.mark.parametrize("verb", list(BENCHMARKS))
def test_every_bench_defaults_to_bench_out_of_the_current_directory(verb):
    bench = _load(BENCHMARKS[verb][0])
    parser = argparse.ArgumentParser(prog=f"subllm bench {verb}")
    bench.add_arguments(parser)
    assert parser.get_default("out") == f"bench-out/{verb}"
    help_text = " ".join(parser.format_help().split())
    assert f"default ./bench-out/{verb}, under the current directory" in help_text
    if verb == "gpu":  # the committed results: only by an explicit --out
        assert "--out docs/benchmarks/gpu" in help_text


def test_bench_cwd_fails_a_benchmark_that_writes_into_the_checkout(bench_cwd, tmp_path,
                                                                   monkeypatch):
    """The guard the end-to-end runs rely on, on a fake checkout: an overwritten committed
    result, a new file in the top folder and a result file beside the code each fail."""
    import os

    fake = tmp_path / "checkout"
    committed = fake / "docs" / "benchmarks" / "gpu"
    committed.mkdir(parents=True)
    (committed / "train.json").write_text("{}")
    (fake / "src" / "pkg").mkdir(parents=True)
    guard = bench_cwd.__wrapped__.__globals__  # the namespace of conftest.py here
    monkeypatch.setitem(guard, "REPO", fake)
    monkeypatch.setitem(guard, "COMMITTED", fake / "docs" / "benchmarks")

    def overwrite() -> None:
        (committed / "train.json").write_text('{"smoke": true}')

    writes = [overwrite, lambda: (fake / "gpu.json").write_text("{}"),
              lambda: (fake / "src" / "pkg" / "pytest.txt").write_text("log")]
    for write in writes:
        with pytest.raises(AssertionError, match="wrote into the checkout"):
            with bench_cwd(tmp_path / "cwd"):
                write()
    with bench_cwd(tmp_path / "cwd") as cwd:  # outputs in the current directory: fine
        (cwd / "bench-out" / "gpu").mkdir(parents=True)
        assert os.getcwd() == str(cwd)
