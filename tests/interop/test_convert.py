import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from subllm import ConfigError, ModelConfig, SubLLM, SubLLMError, from_hf_llama, to_hf_llama


def hf_llama(n_kv_heads=2, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("n_kv_heads, tie", [(8, False), (2, False), (4, True)])
def test_from_hf_llama_matches_transformers(n_kv_heads, tie):
    hf = hf_llama(n_kv_heads, tie)
    ours = from_hf_llama(hf).eval()
    assert not ours.config.is_subllm and ours.config.n_kv_heads == n_kv_heads
    assert ours.config.rope_theta == 5000.0
    x = torch.randint(0, 211, (2, 33))
    torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=0)
    # with left padding and an attention mask too
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    a = ours(x, attention_mask=mask).logits
    b = hf(x, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(a[1, 9:], b[1, 9:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_kv_heads, tie", [(4, False), (1, True)])
def test_to_hf_llama_matches_ours(n_kv_heads, tie):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=150, dim=48, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads,
                      ffn_dim=96, max_seq_len=64, tie_embeddings=tie, norm_eps=1e-6)
    ours = SubLLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a dropped norm would show
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf = to_hf_llama(ours).eval()
    x = torch.randint(0, 150, (3, 40))
    torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-4, rtol=0)
    labels = x.clone()
    labels[:, :5] = -100
    torch.testing.assert_close(hf(x, labels=labels).loss, ours(x, labels=labels).loss,
                               atol=1e-5, rtol=0)


def test_from_hf_llama_into_subllm_structure_copies_blocks_and_trains():
    hf = hf_llama(seed=3)
    ours = from_hf_llama(hf, structure="T(T)T", keep=0.5)
    assert ours.config.structure == "T(T)T" and len(ours.subsamplers) == 1
    hs = hf.state_dict()
    torch.testing.assert_close(ours.layers[1].mlp.up_proj.weight,
                               hs["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(ours.lm_head.weight, hs["lm_head.weight"])
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    x = torch.randint(0, 211, (4, 32))
    losses = []
    for step in range(30):
        ours.set_step(step)
        loss = ours(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_to_hf_llama_refuses_subsampled_model():
    m = SubLLM(ModelConfig(vocab_size=10, dim=16, n_layers=3, n_heads=2, ffn_dim=16,
                           structure="T(T)T"))
    with pytest.raises(SubLLMError, match="needs a LLaMA structure"):
        to_hf_llama(m)


def test_from_hf_llama_refuses_unsupported_rope_scaling():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=64,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                       "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                       "original_max_position_embeddings": 32})
    with pytest.raises(ConfigError, match="rope scaling 'longrope' is not supported"):
        from_hf_llama(LlamaForCausalLM(cfg))
