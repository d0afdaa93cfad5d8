"""torch.compile of the blocks (apply_mst(compile=True), `subllm train --compile`): the
compiled training steps give eager's losses; eval mode stays eager; no compiler, one line."""

from __future__ import annotations

import copy

import pytest
import torch

import subllm.model.mst as mst
from subllm.errors import SubLLMError
from subllm.model import ModelConfig, SubLLM
from subllm.model.mst import apply_mst, check_compile_available


def _compiler_or_skip() -> None:
    try:
        check_compile_available("cpu")
    except SubLLMError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_for_20_steps():
    _compiler_or_skip()
    from torch._dynamo.utils import counters

    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=3, n_heads=2, ffn_dim=64,
                      structure="T(T)T", keep=0.5, max_seq_len=64)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    eager = SubLLM(cfg).train()
    compiled = copy.deepcopy(eager)
    # MsT on both (chunked MLP inside the compiled blocks, chunked loss, checkpointing)
    apply_mst(eager, mlp_chunks=2, min_chunk_tokens=8)
    apply_mst(compiled, mlp_chunks=2, min_chunk_tokens=8, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (eager, compiled)]
    graphs0 = counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    losses: list[tuple[float, float]] = []
    # one batch throughout: fresh uniform tokens have nothing to learn (their loss stays at
    # ln 256 and "it trained" below would be a coin toss); a fixed batch is memorised
    batch = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
    for step in range(20):
        ids = batch
        pair = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            model.set_step(step)
            torch.manual_seed(step)  # the same training-mode randomness in both
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            pair.append(float(loss))
        losses.append((pair[0], pair[1]))
    for a, b in losses:
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), losses
    assert losses[-1][0] < losses[0][0]  # it trained
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > graphs0  # the blocks did compile
    # eval mode (data-dependent kept counts) and generation run eager: nothing new compiles,
    # and the logits are those of an eager model holding the same weights, bit for bit (not
    # `eager`'s: 20 steps apart, float differences of the compiled kernels have moved them)
    reference = SubLLM(cfg)
    apply_mst(reference, mlp_chunks=2, min_chunk_tokens=8)
    reference.load_state_dict(compiled.state_dict())
    compiled.eval()
    reference.eval()
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
        assert torch.equal(compiled(ids).logits, reference(ids).logits)
        compiled.generate(ids[:, :5], max_new_tokens=4)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model = SubLLM(ModelConfig.preset("llama-tiny"))
    with pytest.raises(SubLLMError, match="C\\+\\+ compiler") as info:
        apply_mst(model, compile=True)
    assert "\n" not in str(info.value)
    with pytest.raises(SubLLMError, match="not supported"):
        mst.compile_blocks(torch.nn.Linear(2, 2))


def test_train_compile_without_a_compiler_is_one_line(tmp_path, prepare_corpus, tiny_settings,
                                                      monkeypatch, capsys):
    import yaml

    from subllm.cli import main

    data = prepare_corpus(tmp_path, 3)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(data)))
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    run = tmp_path / "run"
    capsys.readouterr()  # what preparing the corpus printed
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--out", str(run),
                 "--compile"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "C++ compiler" in err[0]
    assert not run.exists()  # a start that fails leaves nothing behind
