"""`subllm bench mst`: a tiny end-to-end run through the CLI, the budget search, flag errors."""

from __future__ import annotations

import json

import pytest

from subllm.bench.common import GRANULE, longest_under_budget
from subllm.cli import main
from subllm.planner import parse_memory as parse_bytes

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 88,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 300, "max_position_embeddings": 256}


@pytest.mark.slow
def test_bench_mst_smoke(tmp_path, monkeypatch, bench_cwd):
    """Without --out, from a temporary current directory: the outputs land in
    ./bench-out/mst and the checkout is untouched (bench_cwd)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the case subprocesses: tiny tensors
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    with bench_cwd(tmp_path / "cwd") as cwd:
        rc = main(["bench", "mst", "--model", str(config), "--seq-lens", "96,48",
                   "--modes", "standard,mst", "--loss-chunk-tokens", "16", "--steps", "1"])
    assert rc == 0
    out = cwd / "bench-out" / "mst"
    assert [p.name for p in cwd.iterdir()] == ["bench-out"]
    assert {p.name for p in out.iterdir()} == {"mst.json", "mst.md", "mst_memory.png"}
    assert (out / "mst_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "mst.json").read_text())
    assert report["machine"]["torch"] and report["machine"]["transformers"]
    assert report["machine"]["cpu"]
    cases = {(c["mode"], c["seq_len"]) for c in report["cases"]}
    assert cases == {(m, n) for m in ("standard", "mst", "mst@16") for n in (48, 96)}
    assert report["allocator"] == "release" and report["variants"] == ["mst@16"]
    for c in report["cases"]:
        assert c["ok"], c
        assert c["malloc_mmap_threshold"] == "131072"  # the workers ran with it
        assert c["loss_rel_error"] < 1e-5 and c["grad_rel_error"] < 1e-4  # vs unpatched
        assert c["time_per_step_s"] > 0
        assert c["peak_mem_bytes"] >= c["baseline_mem_bytes"] > 0
        assert c["loss"] == pytest.approx(5.7, abs=0.5)  # ~ln(300) for a random model
    assert report["ratios"]["standard"]["48"] == {"memory": 1.0, "time": 1.0}
    table = (out / "mst.md").read_text()
    assert "| mst | 96 |" in table and "torch" in table and "MALLOC_MMAP_THRESHOLD_" in table
    assert "| mst@16 | 96 |" in table and "loss chunks of 16 tokens" in table


@pytest.mark.parametrize("limit", [1, 300, 256 * 7, 256 * 37 + 5, 10**9])
def test_budget_search_finds_the_longest_fitting_length(limit):
    probes: list[int] = []

    def fits(n: int) -> bool:
        probes.append(n)
        return n <= limit

    best, record = longest_under_budget(fits, 65536)
    expected = min(limit // GRANULE * GRANULE, 65536)
    assert best == expected
    assert all(n % GRANULE == 0 for n in probes) and len(probes) <= 2 * 9
    assert [n for n, _ in record] == probes


@pytest.mark.parametrize(
    "flags, message",
    [(["--seq-lens", "1024,-5"], "--seq-lens"), (["--seq-lens", "a,b"], "--seq-lens"),
     (["--modes", "standard,fast"], "--modes"), (["--memory-budget", "lots"], "--memory-budget"),
     (["--memory-budget", "0GB"], "--memory-budget"), (["--model", "nope"], "--model"),
     (["--model", "hf-llama:dim=abc"], "--model"),
     (["--loss-chunk-tokens", "0"], "--loss-chunk-tokens"),
     (["--loss-chunk-tokens", "64,x"], "--loss-chunk-tokens")],
)
def test_bench_mst_bad_flags(flags, message, capsys, tmp_path):
    argv = ["bench", "mst", "--model", "hf-llama:dim=64,layers=1,vocab=100",
            "--out", str(tmp_path)]
    for i in range(0, len(flags), 2):
        if flags[i] in argv:
            argv[argv.index(flags[i]) + 1] = flags[i + 1]
        else:
            argv += flags[i:i + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("subllm bench: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_parse_bytes_units():
    assert parse_bytes("8GB") == 8 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
