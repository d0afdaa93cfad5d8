"""Training checkpoints: written whole or not at all, resumable exactly.

A run directory holds `checkpoints/step-XXXXXXXX/`, each with
    model.safetensors    the weights (full, unsharded; tied weights stored once)
    state.pt             optimizer (keyed by parameter name), data position, step and every
                         rank's RNG states: plain tensors and containers, loaded with
                         `torch.load(weights_only=True)`
    model_config.json    the ModelConfig
    train_config.yaml    the resolved training settings
    tokenizer.json       a copy of the data's tokenizer, so a checkpoint is self-contained
A checkpoint is written into `checkpoints/.tmp-...` and renamed into place once complete,
so a kill at any moment leaves only complete `step-*` directories (plus a stale tmp
directory, removed by the next run). A checkpoint damaged afterwards (a missing or garbage
file, a truncated copy) is found by `damage`; `--resume --skip-damaged` sets it aside as
`checkpoints/damaged-step-XXXXXXXX` (never deleted) and resumes from the newest intact one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from subllm.errors import SubLLMError
from subllm.model.config import SAVED_WITHOUT_THRESHOLD, ModelConfig
from subllm.model.subllm import SubLLM

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")
_FILES = ("model.safetensors", "state.pt", "model_config.json", "train_config.yaml")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _complete(path: Path) -> bool:
    return bool(_NAME.match(path.name)) and all((path / f).is_file() for f in _FILES)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step-*` directory of a run holding any checkpoint file, complete or not
    (damaged), oldest first; one holding none of them is no checkpoint and is ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)
             and any((p / f).exists() for f in _FILES)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def damage(checkpoint: str | Path, state: bool = True) -> str | None:
    """What is wrong with a checkpoint, or None when it looks intact.

    Cheap (no tensor is read): every file present, the safetensors header whole and covering
    the file (a truncated copy fails here), state.pt a whole zip archive (what `torch.save`
    writes). `state=False` skips state.pt (loading weights does not need it)."""
    path = Path(checkpoint)
    needed = _FILES if state else tuple(f for f in _FILES if f != "state.pt")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        return f"model.safetensors unreadable: {_first_line(e)}"
    if state and not zipfile.is_zipfile(path / "state.pt"):
        return "state.pt is not a saved training state (garbage or truncated)"
    try:
        json.loads((path / "model_config.json").read_text())
        yaml.safe_load((path / "train_config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        return f"a config file is unreadable: {_first_line(e)}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never deleted)."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{n}")
    os.replace(checkpoint, target)
    return target


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise SubLLMError(
            f"checkpoint {path} does not exist; pass the --out directory of a `subllm train` "
            "run or one of its checkpoints/step-* directories"
        )
    if _NAME.match(path.name) and path.is_dir():
        why = damage(path, state=False)
        if why is not None:
            raise SubLLMError(f"checkpoint {path} is damaged ({why}); pass another one")
        return path
    found = list(reversed(step_dirs(path)))
    if not found:
        raise SubLLMError(
            f"{path} holds no complete checkpoint; pass the --out directory of a `subllm train` "
            "run that has saved at least once"
        )
    why = damage(found[0], state=False)
    if why is not None:  # say so rather than quietly answer for an older step
        older = next((p for p in found[1:] if damage(p, state=False) is None), None)
        offer = (f"the newest intact one is {older}: pass it instead" if older is not None
                 else "no older checkpoint of the run is intact")
        raise SubLLMError(f"the newest checkpoint {found[0]} is damaged ({why}); {offer}")
    return found[0]


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name).group(1))


def remove_stale_tmp(run_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a killed run (call before training starts)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# RNG state as plain containers (weights_only-loadable)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------
# Save / load


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared tensors: keep each storage once, remember the aliases."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors, aliases = _dedupe(state)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def _write_state(path: Path, train_state: dict[str, Any]) -> None:
    torch.save(train_state, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep`; returns its path."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    if _complete(final):  # already saved at this step (e.g. a signal right after a save)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(tmp / "model.safetensors", model_state)
        _write_state(tmp / "state.pt", {**train_state, "step": step})
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(train_config, sort_keys=False))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        if final.exists():  # an incomplete leftover of the same name: kept, out of the way
            if any(final.iterdir()):
                set_aside(final)
            else:
                final.rmdir()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint) / "model.safetensors"
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise SubLLMError(f"cannot read weights {path} ({_first_line(e)}); the checkpoint is "
                          "damaged") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        # torch's own text for a refused safe load advises weights_only=False (arbitrary code
        # execution on a file that is damaged anyway): never pass that on
        why = ("not a plain saved training state: garbage, or objects a safe load refuses"
               if "weights only" in str(e).lower() else _first_line(e)[:200])
        raise SubLLMError(f"cannot read {path} ({why}); the checkpoint is damaged") from None


def load_model_config(checkpoint: str | Path) -> dict[str, Any]:
    d = json.loads((Path(checkpoint) / "model_config.json").read_text())
    d.setdefault("threshold", SAVED_WITHOUT_THRESHOLD)  # saved before the rule was a choice
    return d


def load_train_config(checkpoint: str | Path) -> dict[str, Any]:
    return yaml.safe_load((Path(checkpoint) / "train_config.yaml").read_text()) or {}


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A SubLLM with the checkpoint's weights, in eval mode."""
    config = ModelConfig.from_dict(load_model_config(checkpoint))
    model = SubLLM(config)
    model.load_state_dict(load_weights(checkpoint))
    return model.to(device).eval()
