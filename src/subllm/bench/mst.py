"""`subllm bench mst`: training-step time and peak memory, standard vs checkpointing vs MsT.

A step is one forward + backward with labels (no optimizer). Every (mode, sequence length)
case runs in a fresh Python subprocess, so that its peak memory is its own: on a GPU
`torch.cuda.max_memory_allocated`, on a CPU the process's peak resident set (VmHWM),
reported beside the resident set right after the model was built. Modes:

  standard       the model as built, no activation checkpointing
  checkpointing  block-level activation checkpointing (non-reentrant)
  mst            subllm.model.mst.apply_mst: mini-sequence MLP + chunked LM-head loss
                 + checkpointing; --loss-chunk-tokens N adds `mst@N`, its loss in chunks
                 of about N tokens

--peers (Hugging Face models only) adds rows patched as for `mst` but with another
library's loss: native (torch's F.linear_cross_entropy, PyTorch >= 2.13), cce (Cut
Cross-Entropy), liger (Liger-Kernel, CUDA only), mini-s (the MsT authors' code, not on the
package registry); one that cannot run is a row saying why. The error columns compare one
step at --exact-len tokens with the unpatched model's. --memory-budget also searches the
longest sequence that trains under the budget, per mode. Models: a preset, a Hugging Face
config.json, or `hf-llama:dim=256,layers=4,vocab=128256[,ffn=..,heads=..,kv_heads=..]`.
Writes mst.json, mst.md and mst_memory.png.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from subllm.bench import common
from subllm.bench.common import Col
from subllm.errors import SubLLMError
from subllm.planner import parse_memory

PEERS = ("native", "cce", "liger", "mini-s")
NOT_ON_REGISTRY = {"mini-s": "not on the package registry (published as source only; this "
                             "project does not vendor other projects' code)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="preset name, path to a Hugging Face config.json, or "
                        "hf-llama:dim=256,layers=4,vocab=128256")
    common.add_flags(p, seq_lens={"default": "1024,2048,4096"}, batch_size={}, modes={})
    p.add_argument("--memory-budget", default=None,
                   help="e.g. 8GB: also search the longest trainable sequence under it")
    p.add_argument("--memory-limit", default=None,
                   help="e.g. 10GB: stop any case whose memory passes this, as over the limit "
                        "(CPU: resident-set watchdog; GPU: per-process fraction)")
    p.add_argument("--max-search-len", type=int, default=131072,
                   help="upper end of the --memory-budget search (default 131072)")
    common.add_flags(p, "device", "dtype", steps={"default": 2}, warmup={}, case_timeout={})
    p.add_argument("--peers", default="",
                   help=f"comma-separated other libraries' losses to compare: {','.join(PEERS)} "
                        "(Hugging Face models only)")
    p.add_argument("--loss-chunk-tokens", default="",
                   help="comma-separated loss chunk sizes in tokens: also MsT with each (mst@N)")
    p.add_argument("--allocator", choices=("release", "glibc"), default="release",
                   help="CPU: release (default: MALLOC_MMAP_THRESHOLD_=131072, freed tensors "
                        "leave the resident set) or glibc's defaults")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every case this many times, alternating the order (default 1)")
    p.add_argument("--exact-len", type=int, default=2048,
                   help="tokens of the exactness check against the unpatched model (default "
                        "2048, at most the shortest --seq-lens; 0: none)")
    common.add_out_argument(p, "mst")


# ---- the peers' losses ---------------------------------------------------------------


def peer_unavailable(name: str, device: str, model_kind: str) -> str | None:
    """Why a peer cannot run, when that is known without importing anything; else None."""
    if model_kind == "preset":
        return "peers run on Hugging Face models (--model hf-llama:... or a config.json)"
    if name == "liger" and device != "cuda":
        return ("Liger-Kernel's fused linear cross-entropy is a Triton kernel for CUDA GPUs; "
                "it does not run on a CPU")
    return NOT_ON_REGISTRY.get(name)


class PeerUnavailable(Exception):
    """A peer library that is missing or cannot run on this device (the reason)."""


def _import_peer(module: str, package: str) -> Any:
    """A peer's library; PeerUnavailable saying why it does not import and what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or its Triton dependency failing to load
        first = str(e).splitlines()[0] if str(e) else ""
        raise PeerUnavailable(f"{module.split('.')[0]} does not import ({type(e).__name__}: "
                              f"{first}); pip install {package}") from None


