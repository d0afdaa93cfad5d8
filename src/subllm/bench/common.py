"""What the benchmarks share: flags, models, timing and memory, the paired runner, the
budget search, outputs.

Every benchmark module imports from here and from no other benchmark module. `subllm bench
--help` imports them all, so none of them imports torch, transformers or matplotlib at the
top. The paired runner measures the things compared in alternating order (`alternate`), and
a measurement whose peak memory must be its own in a fresh interpreter (`run_worker`, served
by `worker_entry` in the benchmark's module).
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import median
from typing import Any, NoReturn, TypeVar

from subllm.atomic import write_atomic
from subllm.errors import SubLLMError
from subllm.model.config import PRESETS, ModelConfig
from subllm.planner import GRANULE
from subllm.train.config import TrainConfig

MODES = ("standard", "checkpointing", "mst")  # mst and estimate: see apply_mode
OVER_LIMIT_EXIT = 3  # a worker's exit code when its resident set crossed its limit
KEPT_TOLERANCE = 0.05  # kept fraction this far off its keep ratio: the ratios are not fair
K = TypeVar("K")
R = TypeVar("R")

# ---- flags ---------------------------------------------------------------------------

# every benchmark writes to ./bench-out/<its name> (relative to the current directory) unless
# --out says otherwise; committed results (docs/benchmarks/...) only ever by an explicit --out
OUT_ROOT = "bench-out"

# flags several benchmarks take: name -> add_argument keywords (see add_flags)
FLAGS: dict[str, dict[str, Any]] = {
    "seq_lens": {"default": "1024,2048",
                 "help": "comma-separated sequence lengths (default %(default)s)"},
    "modes": {"default": ",".join(MODES), "help": f"comma-separated subset of {','.join(MODES)}"},
    "batch_size": {"type": int, "default": 1, "help": "sequences per step (default %(default)s)"},
    "steps": {"type": int, "default": 3, "help": "timed steps per case (default %(default)s)"},
    "warmup": {"type": int, "default": 1, "help": "untimed steps first (default %(default)s)"},
    "device": {"choices": ("cpu", "cuda"), "default": "cpu"},
    "dtype": {"choices": ("fp32", "bf16"), "default": "fp32",
              "help": "bf16 = autocast over fp32 weights (mixed precision)"},
    "threads": {"type": int, "default": None,
                "help": "torch CPU threads, here and in the case subprocesses (default: torch's)"},
    "seed": {"type": int, "default": 0, "help": "seed of the weights and the tokens (default 0)"},
    "case_timeout": {"type": float, "default": 3600.0,
                     "help": "seconds before a case subprocess is abandoned (default "
                             "%(default).0f)"},
}


def add_flags(p: Any, *names: str, **changes: dict[str, Any]) -> None:
    """Add the FLAGS `names`, then those named in `changes`, each with its keywords updated
    by changes[name] (e.g. steps={"default": 2})."""
    for name in [*names, *changes]:
        p.add_argument("--" + name.replace("_", "-"), **{**FLAGS[name], **changes.get(name, {})})


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


def parse_names(text: str, flag: str, choices: Sequence[str], empty: bool = False) -> list[str]:
    """'standard,mst' -> ['standard', 'mst'] (in order, unique), each one of `choices`;
    nothing is an error unless `empty`."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not (names or empty):
        unknown = f"unknown {', '.join(bad)}; " if bad else ""
        raise SubLLMError(f"{flag} {text!r}: {unknown}choose from {', '.join(choices)}")
    return list(dict.fromkeys(names))


def parse_pair(text: str, example: str = "llama-small,subllm-small") -> tuple[str, str]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(parts):
        raise SubLLMError(
            f"--pair {text!r}: write two models separated by a comma, e.g. {example} "
            "(presets or YAML/JSON model config files)"
        )
    return parts[0], parts[1]


def require_positive(args: Any, *names: str, minimum: float | None = None) -> None:
    """Raise naming the flag of the first of `names` (attributes of args, None skipped) that
    is <= 0, or < `minimum` when that is given."""
    for name in names:
        value = getattr(args, name, None)
        bad = value is not None and (value < minimum if minimum is not None else not value > 0)
        if bad:
            need = "positive" if minimum is None else f">= {minimum}"
            raise SubLLMError(f"--{name.replace('_', '-')} must be {need}, got {value}")


