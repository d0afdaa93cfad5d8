"""`subllm export`: a training checkpoint -> a standard Hugging Face model directory.

The directory holds config.json (with `auto_map`), model.safetensors, generation_config.json,
the tokenizer (tokenizer.json + tokenizer_config.json, for `AutoTokenizer`), a model card,
and the modeling code: `configuration_subllm.py`, `modeling_subllm.py` and the core modules
they use, copied from this package with `from subllm.x import` rewritten to relative
imports. So it loads with `AutoModelForCausalLM.from_pretrained(dir)` after `import subllm`,
and with `trust_remote_code=True` where subllm is not installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from subllm.errors import SubLLMError

PACKAGE_DIR = Path(__file__).resolve().parent.parent

# file name in the exported directory -> source file, relative to the subllm package
CODE_FILES = {
    "configuration_subllm.py": "hf/configuration_subllm.py",
    "modeling_subllm.py": "hf/modeling_subllm.py",
    "subllm_errors.py": "errors.py",
    "subllm_config.py": "config.py",
    "subllm_modules.py": "modules.py",
    "subllm_model.py": "model.py",
    "subllm_generation.py": "generation.py",
    "subllm_mst.py": "mst.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_subllm.SubLLMConfig",
    "AutoModelForCausalLM": "modeling_subllm.SubLLMForCausalLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What `subllm generate` samples with; written as the exported model's generation defaults.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50}

_HF_IMPORT = re.compile(r"\bfrom subllm\.hf\.(\w+) import\b")
_CORE_IMPORT = re.compile(r"\bfrom subllm\.(\w+) import\b")
_LEFTOVER = re.compile(r"^\s*(import subllm\b|from subllm\b)", re.MULTILINE)


def standalone_source(text: str, name: str = "<source>") -> str:
    """A module's source with its subllm imports made relative to the exported directory."""
    text = _HF_IMPORT.sub(r"from .\1 import", text)
    text = _CORE_IMPORT.sub(r"from .subllm_\1 import", text)
    if _LEFTOVER.search(text):  # a form the rewrite does not handle: fail at export time
        raise RuntimeError(f"{name}: an absolute subllm import is left after the rewrite")
    for target in re.findall(r"from \.(\w+) import", text):
        if f"{target}.py" not in CODE_FILES:
            raise RuntimeError(f"{name} imports .{target}, which export does not copy")
    return text


def write_code(directory: Path) -> None:
    for dest, src in CODE_FILES.items():
        text = (PACKAGE_DIR / src).read_text()
        (directory / dest).write_text(standalone_source(text, src))


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
    from transformers import PreTrainedTokenizerFast

    from subllm.data import EOT_CANDIDATES, eot_id_of, load_tokenizer

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


def replace_dir(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if out.exists():
        if not force:  # checked before the work too; re-checked here against a race
            raise SubLLMError(f"{out} exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SubLLMError(f"--out {out} is a file; pass a directory path")
    if out.exists() and any(out.iterdir()) and not force:
        raise SubLLMError(f"--out {out} exists and is not empty; pass --force to replace it")
    return out


def save_hf_model(
    model: torch.nn.Module,
    out: str | Path,
    tokenizer_file: str | Path | None = None,
    *,
    dtype: str | None = None,
    force: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (a `subllm.SubLLM`) as a self-contained Hugging Face model directory.

    Written into a temporary sibling directory and renamed into place, so `out` is either
    complete or untouched. `dtype` ("fp32", "bf16", "fp16") converts the saved weights.
    """
    from transformers import GenerationConfig

    from subllm.hf.configuration_subllm import SubLLMConfig
    from subllm.hf.modeling_subllm import SubLLMForCausalLM

    out = check_out_dir(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise SubLLMError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = model.config
        eot_id = None
        if tokenizer_file is not None:
            eot_id = _write_tokenizer(Path(tokenizer_file), tmp, config)
        hf_config = SubLLMConfig.from_model_config(
            config, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
        )
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
        hf.save_pretrained(str(tmp))
        gen = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
        GenerationConfig(**gen, **GENERATION_DEFAULTS).save_pretrained(str(tmp))
        write_code(tmp)
        (tmp / "README.md").write_text(_model_card(config, info or {}))
        tmp.chmod(0o755)  # mkdtemp made it private; the result is an ordinary directory
        for f in tmp.iterdir():
            f.chmod(0o644)
        replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str | None = None,
                      force: bool = False) -> Path:
    """Export a `subllm train` run (its newest checkpoint) or one checkpoint directory."""
    from subllm.checkpoint import load_model, resolve_checkpoint, step_of

    ckpt = resolve_checkpoint(checkpoint)
    check_out_dir(out, force)
    model = load_model(ckpt)
    tokenizer = ckpt / "tokenizer.json"
    info = {"exported from": str(ckpt), "training step": step_of(ckpt)}
    return save_hf_model(model, out, tokenizer if tokenizer.is_file() else None,
                         dtype=dtype, force=force, info=info)


def run_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {args.checkpoint} -> {out} ({', '.join(files)})")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
          " (or `import subllm` first)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model directory",
        description="Write a `subllm train` checkpoint as a Hugging Face model directory "
        "(safetensors, config with auto_map, tokenizer, generation config and modeling code) "
        "that loads with AutoModelForCausalLM, with or without subllm installed.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="a `subllm train` --out directory (its newest checkpoint) or a "
                   "checkpoints/step-* directory")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="directory to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="convert the weights (default: as "
                   "trained, fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_export)

