"""`subllm convert` (--from-hf, --from-official) and `subllm train --init-from`.

The authors' model is checked against `reference_logits` below: a from-scratch forward
pass of their architecture (docs/design.md §2 and §3, eval mode) that reads their state-dict keys
directly and imports nothing of subllm's model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import subllm  # noqa: F401  (registers the SubLLM Auto classes)
from subllm.cli import main
from subllm.train import checkpoint as ckpt

TRAIN_FLAGS = ["--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--eval-every", "0",
               "--eval-batches", "1", "--save-every", "0", "--log-every", "1", "--device", "cpu"]


# ---- fixtures: a prepared corpus, a tiny Llama with its tokenizer --------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, prepare_corpus) -> Path:
    # 12 docs of 30 lines of 12 words, seed 0, vocab 300
    return prepare_corpus(tmp_path_factory.mktemp("convert_data"), 12)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A random Llama with grouped KV heads, saved with save_pretrained, plus a tokenizer."""
    d = tmp_path_factory.mktemp("llama")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"),
                                  eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    vocab = len(tok) + 12  # a padded embedding, as real checkpoints often have
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=112,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so a dropped or swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sub_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("converted") / "sub"
    assert main(["convert", "--from-hf", str(llama_dir), "--structure", "T(TT)T",
                 "--keep", "0.5", "--out", str(out)]) == 0
    return out


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 with one line on stderr; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# ---- --from-hf ----------------------------------------------------------------------------


