"""Corpus preparation (`subllm prepare`) and the token batches that training reads.

A prepared data directory holds
    tokenizer.json   byte-level BPE (Hugging Face `tokenizers`), with an end-of-text token
    train.bin        token ids of the training documents, each as its tokenizer encodes it
                     (a BOS first where its template adds one) and followed by end-of-text
    val.bin          the same for the validation documents (split by document)
    meta.json        token counts, dtype, vocab size, eot id, tokenizer sha256, sources
`meta.json` is written last, so a directory without it is incomplete.
The .bin files are flat arrays (uint16 when the vocabulary fits, else uint32) read through
`numpy.memmap`, so corpora larger than memory train fine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from subllm.atomic import _alive
from subllm.errors import SubLLMError
from subllm.interop.tokenizer import (
    EOT_TOKEN,
    eot_id_of,
    load_tokenizer,
    model_tokenizer,
    sha256_file,
)
from subllm.train.config import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE

META_FORMAT = 1
_BINARY_SNIFF_BYTES = 8192
_ENCODE_BATCH_DOCS = 256


# ---------------------------------------------------------------------------------------------
# Reading documents


@dataclass
class CorpusStats:
    """What the reader saw; skipped files are counted, never silently lost."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(
        default_factory=lambda: {"binary": 0, "undecodable": 0, "empty": 0}
    )


def default_corpus_files() -> list[Path]:
    """The running Python's standard-library source: *.py outside site-packages and tests.

    About 15 MB of code for CPython 3.11, in a fixed (sorted) order.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _walk(directory: Path) -> list[Path]:
    """Files under a directory, recursively, hidden entries and caches skipped, sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _read_text(path: Path, stats: CorpusStats) -> str | None:
    """A file's text, or None (counted) when it is binary, not UTF-8, or empty."""
    data = path.read_bytes()
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        stats.skipped["binary"] += 1
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped["undecodable"] += 1
        return None
    if not text.strip():
        stats.skipped["empty"] += 1
        return None
    return text


def _read_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise SubLLMError(f"cannot read {path}: {e.strerror}") from None
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SubLLMError(
                        f"{path}:{lineno} is not valid JSON ({e.msg}); "
                        "a .jsonl file needs one JSON object per line"
                    ) from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else "none"
                    raise SubLLMError(
                        f"{path}:{lineno} has no field `{text_field}` (its fields: {keys}); "
                        "pass --text-field NAME"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise SubLLMError(
                        f"{path}:{lineno}: field `{text_field}` is {type(text).__name__}, "
                        "not a string; pass --text-field naming a text field"
                    )
                if not text.strip():
                    stats.skipped["empty"] += 1
                    continue
                yield text
        except UnicodeDecodeError:
            raise SubLLMError(f"{path} is not UTF-8 text; convert it to UTF-8") from None


def resolve_inputs(inputs: list[str | Path] | None) -> tuple[list[Path], list[str]]:
    """Input paths -> (files in reading order, source descriptions for meta.json)."""
    if not inputs:
        files = default_corpus_files()
        stdlib = sysconfig.get_paths()["stdlib"]
        version = ".".join(map(str, sys.version_info[:3]))
        return files, [f"python-stdlib {version}: {stdlib}"]
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise SubLLMError(f"input {path} does not exist; check the --input path")
        if path.is_dir():
            found = _walk(path)
            if not found:
                hidden = any(p.name.startswith(".") for p in path.iterdir())
                raise SubLLMError(
                    f"input directory {path} holds no files to read" + (
                        " (hidden files and folders are skipped)" if hidden else " (it is empty)")
                    + "; point --input at your text")
            files += found
        elif not path.is_file():
            raise SubLLMError(f"input {path} is not a regular file (a FIFO, socket or device); "
                              "pass a text file or a directory")
        else:
            files.append(path)
    return files, [str(Path(p).resolve()) for p in inputs]


def iter_documents(files: list[Path], text_field: str, stats: CorpusStats) -> Iterator[str]:
    """Documents in a fixed order: one per text file, one per line of a .jsonl file."""
    for path in files:
        stats.files += 1
        if not path.is_file():  # a FIFO, socket or device would block or never end
            stats.skipped["not regular files"] = stats.skipped.get("not regular files", 0) + 1
            continue
        if path.suffix == ".jsonl":
            for text in _read_jsonl(path, text_field, stats):
                stats.documents += 1
                stats.bytes += len(text)
                yield text
            continue
        try:
            text = _read_text(path, stats)
        except OSError as e:
            raise SubLLMError(f"cannot read {path}: {e.strerror}") from None
        if text is not None:
            stats.documents += 1
            stats.bytes += len(text)
            yield text


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterator[str], vocab_size: int, length: int | None = None) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) with `<|endoftext|>` as its special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------
# prepare