def peer_loss(name: str, device: str, dtype: str) -> Any:
    """The peer's loss as fn(hidden (B, L, d), weight (V, d), labels (B, L)) -> scalar, with
    Hugging Face's convention (labels aligned with the inputs, shifted inside, -100
    ignored, mean over the targets). Raises PeerUnavailable saying why it cannot run."""
    import torch
    import torch.nn.functional as F

    reason = peer_unavailable(name, device, "hf-spec")
    if reason:
        raise PeerUnavailable(reason)

    def flat(hidden: Any, labels: Any) -> tuple[Any, Any]:
        return hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)

    if name == "native":
        if not (hasattr(F, "linear_cross_entropy")
                and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            raise PeerUnavailable(f"torch {torch.__version__} has no "
                                  "F.linear_cross_entropy (PyTorch >= 2.13)")
        options = torch.nn.LinearCrossEntropyOptions()

        def native(hidden: Any, weight: Any, labels: Any) -> Any:
            h, y = flat(hidden, labels)
            return F.linear_cross_entropy(h, weight, y, ignore_index=-100, options=options)

        return native
    if name == "cce":
        cce = _import_peer("cut_cross_entropy", "cut-cross-entropy")
        # its Triton kernel needs a CUDA GPU; elsewhere its own torch.compile path
        impl = "cce" if device == "cuda" else "torch_compile"

        def cut(hidden: Any, weight: Any, labels: Any) -> Any:
            if dtype != "fp32":  # the kernel takes one low-precision dtype for both
                hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
            return cce.linear_cross_entropy(hidden, weight, labels, shift=True, impl=impl)

        cut.impl = impl  # type: ignore[attr-defined]
        return cut
    if name == "liger":
        liger = _import_peer("liger_kernel.transformers.functional", "liger-kernel")

        def fused(hidden: Any, weight: Any, labels: Any) -> Any:
            h, y = flat(hidden, labels)
            return liger.liger_fused_linear_cross_entropy(h, weight, y, ignore_index=-100)

        return fused
    raise PeerUnavailable(f"unknown peer {name!r}")


# ---- one case, in its own process ----------------------------------------------------


def _step(model: Any, ids: Any, loss_fn: Any, device: str, dtype: str) -> Any:
    """One forward with labels + backward; returns the loss (detached)."""
    with common.autocast(device, dtype):
        if loss_fn is None:  # the model's own loss (standard, checkpointing, mst)
            loss = model(input_ids=ids, labels=ids).loss
        else:  # a peer: the patched body (no KV cache, as MsT trains), then the peer's loss
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, d)
            loss = loss_fn(hidden, model.get_output_embeddings().weight, ids)
    loss.backward()
    return loss.detach()


