"""Pass 3 of `subllm prepare`: tokenizing the documents and writing their tokens.

    Encoder          documents -> token ids (each followed by end-of-text) and lengths
    _encode_batches  encodes batches in this process or in worker processes, in order
    SplitFile        a split's token file under a temporary name, or its shards
    _Sink            where pass 3 writes: each document to its split, in reading order

`subllm.train.data.prepare` orchestrates the passes; this module is what its worker
processes run. They are started by `spawn`, not `fork`: the parent may hold torch's and
the Rust tokenizer's threads, which `fork` would copy broken. A spawned worker starts a
fresh interpreter and imports the functions it runs by module path, so they live here at
module level, and this module imports only what a worker needs (numpy, tokenizers; not
torch, nor `subllm.train.data`).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from subllm.errors import SubLLMError

_BATCH_DOCS = 256  # documents per encode call (a worker's task), or fewer:
_BATCH_CHARS = 1 << 20  # as many as add up to this much text


# ---------------------------------------------------------------------------------------------
# Encoding


class Encoder:
    """Documents -> their token ids back to back, and each one's count: each document as
    the tokenizer encodes it (its post-processor: a BOS first where its template adds
    one), then end-of-text unless the template ended it with end-of-text already."""

    def __init__(self, tok: Any, eot_id: int, dtype: np.dtype) -> None:
        tok.no_truncation()  # whole documents, whatever lengths the tokenizer file sets
        tok.no_padding()
        self.eot_id, self.dtype = eot_id, np.dtype(dtype)
        # without offsets where tokenizers has it: a third faster than encode_batch
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        eot = [self.eot_id]
        ids = array(self.dtype.char)  # H or I: numpy's and array's codes agree
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, encoding in enumerate(self._encode(texts, add_special_tokens=True)):
            doc = encoding.ids  # each read of .ids converts the whole list again
            before = len(ids)
            ids.extend(doc)
            if doc[-1:] != eot:
                ids.append(self.eot_id)
            lengths[i] = len(ids) - before
        return np.frombuffer(ids, dtype=self.dtype), lengths


def available_cores() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Pass 3 in worker processes. They are started by `spawn` (the parent may hold torch's and
# the Rust tokenizer's threads, which `fork` would copy broken) and import only this module.
_worker_encoder: Encoder | None = None


def _start_worker(tokenizer_file: str, eot_id: int, dtype: str, threads: int,
                  parent: int) -> None:
    """A worker's set-up: its tokenizer, with `threads` Rust threads (the processes are
    the parallelism: more would only oversubscribe the cores), its signals left to the
    parent (which stops it), and an exit when the parent is gone (killed)."""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when tokenizers first encodes
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _worker_encoder = Encoder(Tokenizer.from_file(tokenizer_file), eot_id, np.dtype(dtype))


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None
    return _worker_encoder(texts)


def _batches(texts: Iterator[str], max_docs: int = _BATCH_DOCS,
             max_chars: int = _BATCH_CHARS) -> Iterator[list[str]]:
    """Documents in batches of `max_docs`, or fewer adding up to `max_chars`."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


Write = Callable[[int, np.ndarray, np.ndarray], None]  # (characters, ids, lengths) of a batch


