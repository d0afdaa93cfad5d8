"""`subllm serve` as a command: it drains on SIGTERM, refuses unsafe or impossible flags with
one line, and its static schedule decodes as the continuous one."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from subllm.cli import main
from subllm.interop.tokenizer import model_text
from subllm.serve.engine import Engine, Sampling
from subllm.train.load import load_any


@pytest.mark.slow
def test_sigterm_drains_the_streams_in_flight_then_exits_0(run: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "subllm", "serve", "--checkpoint", str(run),
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)/v1", line)
        assert port, line
        body = {"prompt": "the model", "max_tokens": 100, "temperature": 0, "stream": True}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port[1]}/v1/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.readline().startswith(b"data: ")  # the stream has begun
            proc.send_signal(signal.SIGTERM)
            rest = r.read().decode()
        chunks = [json.loads(x[6:]) for x in rest.split("\n\n") if x.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]")
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err
        with pytest.raises(OSError):  # no longer listening
            urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/health", timeout=5)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("flags,message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--port", "70000"], "--port"),
    ([], "--checkpoint"),
])
def test_bad_flags_are_one_line_errors(run: Path, flags, message, capsys,
                                       monkeypatch) -> None:
    monkeypatch.delenv("SUBLLM_API_KEY", raising=False)
    checkpoint = ["--checkpoint", str(run)] if flags else []
    assert main(["serve", *checkpoint, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_static_schedule_decodes_as_each_request_alone(run: Path) -> None:
    model, tokenizer_path, settings, _ = load_any(run, torch.device("cpu"))
    tokenizer, stop = model_text(run, tokenizer_path, settings.get("token_ids"))
    engine = Engine(model, tokenizer, stop, max_batch_size=4, schedule="static").start()
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (3, 9, 5, 12, 7)]
    results: dict[int, list] = {}
    try:
        requests = [engine.submit([p], Sampling(max_tokens=12, temperature=0), 1,
                                  results.setdefault(i, []).append)
                    for i, p in enumerate(prompts)]
        engine.close(60)
    finally:
        engine.close(60)
    assert all(r.rows_left == 0 for r in requests)
    for i, p in enumerate(prompts):
        new = model.generate(torch.tensor([p]), 12, eos_token_id=stop)[0, len(p):].tolist()
        cut = next((j for j, t in enumerate(new) if t in stop), len(new))
        text = "".join(e["text"] for e in results[i] if e["type"] == "delta")
        assert text == tokenizer.decode(new[:cut])
        assert results[i][-1]["usage"]["completion_tokens"] == min(cut + 1, 12)
    assert engine.peak_rows == 4  # the fifth waited for the first batch to finish