def check_cuda(device: str) -> None:
    """Raise when `--device cuda` was asked for on a machine without a visible GPU."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SubLLMError("--device cuda: no CUDA GPU is visible; use --device cpu")


# ---- models --------------------------------------------------------------------------

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
    """'preset', 'hf-config' (a transformers config.json or a folder holding one) or
    'hf-spec' (hf-llama:dim=256,...): what kind of model `spec` is; raise if none."""
    if spec.startswith("hf-llama"):
        parse_spec(spec)
        return "hf-spec"
    path = Path(spec)
    if (path.is_dir() and (path / "config.json").is_file()) or (
            path.suffix == ".json" and path.is_file()):
        return "hf-config"
    if spec in PRESETS:
        return "preset"
    raise SubLLMError(
        f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), not a Hugging Face config "
        "file, and not a spec like hf-llama:dim=256,layers=4,vocab=128256"
    )


def on_device(device: str) -> Any:
    """The context to build a model in: on a GPU its parameters are made there (a 1.3B
    model's CPU initialisation takes seconds); elsewhere a no-op."""
    import torch

    return torch.device(device) if str(device).startswith("cuda") else contextlib.nullcontext()


def build_model(spec: str, seq_len: int, device: str = "cpu") -> Any:
    """A randomly initialised model of a `check_model` spec, built on `device`."""
    import torch  # noqa: F401  (imported for its side effects on transformers)

    kind = check_model(spec)
    if kind == "preset":
        from subllm.model import SubLLM

        with on_device(device):
            return SubLLM(load_config(spec, seq_len))
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if kind == "hf-spec":
        config = LlamaConfig(**parse_spec(spec), max_position_embeddings=max(8192, seq_len),
                             pad_token_id=0)
    else:
        path = Path(spec)
        config = AutoConfig.from_pretrained(path if path.is_dir() else str(path))
    if getattr(config, "max_position_embeddings", seq_len) < seq_len:
        config.max_position_embeddings = seq_len
    with on_device(device):
        return AutoModelForCausalLM.from_config(config)


def load_config(spec: str, max_len: int) -> ModelConfig:
    """A preset or config file as a ModelConfig whose context holds `max_len` tokens."""
    config = ModelConfig.load(spec)  # raises ConfigError (a SubLLMError) naming the problem
    return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, max_len))


def apply_mode(model: Any, *, mst: bool = False, checkpointing: bool = False) -> Any:
    """mst: subllm.model.mst.apply_mst (with block-level checkpointing when
    `checkpointing`); else checkpointing alone."""
    from subllm.model.mst import apply_mst, enable_checkpointing

    if mst:
        apply_mst(model, checkpointing=checkpointing)
    elif checkpointing:
        enable_checkpointing(model)
    return model


def adamw(model: Any, device: str, cfg: TrainConfig | None = None) -> Any:
    """The AdamW `subllm train` builds, with the settings of `cfg` (default: lr 1e-4)."""
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


def timed_train_step(model: Any, optimizer: Any, ids: Any, step: int, device: str,
                     amp: Any) -> tuple[float, float]:
    """(seconds, loss) of one step of subllm.train.loop.train_step (no clipping; autocast
    to `amp` unless None), after set_step(step) where the model has it."""
    import torch

    from subllm.train.loop import train_step

    if hasattr(model, "set_step"):
        model.set_step(step)
    seconds, result = timed(device, lambda: train_step(model, optimizer, [ids],
                                                       device=torch.device(device), amp=amp,
                                                       grad_clip=None))
    return seconds, float(result.loss)


# ---- timing and memory ---------------------------------------------------------------


def amp_dtype(dtype: str) -> Any:
    """'bf16' / 'fp16' -> the torch dtype autocast runs in; 'fp32' -> None (no autocast)."""
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


