"""MsT: chunked cross-entropy, mini-sequence MLP and apply_mst against unpatched references.

References nobody here wrote: `torch.nn.functional.cross_entropy` in fp64 for the loss,
and the unpatched transformers model (deep-copied before patching, same weights) for
the patched one. Fresh random inputs everywhere; tolerances are the issue's.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import subllm.model.mst as mst
from subllm.errors import SubLLMError
from subllm.model.mst import MiniSequenceMLP, apply_mst, chunked_cross_entropy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def ce_chunk_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the per-chunk calls of the chunked cross-entropy (proves chunking happened)."""
    calls: list[int] = []
    inner = mst._ce_chunk

    def counted(h, *args, **kwargs):
        calls.append(h.shape[0])
        return inner(h, *args, **kwargs)

    monkeypatch.setattr(mst, "_ce_chunk", counted)
    return calls


# --------------------------------------------------------------------------------------
# chunked_cross_entropy vs F.cross_entropy (fp64)
# --------------------------------------------------------------------------------------


def reference_ce(h, w, labels, reduction="mean", softcap=None, bias=None, num_items=None):
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    v = w.shape[0]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                           reduction="sum" if num_items is not None else reduction)
    return loss / num_items if num_items is not None else loss


@pytest.mark.parametrize("chunk_size", [5, 8, 40, 1000])  # 40 valid targets: 5, 8 divide it
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_ce_matches_f_cross_entropy_fp64(chunk_size, reduction, softcap, ce_chunk_calls):
    B, L, d, V = 2, 23, 16, 97
    h = torch.randn(B, L, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[0, 3:7] = -100  # 2 * 22 shifted targets - 4 ignored = 40 valid
    ref = reference_ce(h, w, labels, reduction, softcap, b)
    g_ref = torch.autograd.grad(ref, (h, w, b))
    out = chunked_cross_entropy(h, w, labels, chunk_size=chunk_size, reduction=reduction,
                                softcap=softcap, bias=b)
    g_out = torch.autograd.grad(out, (h, w, b))
    assert out.dtype == torch.float64
    assert rel(out, ref) < 1e-12
    for a, r in zip(g_out, g_ref, strict=True):
        assert rel(a, r) < 1e-12
    assert sum(ce_chunk_calls) == 40
    assert len(ce_chunk_calls) == -(-40 // chunk_size)


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_chunked_ce_chunks_and_num_items(chunks, ce_chunk_calls):
    B, L, d, V = 3, 11, 8, 50
    h = torch.randn(B, L, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[:, -3:] = -100
    labels[1, 0] = -100  # position 0 is never a target after the shift: no effect
    ref = reference_ce(h, w, labels, num_items=77)
    out = chunked_cross_entropy(h, w, labels, chunks=chunks, num_items_in_batch=torch.tensor(77),
                                min_chunk_tokens=1)
    assert rel(out, ref) < 1e-12
    for a, r in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w)),
                    strict=True):
        assert rel(a, r) < 1e-12
    assert len(ce_chunk_calls) == chunks


