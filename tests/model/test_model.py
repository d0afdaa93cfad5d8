import math

import pytest
import torch
from torch import Tensor

from subllm import ModelConfig, SubLLM
from subllm.model.subsample import _BalanceScores

NESTED = "T(TT(T)T)T"


def tiny(structure=NESTED, keep=0.64, **kw):
    n = structure.count("T")
    base = dict(vocab_size=97, dim=32, n_layers=n, n_heads=4, n_kv_heads=2, ffn_dim=64,
                max_seq_len=128, structure=structure, keep=keep)
    return ModelConfig(**{**base, **kw})


def eval_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = SubLLM(tiny(**kw)).double().eval()
    # Larger scorer weights than the init: scores spread around 0, so every subsampling
    # module keeps some tokens and drops others (the checks below would be vacuous if not).
    with torch.no_grad():
        for s in m.subsamplers:
            s.score.weight.normal_(0, 0.5)
    return m


def assert_subsampled(out):
    for k, e in zip(out.kept, out.entered, strict=True):
        assert (k > 0).all() and (k < e).all(), (k, e)


@pytest.mark.parametrize("threshold", ["rank", "calibrated", "zero"])
def test_eval_prefill_plus_decode_equals_full_forward(threshold):
    m = eval_model(1, threshold=threshold)
    x = torch.randint(0, 97, (3, 40))
    full = m(x)
    assert_subsampled(full)
    out = m(x[:, :17], use_cache=True)
    pieces = [out.logits]
    t = 17
    for n in (1, 5, 1, 1, 9, 1):  # token-by-token with a few chunked steps in between
        pieces.append(m(x[:, t:t + n], cache=out.cache).logits)
        t += n
    while t < 40:
        pieces.append(m(x[:, t:t + 1], cache=out.cache).logits)
        t += 1
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits, atol=1e-4, rtol=0)


def test_cache_skips_blocks_for_dropped_tokens():
    m = eval_model(2)
    x = torch.randint(0, 97, (1, 30))
    out = m(x[:, :10], use_cache=True)
    kept_total = [int(k.sum()) for k in out.kept]
    for t in range(10, 30):
        o = m(x[:, t:t + 1], cache=out.cache)
        kept_total = [a + int(k.sum()) for a, k in zip(kept_total, o.kept, strict=True)]
    # level 0 holds every token; level j+1 exactly the tokens segment j kept
    assert out.cache.level_lengths() == [30] + kept_total
    assert kept_total[0] < 30 and kept_total[1] < kept_total[0]
    for i, lvl in enumerate(m.block_levels):
        assert out.cache.layers[i].k is None or out.cache.levels[lvl].length <= 30


def test_causality_in_eval_mode():
    m = eval_model(3)
    x = torch.randint(0, 97, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 97, (2, 12))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-10, rtol=0)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("threshold", ["rank", "calibrated"])
