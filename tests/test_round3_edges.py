"""Issue 28, round 3, the rough edges: what a command can tell from its arguments alone it
says before any slow work (preparing the default corpus, importing torch and transformers);
an empty path flag is named; `info` of a run reads no weights; the training sample encodes
its prompt as `subllm generate` does; a converted YaRN model given too long an input names
the flag that extends its context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from procs import cli, one_line, snapshot

from subllm.cli import main

# In the subprocess, importing torch or transformers fails: a refusal that comes through
# this came before them (the seconds they cost); one that needed them is a traceback.
NO_TORCH = """
import sys

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} imported before the arguments were checked")

sys.meta_path.insert(0, _Refuse())
"""


def _unchanged_but_inject(root: Path, before: dict[str, str]) -> None:
    """Nothing under `root` changed but the sitecustomize folders `cli(inject=)` adds."""
    assert {k: v for k, v in snapshot(root).items() if "/inject-" not in k} == before


# 1. a bad `model:` value is refused before the default corpus is prepared ------------------
@pytest.mark.slow
@pytest.mark.parametrize("settings, fragment", [
    ({"max-steps": 5, "model": {"balancer_strength": -1}}, "balancer_strength must be"),
    ({"model": {"keep": [0.5, 0.5, 0.5]}}, "keep has 3 values"),  # the preset nests 2 deep
    ({"model": {"vocab_size": "many"}}, "vocab_size must be a positive integer"),
    ({"init-from": "no/such/model"}, "--init-from no/such/model does not exist"),
    ({"init-from": "hf", "model": {"dim": 64}}, "`model: dim` does not go with --init-from"),
    ({"init-from": "hf", "model": {"bypass_min_steps": 0}}, "bypass_min_steps must be"),
])
def test_settings_are_refused_before_the_default_corpus(tmp_path: Path, settings: dict,
                                                        fragment: str) -> None:
    """No --data: the default corpus (data/default) would be prepared first, half a minute,
    for a refusal that needs no data."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "subllm"}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(settings))
    before = snapshot(tmp_path)
    r = cli("train", "--config", "bad.yaml", cwd=tmp_path, inject=NO_TORCH)
    one_line(r, 2, fragment)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    _unchanged_but_inject(tmp_path, before)


# 2. an empty path flag is named, in every verb -----------------------------------------------
EMPTY = [
    ("train", "--init-from"), ("train", "--data"), ("train", "--out"), ("train", "--config"),
    ("eval", "--checkpoint"), ("eval", "--data"), ("generate", "--checkpoint"),
    ("generate", "--prompt-file"), ("export", "--checkpoint"), ("export", "--out"),
    ("convert", "--from-hf"), ("convert", "--tokenizer"), ("convert", "--out"),
    ("prepare", "--input"), ("prepare", "--out"), ("estimate", "--hf-config"),
]
REQUIRED = {"export": ["--checkpoint", "run", "--out", "out"],
            "convert": ["--from-hf", "src", "--out", "out"],
            "estimate": ["--seq-len", "8"], "generate": ["--checkpoint", "run"]}


@pytest.mark.slow
def test_an_empty_path_flag_is_named(tmp_path: Path) -> None:
    """`--init-from ''` (an unset shell variable) used to mean the current directory and
    fail on it (`. holds no complete checkpoint`), after preparing the default corpus."""
    before = snapshot(tmp_path)
    for verb, flag in EMPTY:
        r = cli(verb, *REQUIRED.get(verb, []), flag, "", cwd=tmp_path, inject=NO_TORCH)
        one_line(r, 2, f"argument {flag}: is empty; pass a path")
    (tmp_path / "empty.yaml").write_text("init-from: ''\n")  # the same key in a config file
    r = cli("train", "--config", "empty.yaml", cwd=tmp_path, inject=NO_TORCH)
    one_line(r, 2, "`init-from`: is empty; pass a path")
    (tmp_path / "empty.yaml").unlink()
    _unchanged_but_inject(tmp_path, before)


