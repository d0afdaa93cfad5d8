"""Issue 28, round 3: `--force` replaces only what subllm wrote; a converted model's text
pipeline (its tokenizer's BOS, its eos_token_id list) is transformers'; `subllm prepare`
leaves no temporaries behind a SIGTERM, a Ctrl-C or a kill.

The references are transformers' own: `AutoTokenizer` and `LlamaForCausalLM.generate()` of
the source model a tiny Llama-3-style directory (a `tokenizers` WordLevel tokenizer whose
template prepends `<|begin_of_text|>`, `<|eot_id|>` / `<|end_of_text|>` specials, and a
generation_config whose eos_token_id is the list of both)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from procs import SRC, cli, one_line, snapshot

from subllm.cli import main

WORDS = "the a model token train data loss step sample value layer keep ratio score".split()
PROMPT = "the model keep the data"
VOCAB = 64
MAX_NEW = 20


def _llama3_dir(root: Path, seed: int) -> tuple[Path, int, int]:
    """A random two-layer LlamaForCausalLM with a Llama-3-style tokenizer in `root/llama3`;
    returns (dir, id of <|eot_id|>, id of <|end_of_text|>).

    The ids of the two stop tokens are chosen after the weights: <|eot_id|> is a token that
    greedy decoding of the prompt produces after a few others, so generation that honours
    the eos_token_id list stops there, and one that does not runs past it."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    word_id = {w: i + 1 for i, w in enumerate(WORDS)}  # 0 is <|begin_of_text|>
    fillers = range(len(WORDS) + 1, VOCAB)
    k = None
    while k is None:  # a few weights settle into a loop of one or two tokens at once
        torch.manual_seed(seed)
        seed += 1
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=None)).eval()
        x = torch.tensor([[0] + [word_id[w] for w in PROMPT.split()]])
        greedy: list[int] = []
        with torch.no_grad():
            for _ in range(12):
                greedy.append(int(model(x).logits[0, -1].argmax()))
                x = torch.cat([x, torch.tensor([greedy[-1:]])], dim=1)
        k = next((k for k in range(2, 12)
                  if greedy[k] in fillers and greedy[k] not in greedy[:k]), None)
    eot = greedy[k]
    end = next(i for i in reversed(fillers) if i not in greedy[:k + 1])
    names = {0: "<|begin_of_text|>", eot: "<|eot_id|>", end: "<|end_of_text|>"}
    vocab = {**word_id, **{names.get(i, f"w{i}"): i for i in [0, *fillers]}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"w{len(WORDS) + 1}"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(  # as Llama-3's tokenizer.json
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", 0)])
    tok.add_special_tokens([AddedToken(n, special=True) for n in names.values()])
    src = root / "llama3"
    model.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": end}))
    GenerationConfig(bos_token_id=0, eos_token_id=[end, eot], do_sample=False
                     ).save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({  # as Llama-3-Instruct's
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}))
    return src, eot, end


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    """(the Llama-3-style source, its `subllm convert --from-hf` output, eot id, end id)."""
    root = tmp_path_factory.mktemp("llama3")
    src, eot, end = _llama3_dir(root, seed=int.from_bytes(os.urandom(2), "little"))
    assert main(["convert", "--from-hf", str(src), "--out", str(root / "converted")]) == 0
    return src, root / "converted", eot, end


def _reference(src: Path) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + greedy continuation) by transformers on the source model."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    ids = AutoTokenizer.from_pretrained(src)(PROMPT, return_tensors="pt").input_ids
    out = LlamaForCausalLM.from_pretrained(src).generate(ids, do_sample=False,
                                                         max_new_tokens=MAX_NEW)
    return ids[0].tolist(), out[0].tolist()


# The text pipeline of a converted model ------------------------------------------------------
def test_generate_on_a_converted_model_gives_transformers_tokens(llama3) -> None:
    from subllm.interop.tokenizer import text_pipeline
    from subllm.train.load import load_any

    src, converted, eot, end = llama3
    prompt_ref, full_ref = _reference(src)
    assert prompt_ref[0] == 0  # the template's <|begin_of_text|>
    assert full_ref[-1] == eot and len(full_ref) < len(prompt_ref) + MAX_NEW  # it stopped
    model, tokenizer_path, _, _ = load_any(converted, torch.device("cpu"))
    _, stop, ids = text_pipeline(converted, tokenizer_path, PROMPT, model.config.max_seq_len)
    assert ids == prompt_ref and sorted(stop) == sorted([eot, end])
    out = model.generate(torch.tensor([ids]), MAX_NEW, temperature=0.0, eos_token_id=stop)
    assert out[0].tolist() == full_ref


