"""`subllm prepare` inputs beyond text and JSON lines (issue 25): the same documents in every
format give the same train.bin / val.bin; bad records are one error naming the file and the
record, before anything is written; weighted sources are mixed to their shares."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from subllm.cli import main
from subllm.errors import SubLLMError
from subllm.train.data import load_tokenizer, prepare, train_tokenizer

WORDS = "river stone light über naïve 数据 ✓ a of the model token quick brown fox".split()


def random_docs(rng: random.Random, n: int) -> list[str]:
    """Documents of 1-4 lines of 1-12 words; never blank."""
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                      for _ in range(rng.randint(1, 4))) for _ in range(n)]


def docs_of(tokens: np.ndarray, eot: int) -> list[bytes]:
    """The documents of a .bin file (each ends with eot), as bytes of their token ids."""
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e + 1].tobytes() for s, e in zip(starts, ends, strict=True)]


def write_jsonl(path: Path, records: list[dict], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# 1. Every format, the same bytes -------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fresh random documents (a new seed each run, named in failures) written as every
    input format, a tokenizer.json that does not depend on them, and the reference: the
    documents prepared as one .txt file each."""
    root = tmp_path_factory.mktemp("formats")
    seed = random.randrange(2**32)
    docs = random_docs(random.Random(seed), 60)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(iter(random_docs(random.Random(1), 200)), 300).save(str(tokenizer))
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):  # read in sorted path order: the documents' order
        (root / "txt" / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    ref = prepare(root / "ref", inputs=[root / "txt"], tokenizer=tokenizer,
                  val_fraction=0.2, seed=3, progress=False)
    assert ref["documents"] == {"train": 48, "val": 12}
    return {"root": root, "docs": docs, "seed": seed, "tokenizer": tokenizer}


def _jsonl(root: Path, docs: list[str]) -> list[str]:
    return [str(write_jsonl(root / "d.jsonl", [{"id": i, "text": d} for i, d in enumerate(docs)]))]


def _json(root: Path, docs: list[str]) -> list[str]:
    (root / "d.json").write_text(json.dumps([{"text": d, "n": 1} for d in docs]))
    return [str(root / "d.json")]


def _jsonl_gz(root: Path, docs: list[str]) -> list[str]:
    return [str(write_jsonl(root / "d.jsonl.gz", [{"text": d} for d in docs], gzip.open))]


def _jsonl_zst(root: Path, docs: list[str]) -> list[str]:
    zstandard = pytest.importorskip("zstandard")
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    half = len(data) // 2 + data[len(data) // 2:].index(b"\n") + 1  # two frames
    compress = zstandard.ZstdCompressor().compress
    (root / "d.jsonl.zst").write_bytes(compress(data[:half]) + compress(data[half:]))
    return [str(root / "d.jsonl.zst")]


def _parquet(root: Path, docs: list[str]) -> list[str]:
    return [str(write_parquet(root / "d.parquet", {"text": docs, "n": list(range(len(docs)))}))]


def _parquet_glob(root: Path, docs: list[str]) -> list[str]:
    (root / "shards").mkdir()
    for k in range(3):  # shard-0 holds the first third: sorted order is document order
        write_parquet(root / "shards" / f"shard-{k}.parquet", {"text": docs[k * 20:k * 20 + 20]})
    return [str(root / "shards" / "*.parquet")]


def _several_inputs(root: Path, docs: list[str]) -> list[str]:
    write_jsonl(root / "a.jsonl", [{"text": d} for d in docs[:25]])
    write_parquet(root / "b.parquet", {"text": docs[25:]})
    return [str(root / "a.jsonl"), str(root / "b.parquet")]


def _saved_dataset_dict(root: Path, docs: list[str]) -> list[str]:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}),
        "other": datasets.Dataset.from_dict({"text": ["not these"] * 3, "n": [0] * 3}),
    }).save_to_disk(str(root / "saved"))
    return [str(root / "saved")]


def _saved_dataset_in_a_directory(root: Path, docs: list[str]) -> list[str]:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "parent" / "saved"))
    return [str(root / "parent")]  # walked: the dataset is one input, its files are not text


FORMATS = {f.__name__.lstrip("_"): f for f in (
    _jsonl, _json, _jsonl_gz, _jsonl_zst, _parquet, _parquet_glob, _several_inputs,
    _saved_dataset_dict, _saved_dataset_in_a_directory)}


