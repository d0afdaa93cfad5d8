"""Issue 28, converted models behave exactly like their source or are refused in one line:
per-layer attention (layer_types), a tied config whose file holds its own head, the source's
bos/eos/pad ids through `to_hf`, integer tensors, one validation of a transformers config for
`convert` and `estimate --hf-config`, the release's bf16 state_dicts and garbage `.pt` files,
and YaRN's extended context (`convert --max-seq-len`).

What is accepted is checked against `transformers`' own classes loading the same directory
(`AutoModelForCausalLM`, which is what users run); what is refused, through the real CLI (a
subprocess: exit code, one line, no traceback, inputs byte-identical, no --out left)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from procs import cli, one_line, snapshot
from safetensors.torch import load_file, save_file
from test_convert_cli import official_config, official_state, reference_logits
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import subllm  # noqa: F401  (registers the SubLLM Auto classes)
from subllm.cli import main
from subllm.errors import SubLLMError
from subllm.interop.llama import from_hf, from_hf_dir, model_config_of_hf, to_hf

CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.2)  # weights large enough that attention matters


def save_hf(d: Path, family: str, seed: int = 0, **kwargs) -> Path:
    """A random model of `family` saved with save_pretrained (non-trivial norms)."""
    config_class, model_class = CLASSES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SMALL, **kwargs}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(d)
    return d


def logits_both(d: Path, n: int, **convert) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') logits of `d` on fresh random tokens, with left padding."""
    ours = from_hf_dir(d, **convert).eval()
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    x = torch.randint(0, SMALL["vocab_size"], (2, n))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        got, want = ours(x, attention_mask=mask).logits, ref(x, attention_mask=mask).logits
    return torch.cat([got[0], got[1, 5:]]), torch.cat([want[0], want[1, 5:]])


# ---- attention that differs between layers: refused; the same on every layer: exact -------

MIXED = ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize("family, kwargs", [
    ("mistral", dict(sliding_window=8, layer_types=MIXED)),  # AutoModel: Ministral
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, layer_types=MIXED)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    ("qwen2", dict(use_sliding_window=False, layer_types=MIXED)),  # transformers fails too
    ("qwen3", dict(layer_types=["full_attention"] * 3 + ["chunked_attention"])),
])
def test_layers_that_differ_in_attention_are_refused(tmp_path: Path, family: str,
                                                     kwargs: dict) -> None:
    config_class, _ = CLASSES[family]
    config_class(**{**SMALL, **kwargs}).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(SubLLMError, match="layer_types"):
        from_hf_dir(tmp_path)
    with pytest.raises(SubLLMError, match="layer_types"):
        model_config_of_hf(raw, "config.json")


