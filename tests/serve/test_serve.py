"""`subllm serve` through the real `openai` client: a server on a free loopback port in this
process (uvicorn in a thread), answers compared with the model's own `generate`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")

from subllm.cli import main  # noqa: E402
from subllm.interop.tokenizer import encode_prompt, model_text  # noqa: E402
from subllm.serve.app import ChatFormat, create_app  # noqa: E402
from subllm.serve.engine import Engine  # noqa: E402
from subllm.train.load import load_any  # noqa: E402

KEY = "sk-test-" + os.urandom(4).hex()


class Served:
    """A checkpoint served by uvicorn in a thread; `client()` is an openai client for it."""

    def __init__(self, checkpoint: Path, api_key: str | None = KEY, **engine_kw) -> None:
        import uvicorn

        self.checkpoint = checkpoint
        model, tokenizer_path, settings, _ = load_any(checkpoint, torch.device("cpu"))
        self.model = model
        self.tokenizer, self.stop = model_text(checkpoint, tokenizer_path,
                                               settings.get("token_ids"))
        self.chat = ChatFormat(checkpoint)
        self.engine = Engine(model, self.tokenizer, self.stop, **engine_kw)
        self.name = checkpoint.name
        app = create_app(self.engine, self.name, self.chat, api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, cls=None, key: str = KEY):
        return (cls or openai.OpenAI)(base_url=self.url + "/v1", api_key=key, max_retries=0,
                                      timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    # references: the model's own generate on the prompt alone
    def ids(self, text: str, special: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.stop, 1 << 30, special)

    def greedy(self, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        """(new ids up to the first stop id, excluded; finish reason) of model.generate."""
        out = self.model.generate(torch.tensor([ids]), max_tokens, eos_token_id=self.stop)
        new = out[0, len(ids):].tolist()
        for i, t in enumerate(new):
            if t in self.stop:
                return new[:i], "stop"
        return new, "length"

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text, special = self.chat(messages)
        return self.ids(text, special)


@pytest.fixture(scope="module")
def served(run: Path):
    s = Served(run, max_batch_size=32)
    yield s
    s.close()


def prompts(n: int, seed: int | None = None) -> list[str]:
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    words = "the a model token train data loss step sample value layer keep ratio".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_completions_greedy_equal_generate_streamed_and_not(served: Served) -> None:
    client = served.client()
    for prompt in prompts(3):
        ids, reason = served.greedy(served.ids(prompt), 24)
        r = client.completions.create(model=served.name, prompt=prompt, max_tokens=24,
                                      temperature=0)
        assert r.choices[0].text == served.tokenizer.decode(ids)
        assert r.choices[0].finish_reason == reason
        assert r.usage.prompt_tokens == len(served.ids(prompt))
        chunks = list(client.completions.create(model=served.name, prompt=prompt,
                                                max_tokens=24, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
        assert chunks[-1].choices[0].finish_reason == reason


def test_chat_greedy_equals_generate_on_the_rendered_messages(served: Served) -> None:
    client = served.client()
    messages = [{"role": "system", "content": "keep the ratio"},
                {"role": "user", "content": prompts(1)[0]}]
    ids, reason = served.greedy(served.chat_ids(messages), 16)
    r = client.chat.completions.create(model=served.name, messages=messages, max_tokens=16,
                                       temperature=0)
    assert r.choices[0].message.content == served.tokenizer.decode(ids)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == reason
    stream = client.chat.completions.create(model=served.name, messages=messages,
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_requests_each_get_the_tokens_they_get_alone(served: Served) -> None:
    """Requests that arrive together (and join a running batch, at other steps) decode to
    what each decodes alone."""
    ps = prompts(12)
    lengths = [random.randint(4, 30) for _ in ps]
    want = [served.greedy(served.ids(p), n) for p, n in zip(ps, lengths, strict=True)]

    async def go():
        client = served.client(openai.AsyncOpenAI)
        async with client:
            return await asyncio.gather(*(
                client.completions.create(model=served.name, prompt=p, max_tokens=n,
                                          temperature=0)
                for p, n in zip(ps, lengths, strict=True)))

    for r, (ids, reason) in zip(asyncio.run(go()), want, strict=True):
        assert r.choices[0].text == served.tokenizer.decode(ids)
        assert r.choices[0].finish_reason == reason
    assert served.engine.peak_rows > 1  # they were decoded together


def test_stop_strings_cut_the_text_streamed_and_not(served: Served) -> None:
    client = served.client()
    prompt = prompts(1, seed=3)[0]
    full = client.completions.create(model=served.name, prompt=prompt, max_tokens=30,
                                     temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[:full.index(stop)]
    r = client.completions.create(model=served.name, prompt=prompt, max_tokens=30,
                                  temperature=0, stop=[stop, "never-seen"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=served.name, prompt=prompt, max_tokens=30,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


def test_sampling_is_reproducible_by_seed_and_choice_i_uses_seed_plus_i(served: Served) -> None:
    client = served.client()
    prompt = prompts(1)[0]
    kw = {"model": served.name, "prompt": prompt, "max_tokens": 20, "temperature": 1.0,
          "top_p": 0.95, "extra_body": {"top_k": 40}}  # top_k: as vLLM, not in OpenAI's API
    both = client.completions.create(n=2, seed=11, **kw)
    first = client.completions.create(seed=11, **kw)
    second = client.completions.create(seed=12, **kw)
    assert [c.text for c in both.choices] == [first.choices[0].text, second.choices[0].text]
    assert both.usage.completion_tokens == (first.usage.completion_tokens
                                            + second.usage.completion_tokens)
    # the same sampling as model.generate with a generator of that seed
    ids = served.ids(prompt)
    gen = torch.Generator().manual_seed(11)
    out = served.model.generate(torch.tensor([ids]), 20, temperature=1.0, top_k=40, top_p=0.95,
                                eos_token_id=served.stop, generator=gen)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in served.stop), len(out))
    assert first.choices[0].text == served.tokenizer.decode(out[:cut])


def test_logprobs_are_the_models_log_softmax(served: Served) -> None:
    client = served.client()
    prompt = prompts(1)[0]
    r = client.completions.create(model=served.name, prompt=prompt, max_tokens=8,
                                  temperature=0, logprobs=3)
    ids = served.ids(prompt)
    new, _ = served.greedy(ids, 8)
    seq = torch.tensor([ids + new])
    with torch.no_grad():
        logp = served.model(seq).logits[0].double().log_softmax(-1)
    lp = r.choices[0].logprobs
    for i, (tok, got) in enumerate(zip(new, lp.token_logprobs, strict=False)):
        assert got == pytest.approx(float(logp[len(ids) - 1 + i, tok]), abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(got, abs=1e-4)  # greedy
    chat = client.chat.completions.create(model=served.name, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": prompt}],
                                          logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of `body`."""
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD = [  # (body or raw bytes, status, what the message names)
    (b"{not json", 400, "JSON"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": "x", "temperature": 1e400}', 400, "temperature"),  # inf
    ({"prompt": "x", "n": 10**6}, 400, "n"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ([1, 2], 400, "object"),
]


@pytest.mark.parametrize("body,status,names", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(served: Served, body,
                                                                      status, names) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = http(served.url + "/v1/completions", raw, {"Authorization": f"Bearer {KEY}"})
    assert got == status, answer
    error = answer["error"]
    assert names in error["message"] and error["type"]
    assert http(served.url + "/health") == (200, {"status": "ok", "running": 0})


def _complete(answer: bytes) -> bool:
    """Whether an HTTP answer holds its whole body (by its Content-Length)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def test_an_oversized_body_is_refused_with_413_before_it_is_read(served: Served) -> None:
    import socket

    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{2 << 20}\r\n\r\n{{\"prompt\": \"".encode())  # the rest never comes
        answer = b""
        while b"\r\n\r\n" not in answer or not _complete(answer):  # head and body may
            chunk = sock.recv(65536)                                   # come apart
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.split()[1] == "413" and "bytes" in body
    assert http(served.url + "/health") == (200, {"status": "ok", "running": 0})


def test_a_wrong_or_missing_api_key_is_refused_with_401(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        served.client(key="sk-wrong").models.list()
    status, answer = http(served.url + "/v1/models")
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert [m.id for m in served.client().models.list().data] == [served.name]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_load_32_streaming_clients_x_8_requests_with_some_leaving(served: Served) -> None:
    """Every request is answered completely, clients that leave mid-stream stall nobody and
    free their rows, and the memory comes back."""
    async def client_task(client, i: int) -> list[tuple[str, str | None]]:
        out = []
        for j in range(8):
            stream = await client.completions.create(
                model=served.name, prompt=prompts(1, seed=i * 8 + j)[0], max_tokens=16,
                temperature=0.7, seed=j, stream=True)
            text, reason = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
                if i % 8 == 7 and j % 2 and len(text) > 0:  # this client leaves mid-stream
                    await stream.close()
                    reason = "left"
                    break
            out.append((text, reason))
        return out

    async def load():
        client = served.client(openai.AsyncOpenAI)
        async with client:
            return await asyncio.wait_for(
                asyncio.gather(*(client_task(client, i) for i in range(32))), 300)

    asyncio.run(load())  # warm-up: buffers and allocator pools reach their working size
    before = _rss()
    results = asyncio.run(load())
    for i, rows in enumerate(results):
        for j, (_, reason) in enumerate(rows):
            left = i % 8 == 7 and j % 2
            assert reason in (("left",) if left else ("stop", "length")), (i, j, reason)
    deadline = time.monotonic() + 10
    while served.engine.busy_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.engine.busy_rows == 0 and served.engine._cache is None
    assert _rss() < before * 1.10


def test_a_converted_llama_serves_chat_with_its_template_and_eos_list(tmp_path: Path) -> None:
    """An HF directory (subllm convert of a Llama-3-style model): chat through its own
    template, stopping at any id of its generation_config eos list, as transformers does."""
    from test_round3_pipeline import _llama3_dir
    from transformers import AutoTokenizer, LlamaForCausalLM

    src, eot, end = _llama3_dir(tmp_path, seed=int.from_bytes(os.urandom(2), "little"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} "
                               "{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "converted"
    assert main(["convert", "--from-hf", str(src), "--out", str(out)]) == 0
    s = Served(out, api_key=None)
    try:
        messages = [{"role": "user", "content": "the model keep ratio"}]
        hf = AutoTokenizer.from_pretrained(src)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")["input_ids"]
        ref = LlamaForCausalLM.from_pretrained(src).generate(ids, do_sample=False,
                                                             max_new_tokens=20)
        new = ref[0, ids.shape[1]:].tolist()
        stops = [i for i, t in enumerate(new) if t in (eot, end)]
        text = hf.decode(new[:stops[0]] if stops else new, skip_special_tokens=True)
        r = s.client(key="none").chat.completions.create(model=s.name, messages=messages,
                                                         max_tokens=20, temperature=0)
        assert r.choices[0].message.content == text
        assert r.choices[0].finish_reason == ("stop" if stops else "length")
    finally:
        s.close()
