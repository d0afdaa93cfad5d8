"""Training checkpoints: written whole or not at all, resumable exactly.

A run directory holds `checkpoints/step-XXXXXXXX/`, each with either
    model.safetensors    the weights (full, unsharded; tied weights stored once), and
    state.pt             optimizer (keyed by parameter name), data position, step and every
                         rank's RNG states: plain tensors and containers, loaded with
                         `torch.load(weights_only=True)`
(one process, DDP), or (FSDP2 / HSDP under torchrun: nothing is gathered)
    sharded/             weights and optimizer state as `torch.distributed.checkpoint`
                         (DCP) wrote them: each rank's shards (`__R_0.distcp`) and
                         `.metadata`; keys `model.<param>` and `optim.state.<param>...`;
                         any number of processes reads it back (resharding), and
                         `load_weights` consolidates it in one process without torchrun
    state.pt             the same minus the optimizer (format 2)
and in both
    model_config.json    the ModelConfig
    train_config.yaml    the resolved training settings
    tokenizer.json       a copy of the data's tokenizer, so a checkpoint is self-contained
    manifest.json        the size and sha256 of every other file (shards included), written
                         last: what `damage` checks the files against
A checkpoint is written into `checkpoints/.tmp-...` and renamed into place once complete,
so a kill at any moment leaves only complete `step-*` directories (plus a stale tmp
directory, removed by the next run). A checkpoint damaged afterwards (a missing or garbage
file, a truncated copy, bytes changed anywhere) is found by `damage`, before resuming,
evaluating, exporting or generating from it, and before older checkpoints are pruned for
it; `--resume --skip-damaged` sets it aside as `checkpoints/damaged-step-XXXXXXXX` (never
deleted) and resumes from the newest intact one. Checkpoints saved before manifest.json
existed are checked as before: every file present, headers whole and covering their files.

`save` is what the training loop calls (every rank) to checkpoint a run: the full state
dict gathered to rank 0 (one process, DDP), or every rank's shards written by DCP,
optionally in the background (--async-checkpoint); `run_config` is the settings it and
the run's config.yaml record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from subllm.errors import SubLLMError, os_error_in, os_error_line
from subllm.interop.tokenizer import model_token_ids
from subllm.model.config import (
    RETIRED,
    SAVED_WITHOUT_RANK_BAND,
    SAVED_WITHOUT_THRESHOLD,
    ModelConfig,
)
from subllm.model.subllm import SubLLM
from subllm.train.parallel import gate, say, sharded

if TYPE_CHECKING:  # the loop imports this module: its names here are for annotations only
    from subllm.train.config import TrainConfig
    from subllm.train.data import TokenData
    from subllm.train.loop import TrainState
    from subllm.train.runtime import Dist

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")
_FILES = ("model.safetensors", "state.pt", "model_config.json", "train_config.yaml")
SHARDED = "sharded"  # the DCP directory of a sharded checkpoint
_METADATA = ".metadata"  # what DCP's coordinator writes last, once every shard is written
MANIFEST = "manifest.json"  # {"files": {relative path: {"bytes", "sha256"}}}, written last


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether a checkpoint holds its weights as DCP shards (`sharded/`)."""
    return (Path(checkpoint) / SHARDED).is_dir()


def _weights_file(path: Path) -> Path:
    return path / SHARDED / _METADATA if is_sharded(path) else path / "model.safetensors"


