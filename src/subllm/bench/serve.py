"""`subllm bench serve`: model A against model B behind the real `subllm serve`.

A and B are built as `subllm bench infer` builds them (B briefly calibrated on the bytes of
the Python standard library so that its routing keeps its keep ratios, or a trained run
with --checkpoint-b), then saved as Hugging Face SubLLM directories with a tokenizer of
one word per token id, `<|endoftext|>` the last one. Each is served by `python -m subllm
serve` in a subprocess (loopback, a free port, --max-batch-size the largest concurrency).
For every --concurrency C, C streaming clients (the `openai` AsyncOpenAI client, in this
process) each send --requests-per-client completions back to back: held-out stdlib text
as token ids, --max-tokens greedy tokens. Per (model, schedule, concurrency): requests/s,
output tokens/s, time to first token and the per-token latency (the time between two
streamed tokens), p50 and p99, and the B / A ratios; per model, the batched speed-up
(tokens/s at C over tokens/s at the lowest concurrency). With --schedule both the two
batching schedules of the server (continuous, static) are measured for both models.

Why one server per (model, concurrency), started and stopped each time: two servers up at
once share the CPU cores, and the order A-then-B at every level would let a drift in the
machine's load favour one model. So each level starts A's server, measures, stops it, then
B's, the order reversed at every other level (common.alternating: A B, B A, ...); a start
is seconds against a minute or more of load, and each server is warmed up (one untimed
request per client) before it is measured. The server's torch threads come from the
environment (OMP_NUM_THREADS = --threads when given, else torch's default), the same for
both; the clients share the machine with the server, alike for A and B.

Writes serve.json, serve.md and serve.png (tokens/s against concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from subllm.bench import common
from subllm.bench.common import Col
from subllm.errors import SubLLMError

DEFAULT_PAIR = "llama-small,subllm-small"
SCHEDULES = ("continuous", "static")
EOT = "<|endoftext|>"
LISTENING = re.compile(r"^subllm serve: .* on (http://\S+/v1)\s*$")
STOP_WAIT_S = 60.0  # a drained server exits within this after SIGTERM, or it is killed

# ---- flags -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    from subllm.bench import pair  # its flags for B, shared with bench infer

    p.add_argument("--pair", default=DEFAULT_PAIR,
                   help=f"A,B: presets or YAML/JSON model config files (default {DEFAULT_PAIR})")
    p.add_argument("--concurrency", default="1,8,32",
                   help="comma-separated numbers of concurrent streaming clients (default "
                        "1,8,32); the server's --max-batch-size is the largest")
    p.add_argument("--requests-per-client", type=int, default=4,
                   help="completions each client sends back to back (default 4)")
    p.add_argument("--prompt-len", type=int, default=128,
                   help="prompt tokens per request, held-out stdlib text (default 128)")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="greedy tokens per completion (default 64)")
    p.add_argument("--schedule", choices=(*SCHEDULES, "both"), default="continuous",
                   help="the server's batching schedule; both: measure the two (default "
                        "continuous)")
    pair.add_b_arguments(p)
    p.add_argument("--server-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the server's --dtype (default auto: bfloat16 on CUDA, else float32)")
    common.add_flags(p, "device", "threads", "seed",
                     case_timeout={"default": 1800.0,
                                   "help": "seconds one server may take to start, warm up and "
                                           "serve one concurrency level (default %(default).0f)"})
    common.add_out_argument(p, "serve")


def check_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """(concurrency levels, schedules) of valid flags; a one-line SubLLMError otherwise."""
    levels = common.parse_ints(args.concurrency, "--concurrency", minimum=1)
    common.parse_pair(args.pair)
    common.require_positive(args, "requests_per_client", "prompt_len", "max_tokens",
                            "threads", "case_timeout", "calibrate_seq_len",
                            "calibrate_batch_size", "calibrate_lr")
    common.require_positive(args, "calibrate_steps", minimum=0)
    common.check_cuda(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SubLLMError(f"--out {out} is a file; pass a directory")
    return levels, list(SCHEDULES) if args.schedule == "both" else [args.schedule]


# ---- the models and what the server loads ----------------------------------------------


def build_models(args: argparse.Namespace, max_len: int) -> dict[str, Any]:
    """A and B as `subllm bench infer` builds them, B calibrated; with the held-out text
    the prompts come from. {"specs", "configs", "models", "calibration", "b_state",
    "held_out"}."""
    import torch

    from subllm.bench import pair
    from subllm.model import SubLLM

    spec_a, spec_b = common.parse_pair(args.pair)
    config_b, model_b, b_source = pair._load_b(args, max_len)
    config_a = common.load_config(spec_a, max_len)
    if config_b is None:
        config_b = common.load_config(spec_b, max_len)
    else:
        config_a = pair._a_shaped_like(config_a, config_b)
        spec_b = f"{spec_b} (weights: {b_source})"
    calibrating = model_b is None and args.calibrate_steps > 0 and config_b.is_subllm
    if calibrating and args.calibrate_seq_len > config_b.max_seq_len:
        raise SubLLMError(f"--calibrate-seq-len exceeds B's context {config_b.max_seq_len}")
    torch.manual_seed(args.seed)
    with common.on_device(args.device):
        model_a = SubLLM(config_a).to(args.device).eval()
    if model_b is None:
        torch.manual_seed(args.seed + 1)
        with common.on_device(args.device):
            model_b = SubLLM(config_b).to(args.device)
    vocab = min(config_a.vocab_size, config_b.vocab_size)
    stream = pair.stdlib_byte_stream(vocab)
    cut = int(len(stream) * 0.9)  # the split `subllm bench infer` uses: prompts are unseen
    calibration = None
    if calibrating:
        print(f"calibrating B ({spec_b}) for {args.calibrate_steps} steps on the stdlib bytes",
              flush=True)
        calibration = pair.calibrate(model_b, stream[:cut], stream[cut:], args.calibrate_steps,
                                     args.calibrate_seq_len, args.calibrate_batch_size,
                                     args.calibrate_lr, args.device, args.seed)
    b_state = "trained checkpoint" if args.checkpoint_b else (
        "calibrated" if calibration else "random init")
    return {"specs": {"a": spec_a, "b": spec_b}, "configs": {"a": config_a, "b": config_b},
            "models": {"a": model_a, "b": model_b.eval()}, "calibration": calibration,
            "b_state": b_state, "held_out": stream[cut:]}


def write_token_tokenizer(vocab_size: int, path: Path) -> int:
    """A tokenizer.json of `vocab_size` words, id i written `t<i>`, `<|endoftext|>` the last
    id (the one generation stops at); returns that id. The models read bytes as token ids
    and need no real tokenizer; a word per id makes every streamed token one non-empty
    chunk, so the chunks time the tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    eot = vocab_size - 1
    vocab = {f"t{i}": i for i in range(eot)} | {EOT: eot}
    tokenizer = Tokenizer(models.WordLevel(vocab))  # no unknown words: prompts are ids
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(EOT, special=True)])
    tokenizer.save(str(path))
    return eot


