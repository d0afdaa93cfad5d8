"""Corpus preparation (`subllm prepare`) and the token batches that training reads.

Inputs (`prepare(inputs=..., hf_dataset=...)`): files, directories (walked recursively,
sorted) and globs, each file read as its name says:
    *.txt and any other UTF-8 text      one document per file (also .txt.gz, .txt.zst)
    *.jsonl, *.jsonl.gz, *.jsonl.zst    one record per line
    *.json                              a JSON array of records
    *.parquet                           one record per row, streamed a batch at a time
    a `datasets` save_to_disk directory one record per row of its --hf-split
and a dataset by name, streamed through `datasets.load_dataset`. A record's document is
its text field, or a chat (`messages`, a list of {role, content}) rendered with the
tokenizer's chat template or as `role: content` lines. A bad record fails the first pass,
before anything is written, naming the file and the record.

Mixing: inputs given weights (`a.jsonl:0.7`) are sources, each weight its share of the
training tokens. Mixing happens here, so train.bin is the mixed stream (whole documents,
small sources repeated; `mixture_plan`) and training, whose exact resume depends only on
train.bin and its seed, needs nothing more. Validation documents are drawn per source
before mixing and stay unmixed.

A prepared data directory holds
    tokenizer.json   byte-level BPE (Hugging Face `tokenizers`), with an end-of-text token
    train.bin        token ids of the training documents, each as its tokenizer encodes it
                     (a BOS first where its template adds one) and followed by end-of-text
    val.bin          the same for the validation documents (split by document)
    meta.json        token counts, dtype, vocab size, eot id, tokenizer sha256, sources
                     (and with weights, `mixture`: the shares each source got)
`meta.json` is written last, so a directory without it is incomplete.
The .bin files are flat arrays (uint16 when the vocabulary fits, else uint32) read through
`numpy.memmap`, so corpora larger than memory train fine.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import sysconfig
import threading
import warnings
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

META_FORMAT = 1
_BINARY_SNIFF_BYTES = 8192
_ENCODE_BATCH_DOCS = 256


# ---------------------------------------------------------------------------------------------
# Naming the inputs


@dataclass(frozen=True)
class InputSpec:
    """One input as given: a file, directory or glob (or, with `hub`, a dataset name for
    `datasets.load_dataset`), and its mixing weight (None: not mixed)."""

    target: str
    weight: float | None = None
    hub: bool = False

    def describe(self) -> str:
        """How meta.json names it: an absolute path, or `hf:NAME`."""
        return f"hf:{self.target}" if self.hub else str(Path(self.target).resolve())


def check_weight(value: Any, what: str) -> float:
    """A mixing weight: a finite number > 0 (weights are normalised to shares later)."""
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not (weight > 0 and math.isfinite(weight)):
        raise SubLLMError(f"the weight of {what} must be a positive number, got {value}")
    return weight


def parse_input(raw: str | Path | InputSpec, hub: bool = False) -> InputSpec:
    """`PATH` or `PATH:WEIGHT` (`shards/*.parquet:0.3`). The part after the last colon is a
    weight only when it reads as a number and the whole string names no existing path (so
    a file called `notes:2` is still read as itself). A Path is taken as it is."""
    if isinstance(raw, InputSpec):
        return raw
    if isinstance(raw, Path):
        return InputSpec(str(raw), hub=hub)
    head, colon, tail = raw.rpartition(":")
    if not colon or os.path.exists(raw):
        return InputSpec(raw, hub=hub)
    try:
        float(tail)
    except ValueError:
        return InputSpec(raw, hub=hub)  # a colon inside a name, e.g. a URL or a drive
    if not head.strip():
        raise SubLLMError(f"input {raw!r} has a weight but no path; write PATH:WEIGHT")
    return InputSpec(head, check_weight(tail, head), hub=hub)


@dataclass(frozen=True)
class Unit:
    """One thing documents are read from. `kind` says how: text (one document per file,
    .txt.gz / .txt.zst decompressed), jsonl (also .gz / .zst), json (an array of records),
    parquet, hf-disk (a `save_to_disk` directory), hf-hub (`location` is a dataset name)."""

    kind: str
    location: str


@dataclass(frozen=True)
class Source:
    """Units read one after another as one stream of documents; `weight` is its target
    share of the training tokens when sources are mixed (None: not mixed)."""

    name: str
    units: tuple[Unit, ...]
    weight: float | None = None


_SUFFIX_KINDS = ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".jsonl.zst", "jsonl"),
                 (".json", "json"), (".parquet", "parquet"), (".txt.gz", "text"),
                 (".txt.zst", "text"))


def is_saved_dataset(directory: Path) -> bool:
    """Whether `datasets`' save_to_disk wrote this directory (a Dataset or a DatasetDict)."""
    return (directory / "dataset_dict.json").is_file() or (
        (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file())


def _unit_of(path: Path) -> Unit:
    if path.is_dir():
        return Unit("hf-disk", str(path))
    kind = next((k for suffix, k in _SUFFIX_KINDS if path.name.endswith(suffix)), "text")
    return Unit(kind, str(path))


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
    """Files under a directory, recursively, hidden entries and caches skipped, sorted; a
    `save_to_disk` directory inside is one entry (its Arrow files are not text)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        here = Path(dirpath)
        saved = {d for d in dirnames if is_saved_dataset(here / d)}
        found += [here / d for d in saved if not d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d != "__pycache__" and d not in saved)
        found += [here / f for f in sorted(filenames) if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def input_paths(spec: InputSpec) -> list[Path]:
    """The paths an input names: itself, or a glob's matches in sorted order."""
    if spec.hub:
        return []
    if not os.path.exists(spec.target) and any(c in spec.target for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(spec.target, recursive=True))]
    return [Path(spec.target)]


