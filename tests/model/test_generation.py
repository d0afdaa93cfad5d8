import pytest
import torch

from subllm import ModelConfig, SubLLM, SubLLMError
from subllm.model.decode import filter_logits


def model(seed=0, structure="T(TT(T)T)T", max_seq_len=96):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=structure.count("T"), n_heads=4,
                      n_kv_heads=2, ffn_dim=64, max_seq_len=max_seq_len, structure=structure)
    m = SubLLM(cfg).double().eval()
    with torch.no_grad():  # spread scores around 0: some tokens kept, some dropped
        for s in m.subsamplers:
            s.score.weight.normal_(0, 0.5)
        m.lm_head.weight.mul_(20)  # peaked distributions: greedy decoding not a near-tie
    return m


def left_pad(prompts):
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


def test_batched_left_padded_greedy_equals_each_alone():
    m = model(1)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (5, 13, 9)]
    ids, mask = left_pad(prompts)
    batch = m.generate(ids, 20, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = m.generate(torch.tensor([p]), 20)
        assert batch[i, -20:].tolist() == alone[0, -20:].tolist()


def test_cached_generation_equals_recomputing_every_step():
    m = model(2)
    x = torch.randint(0, 61, (2, 11))
    fast = m.generate(x, 25)
    seq = x
    for _ in range(25):  # no cache: full forward over the whole sequence each step
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert fast.tolist() == seq.tolist()


def test_streamer_receives_each_token_and_eos_stops():
    m = model(3)
    x = torch.randint(0, 61, (1, 6))
    got = []
    out = m.generate(x, 12, streamer=lambda t: got.append(int(t[0])))
    assert got == out[0, 6:].tolist() and len(got) == 12
    eos = got[3]
    first = got.index(eos)
    out2 = m.generate(x, 12, eos_token_id=eos)
    assert out2[0, 6:].tolist() == got[:first + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    m = model(4)
    x = torch.randint(0, 61, (2, 8))
    a = m.generate(x, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = m.generate(x, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert a.tolist() == b.tolist()
    greedy = m.generate(x, 10)
    k1 = m.generate(x, 10, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    assert k1.tolist() == greedy.tolist()


def test_filter_logits_top_p_matches_definition():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = filter_logits(logits, top_p=0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.75
    kept = filter_logits(logits, top_p=0.5).isfinite()[0].tolist()
    assert kept == [True, False, False, False]
    kept = filter_logits(logits, top_k=3).isfinite()[0].tolist()
    assert kept == [True, True, True, False]


def test_repetition_penalty_changes_output_and_ignores_padding():
    m = model(5)
    x = torch.randint(0, 61, (1, 8))
    plain = m.generate(x, 15)
    pen = m.generate(x, 15, repetition_penalty=5.0)
    assert plain.tolist() != pen.tolist()
    assert len(set(pen[0, 8:].tolist())) >= len(set(plain[0, 8:].tolist()))


def test_prompt_too_long_is_a_clear_error():
    m = model(6, max_seq_len=16)
    with pytest.raises(SubLLMError, match="longer than the model's context"):
        m.generate(torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(SubLLMError, match="lower max_new_tokens to 6"):
        m.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(SubLLMError, match="token ids must be in"):
        m.generate(torch.full((1, 3), 61), 1)
