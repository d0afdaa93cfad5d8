"""Where `subllm prepare`'s documents come from: its inputs, their readers and their mixing.

Inputs (`resolve_sources`): files, directories (walked recursively, sorted) and globs, each
file read as its name says:
    *.txt and any other UTF-8 text      one document per file (also .txt.gz, .txt.zst)
    *.jsonl, *.jsonl.gz, *.jsonl.zst    one record per line
    *.json                              a JSON array of records
    *.parquet                           one record per row, streamed a batch at a time
    a `datasets` save_to_disk directory one record per row of its --hf-split
and a dataset by name, streamed through `datasets.load_dataset`. A record's document is
its text field, or a chat (`messages`, a list of {role, content}) rendered with the
tokenizer's chat template or as `role: content` lines (`ChatRenderer`). A bad record is
one error naming the file and the record. Files that hold no document are skipped and
counted (`CorpusStats.skipped`): binary, not UTF-8, empty, not regular files, and .json
files found in a walked directory that are not arrays of records (a code repository's
package.json); a .json named as an input must be one.

Mixing: inputs given weights (`a.jsonl:0.7`) are sources, each weight its share of the
training tokens; `mixture_plan` draws the documents of the mixed stream.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from subllm.errors import SubLLMError

_BINARY_SNIFF_BYTES = 8192
JSON_NOT_RECORDS = "json files that are not arrays of records"  # a skipped count's name


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
    parquet, hf-disk (a `save_to_disk` directory), hf-hub (`location` is a dataset name).
    `walked`: found in a directory, not named: a .json there that is not an array of
    records is someone's configuration, skipped rather than an error."""

    kind: str
    location: str
    walked: bool = False


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


def _unit_of(path: Path, walked: bool = False) -> Unit:
    if path.is_dir():
        return Unit("hf-disk", str(path))
    kind = next((k for suffix, k in _SUFFIX_KINDS if path.name.endswith(suffix)), "text")
    return Unit(kind, str(path), walked)


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
            units += [_unit_of(p, walked=True) for p in found]
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

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


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
        stats.skip("binary")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("undecodable")
        return None
    if not text.strip():
        stats.skip("empty")
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


class _NotRecords(SubLLMError):
    """A .json file that is not an array of records: an error when it was named as an input,
    skipped (and counted) when it was found in a walked directory."""


def _json_records(path: Path, options: ReadOptions) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise _read_failure(path, None, e) from None
    except UnicodeDecodeError:
        raise _NotRecords(f"{path} is not UTF-8 text; convert it to UTF-8") from None
    except json.JSONDecodeError as e:
        raise _NotRecords(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); a .json "
            "input is one JSON array of records (name a file of one object per line .jsonl)"
        ) from None
    if not isinstance(data, list):
        raise _NotRecords(f"{path} holds a JSON {_json_type(data)}, not an array of records; "
                          "a .json input is a JSON array of objects with a text field")
    if data and not isinstance(data[0], dict):  # e.g. a list of names: not records either
        raise _NotRecords(f"{path} record 0 is a JSON {_json_type(data[0])}, not an object "
                          f"with a `{options.text_field}` field")
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
            stats.skip("not regular files")
            return
        if unit.kind == "text":
            text = _text_document(path, stats)
            if text is not None:
                yield text
            return
        records = _RECORD_READERS[unit.kind](path, options)
    try:
        for where, record in records:
            text = _record_text(where, record, options)
            if not text.strip():
                stats.skip("empty")
                continue
            yield text
    except _NotRecords:  # raised before the file's first record, so nothing was yielded
        if not unit.walked:
            raise
        stats.skip(JSON_NOT_RECORDS)


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
