"""Packed rows (`document_ids`, design.md §3.10): each document of a packed row gets the
logits it gets alone, in training (top-k per document) and eval (rank rule per document)."""

import math

import pytest
import torch

from subllm import ModelConfig, SubLLM, SubLLMError
from subllm.model.llama import attention_mask_for


def model(structure, **kw):
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=structure.count("T"), n_heads=4,
                      n_kv_heads=2, ffn_dim=64, max_seq_len=128, structure=structure, **kw)
    m = SubLLM(cfg)
    with torch.no_grad():  # spread scores around 0 and into (0, 1): the weights matter
        for s in m.subsamplers:
            s.score.weight.normal_(0, 0.5)
    return m


def packed_batch(g, rows=3, length=48):
    """(ids, document ids, [(row, start, end)]) of rows packed with 1-5 documents each."""
    ids = torch.randint(1, 61, (rows, length), generator=g)
    docs = torch.zeros(rows, length, dtype=torch.long)
    spans = []
    for r in range(rows):
        n_cuts = int(torch.randint(0, 5, (), generator=g))
        cuts = sorted((torch.randperm(length - 1, generator=g)[:n_cuts] + 1).tolist())
        bounds = [0, *cuts, length]
        for d, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            docs[r, a:b] = d
            spans.append((r, a, b))
    return ids, docs, spans


@pytest.mark.parametrize("structure,kw", [
    ("TTTT", {}),
    ("T(TT(T)T)T", {}),
    ("T(TT(T)T)T", {"rope_positions": "parent"}),
    ("TT(TT)T", {"sliding_window": 5}),
])
@pytest.mark.parametrize("mode", ["train", "eval", "train, bound on the host"])
def test_each_packed_document_gets_the_logits_it_gets_alone(structure, kw, mode):
    """`max_documents` (counted on the host) sizes training's selections without a sync;
    its unused slots must change nothing."""
    seed = int(torch.randint(0, 10**6, ()))
    torch.manual_seed(seed)
    m = model(structure, **kw).train(mode.startswith("train"))
    g = torch.Generator().manual_seed(seed)
    ids, docs, spans = packed_batch(g)
    bound = {"max_documents": int(docs.max()) + 1} if "bound" in mode else {}
    torch.manual_seed(seed + 1)  # the same draws (top-k pairing, balancer) in both runs
    packed = m(ids, document_ids=docs, **bound).logits
    for r, a, b in spans:
        torch.manual_seed(seed + 1)
        alone = m(ids[r:r + 1, a:b]).logits[0]
        torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-5, atol=1e-5,
                                   msg=f"seed {seed}, row {r}, document [{a}, {b})")


def test_each_document_keeps_its_own_share_in_training():
    torch.manual_seed(0)
    m = model("T(TT)T").train()
    g = torch.Generator().manual_seed(0)
    ids, docs, spans = packed_batch(g, rows=4)
    out = m(ids, document_ids=docs)
    keep = m.subsamplers[0].keep
    want = torch.zeros(4, dtype=torch.long)
    for r, a, b in spans:
        want[r] += math.ceil(round(keep * (b - a), 6))  # ceil(keep * n) per document
    assert out.kept[0].tolist() == want.tolist()


def test_a_mask_that_leaks_across_documents_fails_the_comparison(monkeypatch):
    """The comparison above sees a leak: attention that ignores document boundaries."""
    import subllm.model.subllm as sub

    def leaky(valid, past_valid, length, device, window=None, pos=None, past_pos=None,
              docs=None):
        return attention_mask_for(valid, past_valid, length, device, window, pos, past_pos)

    monkeypatch.setattr(sub, "attention_mask_for", leaky)
    with pytest.raises(AssertionError):
        test_each_packed_document_gets_the_logits_it_gets_alone("TTTT", {}, "eval")


def test_max_documents_must_be_a_bound():
    """Too small a bound would drop kept tokens: training refuses it (checked on the
    device, no sync); it must be a positive integer."""
    m = model("T(TT)T").train()
    g = torch.Generator().manual_seed(0)
    ids, docs, _ = packed_batch(g, rows=3, length=64)
    docs[0] = torch.arange(64) // 4  # 16 documents of 4 tokens: 16 x 2 kept
    with pytest.raises(RuntimeError, match="max_documents"):
        m(ids, document_ids=docs, max_documents=1)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(SubLLMError, match="max_documents"):
            m(ids, document_ids=docs, max_documents=bad)
    m(ids, document_ids=docs, max_documents=16)


def test_document_ids_refuse_a_cache_and_bad_shapes():
    m = model("T(TT)T").eval()
    ids = torch.randint(0, 61, (2, 8))
    with pytest.raises(SubLLMError, match="document_ids"):
        m(ids, document_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(SubLLMError, match="KV cache"):
        m(ids, document_ids=torch.zeros(2, 8, dtype=torch.long), use_cache=True)


def test_hf_padding_free_collator_keeps_the_documents_apart():
    """transformers' DataCollatorWithFlattening packs documents into one row with position_ids
    restarting at each: SubLLMForCausalLM gives each the logits it gets alone."""
    from transformers import DataCollatorWithFlattening

    from subllm.hf import SubLLMConfig, SubLLMForCausalLM

    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    m = model("T(TT(T)T)T").eval()
    hf = SubLLMForCausalLM(SubLLMConfig.from_model_config(m.config)).eval()
    hf.model.load_state_dict(m.state_dict())
    docs = [torch.randint(1, 61, (n,)).tolist() for n in (7, 19, 3, 12)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    with torch.no_grad():
        packed = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        at = 0
        for d in docs:
            alone = hf(input_ids=torch.tensor([d])).logits[0]
            torch.testing.assert_close(packed[at:at + len(d)], alone, rtol=1e-5, atol=1e-5)
            at += len(d)
    with pytest.raises(ValueError, match="position_ids"):  # not a packing: still refused
        hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"] + 1)
