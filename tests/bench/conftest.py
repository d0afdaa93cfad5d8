"""Benchmarks write to ./bench-out/<verb> and never into the checkout: `bench_cwd` runs a
test's benchmark from a temporary current directory and fails it if the checkout changed.

What is compared, before and after (others may edit the checkout while the suite runs, so
this is not `git status`): every file under docs/benchmarks (the committed results) by
path, size and modification time; the entries of the checkout's top folder (a new
bench-out/, gpu.json, ...); and the result-like files (JSON, Markdown, PNG, logs, weights)
anywhere else in the checkout outside .git, .venv and caches, by path, so that a benchmark
writing next to its own module or into tests/ shows up too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "benchmarks"
RESULT_SUFFIXES = {".json", ".jsonl", ".md", ".png", ".txt", ".csv", ".pt", ".safetensors",
                   ".bin", ".npy", ".log", ".svg", ".pdf"}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache",
             ".mypy_cache", "node_modules", "build", "dist"}


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            yield Path(folder) / name


def snapshot() -> dict[str, object]:
    """What a benchmark must not change in the checkout (see the module docstring)."""
    committed = {}
    for path in _walk(COMMITTED) if COMMITTED.is_dir() else ():
        st = path.stat()
        committed[str(path.relative_to(REPO))] = (st.st_size, st.st_mtime_ns)
    results = {str(p.relative_to(REPO)) for p in _walk(REPO)
               if p.suffix in RESULT_SUFFIXES and not p.is_relative_to(COMMITTED)}
    return {"docs/benchmarks": committed, "top folder": set(os.listdir(REPO)),
            "result files": results}


def changes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """One line per difference between two snapshots."""
    lines = []
    old, new = before["docs/benchmarks"], after["docs/benchmarks"]
    assert isinstance(old, dict) and isinstance(new, dict)
    lines += [f"changed {p}" for p in sorted(old) if p in new and new[p] != old[p]]
    lines += [f"removed {p}" for p in sorted(set(old) - set(new))]
    lines += [f"added {p}" for p in sorted(set(new) - set(old))]
    for key in ("top folder", "result files"):
        o, n = before[key], after[key]
        assert isinstance(o, set) and isinstance(n, set)
        lines += [f"added {p} ({key})" for p in sorted(n - o)]
    return lines


@contextlib.contextmanager
def _bench_cwd(cwd: Path) -> Iterator[Path]:
    """Run the block with `cwd` (created) as the current directory; fail if the checkout
    changed meanwhile."""
    cwd.mkdir(parents=True, exist_ok=True)
    assert not cwd.resolve().is_relative_to(REPO), "run benchmarks outside the checkout"
    before = snapshot()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd
    diff = changes(before, snapshot())
    assert not diff, f"a benchmark run from {cwd} wrote into the checkout {REPO}: {diff[:20]}"


@pytest.fixture(scope="session")
def bench_cwd() -> Callable[[Path], contextlib.AbstractContextManager[Path]]:
    """`with bench_cwd(folder): main(["bench", ...])`: run from `folder` (created), so the
    default outputs land in folder/bench-out/<verb>, and fail if the checkout changed."""
    return _bench_cwd
