"""`subllm bench train` / `subllm bench infer`: tiny pairs end to end through the CLI,
the kept-fraction warning, and flag errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from subllm.bench import common
from subllm.bench.pair import (
    OFF_KEEP_DECODE_WARNING,
    OFF_KEEP_WARNING,
    backing_off,
    batch_label,
    decode_at_keep,
    memory_budget,
    off_keep,
    parse_batch_sizes,
    render_train_markdown,
    segment_parents,
)
from subllm.cli import main
from subllm.model.config import ModelConfig
from subllm.planner import estimate_memory, largest_batch, resident_bytes

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
     ("train", ["--batch-sizes", "0"], "--batch-sizes"),
     ("train", ["--batch-sizes", "x"], "--batch-sizes"),
     ("train", ["--batch-sizes", "1,max,-2"], "--batch-sizes"),
     ("train", ["--batch-size", "2", "--batch-sizes", "1,max"], "give one of the two"),
     ("train", ["--memory-budget", "8GB"], "add max to --batch-sizes"),
     ("train", ["--batch-sizes", "max", "--memory-budget", "lots"], "--memory-budget"),
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


# ---- bench train --batch-sizes ------------------------------------------------------

MiB = 2**20


def test_bench_train_batch_sizes_max_is_the_planners_largest_batch(tmp_path, capsys):
    """`--batch-sizes 1,max`: a case per (length, batch size); max is the largest batch at
    which both models' steps fit the memory budget by the planner, each model's peak beside
    the other's weights and AdamW state."""
    out = tmp_path / "train"
    rc = main(["bench", "train", "--pair", "llama-tiny,subllm-tiny", "--seq-lens", "32",
               "--batch-sizes", "1,max", "--memory-budget", "256MB", "--steps", "1",
               "--warmup", "0", "--skip-memory", "--threads", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "train.json").read_text())
    assert r["batch_sizes"] == [1, "max"] and r["memory_budget_bytes"] == 256 * MiB
    assert r["partial"] is False
    configs = [common.load_config(m, 32) for m in ("llama-tiny", "subllm-tiny")]
    planned = largest_batch(configs, 32, 256 * MiB, dtype="fp32", device="cpu")["batch_size"]
    assert planned > 1
    one, most = r["cases"]
    assert (one["seq_len"], one["batch_size"], one["asked"], one["batch_source"]) == (
        32, 1, [1], "asked")
    assert (most["seq_len"], most["batch_size"], most["asked"], most["batch_source"]) == (
        32, planned, ["max"], "planner")
    assert most["planner"]["fits"] and most["planner"]["need_bytes"] <= 256 * MiB
    assert "backed_off_from" not in most  # only a GPU backs off
    for c in r["cases"]:  # tokens/s per case, at its own batch size
        for key in ("a", "b"):
            assert c[key]["tokens_per_s"] == pytest.approx(
                c["batch_size"] * 32 / c[key]["time_per_step_s"])
    table = (out / "train.md").read_text()
    assert "| seq len | batch |" in table and f"| 32 | {planned} (max) |" in table
    assert "| 32 | 1 |" in table
    assert (out / "train_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train_max_equal_to_an_asked_batch_is_measured_once(tmp_path, capsys):
    """Not even batch 1 predicted to fit: max = 1 (with a note), the batch-1 case already
    measured stands for both."""
    out = tmp_path / "train"
    assert main(["bench", "train", "--pair", "llama-tiny,subllm-tiny", "--seq-lens", "32",
                 "--batch-sizes", "max,1", "--memory-budget", "1MB", "--steps", "1",
                 "--warmup", "0", "--skip-memory", "--threads", "1", "--out", str(out)]) == 0
    assert "not even batch 1 is predicted to fit" in capsys.readouterr().out
    (case,) = json.loads((out / "train.json").read_text())["cases"]
    assert case["batch_size"] == 1 and case["asked"] == [1, "max"]
    assert case["batch_source"] == "planner" and case["planner"]["fits"] is False
    assert "| 32 | 1 (1 and max) |" in (out / "train.md").read_text()


@pytest.mark.parametrize("settings", [
    {"dtype": "fp32", "device": "cpu"},
    {"dtype": "bf16", "precision": "mixed", "device": "cuda"},
    {"dtype": "bf16", "precision": "mixed", "device": "cuda", "mst": True},
])
@pytest.mark.parametrize("budget_mib", [200, 1000, 5000])
def test_largest_batch_fits_and_one_more_does_not(settings, budget_mib):
    budget = budget_mib * MiB
    models = [ModelConfig.preset("llama-tiny"), ModelConfig.preset("subllm-tiny")]
    resident = [resident_bytes(estimate_memory(m, 256, 1, **settings)) for m in models]

    def need(batch):  # each model's peak, the other's weights and optimizer state beside it
        return max(estimate_memory(m, 256, batch, **settings)["peak_bytes"] + sum(resident) - r
                   for m, r in zip(models, resident, strict=True))

    found = largest_batch(models, 256, budget, **settings)
    batch = found["batch_size"]
    assert not found["capped"]
    assert batch >= 1 and need(batch) <= budget < need(batch + 1)
    assert found["need_bytes"] == need(batch)
    # one model alone: its own estimate
    alone = largest_batch(models[:1], 256, budget, **settings)["batch_size"]
    assert alone >= batch
    assert (estimate_memory(models[0], 256, alone, **settings)["peak_bytes"] <= budget
            < estimate_memory(models[0], 256, alone + 1, **settings)["peak_bytes"])


def test_largest_batch_nothing_fits_and_the_cap():
    tiny = ModelConfig.preset("llama-tiny")
    none = largest_batch([tiny], 256, 1 * MiB, device="cpu")
    assert none["batch_size"] == 0 and not none["capped"]
    assert none["need_bytes"] == estimate_memory(tiny, 256, 1, device="cpu")["peak_bytes"]
    capped = largest_batch([tiny], 256, 2**50, max_batch=12, device="cpu")
    assert capped["batch_size"] == 12 and capped["capped"]


def test_parse_batch_sizes():
    assert parse_batch_sizes("4,max, 1,4") == [1, 4, "max"]
    assert parse_batch_sizes("max") == ["max"]
    assert parse_batch_sizes("2") == [2]


def test_memory_budget_default_and_asked(monkeypatch):
    monkeypatch.setattr(common, "mem_available", lambda: 123 * MiB)
    assert memory_budget("cpu", None) == (123 * MiB, "90 % of the CPU's available memory")
    assert memory_budget("cpu", "1GB") == (2**30, "--memory-budget")


def test_backing_off_retries_at_three_quarters_down_to_one():
    import torch

    tried, freed = [], []

    def run(batch):
        tried.append(batch)
        if batch > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return f"times at {batch}"

    assert backing_off(run, 16, lambda: freed.append(1)) == (4, "times at 4")
    assert tried == [16, 12, 9, 6, 4] and len(freed) == 4
    with pytest.raises(torch.cuda.OutOfMemoryError):  # batch 1 does not fit either
        backing_off(lambda b: run(b + 10), 2, lambda: None)
    assert backing_off(run, 3, lambda: None) == (3, "times at 3")  # fits: no retry


def test_batch_labels_and_a_report_from_before_batch_sizes():
    assert batch_label({"batch_size": 4, "asked": [4]}) == "4"
    assert batch_label({"batch_size": 3, "asked": ["max"]}) == "3 (max)"
    assert batch_label({"batch_size": 1, "asked": [1, "max"]}) == "1 (1 and max)"
    assert batch_label({"batch_size": 3, "asked": ["max"], "backed_off_from": 4}) == (
        "3 (max, backed off from 4)")
    assert batch_label({"batch_size": 2}) == "2"  # no `asked`: an older report
    old = {"bench": "train", "command": "subllm bench train", "device": "cpu", "dtype": "fp32",
           "machine": {"cpu": "x", "cpu_count": 2, "torch": "2", "transformers": "5"},
           "a": {"spec": "A"}, "b": {"spec": "B"}, "batch_size": 1, "steps": 2, "warmup": 1,
           "mst": False, "checkpointing": False, "cases": [
               {"seq_len": 64, "batch_size": 1, "a": {}, "b": {}, "ratios": {}}]}
    text = render_train_markdown(old)
    assert "Batch 1." in text and "| 64 | 1 |" in text


def test_a_planned_batch_out_of_gpu_memory_backs_off_and_an_asked_one_is_an_error(
        monkeypatch):
    """On a GPU (simulated: the steps run out of memory above batch 4), the planner's batch
    retries at 3/4 of itself and the case records it; a batch asked for is a one-line
    error."""
    import argparse
    from types import SimpleNamespace

    import torch

    from subllm.bench import pair as bench_pair
    from subllm.errors import SubLLMError

    def fake_steps(pair, seq_len, batch, args):
        if batch > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"a": [1.0], "b": [0.8]}

    monkeypatch.setattr(bench_pair, "_time_steps", fake_steps)
    monkeypatch.setattr(bench_pair, "_free_after_oom", lambda pair: None)
    config = ModelConfig.preset("llama-tiny")
    fake = SimpleNamespace(configs={"a": config, "b": config}, peak_tflops=None)
    args = argparse.Namespace(device="cuda")
    plan = {"batch_size": 8, "fits": True}
    case = bench_pair._train_case(fake, 64, 8, "max", plan, args)
    assert (case["batch_size"], case["backed_off_from"], case["batch_source"]) == (4, 8,
                                                                                 "planner")
    assert case["a"]["tokens_per_s"] == 4 * 64 / 1.0 and case["ratios"]["time_per_step"] == 0.8
    assert batch_label(case) == "4 (max, backed off from 8)"
    with pytest.raises(SubLLMError, match="out of GPU memory at L=64, batch 6"):
        bench_pair._train_case(fake, 64, 6, 6, None, args)
