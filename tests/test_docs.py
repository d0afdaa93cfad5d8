"""Every fenced Python and shell block of README.md and docs/*.md runs (or, where marked to
skip, is checked statically): the convention is in tests/docsnippets.py and
docs/contributing.md."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from docsnippets import Block, blocks, check_bash, check_python

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL = [b for doc in DOCS for b in blocks(doc)]


def _id(block: Block) -> str:
    return block.where


@pytest.mark.parametrize("block", [b for b in ALL if b.lang in ("python", "bash", "sh")],
                         ids=_id)
def test_block_is_valid(block: Block) -> None:
    """Skipped or not: Python compiles and its subllm imports exist; each `subllm` command
    parses; each `make` target exists."""
    if block.lang == "python":
        check_python(block)
    else:
        check_bash(block, ROOT / "Makefile")


def _sandbox(tmp: Path) -> Path:
    """The directory the blocks of one file run in: `examples/` of the repository, and a
    small corpus `my_corpus/` (standard-library modules as text) for "your own data"."""
    (tmp / "examples").symlink_to(ROOT / "examples")
    corpus = tmp / "my_corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap", "string", "shlex", "fnmatch", "glob", "colorsys", "bisect",
                 "heapq", "queue", "sched", "netrc", "codeop", "cmd", "calendar", "pprint"):
        shutil.copy(stdlib / f"{name}.py", corpus / f"{name}.txt")
    return tmp


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _matches(expected: str, actual: str) -> bool:
    """Line by line after trimming trailing spaces; a line `...` matches any lines."""
    pattern = "\n".join(".*?" if line.strip() == "..." else re.escape(line.rstrip())
                        for line in expected.strip("\n").splitlines())
    got = "\n".join(line.rstrip() for line in actual.strip("\n").splitlines())
    return re.fullmatch(pattern, got, re.S) is not None


def _run_bash(block: Block, code: str, cwd: Path) -> str:
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=_env(),
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the block ran for over 10 minutes:\n{code}")
    if proc.returncode != 0:
        pytest.fail(f"{block.where}: exit {proc.returncode}:\n{code}\n--- stdout\n"
                    f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout


def _run_python(block: Block, code: str, namespace: dict) -> str:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, block.where, "exec"), namespace)  # noqa: S102 - our own docs
    except Exception as e:
        raise AssertionError(f"{block.where}: {type(e).__name__}: {e}\n{code}") from e
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(
    b.lang in ("python", "bash", "sh") and b.skip is None for b in blocks(d))],
    ids=lambda d: d.name)
def test_doc_runs(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks of one file, in order, in one sandbox, as a reader would run them."""
    cwd = _sandbox(tmp_path)
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "__doc__"}
    ran = 0
    for block in blocks(doc):
        if block.file is not None:
            target = cwd / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.runnable_code(), encoding="utf-8")
            continue
        if block.lang not in ("python", "bash", "sh") or block.skip is not None:
            continue
        code = block.runnable_code()
        if block.lang == "python":
            if block.setup:
                _run_python(block, block.setup + "\n", namespace)
            stdout = _run_python(block, code, namespace)
        else:
            if block.setup:
                _run_bash(block, block.setup + "\n", cwd)
            stdout = _run_bash(block, code, cwd)
        if block.output is not None and not _matches(block.output, stdout):
            pytest.fail(f"{block.where}: the output shown in the docs differs from the run's:"
                        f"\n--- documented\n{block.output}\n--- printed\n{stdout}")
        ran += 1
    assert ran > 0
