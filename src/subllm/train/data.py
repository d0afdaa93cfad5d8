"""Corpus preparation (`subllm prepare`) and the token batches that training reads.

`prepare` reads its inputs (`subllm.train.sources`: the formats, the skipped files, the
mixing by weight) in three passes: pass 1 reads every document once, so bad input fails
before anything is written, and counts them; pass 2 trains the tokenizer on the training
documents (or takes the given one); pass 3 tokenizes, in `--workers` processes, writing
the documents in reading order (so train.bin is the same for any number of workers;
`subllm.train.encode` holds the encoding, its worker processes and the token files).
Mixed sources are mixed here, so train.bin is the mixed stream (whole documents, small
sources repeated; `mixture_plan`) and training, whose exact resume depends only on
train.bin and its seed, needs nothing more. Validation documents are drawn per source
before mixing and stay unmixed.

A prepared data directory holds
    tokenizer.json   byte-level BPE (Hugging Face `tokenizers`), with an end-of-text token
    train.bin        token ids of the training documents, each as its tokenizer encodes it
                     (a BOS first where its template adds one) and followed by end-of-text
    val.bin          the same for the validation documents (split by document)
    meta.json        token counts, dtype, vocab size, eot id, tokenizer sha256, sources
                     (and with weights, `mixture`: the shares each source got)
`meta.json` is written last, so a directory without it is incomplete. A split of more than
`--shard-tokens` tokens is written as shards instead (train-00000.bin, train-00001.bin,
...; meta.json's `shards` lists each file and its tokens), read as one array
(`ShardedTokens`). The .bin files are flat arrays (uint16 when the vocabulary fits, else
uint32) read through `numpy.memmap`, so corpora larger than memory train fine.

torch is imported inside the functions that make batches, not here: `subllm prepare`
needs none of it (it would cost 2 s and 200 MB).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from subllm.atomic import _alive
from subllm.errors import SubLLMError, SubLLMWarning
from subllm.interop.tokenizer import (
    EOT_TOKEN,
    eot_id_of,
    load_tokenizer,
    model_tokenizer,
    sha256_file,
)
from subllm.train.config import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE
from subllm.train.encode import (  # pass 3; tests set _BATCH_DOCS, _Sink and available_cores here
    _BATCH_DOCS,
    Encoder,
    SplitFile,
    _batches,
    _encode_batches,
    _Sink,
    available_cores,  # bench.prepare imports it here too
)
from subllm.train.sources import (
    ChatRenderer,
    CorpusStats,
    InputSpec,
    ReadOptions,
    Source,
    default_corpus_files,  # noqa: F401  (re-exported: tests and bench.pair import it here)
    iter_documents,
    mixture_plan,
    resolve_sources,
)

if TYPE_CHECKING:
    import torch

META_FORMAT = 1
DEFAULT_SHARD_TOKENS = 1 << 30  # tokens per .bin file at most: 2 GiB of uint16, 4 of uint32
_AUTO_CHARS_PER_WORKER = 4 << 20  # by default, a worker process for each 4 M characters


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
# prepare's temporaries in the output directory: `.train.bin.tmp-PID` (`.train-00000.bin...`
# when sharded; the training documents before mixing, `.pool.bin.tmp-PID`), `.write-test-PID`
_TEMPORARY = re.compile(r"^\.(?:(?:tokenizer\.json|(?:train|val|pool)(?:-\d{5})?\.bin|meta\.json)"
                        r"\.tmp|write-test)-(?P<pid>\d+)$")
_TOKEN_FILE = re.compile(r"^(?:train|val)(?:-\d{5})?\.bin$")  # what a prepare writes


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
    inputs: list[str | Path | InputSpec] | None = None,
    text_field: str = "text",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    progress: bool = True,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir`; returns the contents of its meta.json.

    `inputs`: files, directories and globs (a str may end in `:WEIGHT`, see `parse_input`);
    `hf_dataset`: a dataset name for `datasets.load_dataset`, streamed, read after them.
    Deterministic for a given input, tokenizer settings and seed, whatever `workers`
    (processes that tokenize; default: one per core, fewer for a small corpus; 1: in this
    process): documents are read in sorted order and the validation documents are drawn
    by `random.Random(seed)`. With weights, train.bin is the mixture `mixture_plan` draws,
    and meta.json's `mixture` says what each source got. A split of more than
    `shard_tokens` tokens is written as shards.

    The workers are started by `spawn`, which imports the calling script again in each:
    a script that calls this with more than one worker needs the usual
    `if __name__ == "__main__":` guard around its work.
    """
    out_dir = Path(out_dir)
    if not 0.0 < val_fraction < 1.0:
        raise SubLLMError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer is None and not 257 <= vocab_size <= 1 << 32:
        raise SubLLMError(
            f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {vocab_size}"
        )
    for name, value in (("workers", workers), ("shard-tokens", shard_tokens)):
        if value is not None and value < 1:
            raise SubLLMError(f"--{name} must be at least 1, got {value}")
    sources, descriptions = resolve_sources(inputs, hf_dataset)
    options = ReadOptions(text_field, hf_split, hf_config, ChatRenderer(tokenizer))
    mixed = sources[0].weight is not None

    # Pass 1: read everything once, so bad input fails before anything is written.
    stats = CorpusStats()
    bars = progress and sys.stderr.isatty()  # no progress bars in logs and pipes
    per_source = _count_documents(sources, options, stats, bars)
    if stats.documents == 0:
        counts = ", ".join(f"{v} {k}" for k, v in stats.skipped.items() if v)
        raise SubLLMError(
            f"no text found in {stats.files} input(s) ({counts or 'nothing readable'}); "
            "give UTF-8 text files, directories of them, or records with a text field "
            "(.jsonl, .json, .parquet, a Hugging Face dataset)"
        )
    n_docs = stats.documents
    is_val = (_split_per_source(sources, per_source, val_fraction, seed) if mixed
              else _split_documents(n_docs, val_fraction, seed))

    def texts(split: str | None = None) -> Iterator[str]:
        docs = (text for source in sources
                for text in iter_documents(source.units, options, CorpusStats()))
        for i, text in enumerate(docs):
            if split is None or is_val[i] == (split == "val"):
                yield text

    created = _make_out_dir(out_dir)
    tmp = {name: out_dir / f".{name}.tmp-{os.getpid()}" for name in ("tokenizer.json",
                                                                     "meta.json")}
    files: dict[str, SplitFile] = {}
    try:
        # Pass 2: the tokenizer, trained on the training documents only (each once).
        n_train = n_docs - int(is_val.sum())
        tok, eot_id = _make_tokenizer(tokenizer, vocab_size,
                                      texts("train" if n_train < n_docs else None), n_train,
                                      tmp["tokenizer.json"], progress)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)

        # Pass 3: encode; mixing writes the training documents to the pool, then draws.
        for split in ("pool", "train", "val") if mixed else ("train", "val"):
            files[split] = SplitFile(out_dir, split, None if split == "pool" else shard_tokens)
        sink = _Sink({"train": files["pool" if mixed else "train"], "val": files["val"]},
                     is_val, val_fraction, _token_bar(stats.bytes, bars), keep_lengths=mixed)
        with sink.bar:
            # data._BATCH_DOCS passed on, so that setting it here (tests: small batches) works
            _encode_batches(_batches(texts(), _BATCH_DOCS), Encoder(tok, eot_id, dtype),
                            _workers(workers, stats), sink, tmp["tokenizer.json"])
        doc_counts = sink.documents
        mixture = None
        if mixed:
            files["pool"].close()
            mixture = _mix(sources, per_source, np.concatenate(sink.lengths), is_val,
                           files["pool"].temps[0], files["train"], dtype, seed)
            files.pop("pool").temps[0].unlink()
            doc_counts["train"] = sum(entry["documents"] for entry in mixture)
        for f in files.values():
            f.close()
        counts = {split: files[split].tokens for split in ("train", "val")}
        if n_docs == 1:
            doc_counts = {"train": 1, "val": 0}
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
            "documents": doc_counts,
            "split": "tokens" if n_docs == 1 else "documents",
            "val_fraction": val_fraction,
            "seed": seed,
            "tokenizer_sha256": sha256_file(tmp["tokenizer.json"]),
            "tokenizer_source": str(Path(tokenizer).resolve()) if tokenizer else "trained",
            "sources": descriptions,
            "text_field": text_field,
            "files": stats.files,
            "bytes": stats.bytes,
            "skipped": stats.skipped,
        }
        if any(u.kind.startswith("hf-") for source in sources for u in source.units):
            meta["hf_split"], meta["hf_config"] = hf_split, hf_config
        if mixture is not None:
            meta["mixture"] = mixture
        shards = {split: f.index() for split, f in files.items() if len(f.counts) > 1}
        if shards:
            meta["shards"] = shards
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        _publish(out_dir, tmp, files)
    except BaseException:
        for f in files.values():
            f.close()
        for path in (*tmp.values(), *(p for f in files.values() for p in f.temps)):
            path.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return meta


