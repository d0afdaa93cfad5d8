"""The Hugging Face wrapper: Auto classes, save/load, remote code, generate(), export."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import subllm
from subllm.cli import main
from subllm.hf import SubLLMConfig, SubLLMForCausalLM
from subllm.interop.export import model_code_files, save_hf_model
from subllm.model import SubLLM
from subllm.model.config import ModelConfig

SRC = Path(__file__).resolve().parents[2] / "src"  # <repo>/tests/<package>/this file


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=211, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=96,
                structure="T(T(TT)T)T", keep=0.6, max_seq_len=256, tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


def make_model(seed: int = 0, **kw) -> SubLLMForCausalLM:
    torch.manual_seed(seed)
    config = SubLLMConfig.from_model_config(tiny_config(**kw), pad_token_id=0)
    model = SubLLMForCausalLM(config)
    with torch.no_grad():  # scores spread around 0: eval mode keeps some tokens, not all
        for sub in model.model.subsamplers:
            sub.score.weight.normal_(0.0, 0.3)
        for b in model.model.bypasses:
            b.scale.uniform_(0.3, 1.0)
    return model.eval()


def left_padded(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, L - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, L - n:] = 1
    return ids, mask


# ---- configuration ------------------------------------------------------------------------


def test_config_defaults_and_round_trip_match_model_config() -> None:
    assert SubLLMConfig().to_model_config() == ModelConfig()
    for name in ("subllm-tiny", "llama-small", "subllm-1.3b"):
        ours = ModelConfig.preset(name)
        hf = SubLLMConfig.from_model_config(ours)
        assert hf.to_model_config() == ours
        again = SubLLMConfig.from_dict(json.loads(hf.to_json_string()))
        assert again.to_model_config() == ours
    hf = SubLLMConfig.from_model_config(tiny_config(keep=[0.7, 0.5]))
    assert hf.hidden_size == 64 and hf.num_key_value_heads == 2
    assert hf.to_model_config().keep_per_depth == [0.7, 0.5]


def test_config_rejects_bad_structure_by_position() -> None:
    with pytest.raises(subllm.ConfigError, match="position 2"):
        SubLLMConfig(structure="TT(T", num_hidden_layers=3)


def test_auto_classes_are_registered_on_import() -> None:
    assert AutoConfig.for_model("subllm").__class__ is SubLLMConfig
    model = AutoModelForCausalLM.from_config(SubLLMConfig.from_model_config(tiny_config()))
    assert isinstance(model, SubLLMForCausalLM)


# ---- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_then_auto_from_pretrained_gives_equal_logits(tmp_path: Path,
                                                                       tied: bool) -> None:
    model = make_model(tie_embeddings=tied)
    ids, mask = left_padded(211, [17, 11])
    ref = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SubLLMForCausalLM
    inner = loaded.model
    assert (inner.lm_head.weight is inner.embed_tokens.weight) == tied
    # identical weights (checked exactly below); kernels may round the last bit differently
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-6)
    # every tensor, scorers, bypass scales and balancer state included
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_forward_matches_the_core_model_and_labels_give_the_loss() -> None:
    model = make_model()
    ids = torch.randint(0, 211, (2, 24))
    core = model.model(ids)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, core.logits, rtol=0, atol=0)
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, manual)
    # num_items_in_batch (Trainer under gradient accumulation): summed loss over that count
    summed = model(ids, labels=ids, num_items_in_batch=100).loss
    torch.testing.assert_close(summed, manual * ids[:, 1:].numel() / 100)
    assert out.kept is not None and len(out.kept) == 2
    # logits_to_keep and inputs_embeds
    last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:], rtol=0, atol=1e-6)
    emb = model.model.embed_tokens(ids)
    torch.testing.assert_close(model(inputs_embeds=emb).logits, out.logits, rtol=0, atol=0)


def test_position_ids_must_follow_the_attention_mask() -> None:
    model = make_model()
    ids, mask = left_padded(211, [9, 6])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    model(ids, attention_mask=mask, position_ids=pos)  # the derived positions are accepted
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, attention_mask=mask, position_ids=pos + 3)


@pytest.mark.parametrize("method", ["activation_checkpointing_enable",
                                    "gradient_checkpointing_enable"])  # v5 name, v4 name
def test_checkpointing_enable_gives_the_same_gradients(method: str) -> None:
    ids = torch.randint(0, 211, (2, 32))
    grads = []
    for ckpt in (False, True):
        model = make_model(seed=3).train()
        model.set_step(0)
        if ckpt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # v5 deprecates the v4 name
                getattr(model, method)()
            assert model.model.gradient_checkpointing
        torch.manual_seed(7)  # the subsamplers' random pairing and the limit's coin
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


# ---- generate() ------------------------------------------------------------------------------


def test_generate_greedy_left_padded_equals_our_generate_one_token_per_step() -> None:
    model = make_model()
    ids, mask = left_padded(211, [14, 9, 5])
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(
            (args[0] if args and args[0] is not None else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    hook.remove()
    assert lengths == [ids.shape[1]] + [1] * 7  # the prompt once, then one token per step
    ref = model.model.generate(ids, 8, attention_mask=mask)
    assert torch.equal(out, ref)
    no_cache = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              use_cache=False)
    assert torch.equal(no_cache, out)
    # each row alone (no padding) decodes the same tokens
    for i, n in enumerate((14, 9, 5)):
        alone = model.generate(ids[i:i + 1, -n:], max_new_tokens=8, do_sample=False)
        assert torch.equal(alone[0, n:], out[i, ids.shape[1]:])


def test_generate_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    model = make_model()
    ids, mask = left_padded(211, [10, 7])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                   temperature=1.5, top_k=0))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][:, :greedy.shape[1]], greedy)  # it did sample


def test_beam_search_reorders_our_cache() -> None:
    model = make_model()
    ids, mask = left_padded(211, [8, 12])
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                            do_sample=False)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                           do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_a_transformers_cache_is_refused() -> None:
    from transformers import DynamicCache

    model = make_model()
    with pytest.raises(ValueError, match="transformers Cache"):
        model(torch.randint(0, 211, (1, 4)), past_key_values=DynamicCache())


# ---- export ----------------------------------------------------------------------------------


def test_exported_code_has_only_relative_subllm_imports() -> None:
    for src in model_code_files():
        text = src.read_text()
        assert not re.search(r"^\s*(from|import) subllm\b", text, re.MULTILINE), src.name
        assert re.search(r"^\s*from \.subllm import", text, re.MULTILINE) or src.name != (
            "hf.py")


def _tokenizer_file(tmp: Path) -> Path:
    from subllm.train.data import train_tokenizer

    words = "the a model token train data loss step sample value layer keep ratio".split()
    texts = [" ".join(words[(i * j) % len(words)] for j in range(30)) for i in range(200)]
    tok = train_tokenizer(iter(texts), vocab_size=280)
    path = tmp / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SubLLMForCausalLM, Path]:
    tmp = tmp_path_factory.mktemp("export")
    tok = _tokenizer_file(tmp)
    wrapper = make_model(seed=11, vocab_size=300)
    out = save_hf_model(wrapper.model, tmp / "hf", tok)
    return out, wrapper, tok


def test_export_writes_a_standard_directory(exported) -> None:
    out, wrapper, tok_file = exported
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", *(p.name for p in model_code_files())):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "subllm" and config["auto_map"]["AutoModelForCausalLM"]
    assert config["structure"] == "T(T(TT)T)T"
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_file))
    tok = AutoTokenizer.from_pretrained(out)
    text = "the model keep ratio sample"
    assert tok(text)["input_ids"] == raw.encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == raw.token_to_id(
        "<|endoftext|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == raw.token_to_id("<|endoftext|>")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, wrapper(ids).logits, rtol=1e-5, atol=1e-6)


REMOTE = r"""
import importlib.abc, sys


