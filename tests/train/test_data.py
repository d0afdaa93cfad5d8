"""`subllm prepare` and the training batches (subllm.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from subllm.errors import SubLLMError
from subllm.train.data import (
    TrainBatches,
    default_corpus_files,
    load_data,
    load_tokenizer,
    prepare,
    token_dtype,
    val_batches,
)

WORDS = ("alpha beta gamma delta model token train sample layer keep score ratio "
         "über naïve 数据 ✓").split()


@pytest.fixture
def corpus(tmp_path: Path, write_corpus) -> Path:
    # 12 docs of 20 lines of 10 words (some non-ASCII), seed 0
    return write_corpus(tmp_path / "corpus", 12, words=WORDS, words_per_line=10, lines=20)


def docs_of(tokens: np.ndarray, eot: int, tokenizer) -> list[str]:
    ids = tokens.tolist()
    docs, cur = [], []
    for t in ids:
        if t == eot:
            docs.append(tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "every document must end with the end-of-text token"
    return docs


def test_prepare_round_trips_documents_and_writes_meta(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus / "empty.txt").write_text("  \n")
    meta = prepare(out, inputs=[corpus], vocab_size=300, val_fraction=0.25, seed=1,
                   progress=False)
    assert meta["skipped"] == {"binary": 1, "undecodable": 1, "empty": 1}
    assert meta["documents"] == {"train": 9, "val": 3}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    assert json.loads((out / "meta.json").read_text()) == meta
    data = load_data(out)
    tok = load_tokenizer(data.tokenizer_path)
    assert tok.token_to_id("<|endoftext|>") == meta["eot_id"]
    train = docs_of(np.asarray(data.tokens("train")), data.eot_id, tok)
    val = docs_of(np.asarray(data.tokens("val")), data.eot_id, tok)
    originals = {p.read_text(encoding="utf-8") for p in corpus.glob("doc*.txt")}
    # byte-level BPE is lossless, and the split is by whole documents
    assert set(train) | set(val) == originals and not set(train) & set(val)
    assert len(data.tokens("train")) == meta["tokens"]["train"]
    assert not list(out.glob(".*tmp*"))


def test_prepare_is_deterministic_and_seed_changes_split(corpus: Path, tmp_path: Path) -> None:
    a = prepare(tmp_path / "a", inputs=[corpus], vocab_size=300, val_fraction=0.25, seed=0,
                progress=False)
    b = prepare(tmp_path / "b", inputs=[corpus], vocab_size=300, val_fraction=0.25, seed=0,
                progress=False)
    c = prepare(tmp_path / "c", inputs=[corpus], vocab_size=300, val_fraction=0.25, seed=5,
                progress=False)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert c["tokenizer_sha256"] != "" and a["tokens"] != c["tokens"]


def test_prepare_jsonl_text_field_and_given_tokenizer(corpus: Path, tmp_path: Path) -> None:
    prepare(tmp_path / "ref", inputs=[corpus], vocab_size=300, progress=False)
    jsonl = tmp_path / "docs.jsonl"
    texts = [f"record number {i} " * 5 for i in range(10)]
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    meta = prepare(tmp_path / "j", inputs=[jsonl], text_field="body",
                   tokenizer=tmp_path / "ref" / "tokenizer.json", val_fraction=0.2,
                   progress=False)
    assert meta["documents"] == {"train": 8, "val": 2}
    assert meta["tokenizer_sha256"] == json.loads(
        (tmp_path / "ref" / "meta.json").read_text())["tokenizer_sha256"]
    with pytest.raises(SubLLMError, match="no field `text`.*--text-field"):
        prepare(tmp_path / "k", inputs=[jsonl], vocab_size=300, progress=False)
    assert not (tmp_path / "k").exists()


def test_single_document_is_split_by_tokens(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    f.write_text("one long book about tokens and models. " * 200)
    meta = prepare(tmp_path / "d", inputs=[f], vocab_size=300, val_fraction=0.1, progress=False)
    assert meta["split"] == "tokens"
    total = meta["tokens"]["train"] + meta["tokens"]["val"]
    assert meta["tokens"]["val"] == int(total * 0.1)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "binary_only", "bad_json"])
def test_prepare_bad_input_writes_nothing(tmp_path: Path, case: str) -> None:
    src = tmp_path / "in"
    if case == "empty_dir":
        src.mkdir()
    elif case == "binary_only":
        src.mkdir()
        (src / "a.bin").write_bytes(bytes(range(256)) * 4)
        (src / "b.dat").write_bytes(b"\x00\x01\x02")
    elif case == "bad_json":
        src = tmp_path / "in.jsonl"
        src.write_text('{"text": "fine"}\n{"text": broken\n')
    expected = {"missing": "does not exist", "empty_dir": "is empty",
                "binary_only": "no text found.*2 binary", "bad_json": r"in.jsonl:2 is not valid"}
    with pytest.raises(SubLLMError, match=expected[case]):
        prepare(tmp_path / "out", inputs=[src], vocab_size=300, progress=False)
    assert not (tmp_path / "out").exists()


def test_default_corpus_is_python_source_in_fixed_order() -> None:
    files = default_corpus_files()
    assert files == default_corpus_files() and len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) < 40e6


def test_token_dtype() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ---------------------------------------------------------------------------------------------
# batches


def stream(n: int = 1000) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)


def test_batches_cover_an_epoch_without_repeats() -> None:
    b = TrainBatches(stream(330), batch_size=3, seq_len=10, seed=0)
    assert b.windows_per_epoch == 32
    starts = [int(row[0]) for _ in range(10) for row in b.next()]
    assert len(set(starts)) == 30  # first 30 of a 32-window permutation: all distinct
    offsets = {s % 10 for s in starts}
    assert len(offsets) == 1  # one offset per epoch
    x = TrainBatches(stream(330), 2, 10, seed=0).next()
    assert x.dtype == torch.long and x.shape == (2, 10)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(2, 9, dtype=torch.long))


def test_batches_resume_exactly_across_epochs() -> None:
    a = TrainBatches(stream(200), batch_size=4, seq_len=16, seed=3)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    b = TrainBatches(stream(200), batch_size=4, seq_len=16, seed=3)
    b.load_state_dict(state)
    for _ in range(12):  # crosses several epochs (10 windows per epoch)
        assert torch.equal(a.next(), b.next())
    other_seed = TrainBatches(stream(200), batch_size=4, seq_len=16, seed=4)
    with pytest.raises(SubLLMError, match="same values"):
        other_seed.load_state_dict(state)


def test_global_batch_is_the_same_for_any_world_size() -> None:
    one = TrainBatches(stream(), batch_size=4, seq_len=8, seed=1)
    ranks = [TrainBatches(stream(), batch_size=2, seq_len=8, seed=1, rank=r, world_size=2)
             for r in range(2)]
    accum = TrainBatches(stream(), batch_size=1, seq_len=8, seed=1, world_size=1)
    for _ in range(6):
        full = one.next()
        assert torch.equal(torch.cat([r.next() for r in ranks]), full)
        assert torch.equal(torch.cat([accum.next() for _ in range(4)]), full)
    assert ranks[0].state_dict() == one.state_dict()


def test_val_batches_are_deterministic_and_short_val_gives_one_window() -> None:
    a = val_batches(stream(100), batch_size=2, seq_len=10, max_batches=3)
    assert len(a) == 3 and all(x.shape == (2, 10) for x in a)
    assert torch.equal(a[0][0], torch.arange(10))
    tiny = val_batches(stream(7), batch_size=4, seq_len=10)
    assert len(tiny) == 1 and tiny[0].shape == (1, 7)


def test_too_little_data_for_seq_len() -> None:
    with pytest.raises(SubLLMError, match="fewer than one sequence"):
        TrainBatches(stream(10), batch_size=1, seq_len=16)
