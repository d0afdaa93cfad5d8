"""Continuous batching (subllm serve): rows join a decoding batch (`KVCache.stack`) and leave
it (`KVCache.select`) between steps, and every row's logits equal that prompt decoded alone."""

import pytest
import torch

from subllm import ModelConfig, SubLLM
from subllm.model.kv_cache import KVCache


def model(structure, seed, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=structure.count("T"), n_heads=4,
                      n_kv_heads=2, ffn_dim=64, max_seq_len=128, structure=structure, **kw)
    m = SubLLM(cfg).double().eval()
    with torch.no_grad():  # spread scores around 0: some tokens kept, some dropped
        for s in m.subsamplers:
            s.score.weight.normal_(0, 0.5)
    return m


def prefill(m, prompts):
    """Left-padded prefill of `prompts`: (cache, last logits)."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    out = m(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1]


def alone(m, prompt, tokens):
    """Logits of each step of feeding `tokens` after `prompt`, one row alone."""
    cache, logits = prefill(m, [prompt])
    out = [logits[0]]
    for t in tokens:
        out.append(m(torch.tensor([[t]]), cache=cache).logits[0, -1])
    return out


@pytest.mark.parametrize("structure,kw", [
    ("T(TT(T)T)T", {}),  # nested, rank rule with its band
    ("TT(TT)T", {"threshold": "calibrated"}),
    ("TT(TT)T", {"sliding_window": 6}),
    ("TTTT", {}),  # a LLaMA
])
def test_rows_joining_and_leaving_decode_as_each_prompt_alone(structure, kw):
    m = model(structure, 3, **kw)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    prompts = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    feeds = [torch.randint(1, 61, (24,), generator=g).tolist() for _ in prompts]
    want = [alone(m, p, f) for p, f in zip(prompts, feeds, strict=True)]

    # rows 0 and 1 start together; 2 joins after 3 steps, 3 after 6; 1 leaves after 8, 0 after 12
    joins = {0: [0, 1], 3: [2], 6: [3]}
    leaves = {8: 1, 12: 0}
    rows: list[int] = []  # request of each batch row
    step_of = {}  # tokens each request has been fed
    cache = None
    for t in range(20):
        if t in leaves:
            cache.select(torch.tensor([i for i, r in enumerate(rows) if r != leaves[t]]))
            rows.remove(leaves[t])
        if t in joins:
            new, logits = prefill(m, [prompts[r] for r in joins[t]])
            for r, lg in zip(joins[t], logits, strict=True):
                torch.testing.assert_close(lg, want[r][0], rtol=0, atol=1e-9)
                step_of[r] = 0
            cache = new if cache is None else KVCache.stack(cache, new)
            rows += joins[t]
        tok = torch.tensor([[feeds[r][step_of[r]]] for r in rows])
        logits = m(tok, cache=cache).logits[:, -1]
        for r, lg in zip(rows, logits, strict=True):
            step_of[r] += 1
            torch.testing.assert_close(lg, want[r][step_of[r]], rtol=0, atol=1e-9)
    assert cache.next_pos.shape[0] == 2


def test_a_leaving_row_frees_its_slots():
    m = model("T(TT)T", 1)
    cache, _ = prefill(m, [[1, 2, 3], list(range(1, 41))])
    before = cache.nbytes(m.block_levels)
    cache.select(torch.tensor([0]))  # the long prompt leaves: only 3 slots per level remain
    assert cache.levels[0].length == 3 and cache.nbytes(m.block_levels) < before / 10
    logits = m(torch.tensor([[7]]), cache=cache).logits[0, -1]
    torch.testing.assert_close(logits, alone(m, [1, 2, 3], [7])[1], rtol=0, atol=1e-9)
