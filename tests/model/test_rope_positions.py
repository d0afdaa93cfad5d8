"""`rope_positions: parent` (design.md §3.3): a nested segment's blocks rotate by the
token's index among the enclosing segment's kept tokens; full pass == prefill + cached
decoding. (The fp64 reference of the authors' model with both conventions is in
tests/interop/test_convert_cli.py.)"""

from __future__ import annotations

import pytest
import torch

from subllm import ModelConfig, SubLLM
from subllm.model.config import ConfigError


def nested(positions: str) -> SubLLM:
    torch.manual_seed(5)
    config = ModelConfig(vocab_size=101, dim=32, n_heads=4, ffn_dim=64, n_layers=10,
                         structure="TT(TT(TT)TT)TT", keep=0.6, max_seq_len=96,
                         rope_positions=positions, threshold="zero")
    model = SubLLM(config).eval()
    with torch.no_grad():  # scores of both signs, so both segments keep some tokens
        for sub in model.subsamplers:
            sub.score.weight.normal_(0.0, 0.5)
        for block in model.layers:  # sharp attention: what positions it sees matters
            block.self_attn.q_proj.weight.normal_(0.0, 0.3)
            block.self_attn.k_proj.weight.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("positions", ["parent", "original"])
def test_prefill_and_token_by_token_decoding_equal_the_full_pass(positions: str) -> None:
    model = nested(positions)
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        full = model(ids)
        assert all(0 < int(k.min()) and int(k.max()) < int(e.min())
                   for k, e in zip(full.kept, full.entered, strict=True)), (full.kept,)
        out = model(ids[:, :16], use_cache=True)
        logits = [out.logits]
        for t in range(16, 40):
            out = model(ids[:, t:t + 1], cache=out.cache)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_decode_as_each_prompt_alone_under_parent_positions() -> None:
    model = nested("parent")
    a, b = torch.randint(0, 101, (1, 30)), torch.randint(0, 101, (1, 22))
    batch = torch.zeros(2, 30, dtype=torch.long)
    batch[0], batch[1, 8:] = a[0], b[0]
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :8] = 0
    with torch.no_grad():
        together = model.generate(batch, 6, attention_mask=mask)
        alone = [model.generate(x, 6) for x in (a, b)]
    assert torch.equal(together[0, -6:], alone[0][0, -6:])
    assert torch.equal(together[1, -6:], alone[1][0, -6:])


def test_the_conventions_differ_only_in_nested_segments() -> None:
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        parent, original = nested("parent")(ids).logits, nested("original")(ids).logits
    assert (parent - original).abs().max() > 1e-4  # depth 2 rotates differently (fp32 noise: 1e-7)
    torch.manual_seed(6)
    flat = dict(vocab_size=101, dim=32, n_heads=4, ffn_dim=64, n_layers=4, structure="T(TT)T",
                max_seq_len=96, threshold="zero")
    one = SubLLM(ModelConfig(**flat, rope_positions="parent")).eval()
    two = SubLLM(ModelConfig(**flat, rope_positions="original")).eval()
    two.load_state_dict(one.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(one(ids).logits, two(ids).logits, rtol=0, atol=0)


def test_rope_positions_is_checked() -> None:
    with pytest.raises(ConfigError, match="rope_positions"):
        ModelConfig(rope_positions="relative")