def test_chunked_ce_unshifted_and_flat():
    N, d, V = 30, 8, 40
    h = torch.randn(N, d, dtype=torch.float64)
    w = torch.randn(V, d, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    y[::4] = -1
    out = chunked_cross_entropy(h, w, y, chunks=4, shift=False, ignore_index=-1,
                                min_chunk_tokens=1)
    assert rel(out, F.cross_entropy(h @ w.t(), y, ignore_index=-1)) < 1e-12


def test_chunked_ce_default_chunk_count(ce_chunk_calls):
    d, V = 8, 50  # 70 targets > vocab: ceil(70 * 8 / (2 * 50)) = 6 tokens per chunk
    h, w = torch.randn(1, 71, d), torch.randn(V, d)
    chunked_cross_entropy(h, w, torch.randint(0, V, (1, 71)))
    assert ce_chunk_calls == [6] * 11 + [4]
    ce_chunk_calls.clear()  # 20 targets < vocab: chunks of d / 2 = 4 tokens
    chunked_cross_entropy(h[:, :21], w, torch.randint(0, V, (1, 21)))
    assert ce_chunk_calls == [4] * 5
    ce_chunk_calls.clear()  # the floor, when given: chunks of at least 30 tokens
    chunked_cross_entropy(h, w, torch.randint(0, V, (1, 71)), min_chunk_tokens=30)
    assert ce_chunk_calls == [30, 30, 10]


@pytest.mark.parametrize("vocab, dim, n, expected", [
    (128256, 256, 8192, 128), (128256, 256, 16384, 128),  # d / 2 at a large vocabulary
    (128256, 4096, 60000, 512), (32000, 2048, 4096, 512),  # capped
    (1000, 64, 4000, 128),  # ceil(4000 * 64 / 2000): a sequence longer than the vocabulary
    (50, 8, 3, 3), (50, 8, 1, 1), (50, 7, 100, 7)])
def test_default_loss_chunk_tokens(vocab, dim, n, expected):
    from subllm.model.config import default_loss_chunk_tokens

    assert default_loss_chunk_tokens(vocab, dim, n) == expected
    # the chunk's logits are never larger than half the larger of the two (x d) buffers
    assert 2 * (expected - 1) * vocab < max(vocab, n) * dim


def test_chunked_ce_holds_no_vocab_by_hidden_copies(monkeypatch):
    """The scaled weight gradient is the accumulator itself (scaled in place in forward and
    backward): the tensor autograd hands to .grad is the one forward accumulated into."""
    made: list[tuple[tuple[int, ...], int]] = []  # (shape, address): holding the tensors
    zeros = torch.zeros                              # would make autograd copy them

    def tracked(*args, **kwargs):
        t = zeros(*args, **kwargs)
        made.append((tuple(t.shape), t.data_ptr()))
        return t

    monkeypatch.setattr(mst.torch, "zeros", tracked)
    V, d = 97, 16
    h = torch.randn(2, 23, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    labels = torch.randint(0, V, (2, 23))
    out = chunked_cross_entropy(h, w, labels, chunk_size=7)
    (3.0 * out).backward()  # grad_out = 3 exercises the in-place scaling in backward
    monkeypatch.undo()
    accum = [ptr for shape, ptr in made if shape == (V, d)]
    assert len(accum) == 1 and w.grad.data_ptr() == accum[0]
    ref = torch.autograd.grad(3.0 * reference_ce(h.double(), w.double(), labels), w)[0]
    assert rel(w.grad, ref) < 1e-5


def test_chunked_ce_native_impl_matches(ce_chunk_calls):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch < 2.13 has no F.linear_cross_entropy")
    B, L, d, V = 2, 23, 16, 97
    h = torch.randn(B, L, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[1, 2:9] = -100
    ref = reference_ce(h, w, labels, bias=b, num_items=50)
    out = chunked_cross_entropy(h, w, labels, bias=b, num_items_in_batch=50, impl="native",
                                chunk_size=5)
    assert not ce_chunk_calls  # ours did not run
    assert rel(out, ref) < 1e-12
    for a, r in zip(torch.autograd.grad(out, (h, w, b)), torch.autograd.grad(ref, (h, w, b)),
                    strict=True):
        assert rel(a, r) < 1e-12
    with pytest.raises(SubLLMError, match="impl='native'"):
        chunked_cross_entropy(h, w, labels, impl="native", softcap=2.0)
    with pytest.raises(SubLLMError, match="impl must be"):
        chunked_cross_entropy(h, w, labels, impl="fast")


def test_chunked_ce_tied_embedding_grads_accumulate():
    V, d, B, L = 60, 16, 2, 13
    emb = nn.Embedding(V, d).double()
    ids = torch.randint(0, V, (B, L))
    ref = reference_ce(torch.tanh(emb(ids)), emb.weight, ids)
    g_ref = torch.autograd.grad(ref, emb.weight)[0]
    out = chunked_cross_entropy(torch.tanh(emb(ids)), emb.weight, ids, chunk_size=5)
    g_out = torch.autograd.grad(out, emb.weight)[0]
    assert rel(g_out, g_ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_ce_autocast_close_to_fp32(dtype):
    B, L, d, V = 2, 64, 32, 300
    h = torch.randn(B, L, d, requires_grad=True)
    w = (torch.randn(V, d) * 0.3).requires_grad_()
    labels = torch.randint(0, V, (B, L))
    ref = reference_ce(h, w, labels)
    g_ref = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=dtype):
        out = chunked_cross_entropy(h, w, labels, chunk_size=25)
    assert out.dtype == torch.float32
    g_out = torch.autograd.grad(out, (h, w))
    assert [g.dtype for g in g_out] == [torch.float32, torch.float32]
    assert rel(out, ref) < 2e-2
    for a, r in zip(g_out, g_ref, strict=True):
        assert rel(a, r) < 5e-2
    # low-precision inputs come back as low-precision gradients
    hb, wb = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out_b = chunked_cross_entropy(hb, wb, labels, chunk_size=25)
    gh, gw = torch.autograd.grad(out_b, (hb, wb))
    assert gh.dtype == gw.dtype == dtype
    assert rel(gw, g_ref[1]) < 5e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [({"chunks": 0}, "chunks"), ({"chunk_size": -2}, "chunk_size"),
     ({"chunks": 2, "chunk_size": 2}, "either"), ({"reduction": "max"}, "reduction"),
     ({"softcap": 0.0}, "softcap"), ({"min_chunk_tokens": 0}, "min_chunk_tokens")],
)
def test_chunked_ce_bad_arguments(kwargs, match):
    with pytest.raises(SubLLMError, match=match):
        chunked_cross_entropy(torch.randn(1, 4, 8), torch.randn(10, 8),
                              torch.randint(0, 10, (1, 4)), **kwargs)
    with pytest.raises(SubLLMError, match="do not match"):
        chunked_cross_entropy(torch.randn(1, 4, 8), torch.randn(10, 8), torch.zeros(1, 5).long())


# --------------------------------------------------------------------------------------
# MiniSequenceMLP
# --------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn), nn.Linear(d, ffn)
        self.down_proj = nn.Linear(ffn, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_mini_sequence_mlp_matches_and_chunks():
    mlp = SwiGLU(16, 40).double()  # default M = ceil(40 / 16) = 3
    ref = copy.deepcopy(mlp)
    wrapped = MiniSequenceMLP(mlp, min_chunk_tokens=4)
    sizes: list[int] = []
    mlp.register_forward_pre_hook(lambda m, i: sizes.append(i[0].shape[1]))
    x = torch.randn(2, 14, 16, dtype=torch.float64, requires_grad=True)
    y = wrapped(x)
    assert sizes == [5, 5, 4]
    y_ref = ref(x)
    assert rel(y, y_ref) < 1e-13
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, *wrapped.parameters()], gy)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    for a, r in zip(g, g_ref, strict=True):
        assert rel(a, r) < 1e-13
    assert len(sizes) == 6  # each chunk recomputed once in backward
    # short sequences are not chunked; same keys as the wrapped module
    sizes.clear()
    wrapped(torch.randn(1, 7, 16, dtype=torch.float64))
    assert sizes == [7]
    assert list(wrapped.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_mini_sequence_mlp_bad_arguments():
    with pytest.raises(SubLLMError, match="chunks"):
        MiniSequenceMLP(SwiGLU(4, 8), chunks=0)
    with pytest.raises(SubLLMError, match="min_chunk_tokens"):
        MiniSequenceMLP(SwiGLU(4, 8), min_chunk_tokens=0)
    with pytest.raises(SubLLMError, match="intermediate size"):
        MiniSequenceMLP(nn.Sequential(nn.Linear(4, 4)))


# --------------------------------------------------------------------------------------
# apply_mst on transformers causal LMs
# --------------------------------------------------------------------------------------

COMMON = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "mistral": (transformers.MistralConfig, {"head_dim": 16}),
    # soft-capping small enough to bend the logits of a random model
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16, "final_logit_softcapping": 0.05}),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 16, "final_logit_softcapping": 0.1}),
    "phi3": (transformers.Phi3Config, {}),
}


