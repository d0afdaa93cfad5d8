"""`subllm serve`: serve a checkpoint over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from pathlib import Path
from typing import Any

from subllm.errors import SubLLMError
from subllm.flags import non_empty_path, positive_int, resolve_flags

DESCRIPTION = ("Serve a checkpoint over an OpenAI-compatible API (/v1/completions, "
               "/v1/chat/completions, /v1/models, /health), decoding concurrent requests "
               "together.")


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--config", type=non_empty_path, metavar="FILE",
                   help="YAML file whose keys are these flag names; flags win (default: none)")
    g.add_argument("--checkpoint", type=non_empty_path, metavar="RUN_DIR",
                   help="run directory (its newest checkpoint), a checkpoints/step-* directory, "
                   "or a Hugging Face SubLLM directory (subllm export / convert); required")
    g.add_argument("--host", metavar="ADDR",
                   help="address to listen on; any but loopback needs --api-key "
                   "(default 127.0.0.1)")
    g.add_argument("--port", type=int, metavar="N", help="port (default 8000; 0: any free one)")
    g.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` (default: $SUBLLM_API_KEY, else none)")
    g.add_argument("--model-name", metavar="NAME",
                   help="the model's id in the API (default: the checkpoint directory's name)")
    g.add_argument("--device", metavar="D", help="auto, cpu, cuda, ... (default auto)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations (default auto: bfloat16 on CUDA, else float32)")
    g.add_argument("--max-batch-size", type=positive_int, metavar="N",
                   help="rows decoded together at most (default 8)")
    g.add_argument("--max-seq-len", type=positive_int, metavar="N",
                   help="prompt + completion tokens per request at most (default: the model's "
                   "context)")
    g.add_argument("--schedule", choices=("continuous", "static"),
                   help="continuous: requests join and leave the batch between decoding "
                   "steps; static: a batch runs until all its rows finish (default continuous)")


SERVE_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "host": "127.0.0.1", "port": 8000, "api_key": None,
    "model_name": None, "device": "auto", "dtype": "auto", "max_batch_size": 8,
    "max_seq_len": None, "schedule": "continuous",
}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    s, _ = resolve_flags(args, args._parser, SERVE_DEFAULTS)
    if s["checkpoint"] is None:
        raise SubLLMError("give --checkpoint RUN_DIR (the --out of a `subllm train` run, or a "
                          "Hugging Face SubLLM directory from `subllm export`/`convert`)")
    api_key = s["api_key"] or os.environ.get("SUBLLM_API_KEY") or None
    if not _loopback(s["host"]) and api_key is None:
        raise SubLLMError(f"--host {s['host']} can be reached from other machines: give "
                          "--api-key KEY (or set SUBLLM_API_KEY), or serve on 127.0.0.1")
    if not 0 <= s["port"] < 65536:
        raise SubLLMError(f"--port must be in [0, 65535], got {s['port']}")
    from subllm.train.config import check_model_dir

    check_model_dir(s["checkpoint"], "--checkpoint")  # before torch and transformers load
    import torch
    import uvicorn

    from subllm.interop.tokenizer import model_text
    from subllm.serve.app import ChatFormat, create_app
    from subllm.serve.engine import Engine
    from subllm.train.load import load_any
    from subllm.train.runtime import Dist, pick_device

    device = pick_device(s["device"], Dist())
    model, tokenizer_path, settings, _ = load_any(s["checkpoint"], device)
    dtype = s["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = model.to(getattr(torch, dtype))
    tokenizer, stop = model_text(s["checkpoint"], tokenizer_path, settings.get("token_ids"))
    name = s["model_name"] or Path(s["checkpoint"]).resolve().name
    engine = Engine(model, tokenizer, stop, s["max_batch_size"], s["max_seq_len"],
                    s["schedule"])
    app = create_app(engine, name, ChatFormat(s["checkpoint"]), api_key)
    what = (f"{name} ({device.type}, {dtype}, batch {engine.max_batch_size}, context "
            f"{engine.max_seq_len}, {s['schedule']} batching)")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # the address it listens on (--port 0: the one it was given)
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"subllm serve: {what} on http://{s['host']}:{port}/v1", file=sys.stderr,
                      flush=True)

    # uvicorn drains on SIGTERM and Ctrl-C: no new connections, in-flight requests finish.
    # Then it re-raises the signal to the handler it found: for SIGTERM ours, a no-op, so
    # that a drained server exits 0 (Ctrl-C: `subllm serve: interrupted`, as any verb).
    signal.signal(signal.SIGTERM, lambda *_: None)
    Server(uvicorn.Config(app, host=s["host"], port=s["port"], log_level="warning")).run()
    print("subllm serve: stopped; every request in flight was answered", file=sys.stderr)
    return 0
