"""Routing: the calibrated threshold, the paper's balancer, forced selection rules
(docs/design.md §3.5, §3.8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from subllm import ModelConfig, SubLLM
from subllm.model.config import ConfigError
from subllm.model.subsample import (
    CUTOFF_BUFFERS,
    Subsampler,
    _PaperBalance,
    selection_rule,
)


def tiny(**over) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_heads=2, ffn_dim=64, n_layers=4, structure="T(TT)T",
                keep=0.6, max_seq_len=64)
    return ModelConfig(**{**base, **over})


def test_the_calibrated_cutoff_converges_to_the_top_k_cut_of_the_score_distribution() -> None:
    """Fresh Gaussian hidden states through a fixed scorer, s = x0 + x1 + 0.7 ~ N(0.7, 2):
    the running cut-off must reach the analytic quantile of what top-k drops,
    0.7 + sqrt(2) q(1 - 39/64),
    and the threshold then keeps `keep` of new tokens. The paper's rule (score > 0) keeps
    Phi(0.7 / sqrt(2)) = 0.69 of them: the control that does not follow the keep ratio."""
    torch.manual_seed(0)
    keep = 0.6
    sub = Subsampler(tiny(threshold="calibrated"), keep)
    with torch.no_grad():
        sub.score.weight.zero_()
        sub.score.weight[0, :2] = 1.0

    def hidden(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, 32)
        x[..., 2:] = 0.0
        x[..., 0] += 0.7
        return x

    sub.train()
    for _ in range(600):
        sub(hidden(8, 64).requires_grad_(True), None)
        sub.apply_pending()
    kept = math.ceil(keep * 64) / 64  # what top-k keeps of a 64-token row: 39 tokens
    reference = 0.7 + math.sqrt(2.0) * torch.special.ndtri(torch.tensor(1 - kept,
                                                                         dtype=torch.float64))
    assert sub.cutoff.item() == pytest.approx(reference.item(), abs=0.03)
    x = hidden(32, 64)
    sub.eval()
    with torch.no_grad():
        frac = sub(x, None).count.sum().item() / x.shape[0] / x.shape[1]
    assert abs(frac - kept) < 0.02
    zero = Subsampler(tiny(threshold="zero"), keep)
    zero.load_state_dict(sub.state_dict())
    zero.eval()
    with torch.no_grad():
        frac = zero(x, None).count.sum().item() / x.shape[0] / x.shape[1]
    assert frac == pytest.approx(0.69, abs=0.02)


def test_every_micro_batch_of_a_step_sees_the_same_cutoff_and_resume_is_exact() -> None:
    torch.manual_seed(1)
    model = SubLLM(tiny()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(5):
        model.set_step(step)
        before = model.subsamplers[0].cutoff.clone()
        for _ in range(2):  # two micro-batches
            x = torch.randint(0, 97, (2, 32))
            model(x, labels=x).loss.backward()
            assert torch.equal(model.subsamplers[0].cutoff, before)
        opt.step()
        opt.zero_grad()
    assert model.subsamplers[0].cutoff_updates.item() == 4  # step 4's pending: not yet folded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(f"subsamplers.0.{name}" in state for name in CUTOFF_BUFFERS)
    twin = SubLLM(tiny())
    twin.load_state_dict(state)
    for m in (model, twin):
        m.set_step(5)
    assert torch.equal(model.subsamplers[0].cutoff, twin.subsamplers[0].cutoff)
    assert model.subsamplers[0].cutoff_updates.item() == 5


def test_a_state_dict_from_before_the_calibrated_cutoff_loads_with_the_papers_rule() -> None:
    torch.manual_seed(2)
    model = SubLLM(tiny()).eval()
    old = {k: v for k, v in model.state_dict().items()
           if not any(k.endswith(name) for name in CUTOFF_BUFFERS)}
    fresh = SubLLM(tiny(threshold="calibrated"))
    with torch.no_grad():
        fresh.subsamplers[0].cutoff.fill_(3.0)
    fresh.load_state_dict(old)  # strict: the missing buffers are filled in, with 0
    assert fresh.subsamplers[0].cutoff.item() == 0.0
    paper = SubLLM(tiny(threshold="zero")).eval()
    paper.load_state_dict(old)
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x).logits, paper(x).logits, rtol=0, atol=0)


def test_selection_rule_forces_top_k_in_eval_and_threshold_in_training() -> None:
    torch.manual_seed(3)
    model = SubLLM(tiny()).eval()
    x = torch.randint(0, 97, (3, 50))
    with torch.no_grad(), selection_rule(model, "top_k"):
        out = model(x)
    assert out.kept[0].tolist() == [math.ceil(0.6 * 50)] * 3
    with torch.no_grad():
        by_threshold = model(x).kept[0]
    model.train()
    with torch.no_grad(), selection_rule(model, "threshold"):
        forced = model(x).kept[0]
    assert torch.equal(forced, by_threshold)
    assert all(m.rule is None for m in model.subsamplers)  # restored
    with pytest.raises(ValueError):
        with selection_rule(model, "topk"):
            pass


def test_the_papers_balancer_gradient_matches_an_fp64_transcription_of_the_paper() -> None:
    """design.md §3.5: penalty |m/sd - clamp(m/sd, q(keep-.05), q(keep+.05))| +
    |log(clamp(r, 1.25, 5) / r)|; its gradient at unit rms, times 0.04 * |g|, added to g."""
    torch.manual_seed(4)
    keep = 0.64
    s = (torch.randn(4, 30, dtype=torch.float64) * 0.3 + 0.9).float()  # too many positive
    g = torch.randn(4, 30)
    x = s.clone().requires_grad_(True)
    _PaperBalance.apply(x, None, keep - 0.05, keep + 0.05, 1.25, 5.0, 0.04).backward(g)
    ref = s.double().requires_grad_(True)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    lo, hi = normal.icdf(torch.tensor(keep - 0.05, dtype=torch.float64)), normal.icdf(
        torch.tensor(keep + 0.05, dtype=torch.float64))
    m, sd = ref.mean(), ref.std(correction=0)
    r = ref.pow(2).mean().sqrt()
    penalty = (m / sd - (m / sd).clamp(lo, hi)).abs() + torch.log(r.clamp(1.25, 5.0) / r).abs()
    (dp,) = torch.autograd.grad(penalty, ref)
    expected = g.double() + dp / dp.pow(2).mean().sqrt() * 0.04 * g.double().abs()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(x.grad, g)  # the penalty acted (m / sd is above the band)


@pytest.mark.parametrize("field, value", [("balancer", "gaussian"), ("threshold", "auto"),
                                          ("threshold_decay", 1.0),
                                          ("rank_band", -0.01), ("rank_band", 1.5),
                                          ("rank_band", "0.02"), ("rank_band", True)])
def test_routing_settings_are_checked(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        tiny(**{field: value})


# --------------------------------------------------------------------------------------
# The rank rule (design.md §3.8): training's top-k made causal


def rank_reference(s: list[list[float]], valid: list[list[bool]], keep: float
                   ) -> list[list[bool]]:
    """The rule as stated, in plain Python: keep token t iff fewer than round(keep * n_t)
    (halves up) of the row's real tokens before it score higher, n_t = real tokens <= t."""
    out = []
    for row, ok in zip(s, valid, strict=True):
        kept = []
        for t, (st, vt) in enumerate(zip(row, ok, strict=True)):
            n = sum(ok[: t + 1])
            above = sum(1 for j in range(t) if ok[j] and row[j] > st)
            kept.append(vt and above < math.floor(keep * n + 0.5))
        out.append(kept)
    return out


