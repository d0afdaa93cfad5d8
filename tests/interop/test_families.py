"""Upcycling today's open models: `subllm convert --from-hf` and `to_hf` for Llama (3.1's
rope scaling, attention biases), Qwen2 (q/k/v biases, YaRN, tied embeddings), Qwen3 (qk-norm,
head_dim != dim / heads) and Mistral (sliding window), each checked against the
`transformers` model class itself (design.md §2.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import subllm  # noqa: F401  (registers the SubLLM Auto classes)
from subllm import ConfigError, ModelConfig
from subllm.cli import main
from subllm.interop.llama import from_hf, to_hf

# grouped KV heads everywhere; each family with what it brings
COMMON = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              initializer_range=0.1)  # weights large enough that attention matters
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(
        attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(
        head_dim=24, rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=24)),
}
SEQ = 48  # past every original context above and past Mistral's window


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, prepare_corpus) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("families_data"), 12)


def make_hf(family: str, vocab: int, seed: int = 0, **extra):
    config_class, model_class, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = config_class(vocab_size=vocab, **COMMON, **{**kwargs, **extra})
    model = model_class(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Path]:
    """Each family saved with save_pretrained, with the corpus tokenizer."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"),
                                  eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    dirs = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        make_hf(family, len(tok) + 12, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[family] = d
    return dirs


def convert(src: Path, out: Path, *extra: str) -> Path:
    assert main(["convert", "--from-hf", str(src), "--out", str(out), *extra]) == 0
    return out


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_T_logits_and_decoding_equal_transformers(
        family: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = convert(hf_dirs[family], tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["hf_family"] == family and config["num_key_value_heads"] == 2
    src = AutoModelForCausalLM.from_pretrained(hf_dirs[family]).eval()
    assert type(src).__name__ == FAMILIES[family][1].__name__
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, src.config.vocab_size, (2, SEQ))
    mask = torch.ones_like(x)
    mask[1, :7] = 0  # a left-padded row
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, src(x).logits, atol=1e-5, rtol=0)
        a, b = ours(x, attention_mask=mask).logits, src(x, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1, 7:], b[1, 7:], atol=1e-5, rtol=0)
    # KV-cache decoding gives transformers' greedy tokens
    prompt = x[:, :20]
    ref = src.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                       do_sample=False, pad_token_id=0,  # 40 tokens: past Mistral's window
                       eos_token_id=None)  # as ours: no stop
    assert torch.equal(ours.model.generate(prompt, max_new_tokens=20), ref)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_rope_scaling_is_what_matches(family: str) -> None:
    """Without its rope scaling the converted model would not match: the check above can fail."""
    src = make_hf(family, 97, seed=1)
    ours = from_hf(src).eval()
    assert ours.config.rope_scaling["rope_type"] == FAMILIES[family][2][
        "rope_parameters"]["rope_type"]
    x = torch.randint(0, 97, (1, SEQ))
    with torch.no_grad():
        ref = src(x).logits
        torch.testing.assert_close(ours(x).logits, ref, atol=1e-5, rtol=0)
        ours.config.rope_scaling = None
        assert (ours(x).logits - ref).abs().max() > 1e-2