def _encode_batches(batches: Iterator[list[str]], encoder: Encoder, workers: int,
                    write: Write, tokenizer_file: Path) -> None:
    """Encode each batch and `write` it, in order: in this process (`workers` 1, with the
    Rust tokenizer's own threads), or in `workers` processes, each loading the encoder's
    tokenizer from `tokenizer_file`, with at most two batches each in flight, so memory
    stays bounded whatever the corpus."""
    if workers == 1:
        for batch in batches:
            write(sum(map(len, batch)), *encoder(batch))
        return
    # the file's name, not its contents: spawn writes a worker's arguments down a pipe
    # before it starts, and a large tokenizer there can block (CPython) if the worker dies
    setup = (str(tokenizer_file), encoder.eot_id, encoder.dtype.str,
             max(1, available_cores() // workers), os.getpid())
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                               setup)
    pending: deque[tuple[int, Any]] = deque()
    try:
        for batch in batches:
            pending.append((sum(map(len, batch)), pool.submit(_encode_in_worker, batch)))
            while len(pending) > 2 * workers or (pending and pending[0][1].done()):
                chars, future = pending.popleft()
                write(chars, *future.result())
        while pending:
            chars, future = pending.popleft()
            write(chars, *future.result())
    except BaseException as e:
        _stop(pool)
        if isinstance(e, BrokenProcessPool):
            raise SubLLMError("a tokenizing worker process died (killed, out of memory, or "
                              "started by a script without `if __name__ == \"__main__\":`); "
                              "run with fewer --workers") from None
        raise
    pool.shutdown()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (Ctrl-C, SIGTERM, an error): they ignore both signals and a
    batch can take a while, so kill them (Python 3.14 names this `terminate_workers`)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Writing token files


class SplitFile:
    """A split's tokens, written under temporary names in `out_dir`: `{split}.bin` until it
    holds `limit` tokens, then shards `{split}-00000.bin`, ... of `limit` tokens each."""

    def __init__(self, out_dir: Path, split: str, limit: int | None = None) -> None:
        self.out_dir, self.split, self.limit = out_dir, split, limit
        self.counts: list[int] = []
        self.temps: list[Path] = []
        self._file: Any = None
        self._next_file()

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def names(self) -> list[str]:
        """The files' final names."""
        if len(self.counts) == 1:
            return [f"{self.split}.bin"]
        return [f"{self.split}-{i:05d}.bin" for i in range(len(self.counts))]

    def index(self) -> list[dict[str, Any]]:
        """meta.json's `shards` entry of the split."""
        return [{"file": n, "tokens": c} for n, c in zip(self.names(), self.counts, strict=True)]

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.counts[-1] == self.limit:
                self._next_file()
            part = ids if self.limit is None else ids[:self.limit - self.counts[-1]]
            self._file.write(part)  # its buffer: no copy
            self.counts[-1] += len(part)
            ids = ids[len(part):]

    def close(self) -> None:
        self._file.close()

    def _temp(self, name: str) -> Path:
        return self.out_dir / f".{name}.tmp-{os.getpid()}"

    def _next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        if len(self.counts) == 1:  # a second shard: the first is a shard too, not {split}.bin
            first = self._temp(f"{self.split}-00000.bin")
            os.replace(self.temps[0], first)
            self.temps[0] = first
        self.counts.append(0)
        self.temps.append(self._temp(self.names()[-1]))
        self._file = open(self.temps[-1], "wb")  # closed by the next one, or close()


@dataclass
class _Sink:
    """Pass 3's destination: each encoded document, in reading order, to its split's file
    (or, for a corpus of one document, its last `val_fraction` of tokens to val.bin), with
    the token and document counts and, for mixing, each document's length."""

    files: dict[str, SplitFile]
    is_val: np.ndarray  # per document, in reading order
    val_fraction: float
    bar: Any
    keep_lengths: bool = False

    def __post_init__(self) -> None:
        self.next_doc = 0
        self.documents = {"train": 0, "val": 0}
        self.lengths: list[np.ndarray] = []
        self.started = time.perf_counter()

    def __call__(self, chars: int, ids: np.ndarray, lengths: np.ndarray) -> None:
        if len(self.is_val) == 1:  # one document (one big .txt): split by tokens
            cut = len(ids) - max(2, int(len(ids) * self.val_fraction))
            self.files["train"].write(ids[:cut])
            self.files["val"].write(ids[cut:])
        else:
            splits = self.is_val[self.next_doc:self.next_doc + len(lengths)]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            runs = [0, *(np.flatnonzero(np.diff(splits)) + 1).tolist(), len(splits)]
            for a, b in itertools.pairwise(runs):  # a run of documents of one split: one write
                self.files["val" if splits[a] else "train"].write(ids[offsets[a]:offsets[b]])
            n_val = int(splits.sum())
            self.documents["val"] += n_val
            self.documents["train"] += len(splits) - n_val
        self.next_doc += len(lengths)
        if self.keep_lengths:
            self.lengths.append(lengths)
        tokens = self.files["train"].tokens + self.files["val"].tokens
        rate = tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(chars)
