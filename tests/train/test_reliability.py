"""Reliability of `subllm train`: one process per run directory, failed starts leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from subllm.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"

def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    prepare_corpus(root, 40, lines=40)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(root / "data")))
    return root


def train(work: Path, out: Path, *flags: str) -> int:
    return main(["train", "--config", str(work / "tiny.yaml"), "--out", str(out), *flags])


def error_line(capsys: pytest.CaptureFixture) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_locked_run_directory_refuses_a_second_training(work: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from subllm.atomic import dir_lock

    out = work / "locked"
    out.mkdir()
    with dir_lock(out, "training process"):
        before = sorted(p.name for p in out.iterdir())
        assert train(work, out, "--max-steps", "2") == 2
        line = error_line(capsys)
        assert f"in use by another training process (pid {os.getpid()})" in line
        assert sorted(p.name for p in out.iterdir()) == before  # no config.yaml, no metrics
    assert train(work, out, "--max-steps", "2") == 0  # released: it trains now


@pytest.mark.slow
def test_second_process_on_one_run_fails_and_touches_nothing(work: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture
                                                            ) -> None:
    out = tmp_path / "shared"
    first = subprocess.Popen(
        [sys.executable, "-m", "subllm", "train", "--config", str(work / "tiny.yaml"),
         "--out", str(out), "--max-steps", "600"], env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            lock = out / ".lock"
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        assert train(work, out, "--max-steps", "3", "--lr", "1e-2") == 2
        assert f"(pid {first.pid})" in error_line(capsys)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 600 and saved["lr"] == 3e-3
    steps = [yaml.safe_load(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in ln]
    assert steps == list(range(1, 601))


@pytest.mark.slow
def test_a_killed_training_does_not_block_resume(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "subllm", "train", "--config", str(work / "tiny.yaml"),
         "--out", str(out), "--max-steps", "100000", "--save-every", "2"], env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "checkpoints").glob("step-*")):
            assert proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the .lock file stays with its pid
        proc.wait()
    assert (out / ".lock").read_text().strip() == str(proc.pid)
    assert train(work, out, "--resume", "--max-steps", "4") == 0


@pytest.mark.parametrize("flags", [("--seq-len", "100000"),
                                   ("--config-vocab",)])
def test_a_failed_start_leaves_nothing_behind(work: Path, tmp_path: Path, flags: tuple,
                                              capsys: pytest.CaptureFixture,
                                              tiny_settings) -> None:
    if flags == ("--config-vocab",):  # a model vocabulary smaller than the data's
        cfg = tiny_settings(work / "data", model={"vocab_size": 8})
        (tmp_path / "small.yaml").write_text(yaml.safe_dump(cfg))
        argv = ["train", "--config", str(tmp_path / "small.yaml")]
    else:
        argv = ["train", "--config", str(work / "tiny.yaml"), *flags]
    new = tmp_path / "new" / "run"
    assert main([*argv, "--out", str(new)]) == 2
    error_line(capsys)
    assert not new.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(old)]) == 2
    assert not (old / "config.yaml").exists() and (old / "notes.txt").read_text() == "mine"