@pytest.mark.parametrize("family, kwargs, window", [
    ("mistral", dict(sliding_window=8, layer_types=["sliding_attention"] * 4), 8),
    ("mistral", dict(sliding_window=8, layer_types=["full_attention"] * 4), None),
    ("mistral", dict(sliding_window=8), 8),  # no layer_types: every layer slides
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=4), None),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"]
                   * 4), 8),
])
def test_the_same_attention_on_every_layer_is_exact(tmp_path: Path, family: str, kwargs: dict,
                                                    window: int | None) -> None:
    d = save_hf(tmp_path, family, seed=1, **kwargs)
    assert from_hf_dir(d).config.sliding_window == window
    got, want = logits_both(d, 40)  # 40 tokens: well past the window of 8
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_mistral_object_slides_on_every_layer_whatever_layer_types_says(tmp_path) -> None:
    """MistralForCausalLM ignores layer_types (AutoModel loads the directory as Ministral,
    which does not): from_hf follows the object it is given."""
    d = save_hf(tmp_path, "mistral", seed=2, sliding_window=8,
                layer_types=["full_attention"] * 4)
    src = MistralForCausalLM.from_pretrained(d).eval()
    ours = from_hf(src).eval()
    assert ours.config.sliding_window == 8
    x = torch.randint(0, SMALL["vocab_size"], (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, src(x).logits, atol=1e-5, rtol=0)


# ---- tie_word_embeddings with a head of its own in the file --------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_tied_config_with_its_own_head_loads_as_transformers_does(tmp_path: Path,
                                                                    family: str) -> None:
    d = save_hf(tmp_path, family, seed=3, tie_word_embeddings=True)
    weights = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in weights  # transformers saves a tied head once
    weights["lm_head.weight"] = (torch.randn_like(weights["model.embed_tokens.weight"])
                                 * SMALL["initializer_range"])  # as the model's own init
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = from_hf_dir(d)
    assert not ours.config.tie_embeddings
    torch.testing.assert_close(ours.lm_head.weight, weights["lm_head.weight"], atol=0, rtol=0)
    got, want = logits_both(d, 12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    back = from_hf(AutoModelForCausalLM.from_pretrained(d))  # the object route agrees
    assert not back.config.tie_embeddings


def test_a_tied_config_whose_file_repeats_the_embedding_stays_tied(tmp_path: Path) -> None:
    d = save_hf(tmp_path, "qwen2", seed=4, tie_word_embeddings=True)
    weights = load_file(str(d / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = from_hf_dir(d)
    assert ours.config.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    got, want = logits_both(d, 12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- the source's bos/eos/pad ids and generation config come back with to_hf ---------------

IDS = {"bos_token_id": 90, "eos_token_id": [91, 94, 96], "pad_token_id": 95}  # Llama 3's form


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = save_hf(tmp_path_factory.mktemp("llama3"), "llama", seed=5, **IDS,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8})
    # an instruct model's generation config: other eos ids than config.json, sampling
    GenerationConfig(bos_token_id=90, eos_token_id=[91, 96], pad_token_id=95, do_sample=True,
                     temperature=0.6, top_p=0.9).save_pretrained(d)
    return d


def _ids_of(model) -> tuple[dict, dict]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return ({k: getattr(model.config, k) for k in keys},
            {k: getattr(model.generation_config, k) for k in keys})


def test_to_hf_keeps_the_source_token_ids(llama3_dir: Path, tmp_path: Path) -> None:
    src = AutoModelForCausalLM.from_pretrained(llama3_dir)
    want = _ids_of(src)
    assert want[1]["eos_token_id"] == [91, 96]  # the fixture is what it claims
    for ours in (from_hf(src), from_hf_dir(llama3_dir)):
        back = to_hf(ours)
        assert _ids_of(back) == want
        assert back.generation_config.temperature == 0.6
    back.save_pretrained(tmp_path / "back")  # as written to disk, and read by transformers
    assert _ids_of(AutoModelForCausalLM.from_pretrained(tmp_path / "back")) == want
    x = torch.randint(0, SMALL["vocab_size"], (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, src(x).logits, atol=1e-5, rtol=0)
    assert to_hf(from_hf(src), token_ids={"eos_token_id": 7}).config.eos_token_id == 7


def test_a_converted_directory_written_back_keeps_the_source_token_ids(
        llama3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub"
    assert main(["convert", "--from-hf", str(llama3_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in IDS} == IDS
    src = AutoModelForCausalLM.from_pretrained(llama3_dir)
    sub = AutoModelForCausalLM.from_pretrained(out)  # a SubLLMForCausalLM
    back = to_hf(sub)
    assert type(back).__name__ == "LlamaForCausalLM" and _ids_of(back) == _ids_of(src)


# ---- one validation of a transformers config: convert, info and estimate agree -------------

BAD_CONFIGS = {
    "odd head_dim": ("qwen3", dict(head_dim=15), "even"),
    "layers differ": ("mistral", dict(sliding_window=8, layer_types=MIXED), "layer_types"),
    "window on some layers": ("qwen3", dict(use_sliding_window=True, sliding_window=8,
                                            max_window_layers=2), "max_window_layers=2"),
    "a field of the wrong type": ("llama", dict(rms_norm_eps="1e-5"), "rms_norm_eps"),
    "mlp bias": ("llama", dict(mlp_bias=True), "MLP biases"),
}


def _bad_config(d: Path, name: str) -> Path:
    family, change, _ = BAD_CONFIGS[name]
    d.mkdir(parents=True, exist_ok=True)
    config = CLASSES[family][0](**SMALL).to_dict()
    config.pop("layer_types", None)  # Qwen's are derived from the fields changed here
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_estimate_and_info_refuse_what_convert_refuses(tmp_path: Path, name: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    d = _bad_config(tmp_path / "src", name)
    words = BAD_CONFIGS[name][2]
    for argv in (["convert", "--from-hf", str(d), "--out", str(tmp_path / "out")],
                 ["estimate", "--hf-config", str(d / "config.json"), "--seq-len", "64"],
                 ["info", str(d)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_estimate_accepts_what_convert_accepts(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    d = save_hf(tmp_path / "src", "qwen3", head_dim=16, use_sliding_window=True,
                sliding_window=8, max_window_layers=0)
    assert main(["estimate", "--hf-config", str(d / "config.json"), "--seq-len", "64",
                 "--json"]) == 0
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())
    assert json.loads(capsys.readouterr().out)["model"]["parameters"] == n
    assert main(["convert", "--from-hf", str(d), "--out", str(tmp_path / "out")]) == 0


# ---- YaRN as Qwen documents it: the extended context with --max-seq-len --------------------

YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 32}  # max_position_embeddings stays 32


def test_yarn_reaches_its_extended_context_with_max_seq_len(tmp_path: Path) -> None:
    d = save_hf(tmp_path, "qwen2", seed=6, max_position_embeddings=32, rope_parameters=YARN)
    assert from_hf_dir(d).config.max_seq_len == 32
    with pytest.raises(SubLLMError, match="exceeds the model's context"):
        from_hf_dir(d).eval()(torch.zeros(1, 33, dtype=torch.long))
    ours = from_hf_dir(d, max_seq_len=128)
    assert ours.config.max_seq_len == 128 and ours.config.rope_scaling["factor"] == 4.0
    got, want = logits_both(d, 128, max_seq_len=128)  # 4x past the original context
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    back = to_hf(ours.eval()).eval()  # and written back, the same
    x = torch.randint(0, SMALL["vocab_size"], (1, 128))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, atol=1e-5, rtol=0)


# ---- the release: bf16 state_dicts ---------------------------------------------------------


def test_a_bf16_release_state_dict_converts_exactly(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """The release's `--bf16` saves every tensor in bf16, its inv_freq buffers included."""
    cfg = official_config("T(TT)T", "0.5")
    sd = {k: v.to(torch.bfloat16) for k, v in official_state(cfg, seed=4).items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, tmp_path / "subllm.pt")
    out = tmp_path / "out"
    assert main(["convert", "--from-official", str(tmp_path / "subllm.pt"),
                 "--official-config", str(tmp_path / "config.json"), "--out", str(out)]) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(1, cfg["num_embeddings"], (1, 40))
    with torch.no_grad():
        got = model(ids).logits[0].double()
    want, _, _ = reference_logits(sd, cfg, ids[0])  # fp64 from the same bf16 values
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_bf16_state_dict_of_another_rope_base_is_still_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = official_config("T(TT)T", "0.5")
    sd = {k: v.to(torch.bfloat16) for k, v in official_state(cfg).items()}
    hd = cfg["decoder_embed_dim"] // cfg["decoder_attention_heads"]
    sd["decoder.layers.0.self_attn.position.inv_freq"] = (
        1.0 / 500000 ** (torch.arange(0, hd, 2) / hd)).to(torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, tmp_path / "subllm.pt")
    assert main(["convert", "--from-official", str(tmp_path / "subllm.pt"),
                 "--official-config", str(tmp_path / "config.json"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "is not the base-10000 rotary frequencies" in capsys.readouterr().err


# ---- each refusal through the real CLI -----------------------------------------------------


class Foo:  # a class of this test module: torch.load(weights_only=True) refuses to unpickle it
    pass


def _int_tensor(d: Path) -> list[str]:
    save_hf(d, "llama")
    weights = load_file(str(d / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"  # not the first: its dtype is not the result's
    weights[key] = (weights[key] * 100).to(torch.int8)
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return ["--from-hf", str(d)]


def _official(d: Path, content: bytes | object) -> list[str]:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(official_config()))
    if isinstance(content, bytes):
        (d / "subllm.pt").write_bytes(content)
    else:
        torch.save(content, d / "subllm.pt")
    return ["--from-official", str(d / "subllm.pt"), "--official-config",
            str(d / "config.json")]


REFUSED = {
    "mistral layer_types": (lambda d: ["--from-hf", str(_bad_config(d, "layers differ"))],
                            ["a sliding window on some layers only", "layer_types"]),
    "qwen3 max_window_layers": (
        lambda d: ["--from-hf", str(_bad_config(d, "window on some layers"))],
        ["max_window_layers=2"]),
    "qwen3 odd head_dim": (lambda d: ["--from-hf", str(_bad_config(d, "odd head_dim"))],
                           ["head_dim", "even"]),
    "integer tensor": (_int_tensor, ["'model.layers.1.mlp.up_proj.weight' holds int8",
                                     "unquantized"]),
    "garbage .pt": (lambda d: _official(d, b"\x80\x04 not a pickle \x00\xff" * 8),
                    ["cannot read checkpoint", "not a torch.save file"]),
    "pickled object": (lambda d: _official(d, {"decoder.embed_tokens.weight": Foo()}),
                       ["cannot read checkpoint", "Foo"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFUSED))
def test_the_cli_refuses_in_one_line_and_touches_nothing(tmp_path: Path, name: str) -> None:
    make, fragments = REFUSED[name]
    source = make(tmp_path / "src")
    before = snapshot(tmp_path / "src")
    r = cli("convert", *source, "--out", str(tmp_path / "out"), cwd=tmp_path)
    one_line(r, 2, *fragments)
    assert "weights_only=False" not in r.stderr  # torch's advice is never passed on
    assert snapshot(tmp_path / "src") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no --out, no temporaries


@pytest.mark.slow
def test_the_cli_names_max_seq_len_for_yarn_and_reaches_it(tmp_path: Path) -> None:
    d = save_hf(tmp_path / "src", "qwen2", max_position_embeddings=32, rope_parameters=YARN)
    r = cli("convert", "--from-hf", str(d), "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--max-seq-len 128 to reach it" in r.stdout
    r = cli("convert", "--from-hf", str(d), "--out", str(tmp_path / "b"), "--max-seq-len", "128",
            cwd=tmp_path)
    assert r.returncode == 0 and "--max-seq-len" not in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "b" / "config.json").read_text())[
        "max_position_embeddings"] == 128
    r = cli("convert", "--from-hf", str(d), "--out", str(tmp_path / "c"), "--max-seq-len", "0",
            cwd=tmp_path)
    one_line(r, 2, "--max-seq-len must be a positive integer")
    assert not (tmp_path / "c").exists()