def _publish(out_dir: Path, tmp: dict[str, Path], files: dict[str, SplitFile]) -> None:
    """Rename the outputs into place, meta.json last (its presence marks a complete data
    directory), then remove the token files of an earlier prepare that this one did not
    write (shards where there is now one file, or more shards than now)."""
    renames = [(tmp["tokenizer.json"], "tokenizer.json"),
               *((t, n) for f in files.values() for t, n in zip(f.temps, f.names(), strict=True)),
               (tmp["meta.json"], "meta.json")]
    with _signals_deferred():
        for temp, name in renames:
            os.replace(temp, out_dir / name)
        for p in out_dir.iterdir():
            if _TOKEN_FILE.match(p.name) and p.name not in {n for _, n in renames}:
                p.unlink(missing_ok=True)


def _token_bar(chars: int, enabled: bool) -> Any:
    """Pass 3's progress: the share of the text (pass 1 counted it) for the ETA, and the
    tokens so far with their rate."""
    return tqdm(total=chars, desc="tokenizing", unit=" chars", unit_scale=True,
                disable=not enabled, bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")


def _workers(requested: int | None, stats: CorpusStats) -> int:
    """The processes to tokenize with: as asked, or by default one per core, but fewer
    for a small corpus (starting one takes about half a second; and one process
    tokenizes with every core already, only not its own reading and writing)."""
    if requested is not None:
        return requested
    return max(1, min(available_cores(), stats.bytes // _AUTO_CHARS_PER_WORKER))


def _count_documents(sources: list[Source], options: ReadOptions, stats: CorpusStats,
                     bars: bool) -> list[int]:
    """Pass 1: read every source (errors surface here), counting documents per source."""
    per_source = []
    with tqdm(desc="reading", unit=" docs", disable=not bars, leave=False) as bar:
        for source in sources:
            before = stats.documents
            for _ in iter_documents(source.units, options, stats):
                bar.update()
            per_source.append(stats.documents - before)
    return per_source


def _split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Whether each document is a validation document; a single document (one big .txt)
    is split by tokens instead (none here)."""
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1) if n_docs > 1 else 0
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[random.Random(seed).sample(range(n_docs), n_val)] = True
    return is_val


def _split_per_source(sources: list[Source], per_source: list[int], val_fraction: float,
                      seed: int) -> np.ndarray:
    """The validation documents of mixed sources, drawn from each source alike (before
    mixing, so no document is in both splits; validation stays unmixed)."""
    rng = random.Random(seed)
    val: list[int] = []
    start = 0
    for source, n in zip(sources, per_source, strict=True):
        if n < 2:
            raise SubLLMError(f"source {source.name} has {n} document(s); a mixed source needs "
                              "at least 2 (validation takes whole documents)")
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        val += [start + i for i in rng.sample(range(n), n_val)]
        start += n
    is_val = np.zeros(start, dtype=bool)
    is_val[val] = True
    return is_val


def _make_tokenizer(tokenizer: str | Path | None, vocab_size: int, texts: Iterator[str],
                    n_texts: int, out: Path, progress: bool) -> tuple[Any, int]:
    """Pass 2: (the tokenizer, its end-of-text id), saved as `out`: trained on `texts`, or
    the given tokenizer.json, or a model directory's tokenizer."""
    eos_id = None  # a model directory's tokenizer_config.json eos token
    if tokenizer is None:
        if progress:
            print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) "
                  f"on {n_texts} documents", file=sys.stderr)
        tok = train_tokenizer(texts, vocab_size, length=n_texts)
        tok.save(str(out))
    elif Path(tokenizer).is_dir():  # a model's: encode as transformers' AutoTokenizer
        tok, eos_id = model_tokenizer(tokenizer)
        tok.save(str(out))  # with the post-processor it applies
    else:
        tok = load_tokenizer(tokenizer)
        shutil.copyfile(tokenizer, out)
    try:
        return tok, eot_id_of(tok, tokenizer or "tokenizer.json")
    except SubLLMError:  # a model directory's tokenizer names its own eos token
        if eos_id is None:
            raise
        return tok, eos_id


# ---------------------------------------------------------------------------------------------
# Mixing sources


def _mix(sources: list[Source], per_source: list[int], sizes: np.ndarray, is_val: np.ndarray,
         pool: Path, out: SplitFile, dtype: np.dtype, seed: int) -> list[dict[str, Any]]:
    """Write the mixed train.bin from the pool (the training documents, each once, in
    reading order); returns meta.json's `mixture` (and prints the shares it reached)."""
    source_of = np.repeat(np.arange(len(sources)), per_source)
    lengths, source = sizes[~is_val], source_of[~is_val]
    order = mixture_plan(lengths, source, [s.weight for s in sources], seed)
    _write_documents(pool, out, dtype, lengths, order)

    n = len(sources)
    own = np.bincount(source, weights=lengths, minlength=n)
    got = np.bincount(source[order], weights=lengths[order], minlength=n)
    docs = np.bincount(source[order], minlength=n)
    val_tokens = np.bincount(source_of[is_val], weights=sizes[is_val], minlength=n)
    val_docs_n = np.bincount(source_of[is_val], minlength=n)
    weight_sum = sum(s.weight for s in sources)
    mixture = [{"source": s.name, "weight": round(s.weight / weight_sum, 6),
                "tokens": int(got[i]), "share": round(float(got[i] / got.sum()), 6),
                "documents": int(docs[i]), "repeats": round(float(got[i] / own[i]), 4),
                "val_tokens": int(val_tokens[i]), "val_documents": int(val_docs_n[i])}
               for i, s in enumerate(sources)]
    for entry in mixture:
        if abs(entry["share"] - entry["weight"]) > 0.01:  # documents too long to hit it
            warnings.warn(f"source {entry['source']} got {entry['share']:.1%} of the training "
                          f"tokens for a weight of {entry['weight']:.1%}: its documents are "
                          "long next to the mixture; give more, shorter documents",
                          SubLLMWarning, stacklevel=3)
    return mixture


def _write_documents(pool: Path, out: SplitFile, dtype: np.dtype, lengths: np.ndarray,
                     order: np.ndarray) -> None:
    """Copy documents of the pool (back to back, `lengths` tokens each) to `out` in
    `order`, a block of documents at a time."""
    tokens = np.memmap(pool, dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(lengths)])
    step = _BATCH_DOCS * 16
    for first in range(0, len(order), step):
        block = order[first:first + step]
        out.write(np.concatenate([tokens[starts[d]:starts[d + 1]] for d in block]))