def test_dynamic_rope_and_llama_attention_bias() -> None:
    src = make_hf("llama", 97, seed=2,
                  rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    ours = from_hf(src).eval()
    assert (ours.config.qkv_bias, ours.config.o_bias) == (True, True)
    x = torch.randint(0, 97, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, src(x).logits, atol=1e-5, rtol=0)
    # dynamic NTK differs from the plain table only past its original context: refused there
    d = ours.config.to_dict() | {"max_seq_len": 256}
    with pytest.raises(ConfigError, match="dynamic rope scaling is implemented up to"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_to_hf_writes_the_family_class(family: str, hf_dirs: dict[str, Path],
                                       tmp_path: Path) -> None:
    out = convert(hf_dirs[family], tmp_path / "out")
    ours = AutoModelForCausalLM.from_pretrained(out).model.eval()
    back = to_hf(ours)
    assert type(back) is FAMILIES[family][1]
    back.save_pretrained(tmp_path / "back")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is FAMILIES[family][1]
    src = AutoModelForCausalLM.from_pretrained(hf_dirs[family]).eval()
    x = torch.randint(0, src.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, src(x).logits, atol=1e-5, rtol=0)
    assert (getattr(reloaded.config, "sliding_window", None) == 24) == (family == "mistral")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_subsampled_copies_blocks_decodes_and_trains(family: str, hf_dirs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    out = convert(hf_dirs[family], tmp_path / "out", "--structure", "T(TT)T", "--keep", "0.5")
    model = AutoModelForCausalLM.from_pretrained(out)
    inner = model.model
    src = load_file(str(hf_dirs[family] / "model.safetensors"))
    keys = [k[len("model."):] for k in src if k.startswith("model.layers.2.")]
    assert any("bias" in k for k in keys) == (family in ("llama", "qwen2"))
    assert any("q_norm" in k for k in keys) == (family == "qwen3")
    for key in keys:
        torch.testing.assert_close(inner.state_dict()[key], src["model." + key], atol=0, rtol=0)
    assert torch.all(inner.bypasses[0].scale == inner.config.bypass_init)  # fresh

    # the cache: token-by-token decoding gives the full pass's logits
    inner.eval()
    x = torch.randint(0, inner.config.vocab_size, (2, 40))
    with torch.no_grad():
        full = inner(x).logits
        out_ = inner(x[:, :24], use_cache=True)
        steps = [out_.logits]
        for t in range(24, 40):
            out_ = inner(x[:, t:t + 1], cache=out_.cache)
            steps.append(out_.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        model.set_step(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


# ---- what is not supported: one line naming it ---------------------------------------------


def test_unsupported_family_rope_and_mlp_bias(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps(
        {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}))
    err = _error(capsys, ["convert", "--from-hf", str(gemma), "--out", str(tmp_path / "a")])
    assert "'gemma2' (Gemma2ForCausalLM)" in err and "Qwen3ForCausalLM" in err

    longrope = tmp_path / "longrope"
    LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=64,
                rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                 "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                 "original_max_position_embeddings": 32}
                ).save_pretrained(longrope)  # no weights: refused before they are read
    err = _error(capsys, ["convert", "--from-hf", str(longrope), "--out", str(tmp_path / "b")])
    assert "rope scaling 'longrope' is not supported" in err and "llama3" in err

    mlp_bias = tmp_path / "mlp_bias"
    LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, mlp_bias=True).save_pretrained(mlp_bias)
    err = _error(capsys, ["convert", "--from-hf", str(mlp_bias), "--out", str(tmp_path / "c")])
    assert "MLP biases (mlp_bias=true) are not supported" in err
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("family, extra", [
    ("mistral", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
])
def test_the_sliding_window_is_what_matches(family: str, extra: dict) -> None:
    """Past the window, attention is the window's, not full attention (which would differ),
    with padding, and in a subsampled model the cached decoding equals the full pass."""
    src = make_hf(family, 97, seed=3, **extra)
    ours = from_hf(src).eval()
    window = ours.config.sliding_window
    assert window == (24 if family == "mistral" else 16)
    x = torch.randint(0, 97, (2, 80))
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    with torch.no_grad():
        ref = src(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask).logits
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1, 9:], ref[1, 9:], atol=1e-5, rtol=0)
        ours.config.sliding_window = None
        assert (ours(x).logits - src(x).logits).abs().max() > 1e-2
    sub = from_hf(src, structure="T(TT)T", keep=0.5).eval()
    with torch.no_grad():
        full = sub(x, attention_mask=mask).logits
        out = sub(x[:, :30], attention_mask=mask[:, :30], use_cache=True)
        steps = [out.logits]
        for t in range(30, 80):
            out = sub(x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache)
            steps.append(out.logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 9:], full[1, 9:], atol=1e-5, rtol=0)


def test_a_window_on_some_layers_only_is_refused(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "qwen"
    Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, use_sliding_window=True, sliding_window=16,
                max_window_layers=2).save_pretrained(d)
    err = _error(capsys, ["convert", "--from-hf", str(d), "--out", str(tmp_path / "a")])
    assert "sliding window on some layers only" in err and "max_window_layers=2" in err


# ---- the recipe: convert, then `subllm train --init-from` with a router warm-up ------------


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recipe_router_warmup_then_training(family: str, hf_dirs: dict[str, Path], data: Path,
                                            tmp_path: Path) -> None:
    from subllm.train import checkpoint as ckpt

    sub = convert(hf_dirs[family], tmp_path / "sub", "--structure", "T(TT)T", "--keep", "0.5")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--init-from", str(sub),
                 "--train-only-routers", "4", "--max-steps", "16", "--seq-len", "32",
                 "--batch-size", "4", "--lr", "3e-3", "--warmup", "1", "--eval-every", "0",
                 "--eval-batches", "2", "--save-every", "4", "--keep-checkpoints", "4",
                 "--log-every", "1", "--device", "cpu"]) == 0
    start = {k[len("model."):]: v for k, v in load_file(str(sub / "model.safetensors")).items()}
    at = {s: ckpt.load_weights(run / "checkpoints" / f"step-{s:08d}") for s in (4, 8)}
    blocks = [k for k in start if not k.startswith(("subsamplers.", "bypasses."))]
    assert len(blocks) > 4 * 9
    # the warm-up: only the scorers and bypass scales moved ...
    for k in blocks:
        torch.testing.assert_close(at[4][k], start[k], atol=0, rtol=0)
    for k in ("subsamplers.0.score.weight", "bypasses.0.scale"):
        assert not torch.equal(at[4][k], start[k]), k
    # ... then everything trains
    k = "layers.1.mlp.up_proj.weight"
    assert not torch.equal(at[8][k], start[k])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    assert sum(train[-3:]) < 0.85 * sum(train[:3]), train  # the loss falls
    val = [r for r in records if "val_loss" in r][-1]
    # and the routing holds: inference's kept fraction near keep, little train/eval gap
    assert abs(val["val_kept_fractions"][0] - 0.5) < 0.15, val
    assert abs(val["val_gap"]) < 0.05, val
    # the run exports with the family's features (rope scaling, biases, qk-norm, window)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").model.eval()
    converted = AutoModelForCausalLM.from_pretrained(sub).model
    for field in ("rope_scaling", "qkv_bias", "o_bias", "qk_norm", "sliding_window", "head_dim",
                  "hf_family", "tie_embeddings"):
        assert getattr(exported.config, field) == getattr(converted.config, field), field
    x = torch.randint(0, exported.config.vocab_size, (1, 40))
    final = ckpt.load_weights(ckpt.latest_checkpoint(run))
    with torch.no_grad():
        converted.load_state_dict(final)
        converted.set_step(1)  # folds the last step's cut-off, as export does
        torch.testing.assert_close(exported(x).logits, converted.eval()(x).logits, atol=1e-6,
                                   rtol=0)


