"""examples/configs/*.yaml: each parses as `subllm train --config FILE` settings, passes the
settings checks, and builds the model it describes (on the meta device: no memory)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from subllm.cli import build_parser, main
from subllm.commands.train import resolve
from subllm.model import ModelConfig, SubLLM
from subllm.train.config import check_config, model_config_of

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def _settings(path: Path):
    argv = ["train", "--config", str(path)]
    args = build_parser(argv).parse_args(argv)
    cfg, demo = resolve(args, args._parser)
    assert not demo
    check_config(cfg)
    return cfg


def _n_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in SubLLM(config).parameters())


def test_every_example_config_is_tested() -> None:
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {
        "demo.yaml", "subllm-small.yaml", "subllm-1.3b-8gpu.yaml", "upcycle-qwen3.yaml"}


@pytest.mark.parametrize("name, preset", [("demo.yaml", "subllm-tiny"),
                                          ("subllm-small.yaml", "subllm-small"),
                                          ("subllm-1.3b-8gpu.yaml", "subllm-1.3b")])
def test_a_config_builds_its_preset(name: str, preset: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, prepare_corpus) -> None:
    """With data prepared where the file says (a tokenizer of 300 tokens), the settings resolve
    and the model is the preset's, the vocabulary the data's unless the file sets it."""
    path = CONFIGS / name
    raw = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    data = prepare_corpus(tmp_path / "work", 6)
    Path(raw["data"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(data, raw["data"])
    cfg = _settings(path)
    assert cfg.preset == preset and cfg.max_steps == raw["max-steps"]
    config, _ = model_config_of(str(path))
    vocab = (raw.get("model") or {}).get("vocab_size", 300)
    assert config == dataclasses.replace(ModelConfig.preset(preset), vocab_size=vocab)
    assert cfg.seq_len <= config.max_seq_len
    if preset == "subllm-1.3b":  # the paper's model, as `subllm info subllm-1.3b` counts it
        assert _n_params(config) == 1_345_431_552


def test_the_demo_config_is_the_demo() -> None:
    """demo.yaml holds exactly the no-argument run's settings."""
    from subllm.train.config import DEFAULT_DATA_DIR, DEFAULT_RUN_DIR, DEMO, TrainConfig

    raw = {k.replace("-", "_"): v for k, v in
           yaml.safe_load((CONFIGS / "demo.yaml").read_text()).items()}
    assert raw.pop("data") == str(DEFAULT_DATA_DIR) and raw.pop("out") == str(DEFAULT_RUN_DIR)
    assert raw.pop("preset") == TrainConfig().preset
    assert raw == DEMO


@pytest.mark.slow
def test_the_upcycling_config_trains_from_a_converted_qwen3(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare_corpus) -> None:
    """upcycle-qwen3.yaml, on a tiny random Qwen3 converted as its comment says: the
    settings resolve to the converted model, and two steps of it train."""
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path = CONFIGS / "upcycle-qwen3.yaml"
    raw = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    data = prepare_corpus(tmp_path / "work", 8)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"),
                                  eos_token="<|endoftext|>")
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64))
    qwen.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    assert main(["convert", "--from-hf", str(tmp_path / "qwen3"), "--out", raw["init-from"],
                 "--structure", "T(TT)T", "--keep", "0.64"]) == 0
    assert main(["prepare", "--tokenizer", raw["init-from"],
                 "--input", str(tmp_path / "work" / "corpus"), "--out", raw["data"]]) == 0
    cfg = _settings(path)
    assert cfg.init_from == raw["init-from"] and cfg.train_only_routers == 200
    config, _ = model_config_of(str(path))
    assert config.structure == "T(TT)T" and config.qk_norm
    # the file's own settings, shrunk to two steps at the tiny model's context
    assert main(["train", "--config", str(path), "--seq-len", "32", "--batch-size", "2",
                 "--grad-accum", "1", "--max-steps", "2", "--warmup", "1",
                 "--train-only-routers", "1", "--eval-every", "0", "--eval-batches", "1",
                 "--save-every", "0"]) == 0
    assert (Path(raw["out"]) / "checkpoints").is_dir()