# ---------------------------------------------------------------------------------------------
# Reading a prepared directory


class ShardedTokens:
    """A split written as shards, read as one array the way batches read a memmap: len(),
    a slice [a:b] (one that crosses a shard boundary is joined), an index, np.asarray."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self.starts = [0, *itertools.accumulate(len(s) for s in shards)]
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: int | slice) -> Any:
        if not isinstance(key, slice):
            i = range(len(self))[key]  # negative indices, and IndexError past the end
            k = bisect.bisect_right(self.starts, i) - 1
            return self.shards[k][i - self.starts[k]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("sharded tokens are sliced with step 1 only")
        parts = []
        k = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[k + 1])
            parts.append(self.shards[k][start - self.starts[k]:end - self.starts[k]])
            start, k = end, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [self.shards[0][:0]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


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

    def files(self, split: str) -> list[tuple[Path, int]]:
        """The split's token files and their token counts: `{split}.bin`, or its shards."""
        index = self.meta.get("shards", {}).get(split)
        if index is None:
            return [(self.path / f"{split}.bin", int(self.meta["tokens"][split]))]
        return [(self.path / Path(e["file"]).name, int(e["tokens"])) for e in index]

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The split's token ids: a read-only memory map, or `ShardedTokens` of several."""
        maps = [np.memmap(path, dtype=self.meta["dtype"], mode="r", shape=(n,))
                for path, n in self.files(split)]
        return maps[0] if len(maps) == 1 else ShardedTokens(maps)


