"""What the benchmarks share: flags, models, the case worker, the budget search, outputs.

Every benchmark module imports from here and from no other benchmark module.
`subllm bench --help` imports every benchmark module for its flags, so neither this file
nor they import torch, transformers or matplotlib at the top: those load inside the
functions that run a benchmark (the subllm modules imported here are torch-free).

The case worker: one benchmark case in a fresh interpreter, so that its peak memory is
its own. A bench module runs `run_worker("subllm.bench.NAME", case, timeout)` and ends with
`if __name__ == "__main__": worker_entry(run_case, "NAME")`, which runs the case and writes
its result (a JSON object) to the file the parent named. On a CPU a case calls
`watch_memory()` first, which ends the worker with OVER_LIMIT_EXIT as soon as its resident
set passes the budget (or 90 % of the memory available), instead of waiting for the OOM
killer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from subllm.atomic import write_atomic
from subllm.errors import SubLLMError
from subllm.model.config import PRESETS, ModelConfig
from subllm.planner import GRANULE
from subllm.train.config import TrainConfig

MODES = ("standard", "checkpointing", "mst")  # mst and estimate: see apply_mode
OVER_LIMIT_EXIT = 3  # a worker's exit code when its resident set crossed its limit
KEPT_TOLERANCE = 0.05  # kept fraction this far off its keep ratio: the ratios are not fair

# --------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------


# every benchmark writes to ./bench-out/<its name> (relative to the current directory) unless
# --out says otherwise; committed results (docs/benchmarks/...) only ever by an explicit --out
OUT_ROOT = "bench-out"


def default_out(name: str) -> str:
    """The default --out of benchmark `name`: bench-out/NAME, under the current directory."""
    return f"{OUT_ROOT}/{name}"


def add_out_argument(p: Any, name: str, more: str = "") -> None:
    """`--out OUT`, default bench-out/NAME under the current directory; `more` ends the help."""
    p.add_argument("--out", default=default_out(name),
                   help=f"output folder (default ./{default_out(name)}, under the current "
                        f"directory){more}")


def parse_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    """'1024,2048' -> [1024, 2048] (sorted, unique); raise on anything else."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SubLLMError(f"{flag} {text!r}: write comma-separated integers") from None
    if not values or any(v < minimum for v in values):
        raise SubLLMError(f"{flag} {text!r}: every value must be an integer >= {minimum}")
    return sorted(set(values))


def parse_modes(text: str) -> list[str]:
    """'standard,mst' -> ['standard', 'mst'] (in the given order, unique)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise SubLLMError(f"--modes {text!r}: choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def parse_pair(text: str, example: str = "llama-small,subllm-small") -> tuple[str, str]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(parts):
        raise SubLLMError(
            f"--pair {text!r}: write two models separated by a comma, e.g. {example} "
            "(presets or YAML/JSON model config files)"
        )
    return parts[0], parts[1]


def require_positive(args: Any, *names: str) -> None:
    """Raise naming the flag of the first of `names` (attributes of args) that is <= 0."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise SubLLMError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_cuda(device: str) -> None:
    """Raise when `--device cuda` was asked for on a machine without a visible GPU."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SubLLMError("--device cuda: no CUDA GPU is visible; use --device cpu")


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

_SPEC_KEYS = {"dim": "hidden_size", "layers": "num_hidden_layers", "vocab": "vocab_size",
              "ffn": "intermediate_size", "heads": "num_attention_heads",
              "kv_heads": "num_key_value_heads"}


def parse_spec(spec: str) -> dict[str, int]:
    """'hf-llama:dim=256,layers=4,vocab=128256' -> LlamaConfig keyword arguments."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    values: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, _, val = item.partition("=")
        if key not in _SPEC_KEYS or not val.isdigit() or int(val) <= 0:
            raise SubLLMError(
                f"--model {spec!r}: bad item {item!r}; use positive integers for "
                f"{', '.join(_SPEC_KEYS)}"
            )
        values[_SPEC_KEYS[key]] = int(val)
    dim = values.setdefault("hidden_size", 256)
    values.setdefault("num_hidden_layers", 4)
    values.setdefault("vocab_size", 128256)
    # Llama-3's proportions: ffn = 3.5 d, head size 64, 4x grouped KV heads
    values.setdefault("intermediate_size", int(3.5 * dim))
    values.setdefault("num_attention_heads", max(1, dim // 64))
    values.setdefault("num_key_value_heads", max(1, values["num_attention_heads"] // 4))
    return values


def check_model(spec: str) -> str:
    """Say early (in the parent) what kind of model `spec` is; raise if it is none.

    'preset', 'hf-config' (a transformers config.json or a folder holding one) or 'hf-spec'
    (hf-llama:dim=256,layers=4,vocab=128256)."""
    if spec.startswith("hf-llama"):
        parse_spec(spec)
        return "hf-spec"
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return "hf-config"
    if path.suffix == ".json" and path.is_file():
        return "hf-config"
    if spec in PRESETS:
        return "preset"
    raise SubLLMError(
        f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), not a Hugging Face config "
        "file, and not a spec like hf-llama:dim=256,layers=4,vocab=128256"
    )


def on_device(device: str) -> Any:
    """The context to build a model in: on a GPU its parameters are made and initialised
    there (a 1.3B model's CPU initialisation costs seconds per build and process);
    elsewhere a no-op."""
    import contextlib

    import torch

    return torch.device(device) if str(device).startswith("cuda") else contextlib.nullcontext()


def build_model(spec: str, seq_len: int, device: str = "cpu") -> Any:
    """A randomly initialised model of a `check_model` spec (no downloads), built on
    `device` (see on_device)."""
    with on_device(device):
        return _build_model(spec, seq_len)


def _build_model(spec: str, seq_len: int) -> Any:
    import torch  # noqa: F401  (imported for its side effects on transformers)

    kind = check_model(spec)
    if kind == "preset":
        from subllm.model import SubLLM

        cfg = ModelConfig.preset(spec)
        return SubLLM(dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len)))
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if kind == "hf-spec":
        config = LlamaConfig(**parse_spec(spec), max_position_embeddings=max(8192, seq_len),
                             pad_token_id=0)
    else:
        path = Path(spec)
        config = AutoConfig.from_pretrained(path if path.is_dir() else str(path))
    if getattr(config, "max_position_embeddings", seq_len) < seq_len:
        config.max_position_embeddings = seq_len
    return AutoModelForCausalLM.from_config(config)


def load_config(spec: str, max_len: int) -> ModelConfig:
    """A preset or config file as a ModelConfig whose context holds `max_len` tokens."""
    config = ModelConfig.load(spec)  # raises ConfigError (a SubLLMError) naming the problem
    return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, max_len))


