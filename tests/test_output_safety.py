"""Verbs that write a directory never destroy their inputs, and leave no staging behind.

Each bad case runs the real CLI in a fresh process and checks: exit code 2, one stderr line
without a traceback, and every file of every input byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from subllm.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = {
    "preset": "subllm-tiny",
    "model": {"dim": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 4, "structure": "T(TT)T",
              "max_seq_len": 64},
    "seq-len": 32, "batch-size": 2, "warmup": 1, "max-steps": 2, "log-every": 1,
    "eval-batches": 1, "eval-every": 0, "save-every": 0, "device": "cpu",
}


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (and of the roots themselves if files)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "subllm", *argv], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepare_corpus) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    data = prepare_corpus(root, 12)
    (root / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "data": str(data)}))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out",
                 str(root / "run")]) == 0
    return root / "run"


def one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("out_of, how", [
    (lambda run, ck: run, "is the input"),                     # --out RUN
    (lambda run, ck: run / "checkpoints", "lies inside"),     # --out RUN/checkpoints
    (lambda run, ck: ck, "lies inside"),                       # --out the newest checkpoint
    (lambda run, ck: run.parent, "contains"),                  # --out a folder holding RUN
])
def test_export_refuses_an_output_overlapping_its_run(run: Path, out_of, how) -> None:
    ck = sorted((run / "checkpoints").glob("step-*"))[-1]
    before = snapshot(run)
    result = cli("export", "--checkpoint", str(run), "--out", str(out_of(run, ck)), "--force")
    one_line_error(result, how)
    assert snapshot(run) == before


@pytest.mark.slow
def test_convert_refuses_an_output_overlapping_its_inputs(tmp_path: Path) -> None:
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    official = tmp_path / "release"
    official.mkdir()
    (official / "ckpt.pt").write_bytes(b"weights")
    (official / "config.json").write_text("{}")
    before = snapshot(src, official)
    one_line_error(cli("convert", "--from-hf", str(src), "--out", str(src), "--force"),
                   "is the input")
    one_line_error(cli("convert", "--from-hf", str(src), "--out", str(tmp_path), "--force"),
                   "contains the input")
    one_line_error(cli("convert", "--from-official", str(official / "ckpt.pt"),
                       "--official-config", str(official / "config.json"), "--out",
                       str(official), "--force"), "contains the input")
    assert snapshot(src, official) == before


def test_export_removes_stale_staging_and_fills_an_empty_directory(run: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()  # an existing empty directory is a fine target without --force
    dead = tmp_path / ".hf.tmp-999999999-abcd"  # left by a killed export (no such pid)
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".hf.tmp-{os.getpid()}-live"  # a running export's: kept
    alive.mkdir()
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "hf.py").is_file()
    assert not dead.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "hf"]


def test_no_space_while_exporting_keeps_the_previous_export(run: Path, tmp_path: Path,
                                                            monkeypatch, capsys) -> None:
    import errno

    import subllm.interop.export as export

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()

    def full_disk(directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "hf.py"))

    monkeypatch.setattr(export, "write_code", full_disk)
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert snapshot(out) == before  # the previous export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging left


def test_a_zombie_does_not_hold_a_lock() -> None:
    """A killed rank whose parent died too stays a zombie until init reaps it (some
    container inits never do): its pid must not count as a live lock holder."""
    import time

    from subllm.atomic import _alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped until wait()
    try:
        stat = Path(f"/proc/{proc.pid}/stat")
        if not stat.exists():
            pytest.skip("no /proc on this system")
        deadline = time.monotonic() + 30
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not _alive(proc.pid)
    finally:
        proc.wait()
    assert _alive(os.getpid())


LOCK_THEN_FORK = """
import os, sys, time
from pathlib import Path
from subllm.atomic import dir_lock
with dir_lock(Path(sys.argv[1]), "training process"):
    if os.fork() == 0:  # the child inherits the locked descriptor and outlives its parent
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # (and lets go of the test's output pipes)
        os.dup2(null, 2)
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print("locked", flush=True)
    os._exit(0)  # dies holding the lock: no release, the lock file keeps its pid
"""


def test_a_lock_whose_holder_died_is_taken_once_released(tmp_path: Path) -> None:
    """A killed holder releases its lock only when everything sharing the descriptor has
    exited (its other threads, a forked child): the next run waits for that instead of
    refusing at once; a live holder is refused at once (tests/train/test_reliability.py)."""
    import time

    from subllm.atomic import dir_lock

    holder = subprocess.run([sys.executable, "-c", LOCK_THEN_FORK, str(tmp_path), "1.5"],
                            capture_output=True, text=True, timeout=60)
    assert holder.stdout.strip() == "locked", holder.stderr
    assert (tmp_path / ".lock").read_text().strip().isdigit()  # the dead parent's pid
    start = time.monotonic()
    with dir_lock(tmp_path, "training process"):
        waited = time.monotonic() - start
    assert 0.3 < waited < 15, waited  # it waited for the child, and no longer