OUTPUTS = ("tokenizer.json", "train.bin", "val.bin", "meta.json")
# prepare's temporaries in the output directory: `.train.bin.tmp-PID`, `.write-test-PID`
_TEMPORARY = re.compile(r"^\.(?:(?:tokenizer\.json|train\.bin|val\.bin|meta\.json)\.tmp|"
                        r"write-test)-(?P<pid>\d+)$")


class Terminated(BaseException):
    """A SIGTERM arrived while prepare was writing (its temporaries are removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the block (as SIGINT raises KeyboardInterrupt), so
    prepare's cleanup runs instead of the process vanishing mid-write (`subllm prepare`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one cuts no cleanup short
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A SIGINT or SIGTERM arriving in the block (renaming the outputs into place: a
    directory with some new files and some old ones would be neither run's) is delivered
    when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporaries a killed prepare left in `out_dir` (those of a process that
    is not running; never a running prepare's)."""
    for p in out_dir.iterdir():
        m = _TEMPORARY.match(p.name)
        pid = int(m["pid"]) if m else 0
        # our own pid can only be a dead process's reused one: we have written nothing yet
        if m and p.is_file() and (pid == os.getpid() or not _alive(pid)):
            p.unlink(missing_ok=True)


def _make_out_dir(out_dir: Path) -> bool:
    """Create the output directory (returns whether we created it), remove what killed
    prepares left in it, and prove it is writable."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SubLLMError(
            f"cannot write to output directory {out_dir} ({e.strerror}); choose a writable --out"
        ) from None
    return created


def prepare(
    out_dir: str | Path,
    inputs: list[str | Path] | None = None,
    text_field: str = "text",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir`; returns the contents of its meta.json.

    Deterministic for a given input, tokenizer settings and seed: documents are read in
    sorted order and the validation documents are drawn by `random.Random(seed)`.
    """
    out_dir = Path(out_dir)
    if not 0.0 < val_fraction < 1.0:
        raise SubLLMError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer is None and not 257 <= vocab_size <= 1 << 32:
        raise SubLLMError(
            f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {vocab_size}"
        )
    files, sources = resolve_inputs(inputs)

    # Pass 1: read everything once, so bad input fails before anything is written.
    stats = CorpusStats()
    bars = progress and sys.stderr.isatty()  # no progress bars in logs and pipes
    for _ in tqdm(iter_documents(files, text_field, stats), desc="reading", unit=" docs",
                  disable=not bars, leave=False):
        pass
    if stats.documents == 0:
        counts = ", ".join(f"{v} {k}" for k, v in stats.skipped.items() if v)
        raise SubLLMError(
            f"no text found in {len(files)} input file(s) ({counts or 'nothing readable'}); "
            "give UTF-8 text files, directories of them, or .jsonl with a text field"
        )
    n_docs = stats.documents
    # Split by document; a single document (one big .txt) is split by tokens instead.
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1) if n_docs > 1 else 0
    val_docs = set(random.Random(seed).sample(range(n_docs), n_val))

    def texts(split: str | None = None) -> Iterator[str]:
        for i, text in enumerate(iter_documents(files, text_field, CorpusStats())):
            if split is None or (i in val_docs) == (split == "val"):
                yield text

    created = _make_out_dir(out_dir)
    tmp = {name: out_dir / f".{name}.tmp-{os.getpid()}" for name in OUTPUTS}
    try:
        # Pass 2: the tokenizer, trained on the training documents only.
        eos_id = None  # a model directory's tokenizer_config.json eos token
        if tokenizer is None:
            if progress:
                print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) "
                      f"on {n_docs - n_val} documents", file=sys.stderr)
            tok = train_tokenizer(texts("train" if n_val else None), vocab_size,
                                  length=n_docs - n_val)
            tok.save(str(tmp["tokenizer.json"]))
        elif Path(tokenizer).is_dir():  # a model's: encode as transformers' AutoTokenizer
            tok, eos_id = model_tokenizer(tokenizer)
            tok.save(str(tmp["tokenizer.json"]))  # with the post-processor it applies
        else:
            tok = load_tokenizer(tokenizer)
            shutil.copyfile(tokenizer, tmp["tokenizer.json"])
        try:
            eot_id = eot_id_of(tok, tokenizer or "tokenizer.json")
        except SubLLMError:  # a model directory's tokenizer names its own eos token
            if eos_id is None:
                raise
            eot_id = eos_id
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)

        # Pass 3: encode in batches (the Rust side uses every core), each document as the
        # tokenizer encodes it (its post-processor: a BOS first where its template adds
        # one), then eot unless the template ended it with eot already.
        tok.no_truncation()  # whole documents, whatever lengths the tokenizer file sets
        tok.no_padding()
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        counts = {"train": 0, "val": 0}
        doc_counts = {"train": 0, "val": 0}
        with open(tmp["train.bin"], "wb") as f_train, open(tmp["val.bin"], "wb") as f_val:
            outs = {"train": f_train, "val": f_val}
            bar = tqdm(total=n_docs, desc="tokenizing", unit=" docs", disable=not bars)
            batch: list[tuple[int, str]] = []

            def flush() -> None:
                encoded = encode([t for _, t in batch], add_special_tokens=True)
                for (i, _), enc in zip(batch, encoded, strict=True):
                    split = "val" if i in val_docs else "train"
                    end = [] if enc.ids[-1:] == [eot_id] else [eot_id]
                    ids = np.asarray(enc.ids + end, dtype=dtype)
                    outs[split].write(ids.tobytes())
                    counts[split] += len(ids)
                    doc_counts[split] += 1
                bar.update(len(batch))
                batch.clear()

            for i, text in enumerate(texts()):
                batch.append((i, text))
                if len(batch) == _ENCODE_BATCH_DOCS:
                    flush()
            if batch:
                flush()
            bar.close()
        split_by = "documents"
        if n_val == 0:
            split_by = "tokens"
            counts = _split_single_document(tmp["train.bin"], tmp["val.bin"], dtype, val_fraction)
        if min(counts.values()) < 2:
            raise SubLLMError(
                f"the corpus is too small to split ({counts['train']} train / {counts['val']} "
                "val tokens); give more text"
            )
        meta = {
            "format": META_FORMAT,
            "vocab_size": vocab,
            "eot_id": eot_id,
            "dtype": dtype.name,
            "tokens": counts,
            "documents": doc_counts if split_by == "documents" else {"train": 1, "val": 0},
            "split": split_by,
            "val_fraction": val_fraction,
            "seed": seed,
            "tokenizer_sha256": sha256_file(tmp["tokenizer.json"]),
            "tokenizer_source": str(Path(tokenizer).resolve()) if tokenizer else "trained",
            "sources": sources,
            "text_field": text_field,
            "files": stats.files,
            "bytes": stats.bytes,
            "skipped": stats.skipped,
        }
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        # meta.json goes last: its presence marks a complete data directory.
        with _signals_deferred():
            for name in OUTPUTS:
                os.replace(tmp[name], out_dir / name)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return meta