def test_left_padding_equals_unpadded_rows(threshold):
    m = eval_model(4, threshold=threshold)
    x = torch.randint(0, 97, (1, 12))
    pad = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], 1).long()
    a = m(x).logits
    b = m(pad, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


def test_padding_is_never_kept():
    m = eval_model(5)
    with torch.no_grad():
        m.subsamplers[0].score.weight.mul_(0).add_(m.subsamplers[0].score.weight.new_full((32,), 1))
    x = torch.randint(0, 97, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :6] = 0
    for mode in (m.eval, m.train):
        mode()
        torch.manual_seed(0)
        out = m(x, attention_mask=mask)
        assert int(out.entered[0][0]) == 10 and int(out.entered[0][1]) == 16
        assert (out.kept[0] <= out.entered[0]).all()


@pytest.mark.parametrize("keep, L", [(0.64, 50), ([0.5, 0.75], 37), (0.3, 64)])
def test_training_keeps_ceil_keep_times_length(keep, L):
    torch.manual_seed(0)
    m = SubLLM(tiny(keep=keep)).train()
    x = torch.randint(0, 97, (3, L))
    out = m(x, labels=x)
    k1, k2 = (keep, keep) if isinstance(keep, float) else keep
    n1 = math.ceil(k1 * L)
    assert out.kept[0].tolist() == [n1] * 3
    assert out.kept[1].tolist() == [math.ceil(k2 * n1)] * 3


def test_training_gradients_reach_scorers_and_bypass():
    torch.manual_seed(0)
    m = SubLLM(tiny()).train()
    x = torch.randint(0, 97, (4, 48))
    m(x, labels=x).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for s in m.subsamplers:
        assert s.score.weight.grad.abs().sum() > 0
    for b in m.bypasses:
        assert b.scale.grad.abs().sum() > 0


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = SubLLM(tiny()).double().train()
    b = SubLLM(tiny()).double().train()
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    x = torch.randint(0, 97, (2, 40))
    for m in (a, b):
        torch.manual_seed(7)
        m(x, labels=x).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_loss_matches_reference_cross_entropy_with_ignore_index():
    m = eval_model(6)
    x = torch.randint(0, 97, (2, 20))
    labels = x.clone()
    labels[0, :7] = -100
    out = m(x, labels=labels)
    logp = out.logits.log_softmax(-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(19)
             if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_balancer_is_identity_forward_and_pushes_fraction_toward_keep():
    s = torch.randn(4, 64, dtype=torch.float64) + 2.0  # nearly all positive: too many kept
    s.requires_grad_(True)
    g = torch.randn_like(s)
    out = _BalanceScores.apply(s, None, 0.45, 0.55, 1.25, 5.0, 0.04)
    torch.testing.assert_close(out, s)
    out.backward(g)
    extra = s.grad - g
    # descent along -extra lowers the mean score (fewer positives); the extra gradient is
    # 0.04 * rms(g) times a direction of unit rms
    assert extra.sum() > 0
    direction = extra / (0.04 * g.pow(2).mean().sqrt())
    torch.testing.assert_close(direction.pow(2).mean().sqrt(), torch.tensor(1.0).double())
    # in range (half positive, rms ~ 2): no change at all
    s2 = (torch.randn(4, 64, dtype=torch.float64) * 2).requires_grad_(True)
    s2.data -= s2.data.median()
    _BalanceScores.apply(s2, None, 0.45, 0.55, 1.25, 5.0, 0.04).backward(g)
    torch.testing.assert_close(s2.grad, g)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])  # rms below, in, and above range
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("rule", ["fraction", "paper"])
def test_balancer_penalty_gradient_matches_autograd(scale, padded, rule):
    """The closed-form gradient of the balancers' penalty (`_penalty_grad`) against autograd
    through the statistics of the real scores, picked out by boolean indexing, in fp64."""
    from subllm.model.subsample import _penalty_grad

    seed = int(torch.randint(0, 10**6, ()))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 40, generator=g, dtype=torch.float64) + 1.0) * scale  # m / sd ~ 1
    valid = torch.rand(3, 40, generator=g) < 0.7 if padded else None
    lo, hi = 0.45, 0.55  # target band of the fraction of positives / of m / sd

    def weight(ratio, frac):
        if rule == "paper":
            return (ratio > hi).double() - (ratio < lo).double()
        return (frac > hi).double() - (frac < lo).double()

    ref = x.clone().requires_grad_(True)
    v = ref[valid] if padded else ref.reshape(-1)
    m, sd = v.mean(), v.std(correction=0).clamp_min(1e-6)
    r = v.pow(2).mean().sqrt().clamp_min(1e-6)
    c = weight((m / sd).detach(), (v > 0).double().mean())
    penalty = c * m / sd + torch.log(r.clamp(1.25, 5.0) / r).abs()
    (want,) = torch.autograd.grad(penalty, ref)
    got, n = _penalty_grad(x, valid, 1.25, 5.0, weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=f"seed {seed}")
    assert float(n) == v.numel()
    assert want.abs().sum() > 0  # m / sd and the positives' share are above the band


