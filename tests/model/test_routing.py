"""Routing: the calibrated threshold, the paper's balancer, forced selection rules
(docs/design.md §3.5, §3.8)."""

from __future__ import annotations

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
    sub = Subsampler(tiny(), keep)
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
    fresh = SubLLM(tiny())
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
                                          ("threshold_decay", 1.0), ("weight_leak", -0.1)])
def test_routing_settings_are_checked(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        tiny(**{field: value})
