"""`subllm bench train` / `subllm bench infer`: tiny pairs end to end through the CLI,
the kept-fraction warning, and flag errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from subllm.bench.pair import (
    OFF_KEEP_DECODE_WARNING,
    OFF_KEEP_WARNING,
    decode_at_keep,
    off_keep,
    segment_parents,
)
from subllm.cli import main
from subllm.model.config import ModelConfig

TINY = {"vocab_size": 300, "dim": 32, "n_layers": 5, "n_heads": 4, "ffn_dim": 64,
        "max_seq_len": 64}


@pytest.fixture
def pair(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the memory subprocesses: tiny tensors
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(TINY))
    b.write_text(yaml.safe_dump({**TINY, "structure": "T(T(T)T)T", "keep": 0.64}))
    return f"{a},{b}"


def _files(out):
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


@pytest.mark.slow
def test_bench_train_pair(pair, tmp_path, bench_cwd):
    # no --out, from a temporary current directory: ./bench-out/train, checkout untouched
    with bench_cwd(tmp_path / "cwd") as cwd:
        rc = main(["bench", "train", "--pair", pair, "--seq-lens", "48,24", "--steps", "2",
                   "--threads", "1", "--peak-tflops", "0.05"])
    assert rc == 0
    out = cwd / "bench-out" / "train"
    assert [p.name for p in cwd.iterdir()] == ["bench-out"]
    assert _files(out) == {"train.json", "train.md", "train_ratios.png"}
    assert (out / "train_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "train.json").read_text())
    assert r["machine"]["cpu"] and r["machine"]["torch"] and r["machine"]["threads"] == 1
    assert r["command"] and r["a"]["structure"] == "TTTTT" and "(" in r["b"]["structure"]
    assert [c["seq_len"] for c in r["cases"]] == [24, 48]
    for c in r["cases"]:
        for key in ("a", "b"):
            m = c[key]
            assert len(m["step_times_s"]) == 2 and all(t > 0 for t in m["step_times_s"])
            assert m["time_per_step_s"] == pytest.approx(sorted(m["step_times_s"])[0] / 2
                                                         + sorted(m["step_times_s"])[1] / 2)
            assert m["tokens_per_s"] == pytest.approx(c["seq_len"] / m["time_per_step_s"])
            assert 0 < m["mfu"] < 1
            assert m["memory"]["ok"], m["memory"]
            assert m["memory"]["peak_mem_bytes"] >= m["memory"]["baseline_mem_bytes"] > 0
        assert c["ratios"]["time_per_step"] == pytest.approx(
            c["b"]["time_per_step_s"] / c["a"]["time_per_step_s"])
        a_t, b_t = c["a"]["step_times_s"], c["b"]["step_times_s"]
        rounds = sorted(b / a for a, b in zip(a_t, b_t, strict=True))
        assert c["ratios"]["time_per_step_paired"] == pytest.approx(sum(rounds) / 2)
        assert c["ratios"]["peak_mem"] == pytest.approx(
            c["b"]["memory"]["peak_mem_bytes"] / c["a"]["memory"]["peak_mem_bytes"])
    table = (out / "train.md").read_text()
    assert "| 48 |" in table and "MFU" in table


def test_bench_infer_pair(pair, tmp_path, bench_cwd):
    # --calibrate-shift is for threshold rules (a rank ignores a shift of every score)
    a, b = pair.split(",")
    Path(b).write_text(yaml.safe_dump({**yaml.safe_load(Path(b).read_text()),
                                       "threshold": "calibrated"}))
    # no --out, from a temporary current directory: ./bench-out/infer, checkout untouched
    with bench_cwd(tmp_path / "cwd") as cwd:
        rc = main(["bench", "infer", "--pair", pair, "--prompt-lens", "48", "--new-tokens", "5",
                   "--batch-sizes", "2,1", "--calibrate-steps", "3", "--calibrate-seq-len",
                   "16", "--calibrate-shift", "--repeats", "2", "--threads", "1",
                   "--skip-memory"])
    assert rc == 0
    out = cwd / "bench-out" / "infer"
    assert [p.name for p in cwd.iterdir()] == ["bench-out"]
    assert _files(out) == {"infer.json", "infer.md", "infer_ratios.png"}
    r = json.loads((out / "infer.json").read_text())
    assert r["keep_ratios"] == [0.64, 0.64] and r["b"]["state"].startswith("calibrated")
    cal = r["calibration"]
    assert cal["steps"] == 3 and len(cal["final_eval_kept_fractions"]) == 2
    assert [(c["prompt_len"], c["batch_size"]) for c in r["cases"]] == [(48, 1), (48, 2)]
    for c in r["cases"]:
        for key in ("a", "b"):
            m = c[key]
            assert len(m["prefill_times_s"]) == 2 and m["prefill_s"] > 0
            assert len(m["decode_times_s"]) == 4 and m["decode_per_token_s"] > 0
            assert m["kv_bytes"] > m["prompt_kv_bytes"] > 0
        # a LLaMA caches every token in every block: 5 blocks x (K + V) x 32 dims x fp32
        assert c["a"]["kv_bytes"] == c["batch_size"] * 52 * 5 * 2 * 32 * 4
        assert c["b"]["kv_bytes"] <= c["a"]["kv_bytes"]
        assert c["ratios"]["decode_per_token"] == pytest.approx(
            c["b"]["decode_per_token_s"] / c["a"]["decode_per_token_s"])
        assert c["ratios"]["kv_bytes"] == pytest.approx(c["b"]["kv_bytes"] / c["a"]["kv_bytes"])
        assert c["ratios"]["peak_mem"] is None and "memory" not in c["a"]  # --skip-memory
        a_t, b_t = c["a"]["decode_times_s"], c["b"]["decode_times_s"]
        rounds = sorted(b / a for a, b in zip(a_t, b_t, strict=True))
        assert c["ratios"]["decode_paired"] == pytest.approx((rounds[1] + rounds[2]) / 2)
        # --calibrate-shift put the kept fractions on the prompts onto the keep ratios
        fr = c["kept_fractions"]
        assert len(fr) == 2 and all(abs(f - 0.64) <= 0.05 for f in fr), fr
        assert [s["segment"] for s in c["score_shifts"]] == [0, 1]
        at_keep = c["ratios"]["decode_at_keep"]
        assert at_keep is None if c["batch_size"] > 1 else at_keep is None or at_keep > 0
        assert all(0.0 <= f <= 1.0 for f in c["b"]["decode_kept_fractions"])
        assert c["a"]["prompt_kept_fractions"] == []
        assert OFF_KEEP_WARNING not in c["warnings"]
        # four greedy tokens: their kept fractions are whatever they are, but flagged if off
        off = off_keep(c["b"]["decode_kept_fractions"], [0.64, 0.64])
        assert (OFF_KEEP_DECODE_WARNING in c["warnings"]) == bool(off)
    table = (out / "infer.md").read_text()
    assert "| 48 | 1 |" in table and f"WARNING: {OFF_KEEP_WARNING}" not in table


@pytest.mark.slow
def test_bench_infer_random_b_says_its_fractions_are_off(pair, tmp_path, capsys):
    """A random-init SUBLLM under the paper's rule (score > 0) keeps about half its tokens,
    not 0.64: the output says so. (The default banded rank rule keeps 0.64 +- 0.02 plus a
    token per row on any weights, so it would not be off.)"""
    a, b = pair.split(",")
    zero = Path(b).with_name("b-zero.yaml")
    zero.write_text(yaml.safe_dump({**yaml.safe_load(Path(b).read_text()), "threshold": "zero"}))
    out = tmp_path / "infer"
    rc = main(["bench", "infer", "--pair", f"{a},{zero}", "--prompt-lens", "64",
               "--new-tokens", "3", "--batch-sizes", "4", "--calibrate-steps", "0",
               "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "infer.json").read_text())
    (c,) = r["cases"]
    assert r["b"]["state"] == "random init" and r["calibration"] is None
    assert r["prompt_source"] == "random tokens"
    assert off_keep(c["kept_fractions"], [0.64, 0.64]) and OFF_KEEP_WARNING in r["warnings"]
    assert f"WARNING: {OFF_KEEP_WARNING}" in (out / "infer.md").read_text()
    assert OFF_KEEP_WARNING.upper() in capsys.readouterr().out
    for key in ("a", "b"):  # the memory subprocesses ran
        m = c[key]["memory"]
        assert m["ok"] and m["peak_mem_bytes"] >= m["baseline_mem_bytes"] > 0, m
    assert c["ratios"]["peak_mem"] == pytest.approx(
        c["b"]["memory"]["peak_mem_bytes"] / c["a"]["memory"]["peak_mem_bytes"])


def test_decode_at_keep_weights_each_path_by_its_probability():
    config = ModelConfig(vocab_size=64, dim=16, n_layers=5, n_heads=2, ffn_dim=32,
                         structure="T(T(T)T)(T)", keep=[0.64, 0.5])
    parents = segment_parents(config)
    assert parents == [None, 0, None]
    keeps = [config.segment_keep(s) for s in config.segments]
    assert keeps == [0.64, 0.5, 0.64]
    # time = 1 + 2 * (segments that kept the token), two samples per path, second one slower
    steps, times = [], []
    for k0 in (0, 1):
        for k1 in ((0, 1) if k0 else (0,)):
            for k2 in (0, 1):
                for extra in (0.0, 0.5):
                    steps.append([k0, k1, k2])
                    times.append(1 + 2 * (k0 + k1 + k2) + extra)
    expected = 0.0
    for k0, p0 in ((0, 0.36), (1, 0.64)):
        for k1, p1 in (((0, 0.5), (1, 0.5)) if k0 else ((0, 1.0),)):
            for k2, p2 in ((0, 0.36), (1, 0.64)):
                expected += p0 * p1 * p2 * (1 + 2 * (k0 + k1 + k2) + 0.25)  # median of 2
    assert decode_at_keep(times, steps, keeps, parents) == pytest.approx(expected)
    # a path of non-zero probability never seen: no estimate
    seen = [i for i, k in enumerate(steps) if k != [1, 1, 1]]
    assert decode_at_keep([times[i] for i in seen], [steps[i] for i in seen], keeps,
                          parents) is None


def test_off_keep_flags_only_fractions_beyond_the_tolerance():
    assert off_keep([0.64, 0.60], [0.64, 0.64]) == []
    assert off_keep([0.5, 0.66], [0.64, 0.64]) == [0]
    assert off_keep([0.64, 0.70], [0.64, 0.64]) == [1]


@pytest.mark.parametrize(
    "verb, flags, message",
    [("train", ["--seq-lens", ""], "--seq-lens"),
     ("train", ["--seq-lens", "1024,-5"], "--seq-lens"),
     ("train", ["--seq-lens", "a,b"], "--seq-lens"),
     ("train", ["--pair", "llama-small"], "--pair"),
     ("train", ["--pair", "llama-small,"], "--pair"),
     ("train", ["--pair", "llama-small,subllm-hugeee"], "unknown preset"),
     ("train", ["--steps", "0"], "--steps"),
     ("train", ["--batch-size", "-1"], "--batch-size"),
     ("infer", ["--prompt-lens", "0"], "--prompt-lens"),
     ("infer", ["--batch-sizes", "1,-4"], "--batch-sizes"),
     ("infer", ["--new-tokens", "1"], "--new-tokens"),
     ("infer", ["--calibrate-steps", "-3"], "--calibrate-steps"),
     ("infer", ["--pair", "llama-small;subllm-small"], "--pair"),
     ("infer", ["--checkpoint-b", "/nonexistent/run"], "does not exist")],
)
def test_bad_flags_are_one_line_errors(verb, flags, message, tmp_path, capsys):
    rc = main(["bench", verb, *flags, "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("subllm bench: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing is built or written before the checks


def test_bench_train_compile_needs_a_warmup_step(capsys, tmp_path):
    argv = ["bench", "train", "--pair", "llama-tiny,llama-tiny", "--compile", "b",
            "--warmup", "0", "--seq-lens", "32", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--compile needs --warmup >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
