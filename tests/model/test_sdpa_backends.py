"""Attention against a KV cache on CUDA avoids cuDNN's fused attention (it rebuilds its
graph for every new key length, i.e. every decode step); elsewhere SDPA chooses freely.
The GPU behaviour itself is tests/test_cuda.py::test_decode_never_runs_cudnn_attention."""

from __future__ import annotations

import pytest
import torch

from subllm.model import ModelConfig, SubLLM
from subllm.model import llama as llama_mod
from subllm.model import subllm as subllm_mod

needs_cudnn_flag = pytest.mark.skipif(
    llama_mod._NO_CUDNN is None, reason="this torch has no cuDNN attention backend")


@needs_cudnn_flag
def test_context_disables_only_cudnn_and_restores():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with llama_mod.cached_attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_cpu_keeps_sdpa_choice():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with llama_mod.cached_attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_forward_applies_it_with_a_cache_only(monkeypatch):
    seen = []
    real = subllm_mod.cached_attention_backends

    def spy(device):
        seen.append(device.type)
        return real(device)

    monkeypatch.setattr(subllm_mod, "cached_attention_backends", spy)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=2, ffn_dim=64,
                      structure="T(TT)T", keep=0.5, max_seq_len=64)
    model = SubLLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        plain = model(ids).logits
        assert seen == []  # no cache: SDPA's own choice
        out = model(ids, use_cache=True)
        model(ids[:, :1], cache=out.cache)
    assert seen == ["cpu", "cpu"]
    torch.testing.assert_close(out.logits, plain)