def tiny_hf_model(family: str) -> nn.Module:
    cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**COMMON, **extra}))
    with torch.no_grad():  # HF inits some norms/biases to constants; make every param random
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def batch(vocab: int, B: int = 2, L: int = 24) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 5:] = 0  # right padding in the second row
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, 4:7] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# transformers announces a deprecation with a FutureWarning (utils/deprecation.py); one that
# our patched forward causes (an old argument name, say) fails these tests instead of
# scrolling past in users' logs
no_deprecations = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")


@no_deprecations
@pytest.mark.parametrize("family", list(FAMILIES))
def test_apply_mst_hf_matches_unpatched(family, ce_chunk_calls):
    model = tiny_hf_model(family)
    ref = copy.deepcopy(model)
    apply_mst(model, mlp_chunks=3, loss_chunks=4, min_chunk_tokens=4)
    assert list(model.state_dict()) == list(ref.state_dict())
    layers = model.model.layers
    assert all(isinstance(layer.mlp, MiniSequenceMLP) for layer in layers)
    mlp_calls: list[int] = []
    for layer in layers:
        layer.mlp.wrapped.register_forward_hook(lambda m, i, o: mlp_calls.append(i[0].shape[1]))

    inputs = batch(model.config.vocab_size)
    num_items = torch.tensor(int((inputs["labels"][:, 1:] != -100).sum()) + 9)
    for extra in ({}, {"num_items_in_batch": num_items}):
        mlp_calls.clear()
        ce_chunk_calls.clear()
        out = model(**inputs, **extra)
        assert out.logits is None
        assert mlp_calls == [8, 8, 8] * len(layers)  # chunked in the forward pass
        assert len(ce_chunk_calls) == 4
        out_ref = ref(**inputs, **extra)
        assert rel(out.loss, out_ref.loss) < 1e-6
        out.loss.backward()
        out_ref.loss.backward()
        grads = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            assert rel(grads[name].grad, p.grad) < 1e-5, name
        model.zero_grad()
        ref.zero_grad()
    assert model.model.layers[0].gradient_checkpointing


