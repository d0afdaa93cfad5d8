"""The OpenAI-compatible HTTP API of `subllm serve` (FastAPI), over one `Engine`.

Routes: /v1/completions, /v1/chat/completions (streamed as server-sent events with
`stream: true`), /v1/models, /health. Errors use OpenAI's shape, {"error": {"message",
"type", "param", "code"}}, with 400 (bad request), 401 (API key), 404 (model or route),
413 (body too large), 503 (shutting down). Why FastAPI + uvicorn: docs/design.md §3.9.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from subllm.errors import SubLLMError
from subllm.interop.tokenizer import encode_prompt
from subllm.serve.engine import Engine, Sampling

MAX_BODY_BYTES = 1 << 20
# request fields we do not implement: a request that sets one is refused, not half-served
UNSUPPORTED = {"echo": False, "suffix": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "tools": None, "functions": None,
               "response_format": None}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # as vLLM: -1 or 0 = off
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatFormat:
    """Messages -> prompt text: the tokenizer's chat template where the model directory
    has one (transformers' apply_chat_template), else "role: content" lines and
    "assistant:"."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.hf = None
        d = Path(checkpoint)
        if (d / "config.json").is_file() and (d / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(d))
            if getattr(tokenizer, "chat_template", None):
                self.hf = tokenizer

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """(prompt text, whether to encode it with the tokenizer's special tokens)."""
        if self.hf is not None:  # the template writes the BOS itself
            return self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True), False
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", True


def _first_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    return ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")

    def no_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, default in UNSUPPORTED.items():
        if data.get(key, default) not in (default, None):
            raise ApiError(400, f"{key} is not supported by subllm serve", param=key)
    return data


def create_app(engine: Engine, model_name: str, chat_format: ChatFormat | None = None,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving `engine` as the model `model_name`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            engine.start()
        yield
        await asyncio.to_thread(engine.close)  # after uvicorn has drained the requests

    app = FastAPI(title="subllm serve", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    ctx = engine.max_seq_len
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return ApiError(e.status_code, str(e.detail), code=code).response()

    @app.middleware("http")
    async def _authorize(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return ApiError(401, "incorrect or missing API key (send it as "
                                "`Authorization: Bearer KEY`)", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.busy_rows}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "subllm"}]}

    async def parse(request: Request, schema: type[_Common]) -> Any:
        """The request body, checked against `schema` and for the model it names."""
        try:
            req = schema.model_validate(await _read_json(request, max_body_bytes))
        except ValidationError as e:
            raise _first_error(e) from None
        if req.model not in (None, "", model_name):
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return req

    def sampling(req: _Common, prompts: list[list[int]], max_tokens: int | None,
                 default: int | None, logprobs: int | None) -> Sampling:
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise ApiError(400, f"the prompt has {longest} tokens; this model's context is "
                           f"{ctx} tokens and the reply needs at least one", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default or ctx, ctx - longest)
        if longest + max_tokens > ctx:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; you "
                           f"requested {longest + max_tokens} ({longest} in the prompt, "
                           f"{max_tokens} in the completion): lower max_tokens to at most "
                           f"{ctx - longest}", param="max_tokens",
                           code="context_length_exceeded")
        rows = req.n * len(prompts)
        if rows > engine.max_batch_size:
            raise ApiError(400, f"n x prompts = {rows} choices, more than this server's batch "
                           f"of {engine.max_batch_size} (--max-batch-size)", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "stop takes at most 4 sequences", param="stop")
        return Sampling(max_tokens, req.temperature, req.top_p if req.top_p < 1 else None,
                        req.top_k if req.top_k and req.top_k > 0 else None,
                        [s for s in stop if s], req.seed, logprobs)

    def encode(text: str, special: bool = True) -> list[int]:
        try:
            return encode_prompt(engine.tokenizer, text, sorted(engine.stop_ids), 1 << 62,
                                 add_special_tokens=special)
        except SubLLMError as e:
            raise ApiError(400, str(e), param="prompt") from None

    async def run(request: Request, req: _Common, prompts: list[list[int]], s: Sampling,
                  chat: bool) -> Any:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(event: dict[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening
                pass

        try:
            job = engine.submit(prompts, s, req.n, sink)
        except SubLLMError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(queue, job, head, chat, len(prompts) * req.n,
                                             usage), media_type="text/event-stream")
        choices = [{"index": i, "text": "", "lp": [], "finish_reason": None}
                   for i in range(len(prompts) * req.n)]
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return None
                    continue
                if event["type"] == "error":
                    raise ApiError(500, event["message"], kind="server_error")
                if event["type"] == "done":
                    break
                c = choices[event["choice"]]
                if event["type"] == "delta":
                    c["text"] += event["text"]
                    if event["logprobs"] is not None:
                        c["lp"].append(event["logprobs"])
                else:
                    c["finish_reason"] = event["reason"]
        finally:
            job.cancel()  # a no-op once it is done; frees its rows when the handler fails
        out = [_choice(c["index"], c["text"], c["lp"] if s.logprobs is not None else None,
                       c["finish_reason"], chat) for c in choices]
        return {**head, "choices": out, "usage": event["usage"]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, str):
            prompts = [encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [encode(x) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, list) and x for x in p):
            prompts = [list(x) for x in p]
        else:
            raise ApiError(400, "prompt must be a string, a list of strings or token ids",
                           param="prompt")
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for q in prompts for t in q):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        s = sampling(req, prompts, req.max_tokens, 16, req.logprobs)
        return await run(request, req, prompts, s, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = await parse(request, ChatRequest)
        messages = []
        for m in req.messages:
            content = m.content or ""
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise ApiError(400, "only text content parts are supported",
                                   param="messages")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": m.role, "content": content})
        text, special = (chat_format or ChatFormat(""))(messages)
        prompts = [encode(text, special)]
        top = (req.top_logprobs or 0) if req.logprobs else None
        s = sampling(req, prompts, req.max_completion_tokens or req.max_tokens, None, top)
        return await run(request, req, prompts, s, chat=True)

    return app


def _logprobs(entries: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": [{
            "token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                             for t, v in e["top"]]} for e in entries]}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def _choice(index: int, text: str, lp: list | None, finish: str | None, chat: bool,
            delta: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index}
    if chat:
        out["delta" if delta else "message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    out["logprobs"] = _logprobs(lp, chat) if lp is not None else None
    out["finish_reason"] = finish
    return out


async def _stream(queue: asyncio.Queue, job: Any, head: dict[str, Any], chat: bool,
                  n_choices: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta and per finish, then usage, then [DONE]."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}
    try:
        while True:
            event = await queue.get()
            if event["type"] == "error":
                error = {"message": event["message"], "type": "server_error", "param": None,
                         "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if event["type"] == "done":
                if include_usage:
                    usage = {**head, "choices": [], "usage": event["usage"]}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            lp = [event["logprobs"]] if event.get("logprobs") is not None else None
            text = event.get("text", "")
            finish = event["reason"] if event["type"] == "finish" else None
            choice = _choice(event["choice"], text, lp, finish, chat, delta=True)
            if chat and finish is not None:
                choice["delta"] = {}
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): its rows leave the batch
        job.cancel()

