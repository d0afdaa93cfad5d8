"""`subllm bench overhead`: ops, host time and syncs per step of a tiny pair, written as
JSON, Markdown and PNG; the op count checked against a count of its own; bad flags."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from subllm.bench import common
from subllm.bench.overhead import render_markdown, shrink
from subllm.cli import main
from subllm.model import SubLLM
from subllm.model.config import ModelConfig
from subllm.train.loop import train_step

RUN = ["bench", "overhead", "--pair", "llama-tiny,subllm-tiny", "--seq-len", "64",
       "--prompt-len", "16", "--batch-sizes", "1,4", "--steps", "1", "--warmup", "1"]


class CountAll(TorchDispatchMode):
    """Every aten operator dispatched while active, written apart from the benchmark's."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def train_step_ops(config: dict, seq_len: int, done: int) -> int:
    """Ops of a training step of a model of `config` after `done` steps (AdamW's state
    exists from the second step on), counted here."""
    model = SubLLM(ModelConfig.from_dict(config)).train()
    opt = common.adamw(model, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    cpu = torch.device("cpu")
    for _ in range(done):
        train_step(model, opt, [ids], device=cpu, grad_clip=None)
    with CountAll() as counter:
        train_step(model, opt, [ids], device=cpu, grad_clip=None)
    return counter.n


def test_bench_overhead_counts_and_times_each_part(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    assert main([*RUN, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"overhead.json", "overhead.md", "overhead.png"}
    assert (out / "overhead.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "overhead.json").read_text())
    assert report["size"] == "tiny" and report["device"] == "cpu"
    assert report["a"]["config"]["dim"] == 64 and report["b"]["config"]["n_layers"] == 12
    parts = report["parts"]
    assert [p["label"] for p in parts] == ["train L=64", "decode B=1", "decode B=4"]
    for part in parts:
        for key in ("a", "b"):
            m = part[key]
            assert m["host_ms"] > 0 and len(m["host_ms_runs"]) == len(m["ops_runs"]) == 1
            assert m["kernels"] is None and m["syncs"] is None and "step_ms" not in m
            assert sum(m["ops_by_phase"].values()) == m["ops"] == sum(m["op_counts"].values())
            assert 0 < m["view_ops"] < m["ops"]
        assert part["ratios"]["ops"] == pytest.approx(part["b"]["ops"] / part["a"]["ops"])
        assert part["ratios"]["kernels"] is None
    train = parts[0]
    # the subsamplers' scoring, top-k, gathers and scatter-add come on top of A's step
    assert train["b"]["ops"] > train["a"]["ops"]
    assert train["b"]["op_counts"].get("aten.gather", 0) > train["a"]["op_counts"].get(
        "aten.gather", 0)
    for phase in ("forward", "backward", "optimizer"):
        assert train["a"]["ops_by_phase"][phase] > 0
    # the step counted came after the warm-up and the timed step: two done before it
    assert train["a"]["ops"] == train_step_ops(report["a"]["config"], 64, done=2)
    markdown = (out / "overhead.md").read_text()
    assert "| train L=64 |" in markdown and "| decode B=4 |" in markdown
    assert "test_host_syncs.py" in markdown and "kernels" not in markdown.split("\n|")[1]
    assert "train L=64, batch 1: ops A" in capsys.readouterr().out
    assert "Kernels whose device time" not in markdown  # CUDA only

    # A CUDA run's profile: the kernels whose device time differs most come first
    train["a"]["kernel_times"] = {"gemm": [10, 5.0], "copy": [3, 0.5], "sort": [0, 0.0]}
    train["b"]["kernel_times"] = {"gemm": [10, 3.0], "copy": [3, 0.6], "sort": [4, 1.5]}
    rows = [ln for ln in render_markdown(report).splitlines() if ln.startswith("| train")]
    kernels = [ln for ln in rows if "`" in ln and "/" in ln]
    assert [ln.split("`")[1] for ln in kernels] == ["gemm", "sort", "copy"]
    assert "| 10 / 10 | 5.000 | 3.000 | -2.000 |" in kernels[0]


@pytest.mark.parametrize("flags, says", [
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--seq-len", "1"], "--seq-len"),
    (["--prompt-len", "1"], "--prompt-len"),
    (["--steps", "0"], "--steps"),
    (["--pair", "llama-tiny,no-such-preset"], "no-such-preset"),
    (["--pair", "llama-tiny"], "--pair"),
])
def test_bench_overhead_refuses_bad_flags_in_one_line(tmp_path, capsys, flags, says) -> None:
    out = tmp_path / "o"
    assert main([*RUN, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not out.exists()


def test_tiny_keeps_layers_structure_and_routing() -> None:
    big = ModelConfig.preset("subllm-1.3b")
    tiny = shrink(dataclasses.replace(big, balancer="paper", threshold="calibrated"))
    assert (tiny.dim, tiny.n_heads, tiny.n_kv_heads, tiny.ffn_dim, tiny.vocab_size) == (
        64, 4, 4, 128, 1024)
    assert (tiny.n_layers, tiny.structure, tiny.keep) == (big.n_layers, big.structure, big.keep)
    assert (tiny.balancer, tiny.threshold) == ("paper", "calibrated")
    grouped = shrink(dataclasses.replace(big, n_kv_heads=4, head_dim=256))
    assert grouped.n_kv_heads == 2 and grouped.resolved_head_dim == 16
