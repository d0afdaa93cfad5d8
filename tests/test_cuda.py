"""What only a CUDA GPU can show (marked `cuda`: skipped without one; `subllm bench gpu`
runs them): bf16 training, the SDPA flash path, generation on the GPU, MsT in bf16
against the unchunked bf16 loss, training and decoding steps without a host sync.
References: fp32 on the same device, the CPU, and `F.cross_entropy` on the unchunked
logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from subllm.model import ModelConfig, SubLLM
from subllm.model.mst import apply_mst, chunked_cross_entropy

pytestmark = pytest.mark.cuda
DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tiny(structure: str = "T(T)T") -> ModelConfig:
    # head size 64: the flash kernels' supported sizes
    return ModelConfig(vocab_size=1000, dim=128, n_layers=structure.count("T"), n_heads=2,
                       ffn_dim=352, structure=structure, keep=0.5, max_seq_len=1024)


@pytest.mark.parametrize("structure", ["TTT", "T(T)T"])
def test_bf16_forward_backward_close_to_fp32(structure):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = SubLLM(tiny(structure)).to(DEV).train()
    ids = torch.randint(0, 1000, (2, 256), device=DEV)
    grads = {}
    for amp in (False, True):
        torch.manual_seed(0)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        grads[amp] = (float(loss), [p.grad.clone() for p in model.parameters()
                                    if p.grad is not None])
        model.zero_grad(set_to_none=True)
    assert grads[True][0] == pytest.approx(grads[False][0], rel=2e-2)
    for g16, g32 in zip(grads[True][1], grads[False][1], strict=True):
        assert torch.isfinite(g16).all()
        assert F.cosine_similarity(g16.flatten().double(), g32.flatten().double(), dim=0) > 0.98


@pytest.mark.parametrize("structure", ["TTT", "T(T)T"])
def test_training_takes_the_flash_path(structure):
    """Training attention has no explicit mask (is_causal): with only the flash kernel
    allowed, a bf16 step must still run (SDPA raises when no allowed kernel fits)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = SubLLM(tiny(structure)).to(DEV).train()
    ids = torch.randint(0, 1000, (2, 512), device=DEV)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast(DEV, dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss)


def test_generate_on_cuda_matches_cpu():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cpu = SubLLM(tiny()).eval()
    gpu = copy.deepcopy(cpu).to(DEV)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        assert torch.allclose(gpu(ids.to(DEV)).logits.cpu(), cpu(ids).logits, atol=1e-4,
                              rtol=1e-4)
        out_cpu = cpu.generate(ids, max_new_tokens=8)
        out_gpu = gpu.generate(ids.to(DEV), max_new_tokens=8)
    assert out_gpu.device.type == "cuda"
    assert torch.equal(out_gpu.cpu(), out_cpu)


def test_mst_bf16_matches_unchunked_bf16():
    """Chunked LM head + loss under bf16 autocast against F.cross_entropy of the same bf16
    logits in fp32 (the unchunked computation), on a Llama-3-sized vocabulary."""
    N, d, V = 4096, 256, 128256
    h = torch.randn(1, N, d, device=DEV, requires_grad=True)
    w = (torch.randn(V, d, device=DEV) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (1, N), device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = chunked_cross_entropy(h, w, labels)
        logits = (h[0, :-1] @ w.t()).float()  # bf16 matmul, fp32 softmax
    ref = F.cross_entropy(logits, labels[0, 1:])
    g_out = torch.autograd.grad(out, (h, w))
    g_ref = torch.autograd.grad(ref, (h, w))
    assert rel(out, ref) < 2e-3
    for a, r in zip(g_out, g_ref, strict=True):
        assert rel(a, r) < 2e-2


def test_apply_mst_bf16_matches_unpatched_bf16():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = SubLLM(tiny()).to(DEV).train()
    ref = copy.deepcopy(model)
    apply_mst(model, mlp_chunks=2, loss_chunks=3, min_chunk_tokens=64)
    ids = torch.randint(0, 1000, (2, 512), device=DEV)
    losses = []
    for m in (model, ref):
        torch.manual_seed(1)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert rel(p.grad, grads[name].grad) < 3e-2, name


def test_decode_never_runs_cudnn_attention():
    """cuDNN's attention rebuilds its graph whenever the key length changes, i.e. on every
    decode step (2.7 ms of host time per call measured on an H200): cached attention must
    take the flash / memory-efficient kernels instead."""
    from torch.profiler import ProfilerActivity, profile

    model = SubLLM(tiny("TT(TT)TT")).to(DEV).eval()
    ids = torch.randint(0, 1000, (1, 200), device=DEV)
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
        out = model(ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)[:, None]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                tok = model(tok, cache=out.cache).logits[:, -1].argmax(-1)[:, None]
            torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert any("attention" in n or "sdpa" in n.lower() for n in names), sorted(names)[:40]
    assert not [n for n in names if "cudnn_attention" in n], "decode ran cuDNN attention"


@pytest.mark.parametrize("structure", ["TTT", "T(T(T)T)T"])
@pytest.mark.parametrize("eot", [None, 5])
def test_a_training_step_never_syncs(structure, eot):
    """Plain and packed rows, bf16, AdamW, gradient norm: nothing read back (the loop counts
    a packed batch's documents on its CPU copy; tests/model/test_host_syncs.py checks the
    same on the CPU with the meta device)."""
    from subllm.train.loop import train_step

    model = SubLLM(tiny(structure)).to(DEV).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 1000, (2, 512))
    if eot is not None:
        ids[torch.rand(ids.shape) < 0.01] = eot
    ids = ids.pin_memory()
    try:
        for step in range(2):  # the first sets up cuBLAS and AdamW's state
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if step else "default")
            model.set_step(step)
            result = train_step(model, opt, [ids], device=torch.device(DEV),
                                amp=torch.bfloat16, eot_id=eot)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result.loss)


@pytest.mark.parametrize("structure", ["TTT", "T(T(T)T)T"])
@pytest.mark.parametrize("rows,sync_free", [(8, False), (1, True)])
def test_a_decoding_step_never_syncs(structure, rows, sync_free):
    """From 4 rows by default, and at any batch with sync_free_decoding, a decoding step
    decides on the device whether each row's token enters a segment."""
    model = SubLLM(tiny(structure)).to(DEV).eval()
    model.sync_free_decoding = sync_free
    ids = torch.randint(0, 1000, (rows, 300), device=DEV)
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
        out = model(ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)[:, None]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(8):
                tok = model(tok, cache=out.cache).logits[:, -1].argmax(-1)[:, None]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tok.shape == (rows, 1)
