"""`subllm prepare` at any size (issue 25): tokenizing in worker processes gives the same
bytes for any --workers, and stops cleanly; a split of more than --shard-tokens tokens is
written as shards that train on the same windows as one file."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import SRC, snapshot

from subllm.errors import SubLLMError
from subllm.train import data as D
from subllm.train.data import (
    ShardedTokens,
    TrainBatches,
    load_data,
    prepare,
    train_tokenizer,
    val_batches,
)

WORDS = "river stone light über naïve 数据 ✓ a of the model token quick brown fox".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """80 text files of 1-40 lines (fresh each run, seed in failures), and a tokenizer."""
    root = tmp_path_factory.mktemp("parallel")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    (root / "txt").mkdir()
    for i in range(80):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                 for _ in range(rng.randint(1, 40))]
        (root / "txt" / f"doc{i:03d}.txt").write_text("\n".join(lines), encoding="utf-8")
    tokenizer = root / "tokenizer.json"
    train_tokenizer(iter(WORDS * 20), 300).save(str(tokenizer))
    return {"root": root, "txt": root / "txt", "tokenizer": tokenizer, "seed": seed}


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".bin"}


# 1. Workers --------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_bin_is_the_same_bytes_for_any_number_of_workers(corpus: dict, tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.setattr(D, "_BATCH_DOCS", 3)  # 27 batches: every worker gets several
    metas = {}
    for workers in (1, 2, 3):
        metas[workers] = prepare(tmp_path / f"w{workers}", inputs=[corpus["txt"]],
                                 tokenizer=corpus["tokenizer"], val_fraction=0.2,
                                 progress=False, workers=workers)
    ref = outputs(tmp_path / "w1")
    for workers in (2, 3):
        assert outputs(tmp_path / f"w{workers}") == ref, f"seed {corpus['seed']}"
        assert metas[workers] == metas[1]
    assert not multiprocessing.active_children()  # the workers are gone


def test_the_default_is_one_process_for_a_small_corpus(monkeypatch) -> None:
    stats = D.CorpusStats(documents=10**6, bytes=3 << 20)  # many short documents: 3 MB
    monkeypatch.setattr(D, "available_cores", lambda: 8)
    assert D._workers(None, stats) == 1 and D._workers(3, stats) == 3
    stats.bytes = 1 << 30
    assert D._workers(None, stats) == 8


@pytest.mark.slow
def test_a_worker_that_dies_is_one_error_and_nothing_is_left(corpus: dict, tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(D, "_BATCH_DOCS", 2)
    real = D._Sink.__call__

    def kill_a_worker(self, *args):  # the first batch back: kill a worker (as OOM would)
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        monkeypatch.setattr(D._Sink, "__call__", real)
        real(self, *args)

    monkeypatch.setattr(D._Sink, "__call__", kill_a_worker)
    out = tmp_path / "out"
    with pytest.raises(SubLLMError, match="a tokenizing worker process died"):
        prepare(out, inputs=[corpus["txt"]], tokenizer=corpus["tokenizer"], progress=False,
                workers=2)
    assert not out.exists() and not multiprocessing.active_children()


PAUSE_IN_TOKENIZATION = """
import multiprocessing, sys, time
import subllm.train.data as data
data._BATCH_DOCS = 2
real = data._Sink.__call__
def paused(self, *args):  # the workers are busy; the temporaries are there
    real(self, *args)
    pids = [p.pid for p in multiprocessing.active_children()]
    print("PAUSED", *pids, file=sys.stderr, flush=True)
    time.sleep(120)
data._Sink.__call__ = paused
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("how, code, said", [("SIGTERM", 143, "terminated by SIGTERM"),
                                             ("Ctrl-C", 130, "interrupted"),
                                             ("SIGKILL", -9, "")])
def test_stopping_prepare_stops_its_workers_and_removes_temporaries(
        corpus: dict, tmp_path: Path, how: str, code: int, said: str) -> None:
    """SIGTERM to prepare, or Ctrl-C to it and its workers (they leave it to prepare): exit
    143 / 130, the workers gone, no temporaries, the earlier output as it was. SIGKILL: the
    workers notice their parent is gone and exit."""
    data = tmp_path / "data"
    prepare(data, inputs=[corpus["txt"]], tokenizer=corpus["tokenizer"], progress=False)
    before = snapshot(data)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PAUSE_IN_TOKENIZATION)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "subllm", "prepare", "--input", str(corpus["txt"]), "--out",
         str(data), "--tokenizer", str(corpus["tokenizer"]), "--workers", "2"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        for line in proc.stderr:
            if line.startswith("PAUSED"):
                workers = [int(pid) for pid in line.split()[1:]]
                break
        assert len(workers) == 2 and any(p.name.startswith(".") for p in data.iterdir())
        if how == "Ctrl-C":  # what a terminal sends to prepare and its workers; not killpg,
            # which would also hit a helper process multiprocessing may be starting then, and
            # a process still in Python's start-up can only print Python's own message
            for pid in (proc.pid, *workers):
                os.kill(pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session, whatever happened
        proc.wait()
    assert proc.returncode == code and "Traceback" not in err and said in err, err
    deadline = time.monotonic() + 10
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(_gone, workers))
    if how != "SIGKILL":  # a killed prepare's temporaries go with the next prepare
        assert snapshot(data) == before