@pytest.mark.parametrize("fmt", [*FORMATS, "hf_dataset"])
def test_every_format_gives_the_bytes_of_the_text_files(corpus: dict, tmp_path: Path,
                                                        fmt: str) -> None:
    docs, hf_dataset = corpus["docs"], None
    if fmt == "hf_dataset":  # a local directory of JSON lines, by name, as the Hub's are read
        pytest.importorskip("datasets")
        (tmp_path / "hub").mkdir()
        for k in range(2):
            write_jsonl(tmp_path / "hub" / f"part-{k}.jsonl",
                        [{"text": d} for d in docs[k * 30:k * 30 + 30]])
        inputs, hf_dataset = None, str(tmp_path / "hub")
    else:
        inputs = FORMATS[fmt](tmp_path, docs)
    meta = prepare(tmp_path / "out", inputs=inputs, hf_dataset=hf_dataset,
                   tokenizer=corpus["tokenizer"], val_fraction=0.2, seed=3, progress=False)
    ref = corpus["root"] / "ref"
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (ref / name).read_bytes(), (
            f"{fmt}: {name} differs (documents of seed {corpus['seed']})")
    assert meta["documents"] == {"train": 48, "val": 12}


def test_a_chat_is_rendered_with_the_chat_template_or_as_role_lines(corpus: dict,
                                                                   tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(corpus["seed"])
    chats = [[{"role": r, "content": " ".join(rng.choice(WORDS) for _ in range(5))}
              for r in ("user", "assistant")] for _ in range(10)]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats[:5]]
                      + [{"text": c} for c in chats[5:]])  # --text-field naming a chat
    model = tmp_path / "model"
    PreTrainedTokenizerFast(
        tokenizer_object=load_tokenizer(corpus["tokenizer"]), eos_token="<|endoftext|>",
        chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}",
    ).save_pretrained(str(model))
    expected = {"plain": ["\n".join(f"{m['role']}: {m['content']}" for m in c) for c in chats],
                "template": ["".join(f"<{m['role']}>{m['content']}\n" for m in c)
                             for c in chats]}
    for kind, tokenizer in (("plain", corpus["tokenizer"]), ("template", model)):
        out = tmp_path / kind
        meta = prepare(out, inputs=[src], tokenizer=tokenizer, val_fraction=0.2,
                       progress=False)
        tok = load_tokenizer(out / "tokenizer.json")
        got = [tok.decode(np.frombuffer(d, dtype=meta["dtype"])[:-1].tolist())
               for split in ("train", "val")
               for d in docs_of(np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]),
                                meta["eot_id"])]
        assert sorted(got) == sorted(expected[kind]), kind


# 2. Bad records: one error naming the file and the record, nothing written ----------------------
def _truncated(path: Path, fraction: float = 0.6) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * fraction)])