def test_gemma2_softcap_is_exercised():
    """Guard for the test above: without soft-capping the Gemma-2 loss would differ."""
    model = tiny_hf_model("gemma2")
    inputs = batch(model.config.vocab_size)
    capped = model(**inputs).loss
    model.config.final_logit_softcapping = None
    assert abs(float(model(**inputs).loss.detach()) - float(capped.detach())) > 1e-3


@no_deprecations
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_apply_mst_hf_keeps_outputs_and_generation(family):
    model = tiny_hf_model(family).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    gen = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
               pad_token_id=0)
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
        tokens_before = model.generate(ids, **gen)
    apply_mst(model, mlp_chunks=2, loss_chunks=3, min_chunk_tokens=4)
    with torch.no_grad():
        logits_after = model(input_ids=ids).logits
        tokens_after = model.generate(ids, **gen)
    assert rel(logits_after, logits_before) < 1e-6
    assert torch.equal(tokens_before, tokens_after)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_apply_mst_hf_passes_the_cache_under_the_models_own_name(family):
    """transformers 5.24 renamed the cache argument and output field `past_key_values` ->
    `cache` and warns (FutureWarning, and a log line) on the old name or on both; 5.0-5.23
    know only the old one. The patched forward names its cache parameter as the model does
    (also positionally), passes a cache on under that name only, and returns it in the
    output class's own field: a prefill with labels and a cached next step match the
    unpatched model without a single warning or deprecation log line."""
    model = tiny_hf_model(family).eval()
    ref = copy.deepcopy(model)
    apply_mst(model, mlp_chunks=2, loss_chunks=3, min_chunk_tokens=4)
    ours, theirs = (list(inspect.signature(m.forward).parameters) for m in (model, ref))
    # the same names in the same places up to use_cache, the cache's included (early 5.x
    # models take cache_position next; the patched forward takes it by keyword)
    assert ours[:7] == theirs[:7]
    name = "cache" if "cache" in theirs else "past_key_values"
    ids = torch.randint(3, model.config.vocab_size, (2, 10))

    def prefill_and_step(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, object]:
        with torch.no_grad():
            first = m(input_ids=ids[:, :8], labels=ids[:, :8], use_cache=True)
            cache = getattr(first, name)
            nxt = m(input_ids=ids[:, 8:], labels=ids[:, 8:], use_cache=True, **{name: cache})
        return first.loss, nxt.loss, getattr(nxt, name)

    logging.Logger.warning_once.cache_clear()  # transformers logs each message once a process
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, step_loss, cache = prefill_and_step(model)
    finally:
        hf_logger.removeHandler(records)
    deprecations = [str(w.message) for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
    assert [m for m in records.messages if "deprecated" in m] == []
    assert cache is not None and cache.get_seq_length() == 10
    ref_loss, ref_step_loss, _ = prefill_and_step(ref)
    assert rel(loss, ref_loss) < 1e-6 and rel(step_loss, ref_step_loss) < 1e-6


def test_apply_mst_twice_does_not_double_wrap():
    model = apply_mst(tiny_hf_model("llama"), mlp_chunks=2, min_chunk_tokens=4)
    apply_mst(model, mlp_chunks=5, min_chunk_tokens=4)
    mlp = model.model.layers[0].mlp
    assert not isinstance(mlp.wrapped, MiniSequenceMLP) and mlp.chunks == 5


def test_apply_mst_unsupported_model():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32)
    with pytest.raises(SubLLMError) as err:
        apply_mst(transformers.GPT2LMHeadModel(cfg))
    msg = str(err.value)
    assert "GPT2LMHeadModel is not supported" in msg
    for fam in ("subllm.SubLLM", "Llama", "Qwen2", "Qwen3", "Mistral", "Gemma-2", "Gemma-3",
                "Phi-3"):
        assert fam in msg
    with pytest.raises(SubLLMError, match="mlp_chunks"):
        apply_mst(tiny_hf_model("llama"), mlp_chunks=0)


