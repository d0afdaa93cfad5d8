"""Training: settings, data, the loop, checkpoints, evaluation and the runtime.

    config.py      TrainConfig (the one declaration of training settings), the model
                   config they make; no torch, so the CLI checks settings fast
    data.py        corpus preparation (`subllm prepare`) and the token batches
    sources.py     prepare's inputs: the file formats, the skipped files, mixing by weight
    encode.py      prepare's pass 3: parallel tokenization in worker processes, token files
    loop.py        the recipe: setup -> state, train_step, evaluate, fit
    parallel.py    DDP, FSDP2 / HSDP and their device meshes; the ranks' agreement
    checkpoint.py  atomic, exactly resumable checkpoints: saving (gathered, or sharded and
                   in the background) and loading
    evaluate.py    validation loss and kept fractions; text samples
    load.py        one loader for any model directory (HF SubLLM directory or run)
    runtime.py     devices, distributed processes, autocast, signals, metrics logging

The names below resolve on first use (PEP 562), so `import subllm.train.config` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "TrainConfig": "config", "parse_keep": "config",
    "train": "loop", "setup": "loop", "fit": "loop", "train_step": "loop",
    "TrainState": "loop", "StepResult": "loop", "lr_at": "loop", "make_optimizer": "loop",
    "evaluate": "evaluate", "sample_text": "evaluate",
    "Dist": "runtime", "pick_device": "runtime", "autocast_dtype": "runtime",
    "read_metrics": "runtime",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .config import TrainConfig, parse_keep
    from .evaluate import evaluate, sample_text
    from .loop import (
        StepResult,
        TrainState,
        fit,
        lr_at,
        make_optimizer,
        setup,
        train,
        train_step,
    )
    from .runtime import Dist, autocast_dtype, pick_device, read_metrics