def _units_of(spec: InputSpec) -> list[Unit]:
    """What an input reads, in order; a missing path or an empty directory is an error."""
    if spec.hub:
        return [Unit("hf-hub", spec.target)]
    paths = input_paths(spec)
    if not paths:
        raise SubLLMError(f"input {spec.target} matches no files; check the --input pattern")
    units = []
    for path in paths:
        if not path.exists():
            raise SubLLMError(f"input {path} does not exist; check the --input path")
        if path.is_dir() and not is_saved_dataset(path):
            found = _walk(path)
            if not found:
                hidden = any(p.name.startswith(".") for p in path.iterdir())
                raise SubLLMError(
                    f"input directory {path} holds no files to read" + (
                        " (hidden files and folders are skipped)" if hidden else " (it is empty)")
                    + "; point --input at your text")
            units += [_unit_of(p) for p in found]
        elif not path.is_dir() and not path.is_file():
            raise SubLLMError(f"input {path} is not a regular file (a FIFO, socket or device); "
                              "pass a text file or a directory")
        else:
            units.append(_unit_of(path))
    return units


def resolve_sources(
    inputs: list[str | Path | InputSpec] | None, hf_dataset: str | None = None
) -> tuple[list[Source], list[str]]:
    """Inputs -> (sources to read, descriptions for meta.json). Without weights all inputs
    are one source, read in the order given; with weights each input is a source."""
    specs = [parse_input(raw) for raw in inputs or ()]
    if hf_dataset is not None:
        specs.append(parse_input(hf_dataset, hub=True))
    if not specs:
        files = default_corpus_files()
        stdlib = sysconfig.get_paths()["stdlib"]
        version = ".".join(map(str, sys.version_info[:3]))
        name = f"python-stdlib {version}: {stdlib}"
        return [Source(name, tuple(Unit("text", str(f)) for f in files))], [name]
    weighted = [spec.weight is not None for spec in specs]
    if any(weighted) and not all(weighted):
        raise SubLLMError("some inputs have a weight and some do not; give every input a "
                          "weight (PATH:WEIGHT) to mix them, or none")
    names = [spec.describe() for spec in specs]
    if not any(weighted):
        return [Source(", ".join(names), tuple(u for s in specs for u in _units_of(s)))], names
    return [Source(name, tuple(_units_of(spec)), spec.weight)
            for name, spec in zip(names, specs, strict=True)], names


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


