"""The decoding engine behind `subllm serve`: continuous batching over one KV cache.

One thread owns the model. Between two decoding steps it lets finished or abandoned rows
leave the batch (`KVCache.select`, which also frees the slots only they held) and new
requests join it: their prompts are prefilled together, left-padded, and their cache is
stacked onto the running one (`KVCache.stack`). Every row then decodes one token per step
in one forward pass, with its own sampling settings, seed, stop strings and logprobs.
`schedule="static"` admits requests only when the batch is empty (the classic batch of
left-padded prompts); docs/benchmarks.md measures both.

Results leave through each request's `sink`, called on the engine thread with one event
dict at a time: {"type": "delta", "choice", "text", "logprobs"}, {"type": "finish",
"choice", "reason"}, then {"type": "done", "usage"} (or {"type": "error", "message"}).
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from subllm.errors import SubLLMError
from subllm.model.decode import next_token
from subllm.model.kv_cache import KVCache

Sink = Callable[[dict[str, Any]], None]


@dataclass
class Sampling:
    """One request's decoding settings (the OpenAI request fields)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and k alternatives'


@dataclass
class Request:
    """Prompts (token ids) x n choices, decoded with one Sampling."""

    prompts: list[list[int]]
    sampling: Sampling
    n: int
    sink: Sink
    cancelled: bool = False
    rows_left: int = 0
    completion_tokens: int = 0

    def cancel(self) -> None:
        """Stop decoding this request (a client went away); its rows leave at the next step."""
        self.cancelled = True


class _Row:
    """One choice being decoded: a batch row of the engine."""

    def __init__(self, request: Request, prompt: int, choice: int, device: torch.device) -> None:
        self.request, self.prompt, self.index = request, prompt, prompt * request.n + choice
        s = request.sampling
        seed = secrets.randbits(63) if s.seed is None else s.seed + choice
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text sent so far
        self.done = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompts[self.prompt])

    @property
    def left(self) -> int:
        return self.request.sampling.max_tokens - len(self.ids)


