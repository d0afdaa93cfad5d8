"""One loader for "any model directory", and the way out of a run.

A model directory is either a Hugging Face SubLLM directory (`subllm export` / `subllm
convert`: config.json + safetensors) or a `subllm train` run (its newest checkpoint) or
one of its checkpoints. `load_pretrained` gives its model config and weights (what
`subllm train --init-from` starts from); `load_any` the model itself, ready for
`subllm generate` / `subllm eval`; `export_checkpoint` writes a run as an HF directory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from subllm.errors import SubLLMError
from subllm.interop.export import check_out_dir, save_hf_model
from subllm.interop.weights import TensorFiles, first_line, read_json
from subllm.model.config import ModelConfig
from subllm.model.hf_config import SubLLMConfig
from subllm.model.subllm import SubLLM
from subllm.train import checkpoint as ckpt


class _SubLLMWeights(Mapping):
    """The SubLLM weights of a Hugging Face directory (keys without `model.`), each read
    when asked for."""

    def __init__(self, files: TensorFiles, tie: bool) -> None:
        self.files = files
        self.keys_ = [k[len("model."):] for k in files]
        if tie and "embed_tokens.weight" in self.keys_ and "lm_head.weight" not in self.keys_:
            self.keys_.append("lm_head.weight")

    def __getitem__(self, key: str) -> Tensor:
        if key == "lm_head.weight" and "model.lm_head.weight" not in self.files:
            key = "embed_tokens.weight"  # tied
        return self.files["model." + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def load_pretrained(path: str | Path) -> tuple[ModelConfig, Mapping[str, Tensor], Path | None]:
    """(model config, weights, tokenizer.json or None) of a Hugging Face SubLLM directory
    (`subllm export` / `subllm convert`) or a `subllm train` run or checkpoint. The weights
    are read one tensor at a time, when asked for."""
    path = Path(path)
    if not path.exists():
        raise SubLLMError(f"{path} does not exist; pass a Hugging Face SubLLM directory "
                          "(subllm export / subllm convert) or a `subllm train` run")
    if not (path / "config.json").is_file():
        c = ckpt.resolve_checkpoint(path)
        tokenizer = c / "tokenizer.json"
        return (ModelConfig.from_dict(ckpt.load_model_config(c)), ckpt.Weights(c),
                tokenizer if tokenizer.is_file() else None)
    raw = read_json(path / "config.json", "no config")
    kind = raw.get("model_type")
    if kind != "subllm":
        hint = (f"; convert it first: subllm convert --from-hf {path} --out NEW_DIR"
                if kind == "llama" else "")
        raise SubLLMError(f"{path} holds a {kind!r} model, not a SubLLM (model_type "
                          f"'subllm'){hint}")
    try:
        config = SubLLMConfig.from_pretrained(str(path)).to_model_config()
    except (OSError, ValueError, TypeError) as e:
        raise SubLLMError(f"cannot read {path / 'config.json'}: {first_line(e)}") from None
    files = TensorFiles(path)
    for key in files:
        if not key.startswith("model."):  # SubLLMForCausalLM holds the SubLLM as `model`
            raise SubLLMError(f"{path}: unexpected weight {key!r}; not a SubLLM checkpoint")
    tokenizer = path / "tokenizer.json"
    return (config, _SubLLMWeights(files, config.tie_embeddings),
            tokenizer if tokenizer.is_file() else None)


def load_any(checkpoint: str | Path, device: torch.device
             ) -> tuple[torch.nn.Module, Path, dict[str, Any], int | None]:
    """(model in eval mode, its tokenizer.json, its run settings, its step) of a `subllm
    train` run or checkpoint, or of a Hugging Face SubLLM directory (`subllm export` /
    `subllm convert`; no run settings, step None)."""
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        path = ckpt.resolve_checkpoint(path)
        return (ckpt.load_model(path, device), path / "tokenizer.json",
                ckpt.load_train_config(path), ckpt.step_of(path))
    config, state, tokenizer = load_pretrained(path)
    if tokenizer is None:
        raise SubLLMError(f"{path} has no tokenizer.json; export or convert it with its "
                          "tokenizer (subllm convert --tokenizer FILE)")
    model = SubLLM(config)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, {}, None


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str | None = None,
                      force: bool = False) -> Path:
    """Export a `subllm train` run (its newest checkpoint) or one checkpoint directory."""
    path = ckpt.resolve_checkpoint(checkpoint)
    check_out_dir(out, force)
    model = ckpt.load_model(path)
    tokenizer = path / "tokenizer.json"
    info = {"exported from": str(path), "training step": ckpt.step_of(path)}
    return save_hf_model(model, out, tokenizer if tokenizer.is_file() else None,
                         dtype=dtype, force=force, info=info,
                         token_ids=ckpt.load_train_config(path).get("token_ids"))
