"""What a training process runs on: devices, processes, autocast, signals and logging."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import resource
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from subllm.atomic import write_atomic
from subllm.errors import SubLLMError

# ---------------------------------------------------------------------------------------------
# Devices and processes


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we are one process.

    `timeout_s`: how long a collective waits for the other ranks; a rank that died or
    took another path then ends the run with an error instead of a silent hang."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def pick_device(name: str, dd: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SubLLMError(f"--device {name}: CUDA is not available here; use --device cpu")
        return torch.device("cuda", dd.local_rank) if dd.enabled else torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise SubLLMError("--device mps: MPS is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SubLLMError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None


# what says how many threads PyTorch's CPU kernels use: the user's choice, left alone
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_tip(load: float, cores: int, env: Mapping[str, str],
               threads: int | None = None) -> str | None:
    """The tip a CPU run prints when the cores are already busy with other work (1-minute
    load average `load` >= `cores` before it starts): there PyTorch's intra-op threads
    wait on each other and one thread is often several times faster. None when the user
    chose the threads (OMP_NUM_THREADS / MKL_NUM_THREADS in `env`, or `threads`, the
    current torch.get_num_threads(), is already 1), under torchrun (it sets
    OMP_NUM_THREADS for its processes), on one core, or when the cores are free."""
    if any(v in env for v in THREAD_VARIABLES) or "RANK" in env or "LOCAL_RANK" in env:
        return None
    if cores <= 1 or (threads is not None and threads <= 1) or load < cores:
        return None
    return (f"tip: the CPU is busy with other work (1-minute load {load:.1f} on {cores} "
            "cores), where PyTorch's threads wait on each other; `OMP_NUM_THREADS=1 subllm "
            "train ...` can be several times faster")


def load_and_cores() -> tuple[float, int] | None:
    """(the 1-minute load average, the cores this process may use); None where unknown."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return load, cores or 1


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device has it (`auto` uses it on GPUs only); None = fp32."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if name == "bf16":
            raise SubLLMError("--dtype bf16: this GPU has no bfloat16; use --dtype fp32")
        return None
    return torch.bfloat16 if name == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def collective_device() -> torch.device:
    """Where a small collective's tensor lives: the rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float], dd: Dist, device: torch.device) -> list[float]:
    if not dd.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """What sums of losses and counts accumulate in on the device: fp64 (as Python floats
    would), fp32 where the device has no fp64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def read_sums(values: Sequence[Tensor | float], dd: Dist, device: torch.device,
              local: Sequence[Tensor | float] = ()) -> list[float]:
    """`values` summed over the ranks, then `local` as they are, as Python floats: one
    tensor, one all-reduce (when distributed) and one host sync for all of them."""
    dtype = accumulator_dtype(device)

    def stack(xs: Sequence[Tensor | float]) -> Tensor:
        if not xs:
            return torch.zeros(0, dtype=dtype, device=device)
        return torch.stack([x.to(device, dtype).reshape(()) if isinstance(x, Tensor)
                            else torch.tensor(float(x), dtype=dtype, device=device) for x in xs])

    summed = stack(values)
    if dd.enabled:
        dist.all_reduce(summed)
    return torch.cat([summed, stack(local)]).tolist()


# ---------------------------------------------------------------------------------------------
# Logging and signals


class RunLog:
    """metrics.jsonl + TensorBoard; loss.png at the end."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and self.path.exists():  # drop what a killed run logged past the ckpt
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")
        # lazy: TensorBoard costs a few tenths of a second to import, and only rank 0 of a
        # training run writes it (`subllm eval` / `generate` import this module too)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for j, v in enumerate(value):
                    self.tb.add_scalar(f"{key}/{j}", v, step)
            elif isinstance(value, (int, float)):
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records


def plot_loss(run_dir: Path) -> Path | None:
    # lazy: matplotlib is slow to import and only needed once, at the end of a run
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_png(fig, run_dir / "loss.png")


def plot_routing(run_dir: Path, keep_per_depth: list[float], depths: list[int],
                 band: float | None = None) -> Path | None:
    """routing.png: each subsampling module's kept fraction against the step, in training
    (top-k: the keep ratio by construction, a check), in evaluation with inference's
    selection and with training's, the keep ratio it should match and, shaded, `band`:
    keep +- the rank rule's budget band (`rank_band`), the share inference is held in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    series = {key: [(r["step"], r[key]) for r in records if key in r]
              for key in ("kept_fractions", "val_kept_fractions", "val_top_k_kept_fractions")}
    if not series["val_kept_fractions"]:
        return None
    n = len(depths)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False, sharey=True)
    styles = {"kept_fractions": ("training batches (top-k)", "-", 1.0),
              "val_kept_fractions": ("validation, inference selection", "o-", 1.6),
              "val_top_k_kept_fractions": ("validation, training selection", "x--", 1.0)}
    for j, ax in enumerate(axes[0]):
        keep = keep_per_depth[depths[j] - 1]
        for key, (label, style, lw) in styles.items():
            points = [(step, v[j]) for step, v in series[key] if j < len(v)]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=label, lw=lw, ms=3)
        ax.axhline(keep, color="k", lw=0.8, ls=":", label=f"keep {keep:g}")
        if band:
            ax.axhspan(keep - band, keep + band, color="k", alpha=0.06,
                       label=f"keep \u00b1 rank_band ({band:g}): where inference's kept "
                       "share is held")
        ax.set_title(f"subsampler {j} (depth {depths[j]})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of entering tokens kept")
    axes[0][0].legend(fontsize=7)
    return _save_png(fig, run_dir / "routing.png")


def _save_png(fig: Any, out: Path) -> Path:
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(out, png.getvalue())
    return out


def fmt_kept(fractions: list[float]) -> str:
    return "/".join(f"{f:.2f}" for f in fractions)


class StopFlag:
    """First SIGINT / SIGTERM asks the loop to save and exit; a second one interrupts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# what a collective's failure says, by backend: a peer that exited, or a timeout
_COLLECTIVE_FAILURES = ("connection closed", "connection reset", "timed out", "timeout",
                        "nccl", "gloo", "broken pipe", "processgroup")


def collective_failure(e: BaseException, dd: Dist, phase: str, step: int,
                       timeout_s: float) -> SubLLMError | None:
    """The one-line error for a failed collective (another rank died or went another way),
    or None when `e` is something else."""
    text = str(e).strip()
    if not dd.enabled or not (isinstance(e, dist.DistError) or any(
            k in text.lower() for k in _COLLECTIVE_FAILURES)):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    return SubLLMError(
        f"rank {dd.rank} of {dd.world_size} stopped in {phase} at step {step}: another rank "
        f"failed or did not join a collective within {timeout_s:g} s ({first[:200]}); see "
        "the other ranks' messages above")
