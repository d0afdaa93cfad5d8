import math

import pytest

from subllm import ConfigError, ModelConfig, SubLLMError, parse_structure
from subllm.model.config import PAPER_STRUCTURE, PRESETS, Segment


def test_parse_structure_tree():
    tree = parse_structure("TT(T(TT)T)T")
    assert tree[:2] == [0, 1]
    outer = tree[2]
    assert isinstance(outer, Segment) and outer.index == 0 and outer.depth == 1
    inner = outer.children[1]
    assert isinstance(inner, Segment) and inner.index == 1 and inner.depth == 2
    assert inner.children == [3, 4]
    assert outer.blocks() == [2, 3, 4, 5]
    assert tree[3] == 6


@pytest.mark.parametrize(
    "structure, n_layers, fragment",
    [
        ("TT(TT", 4, "position 2 is never closed"),
        ("TT)TT", 4, "')' at position 2"),
        ("T()T", 2, "empty segment"),
        ("T(())T", 2, "empty segment"),
        ("TXT", 2, "invalid character 'X' at position 1"),
        ("T(T)T", 4, "has 3 'T' blocks but n_layers=4"),
        ("", 1, "non-empty"),
    ],
)
def test_bad_structure_is_a_clear_error(structure, n_layers, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig(vocab_size=10, dim=8, n_layers=n_layers, n_heads=2, ffn_dim=16,
                    structure=structure)
    assert fragment in str(e.value)
    assert isinstance(e.value, SubLLMError)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(keep=0.0), "keep ratio must be in (0, 1]"),
        (dict(keep=1.5), "keep ratio must be in (0, 1]"),
        (dict(keep=[0.5]), "one per depth"),
        (dict(dim=10, n_heads=4), "not divisible by n_heads"),
        (dict(n_kv_heads=3), "not a multiple of n_kv_heads"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, fragment):
    base = dict(vocab_size=10, dim=16, n_layers=3, n_heads=4, ffn_dim=16,
                structure="T(T(T))", keep=0.5)
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**base, **kwargs})
    assert fragment in str(e.value)


def test_keep_per_depth_and_compute_fraction():
    c = ModelConfig.preset("subllm-1.3b")
    assert c.keep_per_depth == [0.64, 0.64]
    assert c.compute_fraction() == pytest.approx((10 + 10 * 0.64 + 4 * 0.64**2) / 24)
    c2 = ModelConfig(vocab_size=10, dim=16, n_layers=3, n_heads=4, ffn_dim=16,
                     structure="T(T(T))", keep=[0.5, 0.25])
    assert c2.block_fractions() == {0: 1.0, 1: 0.5, 2: 0.125}


def test_presets_pair_sizes_and_paper_model():
    for name in PRESETS:
        c = ModelConfig.preset(name)
        if name.startswith("llama"):
            s = ModelConfig.preset("subllm" + name[len("llama"):])
            same = {k: v for k, v in c.to_dict().items() if k not in ("structure",)}
            assert same == {k: v for k, v in s.to_dict().items() if k != "structure"}
            assert not c.is_subllm and s.is_subllm
    p = ModelConfig.preset("subllm-1.3b")
    assert p.structure == PAPER_STRUCTURE
    assert (p.vocab_size, p.dim, p.n_layers, p.n_heads, p.ffn_dim, p.max_seq_len) == (
        32000, 2048, 24, 16, 5504, 4096)
    assert not p.tie_embeddings and p.norm_eps == 1e-5


def test_unknown_preset_and_key():
    with pytest.raises(ConfigError, match="did you mean 'subllm-tiny'"):
        ModelConfig.preset("subllm-tinny")
    with pytest.raises(ConfigError, match="did you mean 'n_heads'"):
        ModelConfig.from_dict({"n_head": 4})


def test_config_file_roundtrip(tmp_path):
    c = ModelConfig(vocab_size=50, dim=16, n_layers=3, n_heads=4, ffn_dim=32,
                    structure="T(T)T", keep=0.5)
    p = tmp_path / "m.yaml"
    import yaml

    p.write_text(yaml.safe_dump(c.to_dict()))
    assert ModelConfig.load(str(p)) == c
    bad = tmp_path / "bad.yaml"
    bad.write_text("dim: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        ModelConfig.load(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.load(str(tmp_path / "missing.yaml"))


def test_keep_count_is_ceil():
    import torch

    from subllm.model.subsample import _keep_count

    for keep in (0.64, 0.5, 0.3, 1.0, 0.01):
        for n in (1, 7, 100, 2048, 4095):
            assert int(_keep_count(keep, torch.tensor([n]))[0]) == math.ceil(round(keep * n, 6))
