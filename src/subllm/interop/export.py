"""Writing Hugging Face model directories: `subllm export` and `subllm convert` output.

The directory holds config.json (with `auto_map`), model.safetensors, generation_config.json,
the tokenizer (tokenizer.json + tokenizer_config.json, for `AutoTokenizer`), a model card,
and the modeling code: the files of `subllm.model`, copied verbatim (they import only one
another, relatively; `auto_map` names `hf_config.SubLLMConfig` and
`hf.SubLLMForCausalLM`). So it loads with `AutoModelForCausalLM.from_pretrained(dir)`
after `import subllm`, and with `trust_remote_code=True` where subllm is not installed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import subllm.model
from subllm.atomic import check_out_dir, staged_dir, write_marker
from subllm.errors import SubLLMError
from subllm.interop.tokenizer import EOT_CANDIDATES, TOKEN_ID_KEYS, eot_id_of, load_tokenizer
from subllm.model.hf import SubLLMForCausalLM
from subllm.model.hf_config import SubLLMConfig
from subllm.model.subllm import SubLLM

# The model package, copied verbatim: its files import only one another (relatively).
MODEL_DIR = Path(subllm.model.__file__).resolve().parent
AUTO_MAP = {
    "AutoConfig": "hf_config.SubLLMConfig",
    "AutoModelForCausalLM": "hf.SubLLMForCausalLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What `subllm generate` samples with; written as the exported model's generation defaults.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50}


@contextlib.contextmanager
def _quiet_progress():
    """transformers' "Writing model shards" bar, off while we save (our CLI says what it
    wrote in one line)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def model_code_files() -> list[Path]:
    """The model package's modules (`__init__.py` aside: transformers loads the files
    named in `auto_map` and follows their relative imports)."""
    return sorted(p for p in MODEL_DIR.glob("*.py") if p.name != "__init__.py")


def write_code(directory: Path) -> None:
    for src in model_code_files():
        shutil.copyfile(src, directory / src.name)


def _model_card(model_config: Any, info: dict[str, Any]) -> str:
    kind = "SUBLLM" if model_config.is_subllm else "LLaMA"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [subllm, text-generation]",
        "---",
        "",
        f"# {kind} model exported by subllm",
        "",
        f"- structure: `{model_config.structure}`, keep {model_config.keep}",
        f"- {model_config.n_layers} blocks, dim {model_config.dim}, {model_config.n_heads} heads "
        f"({model_config.n_kv_heads} KV), ffn {model_config.ffn_dim}, vocab "
        f"{model_config.vocab_size}, context {model_config.max_seq_len}",
    ]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# with `pip install subllm`: `import subllm` first and drop trust_remote_code",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _write_tokenizer(tokenizer_file: Path, directory: Path, model_config: Any) -> int:
    """Save the `tokenizers` file as an AutoTokenizer directory; returns the eot id."""
    raw = load_tokenizer(tokenizer_file)
    eot_id = eot_id_of(raw, tokenizer_file)
    if raw.get_vocab_size() > model_config.vocab_size:
        raise SubLLMError(
            f"the tokenizer {tokenizer_file} has {raw.get_vocab_size()} tokens but the model's "
            f"vocab_size is {model_config.vocab_size}; export the tokenizer the model was "
            "trained with"
        )
    eot = next(t for t in EOT_CANDIDATES if raw.token_to_id(t) == eot_id)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token=eot, eos_token=eot, pad_token=eot,
        model_max_length=model_config.max_seq_len, padding_side="left",
    )
    tok.save_pretrained(str(directory))
    return eot_id