def _exact_step(model: Any, case: dict[str, Any], loss_fn: Any) -> Any:
    """One step (_step) at the exactness length, on the same seeded tokens in every case."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (case["batch_size"], case["exact_len"]),
                        generator=gen).to(case["device"])
    return _step(model, ids, loss_fn, case["device"], case["dtype"])


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """In the worker: build the model, run warm-up + timed steps, then (with `exact_file`)
    one step at the exactness length."""
    import torch

    device, mode = case["device"], case["mode"]
    budget = case.get("budget") or case.get("memory_limit")
    if device == "cpu":
        common.watch_memory(budget)
    seq_len, batch = case["seq_len"], case["batch_size"]
    loss_fn, note = None, ""
    if mode in PEERS:
        try:
            loss_fn = peer_loss(mode, device, case["dtype"])
        except PeerUnavailable as e:
            return {"ok": False, "unavailable": True, "error": f"not available: {e}"}
        note = f"impl={loss_fn.impl}" if hasattr(loss_fn, "impl") else ""
    torch.manual_seed(0)
    # every case builds at the run's longest length, so that all hold the same weights
    model = common.build_model(case["model"], case["build_len"], device).to(device).train()
    if mode == "reference":  # the unpatched model at the exactness length: save its grads
        return _reference(model, case)
    if mode.startswith("mst@"):  # MsT with a given loss chunk size (tokens)
        from subllm.model.mst import apply_mst

        per_chunk = int(mode[len("mst@"):])
        apply_mst(model, loss_chunks=max(1, -(-batch * seq_len // per_chunk)))
        note = f"loss chunks of {per_chunk} tokens"
    else:
        common.apply_mode(model, mst=mode == "mst" or loss_fn is not None,
                          checkpointing=mode != "standard")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if device == "cuda" and budget:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    # on a CPU the peak resident set so far: the model built, nothing run
    baseline = common.memory_now(device) if device == "cuda" else common.peak_rss_bytes()
    common.reset_peak(device)

    # not subllm.train.loop.train_step: no optimizer, so that the modes differ in activations
    def step() -> float:
        out = _step(model, ids, loss_fn, device, case["dtype"])
        model.zero_grad(set_to_none=True)
        return float(out)

    times, loss = [], float("nan")
    for i in range(case["warmup"] + case["steps"]):
        seconds, loss = common.timed(device, step)
        if i >= case["warmup"]:
            times.append(seconds)
    result = {"ok": True, "loss": loss, "time_per_step_s": sum(times) / len(times),
              "step_times_s": times, "peak_mem_bytes": common.memory_peak(device),
              "baseline_mem_bytes": baseline, "note": note,
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if case.get("exact_file"):
        result.update(_exactness(model, case, loss_fn))
    return result


def _reference(model: Any, case: dict[str, Any]) -> dict[str, Any]:
    """The unpatched model's loss and gradients at the exactness length, to a file."""
    from safetensors.torch import save_file

    loss = _exact_step(model, case, None)
    grads = {n: p.grad.detach().float().cpu().contiguous()
             for n, p in model.named_parameters() if p.grad is not None}
    grads["__loss__"] = loss.float().cpu().reshape(1)
    save_file(grads, case["exact_file"])
    return {"ok": True, "loss": float(loss)}