def sync(device: Any) -> Any:
    """Wait for the GPU (timing and its memory counters need it) and return torch; on a CPU
    do nothing and return None."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize()
    return torch


def timed(device: str, fn: Callable[[], R]) -> tuple[float, R]:
    """(seconds fn() took, synchronised with the GPU on both ends, its result)."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def ratio(b: float | None, a: float | None) -> float | None:
    return None if a in (None, 0) or b is None else b / a


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_bytes(path: str, key: str) -> int:
    """The `KEY: N kB` line of a /proc file, in bytes; OSError when it has none."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in {path}")


def peak_rss_bytes() -> int:
    """This process's peak resident set since its exec (VmHWM; getrusage's ru_maxrss would
    carry a big parent's peak over fork + exec)."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def mem_available() -> int | None:
    """90 % of the machine's available memory (the rest is for everyone else), or None."""
    try:
        return _proc_bytes("/proc/meminfo", "MemAvailable") * 9 // 10
    except OSError:
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
    """Bytes held now: allocated by torch on a GPU, the resident set on a CPU."""
    torch = sync(device)
    return torch.cuda.memory_allocated(device) if torch else rss_bytes()


def reset_peak(device: Any) -> None:
    torch = sync(device)
    if torch:
        torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device: Any) -> int:
    """Peak bytes: since reset_peak on a GPU, the process's peak resident set on a CPU."""
    torch = sync(device)
    return torch.cuda.max_memory_allocated(device) if torch else peak_rss_bytes()


# ---- the paired runner: alternation, results, the case worker ------------------------


def alternating(keys: Sequence[K], round_: int) -> Sequence[K]:
    """The order of round `round_`: `keys` in even rounds, reversed in odd ones (A B, B A,
    ...), so that a drift in the machine's load hits every key alike."""
    return keys if round_ % 2 == 0 else keys[::-1]


def alternate(keys: Sequence[K], rounds: int, measure: Callable[[K, int], R],
              warmup: int = 0) -> dict[K, list[R]]:
    """measure(key, round) for every key in each of `warmup + rounds` rounds, in
    `alternating` order; the results of the rounds after the warm-up, per key."""
    results: dict[K, list[R]] = {k: [] for k in keys}
    for i in range(warmup + rounds):
        for key in alternating(keys, i):
            result = measure(key, i)
            if i >= warmup:
                results[key].append(result)
    return results


def paired_ratio(b: list[float], a: list[float]) -> float:
    """Median over the alternation rounds of B's time / A's time in the same round."""
    return median([tb / ta for tb, ta in zip(b, a, strict=True)])


def ratios(b: dict[str, Any], a: dict[str, Any], fields: dict[str, str]
           ) -> dict[str, float | None]:
    """{name: ratio(b[field], a[field])} for each name: field of `fields`."""
    return {name: ratio(b.get(field), a.get(field)) for name, field in fields.items()}