# 3. a --checkpoint that is no model is refused before torch and transformers load ----------
@pytest.mark.slow
def test_a_checkpoint_that_is_no_model_is_refused_before_the_imports(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a model")
    before = snapshot(tmp_path)
    for where, fragment in (("no/such/path", "does not exist"), ("file", "is a file"),
                            ("empty", "holds no complete checkpoint")):
        for argv in (["generate", "--checkpoint", where, "--prompt", "x"],
                     ["eval", "--checkpoint", where],
                     ["export", "--checkpoint", where, "--out", "out"]):
            one_line(cli(*argv, cwd=tmp_path, inject=NO_TORCH), 2,
                     f"--checkpoint {where} {fragment}", "pass the --out directory")
    _unchanged_but_inject(tmp_path, before)


# 4. the training sample encodes its prompt as transformers does ----------------------------
def _bos_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer.json whose template puts <s> before every text, as a Llama's."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    words = "the a model token train data loss step sample value layer keep ratio score"
    vocab = {"<s>": 0, "<|endoftext|>": 1, "<unk>": 2,
             **{w: i + 3 for i, w in enumerate(words.split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<|endoftext|>")])
    tok.save(str(path))
    return path


@pytest.mark.slow  # transformers' tokenizer: seconds to import
def test_the_training_sample_gets_the_tokenizers_bos(tmp_path: Path, write_corpus) -> None:
    """Data prepared with a tokenizer that adds a BOS: the sample the demo prints after
    training starts from the prompt's ids as transformers' tokenizer gives them, BOS first
    (as `subllm generate` does), and stops at the end-of-text token."""
    from transformers import PreTrainedTokenizerFast

    from subllm.model import ModelConfig, SubLLM
    from subllm.train.data import load_data
    from subllm.train.evaluate import sample_text

    write_corpus(tmp_path / "corpus", 3, lines=5)
    tokenizer = _bos_tokenizer(tmp_path / "tokenizer.json")
    assert main(["prepare", "--input", str(tmp_path / "corpus"), "--tokenizer",
                 str(tokenizer), "--out", str(tmp_path / "data")]) == 0
    data = load_data(tmp_path / "data")
    model = SubLLM(ModelConfig(vocab_size=data.vocab_size, dim=16, n_layers=2, n_heads=2,
                               ffn_dim=32, max_seq_len=64)).eval()
    seen: list[tuple[list[int], object]] = []
    generate = model.generate

    def spy(x: torch.Tensor, *args, **kwargs):
        seen.append((x[0].tolist(), kwargs["eos_token_id"]))
        return generate(x, *args, **kwargs)

    model.generate = spy
    prompt = "the model keep the data"
    sample_text(model, data.tokenizer_path, prompt, max_new_tokens=4)
    want = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer))(prompt).input_ids
    assert want[0] == 0 and seen[0][0] == want
    assert seen[0][1] == [1]  # <|endoftext|>


# 5. `info` of a run reads its config, not its weights -------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    root = tmp_path_factory.mktemp("edges")
    data = prepare_corpus(root, 8, lines=20)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(data, **{"max-steps": 1})))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.mark.slow
def test_info_of_a_run_reads_no_weights(run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """A byte of the weights changed (the file whole, its checksum wrong): `info` answers
    from the configs without reading the weights (on a 10 GB run, seconds per GB); eval,
    which reads them, still refuses the checkpoint."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    assert main(["info", str(copy), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    weights = next(copy.glob("checkpoints/step-*/model.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data, past the header
    weights.write_bytes(bytes(raw))
    assert main(["info", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == want
    assert main(["eval", "--checkpoint", str(copy), "--device", "cpu"]) == 2
    assert "damaged" in capsys.readouterr().err


# 6. a converted YaRN model given more than max_seq_len names --max-seq-len -----------------
YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 32}  # as Qwen documents it: context stays 32


@pytest.mark.slow
def test_a_yarn_models_context_error_names_convert_max_seq_len(
        tmp_path: Path, prepare_corpus, capsys: pytest.CaptureFixture) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from subllm.errors import SubLLMError
    from subllm.interop.llama import from_hf_dir

    data = prepare_corpus(tmp_path, 30, lines=30)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        rope_parameters=YARN)).save_pretrained(tmp_path / "qwen")
    fix = "convert it again with --max-seq-len 128"
    with pytest.raises(SubLLMError, match=f"max_seq_len=32.*{fix}"):
        from_hf_dir(tmp_path / "qwen").eval()(torch.randint(0, 300, (1, 33)))
    for n in (32, 128):
        assert main(["convert", "--from-hf", str(tmp_path / "qwen"), "--tokenizer",
                     str(data / "tokenizer.json"), "--out", str(tmp_path / f"hf{n}"),
                     *(["--max-seq-len", str(n)] if n > 32 else [])]) == 0
    capsys.readouterr()
    eval_argv = ["--data", str(data), "--seq-len", "40", "--batches", "1", "--batch-size",
                 "1", "--device", "cpu"]
    assert main(["eval", "--checkpoint", str(tmp_path / "hf32"), *eval_argv]) == 2
    assert fix in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "hf128"), *eval_argv]) == 0  # as said
    # a model without rope scaling past its context: no such advice
    from subllm.model import ModelConfig, SubLLM

    plain = SubLLM(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_dim=32,
                               max_seq_len=8)).eval()
    with pytest.raises(SubLLMError, match=r"shorten the input$"):
        plain(torch.zeros(1, 9, dtype=torch.long))