def test_from_hf_all_T_gives_the_llama_logits_and_its_tokenizer(
        llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "llama"
    assert main(["convert", "--from-hf", str(llama_dir), "--structure", "TTTT",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "subllm" and config["structure"] == "TTTT"
    assert config["num_key_value_heads"] == 2
    llama = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    assert config["eos_token_id"] == llama.config.eos_token_id
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ours).__name__ == "SubLLMForCausalLM"
    x = torch.randint(0, llama.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, llama(x).logits, atol=1e-5, rtol=1e-5)
    text = "the model keeps a token"
    assert (AutoTokenizer.from_pretrained(out)(text).input_ids
            == AutoTokenizer.from_pretrained(llama_dir)(text).input_ids)


def test_from_hf_subsampled_copies_blocks_and_trains(llama_dir: Path, sub_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(sub_dir)
    inner = model.model
    assert inner.config.structure == "T(TT)T" and inner.config.keep == 0.5
    llama = load_file(str(llama_dir / "model.safetensors"))
    for key in ("layers.2.mlp.gate_proj.weight", "layers.1.self_attn.k_proj.weight",
                "layers.3.post_attention_layernorm.weight", "norm.weight", "embed_tokens.weight"):
        torch.testing.assert_close(inner.state_dict()[key], llama["model." + key], atol=0, rtol=0)
    torch.testing.assert_close(inner.lm_head.weight, llama["lm_head.weight"], atol=0, rtol=0)
    assert torch.all(inner.bypasses[0].scale == inner.config.bypass_init)  # fresh
    assert 0.005 < inner.subsamplers[0].score.weight.std() < 0.05

    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, inner.config.vocab_size, (4, 32))
    losses = []
    for step in range(10):
        model.set_step(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert inner.subsamplers[0].score.weight.grad.abs().sum() > 0
            assert inner.bypasses[0].scale.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_from_hf_structure_must_have_one_T_per_layer(
        llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(capsys, ["convert", "--from-hf", str(llama_dir), "--structure", "T(TT)",
                          "--out", str(tmp_path / "x")])
    assert "has 3 'T' blocks but the model has 4 layers" in err
    assert not (tmp_path / "x").exists()


# ---- subllm train --init-from -----------------------------------------------------------


def test_train_init_from_starts_from_the_converted_weights(
        sub_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    # a learning rate so small that the weights after two steps are the starting weights
    assert main(["train", "--data", str(data), "--out", str(run), "--init-from", str(sub_dir),
                 "--max-steps", "2", "--lr", "1e-9", "--min-lr", "0", *TRAIN_FLAGS]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err  # the data was tokenized with the model's tokenizer
    saved = ckpt.latest_checkpoint(run)
    assert ckpt.step_of(saved) == 2
    config = ckpt.load_model_config(saved)
    assert (config["structure"], config["keep"], config["n_kv_heads"]) == ("T(TT)T", 0.5, 2)
    start = load_file(str(sub_dir / "model.safetensors"))
    weights = ckpt.load_weights(saved)
    for key in ("layers.1.self_attn.q_proj.weight", "subsamplers.0.score.weight",
                "bypasses.0.scale", "lm_head.weight"):
        torch.testing.assert_close(weights[key], start["model." + key], atol=1e-6, rtol=0)
    # the run resumes like any other (its model config was saved with it)
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3"]) == 0
    assert ckpt.step_of(ckpt.latest_checkpoint(run)) == 3
    # and a `subllm train` run is a starting point too
    again = tmp_path / "again"
    assert main(["train", "--data", str(data), "--out", str(again), "--init-from", str(run),
                 "--max-steps", "1", "--keep", "0.6", *TRAIN_FLAGS]) == 0
    config = ckpt.load_model_config(ckpt.latest_checkpoint(again))
    assert (config["structure"], config["keep"]) == ("T(TT)T", 0.6)


@pytest.mark.parametrize("extra, words", [
    (["--resume"], "--resume"),
    (["--structure", "TTTT"], "--structure does not go with --init-from"),
    (["--preset", "llama-tiny"], "--preset does not go with --init-from"),
    (["--config", "MODEL_DIM"], "`model: dim` does not go with --init-from"),
])
def test_train_init_from_conflicts(sub_dir: Path, data: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture, extra: list[str],
                                   words: str) -> None:
    if "MODEL_DIM" in extra:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"dim": 32}}))
        extra = ["--config", str(tmp_path / "c.yaml")]
    err = _error(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                          "--init-from", str(sub_dir), "--max-steps", "1", *extra])
    assert words in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_init_from_refuses_small_vocab_and_non_subllm(
        llama_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from subllm.interop.export import save_hf_model
    from subllm.model import SubLLM
    from subllm.model.config import ModelConfig

    small = tmp_path / "small"
    save_hf_model(SubLLM(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_dim=32,
                                     structure="T(T)")), small)
    capsys.readouterr()
    err = _error(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "a"),
                          "--init-from", str(small), *TRAIN_FLAGS])
    assert "has vocab_size 50" in err
    err = _error(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "b"),
                          "--init-from", str(llama_dir), *TRAIN_FLAGS])
    assert "'llama' model, not a SubLLM" in err and "subllm convert --from-hf" in err


# ---- --from-official: the authors' release ------------------------------------------------


def official_config(structure: str = "T(T(TT)T)T", keep: str | None = "0.64",
                    tie: bool = False) -> dict:
    """A config JSON laid out like the release's config/subllm-1.3B-keep0p4-4k_config.json."""
    cfg = {"num_embeddings": 97, "decoder_embed_dim": 48, "decoder_ffn_embed_dim": 80,
           "hidden_size": 48, "decoder_layers": structure.count("T"),
           "decoder_attention_heads": 4, "norm_name": "rmsnorm", "mlp_name": "swiglu",
           "qk_bias": False, "use_fused": False, "attn_type": "vanilla",
           "tokens_per_sample": 128, "n_positions": 128, "padding_idx": 0, "bos_token_id": 1,
           "eos_token_id": 2, "scale_token_embedding": False, "tie_weights": tie,
           "structure": structure}
    if keep is not None:
        cfg["downsampling_factor_denominator"] = keep
    return cfg


