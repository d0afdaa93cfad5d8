"""Helpers for tests that start process trees (torchrun and its ranks); importable from any
test module (pytest puts this folder on sys.path for tests/conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_bounded(cmd: list[str], environ: dict[str, str], timeout: float
                ) -> subprocess.CompletedProcess:
    """Run `cmd` (torchrun and its ranks) in a session of its own. Past `timeout` every
    process of it prints its threads' stacks (`subllm` dumps them on SIGUSR1) and is then
    killed, so a hang fails with the place it hung, and no rank outlives the test."""
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        stray = set(_session_pids(proc.pid)) | set(_descendants(proc.pid))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in stray:  # a rank in a process group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:  # bounded: a process that escaped would hold the pipes open for ever
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{' '.join(cmd[:8])} ... timed out, and a process it started still "
                        "holds its output open after SIGKILL")
        pytest.fail(f"{' '.join(cmd[:8])} ... still running after {timeout:g} s; the stacks "
                    f"of its processes:\n{err[-20000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (a rank may run in a session of its own), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # field 4: ppid
            children.setdefault(parent, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _session_pids(sid: int) -> list[int]:
    """The processes of session `sid` but its leader (torchrun's ranks), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and int(stat.parent.name) != sid:  # field 6: session
                pids.append(int(stat.parent.name))
    return pids


# Running the real CLI in a subprocess, and what a clean refusal looks like. ---------------
SRC = Path(__file__).resolve().parents[1] / "src"
BAR = re.compile(r"^\w+:\s+\d+%\|")  # a tqdm progress bar ("train:  50%|...")

def cli(*argv: str, cwd: Path | None = None, inject: str | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    path = [str(SRC), os.environ.get("PYTHONPATH", "")]
    if inject is not None:
        site = Path(cwd or os.getcwd()) / f"inject-{abs(hash(inject))}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(inject)
        path.insert(0, str(site))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "subllm", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def one_line(r: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run failed with `code`, no traceback, and said what went wrong in one line, its
    last on stderr (status lines such as "resuming from ..." may come before it), holding
    every fragment."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not BAR.match(ln)]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file and the name of every directory under the roots."""
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out