def test_decoding_stops_each_row_at_any_id_of_the_eos_list(llama3) -> None:
    """A batch of two prompts with a list of stop ids, against each row's unconstrained
    greedy run: a row ends at the first listed id it produces (here the list's second),
    then holds the list's first id until every row has ended."""
    from subllm.train.load import load_any

    model, _, _, _ = load_any(llama3[1], torch.device("cpu"))
    prompts = torch.tensor([[0, 1, 3, 12, 1, 6], [0, 2, 5, 7, 9, 4]])
    free = [model.generate(p[None], MAX_NEW, temperature=0.0)[0, 6:].tolist()
            for p in prompts]
    j = next(j for j in range(2, MAX_NEW) if free[0][j] not in free[0][:j])
    unused = next(t for t in range(VOCAB) if t not in free[0] + free[1])
    stop = [unused, free[0][j]]
    ends = [next((i + 1 for i, t in enumerate(f) if t in stop), None) for f in free]
    n = MAX_NEW if None in ends else max(ends)
    want = [f[:e] + [unused] * (n - e) if e else f for f, e in zip(free, ends, strict=True)]
    out = model.generate(prompts, MAX_NEW, temperature=0.0, eos_token_id=stop)
    assert ends[0] == j + 1 and out[:, 6:].tolist() == want
    one = model.generate(prompts[:1], MAX_NEW, temperature=0.0, eos_token_id=free[0][j])
    assert one[0, 6:].tolist() == free[0][:j + 1]  # a single id, as before