class ChatRenderer:
    """A chat (a list of {role, content}) as one document's text: through the chat template
    of the --tokenizer model directory when its tokenizer has one (transformers'
    `apply_chat_template(messages, tokenize=False)`), else as `role: content` lines."""

    def __init__(self, tokenizer: str | Path | None = None) -> None:
        self.tokenizer = tokenizer
        self._loaded = False
        self._hf: Any = None  # the AutoTokenizer with a chat template, or None
        self._bos: str | None = None  # a BOS the template writes and the encoding adds too

    def __call__(self, messages: list[dict], where: str) -> str:
        for i, message in enumerate(messages):
            if not (isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise SubLLMError(f"{where}: chat message {i} needs a string `role` and "
                                  "`content`; fix the record or pass --text-field")
        hf = self._template()
        if hf is None:
            return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        try:
            text = hf.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # jinja raises what the template says (roles out of order...)
            raise SubLLMError(f"{where}: the tokenizer's chat template cannot render this "
                              f"chat ({_first_line(e)})") from None
        if self._bos and text.startswith(self._bos):
            text = text[len(self._bos):]
        return text

    def _template(self) -> Any:
        if not self._loaded:
            self._loaded = True
            directory = Path(self.tokenizer) if self.tokenizer is not None else None
            if directory is not None and (directory / "tokenizer_config.json").is_file():
                from transformers import AutoTokenizer

                try:
                    hf = AutoTokenizer.from_pretrained(str(directory))
                except Exception as e:
                    raise SubLLMError(f"transformers cannot load the tokenizer in {directory} "
                                      f"({_first_line(e)}); pass its tokenizer.json") from None
                if getattr(hf, "chat_template", None):
                    self._hf = hf
                    # prepare encodes with the tokenizer's special tokens: a BOS the
                    # template writes as text would come out twice
                    if hf.bos_token_id is not None and hf("")["input_ids"][:1] == [
                            hf.bos_token_id]:
                        self._bos = hf.bos_token
        return self._hf


@dataclass
class ReadOptions:
    """How records become documents: the text field, the split of a `datasets` dataset
    (and the configuration of one loaded by name), the renderer of chats."""

    text_field: str = "text"
    hf_split: str = "train"
    hf_config: str | None = None
    chat: ChatRenderer = field(default_factory=ChatRenderer)


_CHUNK_BYTES = 1 << 16  # compressed bytes per step: a broken stream is found near its line
_BATCH_ROWS = 1024  # Parquet / Arrow rows per batch: documents can be long


class _BrokenStream(Exception):
    """A compressed stream that does not decompress (zstandard's error, or a cut frame)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise SubLLMError("reading .zst files needs the zstandard package: "
                          "pip install zstandard") from None
    return zstandard


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a .zst file, frame after frame. A file that ends inside
    a frame is an error (zstandard's stream reader would end quietly, a document short)."""
    zstd = _zstandard()
    new = zstd.ZstdDecompressor().decompressobj
    state = new()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            while chunk:
                if state.eof:
                    state = new()
                try:
                    yield state.decompress(chunk)
                except zstd.ZstdError as e:
                    raise _BrokenStream(str(e)) from None
                chunk = state.unused_data if state.eof else b""
    if not state.eof:
        raise _BrokenStream("the file ends inside a zstd frame")


def _raw_lines(path: Path) -> Iterator[bytes]:
    """A file's lines as bytes, decompressed when its name ends in .gz or .zst."""
    if path.name.endswith(".zst"):
        yield from _lines(_zstd_chunks(path))
        return
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")) as f:
        yield from f


_READ_ERRORS = (OSError, EOFError, zlib.error, _BrokenStream)  # gzip says EOFError when cut


def _read_failure(path: Path, lines: int | None, e: BaseException) -> SubLLMError:
    """A file that cannot be opened, or (`lines` read before it broke) decompressed."""
    if lines is None or (isinstance(e, OSError) and e.errno is not None):
        return SubLLMError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    return SubLLMError(f"{path}: reading stops after line {lines} ({_first_line(e)}); the "
                       "file is truncated or corrupt")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _text_of(data: bytes, stats: CorpusStats) -> str | None:
    """A file's text, or None (counted) when it is binary, not UTF-8, or empty."""
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


def _text_document(path: Path, stats: CorpusStats) -> str | None:
    """A text file's document; only .txt.gz / .txt.zst are decompressed (any other .gz is
    skipped as binary, as it always was: it may be a large archive)."""
    try:
        if path.name.endswith(".txt.zst"):
            data = b"".join(_zstd_chunks(path))
        elif path.name.endswith(".txt.gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except _READ_ERRORS as e:
        raise _read_failure(path, None, e) from None
    return _text_of(data, stats)


# Record readers: (where, record) pairs, `where` naming the file and the record in messages
# (`file:LINE` for JSON lines, `file record I` / `file row I` counted from 0 for the rest).


def _jsonl_records(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    lineno = 0
    try:
        for lineno, raw in enumerate(_raw_lines(path), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SubLLMError(f"{path}:{lineno} is not UTF-8 text; convert the file to "
                                  "UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SubLLMError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); "
                    "a .jsonl file needs one JSON object per line"
                ) from None
            yield f"{path}:{lineno}", record
    except _READ_ERRORS as e:
        raise _read_failure(path, lineno, e) from None


def _json_records(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise _read_failure(path, None, e) from None
    except UnicodeDecodeError:
        raise SubLLMError(f"{path} is not UTF-8 text; convert it to UTF-8") from None
    except json.JSONDecodeError as e:
        raise SubLLMError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); a .json "
            "input is one JSON array of records (name a file of one object per line .jsonl)"
        ) from None
    if not isinstance(data, list):
        raise SubLLMError(f"{path} holds a JSON {_json_type(data)}, not an array of records; "
                          "a .json input is a JSON array of objects with a text field")
    for i, record in enumerate(data):
        yield f"{path} record {i}", record


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else
                     type(value).__name__)


def _text_column(columns: list[str], options: ReadOptions, where: str) -> str:
    """The column to read: the text field, else a chat's `messages`."""
    for name in (options.text_field, "messages"):
        if name in columns:
            return name
    raise _missing_field(where, options.text_field, columns)


def _missing_field(where: str, name: str, fields: list[str]) -> SubLLMError:
    return SubLLMError(f"{where} has no field `{name}` (its fields: "
                       f"{', '.join(map(str, fields)) or 'none'}); pass --text-field NAME")


def _parquet_records(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    """Rows of the text column, a batch at a time (never the whole file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as parquet:
            column = _text_column(parquet.schema_arrow.names, options, f"{path} row 0")
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[column]):
                for value in batch.column(0).to_pylist():
                    yield f"{path} row {row}", {column: value}
                    row += 1
    except (pa.ArrowException, OSError) as e:
        raise SubLLMError(f"{path} row {row}: cannot read it as Parquet ({_first_line(e)}); "
                          "the file is truncated or corrupt") from None


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise SubLLMError("reading a Hugging Face dataset needs the datasets package: "
                          "pip install datasets") from None
    return datasets


def _saved_dataset_records(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    """Rows of a `save_to_disk` directory (its --hf-split, for a DatasetDict), a batch at a
    time from the memory-mapped Arrow files."""
    datasets = _datasets()
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many kinds; say which and where
        raise SubLLMError(f"cannot load the saved dataset {path} ({_first_line(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if options.hf_split not in dataset:
            raise SubLLMError(f"{path} has no split `{options.hf_split}` (its splits: "
                              f"{', '.join(dataset)}); pass --hf-split NAME")
        dataset = dataset[options.hf_split]
    column = _text_column(dataset.column_names, options, f"{path} row 0")
    row = 0
    try:
        for batch in dataset.select_columns([column]).iter(batch_size=_BATCH_ROWS):
            for value in batch[column]:
                yield f"{path} row {row}", {column: value}
                row += 1
    except Exception as e:
        raise SubLLMError(f"{path} row {row}: cannot read the saved dataset "
                          f"({_first_line(e)}); it is damaged") from None


def _hub_records(name: str, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    """Rows of `datasets.load_dataset(name, config, split=..., streaming=True)`."""
    datasets = _datasets()
    try:
        dataset = datasets.load_dataset(name, options.hf_config, split=options.hf_split,
                                        streaming=True)
        if dataset.column_names:  # known up front for most formats: read only that column
            dataset = dataset.select_columns(
                [_text_column(dataset.column_names, options, f"{name} row 0")])
    except SubLLMError:
        raise
    except Exception as e:
        raise SubLLMError(f"cannot load the dataset {name} ({_first_line(e)}); check "
                          "--hf-dataset, --hf-config and --hf-split") from None
    row = 0
    try:
        for record in dataset:
            yield f"{name} row {row}", record
            row += 1
    except Exception as e:
        raise SubLLMError(f"{name} row {row}: cannot read the dataset "
                          f"({_first_line(e)})") from None


_RECORD_READERS = {"jsonl": _jsonl_records, "json": _json_records,
                   "parquet": _parquet_records, "hf-disk": _saved_dataset_records}


def _record_text(where: str, record: Any, options: ReadOptions) -> str:
    """The document of a record: its text field, or its chat (`messages`, or a text field
    holding one) rendered by `options.chat`."""
    name = options.text_field
    if not isinstance(record, dict):
        raise SubLLMError(f"{where} is a JSON {_json_type(record)}, not an object with a "
                          f"`{name}` field")
    if name not in record and isinstance(record.get("messages"), list):
        name = "messages"
    if name not in record:
        raise _missing_field(where, options.text_field, list(record))
    value = record[name]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return options.chat(value, where)
    if not isinstance(value, str):
        raise SubLLMError(
            f"{where}: field `{name}` is {_json_type(value)}, not a string; pass "
            "--text-field naming a text field"
        )
    return value


def _unit_documents(unit: Unit, options: ReadOptions, stats: CorpusStats) -> Iterator[str]:
    if unit.kind == "hf-hub":
        records = _hub_records(unit.location, options)
    else:
        path = Path(unit.location)
        if unit.kind != "hf-disk" and not path.is_file():  # a FIFO would block or never end
            stats.skipped["not regular files"] = stats.skipped.get("not regular files", 0) + 1
            return
        if unit.kind == "text":
            text = _text_document(path, stats)
            if text is not None:
                yield text
            return
        records = _RECORD_READERS[unit.kind](path, options)
    for where, record in records:
        text = _record_text(where, record, options)
        if not text.strip():
            stats.skipped["empty"] += 1
            continue
        yield text


def iter_documents(
    units: Iterable[Unit], options: ReadOptions, stats: CorpusStats
) -> Iterator[str]:
    """Documents in a fixed order: one per text file, one per record of the rest."""
    for unit in units:
        stats.files += 1
        for text in _unit_documents(unit, options, stats):
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
# prepare's temporaries in the output directory: `.train.bin.tmp-PID` (and the training
# documents before mixing, `.pool.bin.tmp-PID`), `.write-test-PID`
_TEMPORARY = re.compile(r"^\.(?:(?:tokenizer\.json|train\.bin|val\.bin|meta\.json|pool\.bin)"
                        r"\.tmp|write-test)-(?P<pid>\d+)$")


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
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir`; returns the contents of its meta.json.

    `inputs`: files, directories and globs (a str may end in `:WEIGHT`, see `parse_input`);
    `hf_dataset`: a dataset name for `datasets.load_dataset`, streamed, read after them.
    Deterministic for a given input, tokenizer settings and seed: documents are read in
    sorted order and the validation documents are drawn by `random.Random(seed)`. With
    weights, train.bin is the mixture `mixture_plan` draws, and meta.json's `mixture` says
    what each source got.
    """
    out_dir = Path(out_dir)
    if not 0.0 < val_fraction < 1.0:
        raise SubLLMError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer is None and not 257 <= vocab_size <= 1 << 32:
        raise SubLLMError(
            f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {vocab_size}"
        )
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
    val_docs = (_split_per_source(sources, per_source, val_fraction, seed) if mixed
                else _split_documents(n_docs, val_fraction, seed))
    n_val = len(val_docs)

    def texts(split: str | None = None) -> Iterator[str]:
        docs = (text for source in sources
                for text in iter_documents(source.units, options, CorpusStats()))
        for i, text in enumerate(docs):
            if split is None or (i in val_docs) == (split == "val"):
                yield text

    created = _make_out_dir(out_dir)
    tmp = {name: out_dir / f".{name}.tmp-{os.getpid()}" for name in OUTPUTS}
    pool = out_dir / f".pool.bin.tmp-{os.getpid()}"  # mixing: the training documents, once
    try:
        # Pass 2: the tokenizer, trained on the training documents only (each once).
        tok, eot_id = _make_tokenizer(tokenizer, vocab_size, texts("train" if n_val else None),
                                      n_docs - n_val, tmp["tokenizer.json"], progress)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)

        # Pass 3: encode; mixing writes the training documents to the pool, then draws.
        with open(pool if mixed else tmp["train.bin"], "wb") as f_train, \
                open(tmp["val.bin"], "wb") as f_val:
            counts, doc_counts, sizes = _encode(
                tok, eot_id, dtype, texts(), val_docs, {"train": f_train, "val": f_val},
                tqdm(total=n_docs, desc="tokenizing", unit=" docs", disable=not bars),
                keep_sizes=mixed)
        mixture = None
        if mixed:
            mixture = _mix(sources, per_source, sizes, val_docs, pool, tmp["train.bin"],
                           dtype, seed)
            pool.unlink()
            counts["train"] = sum(entry["tokens"] for entry in mixture)
            doc_counts["train"] = sum(entry["documents"] for entry in mixture)
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
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        # meta.json goes last: its presence marks a complete data directory.
        with _signals_deferred():
            for name in OUTPUTS:
                os.replace(tmp[name], out_dir / name)
    except BaseException:
        for path in (*tmp.values(), pool):
            path.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return meta


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


def _split_documents(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    """The validation documents; a single document (one big .txt) is split by tokens
    instead (none here)."""
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1) if n_docs > 1 else 0
    return set(random.Random(seed).sample(range(n_docs), n_val))


def _split_per_source(sources: list[Source], per_source: list[int], val_fraction: float,
                      seed: int) -> set[int]:
    """The validation documents of mixed sources, drawn from each source alike (before
    mixing, so no document is in both splits; validation stays unmixed)."""
    rng = random.Random(seed)
    val: set[int] = set()
    start = 0
    for source, n in zip(sources, per_source, strict=True):
        if n < 2:
            raise SubLLMError(f"source {source.name} has {n} document(s); a mixed source needs "
                              "at least 2 (validation takes whole documents)")
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        val.update(start + i for i in rng.sample(range(n), n_val))
        start += n
    return val


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


def _encode(tok: Any, eot_id: int, dtype: np.dtype, texts: Iterator[str], val_docs: set[int],
            outs: dict[str, Any], bar: Any, keep_sizes: bool
            ) -> tuple[dict[str, int], dict[str, int], array]:
    """Pass 3: encode in batches (the Rust side uses every core), each document as the
    tokenizer encodes it (its post-processor: a BOS first where its template adds one),
    then eot unless the template ended it with eot already; each to its split's file.
    Returns the token and document counts per split, and each document's token count
    when `keep_sizes`."""
    tok.no_truncation()  # whole documents, whatever lengths the tokenizer file sets
    tok.no_padding()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    counts = {"train": 0, "val": 0}
    doc_counts = {"train": 0, "val": 0}
    sizes = array("q")
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
            if keep_sizes:
                sizes.append(len(ids))
        bar.update(len(batch))
        batch.clear()

    with bar:
        for i, text in enumerate(texts):
            batch.append((i, text))
            if len(batch) == _ENCODE_BATCH_DOCS:
                flush()
        if batch:
            flush()
    return counts, doc_counts, sizes


# ---------------------------------------------------------------------------------------------
# Mixing sources


def mixture_plan(lengths: np.ndarray, source: np.ndarray, weights: list[float],
                 seed: int) -> np.ndarray:
    """The documents of the mixed training stream (indices into `lengths`, shuffled).

    Source s (its documents: `source == s`, T_s tokens) gets share_s = weight_s / sum of
    the weights of total = max_s(T_s / share_s) tokens: the source that sets the total is
    used once, every other one is repeated as its share needs and none is cut short. Each
    gets all its documents floor(target / T_s) times, then a random subset of them (drawn
    by `seed`) whose tokens come nearest the rest; so a share misses its weight by at most
    about one document's tokens.
    """
    rng = np.random.default_rng(seed)
    tokens = np.bincount(source, weights=lengths, minlength=len(weights)).astype(np.int64)
    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    total = float(np.max(tokens / shares))
    picks = []
    for s, share in enumerate(shares):
        docs = np.flatnonzero(source == s)
        copies, rest = divmod(round(share * total), int(tokens[s]))
        order = rng.permutation(docs)
        reached = np.cumsum(lengths[order])
        n = int(np.searchsorted(reached, rest))  # reached[n - 1] < rest <= reached[n]
        below = reached[n - 1] if n else 0
        if n < len(order) and reached[n] - rest < rest - below:
            n += 1  # one more document comes nearer
        picks += [np.tile(docs, copies), order[:n]]
    return rng.permutation(np.concatenate(picks))


def _mix(sources: list[Source], per_source: list[int], sizes: array, val_docs: set[int],
         pool: Path, out: Path, dtype: np.dtype, seed: int) -> list[dict[str, Any]]:
    """Write the mixed train.bin from the pool (the training documents, each once, in
    reading order); returns meta.json's `mixture` (and prints the shares it reached)."""
    sizes_np = np.frombuffer(sizes, dtype=np.int64)
    source_of = np.repeat(np.arange(len(sources)), per_source)
    is_val = np.zeros(len(sizes_np), dtype=bool)
    is_val[list(val_docs)] = True
    lengths, source = sizes_np[~is_val], source_of[~is_val]
    order = mixture_plan(lengths, source, [s.weight for s in sources], seed)
    _write_documents(pool, out, dtype, lengths, order)

    n = len(sources)
    own = np.bincount(source, weights=lengths, minlength=n)
    got = np.bincount(source[order], weights=lengths[order], minlength=n)
    docs = np.bincount(source[order], minlength=n)
    val_tokens = np.bincount(source_of[is_val], weights=sizes_np[is_val], minlength=n)
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


def _write_documents(pool: Path, out: Path, dtype: np.dtype, lengths: np.ndarray,
                     order: np.ndarray) -> None:
    """Copy documents of the pool (back to back, `lengths` tokens each) to `out` in
    `order`, a block of documents at a time."""
    tokens = np.memmap(pool, dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(lengths)])
    with open(out, "wb") as f:
        for first in range(0, len(order), _ENCODE_BATCH_DOCS * 16):
            block = order[first:first + _ENCODE_BATCH_DOCS * 16]
            f.write(b"".join(tokens[starts[d]:starts[d + 1]].tobytes() for d in block))


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
    for entry in meta.get("mixture", ()):  # the shares the mixture reached
        print(f"  {entry['share']:.2%} of train tokens (weight {entry['weight']:.2%}, "
              f"{entry['tokens']:,} tokens, x{entry['repeats']:.2f}): {entry['source']}")