def save_hf_model(
    model: torch.nn.Module,
    out: str | Path,
    tokenizer_file: str | Path | None = None,
    *,
    dtype: str | None = None,
    force: bool = False,
    info: dict[str, Any] | None = None,
    verb: str = "export",
    token_ids: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` (a `subllm.SubLLM`) as a self-contained Hugging Face model directory.

    Written into a temporary sibling directory and renamed into place, so `out` is either
    complete or untouched. `dtype` ("fp32", "bf16", "fp16") converts the saved weights.
    The directory holds our marker (`subllm.atomic.MARKER`, naming `verb`): a later
    `--force` replaces only a directory that holds it. `token_ids`: {"config": ...,
    "generation": ...} bos/eos/pad ids for config.json and generation_config.json (a run
    started from a Hugging Face model keeps that model's: `model_token_ids`); by default
    the tokenizer's end-of-text token is all three.
    """
    out = check_out_dir(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise SubLLMError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with staged_dir(out, force) as tmp:
        config = model.config
        eot_id = None
        if tokenizer_file is not None:
            eot_id = _write_tokenizer(Path(tokenizer_file), tmp, config)
        given = token_ids or {}
        ids = {"config": {k: given.get("config", {}).get(k, eot_id) for k in TOKEN_ID_KEYS}}
        ids["generation"] = {**ids["config"], **given.get("generation", {})}
        hf_config = SubLLMConfig.from_model_config(config, **ids["config"])
        hf_config.auto_map = dict(AUTO_MAP)
        hf_config.architectures = ["SubLLMForCausalLM"]
        with torch.device("meta"):
            hf = SubLLMForCausalLM(hf_config)
        hf.model.load_state_dict(model.state_dict(), assign=True)
        if config.tie_embeddings:
            hf.model.lm_head.weight = hf.model.embed_tokens.weight
        hf.model.to("cpu")
        if dtype is not None:
            hf.to(DTYPES[dtype])
        with _quiet_progress():
            hf.save_pretrained(str(tmp))
        GenerationConfig(**ids["generation"], **GENERATION_DEFAULTS).save_pretrained(str(tmp))
        write_code(tmp)
        (tmp / "README.md").write_text(_model_card(config, info or {}))
        write_marker(tmp, verb)
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


# What `AutoTokenizer.from_pretrained` reads from a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]


def _check_tokenizer_vocab(directory: Path, vocab_size: int) -> None:
    if not (directory / "tokenizer.json").is_file():
        return  # a sentencepiece-only tokenizer: nothing cheap to count
    n = load_tokenizer(directory / "tokenizer.json").get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise SubLLMError(f"the tokenizer in {directory} has {n} tokens but the model's "
                          f"vocab_size is {vocab_size}; pass the model's own tokenizer")


def write_converted(model: SubLLM, out: str | Path, *, tokenizer: str | Path | None = None,
                    token_ids: Mapping[str, Any] | None = None,
                    generation_config: Path | None = None, dtype: str | None = None,
                    force: bool = False, info: dict[str, Any] | None = None) -> Path:
    """Write `model` as a Hugging Face SubLLM directory (`subllm.hf.export.save_hf_model`).

    tokenizer: a `tokenizers` tokenizer.json file, or a directory whose tokenizer files
    (TOKENIZER_FILES) are copied. token_ids: bos/eos/pad ids for config.json and the
    generation config (unless the tokenizer file sets them); generation_config: a
    generation_config.json to use instead of ours. `out` is written whole or not at all.
    """
    out = check_out_dir(out, force)
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not tok.exists():
        raise SubLLMError(f"--tokenizer {tok} does not exist")
    copy_from = tok if tok is not None and tok.is_dir() else None
    if copy_from is not None:
        if not tokenizer_files(copy_from):
            raise SubLLMError(f"--tokenizer {copy_from} holds no tokenizer files (looked for "
                              f"{', '.join(TOKENIZER_FILES)})")
        _check_tokenizer_vocab(copy_from, model.config.vocab_size)
    with staged_dir(out, force) as staging:
        save_hf_model(model, staging, tok if copy_from is None else None, dtype=dtype,
                      force=True, info=info, verb="convert")
        for f in tokenizer_files(copy_from) if copy_from is not None else []:
            shutil.copyfile(f, staging / f.name)
        if generation_config is not None:
            shutil.copyfile(generation_config, staging / "generation_config.json")
        ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
        if ids and (copy_from is not None or tok is None):  # a tokenizer file sets its own
            targets = ["config.json"] + (["generation_config.json"]
                                         if generation_config is None else [])
            for name in targets:
                d = json.loads((staging / name).read_text())
                d.update(ids)
                (staging / name).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return out