@pytest.mark.slow
def test_generate_cli_on_a_converted_model_prints_transformers_text(llama3) -> None:
    from tokenizers import Tokenizer

    src, converted, eot, _ = llama3
    prompt_ref, full_ref = _reference(src)
    r = cli("generate", "--checkpoint", str(converted), "--prompt", PROMPT, "--temperature",
            "0", "--max-new-tokens", str(MAX_NEW), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    text = Tokenizer.from_file(str(src / "tokenizer.json")).decode(full_ref[len(prompt_ref):])
    assert r.stdout == PROMPT + text + "\n" and "note:" not in r.stderr


def _documents(tokens: np.ndarray, bos: int | None, eot: int) -> list[tuple[int, ...]]:
    cut = [i + 1 for i, t in enumerate(tokens.tolist()) if t == eot]
    docs = [tuple(d) for d in np.split(tokens, cut) if len(d)]
    assert all(d[-1] == eot and (bos is None or d[0] == bos) for d in docs), docs[:3]
    return docs


def test_prepare_with_a_model_tokenizer_writes_its_bos_and_eot(llama3, tmp_path: Path,
                                                                write_corpus) -> None:
    """`prepare --tokenizer DIR` (and its tokenizer.json as a file) write each document as
    transformers' AutoTokenizer encodes it, then the end-of-text token: all of it, also
    where the file sets truncation and padding."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from subllm.train.data import load_data

    src, _, _, end = llama3
    corpus = write_corpus(tmp_path / "corpus", 6, words=WORDS, lines=3, seed=7)
    reference = AutoTokenizer.from_pretrained(src)
    want = sorted(tuple(reference(p.read_text()).input_ids) + (end,)
                  for p in corpus.iterdir())
    assert all(d[0] == 0 for d in want)
    clipped = Tokenizer.from_file(str(src / "tokenizer.json"))  # a file that pads and cuts
    clipped.enable_truncation(8)
    clipped.enable_padding(pad_id=1, pad_token="the")
    clipped.save(str(tmp_path / "clipped.json"))
    for tokenizer in (src, src / "tokenizer.json", tmp_path / "clipped.json"):
        out = tmp_path / f"data-{tokenizer.name}"
        assert main(["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer),
                     "--out", str(out)]) == 0
        data = load_data(out)
        assert data.eot_id == end
        got = sorted(_documents(data.tokens("train"), 0, end)
                     + _documents(data.tokens("val"), 0, end))
        assert got == want, tokenizer


@pytest.mark.slow
def test_a_run_from_a_converted_model_keeps_its_text_pipeline(llama3, tmp_path: Path,
                                                              write_corpus) -> None:
    """prepare --tokenizer DIR, train --init-from the conversion: generating from the run
    encodes the prompt as AutoTokenizer does and stops at the source's eos ids too."""
    from subllm.interop.tokenizer import text_pipeline
    from subllm.train.load import load_any

    src, converted, eot, end = llama3
    converted = Path(shutil.copytree(converted, tmp_path / "converted"))
    prompt_ref, _ = _reference(src)
    corpus = write_corpus(tmp_path / "corpus", 6, words=WORDS, lines=4, seed=3)
    assert main(["prepare", "--input", str(corpus), "--tokenizer", str(src), "--out",
                 str(tmp_path / "data")]) == 0
    assert main(["train", "--init-from", str(converted), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--warmup", "1",
                 "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
                 "--eval-every", "0", "--save-every", "0"]) == 0
    shutil.rmtree(converted)  # what the run needs of it, it recorded
    model, tokenizer_path, settings, _ = load_any(tmp_path / "run", torch.device("cpu"))
    _, stop, ids = text_pipeline(tmp_path / "run", tokenizer_path, PROMPT,
                                 model.config.max_seq_len, settings.get("token_ids"))
    assert ids == prompt_ref and sorted(stop) == sorted([end, eot])
    # its export generates as the source does: the source's token ids, in both configs
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out",
                 str(tmp_path / "hf")]) == 0
    for name in ("config.json", "generation_config.json"):
        exported = json.loads((tmp_path / "hf" / name).read_text())
        source = json.loads((src / name).read_text())
        assert all(exported[k] == source[k] for k in ("bos_token_id", "eos_token_id")
                   if k in source), name
    _, stop, ids = text_pipeline(tmp_path / "hf", tmp_path / "hf" / "tokenizer.json", PROMPT,
                                 model.config.max_seq_len)
    assert sorted(stop) == sorted(json.loads((src / "generation_config.json").read_text())
                                  ["eos_token_id"])


# --force ---------------------------------------------------------------------------------
def _third_party(root: Path, model_type: str) -> Path:
    """A model directory subllm never wrote (a Qwen3's or Mistral's, in miniature)."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": model_type,
                                                  "architectures": ["X"]}))
    (root / "model.safetensors").write_bytes(os.urandom(64))
    (root / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepare_corpus, tiny_settings) -> Path:
    root = tmp_path_factory.mktemp("force-run")
    data = prepare_corpus(root, 12)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(data, **{"max-steps": 2})))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out",
                 str(root / "run")]) == 0
    return root / "run"


@pytest.mark.slow
def test_force_never_replaces_a_directory_subllm_did_not_write(llama3, run: Path,
                                                               tmp_path: Path) -> None:
    src = llama3[0]
    qwen = _third_party(tmp_path / "qwen3", "qwen3")
    mistral = _third_party(tmp_path / "mistral", "mistral")
    llama = tmp_path / "llama"
    shutil.copytree(src, llama)
    before = snapshot(qwen, mistral, llama, src)
    for argv in (["export", "--checkpoint", str(run), "--out", str(qwen), "--force"],
                 ["convert", "--from-hf", str(src), "--out", str(mistral), "--force"],
                 ["convert", "--from-hf", str(src), "--out", str(llama), "--force"]):
        one_line(cli(*argv), 2, "not written by subllm", "choose another --out",
                 "remove it yourself")
    assert snapshot(qwen, mistral, llama, src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "mistral", "qwen3"]


def test_force_replaces_an_earlier_export_or_conversion(llama3, tmp_path: Path) -> None:
    """Ours: a directory with the marker (naming what wrote it), or one an earlier subllm
    wrote before the marker existed (config.json of model_type "subllm")."""
    from subllm.atomic import MARKER
    from subllm.interop.export import save_hf_model
    from subllm.train.load import load_any

    src, converted = llama3[:2]
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(src), "--out", str(out)]) == 0
    assert json.loads((out / MARKER).read_text())["written_by"].startswith("subllm ")
    assert "convert" in json.loads((out / MARKER).read_text())["written_by"]
    model = load_any(converted, torch.device("cpu"))[0]
    save_hf_model(model, out, force=True)  # what `subllm export` writes with
    assert "export" in json.loads((out / MARKER).read_text())["written_by"]
    (out / MARKER).unlink()  # as an earlier subllm wrote it
    assert json.loads((out / "config.json").read_text())["model_type"] == "subllm"
    assert main(["convert", "--from-hf", str(src), "--out", str(out), "--force"]) == 0
    assert (out / MARKER).is_file() and (out / "tokenizer_config.json").is_file()


# prepare after a SIGTERM, a Ctrl-C, a kill -------------------------------------------------
PAUSE_WITH_TEMPORARIES = """
import sys, time
import subllm.train.data as data
real = data.sha256_file
def paused(path):  # train.bin, val.bin and tokenizer.json are written under temporary names
    print("PAUSED", file=sys.stderr, flush=True)
    time.sleep(120)
    return real(path)