class Engine:
    """Continuous batching for one model (a SubLLM, eval mode) and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, stop_ids: Sequence[int],
                 max_batch_size: int = 8, max_seq_len: int | None = None,
                 schedule: str = "continuous") -> None:
        if schedule not in ("continuous", "static"):
            raise SubLLMError(f"schedule must be continuous or static, got {schedule!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stop_ids = set(stop_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.schedule = schedule
        self.device = next(model.parameters()).device
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._last: Tensor | None = None  # (B,) each row's newest token
        self._cond = threading.Condition()
        self._closing = False
        self.peak_rows = 0  # the most rows decoded together so far
        self._thread = threading.Thread(target=self._loop, name="subllm-engine", daemon=True)

    # ---- the API side (any thread) -------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def submit(self, prompts: list[list[int]], sampling: Sampling, n: int, sink: Sink
               ) -> Request:
        """Queue a request (checked by the caller: prompt + max_tokens fit, n rows fit)."""
        request = Request(prompts, sampling, n, sink, rows_left=len(prompts) * n)
        if request.rows_left > self.max_batch_size:
            raise SubLLMError(f"{request.rows_left} choices are more than the batch of "
                              f"{self.max_batch_size}")
        with self._cond:
            if self._closing:
                raise SubLLMError("the server is shutting down")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then stop the engine thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def busy_rows(self) -> int:
        return len(self._rows)

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._waiting or self._rows or self._closing):
                        self._cond.wait()
                    if self._closing and not (self._waiting or self._rows):
                        return
                    joining = self._admit()
                try:
                    if joining:
                        self._prefill(joining)
                    self._leave()
                    if self._rows:
                        self._step()
                        self._leave()
                except Exception as e:  # e.g. out of memory: fail this batch, keep serving
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    failed = {id(r.request): r.request for r in self._rows}
                    failed.update((id(r), r) for r in joining)
                    for request in failed.values():
                        request.rows_left = 0
                        request.sink({"type": "error", "message": f"{type(e).__name__}: {first}"})
                    self._rows, self._cache, self._last = [], None, None

    def _admit(self) -> list[Request]:
        """Requests to join the batch now (called holding the lock)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft().sink({"type": "done", "usage": None})
        if self.schedule == "static" and self._rows:
            return []
        joining: list[Request] = []
        rows = len(self._rows)
        length = self._cache.seen if self._cache is not None else 0
        need = max((r.left for r in self._rows), default=0)
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft().sink({"type": "done", "usage": None})
                continue
            n_rows = len(request.prompts) * request.n
            longest = max(len(p) for p in request.prompts)
            fits = (max(length, longest) + max(need, request.sampling.max_tokens)
                    <= self.model.config.max_seq_len)
            if rows + n_rows > self.max_batch_size or not (fits or rows == 0):
                break
            joining.append(self._waiting.popleft())
            rows += n_rows
            length = max(length, longest)
            need = max(need, request.sampling.max_tokens)
        return joining

    def _prefill(self, joining: list[Request]) -> None:
        prompts = [p for r in joining for p in r.prompts]
        L = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        out = self.model(ids.to(self.device), attention_mask=mask.to(self.device),
                         use_cache=True, logits_to_keep=1)
        rows, which, first = [], [], 0
        for r in joining:  # each prompt's row once in the prefill, n times in the batch
            for p in range(len(r.prompts)):
                for c in range(r.n):
                    rows.append(_Row(r, p, c, self.device))
                    which.append(first + p)
            first += len(r.prompts)
        which_t = torch.tensor(which, device=self.device)
        cache = out.cache
        cache.select(which_t)
        logits = out.logits[:, -1].index_select(0, which_t)
        tokens = self._choose(rows, logits)
        self._cache = cache if self._cache is None else KVCache.stack(self._cache, cache)
        self._last = tokens if self._last is None else torch.cat([self._last, tokens])
        self._rows += rows
        self.peak_rows = max(self.peak_rows, len(self._rows))

    def _step(self) -> None:
        out = self.model(self._last[:, None], cache=self._cache)
        self._last = self._choose(self._rows, out.logits[:, -1])

    def _leave(self) -> None:
        """Rows that finished or whose request was cancelled leave the batch."""
        stay = [i for i, r in enumerate(self._rows) if not (r.done or r.request.cancelled)]
        if len(stay) == len(self._rows):
            return
        for r in self._rows:
            if r.request.cancelled and not r.done:
                r.done = True
                self._finished(r, None)
        if not stay:  # nothing left: drop the cache entirely
            self._rows, self._cache, self._last = [], None, None
            return
        index = torch.tensor(stay, device=self.device)
        self._cache.select(index)
        self._last = self._last.index_select(0, index)
        self._rows = [self._rows[i] for i in stay]

    def _choose(self, rows: list[_Row], logits: Tensor) -> Tensor:
        """Each row's next token from its (B, V) logits; sends the text it adds."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        logprobs = None
        if any(r.request.sampling.logprobs is not None for r in rows):
            logprobs = logits.log_softmax(-1)
        for i, r in enumerate(rows):
            s = r.request.sampling
            if s.temperature > 0:
                tokens[i] = next_token(logits[i:i + 1], s.temperature, s.top_k, s.top_p,
                                       r.generator)[0]
        chosen = tokens.tolist()
        for i, (r, tok) in enumerate(zip(rows, chosen, strict=True)):
            info = None
            if r.request.sampling.logprobs is not None:
                info = self._logprobs(logprobs[i], tok, r.request.sampling.logprobs)
            self._advance(r, tok, info)
        return tokens

    def _logprobs(self, logp: Tensor, token: int, top: int) -> dict[str, Any]:
        alternatives = []
        if top:
            values, ids = logp.topk(top)
            alternatives = [(self._piece(j), v)
                            for j, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return {"token": self._piece(token), "logprob": float(logp[token]),
                "top": alternatives}

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _advance(self, r: _Row, token: int, logprobs: dict[str, Any] | None) -> None:
        """Take one new token of a row: send the text it completes, see whether it stops."""
        r.ids.append(token)
        r.request.completion_tokens += 1
        if token in self.stop_ids:
            return self._finish(r, "stop", r.ids[:-1], logprobs)
        reason = "length" if r.left <= 0 else None
        text = self.tokenizer.decode(r.ids)
        stop = r.request.sampling.stop
        cut = min((j for j in (text.find(s, max(0, r.sent - len(s) + 1)) for s in stop)
                   if j >= 0), default=-1)
        if cut >= 0:
            return self._send(r, text[:cut], logprobs, "stop")
        if reason is None:
            safe = len(text) - (1 if text.endswith("\ufffd") else 0)  # half a character
            # hold back a tail that may be the start of a stop string
            hold = max((k for s in stop for k in range(1, min(len(s), safe + 1))
                        if text[:safe].endswith(s[:k])), default=0)
            text = text[:max(safe - hold, r.sent)]
        self._send(r, text, logprobs, reason)

    def _finish(self, r: _Row, reason: str, ids: list[int], logprobs: Any) -> None:
        self._send(r, self.tokenizer.decode(ids), logprobs, reason)

    def _send(self, r: _Row, text: str, logprobs: Any, reason: str | None) -> None:
        delta = text[r.sent:]
        r.sent = max(r.sent, len(text))
        if delta or logprobs is not None:
            r.request.sink({"type": "delta", "choice": r.index, "text": delta,
                            "logprobs": logprobs})
        if reason is not None:
            r.done = True
            self._finished(r, reason)

    def _finished(self, r: _Row, reason: str | None) -> None:
        request = r.request
        if reason is not None:
            request.sink({"type": "finish", "choice": r.index, "reason": reason})
        request.rows_left -= 1
        if request.rows_left == 0:
            prompt = sum(len(p) for p in request.prompts)
            request.sink({"type": "done", "usage": {
                "prompt_tokens": prompt, "completion_tokens": request.completion_tokens,
                "total_tokens": prompt + request.completion_tokens}})