def _bad(case: str, d: Path) -> tuple[Path, str]:
    rng = random.Random()
    good = [{"text": doc} for doc in random_docs(rng, 3000)]
    if case == "non-string field":
        return write_jsonl(d / "bad.jsonl", good[:2] + [{"text": 7}]), \
            r"bad\.jsonl:3: field `text` is number, not a string"
    if case == "missing field":
        return write_jsonl(d / "bad.jsonl", good[:1] + [{"body": "x"}]), \
            r"bad\.jsonl:2 has no field `text` \(its fields: body\)"
    if case == "missing column":
        return write_parquet(d / "bad.parquet", {"body": ["x", "y"]}), \
            r"bad\.parquet row 0 has no field `text` \(its fields: body\)"
    if case == "null in parquet":
        return write_parquet(d / "bad.parquet", {"text": ["x", "y", None]}), \
            r"bad\.parquet row 2: field `text` is null, not a string"
    if case == "invalid JSON line":
        (d / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut\n')
        return d / "bad.jsonl", r"bad\.jsonl:3 is not valid JSON"
    if case == "record not an object":
        (d / "bad.json").write_text('[{"text": "fine"}, ["no"]]')
        return d / "bad.json", r"bad\.json record 1 is a JSON array, not an object"
    if case == "json not an array":
        (d / "bad.json").write_text('{"text": "fine"}')
        return d / "bad.json", r"bad\.json holds a JSON object, not an array of records"
    if case == "truncated gzip":
        _truncated(write_jsonl(d / "bad.jsonl.gz", good, gzip.open))
        return d / "bad.jsonl.gz", r"bad\.jsonl\.gz: reading stops after line [1-9]\d*.*truncated"
    if case == "truncated zstd":
        zstandard = pytest.importorskip("zstandard")
        data = "".join(json.dumps(r) + "\n" for r in good).encode()
        (d / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        _truncated(d / "bad.jsonl.zst")
        return d / "bad.jsonl.zst", r"bad\.jsonl\.zst: reading stops after line [1-9]\d*"
    if case == "corrupt parquet":
        _truncated(write_parquet(d / "bad.parquet", {"text": [r["text"] for r in good]}))
        return d / "bad.parquet", r"bad\.parquet row 0: cannot read it as Parquet"
    if case == "chat message without content":
        return write_jsonl(d / "bad.jsonl", good[:3] + [{"messages": [{"role": "user"}]}]), \
            r"bad\.jsonl:4: chat message 0 needs a string `role` and `content`"
    raise AssertionError(case)


BAD = ["non-string field", "missing field", "missing column", "null in parquet",
       "invalid JSON line", "record not an object", "json not an array", "truncated gzip",
       "truncated zstd", "corrupt parquet", "chat message without content"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_record_is_one_error_naming_file_and_record(corpus: dict, tmp_path: Path,
                                                          case: str) -> None:
    (tmp_path / "in").mkdir()
    bad, message = _bad(case, tmp_path / "in")
    good = write_jsonl(tmp_path / "in" / "a-good.jsonl", [{"text": "fine words"}] * 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    named, walked = [good, bad], [tmp_path / "in"]
    # found in a directory, a .json that is no array of records is skipped (next test)
    for inputs in [named] if case == "json not an array" else [named, walked]:
        with pytest.raises(SubLLMError, match=message) as e:
            prepare(out, inputs=inputs, tokenizer=corpus["tokenizer"], progress=False)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_json_that_is_no_array_of_records_is_skipped_only_in_a_directory(
        corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A code repository holds package.json and the like: walked, they are skipped and
    counted; named as an input, each is still an error."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    others = {"package.json": '{"name": "x", "version": "1.0.0"}',
              "src/names.json": '["ant", "bee"]',
              "tsconfig.json": '{\n  // comments: not JSON\n  "strict": true\n}',
              "src/number.json": "7"}
    for name, text in others.items():
        (repo / name).write_text(text)
    (repo / "records.json").write_text(json.dumps([{"text": "a document"}, {"text": "more"}]))
    (repo / "src" / "main.py").write_text("print('a third document')\n")
    assert main(["prepare", "--input", str(repo), "--out", str(tmp_path / "out"),
                 "--tokenizer", str(corpus["tokenizer"])]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["json files that are not arrays of records"] == len(others)
    assert sum(meta["documents"].values()) == 3 and meta["files"] == len(others) + 2
    assert "4 json files that are not arrays of records skipped" in capsys.readouterr().out
    messages = {"package.json": "holds a JSON object, not an array of records",
                "src/names.json": "record 0 is a JSON string, not an object",
                "tsconfig.json": "is not valid JSON", "src/number.json": "holds a JSON number"}
    for name, message in messages.items():
        with pytest.raises(SubLLMError, match=message):
            prepare(tmp_path / "named", inputs=[repo / name], tokenizer=corpus["tokenizer"],
                    progress=False)


# 3. Mixing ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Source a (.jsonl, ~0.2M tokens, every document starting with the word `aaa`) and
    source b (.parquet, ~0.3M tokens, `bbb`), and a tokenizer of them (vocab enough for
    one token a word, so the counts do not depend on the draw)."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random()
    a_words, b_words = "ant ape asp auk".split(), "bat bee boa bug".split()

    def docs(marker: str, words: list[str], n: int) -> list[str]:
        return [marker + " " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 64)))
                for _ in range(n)]

    a, b = docs("aaa", a_words, 5000), docs("bbb", b_words, 7500)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(iter(a[:200] + b[:200]), 300).save(str(tokenizer))  # a token a word
    tok = load_tokenizer(tokenizer)
    markers = {tok.encode(m).ids[0]: m for m in ("aaa", "bbb")}  # a document's first token
    assert len(markers) == 2
    return {"a": write_jsonl(root / "a.jsonl", [{"text": d} for d in a]),
            "b": write_parquet(root / "b.parquet", {"text": b}, row_group_size=1000),
            "tokenizer": tokenizer, "markers": markers}


def shares_in(out: Path, meta: dict, markers: dict[int, str]) -> dict[str, float]:
    """Each source's share of train.bin's tokens, counted in the file: a document belongs
    to the source whose marker it starts with."""
    tokens = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    ends = np.flatnonzero(tokens == meta["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    first = tokens[starts]
    assert set(first.tolist()) == set(markers) and lengths.sum() == len(tokens)
    return {name: float(lengths[first == t].sum() / len(tokens)) for t, name in markers.items()}


def test_weighted_sources_reach_their_shares_reproducibly(mix: dict, tmp_path: Path) -> None:
    inputs = [f"{mix['a']}:0.7", f"{mix['b']}:0.3"]
    metas = [prepare(tmp_path / name, inputs=inputs, tokenizer=mix["tokenizer"], seed=seed,
                     val_fraction=0.05, progress=False)
             for name, seed in (("one", 5), ("two", 5), ("other", 6))]
    meta = metas[0]
    assert meta["tokens"]["train"] > 900_000  # the mixture is about a million tokens
    got = shares_in(tmp_path / "one", meta, mix["markers"])
    assert got["aaa"] == pytest.approx(0.7, rel=0.01) and got["bbb"] == pytest.approx(0.3,
                                                                                      rel=0.01)
    a, b = meta["mixture"]
    assert [a["source"], b["source"]] == [str(mix["a"]), str(mix["b"])]
    assert (a["weight"], b["weight"]) == (0.7, 0.3)
    assert a["share"] == pytest.approx(got["aaa"], abs=1e-6)
    assert a["tokens"] + b["tokens"] == meta["tokens"]["train"]
    assert a["documents"] + b["documents"] == meta["documents"]["train"]
    assert b["repeats"] == 1.0 and a["repeats"] > 2  # b sets the total; a is repeated
    assert json.loads((tmp_path / "one" / "meta.json").read_text())["mixture"] == [a, b]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one" / "train.bin").read_bytes() != \
        (tmp_path / "other" / "train.bin").read_bytes()
    # validation is drawn from each source before mixing: unmixed, in no training document
    val = docs_of(np.fromfile(tmp_path / "one" / "val.bin", dtype=meta["dtype"]), meta["eot_id"])
    train = set(docs_of(np.fromfile(tmp_path / "one" / "train.bin", dtype=meta["dtype"]),
                        meta["eot_id"]))
    assert len(val) == a["val_documents"] + b["val_documents"] == 250 + 375
    assert not set(val) & train


def test_cli_mixes_inputs_and_a_config_files_sources(mix: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    common = ["--tokenizer", str(mix["tokenizer"]), "--val-fraction", "0.05"]
    assert main(["prepare", "--input", f"{mix['a']}:0.7", "--input", f"{mix['b']}:0.3",
                 "--out", str(tmp_path / "flags"), *common]) == 0
    out = capsys.readouterr().out
    assert "of train tokens (weight 70.00%" in out and str(mix["b"]) in out
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(mix["a"]), "weight": 7},
                                                  {"path": str(mix["b"]), "weight": 3}]}))
    assert main(["prepare", "--config", str(config), "--out", str(tmp_path / "yaml"),
                 *common]) == 0
    for name in ("train.bin", "val.bin"):  # weights 7:3 are shares 0.7 / 0.3
        assert (tmp_path / "flags" / name).read_bytes() == \
            (tmp_path / "yaml" / name).read_bytes()
    # --input takes several paths, and repeats: all of them are read, unmixed
    assert main(["prepare", "--input", str(mix["a"]), str(mix["b"]), "--input",
                 str(mix["a"]), "--out", str(tmp_path / "three"), *common]) == 0
    meta = json.loads((tmp_path / "three" / "meta.json").read_text())
    assert meta["sources"] == [str(mix["a"]), str(mix["b"]), str(mix["a"])]
    assert "mixture" not in meta and meta["documents"]["train"] + meta["documents"]["val"] \
        == 2 * 5000 + 7500