data.sha256_file = paused
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_prepare_removes_its_temporaries_when_stopped(tmp_path: Path, prepare_corpus,
                                                      signum: int, code: int,
                                                      said: str) -> None:
    data = prepare_corpus(tmp_path, 8)  # the earlier output, to be kept as it is
    before = snapshot(data)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PAUSE_WITH_TEMPORARIES)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    proc = subprocess.Popen([sys.executable, "-m", "subllm", "prepare", "--input",
                             str(tmp_path / "corpus"), "--out", str(data), "--vocab-size",
                             "280"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stderr:
            if line.strip() == "PAUSED":
                break
        temporaries = sorted(p.name for p in data.iterdir() if p.name.startswith("."))
        assert f".train.bin.tmp-{proc.pid}" in temporaries, temporaries
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code and "Traceback" not in err and said in err, err
    assert snapshot(data) == before  # no temporaries; the earlier data as it was


def test_prepare_removes_temporaries_of_killed_prepares_only(tmp_path: Path,
                                                             write_corpus) -> None:
    from subllm.train.data import prepare

    out = tmp_path / "data"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a prepare killed by SIGKILL
    gone.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = [out / f".train.bin.tmp-{gone.pid}", out / f".meta.json.tmp-{gone.pid}",
                out / f".write-test-{gone.pid}"]
        live = [out / f".train.bin.tmp-{running.pid}", out / f".tokenizer.json.tmp-{running.pid}"]
        for p in dead + live:
            p.write_bytes(b"half")
        mine = out / f".notes.tmp-{gone.pid}"  # not a name prepare writes
        mine.write_text("mine")
        prepare(out, inputs=[write_corpus(tmp_path / "corpus", 4)], vocab_size=280,
                progress=False)
        assert not any(p.exists() for p in dead)
        assert all(p.read_bytes() == b"half" for p in live) and mine.read_text() == "mine"
        assert (out / "meta.json").is_file()
    finally:
        running.kill()
        running.wait()


def test_a_sigterm_while_renaming_the_outputs_waits_for_the_last(tmp_path: Path, write_corpus,
                                                                  monkeypatch) -> None:
    """The four renames that publish a prepared directory are not cut in two: a SIGTERM
    arriving between them is delivered after the last, so the directory is whole."""
    from subllm.train import data as d

    corpus = write_corpus(tmp_path / "corpus", 4)
    out = tmp_path / "data"
    real = os.replace

    def replace_then_terminate(src, dst):
        real(src, dst)
        if Path(dst).name == "tokenizer.json":  # the first of the four
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(d.os, "replace", replace_then_terminate)
    with pytest.raises(d.Terminated), d.terminate_raises():
        d.prepare(out, inputs=[corpus], vocab_size=280, progress=False)
    monkeypatch.undo()
    data = d.load_data(out)  # meta.json, train.bin and val.bin of this run, consistent
    assert len(data.tokens("train")) == data.meta["tokens"]["train"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(d.OUTPUTS)