def test_progress_shows_tokens_per_second_with_an_eta(corpus: dict, tmp_path: Path,
                                                      monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    prepare(tmp_path / "out", inputs=[corpus["txt"]], tokenizer=corpus["tokenizer"], workers=1)
    err = capsys.readouterr().err
    assert "tokenizing: 100%" in err and " tokens/s" in err and "<00:00" in err, err


# 2. Shards ---------------------------------------------------------------------------------
def batches_of(tokens, steps: int = 6) -> list[torch.Tensor]:
    batches = TrainBatches(tokens, batch_size=8, seq_len=48, seed=1)
    return [batches.next() for _ in range(steps)]


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed"])
def test_shards_train_on_the_windows_of_one_file(corpus: dict, tmp_path: Path,
                                                 mixed: bool) -> None:
    inputs = [corpus["txt"]]
    if mixed:
        docs = sorted(corpus["txt"].iterdir())
        inputs = [f"{docs[0].parent}/doc0[0-3]*.txt:0.5", f"{docs[0].parent}/doc0[4-7]*.txt:0.5"]
    common = {"inputs": inputs, "tokenizer": corpus["tokenizer"], "val_fraction": 0.3,
              "progress": False, "workers": 1}
    one = prepare(tmp_path / "one", **common)
    meta = prepare(tmp_path / "shards", **common, shard_tokens=1000)
    assert "shards" not in one and isinstance(load_data(tmp_path / "one").tokens("train"),
                                              np.memmap)
    assert {k: v for k, v in meta.items() if k != "shards"} == one
    files = outputs(tmp_path / "shards")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        index = meta["shards"][split]
        assert [e["file"] for e in index] == [f"{split}-{i:05d}.bin" for i in range(len(index))]
        assert sum(e["tokens"] for e in index) == meta["tokens"][split] > 2000
        assert {e["tokens"] for e in index[:-1]} == {1000} and 0 < index[-1]["tokens"] <= 1000
        assert [len(files[e["file"]]) for e in index] == [e["tokens"] * itemsize for e in index]
        joined = b"".join(files[e["file"]] for e in index)
        assert joined == (tmp_path / "one" / f"{split}.bin").read_bytes()
    plain, sharded = load_data(tmp_path / "one"), load_data(tmp_path / "shards")
    train = sharded.tokens("train")
    assert isinstance(train, ShardedTokens) and len(train) == meta["tokens"]["train"]
    flat = plain.tokens("train")
    for a, b in ((990, 1010), (0, 1000), (999, 2001), (5, 5), (-30, None)):
        assert np.array_equal(train[a:b], flat[a:b])  # windows across a shard boundary
    assert train[1000] == flat[1000] and train[-1] == flat[-1]
    assert np.array_equal(np.asarray(train), flat)
    for got, want in zip(batches_of(train), batches_of(flat), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(val_batches(sharded.tokens("val"), 4, 48),
                         val_batches(plain.tokens("val"), 4, 48), strict=True):
        assert torch.equal(got, want)


def test_a_new_prepare_removes_the_token_files_of_the_last(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "data"
    common = {"inputs": [corpus["txt"]], "tokenizer": corpus["tokenizer"], "progress": False}
    sharded = prepare(out, **common, shard_tokens=1000)
    assert (out / "train-00002.bin").is_file()
    prepare(out, **common)  # one file now: the shards would only mislead
    assert sorted(p.name for p in out.iterdir()) == sorted(D.OUTPUTS)
    prepare(out, **common, shard_tokens=1000)
    assert list(sharded["shards"]) == ["train"]  # 2% of the tokens for validation: one file
    names = {e["file"] for e in sharded["shards"]["train"]}
    assert {p.name for p in out.iterdir()} == names | {"val.bin", "tokenizer.json", "meta.json"}


def test_a_damaged_shard_is_named(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare(out, inputs=[corpus["txt"]], tokenizer=corpus["tokenizer"], progress=False,
            shard_tokens=1000)
    shard = out / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(SubLLMError, match=r"train-00001\.bin has 1998 bytes, meta.json says 2000"):
        load_data(out)
    meta = json.loads((out / "meta.json").read_text())
    meta["shards"]["train"].pop()
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SubLLMError, match="the train shards do not add up"):
        load_data(out)


def test_one_document_is_split_by_tokens_across_shards(corpus: dict, tmp_path: Path) -> None:
    text = "\n".join((corpus["txt"] / f"doc{i:03d}.txt").read_text() for i in range(40))
    (tmp_path / "one.txt").write_text(text)
    common = {"inputs": [tmp_path / "one.txt"], "tokenizer": corpus["tokenizer"],
              "progress": False}
    one, sharded = prepare(tmp_path / "a", **common), prepare(tmp_path / "b", **common,
                                                              shard_tokens=1000)
    assert one["split"] == "tokens" and one["documents"] == {"train": 1, "val": 0}
    assert {k: v for k, v in sharded.items() if k != "shards"} == one
    assert np.array_equal(np.asarray(load_data(tmp_path / "b").tokens("train")),
                          load_data(tmp_path / "a").tokens("train"))


def test_cli_takes_workers_and_shard_tokens(corpus: dict, tmp_path: Path, capsys) -> None:
    from subllm.cli import main
    from subllm.commands import prepare as command

    assert command.DEFAULT_SHARD_TOKENS == D.DEFAULT_SHARD_TOKENS
    assert main(["prepare", "--input", str(corpus["txt"]), "--out", str(tmp_path / "out"),
                 "--tokenizer", str(corpus["tokenizer"]), "--workers", "1",
                 "--shard-tokens", "1000"]) == 0
    assert "shards" in json.loads((tmp_path / "out" / "meta.json").read_text())
    for flag in ("--workers", "--shard-tokens"):
        with pytest.raises(SystemExit) as e:
            main(["prepare", "--input", str(corpus["txt"]), "--out", str(tmp_path / "x"), flag,
                  "0"])
        assert e.value.code == 2 and f"{flag}: must be a positive integer, got 0" in \
            capsys.readouterr().err