@pytest.mark.parametrize("keep", [0.3, 0.64, 0.9])
def test_the_rank_rule_equals_its_plain_statement_with_padding_and_a_past(
        keep: float) -> None:
    from subllm.model import subsample

    torch.manual_seed(int(keep * 100))
    B, L = 3, 37
    s = torch.randn(B, L, dtype=torch.float64)
    s[0, 5:9] = s[0, 4]  # ties: an equal score is not higher
    valid = torch.rand(B, L) > 0.2
    valid[1, :11] = False  # left padding
    expected = torch.tensor(rank_reference(s.tolist(), valid.tolist(), keep))
    full = subsample.causal_rank_keep(s, valid, keep)
    assert torch.equal(full, expected)
    assert 0 < int(full.sum()) < int(valid.sum())
    # continued from a cached past, the decisions are the same
    for cut in (1, 20, L - 1):
        tail = subsample.causal_rank_keep(s[:, cut:], valid[:, cut:], keep,
                                          s[:, :cut], valid[:, :cut])
        assert torch.equal(tail, expected[:, cut:])


@pytest.mark.parametrize("L", [1, 2, 255, 256, 257, 1000])
def test_the_rank_rules_merge_count_equals_comparing_every_pair(L: int) -> None:
    """The rule's O(L log^2 L) count of higher earlier scores equals the all-pairs count, on
    rows of any length (powers of two and not), with ties, padding and a cached past."""
    from subllm.model.subsample import causal_rank_keep

    g = torch.Generator().manual_seed(L)
    B, P = 3, 17
    s = torch.randint(-40, 40, (B, L), generator=g).float() / 8  # many ties
    valid = torch.rand(B, L, generator=g) > 0.25
    past = torch.randn(B, P, generator=g)
    past_valid = torch.rand(B, P, generator=g) > 0.25
    both = torch.cat([past, s], 1)
    ok = torch.cat([past_valid, valid], 1)
    earlier = torch.ones(P + L, P + L, dtype=torch.bool).tril(-1)  # [t, j]: j before t
    above = ((both[:, None, :] > both[:, :, None]) & ok[:, None, :] & earlier).sum(-1)
    n = ok.long().cumsum(1)
    expected = ((above < torch.floor(n * 0.64 + 0.5)) & ok)[:, P:]
    assert torch.equal(causal_rank_keep(s, valid, 0.64, past, past_valid), expected)
    alone = ((above[:, P:] - ((past[:, None, :] > s[:, :, None]) & past_valid[:, None, :])
              .sum(-1)) < torch.floor(valid.long().cumsum(1) * 0.64 + 0.5)) & valid
    assert torch.equal(causal_rank_keep(s, valid, 0.64), alone)


