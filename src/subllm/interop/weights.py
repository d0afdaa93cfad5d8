"""Reading weights and configs from files: Hugging Face model directories (safetensors,
sharded or not, or pytorch_model.bin) and single state-dict files, one tensor at a time,
with one-line errors for what is missing, unexpected or misshapen."""

from __future__ import annotations

import difflib
import json
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from subllm.errors import SubLLMError


def first_line(e: BaseException) -> str:
    """The first line of an error's message; for huggingface_hub's strict-dataclass errors
    ("Validation error for field 'head_dim':"), that of their cause, which says what."""
    if e.__cause__ is not None and type(e).__name__.startswith("StrictDataclass"):
        return first_line(e.__cause__)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def unreadable(e: BaseException) -> str:
    """Why a weights file could not be read, without torch's advice to retry with
    `weights_only=False` (which would run whatever code the file holds: we never do)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        return (f"it pickles a {found.group(1)} object, not only tensors" if found
                else "it is not a torch.save file of tensors")
    return first_line(e)


def read_json(path: Path, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise SubLLMError(f"{missing}: {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubLLMError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(d, dict):
        raise SubLLMError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _natural(key: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


class TensorFiles(Mapping):
    """The tensors of a Hugging Face model directory by name, each read when asked for.

    Reads model.safetensors, sharded safetensors (model.safetensors.index.json) or
    pytorch_model.bin (sharded or not; memory-mapped, `weights_only=True`).
    """

    NAMES = ("model.safetensors.index.json", "model.safetensors",
             "pytorch_model.bin.index.json", "pytorch_model.bin")

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        found = next((d / n for n in self.NAMES if (d / n).is_file()), None)
        if found is None:
            raise SubLLMError(f"{d} holds no weights; looked for {', '.join(self.NAMES)}")
        if found.name.endswith(".index.json"):
            weight_map = read_json(found, "no index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise SubLLMError(f"{found} has no weight_map; the checkpoint is damaged")
            files = sorted(set(weight_map.values()))
        else:
            files = [found.name]
        self._where: dict[str, Any] = {}
        for name in files:
            path = d / name
            try:
                if name.endswith(".safetensors"):
                    handle = safe_open(str(path), framework="pt")
                    self._where.update(dict.fromkeys(handle.keys(), handle))
                else:
                    state = _torch_load(path)
                    self._where.update(dict.fromkeys(state, state))
            except SubLLMError:
                raise
            except Exception as e:  # safetensors and torch raise many types
                raise SubLLMError(f"cannot read weights {path}: {unreadable(e)}") from None

    def __getitem__(self, key: str) -> Tensor:
        handle = self._where[key]
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _torch_load(path: Path) -> dict[str, Tensor]:
    with warnings.catch_warnings():  # "Detected pickle protocol 4": the error says more
        warnings.simplefilter("ignore", UserWarning)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                              for k, v in state.items()):
        inner = [k for k, v in state.items() if isinstance(v, dict)] if isinstance(
            state, dict) else []
        hint = (f"; it wraps one under {inner[0]!r}: save that entry alone "
                f"(torch.save(ckpt[{inner[0]!r}], 'weights.pt'))") if inner else ""
        raise SubLLMError(f"{path} is not a state_dict (a mapping of names to tensors){hint}")
    return state


def read_state_dict(path: str | Path) -> Mapping[str, Tensor]:
    """A raw state_dict file: safetensors (by suffix), else `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise SubLLMError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return _torch_load(path)
    except SubLLMError:
        raise
    except Exception as e:  # unpickling and safetensors errors come in many types
        raise SubLLMError(
            f"cannot read checkpoint {path} ({unreadable(e)}); pass a raw state_dict saved "
            "with torch.save or a .safetensors file"
        ) from None


def check_keys(present: Iterable[str], expected: Iterable[str], source: str,
                optional: Iterable[str] = (), ignored: Callable[[str], bool] = lambda k: False
                ) -> None:
    """A missing or unexpected weight is an error naming it (the first, in layer order)."""
    present, expected = set(present), set(expected)
    unexpected = sorted((k for k in present - expected - set(optional) if not ignored(k)),
                        key=_natural)
    missing = sorted(expected - present, key=_natural)
    if unexpected:
        key = unexpected[0]
        near = difflib.get_close_matches(key, missing, n=1, cutoff=0.8)
        hint = f" (is it {near[0]!r}, which is missing?)" if near else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise SubLLMError(f"{source}: unexpected key {key!r}{hint}{more}; the checkpoint does "
                          "not match the expected layout or config")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SubLLMError(f"{source}: missing key {missing[0]!r}{more}; the checkpoint does "
                          "not match the expected layout or config")


def check_shape(key: str, t: Tensor, shape: tuple[int, ...], source: str) -> None:
    """A weight of the shape the config implies, and of floating point (an integer tensor
    is a quantized or damaged checkpoint, whose values would be taken as they are)."""
    if not t.is_floating_point():
        raise SubLLMError(f"{source}: {key!r} holds {str(t.dtype).removeprefix('torch.')} "
                          "values, not floating point; a quantized checkpoint cannot be "
                          "converted: pass the unquantized (fp32, bf16 or fp16) weights")
    if tuple(t.shape) != tuple(shape):
        raise SubLLMError(f"{source}: {key!r} has shape {list(t.shape)} but the config implies "
                          f"{list(shape)}")