def test_train_only_routers_needs_routers(hf_dirs: dict[str, Path], data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    out = convert(hf_dirs["llama"], tmp_path / "out")
    capsys.readouterr()
    err = _error(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                          "--init-from", str(out), "--train-only-routers", "3", "--seq-len", "32",
                          "--device", "cpu"])
    assert "--train-only-routers 3: the model (TTTT) has no scorers or bypass scales" in err


# ---- subllm info / estimate ------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_info_and_estimate_know_the_family(family: str, hf_dirs: dict[str, Path],
                                           capsys: pytest.CaptureFixture) -> None:
    src = AutoModelForCausalLM.from_pretrained(hf_dirs[family])
    n = sum(p.numel() for p in src.parameters())  # tied weights once
    capsys.readouterr()
    for arg in (hf_dirs[family], hf_dirs[family] / "config.json"):
        assert main(["info", str(arg), "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["parameters"] == n and d["config"]["hf_family"] == family
    assert main(["info", str(hf_dirs[family])]) == 0
    features = capsys.readouterr().out
    assert f"from {family}" in features
    assert ("q/k RMSNorm" in features) == (family == "qwen3")
    assert ("sliding window 24" in features) == (family == "mistral")
    assert main(["estimate", "--hf-config", str(hf_dirs[family] / "config.json"),
                 "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["parameters"] == n


REMOTE = """
import importlib.abc, sys


class NoSubllm(importlib.abc.MetaPathFinder):  # as if subllm were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "subllm" or name.startswith("subllm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoSubllm())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_converted_qwen3_loads_with_trust_remote_code_without_subllm(
        hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The exported model code carries the new fields (qk-norm, head_dim, rope scaling)."""
    import os
    import subprocess
    import sys

    out = convert(hf_dirs["qwen3"], tmp_path / "out", "--structure", "T(TT)T", "--keep", "0.5")
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, SEQ))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        ref = ours(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), ref,
                               atol=1e-6, rtol=0)