def test_the_rank_rule_keeps_the_share_wherever_the_scores_sit_and_a_threshold_does_not(
        ) -> None:
    """Both rules calibrated on ~N(0, 1) scores (training passes); then every score moves by
    half a standard deviation (another text, a scorer that moved): the rank rule's kept share
    stays at keep, the calibrated threshold's follows the shift (0.15-0.17; the control)."""
    torch.manual_seed(5)
    keep, L = 0.64, 256
    ranked = Subsampler(tiny(), keep)
    with torch.no_grad():
        ranked.score.weight.normal_(0.0, 32 ** -0.5)
    ranked.train()
    for _ in range(200):
        ranked(torch.randn(8, L, 32).requires_grad_(True), None)
        ranked.apply_pending()
    ranked.eval()
    calibrated = Subsampler(tiny(threshold="calibrated"), keep).eval()
    calibrated.load_state_dict(ranked.state_dict())
    w = ranked.score.weight[0]
    x = torch.randn(32, L, 32)
    shares = {}
    with torch.no_grad():
        for shift in (-0.5, 0.0, 0.5):
            y = x + shift * w / w.pow(2).sum()  # every score moves by `shift`
            shares[shift] = [float(m(y, None).count.sum()) / y.shape[0] / L
                             for m in (ranked, calibrated)]
    for rank_share, _ in shares.values():
        assert abs(rank_share - keep) < 0.015, shares  # rounding: 0.630 at 256 tokens
    assert abs(shares[0.0][1] - keep) < 0.04, shares  # calibrated on these scores
    assert shares[-0.5][1] < keep - 0.12 and shares[0.5][1] > keep + 0.12, shares


# --------------------------------------------------------------------------------------
# The rank rule's budget band (design.md §3.8)


def band_reference(rank: list[list[bool]], valid: list[list[bool]], keep: float, band: float
                   ) -> list[list[bool]]:
    """The band as stated, in plain Python, token by token: keep the rank rule's decision
    unless it would take the row's kept count above min(n, ceil((keep + band) n)) (then
    drop) or leave it below floor((keep - band) n) (then keep), n = real tokens so far."""
    out = []
    for row, ok in zip(rank, valid, strict=True):
        kept, c, n = [], 0, 0
        for r, v in zip(row, ok, strict=True):
            if not v:
                kept.append(False)
                continue
            n += 1
            lo = max(0, math.floor(round(n * (keep - band), 6)))
            hi = min(n, math.ceil(round(n * (keep + band), 6)))
            k = (r and c + 1 <= hi) or c < lo
            c += k
            kept.append(k)
        out.append(kept)
    return out