def apply_mode(model: Any, *, mst: bool = False, checkpointing: bool = False) -> Any:
    """mst: subllm.model.mst.apply_mst (mini-sequence MLP + chunked LM-head loss, with
    block-level checkpointing when `checkpointing`); else checkpointing alone."""
    from subllm.model.mst import apply_mst, enable_checkpointing

    if mst:
        apply_mst(model, checkpointing=checkpointing)
    elif checkpointing:
        enable_checkpointing(model)
    return model


def adamw(model: Any, device: str, cfg: TrainConfig | None = None) -> Any:
    """The optimizer `subllm train` builds (AdamW, no decay on norms and biases), with the
    settings of `cfg` (default: lr 1e-4)."""
    import torch

    from subllm.train.loop import make_optimizer

    return make_optimizer(model, cfg or TrainConfig(lr=1e-4), torch.device(device))


def keep_ratios(config: ModelConfig) -> list[float]:
    return [config.segment_keep(s) for s in config.segments]


def off_keep(fractions: list[float], keeps: list[float]) -> list[int]:
    """Indices of the segments whose kept fraction is more than KEPT_TOLERANCE off."""
    return [i for i, (f, k) in enumerate(zip(fractions, keeps, strict=True))
            if abs(f - k) > KEPT_TOLERANCE]


def model_summary(spec: str, config: ModelConfig, parameters: int) -> dict[str, Any]:
    """A model's entry (`a` / `b`) in an A-vs-B report."""
    return {"spec": spec, "structure": config.structure, "parameters": parameters,
            "keep": keep_ratios(config), "block_compute_fraction": config.compute_fraction(),
            "config": config.to_dict()}


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def amp_dtype(dtype: str) -> Any:
    """'bf16' / 'fp16' -> the torch dtype autocast runs in; 'fp32' -> None (no autocast), the
    way subllm.train.loop.train_step takes its `amp`."""
    if dtype == "fp32":
        return None
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16: autocast over the weights' dtype; fp32: nothing."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device, dtype=amp_dtype(dtype))


def sync(device: str) -> None:
    """Wait for the GPU (timing needs it); nothing on a CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def ratio(b: float | None, a: float | None) -> float | None:
    return None if a in (None, 0) or b is None else b / a


# --------------------------------------------------------------------------------------
# the case worker and its memory
# --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set since its exec: VmHWM of /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries that over fork + exec, so a worker started by a
    big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def mem_available() -> int | None:
    """90 % of the machine's available memory (the rest is for everyone else), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 9 // 10
    except OSError:
        return None
    return None