def _complete(path: Path) -> bool:
    return (bool(_NAME.match(path.name)) and _weights_file(path).is_file()
            and all((path / f).is_file() for f in _FILES[1:]))


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
             and any((p / f).exists() for f in (*_FILES, SHARDED))]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def damage(checkpoint: str | Path, state: bool = True, checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint, or None when it is intact.

    Every file present and, where the checkpoint has a manifest.json, the size and sha256 it
    records for each (reading every byte once: about a second per GB); then, without reading
    a tensor, the safetensors header whole and covering the file (a truncated copy fails
    here), state.pt a whole zip archive (what `torch.save` writes), the configs readable.
    `state=False` skips state.pt (loading weights does not need it); `checksums=False` the
    sha256s (a checkpoint another process has just verified)."""
    path = Path(checkpoint)
    needed = _FILES if state else tuple(f for f in _FILES if f != "state.pt")
    if is_sharded(path):
        needed = needed[1:]
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    why = _checksum_damage(path, state) if checksums else None
    if why is not None:
        return why
    if is_sharded(path):
        why = _shards_damage(path / SHARDED)
        if why is not None:
            return why
    else:
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


def _shards_damage(shards: Path) -> str | None:
    """What is wrong with a DCP directory, without reading a tensor: its `.metadata` must
    unpickle, and every shard file it names must exist and reach the end of the last byte
    range it names (a truncated copy fails here)."""
    try:
        meta = _reader(shards).read_metadata()
        ends: dict[str, int] = {}
        for info in (meta.storage_data or {}).values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0),
                                           info.offset + info.length)
    except Exception as e:  # unpickling errors come in many types
        return f"{SHARDED}/{_METADATA} unreadable: {_first_line(e)[:200]}"
    for name, end in sorted(ends.items()):
        f = shards / name
        if not f.is_file():
            return f"{SHARDED}/{name} missing"
        if f.stat().st_size < end:
            return f"{SHARDED}/{name} is truncated ({f.stat().st_size} of {end} bytes)"
    return None


def _checksum_damage(path: Path, state: bool) -> str | None:
    """What differs from the checkpoint's manifest.json (None: nothing, or no manifest: a
    checkpoint saved before there was one)."""
    if not (path / MANIFEST).exists():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        expected = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"{MANIFEST} unreadable: {_first_line(e)[:200]}"
    for name, (size, sha) in sorted(expected.items()):
        f = path / name
        if name == "state.pt" and not state:
            continue
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size < size:  # as `_shards_damage` says it
            return f"{name} is truncated ({f.stat().st_size} of {size} bytes)"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when it was saved"
        try:
            if _sha256(f) != sha:
                return f"{name} does not match its checksum: its bytes changed after it was saved"
        except OSError as e:
            return f"{name} unreadable: {e.strerror or e}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def checksums(root: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """{path relative to `root`: {"bytes": size, "sha256": hex digest}} of `files` (under
    `root`), read back from disk: what manifest.json records."""
    return {f.relative_to(root).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in files}


def shard_files(staged: Path, rank: int) -> list[Path]:
    """The files rank `rank` wrote into a sharded checkpoint's staging directory (DCP names
    them `__<rank>_<n>.distcp`): each rank checksums its own, in parallel."""
    return sorted((staged / SHARDED).glob(f"__{rank}_*.distcp"))


def _write_manifest(tmp: Path, known: Mapping[str, dict[str, Any]] | None) -> None:
    """manifest.json of a staged checkpoint: `known` checksums (shards each rank summed) and
    those of every other file, read back now."""
    known = dict(known or {})
    files = [f for f in sorted(tmp.rglob("*")) if f.is_file() and f.name != MANIFEST]
    sums = checksums(tmp, [f for f in files if f.relative_to(tmp).as_posix() not in known])
    sums.update({k: v for k, v in known.items() if (tmp / k).is_file()})
    (tmp / MANIFEST).write_text(json.dumps({"format": 1, "files": dict(sorted(sums.items()))},
                                           indent=1) + "\n")


def _reader(shards: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(shards))


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


def resolve_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint).
    `checksums=False`: without reading every byte (for a caller that reads only the configs)."""
    path = Path(path)
    if not path.exists():
        raise SubLLMError(
            f"checkpoint {path} does not exist; pass the --out directory of a `subllm train` "
            "run or one of its checkpoints/step-* directories"
        )
    if _NAME.match(path.name) and path.is_dir():
        why = damage(path, state=False, checksums=checksums)
        if why is not None:
            raise SubLLMError(f"checkpoint {path} is damaged ({why}); pass another one")
        return path
    found = list(reversed(step_dirs(path)))
    if not found:
        raise SubLLMError(
            f"{path} holds no complete checkpoint; pass the --out directory of a `subllm train` "
            "run that has saved at least once"
        )
    why = damage(found[0], state=False, checksums=checksums)
    if why is not None:  # say so rather than quietly answer for an older step
        older = next((p for p in found[1:]
                      if damage(p, state=False, checksums=checksums) is None), None)
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
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    except SafetensorError as e:  # a full disk is an OSError, not a safetensors problem
        raise _os_error(e, path) from None


