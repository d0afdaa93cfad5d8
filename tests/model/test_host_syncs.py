"""No host sync where the issue asks for none (design.md §3.7, §3.10): a training step
(plain, padded and packed rows) and a decoding step never read a value back from the
device. The check runs the model on PyTorch's `meta` device, whose tensors hold no data:
anything that reads one back (`.item()`, `.tolist()`, `bool()`, `nonzero`, boolean
indexing: on a GPU, a host sync each) raises there. Host-side values (the CPU batch, the
CPU generator's coins, AdamW's step counts) stay on the CPU and are read freely. On a GPU,
tests/test_cuda.py checks the same with torch.cuda.set_sync_debug_mode("error")."""

import pytest
import torch

from subllm import ModelConfig, SubLLM
from subllm.model import subllm as subllm_module
from subllm.train.loop import train_step

META = torch.device("meta")


def tiny(structure):
    return ModelConfig(vocab_size=97, dim=32, n_layers=structure.count("T"), n_heads=4,
                       n_kv_heads=2, ffn_dim=64, max_seq_len=256, structure=structure,
                       keep=0.5)


def rows(batch=2, length=96, eot=None):
    ids = torch.randint(1, 97, (batch, length))
    if eot is not None:  # documents ending at random places
        ids[torch.rand(batch, length) < 0.05] = eot
    return ids


@pytest.mark.parametrize("structure", ["TTT", "T(T(T)T)T"])
@pytest.mark.parametrize("batch", ["plain", "padded", "packed"])
def test_a_training_step_reads_nothing_back(structure, batch):
    model = SubLLM(tiny(structure)).to(META).train()
    model.set_step(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if batch == "packed":  # the loop counts the documents on the CPU batch
        train_step(model, opt, [rows(eot=5)], device=META, eot_id=5)
        return
    ids = rows()
    mask = None
    if batch == "padded":  # on the CPU, as a collator makes it: read there, not on META
        mask = (torch.arange(96) < torch.tensor([[60], [96]])).long()
    out = model(ids.to(META), labels=ids.to(META), attention_mask=mask)
    out.loss.backward()
    opt.step()


def test_the_check_sees_a_sync():
    """Packed rows without the host's document count read the kept counts back: the meta
    device must refuse that, or the tests above prove nothing."""
    model = SubLLM(tiny("T(T)T")).to(META).train()
    ids = rows(eot=5)
    docs = subllm_module.document_ids(ids, 5)
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(ids.to(META), labels=ids.to(META), document_ids=docs.to(META))


def _to_meta(cache):
    for key, (t, _, _) in cache._slot_buffers().items():
        cache._set_slot_buffer(key, t.to(META))
    cache.next_pos = cache.next_pos.to(META)
    return cache


@pytest.mark.parametrize("structure", ["TTT", "T(T(T)T)T"])
@pytest.mark.parametrize("rows_, sync_free", [(subllm_module.SYNC_FREE_ROWS, False), (1, True)])
def test_a_decoding_step_reads_nothing_back(structure, rows_, sync_free):
    torch.manual_seed(0)
    model = SubLLM(tiny(structure)).eval()
    model.sync_free_decoding = sync_free
    with torch.no_grad():
        cache = model(rows(rows_, 40), use_cache=True).cache  # prefill on the CPU
        model.to(META)
        _to_meta(cache)
        for _ in range(3):
            out = model(torch.randint(0, 97, (rows_, 1), device=META), cache=cache)
    assert out.logits.shape == (rows_, 1, 97)


def test_a_single_row_decoding_step_asks_the_host_by_default():
    """One row: the step reads back whether the token entered each segment, to skip the
    segment's blocks when it did not (worth more than the wait in eager mode)."""
    model = SubLLM(tiny("T(T)T")).eval()
    with torch.no_grad():
        cache = model(rows(1, 40), use_cache=True).cache
        model.to(META)
        _to_meta(cache)
        with pytest.raises((RuntimeError, NotImplementedError)):
            model(torch.randint(0, 97, (1, 1), device=META), cache=cache)


@pytest.mark.parametrize("structure", ["T(T)T", "T(T(T)T)T"])
@pytest.mark.parametrize("batch", [1, 3])
def test_sync_free_decoding_gets_the_logits_of_a_full_forward(structure, batch):
    """Running a segment on a masked slot where a row dropped the token changes nothing:
    each decoded step's logits equal those of one forward pass over the whole sequence."""
    seed = int(torch.randint(0, 10**6, ()))
    torch.manual_seed(seed)
    model = SubLLM(tiny(structure)).eval()
    with torch.no_grad():
        for s in model.subsamplers:  # scores spread around 0 and into (0, 1)
            s.score.weight.normal_(0, 0.5)
        ids = rows(batch, 48)
        full = model(ids).logits
        for sync_free in (False, True):
            model.sync_free_decoding = sync_free
            cache = model(ids[:, :32], use_cache=True).cache
            for t in range(32, 48):
                step = model(ids[:, t:t + 1], cache=cache).logits[:, 0]
                torch.testing.assert_close(step, full[:, t], rtol=1e-4, atol=1e-4,
                                           msg=f"seed {seed}, sync_free {sync_free}, t {t}")
