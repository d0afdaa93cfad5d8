from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

# The default vocabulary of the tiny corpora below: 14 plain ASCII words.
WORDS = "the a model token train data loss step sample value layer keep ratio score".split()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip on a machine without a CUDA GPU (`subllm bench gpu` runs
    them where there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; intra-op threads only cost (badly so on a
    shared 2-core machine, where spinning OpenMP workers fight other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_corpus(root: Path, n_docs: int, *, seed: int = 0, words: Sequence[str] = WORDS,
                  words_per_line: int = 12, lines: int = 30,
                  name: str = "doc{i:02d}.txt") -> Path:
    """`n_docs` text files of `lines` lines of `words_per_line` words drawn with
    `random.Random(seed)`, in the folder `root` (created); returns `root`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = [" ".join(rng.choice(words) for _ in range(words_per_line)) for _ in range(lines)]
        (root / name.format(i=i)).write_text("\n".join(text), encoding="utf-8")
    return root


def _prepare_corpus(root: Path, n_docs: int, *, vocab_size: int = 300, **corpus: object) -> Path:
    """Write a corpus (see `write_corpus`) into `root / "corpus"` and `subllm prepare` it
    into `root / "data"`; returns the data folder."""
    from subllm.cli import main

    _write_corpus(root / "corpus", n_docs, **corpus)  # type: ignore[arg-type]
    data = root / "data"
    assert main(["prepare", "--input", str(root / "corpus"), "--out", str(data),
                 "--vocab-size", str(vocab_size)]) == 0
    return data


@pytest.fixture(scope="session")
def write_corpus() -> Callable[..., Path]:
    """`write_corpus(root, n_docs, seed=0, words=WORDS, words_per_line=12, lines=30,
    name="doc{i:02d}.txt")`: write a small random text corpus into the folder `root`."""
    return _write_corpus


@pytest.fixture(scope="session")
def prepare_corpus() -> Callable[..., Path]:
    """`prepare_corpus(root, n_docs, vocab_size=300, **write_corpus_options)`: a corpus in
    `root / "corpus"`, prepared into `root / "data"` (returned)."""
    return _prepare_corpus



# `subllm train` settings of a tiny nested SUBLLM that trains in a second on the corpora above
TINY_TRAIN = {
    "preset": "subllm-tiny",
    "model": {"dim": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 6,
              "structure": "T(T(TT)T)T", "max_seq_len": 128},
    "seq-len": 64, "batch-size": 4, "warmup": 2, "lr": 3e-3, "log-every": 1,
    "eval-batches": 2, "eval-every": 0, "save-every": 0, "device": "cpu",
}


@pytest.fixture(scope="session")
def tiny_settings() -> Callable[..., dict]:
    """`tiny_settings(data, **overrides)`: TINY_TRAIN for the data folder `data`, with
    flag-named overrides (`**{"save-every": 2}`; `model={...}` updates the model section)."""

    def make(data: Path, **overrides: object) -> dict:
        model = {**TINY_TRAIN["model"], **overrides.pop("model", {})}  # type: ignore[dict-item]
        return {**TINY_TRAIN, "model": model, "data": str(data), **overrides}

    return make