@pytest.mark.parametrize("keep, band", [(0.3, 0.0), (0.64, 0.02), (0.9, 0.05), (0.5, 0.2)])
def test_the_band_equals_its_plain_statement_with_padding_and_a_past(keep: float,
                                                                     band: float) -> None:
    from subllm.model.subsample import keep_within_band

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    B, L = 4, 203
    # runs of keeps and of drops (a rank rule on trending scores), so the band binds
    p = torch.rand(B, L // 20 + 1, generator=gen).repeat_interleave(20, 1)[:, :L]
    rank = torch.rand(B, L, generator=gen) < p
    valid = torch.rand(B, L, generator=gen) > 0.15
    valid[2, :31] = False  # left padding
    expected = torch.tensor(band_reference(rank.tolist(), valid.tolist(), keep, band))
    got = keep_within_band(rank, valid, keep, band)
    assert torch.equal(got, expected)
    assert not torch.equal(got, rank & valid)  # the band overruled the rank rule somewhere
    for cut in (1, 64, 150, L - 1):  # continued from cached decisions (decoding)
        tail = keep_within_band(rank[:, cut:], valid[:, cut:], keep, band, expected[:, :cut],
                                valid[:, :cut])
        assert torch.equal(tail, expected[:, cut:])


def test_the_band_holds_every_row_where_the_rank_rule_drifts() -> None:
    """Scores that trend along the row (rising: later tokens beat their prefix; falling:
    they do not) make the plain rank rule keep far more or far less than keep (the control);
    with the band every row keeps keep +- band + one token, every prefix of it too."""
    from subllm.model.subsample import causal_rank_keep, keep_within_band

    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    keep, band, B, L = 0.64, 0.02, 16, 256
    t = torch.arange(L, dtype=torch.float64)
    for trend in (1.0, -1.0):
        s = trend * t / L * 3 + torch.randn(B, L, dtype=torch.float64)
        plain = causal_rank_keep(s, None, keep)
        share = plain.double().mean(1)
        assert (share - keep).abs().min() > 0.05, share  # the drift the band is for
        kept = keep_within_band(plain, None, keep, band)
        prefix = kept.long().cumsum(1).double() / (t + 1)
        slack = band + 1 / (t + 1)
        assert ((prefix - keep).abs() <= slack + 1e-9).all()
        assert ((kept.double().mean(1) - keep).abs() <= band + 1 / L).all()


def test_decoding_with_a_binding_band_equals_the_full_pass() -> None:
    """A nested model whose band binds (band 0: the count tracks keep x n to a token):
    prefill + token-by-token decoding reads the cached decisions and equals the full pass;
    without the band it decides otherwise (the check is not vacuous)."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = tiny(structure="T(T(TT)T)T", n_layers=6, keep=0.6, rank_band=0.0)
    m = SubLLM(cfg).double().eval()
    with torch.no_grad():
        for sub in m.subsamplers:
            sub.score.weight.normal_(0, 0.5)
    x = torch.randint(0, 97, (3, 48))
    full = m(x)
    plain = copy.deepcopy(m)
    for sub in plain.subsamplers:
        sub.band = None
    assert any(not torch.equal(a, b) for a, b in zip(full.kept, plain(x).kept, strict=True))
    out = m(x[:, :9], use_cache=True)
    pieces, t = [out.logits], 9
    for n in (1, 4, 1):
        pieces.append(m(x[:, t:t + n], cache=out.cache).logits)
        t += n
    while t < x.shape[1]:
        pieces.append(m(x[:, t:t + 1], cache=out.cache).logits)
        t += 1
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits, atol=1e-10, rtol=0)


def test_a_saved_config_without_threshold_loads_with_the_rule_it_was_trained_for(
        tmp_path) -> None:
    """Checkpoints and exports from before `threshold` existed decided by score > 0."""
    from subllm.model.hf_config import SubLLMConfig
    from subllm.train import checkpoint as ckpt

    assert ModelConfig().threshold == "rank"  # new models
    d = tiny().to_dict()
    del d["threshold"]
    (tmp_path / "model_config.json").write_text(__import__("json").dumps(d))
    assert ckpt.load_model_config(tmp_path)["threshold"] == "zero"
    hf = SubLLMConfig.from_model_config(tiny()).to_dict()
    del hf["threshold"]
    assert SubLLMConfig.from_dict(hf).threshold == "zero"
    assert SubLLMConfig.from_dict({**hf, "threshold": "rank"}).threshold == "rank"


def test_a_saved_config_without_rank_band_loads_without_a_band(tmp_path) -> None:
    """Checkpoints and exports from before the band keep deciding as they did."""
    from subllm.model.hf_config import SubLLMConfig
    from subllm.train import checkpoint as ckpt

    assert ModelConfig().rank_band == 0.02  # new models
    d = tiny().to_dict()
    del d["rank_band"]
    (tmp_path / "model_config.json").write_text(__import__("json").dumps(d))
    assert ckpt.load_model_config(tmp_path)["rank_band"] is None
    hf = SubLLMConfig.from_model_config(tiny()).to_dict()
    assert SubLLMConfig.from_dict(hf).rank_band == 0.02
    del hf["rank_band"]
    assert SubLLMConfig.from_dict(hf).rank_band is None
    assert SubLLM(ModelConfig(**{**d, "rank_band": None})).subsamplers[0].band is None