def save_served(model: Any, directory: Path) -> int:
    """Save `model` as a Hugging Face SubLLM directory `subllm serve` loads; returns the id
    of its end-of-text token."""
    from subllm.interop.export import save_hf_model

    directory.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = directory.parent / f"{directory.name}-tokenizer.json"
    eot = write_token_tokenizer(model.config.vocab_size, tokenizer)
    save_hf_model(model, directory, tokenizer, info={"saved by": "subllm bench serve"})
    return eot


def prompt_kept_fractions(model: Any, prompts: Any, device: str) -> list[float]:
    """B's kept fractions on a batch of prompts (a LLaMA: [])."""
    import torch

    with torch.no_grad():
        return list(model(prompts.to(device)).kept_fractions)


def draw_prompts(held_out: Any, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` token ids from the held-out text."""
    import torch

    from subllm.bench.pair import _windows

    g = torch.Generator().manual_seed(seed)
    return _windows(held_out, count, length, g).tolist()


# ---- one server ------------------------------------------------------------------------


class Server:
    """`python -m subllm serve` in a subprocess: started, its URL read from its stderr line,
    stopped with SIGTERM (killed only when it does not drain within STOP_WAIT_S)."""

    def __init__(self, checkpoint: Path, name: str, schedule: str, batch: int,
                 args: argparse.Namespace, env: dict[str, str]) -> None:
        self.cmd = [sys.executable, "-m", "subllm", "serve", "--checkpoint", str(checkpoint),
                    "--port", "0", "--model-name", name, "--max-batch-size", str(batch),
                    "--schedule", schedule, "--device", args.device,
                    "--dtype", args.server_dtype]
        self.env = env
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.tail: deque[str] = deque(maxlen=20)
        self.url: str | None = None
        self.line = ""

    def start(self, timeout: float) -> float:
        """Start it and wait for its listening line; seconds that took."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env)
        listening = threading.Event()

        def read() -> None:  # drain stderr for good, so that the server never blocks on it
            for line in self.proc.stderr:
                self.tail.append(line.rstrip())
                m = LISTENING.match(line)
                if m and not listening.is_set():
                    self.url, self.line = m[1], line.strip()
                    listening.set()
            listening.set()  # it exited

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(timeout):
            raise SubLLMError(f"the {self.name} server did not start within {timeout:.0f} s")
        if self.url is None:
            self.proc.wait()
            raise SubLLMError(f"the {self.name} server exited with {self.proc.returncode} "
                              f"before listening: {self.last_line()}")
        return time.perf_counter() - t0

    def last_line(self) -> str:
        return next((ln for ln in reversed(self.tail) if ln.strip()), "no output")

    def stop(self) -> int | None:
        """SIGTERM, then its exit code (None when it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


# ---- the load ----------------------------------------------------------------------------


async def one_request(client: Any, name: str, prompt: list[int], max_tokens: int
                      ) -> dict[str, Any]:
    """One streamed greedy completion: when each chunk arrived, its usage and finish."""
    t0 = time.perf_counter()
    first, stamps, finish, tokens = None, [], None, None
    stream = await client.completions.create(
        model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        for choice in chunk.choices:
            first = now if first is None else first
            if choice.text:
                stamps.append(now)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": None if first is None else first - t0, "tokens": tokens,
            "chunks": len(stamps), "finish": finish,
            "gaps_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]}


async def run_clients(url: str, name: str, prompts: list[list[list[int]]], max_tokens: int,
                      timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """(wall seconds, the requests) of one streaming client per entry of `prompts`, each
    sending its prompts back to back."""
    from openai import AsyncOpenAI

    async def client_loop(client: Any, mine: list[list[int]]) -> list[dict[str, Any]]:
        return [await one_request(client, name, p, max_tokens) for p in mine]

    async with AsyncOpenAI(base_url=url, api_key="unused", max_retries=0,
                           timeout=timeout) as client:
        t0 = time.perf_counter()
        done = await asyncio.wait_for(
            asyncio.gather(*(client_loop(client, mine) for mine in prompts)), timeout)
        wall = time.perf_counter() - t0
    return wall, [r for rs in done for r in rs]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(wall: float, requests: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Throughput and latency of one measured load."""
    tokens = sum(r["tokens"] or 0 for r in requests)
    ttft = [r["ttft_s"] for r in requests if r["ttft_s"] is not None]
    gaps = [g for r in requests for g in r["gaps_s"]]
    return {
        "wall_s": wall, "requests": len(requests), "requests_per_s": len(requests) / wall,
        "output_tokens": tokens, "expected_tokens": len(requests) * max_tokens,
        "text_chunks": sum(r["chunks"] for r in requests), "tokens_per_s": tokens / wall,
        "early_stops": sum(1 for r in requests if (r["tokens"] or 0) < max_tokens),
        "finish_reasons": sorted({str(r["finish"]) for r in requests}),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "token_latency_p50_s": percentile(gaps, 50), "token_latency_p99_s": percentile(gaps, 99),
        "ttft_s": ttft,
    }


def measure(server: Server, level: int, prompts: list[list[int]], warmup: list[list[int]],
            max_tokens: int, timeout: float) -> dict[str, Any]:
    """Start `server`, warm it up, put `level` clients on it, stop it; the record (with
    "ok": False and the error when something failed; the server is stopped either way)."""
    record: dict[str, Any] = {"ok": False}
    deadline = time.perf_counter() + timeout
    try:
        record["start_s"] = server.start(timeout)
        record["pid"] = server.proc.pid
        per_client = [prompts[i::level] for i in range(level)]
        asyncio.run(run_clients(server.url, server.name, [[p] for p in warmup],
                                min(4, max_tokens), deadline - time.perf_counter()))
        wall, requests = asyncio.run(run_clients(server.url, server.name, per_client,
                                                 max_tokens, deadline - time.perf_counter()))
        record.update(ok=True, **summarize(wall, requests, max_tokens))
    except (asyncio.TimeoutError, TimeoutError):
        record["error"] = f"timed out after {timeout:.0f} s (--case-timeout)"
    except Exception as e:  # a failed server or request: recorded, the others still run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        record["error"] = f"{type(e).__name__}: {first}"
    finally:
        if server.proc is not None:
            record["pid"] = server.proc.pid
        record["exit_code"] = server.stop()
        record["server_line"] = server.line
    if record["ok"] and record["exit_code"] != 0:
        record.update(ok=False, error=f"the server exited with {record['exit_code']}: "
                                      f"{server.last_line()}")
    return record


# ---- the run -----------------------------------------------------------------------------


def server_env(threads: int | None) -> dict[str, str]:
    """The servers' environment: this one, OMP_NUM_THREADS = threads when given, and no
    SUBLLM_API_KEY (a loopback server needs none, and the clients send none)."""
    env = common.worker_env(threads)
    env.pop("SUBLLM_API_KEY", None)
    return env


def describe_models(args: argparse.Namespace, built: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[str]]:
    """({"a", "b"}: each model's report entry, warnings): B's kept fractions on prompts of
    the held-out text, and a warning when they are off its keep ratios."""
    import torch

    models, configs = built["models"], built["configs"]
    keeps = common.keep_ratios(configs["b"])
    sample = draw_prompts(built["held_out"], 8, args.prompt_len, args.seed)
    kept = prompt_kept_fractions(models["b"], torch.tensor(sample), args.device)
    warnings = [f"B's kept fractions on the prompts {common.slashed(kept)} are off its keep "
                f"ratios {common.slashed(keeps, 'g')}"] if common.off_keep(kept, keeps) else []
    summaries = {k: common.model_summary(built["specs"][k], configs[k], models[k].num_params())
                 for k in "ab"}
    summaries["b"].update(state=built["b_state"], prompt_kept_fractions=kept)
    return summaries, warnings


def measure_levels(args: argparse.Namespace, dirs: dict[str, Path], levels: list[int],
                   schedules: list[str], held_out: Any, env: dict[str, str]
                   ) -> list[dict[str, Any]]:
    """One case per (schedule, concurrency): A's and B's servers measured in turn, the
    order alternating from level to level, on the same prompts."""
    cases = []
    for schedule in schedules:
        for i, level in enumerate(levels):
            prompts = draw_prompts(held_out, level * args.requests_per_client,
                                   args.prompt_len, args.seed + 1000 + level)
            warmup = draw_prompts(held_out, level, args.prompt_len, args.seed + 2000 + level)
            order = list(common.alternating(["a", "b"], i))
            case: dict[str, Any] = {"schedule": schedule, "concurrency": level, "order": order}
            for key in order:
                server = Server(dirs[key], key, schedule, max(levels), args, env)
                case[key] = measure(server, level, prompts, warmup, args.max_tokens,
                                    args.case_timeout)
            case["ratios"] = common.ratios(case["b"], case["a"], {
                "tokens_per_s": "tokens_per_s", "requests_per_s": "requests_per_s",
                "ttft_p50": "ttft_p50_s", "token_latency_p50": "token_latency_p50_s"})
            print_case(case)
            cases.append(case)
    add_speedups(cases)
    return cases


def run(args: argparse.Namespace) -> int:
    import torch

    levels, schedules = check_args(args)
    threads = args.threads or torch.get_num_threads()  # the servers' too: the same env
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    built = build_models(args, args.prompt_len + args.max_tokens)
    summaries, warnings = describe_models(args, built)
    env = server_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="subllm-bench-serve-") as tmp:
        dirs = {k: Path(tmp) / k for k in "ab"}
        for k in "ab":
            summaries[k]["eot_id"] = save_served(built["models"][k], dirs[k])
        del built["models"]  # the servers load their own copies
        cases = measure_levels(args, dirs, levels, schedules, built["held_out"], env)
    failed = [f"{c['schedule']} C={c['concurrency']} {k}: {c[k]['error']}"
              for c in cases for k in "ab" if not c[k]["ok"]]
    report = {**common.report_head("serve", args.device, threads),
              "a": summaries["a"], "b": summaries["b"], "pair": args.pair,
              "schedules": schedules, "concurrency": levels,
              "requests_per_client": args.requests_per_client, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "server_dtype": args.server_dtype,
              "server_threads": threads, "omp_num_threads": env.get("OMP_NUM_THREADS"),
              "prompt_source": "bytes of the Python standard library (held-out 10 %)",
              "keep_ratios": common.keep_ratios(built["configs"]["b"]),
              "kept_tolerance": common.KEPT_TOLERANCE, "calibration": built["calibration"],
              "warnings": warnings, "errors": failed, "cases": cases}
    for line in warnings + failed:
        print(f"WARNING: {line}", flush=True)
    common.write_outputs(out, "serve", report, render_markdown(report), plot)
    return 1 if failed else 0


def add_speedups(cases: list[dict[str, Any]]) -> None:
    """Each model's tokens/s at each level over its tokens/s at the lowest level measured
    with the same schedule (`speedup`)."""
    for schedule in {c["schedule"] for c in cases}:
        mine = sorted((c for c in cases if c["schedule"] == schedule),
                      key=lambda c: c["concurrency"])
        for key in "ab":
            base = mine[0][key].get("tokens_per_s")
            for c in mine:
                c[key]["speedup"] = common.ratio(c[key].get("tokens_per_s"), base)


def print_case(c: dict[str, Any]) -> None:
    def side(m: dict[str, Any]) -> str:
        if not m["ok"]:
            return f"FAILED ({m['error']})"
        return (f"{m['tokens_per_s']:.1f} tok/s, TTFT p50 {1e3 * m['ttft_p50_s']:.0f} ms, "
                f"token p50 {ms(m['token_latency_p50_s'])} ms")

    print(f"  {c['schedule']:<10} C={c['concurrency']:<4} A {side(c['a'])} | B {side(c['b'])}"
          f" | tok/s B/A {common.fmt(c['ratios']['tokens_per_s'])}", flush=True)


# ---- outputs -----------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def p50_p99(key: str, what: str) -> Col:
    """A column 'p50 / p99' in milliseconds of model `key`'s `what` (ttft, token_latency)."""
    return Col(f"{key.upper()} {what.replace('_', ' ')} p50/p99 ms",
               lambda c: c[key], lambda m: f"{ms(m.get(f'{what}_p50_s'))} / "
                                           f"{ms(m.get(f'{what}_p99_s'))}")


COLUMNS = [
    Col("schedule", "schedule", align="l"), Col("C", "concurrency"),
    Col("A tok/s", "a.tokens_per_s", "{:.1f}"), Col("B tok/s", "b.tokens_per_s", "{:.1f}"),
    Col("tok/s B/A", "ratios.tokens_per_s", "**{:.3f}**"),
    Col("A req/s", "a.requests_per_s", "{:.2f}"), Col("B req/s", "b.requests_per_s", "{:.2f}"),
    p50_p99("a", "ttft"), p50_p99("b", "ttft"),
    p50_p99("a", "token_latency"), p50_p99("b", "token_latency"),
    Col("A speed-up", "a.speedup", "{:.2f}x"), Col("B speed-up", "b.speedup", "{:.2f}x"),
    Col("early stops A/B", lambda c: f"{c['a'].get('early_stops', '-')}/"
                                     f"{c['b'].get('early_stops', '-')}"),
]


def render_markdown(report: dict[str, Any]) -> str:
    cal, slashed = report["calibration"], common.slashed
    title = (f"subllm bench serve — A = {report['a']['spec']}, B = {report['b']['spec']}")
    lines = common.markdown_head(title, report, "torch threads per server")
    for w in report["warnings"] + report["errors"]:
        lines += [f"**WARNING: {w}**", ""]
    lines += [
        "Each model behind its own `subllm serve` subprocess (started per level, A and B "
        "alternating, warmed up), batch up to the largest concurrency; C streaming clients "
        f"(openai AsyncOpenAI) each send {report['requests_per_client']} requests back to "
        f"back: {report['prompt_len']}-token prompts of {report['prompt_source']}, "
        f"{report['max_tokens']} greedy tokens each. tok/s = completion tokens (usage) / wall "
        "time; TTFT = request sent to first streamed chunk; token latency = time between two "
        "streamed tokens; speed-up = tok/s at C / tok/s at the lowest C; ratios are B / A.",
        f"B: {report['b']['state']}"
        + (f", {cal['steps']} calibration steps (seq {cal['seq_len']} x batch "
           f"{cal['batch_size']}, lr {cal['lr']:g}); final eval kept fractions "
           f"{slashed(cal['final_eval_kept_fractions'])}" if cal else "")
        + f"; kept fractions on the prompts {slashed(report['b']['prompt_kept_fractions']) or '-'}"
        f" (keep {slashed(report['keep_ratios'], 'g') or '-'}).",
        "",
        *common.columns(COLUMNS, report["cases"]),
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Output tokens/s against concurrency: A and B, one line per schedule."""
    fig, ax = common.pyplot().subplots(figsize=(6.5, 4.2))
    several = len(report["schedules"]) > 1
    for key, style in (("a", "--"), ("b", "-")):
        for schedule in report["schedules"]:
            pts = [(c["concurrency"], c[key]["tokens_per_s"]) for c in report["cases"]
                   if c["schedule"] == schedule and c[key]["ok"]]
            if pts:
                label = f"{key.upper()} {report[key]['spec']}" + (f", {schedule}"
                                                                   if several else "")
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    common.save_axes(ax, path, "concurrent clients", "output tokens/s",
                     f"serve: tokens/s — {report['device']}", legend={"fontsize": 8})

