"""`subllm bench serve`: a tiny pair behind real `subllm serve` subprocesses end to end
through the CLI (every field, the token count, the servers gone), its tokenizer, and a
bad flag."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from subllm.bench.serve import percentile, write_token_tokenizer
from subllm.cli import main

TINY = {"vocab_size": 300, "dim": 32, "n_layers": 5, "n_heads": 4, "ffn_dim": 64,
        "max_seq_len": 64}
CASE_FIELDS = {"ok", "pid", "start_s", "exit_code", "wall_s", "requests", "requests_per_s",
               "output_tokens", "expected_tokens", "text_chunks", "tokens_per_s",
               "early_stops", "finish_reasons", "ttft_p50_s", "ttft_p99_s",
               "token_latency_p50_s", "token_latency_p99_s", "speedup"}
REPORT_FIELDS = {"bench", "command", "machine", "device", "a", "b", "schedules", "concurrency",
                 "requests_per_client", "prompt_len", "max_tokens", "server_threads",
                 "omp_num_threads", "keep_ratios", "calibration", "warnings", "errors", "cases"}


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(TINY))
    b.write_text(yaml.safe_dump({**TINY, "structure": "T(T(T)T)T", "keep": 0.64}))
    return f"{a},{b}"


@pytest.mark.slow
def test_bench_serve_pair(pair, tmp_path, bench_cwd):
    # no --out, from a temporary current directory: ./bench-out/serve, checkout untouched
    with bench_cwd(tmp_path / "cwd") as cwd:
        rc = main(["bench", "serve", "--pair", pair, "--calibrate-steps", "2",
                   "--concurrency", "2,1", "--requests-per-client", "2", "--max-tokens", "8",
                   "--prompt-len", "16", "--threads", "1", "--case-timeout", "120"])
    assert rc == 0
    out = cwd / "bench-out" / "serve"
    assert {p.name for p in out.iterdir()} == {"serve.json", "serve.md", "serve.png"}
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "serve.json").read_text())
    assert REPORT_FIELDS <= set(r) and r["errors"] == []
    assert r["server_threads"] == 1 and r["omp_num_threads"] == "1"
    assert r["b"]["state"] == "calibrated" and r["calibration"]["steps"] == 2
    assert len(r["b"]["prompt_kept_fractions"]) == 2 and r["a"]["eot_id"] == 299
    assert [(c["schedule"], c["concurrency"]) for c in r["cases"]] == [
        ("continuous", 1), ("continuous", 2)]
    assert [c["order"] for c in r["cases"]] == [["a", "b"], ["b", "a"]]  # alternating
    for c in r["cases"]:
        for key in ("a", "b"):
            m = c[key]
            assert CASE_FIELDS <= set(m), CASE_FIELDS - set(m)
            assert m["ok"] and m["exit_code"] == 0, m
            with pytest.raises(ProcessLookupError):  # the server is gone
                os.kill(m["pid"], 0)
            assert m["requests"] == 2 * c["concurrency"] and m["expected_tokens"] == 8 * m[
                "requests"]
            if m["early_stops"] == 0:  # every request streamed its 8 tokens, one chunk each
                assert m["output_tokens"] == m["text_chunks"] == m["expected_tokens"]
                assert m["finish_reasons"] == ["length"]
            else:
                assert m["output_tokens"] < m["expected_tokens"]
            assert m["tokens_per_s"] == pytest.approx(m["output_tokens"] / m["wall_s"])
            assert 0 < m["ttft_p50_s"] <= m["ttft_p99_s"]
            assert 0 < m["token_latency_p50_s"] <= m["token_latency_p99_s"]
        assert c["ratios"]["tokens_per_s"] == pytest.approx(
            c["b"]["tokens_per_s"] / c["a"]["tokens_per_s"])
    first, second = r["cases"]
    assert first["a"]["speedup"] == first["b"]["speedup"] == 1.0
    assert second["a"]["speedup"] == pytest.approx(
        second["a"]["tokens_per_s"] / first["a"]["tokens_per_s"])
    table = (out / "serve.md").read_text()
    assert "| continuous | 1 |" in table and "| continuous | 2 |" in table


def test_bench_serve_bad_concurrency_is_a_one_line_error(capsys):
    assert main(["bench", "serve", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--concurrency" in err, err


def test_token_tokenizer_streams_one_word_per_id(tmp_path):
    from tokenizers import Tokenizer

    assert write_token_tokenizer(300, tmp_path / "tokenizer.json") == 299
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|endoftext|>") == 299
    assert tok.decode([7, 0, 298]) == "t7 t0 t298" and tok.decode([5, 299]) == "t5"


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
