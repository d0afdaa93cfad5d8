"""Evaluation: validation loss and kept fractions, and text samples from a model.

`evaluate` is what the training loop runs at every validation point; `evaluate_checkpoint`
is `subllm eval`; `sample_text` / `TextStream` serve the demo's sample and `subllm generate`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from subllm.errors import SubLLMError
from subllm.interop.tokenizer import same_vocab, sha256_file
from subllm.model.subllm import document_ids, longer_context
from subllm.model.subsample import selection_rule
from subllm.train.data import load_data, val_batches
from subllm.train.load import load_any
from subllm.train.runtime import (
    Dist,
    accumulator_dtype,
    autocast,
    autocast_dtype,
    pick_device,
    read_sums,
)


class TextStream:
    """Streams decoded text as token ids arrive (a `streamer` for `model.generate`).

    Byte-level BPE tokens can end inside a multi-byte character; text is held back while
    the decoded tail is an incomplete character (U+FFFD) and flushed at the end.
    """

    def __init__(self, tokenizer: Any, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = 0
        self.text = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        self.text = text
        if self.out is not None and len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
        self.printed = max(self.printed, len(text))


@torch.no_grad()
def sample_text(model: torch.nn.Module, tokenizer_path: str | Path, prompt: str,
                max_new_tokens: int = 100, device: torch.device | str = "cpu",
                temperature: float = 0.8, top_k: int | None = 50, seed: int = 0,
                out: TextIO | None = None) -> str:
    """Continue `prompt`; returns the new text (and streams it to `out` when given). The
    prompt is encoded, and generation stops, as `subllm generate` does (the tokenizer's
    template, a BOS first where it adds one; its end-of-text token)."""
    from subllm.interop.tokenizer import text_pipeline

    ctx = model.config.max_seq_len
    tokenizer, stop, ids = text_pipeline(Path(tokenizer_path).parent, tokenizer_path, prompt,
                                         ctx)
    max_new_tokens = min(max_new_tokens, ctx - len(ids))
    stream = TextStream(tokenizer, out)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k,
                   eos_token_id=stop, streamer=stream, generator=generator)
    return stream.text


@torch.no_grad()
def packed(x: torch.Tensor, eot_id: int | None, host: torch.Tensor | None = None
           ) -> dict[str, Any]:
    """The forward's `document_ids` for rows packed from documents that each end with
    `eot_id` (design.md §3.10); nothing for eot_id None (plain windows). `host`: the same
    rows on the CPU, where their documents are counted for the forward's `max_documents`
    (training then sizes its selections without a device sync)."""
    if eot_id is None:
        return {}
    out: dict[str, Any] = {"document_ids": document_ids(x, eot_id)}
    if host is not None and host.device.type == "cpu" and host.shape[1] > 1:
        out["max_documents"] = int((host[:, :-1] == eot_id).sum(1).max()) + 1
    return out


def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
             amp: torch.dtype | None, dd: Dist, both_modes: bool = True,
             progress: bool = False, eot_id: int | None = None) -> dict[str, Any]:
    """Mean next-token loss over the batches in eval mode, with inference's selection (the
    threshold) and, for a SUBLLM and `both_modes`, again with training's (top-k) on the same
    batches: `loss` / `kept_fractions` are inference's, `top_k_loss` /
    `top_k_kept_fractions` training's, `gap` = loss / top_k_loss - 1 (design.md §3.8).

    Rank r evaluates the r-th slice of the rows of every batch, so the result does not
    depend on the number of ranks; a rank whose slice is empty runs one row with weight 0,
    so every rank makes the same forward calls (FSDP gathers weights in each). The sums
    stay on the device (fp64) and are read once, at the end. `progress`: a bar of the
    batches on stderr (`subllm eval`), gone when done. `eot_id`: the rows are packed
    documents, each ending with this token (a run of --packing documents).
    """
    was_training = model.training
    model.eval()
    bar = tqdm(desc="eval", unit=" batches", leave=False, file=sys.stderr) if progress else None
    try:
        with torch.random.fork_rng(devices=[]), selection_rule(model, "threshold") as subs:
            if bar is not None:
                bar.reset(total=len(batches) * (2 if subs and both_modes else 1))
            sums = _pass(model, batches, device, amp, dd, bar, eot_id)
        if subs and both_modes:
            with torch.random.fork_rng(devices=[]), selection_rule(model, "top_k"):
                sums += _pass(model, batches, device, amp, dd, bar, eot_id)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    totals = read_sums(sums, dd, device)
    m = len(subs)
    loss, tokens, kept = _summarise(totals[: 2 + 2 * m], m)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens),
              "kept_fractions": kept}
    if len(totals) > 2 + 2 * m:
        top_k_loss, _, top_k_kept = _summarise(totals[2 + 2 * m:], m)
        result.update(top_k_loss=top_k_loss, top_k_kept_fractions=top_k_kept,
                      gap=loss / top_k_loss - 1.0 if top_k_loss > 0 else 0.0)
    return result


def fmt_perplexity(loss: float) -> str:
    """The perplexity of a mean loss, for people: two decimals, or past a million (a model
    that has blown up) three significant digits; "inf" past what a float holds (the
    `perplexity` of a result stops at exp(700), so JSON stays valid), never 300 digits."""
    perplexity = math.inf if loss >= 709.0 else math.exp(loss)
    return f"{perplexity:.2f}" if perplexity < 1e6 else f"{perplexity:.3g}"


def _pass(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
          amp: torch.dtype | None, dd: Dist, bar: tqdm | None = None,
          eot_id: int | None = None) -> list[torch.Tensor]:
    """[loss sum, tokens, kept sums..., entered sums...] of this rank's rows, on the device."""
    loss_sum = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    tokens = torch.zeros_like(loss_sum)
    kept_sum: list[torch.Tensor] = []
    entered_sum: list[torch.Tensor] = []
    for batch in batches:
        rows = batch.tensor_split(dd.world_size)[dd.rank]
        weight = 1.0 if len(rows) else 0.0
        x = (rows if len(rows) else batch[:1]).to(device)
        with autocast(device, amp):
            out = model(x, labels=x, **packed(x, eot_id, rows if len(rows) else batch[:1]))
        n = x.shape[0] * (x.shape[1] - 1)
        loss_sum = loss_sum + out.loss.to(loss_sum.dtype) * weight * n
        tokens = tokens + weight * n
        if not kept_sum:
            kept_sum = [torch.zeros_like(loss_sum) for _ in out.kept]
            entered_sum = [torch.zeros_like(loss_sum) for _ in out.kept]
        for k, (kept, entered) in enumerate(zip(out.kept, out.entered, strict=True)):
            kept_sum[k] = kept_sum[k] + kept.sum().to(loss_sum.dtype) * weight
            entered_sum[k] = entered_sum[k] + entered.sum().to(loss_sum.dtype) * weight
        if bar is not None:
            bar.update(1)
    return [loss_sum, tokens, *kept_sum, *entered_sum]