def _split_single_document(
    train_path: Path, val_path: Path, dtype: np.dtype, val_fraction: float
) -> dict[str, int]:
    tokens = np.fromfile(train_path, dtype=dtype)
    n_val = max(2, int(len(tokens) * val_fraction))
    cut = len(tokens) - n_val
    tokens[:cut].tofile(train_path)
    tokens[cut:].tofile(val_path)
    return {"train": int(cut), "val": int(n_val)}


# ---------------------------------------------------------------------------------------------
# Reading a prepared directory


@dataclass
class TokenData:
    """A prepared data directory: its meta.json, tokenizer path and token arrays."""

    path: Path
    meta: dict[str, Any]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids as a read-only memory map."""
        n = int(self.meta["tokens"][split])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))


def load_data(data_dir: str | Path) -> TokenData:
    path = Path(data_dir)
    hint = f"run `subllm prepare --out {path}` first"
    if not path.is_dir():
        raise SubLLMError(f"data directory {path} does not exist; {hint}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise SubLLMError(f"{path} is not a prepared data directory (no meta.json); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        for split in ("train", "val"):
            expected = int(meta["tokens"][split]) * dtype.itemsize
            actual = (path / f"{split}.bin").stat().st_size
            if actual != expected:
                raise SubLLMError(
                    f"{path / (split + '.bin')} has {actual} bytes, meta.json says {expected}; "
                    f"the directory is damaged, {hint} again"
                )
        int(meta["vocab_size"]), int(meta["eot_id"])
    except SubLLMError:
        raise  # already says what is wrong (it is a ValueError too)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SubLLMError(f"{path} is not a valid data directory ({e!r}); {hint} again") from None
    if not (path / "tokenizer.json").is_file():
        raise SubLLMError(f"{path} has no tokenizer.json; {hint} again")
    return TokenData(path, meta)


# ---------------------------------------------------------------------------------------------
# Batches


class TrainBatches:
    """Random seq_len windows of the training tokens, exactly resumable and DDP-consistent.

    Epoch e cuts the token stream into windows starting at a random offset and visits them
    in the order of a permutation seeded by seed + e. Global sample g is window
    perm_{g // n}[g % n]. Each micro-step consumes `batch_size * world_size` global samples;
    rank r takes the r-th block of `batch_size`. So the samples of an optimizer step are
    the same for any split of the global batch into ranks and accumulation steps, and
    the whole state is one integer.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n_full = len(tokens) // seq_len
        if n_full < 1:
            raise SubLLMError(
                f"the training split has {len(tokens)} tokens, fewer than one sequence of "
                f"--seq-len {seq_len}; lower --seq-len or prepare more data"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # One window fewer than fits, so that any offset in [0, seq_len) stays in bounds.
        self.windows_per_epoch = n_full - 1 if n_full >= 2 else 1
        self.consumed = 0  # global samples taken so far, by all ranks together
        self._epoch = -1
        self._perm: torch.Tensor | None = None
        self._offset = 0

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.windows_per_epoch, generator=g)
            self._offset = int(torch.randint(0, self.seq_len, (1,), generator=g)) \
                if len(self.tokens) // self.seq_len >= 2 else 0
            self._epoch = epoch
        assert self._perm is not None
        return self._perm, self._offset

    def sample_starts(self, first: int, count: int) -> list[int]:
        """Start offsets of global samples first .. first + count - 1."""
        starts = []
        for g in range(first, first + count):
            perm, offset = self._epoch_order(g // self.windows_per_epoch)
            starts.append(offset + int(perm[g % self.windows_per_epoch]) * self.seq_len)
        return starts

    @property
    def epoch(self) -> float:
        return self.consumed / self.windows_per_epoch

    def next(self) -> torch.Tensor:
        """This rank's next micro-batch, LongTensor (batch_size, seq_len)."""
        first = self.consumed + self.rank * self.batch_size
        starts = self.sample_starts(first, self.batch_size)
        self.consumed += self.batch_size * self.world_size
        rows = [np.asarray(self.tokens[s : s + self.seq_len], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))  # (B, L)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seq_len"]) != self.seq_len or int(state["seed"]) != self.seed:
            raise SubLLMError(
                f"the checkpoint was trained with --seq-len {state['seq_len']} and --seed "
                f"{state['seed']}; resume with the same values"
            )
        self.consumed = int(state["consumed"])


def val_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """Deterministic validation batches: consecutive windows from the start of val.bin.

    A validation split shorter than one window gives one shorter window.
    """
    seq_len = min(seq_len, len(tokens))
    n_windows = len(tokens) // seq_len
    rows_per_batch = min(batch_size, n_windows)
    n_batches = n_windows // rows_per_batch
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        first = b * rows_per_batch * seq_len
        block = np.asarray(tokens[first : first + rows_per_batch * seq_len], dtype=np.int64)
        batches.append(torch.from_numpy(block.reshape(rows_per_batch, seq_len)))
    return batches


# ---------------------------------------------------------------------------------------------
# CLI


def print_summary(meta: dict[str, Any], out_dir: str | Path) -> None:
    skipped = ", ".join(f"{v} {k}" for k, v in meta["skipped"].items() if v) or "none"
    print(
        f"prepared {out_dir}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val "
        f"tokens from {meta['files']} files ({skipped} skipped), vocab {meta['vocab_size']}, "
        f"{meta['dtype']}"
    )


