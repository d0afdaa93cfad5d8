"""How the processes of a torchrun run train together: DDP, FSDP2 / HSDP, and the ranks'
agreement.

Launched with torchrun, `subllm train` trains data-parallel: DDP by default (`ddp`), FSDP2
(`fully_shard`: `shard`) with `--distributed fsdp`, HSDP with `--replicate R` (a 2-D device
mesh: `build_mesh`); gloo on CPU, NCCL on GPU. Every rank builds the model on the meta
device, shards it (FSDP2) and then allocates and fills only its own shards: each parameter
drawn from its own seed (the same values for any number of processes) or read from a
checkpoint one tensor at a time (loop._build_model). Rank r reads its own slice of each
global batch (data.TrainBatches); gradient accumulation skips the gradient sync on all but
the last micro-batch (`no_sync`); sharded runs write their checkpoints with
torch.distributed.checkpoint, every rank its own shards (checkpoint.save). A step of setup
or saving that can fail on one rank is a `gate` (every rank learns whether every rank
succeeded); only rank 0 speaks (`say`) and writes logs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from subllm.errors import SubLLMError
from subllm.train.runtime import Dist, all_reduce_sum, collective_device

if TYPE_CHECKING:
    from subllm.model.subllm import SubLLM
    from subllm.train.config import TrainConfig

# ---------------------------------------------------------------------------------------------
# The ranks' agreement


def gate(dd: Dist, what: str, fn: Callable[[], Any] | None) -> Any:
    """Run `fn` on this rank (None: nothing to do here), then, under torchrun, learn whether
    every rank succeeded (a collective). This rank's own error is raised as it is; another
    rank's failure becomes one line naming that rank. Returns what `fn` returned."""
    error: Exception | None = None
    result = None
    try:
        if fn is not None:
            result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        error = e
    failed: list[int] = []
    if dd.enabled:
        flags = [0.0] * dd.world_size
        flags[dd.rank] = float(error is not None)
        summed = all_reduce_sum(flags, dd, collective_device())
        failed = [r for r, f in enumerate(summed) if f]
    if error is not None:
        raise error
    if failed:
        raise SubLLMError(f"rank {failed[0]} of {dd.world_size} failed while {what} (its "
                          f"message is above); rank {dd.rank} stops too")
    return result


def say(dd: Dist, *parts: Any) -> None:
    """One line on stderr, from rank 0 only (above the progress bar)."""
    if dd.main:
        tqdm.write(" ".join(str(p) for p in parts), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# DDP, FSDP2 and HSDP


def sharded(cfg: TrainConfig, dd: Dist) -> bool:
    """FSDP2 (or HSDP) under torchrun: parameters, gradients, optimizer state and
    checkpoints are sharded."""
    return dd.enabled and cfg.distributed == "fsdp"


def shard(model: SubLLM, cfg: TrainConfig, dd: Dist, device: torch.device,
          amp: torch.dtype | None) -> None:
    """FSDP2 shards every block, then the rest (embedding, norm, head, routers), in place.

    Mixed precision (--dtype bf16): FSDP2 all-gathers the parameters in bf16 for forward
    and backward and reduce-scatters the gradients in fp32 into fp32 sharded parameters,
    which the optimizer (its state sharded the same way) updates; autocast stays on as
    under DDP, so the ops autocast keeps in fp32 stay there. DDP instead keeps fp32
    parameters, autocasts each op, and all-reduces fp32 gradients (docs/training.md)."""
    # imported here: checkpoint.py imports this module, and eval, generate and info import
    # checkpoint.py without ever sharding a model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.skip_empty_segments = False  # every rank runs every block (FSDP gathers)
    mesh = build_mesh(cfg, dd, device)
    policy = (MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
              if amp is not None else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def build_mesh(cfg: TrainConfig, dd: Dist, device: torch.device) -> DeviceMesh:
    """1-D: every rank holds 1/world of each parameter (FSDP). --replicate R: 2-D, R
    replicas x world/R shards (HSDP, as torchtitan's data_parallel_replicate): parameters
    are sharded within a group of world/R ranks (one node, say) and replicated across the
    R groups; gradients are reduce-scattered in the group, then all-reduced across."""
    if cfg.replicate == 1:
        return init_device_mesh(device.type, (dd.world_size,), mesh_dim_names=("shard",))
    if dd.world_size % cfg.replicate:
        raise SubLLMError(f"--replicate {cfg.replicate} does not divide the {dd.world_size} "
                          "processes; choose a divisor of the number of processes")
    return init_device_mesh(device.type, (cfg.replicate, dd.world_size // cfg.replicate),
                            mesh_dim_names=("replicate", "shard"))


def ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """The whole model on every rank, its gradients all-reduced (DDP)."""
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, cfg: TrainConfig, dd: Dist
            ) -> Callable[[bool], contextlib.AbstractContextManager] | None:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not dd.enabled or cfg.grad_accum == 1:
        return None
    if cfg.distributed == "fsdp":
        def fsdp_sync(last_micro: bool) -> contextlib.AbstractContextManager:
            model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        return fsdp_sync
    return lambda last_micro: contextlib.nullcontext() if last_micro else model.no_sync()