def _exactness(model: Any, case: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
    """Loss and gradient errors of one step at the exactness length vs the reference: the
    relative error of the loss, the largest relative L2 error of a parameter's gradient."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(case["exact_file"])
    loss = _exact_step(model, case, loss_fn)
    ref_loss = ref.pop("__loss__").double()
    worst, worst_name = 0.0, ""
    for n, p in model.named_parameters():
        if n not in ref:
            continue
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().cpu()
        r = ref[n].double()
        err = float((g - r).norm() / r.norm().clamp_min(1e-30))
        if err > worst:
            worst, worst_name = err, n
    model.zero_grad(set_to_none=True)
    return {"loss_rel_error": float(abs(loss.double().cpu() - ref_loss) / ref_loss.abs()),
            "grad_rel_error": worst, "grad_worst_param": worst_name}


def measure(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result (never raises)."""
    release = case["device"] == "cpu" and case["allocator"] == "release"
    return {**case, **common.run_worker("subllm.bench.mst", case, timeout,
                                        common.worker_env(release=release))}


# ---- outputs -------------------------------------------------------------------------

COLUMNS = [
    Col("mode", "mode", align="l"), Col("seq len", "seq_len"),
    Col("time/step (s)", lambda c: c["time_per_step_s"] if c["ok"] else None, "{:.3f}"),
    Col("peak mem (GiB)", "peak_mem_bytes", common.fmt_gib),
    Col("after build (GiB)", "baseline_mem_bytes", common.fmt_gib),
    Col("mem / standard", "vs_standard.memory", "{:.3f}"),
    Col("time / standard", "vs_standard.time", "{:.3f}"),
    Col("mem / mst", "vs_mst.memory", "{:.3f}"), Col("time / mst", "vs_mst.time", "{:.3f}"),
    Col("loss err", "loss_rel_error", "{:.1e}"), Col("grad err", "grad_rel_error", "{:.1e}"),
    Col("note", lambda c: c.get("note", "") if c["ok"] else c.get("error", "failed"), align="l"),
]


def render_markdown(report: dict[str, Any]) -> str:
    exact = report.get("exact_len")
    rows = [{**c, **{f"vs_{base}": report.get(key, {}).get(c["mode"], {}).get(str(c["seq_len"]))
                     for base, key in (("standard", "ratios"), ("mst", "ratios_vs_mst"))}}
            for c in report["cases"]]
    memory = ("torch.cuda.max_memory_allocated" if report["device"] == "cuda"
              else "peak resident set of the case's process (VmHWM), "
              + ("MALLOC_MMAP_THRESHOLD_=131072 (freed tensors handed back)"
                 if report.get("allocator") == "release" else "glibc's default malloc"))
    lines = [
        f"# subllm bench mst — {report['model']}",
        "",
        common.machine_line(report) + f" Batch {report['batch_size']}, {report.get('rounds', 1)} "
        f"round(s). Peak memory: {memory}; ratios are against `standard` and against `mst` at "
        "the same length"
        + (f"; errors: one step at {exact} tokens against the unpatched model (loss: relative "
           "error; grad: the largest relative L2 error over the parameters)." if exact
           else "."),
        "",
        *common.columns(COLUMNS, rows),
    ]
    budget = report.get("budget")
    if budget:
        base = budget["longest"].get("standard")
        lines += ["", f"Longest trainable sequence under {common.fmt_gib(budget['bytes'])} GiB "
                      f"(multiples of {common.GRANULE}, searched up to {budget['max_len']}):",
                  "", *common.table("mode | longest seq len | x standard", "lrr",
                                    [[mode, n, f"{n / base:.1f}" if base else "-"]
                                     for mode, n in budget["longest"].items()])]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    fig, ax = common.pyplot().subplots(figsize=(6.5, 4.2))
    for mode in report["modes"] + report.get("variants", []) + report.get("peers", []):
        pts = sorted((c["seq_len"], c["peak_mem_bytes"] / 2**30) for c in report["cases"]
                     if c["mode"] == mode and c["ok"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
    if report.get("budget"):
        ax.axhline(report["budget"]["bytes"] / 2**30, color="grey", ls="--", label="budget")
    ax.set_xscale("log", base=2)
    common.save_axes(ax, path, "sequence length (tokens)", "peak memory (GiB)",
                     f"{report['model']} — {report['device']}, {report['dtype']}")


def _ratios(cases: list[dict[str, Any]], base: str = "standard",
            ) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {seq_len: {"memory": x, "time": y}}}, each against mode `base` at that length."""
    std = {c["seq_len"]: c for c in cases if c["mode"] == base and c["ok"]}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for c in cases:
        s = std.get(c["seq_len"])
        if c["ok"] and s:
            out.setdefault(c["mode"], {})[str(c["seq_len"])] = {
                "memory": c["peak_mem_bytes"] / s["peak_mem_bytes"],
                "time": c["time_per_step_s"] / s["time_per_step_s"],
            }
    return out


# ---- the verb ------------------------------------------------------------------------


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's rounds -> one row: median time and peak over the rounds that ran."""
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return runs[0]
    row = dict(ok[0])
    row["time_per_step_s"] = median([r["time_per_step_s"] for r in ok])
    row["peak_mem_bytes"] = int(median([r["peak_mem_bytes"] for r in ok]))
    row["rounds"] = [{k: r.get(k) for k in ("time_per_step_s", "peak_mem_bytes", "ok",
                                            "error")} for r in runs]
    return row


def _budget_search(args: argparse.Namespace, base: dict[str, Any], modes: list[str],
                   budget: int) -> dict[str, Any]:
    """Per mode, the longest sequence whose training step fits under `budget` bytes."""
    longest, probes = {}, {}
    for mode in modes:
        def fits(n: int, mode: str = mode) -> bool:
            r = measure({**base, "mode": mode, "seq_len": n, "steps": 1, "warmup": 0,
                         "budget": budget}, args.case_timeout)
            ok = r["ok"] and r["peak_mem_bytes"] <= budget
            print(f"  budget {mode:>13} L={n:<7} {'fits' if ok else 'does not fit'}", flush=True)
            return ok

        longest[mode], probes[mode] = common.longest_under_budget(
            fits, args.max_search_len // common.GRANULE * common.GRANULE)
    return {"bytes": budget, "max_len": args.max_search_len, "longest": longest,
            "probes": probes}


def _reference_run(args: argparse.Namespace, base: dict[str, Any], exact_len: int,
                   tmp: str) -> dict[str, Any]:
    """Run the reference case; the exactness fields every case then gets ({} if it failed)."""
    ref_file = str(Path(tmp) / "reference.safetensors")
    ref = measure({**base, "mode": "reference", "seq_len": exact_len, "exact_len": exact_len,
                   "exact_file": ref_file}, args.case_timeout)
    print(f"  reference L={exact_len:<7} " + (
        f"loss {ref['loss']:.4f}" if ref["ok"] else f"failed: {ref['error']}"), flush=True)
    return {"exact_len": exact_len, "exact_file": ref_file} if ref["ok"] else {}


def run(args: argparse.Namespace) -> int:
    lengths = common.parse_ints(args.seq_lens, "--seq-lens", minimum=2)
    modes = common.parse_names(args.modes, "--modes", common.MODES)
    peers = common.parse_names(args.peers, "--peers", PEERS, empty=True)
    variants = ([f"mst@{n}" for n in common.parse_ints(args.loss_chunk_tokens,
                                                         "--loss-chunk-tokens", minimum=1)]
                if str(args.loss_chunk_tokens).strip() else [])
    budget, limit = (None if text is None else parse_memory(text, flag) for text, flag in
                     ((args.memory_budget, "--memory-budget"),
                      (args.memory_limit, "--memory-limit")))
    common.require_positive(args, "batch_size", "steps", "max_search_len", "rounds",
                            "case_timeout")
    common.require_positive(args, "warmup", minimum=0)
    if args.exact_len < 0 or args.exact_len == 1:
        raise SubLLMError("--exact-len must be 0 (no check) or at least 2")
    model_kind = common.check_model(args.model)
    common.check_cuda(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = {"model": args.model, "device": args.device, "dtype": args.dtype,
            "batch_size": args.batch_size, "build_len": max(lengths)}
    if args.device == "cpu":
        base["allocator"] = args.allocator
    if limit is not None:
        base["memory_limit"] = limit
    exact_len = min(args.exact_len, min(lengths))
    names = modes + variants + peers
    with tempfile.TemporaryDirectory(prefix="subllm-mst-exact-") as tmp:
        exact = _reference_run(args, base, exact_len, tmp) if exact_len else {}
        unavailable: dict[tuple[str, int], dict[str, Any]] = {}

        def measure_case(key: tuple[str, int], _: int) -> dict[str, Any]:
            if key in unavailable:
                return unavailable[key]  # a missing peer is reported once
            mode, n = key
            case = {**base, "mode": mode, "seq_len": n, "steps": args.steps,
                    "warmup": args.warmup, **exact}
            reason = peer_unavailable(mode, args.device, model_kind) if mode in PEERS else None
            r = ({**case, "ok": False, "unavailable": True, "error": f"not available: {reason}"}
                 if reason else measure(case, args.case_timeout))
            r.pop("exact_file", None)
            print(f"  {mode:>13} L={n:<7} " + (
                f"{r['time_per_step_s']:.3f} s/step  peak {common.fmt_gib(r['peak_mem_bytes'])} GiB"
                if r["ok"] else f"{r['error']}"), flush=True)
            if r.get("unavailable"):
                unavailable[key] = r
            return r

        runs = common.alternate([(mode, n) for n in lengths for mode in names], args.rounds,
                                measure_case)
    cases = [_merge(runs[(mode, n)]) for n in lengths for mode in names]

    report: dict[str, Any] = {**base, **common.report_head("mst", args.device),
                              "modes": modes, "variants": variants, "peers": peers,
                              "seq_lens": lengths, "rounds": args.rounds,
                              "exact_len": exact_len if exact else None, "cases": cases,
                              "ratios": _ratios(cases),
                              "ratios_vs_checkpointing": _ratios(cases, "checkpointing"),
                              "ratios_vs_mst": _ratios(cases, "mst")}
    if budget is not None:
        report["budget"] = _budget_search(args, base, modes, budget)
    common.write_outputs(out, "mst", report, render_markdown(report), render_plot,
                         "mst_memory.png")
    return 0


if __name__ == "__main__":
    common.worker_entry(run_case, "mst")