# glibc's malloc keeps freed tensors below its dynamic mmap threshold (up to 32 MiB) in the
# heap, so a CPU process's resident peak depends on its history of frees; this setting (the
# threshold's initial value, made fixed) hands them back, so the peak is the live tensors'
RELEASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def worker_env(threads: int | None = None, release: bool | None = None) -> dict[str, str]:
    """This environment for a worker: OMP_NUM_THREADS = threads when given; release True
    sets RELEASE_ENV, False removes it, None leaves it."""
    env = dict(os.environ)
    if release is not None:
        env = {k: v for k, v in env.items() if k not in RELEASE_ENV}
        env.update(RELEASE_ENV if release else {})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(module: str, case: dict[str, Any], timeout: float,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """The case's result plus `wall_s`, or {"ok": False, "error": ...}; never raises."""
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
        if proc.returncode == OVER_LIMIT_EXIT:
            error = "over the memory limit (stopped by the resident-set watchdog)"
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


# ---- the budget search ---------------------------------------------------------------


def longest_under_budget(fits: Callable[[int], bool], max_len: int, start: int = GRANULE,
                         granule: int = GRANULE) -> tuple[int, list[tuple[int, bool]]]:
    """(longest multiple of `granule` up to max_len for which the monotone fits(L) holds, or
    0; [(length, fits)] in probe order): double from `start` until it fails, then bisect."""
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


# ---- outputs -------------------------------------------------------------------------


def machine_info(device: str, threads: int | None = None) -> dict[str, Any]:
    """CPU, GPU, RAM and library versions for a report; `threads` is recorded when given."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "device": device}
    with contextlib.suppress(ValueError, OSError):
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if threads is not None:
        info["threads"] = threads
    return info


def command_line(bench: str) -> str:
    """The command line of this run, for a report (under pytest: none)."""
    return " ".join(["subllm", *sys.argv[1:]]) if sys.argv and "pytest" not in sys.argv[0] \
        else f"subllm bench {bench} (called from Python)"


def report_head(bench: str, device: str, threads: int | None = None) -> dict[str, Any]:
    """The fields every report begins with: bench, command, machine, device."""
    return {"bench": bench, "command": command_line(bench),
            "machine": machine_info(device, threads), "device": device}


def machine_line(report: dict[str, Any], threads: str = "torch threads") -> str:
    """The Markdown line saying where a report was measured."""
    m = report["machine"]
    counts = f"{m['cpu_count']} CPUs" + (f", {m['threads']} {threads}" if "threads" in m else "")
    dtype = f", dtype {report['dtype']}" if "dtype" in report else ""
    return (f"Machine: {m.get('gpu') or m['cpu']} ({counts}), torch {m['torch']}, transformers "
            f"{m['transformers']}; device {report['device']}{dtype}.")


def markdown_head(title: str, report: dict[str, Any], threads: str = "torch threads"
                  ) -> list[str]:
    """A report's title, machine line and command line, as Markdown lines."""
    return [f"# {title}", "", machine_line(report, threads), f"Command: `{report['command']}`",
            ""]


def table(head: str, align: str, rows: list[list[Any]]) -> list[str]:
    """A Markdown table: `head` 'a | b | c', `align` one letter per column (l or r)."""
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return [f"| {head} |", rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


@dataclasses.dataclass(frozen=True)
class Col:
    """A Markdown table column: header; value, a dotted key path in the row ('a.prefill_s')
    or a function of the row; format, a string ('{:.3f}'; None is '-') or a function of the
    value; alignment, r or l."""

    head: str
    value: str | Callable[[Any], Any]
    fmt: str | Callable[[Any], str] = "{}"
    align: str = "r"

    def cell(self, row: Any) -> str:
        if callable(self.value):
            v = self.value(row)
        else:
            v = row
            for key in self.value.split("."):
                v = v.get(key) if isinstance(v, dict) else None
        if callable(self.fmt):
            return self.fmt(v)
        return "-" if v is None else self.fmt.format(v)


def columns(cols: Sequence[Col], rows: Iterable[Any]) -> list[str]:
    """A Markdown table (table) with the columns `cols`, one line per row."""
    return table(" | ".join(c.head for c in cols), "".join(c.align for c in cols),
                 [[c.cell(row) for c in cols] for row in rows])


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


def save_axes(ax: Any, path: Path, xlabel: str, ylabel: str | None = None,
              title: str | None = None, legend: dict[str, Any] | None = None) -> None:
    """Label, grid and legend one plot's axes, then save its figure (save_figure)."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or {}))
    ax.figure.tight_layout()
    save_figure(ax.figure, path)


def write_outputs(out: Path, stem: str, report: dict[str, Any], markdown: str,
                  plot: Callable[[dict[str, Any], Path], None],
                  png: str | None = None) -> list[Path]:
    """Write OUT/STEM.json, OUT/STEM.md and the plot OUT/PNG (default STEM.png), each
    atomically; say so and return their paths."""
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / (png or f"{stem}.png")]
    write_atomic(paths[0], json.dumps(report, indent=2))
    write_atomic(paths[1], markdown)
    plot(report, paths[2])
    print("wrote " + ", ".join(map(str, paths)))
    return paths


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_gib(n: float | None, digits: int = 2) -> str:
    return "-" if n is None else f"{n / 2**30:.{digits}f}"


def slashed(values: Sequence[float] | None, spec: str = ".3f") -> str:
    """[0.64, 0.5] -> '0.640/0.500' (kept fractions, keep ratios); '' when empty."""
    return "/".join(format(v, spec) for v in values or [])