def _summarise(totals: list[float], m: int) -> tuple[float, float, list[float]]:
    loss_sum, tokens = totals[0], totals[1]
    kept = [k / max(e, 1.0) for k, e in zip(totals[2 : 2 + m], totals[2 + m :], strict=True)]
    return loss_sum / max(tokens, 1.0), tokens, kept


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path | None = None,
                        batches: int = 50, batch_size: int | None = None,
                        seq_len: int | None = None, device: str = "auto",
                        dtype: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Validation loss, perplexity, tokens and kept fractions of a checkpoint, with
    inference's selection and (a SUBLLM) with training's, and the gap between them.
    `progress`: a progress bar of the batches on stderr."""
    dev = pick_device(device, Dist())
    model, tokenizer_path, run, step = load_any(checkpoint, dev)
    path = tokenizer_path.parent
    data = load_data(data_dir if data_dir is not None else run.get("data", "data/default"))
    if data.meta["tokenizer_sha256"] != sha256_file(tokenizer_path) and not same_vocab(
            data.path / "tokenizer.json", tokenizer_path):  # an export rewrites the file
        raise SubLLMError(
            f"{data.path} was tokenized with a different tokenizer than {path}; pass the "
            "--data directory the model was trained on (or one prepared with its tokenizer)"
        )
    model_cfg = model.config.to_dict()
    if data.vocab_size > model_cfg["vocab_size"]:
        raise SubLLMError(
            f"the tokenizer of {data.path} has {data.vocab_size} tokens, more than the "
            f"model's vocab_size {model_cfg['vocab_size']}; use the model's data"
        )
    seq_len = seq_len or int(run.get("seq_len", 256))
    if seq_len > model_cfg["max_seq_len"]:
        raise SubLLMError(
            f"--seq-len {seq_len} exceeds the model's context ({model_cfg['max_seq_len']}); "
            f"lower --seq-len{longer_context(model.config)}"
        )
    eval_set = val_batches(data.tokens("val"), batch_size or int(run.get("batch_size", 16)),
                           seq_len, batches)
    eot_id = data.eot_id if run.get("packing", "none") == "documents" else None
    result = evaluate(model, eval_set, dev, autocast_dtype(dtype, dev), Dist(),
                      progress=progress, eot_id=eot_id)
    out = {"checkpoint": str(path), "step": step, "data": str(data.path),
           "packing": "documents" if eot_id is not None else "none",
           "val_loss": result["loss"], "perplexity": result["perplexity"],
           "tokens": result["tokens"], "kept_fractions": result["kept_fractions"],
           "keep": model.config.keep_per_depth if model.config.is_subllm else []}
    if "top_k_loss" in result:  # a SUBLLM: the same batches with training's selection
        out.update(top_k_val_loss=result["top_k_loss"],
                   top_k_kept_fractions=result["top_k_kept_fractions"], gap=result["gap"],
                   threshold=model.config.threshold)
    return out