# --------------------------------------------------------------------------------------
# apply_mst on subllm.SubLLM
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["TTT", "T(T(T)T)T"])
def test_apply_mst_subllm_matches_unpatched(structure, ce_chunk_calls):
    from subllm.model import SubLLM
    from subllm.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=500, dim=64, n_layers=structure.count("T"), n_heads=4,
                      ffn_dim=176, structure=structure, keep=0.5, max_seq_len=1024,
                      tie_embeddings=True)
    torch.manual_seed(0)
    model = SubLLM(cfg).train()
    ref = copy.deepcopy(model)
    apply_mst(model, mlp_chunks=2, loss_chunks=3, min_chunk_tokens=4)
    assert model.loss_chunks == 3 and model.gradient_checkpointing
    assert list(model.state_dict()) == list(ref.state_dict())
    mlp_calls: list[int] = []
    for block in model.layers:
        block.mlp.wrapped.register_forward_hook(lambda m, i, o: mlp_calls.append(i[0].shape[1]))

    inputs = batch(cfg.vocab_size, L=800)  # the loss's chunks are >= 256 tokens (its floor)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)  # the same training-mode randomness in both models
    out = model(**inputs)
    assert out.logits is None
    assert len(mlp_calls) == 2 * cfg.n_layers  # every block's MLP ran in 2 chunks
    assert len(ce_chunk_calls) == 3
    torch.manual_seed(seed)
    out_ref = ref(**inputs)
    assert rel(out.loss, out_ref.loss) < 1e-6
    out.loss.backward()
    out_ref.loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
        else:
            assert rel(grads[name].grad, p.grad) < 1e-5, name