def _write_state(path: Path, train_state: dict[str, Any]) -> None:
    # through a Python file: a failed write raises an OSError (errno, say ENOSPC), which
    # torch's writer wraps in a RuntimeError that names no cause (or closing the file raises)
    try:
        with open(path, "wb") as f:
            torch.save(train_state, f)
    except (OSError, RuntimeError) as e:
        raise _os_error(e, path) from None


def _os_error(e: Exception, path: Path) -> Exception:
    """The OSError behind a writer's error `e`, naming `path`; `e` itself when there is none."""
    found = os_error_in(e)
    if found is None:
        return e
    return OSError(found.errno, found.strerror, found.filename or str(path))


def staging_dir(run_dir: str | Path, step: int, tag: int | None = None) -> Path:
    """Where the checkpoint of `step` is written before it is renamed into place; `tag`
    (default: this pid) keeps two writers apart."""
    return (Path(run_dir) / CHECKPOINTS
            / f".tmp-{checkpoint_name(step)}-{os.getpid() if tag is None else tag}")


def is_saved(run_dir: str | Path, step: int) -> bool:
    """Whether the run already holds a complete checkpoint of `step`."""
    return _complete(Path(run_dir) / CHECKPOINTS / checkpoint_name(step))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    train_state: dict[str, Any],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    keep: int | None = None,
    staged: Path | None = None,
    sums: Mapping[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep`; returns its path.

    `model_state` None: the weights are already in `staged` (a `staging_dir` holding the
    DCP shards every rank wrote, `sharded/`, and `sums`, their `checksums`); the rest is
    added there and it is renamed. manifest.json is written last. Older checkpoints are
    pruned only once this one verifies against it (`damage`): a damaged new checkpoint
    raises, and every older one stays."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    if _complete(final):  # already saved at this step (e.g. a signal right after a save)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = staged if staged is not None else staging_dir(run_dir, step)
    if staged is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        if model_state is not None:
            _write_weights(tmp / "model.safetensors", model_state)
        _write_state(tmp / "state.pt", {**train_state, "step": step})
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(train_config, sort_keys=False))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        _write_manifest(tmp, sums)
        if final.exists():  # an incomplete leftover of the same name: kept, out of the way
            if any(final.iterdir()):
                set_aside(final)
            else:
                final.rmdir()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None and (prune := list_checkpoints(run_dir)[:-keep]):
        why = damage(final)
        if why is not None:
            raise SubLLMError(f"checkpoint {final} does not read back as it was written ({why}); "
                              "no older checkpoint was pruned; check the disk it is on")
        for old in prune:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint by parameter name (sharded ones consolidated here,
    in this process: no torchrun, no GPU)."""
    if is_sharded(checkpoint):
        shards = Path(checkpoint) / SHARDED
        return _load_shards(shards, list(_model_keys(shards)))
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


class Weights(Mapping):
    """A checkpoint's weights by parameter name, each read from disk when asked for: a
    model can be filled one tensor at a time (`subllm.model.subllm.assign_full`), so memory
    holds one full tensor beyond the model (a sharded model: beyond its shard)."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.path = Path(checkpoint)
        self._shards = self.path / SHARDED if is_sharded(self.path) else None
        if self._shards is not None:
            self._keys = _model_keys(self._shards)
            return
        file = self.path / "model.safetensors"
        try:
            self._file = safe_open(str(file), framework="pt")
            aliases = json.loads((self._file.metadata() or {}).get("aliases", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise SubLLMError(f"cannot read weights {file} ({_first_line(e)}); the checkpoint "
                              "is damaged") from None
        self._keys = {k: k for k in self._file.keys()} | aliases

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._shards is not None:
            return _load_shards(self._shards, [name])[name]
        return self._file.get_tensor(self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _model_keys(shards: Path) -> dict[str, Any]:
    """{parameter name: its DCP tensor metadata} of the model in a DCP directory."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = _reader(shards).read_metadata().state_dict_metadata
    except Exception as e:  # unpickling errors come in many types
        raise SubLLMError(f"cannot read {shards / _METADATA} ({_first_line(e)[:200]}); the "
                          "checkpoint is damaged") from None
    return {k[len("model."):]: m for k, m in meta.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}


def _load_shards(shards: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Full tensors of model parameters from a DCP directory, in this process (no_dist)."""
    meta = _model_keys(shards)
    out = {n: torch.empty(meta[n].size, dtype=meta[n].properties.dtype) for n in names}
    read_shards({"model": out}, shards)
    return out


def read_shards(state_dict: dict[str, Any], shards: Path, no_dist: bool = True,
                then: str = "pass another one") -> None:
    """Fill `state_dict` in place from the DCP directory `shards` (a collective unless
    `no_dist`). A shard that does not read (damaged where no checksum could tell: a
    checkpoint saved before manifest.json) is one SubLLMError naming it; `then`: what to do."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state_dict, storage_reader=_reader(shards), no_dist=no_dist)
    except (dcp.CheckpointException, Exception) as e:  # a BaseException, wrapping the error
        inner = [err for err, _ in getattr(e, "failures", {}).values()]
        why = _first_line(inner[0] if inner else e)[:200]
        raise SubLLMError(f"cannot read {shards} ({why}); the checkpoint {shards.parent.name} "
                          f"is damaged: {then}") from None


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
    d.setdefault("rank_band", SAVED_WITHOUT_RANK_BAND)  # saved before the band
    return d


def load_train_config(checkpoint: str | Path) -> dict[str, Any]:
    return yaml.safe_load((Path(checkpoint) / "train_config.yaml").read_text()) or {}


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A SubLLM with the checkpoint's weights, in eval mode."""
    config = ModelConfig.from_dict(load_model_config(checkpoint))
    model = SubLLM(config)
    model.load_state_dict(load_weights(checkpoint))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# The checkpoints of a training run: what `fit` saves (subllm.train.loop)


def run_config(cfg: TrainConfig, data: TokenData) -> dict[str, Any]:
    """The settings saved with a run; `--resume` starts from them (flags of this call win)."""
    d = dataclasses.asdict(cfg)
    for per_call in ("resume", "stop_at", "init_from", "skip_damaged"):
        d.pop(per_call, None)
    if isinstance(d["model"], dict):  # an older run's retired settings are not carried on
        d["model"] = {k: v for k, v in d["model"].items() if k not in RETIRED}
    # stored resolved, so eval and --resume work from any working directory
    d["data"] = str(Path(cfg.data).resolve())
    d["out"] = str(Path(cfg.out).resolve())
    if cfg.init_from is not None:  # its model config is saved as `model`, so --resume works
        d["initialized_from"] = str(Path(cfg.init_from).resolve())
        # a Hugging Face model's bos/eos/pad ids (Llama 3: an eos list), for export and
        # generate: the run's tokenizer.json alone knows only its end-of-text token
        if ids := model_token_ids(cfg.init_from):
            d["token_ids"] = ids
    d["data_tokenizer_sha256"] = data.meta["tokenizer_sha256"]
    return d


def save(state: TrainState, dd: Dist, background: bool = False) -> Path | None:
    """Collective: every rank calls it; rank 0 writes (sharded: every rank writes its
    shards, rank 0 the rest). Returns the path on rank 0: the newest complete checkpoint.

    `background` (sharded runs, --async-checkpoint): the shards are copied to host memory
    and written by a thread while training goes on; the checkpoint becomes visible (state.pt,
    rename) at the next save, which waits for it first. The last save of a run is never in
    the background."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if sharded(state.cfg, dd):
        if state.saving is not None:  # the previous background save, completed first
            pending, state.saving = state.saving, None
            state.last_saved = _complete_sharded(state, dd, pending) or state.last_saved
        pending = _write_shards(state, dd, background)
        if pending is None:  # already saved at this step
            return state.last_saved if dd.main else None
        if pending.future is not None:
            state.saving = pending
            return state.last_saved
        return _complete_sharded(state, dd, pending)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(state.model, options=options)
    optim_state = get_optimizer_state_dict(state.model, state.optimizer, options=options)
    rng = [rng_state()]
    if dd.enabled:
        rng = [None] * dd.world_size
        dist.all_gather_object(rng, rng_state())

    def write() -> Path:
        train_state = {"format": 1, "optimizer": optim_state, "data": state.batches.state_dict(),
                       "rng": rng, "world_size": dd.world_size}
        try:
            return save_checkpoint(
                state.run_dir, state.step, model_state, train_state, state.config.to_dict(),
                run_config(state.cfg, state.data), state.data.tokenizer_path,
                keep=_keep(state, dd))
        except OSError as e:  # nothing half-written is left (save_checkpoint cleans up)
            kept = (f"{state.last_saved.name} is intact (continue with --resume)"
                    if state.last_saved else "no checkpoint of this run was saved yet")
            raise SubLLMError(f"{os_error_line(e)} while writing checkpoint "
                              f"{checkpoint_name(state.step)}; {kept}") from None

    return gate(dd, f"saving the checkpoint of step {state.step}", write if dd.main else None)


def _keep(state: TrainState, dd: Dist) -> int | None:
    """--keep-checkpoints, or None (prune nothing) while the last validation loss is not
    finite or worse than guessing every token uniformly (ln vocab_size), as no trained model
    is: a run that has blown up (a damaged resume, a divergence) never costs its intact
    older checkpoints. Rank 0."""
    keep, last = state.cfg.keep_checkpoints, state.last_eval
    bound = math.log(state.config.vocab_size)
    if (keep is None or last is None or last["loss"] <= bound
            or len(list_checkpoints(state.run_dir)) < keep):  # nothing to prune anyway
        return keep
    say(dd, f"warning: the validation loss at step {last['step']} is {last['loss']:.4g}, worse "
        f"than a uniform guess over the vocabulary ({bound:.4g}); no older checkpoint is "
        "pruned until it recovers")
    return None


@dataclass
class _ShardedSave:
    """A sharded checkpoint whose shards are written (or being written: `future`), not yet
    complete: what rank 0 adds to it, taken when it was started."""

    step: int
    staged: Path
    train_state: dict[str, Any]
    last_saved: Path | None  # the newest complete checkpoint when it was started
    future: Any = None  # dcp.async_save's Future; None: written


def _write_shards(state: TrainState, dd: Dist, background: bool) -> _ShardedSave | None:
    """Every rank writes the shards it holds of the weights and the optimizer state into
    rank 0's staging directory (`torch.distributed.checkpoint`, whose coordinator writes
    `.metadata` once every rank's are written); nothing is gathered. None: the run already
    holds a checkpoint of this step (a signal right after a save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    rng: list[Any] = [None] * dd.world_size
    dist.all_gather_object(rng, rng_state())
    box: list[Any] = [is_saved(state.run_dir, state.step), os.getpid()]
    dist.broadcast_object_list(box, src=0)  # rank 0's decision and staging directory
    if box[0]:
        return None
    pending = _ShardedSave(
        state.step, staging_dir(state.run_dir, state.step, box[1]),
        {"format": 2, "data": state.batches.state_dict(), "rng": rng,
         "world_size": dd.world_size}, state.last_saved)

    def fresh() -> None:
        shutil.rmtree(pending.staged, ignore_errors=True)
        try:
            pending.staged.mkdir(parents=True)
        except OSError as e:
            raise _save_failed(e, pending) from None

    gate(dd, f"creating the checkpoint of step {state.step}", fresh if dd.main else None)
    sd = {"model": get_model_state_dict(state.model),
          "optim": get_optimizer_state_dict(state.model, state.optimizer)}
    where = pending.staged / SHARDED
    try:  # collective: DCP gathers every rank's outcome and raises the same on all of them
        if background:
            # its own gloo group: the writer thread's collectives never interleave with
            # training's on the default group (torchtitan does the same)
            pending.future = dcp.async_save(sd, checkpoint_id=where,
                                            process_group=_async_group(state))
        else:
            dcp.save(sd, checkpoint_id=where)
    except dcp.CheckpointException as e:
        raise _shards_failed(e, pending, dd) from None
    return pending


def _async_group(state: TrainState) -> Any:
    if state.async_group is None:
        state.async_group = dist.new_group(backend="gloo")
    return state.async_group


def _complete_sharded(state: TrainState, dd: Dist, pending: _ShardedSave) -> Path | None:
    """Wait for the shards (a background save); every rank checksums the shard files it
    wrote (all ranks at once, each reading its own); then rank 0 adds state.pt (data
    position, step, every rank's RNG states), the configs and manifest.json and renames the
    staging directory into place: the checkpoint is complete or invisible. The path on
    rank 0."""
    import torch.distributed.checkpoint as dcp

    def written() -> dict[str, Any]:
        if pending.future is not None:
            pending.future.result()
        return checksums(pending.staged, shard_files(pending.staged, dd.rank))

    try:
        mine = gate(dd, f"writing the shards of step {pending.step}", written)
    except dcp.CheckpointException as e:  # raised on every rank alike
        raise _shards_failed(e, pending, dd) from None
    except (OSError, SubLLMError) as e:  # this rank's checksums, or another rank's
        if dd.main:
            shutil.rmtree(pending.staged, ignore_errors=True)
        raise (_save_failed(e, pending) if isinstance(e, OSError) else e) from None
    sums = [mine]
    if dd.enabled:
        sums = [None] * dd.world_size
        dist.all_gather_object(sums, mine)

    def finish() -> Path:
        try:
            return save_checkpoint(
                state.run_dir, pending.step, None, pending.train_state, state.config.to_dict(),
                run_config(state.cfg, state.data), state.data.tokenizer_path,
                keep=_keep(state, dd), staged=pending.staged,
                sums={k: v for rank in sums for k, v in rank.items()})
        except OSError as e:  # save_checkpoint removed the staging directory
            raise _save_failed(e, pending) from None

    return gate(dd, f"saving the checkpoint of step {pending.step}",
                finish if dd.main else None)


def _shards_failed(e: Any, pending: _ShardedSave, dd: Dist) -> SubLLMError:
    if dd.main:
        shutil.rmtree(pending.staged, ignore_errors=True)
    errors = [err for err, _ in e.failures.values()]
    return _save_failed(errors[0] if errors else e, pending)


def _save_failed(e: BaseException, pending: _ShardedSave) -> SubLLMError:
    kept = (f"{pending.last_saved.name} is intact (continue with --resume)"
            if pending.last_saved else "no checkpoint of this run was saved yet")
    cause = os_error_in(e)  # a write torch's C++ writer wrapped in a RuntimeError
    first = os_error_line(cause) if cause is not None else str(e).strip()[:200]
    return SubLLMError(f"{first} while writing checkpoint {checkpoint_name(pending.step)}; "
                       f"{kept}")