def official_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a realistic scale under the authors' `SubllmModel` keys."""
    g = torch.Generator().manual_seed(seed)
    V, d, f = cfg["num_embeddings"], cfg["decoder_embed_dim"], cfg["decoder_ffn_embed_dim"]
    hd = d // cfg["decoder_attention_heads"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm() -> torch.Tensor:
        return 1.0 + randn(d, std=0.2)

    sd = {"decoder.embed_tokens.weight": randn(V, d, std=d ** -0.5)}  # their init
    for i in range(cfg["decoder_layers"]):
        p = f"decoder.layers.{i}."
        sd[p + "self_attn_layer_norm.weight"] = norm()
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = randn(d, d, std=d ** -0.5)
        sd[p + "self_attn.position.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd)
        sd[p + "final_layer_norm.weight"] = norm()
        sd[p + "feedforward.swiglu.w12.weight"] = randn(2 * f, d, std=d ** -0.5)
        sd[p + "feedforward.swiglu.w3.weight"] = randn(d, f, std=f ** -0.5)
    for j in range(cfg["structure"].count("(")):
        sd[f"decoder.downsamplers.{j}.to_scores.weight"] = randn(1, d, std=1.5 * d ** -0.5)
        sd[f"decoder.bypasses.{j}.bypass_scale"] = torch.rand(d, generator=g) * 0.7 + 0.2
    sd["decoder.layer_norm.weight"] = norm()
    sd["decoder.output_projection.weight"] = (sd["decoder.embed_tokens.weight"]
                                              if cfg["tie_weights"] else randn(V, d, std=d ** -0.5))
    return sd


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor,
                     positions: str = "parent") -> tuple[torch.Tensor, list[int], list[int]]:
    """The authors' model in eval mode on one sequence, in fp64, from their keys. Blocks of
    a nested segment (depth >= 2) rotate by the token's index among the enclosing
    segment's kept tokens (`parent`: their full pass) or by its original position.

    Returns (logits (L, V), tokens kept at each "(" in order, of them how many with a
    fractional upsampling weight 0 < w < 1).
    """
    w = {k: v.double() for k, v in sd.items()}
    H = cfg["decoder_attention_heads"]
    d, f = cfg["decoder_embed_dim"], cfg["decoder_ffn_embed_dim"]
    hd = d // H

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x (H, n, hd)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = pos.double()[:, None] * inv_freq[None]  # (n, hd/2)
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rotated * sin

    def block(i: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        p = f"decoder.layers.{i}."
        n = x.shape[0]
        h = rms_norm(x, w[p + "self_attn_layer_norm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{name}.weight"].T for name in ("q_proj", "k_proj",
                                                                        "v_proj"))
        q, k, v = (t.view(n, H, hd).transpose(0, 1) for t in (q, k, v))  # (H, n, hd)
        q, k = rope(q, pos), rope(k, pos)
        scores = q @ k.transpose(1, 2) / math.sqrt(hd)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(0, 1).reshape(n, d) @ w[p + "self_attn.out_proj.weight"].T
        h = rms_norm(x, w[p + "final_layer_norm.weight"])
        gate_up = h @ w[p + "feedforward.swiglu.w12.weight"].T
        hidden = F.silu(gate_up[:, :f]) * gate_up[:, f:]
        return x + hidden @ w[p + "feedforward.swiglu.w3.weight"].T

    x = w["decoder.embed_tokens.weight"][ids]
    pos = torch.arange(len(ids))
    stack, kept, fractional = [], [], []
    layer = opened = closed = 0
    for ch in cfg["structure"]:
        if ch == "T":
            x = block(layer, x, pos)
            layer += 1
        elif ch == "(":  # keep tokens with a positive score, weight clamp(score, 0, 1)
            s = x @ w[f"decoder.downsamplers.{opened}.to_scores.weight"][0]
            opened += 1
            keep = s > 0
            weight = s.clamp(0, 1)[keep]
            kept.append(int(keep.sum()))
            fractional.append(int(((weight > 0) & (weight < 1)).sum()))
            stack.append((x, pos, keep, weight))
            if positions == "parent" and len(stack) >= 2:  # nested: index in the parent
                pos = torch.arange(len(x))[keep]
            else:
                pos = pos[keep]  # the original positions
            x = x[keep]
        else:  # upsample, then bypass with the scale of the `closed`-th ")"
            x_out, pos, keep, weight = stack.pop()
            u = x_out.clone()
            u[keep] = weight[:, None] * x + (1 - weight[:, None]) * x_out[keep]
            c = w[f"decoder.bypasses.{closed}.bypass_scale"]
            closed += 1
            x = x_out + c * (u - x_out)
    x = rms_norm(x, w["decoder.layer_norm.weight"])
    out = w["decoder.output_projection.weight" if "decoder.output_projection.weight" in w
            else "decoder.embed_tokens.weight"]
    return x @ out.T, kept, fractional


def save_official(tmp_path: Path, cfg: dict, sd: dict[str, torch.Tensor], fmt: str
                  ) -> tuple[Path, Path]:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    if fmt == "pt":
        path = tmp_path / "subllm.pt"
        torch.save(sd, path)
    else:  # safetensors stores tied tensors once
        path = tmp_path / "subllm.safetensors"
        tied = cfg["tie_weights"]
        save_file({k: v.contiguous() for k, v in sd.items()
                   if not (tied and k == "decoder.output_projection.weight")}, str(path))
    return path, config_path


@pytest.mark.parametrize("structure, keep, tie, fmt, positions, seed", [
    ("T(T(TT)T)T", "0.64", False, "pt", None, 1),  # the default: parent
    ("T(T(TT)T)T", "0.5", True, "safetensors", "original", 1),
    ("TT(TT(TT)TT)TT", "0.64", False, "safetensors", "parent", 3),
    ("TTT", None, False, "safetensors", None, 1),  # the release's LLaMA baseline config
])
def test_from_official_matches_an_independent_forward(
        tmp_path: Path, structure: str, keep: str | None, tie: bool, fmt: str,
        positions: str | None, seed: int) -> None:
    cfg = official_config(structure, keep, tie)
    sd = official_state(cfg, seed=seed)
    path, config_path = save_official(tmp_path, cfg, sd, fmt)
    out = tmp_path / "out"
    flags = ["--rope-positions", positions] if positions else []
    assert main(["convert", "--from-official", str(path), "--official-config",
                 str(config_path), "--out", str(out), *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rope_positions"] == (positions or "parent")
    assert config["structure"] == structure and config["tie_word_embeddings"] == tie
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert config["threshold"] == "zero"  # the authors' inference rule: score > 0
    if keep is not None:
        assert config["keep"] == float(keep)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, cfg["num_embeddings"], (2, 48), generator=g)  # 0 is their padding
    with torch.no_grad():
        result = model(ids)
    for row in range(ids.shape[0]):
        expected, kept, fractional = reference_logits(sd, cfg, ids[row], positions or "parent")
        torch.testing.assert_close(result.logits[row].double(), expected, atol=1e-5, rtol=1e-5)
        assert [int(k[row]) for k in result.kept or ()] == kept
        # not vacuous: every subsampling module keeps some tokens and drops others, and some
        # upsampling weights are fractional
        entered = [int(e[row]) for e in result.entered or ()]
        assert all(0 < k < n for k, n in zip(kept, entered, strict=True)), (kept, entered)
        assert all(n > 0 for n in fractional), fractional
        if model.model.config.max_depth >= 2:  # nested: the two conventions differ here
            other = reference_logits(sd, cfg, ids[row], "original" if positions != "original"
                                     else "parent")[0]
            assert (other - expected).abs().max() > 1e-3


def _rename(sd: dict, old: str, new: str) -> None:
    sd[new] = sd.pop(old)


@pytest.mark.parametrize("change, words", [
    (lambda c, sd: sd.pop("decoder.layers.2.self_attn.k_proj.weight"),
     "missing key 'decoder.layers.2.self_attn.k_proj.weight'"),
    (lambda c, sd: _rename(sd, "decoder.layers.0.feedforward.swiglu.w3.weight",
                           "decoder.layers.0.feedforward.swiglu.w4.weight"),
     "unexpected key 'decoder.layers.0.feedforward.swiglu.w4.weight'"),
    (lambda c, sd: _rename(sd, "decoder.bypasses.1.bypass_scale", "decoder.bypasses.1.scale"),
     "unexpected key 'decoder.bypasses.1.scale'"),
    (lambda c, sd: sd.__setitem__("decoder.downsamplers.2.to_scores.weight", torch.ones(1, 48)),
     "unexpected key 'decoder.downsamplers.2.to_scores.weight'"),
    (lambda c, sd: sd.__setitem__("decoder.layers.1.feedforward.swiglu.w12.weight",
                                  torch.ones(80, 48)),
     "'decoder.layers.1.feedforward.swiglu.w12.weight' has shape [80, 48]"),
    (lambda c, sd: sd.__setitem__("decoder.bypasses.0.bypass_scale", torch.ones(47)),
     "'decoder.bypasses.0.bypass_scale' has shape [47]"),
    (lambda c, sd: sd.__setitem__("decoder.layers.1.self_attn.position.inv_freq",
                                  1.0 / 500000 ** (torch.arange(0, 12, 2) / 12)),
     "is not the base-10000 rotary frequencies"),
    (lambda c, sd: c.pop("decoder_ffn_embed_dim"), "missing field 'decoder_ffn_embed_dim'"),
    (lambda c, sd: c.pop("downsampling_factor_denominator"),
     "missing field 'downsampling_factor_denominator'"),
    (lambda c, sd: c.__setitem__("rotary_base", 500000), "unknown field 'rotary_base'"),
    (lambda c, sd: c.__setitem__("norm_name", "layernorm"), "norm_name is 'layernorm'"),
    (lambda c, sd: c.__setitem__("downsampling_factor_denominator", "two"),
     "downsampling_factor_denominator must be a keep ratio"),
    (lambda c, sd: c.__setitem__("decoder_layers", 5), "but decoder_layers is 5"),
    (lambda c, sd: c.__setitem__("hidden_size", 64), "hidden_size is 64"),
    (lambda c, sd: (c.__setitem__("tie_weights", True),
                    sd.__setitem__("decoder.output_projection.weight", torch.ones(97, 48))),
     "tie_weights is true but 'decoder.output_projection.weight' differs"),
])
def test_from_official_errors_name_the_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture, change, words: str) -> None:
    cfg = official_config()
    sd = official_state(cfg)
    change(cfg, sd)
    path, config_path = save_official(tmp_path, cfg, sd, "pt")
    out = tmp_path / "out"
    err = _error(capsys, ["convert", "--from-official", str(path), "--official-config",
                          str(config_path), "--out", str(out)])
    assert words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "subllm.pt"]


def test_from_official_refuses_a_wrapped_state_dict(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = official_config()
    path, config_path = save_official(tmp_path, cfg, official_state(cfg), "pt")
    torch.save({"model": torch.load(path, weights_only=True), "step": 3}, path)
    err = _error(capsys, ["convert", "--from-official", str(path), "--official-config",
                          str(config_path), "--out", str(tmp_path / "out")])
    assert "is not a state_dict" in err and "'model'" in err


def test_from_official_says_which_rope_convention_it_wrote(tmp_path: Path, capsys) -> None:
    cfg = official_config("T(T(TT)T)T", "0.64", False)
    path, config_path = save_official(tmp_path, cfg, official_state(cfg, seed=1),
                                      "safetensors")
    assert main(["convert", "--from-official", str(path), "--official-config",
                 str(config_path), "--out", str(tmp_path / "out")]) == 0
    assert "rope_positions: parent (the release's full forward pass" in capsys.readouterr().out
    assert _error(capsys, ["convert", "--from-hf", str(tmp_path / "llama"), "--rope-positions",
                           "parent", "--out", str(tmp_path / "o2")]).endswith(
        "--rope-positions goes with --from-official, not --from-hf")