@pytest.mark.parametrize("argv, fragment", [
    (["--input", "{a}:-1", "--input", "{b}:0.3"], "weight of {a} must be a positive number"),
    (["--input", "{a}:0", "--input", "{b}:1"], "weight of {a} must be a positive number"),
    (["--input", "{a}:nan", "--input", "{b}:1"], "must be a positive number, got nan"),
    (["--input", ":0", "--input", "{b}:1"], "has a weight but no path"),
    (["--input", "{a}:0.7", "--input", "{b}"], "some inputs have a weight and some do not"),
], ids=["negative", "zero", "nan", "no-path", "half-weighted"])
def test_a_malformed_weight_is_one_line_and_exit_2(mix: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, argv,
                                                   fragment) -> None:
    names = {"a": mix["a"], "b": mix["b"]}
    args = [a.format(**names) for a in argv]
    capsys.readouterr()
    assert main(["prepare", *args, "--out", str(tmp_path / "out"), "--tokenizer",
                 str(mix["tokenizer"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("subllm prepare: error: "), err
    assert fragment.format(**names) in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_colon_in_an_existing_name_is_not_a_weight(corpus: dict, tmp_path: Path) -> None:
    odd = tmp_path / "notes:2"
    odd.write_text("a document whose file name ends in a colon and a number\n")
    (tmp_path / "more.txt").write_text("and another one\n")
    meta = prepare(tmp_path / "out", inputs=[str(odd), str(tmp_path / "more.txt")],
                   tokenizer=corpus["tokenizer"], progress=False)
    assert meta["sources"][0] == str(odd) and "mixture" not in meta