def watch_memory(budget: int | None = None) -> None:
    """In a CPU worker: exit at once with OVER_LIMIT_EXIT when the resident set passes
    `budget` (or mem_available(), whichever is lower)."""
    avail = mem_available()
    limit = min(budget, avail) if budget and avail else budget or avail
    if not limit:
        return

    def loop() -> None:
        while True:
            if rss_bytes() > limit:
                os._exit(OVER_LIMIT_EXIT)
            time.sleep(0.005)

    threading.Thread(target=loop, daemon=True).start()


def memory_now(device: Any) -> int:
    """Bytes held now: allocated by torch on a GPU (after a sync), the resident set on a
    CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def reset_peak(device: Any) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device: Any) -> int:
    """Peak bytes: torch.cuda.max_memory_allocated since reset_peak on a GPU, the peak
    resident set of the process on a CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


# glibc's malloc keeps freed tensors below its dynamic mmap threshold (up to 32 MiB) in the
# heap, so a CPU process's resident peak depends on its history of frees; this setting (the
# threshold's initial value, made fixed) hands them back, so the peak is the live tensors'
RELEASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def worker_env(threads: int | None = None, set_env: dict[str, str] | None = None,
               drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a worker: without `drop`, with `set_env`, and
    OMP_NUM_THREADS = threads when given."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(set_env or {})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(module: str, case: dict[str, Any], timeout: float,
               env: dict[str, str] | None = None,
               exit_reasons: dict[int, str] | None = None) -> dict[str, Any]:
    """The case's result plus `wall_s`, or {"ok": False, "error": ...}; never raises.

    exit_reasons: messages for a module's own exit codes (OVER_LIMIT_EXIT has one)."""
    reasons = {OVER_LIMIT_EXIT: "over the memory limit (stopped by the resident-set watchdog)",
               **(exit_reasons or {})}
    with tempfile.TemporaryDirectory(prefix="subllm-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--worker", json.dumps(case), str(result_file)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and result_file.is_file():
            return {**json.loads(result_file.read_text()), "wall_s": wall}
        if proc.returncode in reasons:
            error = reasons[proc.returncode]
        elif proc.returncode < 0:
            error = f"killed by signal {-proc.returncode} (out of memory?)"
        else:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            error = f"exit code {proc.returncode}: {tail[0]}"
        return {"ok": False, "error": error, "wall_s": wall}


def worker_entry(run_case: Callable[[dict[str, Any]], dict[str, Any]], name: str) -> NoReturn:
    """`python -m subllm.bench.NAME --worker CASE_JSON RESULT_FILE`: run one case."""
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        write_atomic(Path(sys.argv[3]), json.dumps(run_case(json.loads(sys.argv[2]))))
        sys.exit(0)
    print(f"usage: subllm bench {name} ... (this module's own entry point is the case worker)",
          file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------
# the budget search
# --------------------------------------------------------------------------------------


def longest_under_budget(fits: Callable[[int], bool], max_len: int, start: int = GRANULE,
                         granule: int = GRANULE) -> tuple[int, list[tuple[int, bool]]]:
    """Longest multiple of `granule` in [granule, max_len] for which fits(L) is True,
    assuming fits is monotone: double from `start` until it fails, then bisect.
    Returns (length or 0 when even `start` fails, [(length, fits)] in probe order)."""
    probes: list[tuple[int, bool]] = []

    def probe(n: int) -> bool:
        ok = bool(fits(n))
        probes.append((n, ok))
        return ok

    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    n = start
    while hi is None:
        n = min(n, max_len)
        if not probe(n):
            hi = n
        elif n == max_len:
            return n, probes
        else:
            lo, n = n, n * 2
    while hi - lo > granule:
        mid = (lo + hi) // 2 // granule * granule  # a multiple strictly between lo and hi
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def machine_info(device: str, threads: int | None = None) -> dict[str, Any]:
    """CPU, GPU, RAM and library versions for a report; `threads` is recorded when given."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "device": device}
    try:
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if threads is not None:
        info["threads"] = threads
    return info


def command_line(fallback: str = "subllm bench (called from Python)") -> str:
    """The command line of this run, for a report (`fallback` under pytest)."""
    return " ".join(["subllm", *sys.argv[1:]]) if sys.argv and "pytest" not in sys.argv[0] \
        else fallback


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG, whole or not at all, and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def write_outputs(out: Path, stem: str, report: dict[str, Any], markdown: str,
                  plot: Callable[[dict[str, Any], Path], None],
                  png: str | None = None) -> list[Path]:
    """OUT/STEM.json, OUT/STEM.md and the plot OUT/PNG (default STEM.png), each written
    atomically; returns their paths."""
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / (png or f"{stem}.png")]
    write_atomic(paths[0], json.dumps(report, indent=2))
    write_atomic(paths[1], markdown)
    plot(report, paths[2])
    return paths


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_gib(n: float | None, digits: int = 2) -> str:
    return "-" if n is None else f"{n / 2**30:.{digits}f}"