def load_data(data_dir: str | Path) -> TokenData:
    path = Path(data_dir)
    hint = f"run `subllm prepare --out {path}` first"
    if not path.is_dir():
        raise SubLLMError(f"data directory {path} does not exist; {hint}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise SubLLMError(f"{path} is not a prepared data directory (no meta.json); {hint}")
    try:
        data = TokenData(path, json.loads(meta_path.read_text()))
        itemsize = np.dtype(data.meta["dtype"]).itemsize
        for split in ("train", "val"):
            files = data.files(split)
            if sum(n for _, n in files) != int(data.meta["tokens"][split]):
                raise SubLLMError(f"{meta_path}: the {split} shards do not add up to its "
                                  f"tokens; the directory is damaged, {hint} again")
            for file, n in files:
                actual = file.stat().st_size
                if actual != n * itemsize:
                    raise SubLLMError(
                        f"{file} has {actual} bytes, meta.json says {n * itemsize}; "
                        f"the directory is damaged, {hint} again"
                    )
        int(data.meta["vocab_size"]), int(data.meta["eot_id"])
    except SubLLMError:
        raise  # already says what is wrong (it is a ValueError too)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SubLLMError(f"{path} is not a valid data directory ({e!r}); {hint} again") from None
    if not (path / "tokenizer.json").is_file():
        raise SubLLMError(f"{path} has no tokenizer.json; {hint} again")
    return data


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
        tokens: np.ndarray | ShardedTokens,
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
        import torch

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
        import torch

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
    tokens: np.ndarray | ShardedTokens, batch_size: int, seq_len: int,
    max_batches: int | None = None
) -> list[torch.Tensor]:
    """Deterministic validation batches: consecutive windows from the start of val.bin.

    A validation split shorter than one window gives one shorter window.
    """
    import torch

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
    for entry in meta.get("mixture", ()):  # the shares the mixture reached
        print(f"  {entry['share']:.2%} of train tokens (weight {entry['weight']:.2%}, "
              f"{entry['tokens']:,} tokens, x{entry['repeats']:.2f}): {entry['source']}")