@pytest.mark.slow
def test_balancer_brings_eval_kept_fractions_to_keep():
    """A few hundred training steps on real text (standard-library source as bytes):
    the eval-mode kept fraction of each subsampling module under the paper's rule
    (score > 0: what the balancer is for) lands within 0.05 of its keep ratio, as the
    training-mode top-k keeps. Without the balancer it does not. (The default rank rule
    keeps about its share whatever the scores, so it cannot show the balancer's effect:
    under it, the unbalanced control landed within 0.05 on one CI machine.)"""
    import argparse
    import inspect
    import random

    src = (inspect.getsource(random) + inspect.getsource(argparse)).encode()
    data = torch.tensor(list(src), dtype=torch.long)

    def run(strength: float) -> list[float]:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=256, dim=64, n_layers=6, n_heads=4, ffn_dim=172,
                          max_seq_len=128, structure="T(TT(T)T)T", keep=0.64,
                          balancer_strength=strength, threshold="zero")
        m = SubLLM(cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
        steps, L, B = 400, 128, 8
        for step in range(steps):
            warm = min(1.0, (step + 1) / 20)
            cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = 3e-3 * warm * cos
            m.train()
            m.set_step(step)
            ix = torch.randint(0, len(data) - L, (B,))
            x = torch.stack([data[i:i + L] for i in ix])
            loss = m(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        g = torch.Generator().manual_seed(1)
        ix = torch.randint(0, len(data) - L, (64,), generator=g)
        with torch.no_grad():
            return m(torch.stack([data[i:i + L] for i in ix])).kept_fractions

    fractions = run(0.04)
    print("eval-mode kept fractions after 400 steps:", fractions)
    assert all(abs(f - 0.64) <= 0.05 for f in fractions), fractions
    unbalanced = run(0.0)
    print("without the balancer:", unbalanced)
    assert any(abs(f - 0.64) > 0.05 for f in unbalanced), unbalanced


def _train_bypass_against(pull: float, limit_prob: float) -> tuple[list[float], Tensor]:
    """Train a Bypass alone with a loss pulling c towards `pull`; returns the per-step
    distance outside [c_min(step), 1] and the final c."""
    from subllm.model import Bypass, Selection

    torch.manual_seed(0)
    cfg = tiny(bypass_min_steps=200, bypass_init=0.95, bypass_limit_prob=limit_prob)
    bypass = Bypass(cfg).train()
    opt = torch.optim.Adam(bypass.parameters(), lr=5e-3)
    B, L, K, d = 2, 16, 8, cfg.dim
    outside = []
    for step in range(400):
        x_out, y = torch.randn(B, L, d), torch.randn(B, K, d)
        idx = torch.stack([torch.randperm(L)[:K].sort().values for _ in range(B)])
        sel = Selection(idx, torch.rand(B, K), None, torch.full((B,), K), torch.full((B,), L))
        z = bypass(x_out, y, sel, step)
        u_minus_x = ((z - x_out) / bypass.scale).detach()
        loss = (z - (x_out + pull * u_minus_x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        c, c_min = bypass.scale.detach(), bypass.min_scale(step + 1)
        outside.append(max(float((c_min - c).max()), float((c - 1).max()), 0.0))
    return outside, bypass.scale.detach()


@pytest.mark.parametrize("pull", [0.0, 2.0])
def test_bypass_scale_stays_within_schedule(pull):
    """c is held in [c_min(step), 1] by gradient-sign flips on 60% of steps (design.md §3.4),
    while the loss pulls it hard towards `pull` (0: below c_min; 2: above 1) and c_min
    falls from 0.9 to 0.2. Adam's momentum lets c overshoot the boundary by a few steps
    (lr = 5e-3 each) before the flips bring it back; without the flips it runs away."""
    outside, c = _train_bypass_against(pull, 0.6)
    assert max(outside) < 0.15, max(outside)
    assert sum(outside[-100:]) / 100 < 0.05
    if pull == 0.0:  # followed c_min down to its floor
        assert 0.15 < float(c.min()) and float(c.max()) < 0.25
    else:
        assert 0.95 < float(c.min()) and float(c.max()) < 1.05
    runaway, _ = _train_bypass_against(pull, 0.0)  # control: no limit at all
    assert sum(runaway[-100:]) / 100 > 0.1


@pytest.mark.slow
def test_meta_device_construction_and_param_count():
    with torch.device("meta"):
        llama = SubLLM(ModelConfig.preset("llama-1.3b"))
        sub = SubLLM(ModelConfig.preset("subllm-1.3b"))
    assert llama.embed_tokens.weight.is_meta
    assert abs(llama.num_params() - 1.345e9) < 0.001e9
    assert sub.num_params() == llama.num_params() + 2 * 2048 + 2 * 2048
    sub.to_empty(device="cpu")
    sub.init_weights()
    assert float(sub.bypasses[0].scale.detach()[0]) == 0.5


def test_bf16_autocast_trains():
    torch.manual_seed(0)
    m = SubLLM(tiny()).train()
    x = torch.randint(0, 97, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_too_long_input_is_an_error():
    from subllm import SubLLMError

    m = SubLLM(tiny(max_seq_len=16)).eval()
    with pytest.raises(SubLLMError, match="exceeds the model's context"):
        m(torch.zeros(1, 17, dtype=torch.long))
