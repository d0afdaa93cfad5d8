"""Helpers for tests that start process trees (torchrun and its ranks); importable from any
test module (pytest puts this folder on sys.path for tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... still running after {timeout:g} s; the stacks "
                    f"of its processes:\n{err[-20000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _session_pids(sid: int) -> list[int]:
    """The processes of session `sid` but its leader (torchrun's ranks), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and int(stat.parent.name) != sid:  # field 6: session
                pids.append(int(stat.parent.name))
    return pids
