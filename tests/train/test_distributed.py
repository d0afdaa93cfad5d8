"""Data-parallel runs never hang: small validation splits, a rank that fails, a rank that
hangs (gloo on CPU, 2-4 processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from procs import run_bounded

from subllm import ModelConfig, SubLLM
from subllm.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"  # <repo>/tests/<package>/this file
TINY = {
    "preset": "subllm-tiny",
    "model": {"dim": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 6,
              "structure": "T(T(TT)T)T", "max_seq_len": 64},
    "seq-len": 32, "batch-size": 4, "warmup": 1, "max-steps": 4, "lr": 3e-3, "log-every": 1,
    "eval-batches": 20, "eval-every": 2, "save-every": 0, "device": "cpu",
}


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([*extra.pop("PREPEND", "").split(os.pathsep), str(SRC),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.strip(os.pathsep), "OMP_NUM_THREADS": "1",
            **extra}


@pytest.fixture(scope="module")
def small_val(tmp_path_factory, write_corpus) -> Path:
    """A corpus whose validation split holds 2 windows of 32 tokens: fewer than 3 or 4
    ranks, and a number neither divides."""
    root = tmp_path_factory.mktemp("small-val")
    write_corpus(root / "corpus", 40, lines=4)  # one validation document of ~85 tokens
    assert main(["prepare", "--input", str(root / "corpus"), "--out", str(root / "data"),
                 "--vocab-size", "300", "--val-fraction", "0.02"]) == 0
    meta = json.loads((root / "data" / "meta.json").read_text())
    assert 2 * 32 <= meta["tokens"]["val"] < 3 * 32, meta["tokens"]
    (root / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "data": str(root / "data")}))
    return root


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("engine, ranks", [("ddp", 3), ("ddp", 4), ("fsdp", 3), ("fsdp", 4)])
def test_small_validation_finishes_and_equals_one_process(small_val: Path, engine: str,
                                                          ranks: int, capsys) -> None:
    run = small_val / f"{engine}-{ranks}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), "-m", "subllm", "train", "--config", str(small_val / "tiny.yaml"),
           "--out", str(run), "--distributed", engine, "--batch-size", "1",
           "--dist-timeout", "60"]
    proc = run_bounded(cmd, env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = val_losses(run)
    assert sorted(logged) == [2, 4]
    # the same windows in one process, on the run's final weights
    assert main(["eval", "--checkpoint", str(run), "--batches", "20", "--batch-size", "1",
                 "--seq-len", "32", "--device", "cpu", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["step"] == 4 and single["tokens"] == 2 * 31
    assert abs(single["val_loss"] - logged[4]) < 1e-6


def test_an_empty_segment_runs_its_blocks_when_sharded_with_the_same_result() -> None:
    """Under FSDP every rank must call every block; a segment nobody kept a token of then
    runs on one unused slot per row instead of being skipped, with identical outputs."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=6, n_heads=2, ffn_dim=64,
                      structure="T(T(TT)T)T", max_seq_len=64, threshold="zero")
    model = SubLLM(cfg).eval()
    with torch.no_grad():  # score 0 everywhere, kept iff > 0: nothing kept
        model.subsamplers[0].score.weight.zero_()
    called: set[int] = set()
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda *_, i=i: called.add(i))
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        skipped = model(x, labels=x)
        assert called == {0, 5}
        called.clear()
        model.skip_empty_segments = False
        ran = model(x, labels=x)
    assert called == set(range(6))
    assert torch.equal(skipped.logits, ran.logits) and torch.equal(skipped.loss, ran.loss)
    assert all(int(k.sum()) == 0 for k in ran.kept)


# A rank that fails or hangs at step 3, injected from outside the product: a sitecustomize
# module on the worker's PYTHONPATH wraps train_step on rank 1 only.
INJECT = """
import os
if os.environ.get("RANK") == "1":
    import subllm.train.loop as loop
    original = loop.train_step
    calls = []
    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            if os.environ["INJECT"] == "raise":
                raise RuntimeError("injected failure on rank 1")
            import time
            time.sleep(3600)
        return original(*args, **kwargs)
    loop.train_step = flaky
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_rank_that_fails_or_hangs_stops_the_others_with_a_message(small_val: Path,
                                                                    tmp_path: Path,
                                                                    how: str) -> None:
    """Ranks started as plain processes (no torchrun agent to tear them down): rank 0 must
    end on its own, non-zero, with one line naming the phase and the step."""
    (tmp_path / "sitecustomize.py").write_text(INJECT)
    port = str(free_port())
    procs = []
    t0 = time.monotonic()
    for rank in (0, 1):
        e = env(PREPEND=str(tmp_path), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, INJECT=how)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "subllm", "train", "--config", str(small_val / "tiny.yaml"),
             "--out", str(tmp_path / "run"), "--batch-size", "1", "--eval-every", "0",
             "--dist-timeout", "8"], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    try:
        _, err0 = procs[0].communicate(timeout=120)
    finally:
        if how == "hang":
            procs[1].kill()
        _, err1 = procs[1].communicate(timeout=60)
    assert time.monotonic() - t0 < 120
    assert procs[0].returncode == 2 and procs[1].returncode != 0
    last = err0.strip().splitlines()[-1]
    assert "Traceback" not in err0, err0[-2000:]
    assert last.startswith("subllm train: error: rank 0 of 2 stopped in "), last
    assert "at step 2" in last or "at step 3" in last, last
    if how == "raise":
        assert "injected failure on rank 1" in err1


@pytest.mark.slow
def test_a_run_directory_rank_0_cannot_lock_stops_every_rank_at_once(small_val: Path,
                                                                       tmp_path: Path) -> None:
    """Rank 0 alone locks the run directory; when it cannot (another training holds it),
    rank 1 must not wait out the dist-timeout in its first collective."""
    from subllm.atomic import dir_lock

    run = tmp_path / "run"
    run.mkdir()
    port = str(free_port())
    with dir_lock(run, "training process"):
        t0 = time.monotonic()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "subllm", "train", "--config", str(small_val / "tiny.yaml"),
             "--out", str(run), "--dist-timeout", "300"],
            env=env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        errs = [p.communicate(timeout=200)[1] for p in procs]
        took = time.monotonic() - t0
    assert took < 100, took  # far below the 300 s timeout
    assert [p.returncode for p in procs] == [2, 2]
    assert "Traceback" not in errs[0] + errs[1], errs
    assert errs[0].strip().splitlines()[-1].endswith(
        f"is in use by another training process (pid {os.getpid()}); wait for it or choose "
        "another --out")
    assert errs[1].strip().splitlines() == [
        "subllm train: error: rank 0 of 2 failed while opening the run directory (its message "
        "is above); rank 1 stops too"]
    assert list(run.iterdir()) == []  # as it was (our lock file went with our lock)