class NoSubllm(importlib.abc.MetaPathFinder):
    # as if subllm were not installed, however it is installed (editable, site-packages)
    def find_spec(self, name, path=None, target=None):
        if name == "subllm" or name.startswith("subllm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoSubllm())
try:
    import subllm  # noqa: F401
    raise SystemExit("subllm is still importable")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
batch = tok(["the model keep", "a sample value layer ratio"], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
out = model.generate(**batch, max_new_tokens=6, do_sample=False)
torch.save({"ids": batch["input_ids"], "mask": batch["attention_mask"], "logits": logits,
            "generated": out}, sys.argv[2])
"""


@pytest.mark.slow
def test_export_loads_with_trust_remote_code_without_subllm(exported, tmp_path: Path) -> None:
    out, wrapper, _ = exported
    result_file = tmp_path / "remote.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(out), str(result_file)],
                          capture_output=True, text=True, env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result_file, weights_only=True)
    assert got["mask"].min() == 0  # the batch really is left-padded
    ref = wrapper(got["ids"], attention_mask=got["mask"]).logits
    real = got["mask"].bool()
    torch.testing.assert_close(got["logits"][real], ref[real], rtol=0, atol=1e-6)
    ref_gen = wrapper.model.generate(got["ids"], 6, attention_mask=got["mask"])
    assert torch.equal(got["generated"], ref_gen)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_export_cli_errors_are_one_line_and_write_nothing(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    code, err = _run_cli(["export", "--checkpoint", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "hf")], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    # a run directory with a checkpoint, and an occupied --out
    from subllm.train.checkpoint import save_checkpoint

    model = SubLLM(tiny_config())
    save_checkpoint(tmp_path / "run", 5, model.state_dict(), {}, model.config.to_dict(), {})
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, err = _run_cli(["export", "--checkpoint", str(tmp_path / "run"), "--out",
                          str(occupied)], capsys)
    assert code == 2 and "--force" in err and (occupied / "keep.txt").read_text() == "mine"
    code, err = _run_cli(["export", "--checkpoint", str(tmp_path / "run"), "--out",
                          str(occupied), "--force"], capsys)  # --force never deletes user files
    assert code == 2 and "only an earlier export" in err
    assert (occupied / "keep.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    assert _run_cli(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(earlier)],
                    capsys)[0] == 0
    code, _ = _run_cli(["export", "--checkpoint", str(tmp_path / "run"), "--out",
                        str(earlier), "--force", "--dtype", "bf16"], capsys)
    assert code == 0
    loaded = AutoModelForCausalLM.from_pretrained(earlier)
    assert loaded.dtype == torch.bfloat16
    ref = model.state_dict()["layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, ref)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
