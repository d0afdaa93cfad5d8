"""The Hugging Face ecosystem on SubLLMForCausalLM: Trainer (with the schedule callback,
apply_mst, activation checkpointing, gradient accumulation), PEFT LoRA, and
lm-evaluation-harness's HFLM on an exported directory.

References nobody here wrote where possible: Trainer's logged losses, PEFT's unmerged model
for the merged one, and log-probabilities / greedy decoding taken straight from the model's
logits on exactly the token ids HFLM used.
"""

from __future__ import annotations

import copy
import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import subllm.model.bypass
import subllm.model.subllm
import subllm.model.subsample
from subllm.errors import SubLLMError
from subllm.hf import SubLLMConfig, SubLLMForCausalLM, SubLLMScheduleCallback
from subllm.model.mst import MiniSequenceMLP, apply_mst

STEPS = 20
# TrainingArguments' name for activation checkpointing (transformers 5.x renamed it)
CHECKPOINTING_ARG = ("activation_checkpointing"
                     if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
PATTERN = [5, 17, 42, 9, 88, 23, 61, 30, 71, 12]  # the next token follows from the last one


def tiny_config(**kw) -> SubLLMConfig:
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                num_attention_heads=2, structure="T(T(TT)T)T", keep=0.5,
                max_position_embeddings=64, bypass_min_steps=10, balancer_prob_steps=10,
                pad_token_id=0)
    return SubLLMConfig(**{**base, **kw})


def make_model(seed: int = 0, **kw) -> SubLLMForCausalLM:
    torch.manual_seed(seed)
    model = SubLLMForCausalLM(tiny_config(**kw))
    with torch.no_grad():  # scores spread around 0: eval mode keeps some tokens, not all
        for sub in model.model.subsamplers:
            sub.score.weight.normal_(0.0, 0.3)
    return model


class PatternData(torch.utils.data.Dataset):
    """Rotations of a repeated pattern: a small fixed dataset the loss falls on quickly."""

    def __init__(self, n: int = 8, length: int = 32) -> None:
        self.rows = [
            torch.tensor([PATTERN[(i + j) % len(PATTERN)] for j in range(length)])
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def train(model, tmp_path: Path, data=None, callbacks=None, **kw) -> tuple[Trainer, list[float]]:
    args = dict(output_dir=str(tmp_path / "trainer"), max_steps=STEPS,
                per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=TrainingArguments(**{**args, **kw}),
                      train_dataset=data if data is not None else PatternData(),
                      callbacks=callbacks)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def assert_loss_falls(losses: list[float]) -> None:
    assert len(losses) == STEPS
    assert losses[-1] < 0.6 * losses[0], losses


# ---- Trainer ------------------------------------------------------------------------------


def test_trainer_trains_a_subsampled_model_and_the_callback_drives_its_schedules(tmp_path):
    model = make_model()
    inner = model.model
    seen: list[int] = []
    inner.register_forward_pre_hook(lambda m, args: seen.append(m.step))
    _, losses = train(model, tmp_path, callbacks=[SubLLMScheduleCallback()])
    assert_loss_falls(losses)
    assert seen == list(range(STEPS))  # without the callback: all 0
    bypass = inner.bypasses[0]
    assert bypass.min_scale(inner.step) == pytest.approx(model.config.bypass_min_end)


def test_schedule_callback_refuses_a_model_without_subllm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(SubLLMError, match="LlamaForCausalLM holds no SUBLLM"):
        train(llama, tmp_path, callbacks=[SubLLMScheduleCallback()], max_steps=1)


def test_apply_mst_on_the_wrapper_keeps_outputs_and_trains_with_checkpointing(tmp_path,
                                                                            monkeypatch):
    model = make_model().eval()
    ref = copy.deepcopy(model)
    assert apply_mst(model, mlp_chunks=2, loss_chunks=3, min_chunk_tokens=4,
                     checkpointing=False) is model
    assert model.model.loss_chunks == 3
    assert all(isinstance(b.mlp, MiniSequenceMLP) for b in model.model.layers)
    assert list(model.state_dict()) == list(ref.state_dict())
    ids = PatternData(n=2, length=24)[1]["input_ids"][None].repeat(2, 1)
    ids[1, :5] = torch.arange(1, 6)
    with torch.no_grad():
        out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
        assert out.logits is None and out_ref.logits is not None
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, **gen), ref.generate(ids, **gen))

    # Trainer's gradient_checkpointing=True reaches SubLLM's per-block checkpointing
    calls = []
    inner_checkpoint = subllm.model.subllm.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return inner_checkpoint(*args, **kwargs)

    monkeypatch.setattr(subllm.model.subllm, "checkpoint", counted)
    _, losses = train(model, tmp_path, callbacks=[SubLLMScheduleCallback()],
                      **{CHECKPOINTING_ARG: True})
    assert_loss_falls(losses)
    assert model.model.gradient_checkpointing
    assert len(calls) >= STEPS * model.config.num_hidden_layers


def test_gradient_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    """2 micro-batches of 2 == 1 batch of 4 (loss and update), with rows of different
    numbers of targets: only right when Trainer's num_items_in_batch reaches the loss."""
    # Training-mode coin flips (pairing, bypass limit) would differ between the runs, and the
    # score balancer's gradient uses batch statistics of the scores by design (so micro-
    # batches of 2 give it other statistics than a batch of 4): switch all of them off.
    for module in (subllm.model.subsample, subllm.model.bypass):
        monkeypatch.setattr(module, "coin", lambda p: False)
    data = PatternData(n=4, length=24)
    for i, row in enumerate(data.rows):
        row[:3] = torch.tensor([3 + i, 4, 5])
    ignored = {0: 0, 1: 14, 2: 3, 3: 18}  # first targets of each row masked out

    class Masked(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            item = data[i]
            item["labels"][: ignored[i] + 1] = -100
            return item

    class Gradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})

    grads, logged = [], []
    for batch, accum in ((4, 1), (2, 2)):
        _, losses = train(make_model(seed=3), tmp_path, data=Masked(), max_steps=1,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                          callbacks=[Gradients()])
        logged.append(losses[0])

    # the reference: the model's own mean loss over all targets of the 4 rows
    model = make_model(seed=3).train()
    full = torch.utils.data.default_collate([Masked()[i] for i in range(4)])
    expected = float(model(**full).loss.detach())
    assert logged[0] == pytest.approx(expected, rel=1e-5)
    assert logged[1] == pytest.approx(expected, rel=1e-5)
    assert len(grads) == 2
    for name, g in grads[0].items():
        err = float((grads[1][name] - g).norm() / g.norm().clamp_min(1e-20))
        assert err < 1e-5, (name, err)


# ---- PEFT ---------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    # a larger init than the default 0.02: the frozen LM head must allow peaked logits
    model = make_model(seed=1, initializer_range=0.2)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, lora)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    _, losses = train(peft_model, tmp_path, learning_rate=3e-2,
                      callbacks=[SubLLMScheduleCallback()])
    assert_loss_falls(losses)
    assert model.model.step == STEPS - 1  # the callback found the SubLLM under PEFT
    adapters = [n for n in before if "lora_" in n]
    assert len(adapters) == 2 * 3 * model.config.num_hidden_layers
    for name, p in peft_model.named_parameters():
        if name in adapters:
            if "lora_B" in name:  # initialised to zero, so it must have moved
                assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name

    peft_model.eval()
    ids = torch.tensor([PATTERN * 2, PATTERN[::-1] * 2])
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        assert type(merged_model) is SubLLMForCausalLM
        assert not any("lora" in n for n in merged_model.state_dict())
        merged = merged_model(ids).logits
        base = make_model(seed=1, initializer_range=0.2).eval()(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert (merged - base).abs().max() > 1e-2  # the adapters did change the model


# ---- exported directory: lm-evaluation-harness, remote-code copy ---------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, SubLLMForCausalLM]:
    from subllm.interop.export import save_hf_model
    from subllm.train.data import train_tokenizer

    tmp = tmp_path_factory.mktemp("export")
    words = "the quick brown fox jumps over a lazy dog while tiny models read".split()
    texts = [" ".join(words[(i * j + i) % len(words)] for j in range(24)) for i in range(100)]
    tok = train_tokenizer(iter(texts), vocab_size=300)
    tok.save(str(tmp / "tokenizer.json"))
    model = make_model(seed=5, vocab_size=300, max_position_embeddings=128).eval()
    out = save_hf_model(model.model, tmp / "hf", tmp / "tokenizer.json")
    return out, model


REQUESTS = [("the quick brown", " fox jumps"), ("a lazy", " dog"),
            ("tiny models read the ", "quick brown fox"), ("over", " a lazy dog while"),
            ("the quick brown", " dog"), ("", "the quick")]


def reference_loglikelihood(model, context_ids, continuation_ids) -> tuple[float, bool]:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        out = model(ids)
    logp = out.logits[0].double().log_softmax(-1)[len(context_ids) - 1: -1]
    target = torch.tensor(continuation_ids)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def check_loglikelihood(lm, model) -> None:
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                for i, r in enumerate(REQUESTS)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(results) == len(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, results, strict=True):
        if context:
            context_ids, continuation_ids = lm._encode_pair(context, continuation)  # HFLM's
        else:  # an empty context is conditioned on the prefix token: <|endoftext|>
            assert lm.tokenizer.convert_ids_to_tokens(lm.prefix_token_id) == "<|endoftext|>"
            context_ids = [lm.prefix_token_id]
            continuation_ids = lm.tok_encode(continuation, add_special_tokens=False)
        assert len(context_ids) > 0 and len(continuation_ids) > 0
        ref, ref_greedy = reference_loglikelihood(model, context_ids, continuation_ids)
        assert logprob == pytest.approx(ref, abs=1e-4), (context, continuation)
        assert greedy == ref_greedy


def test_lm_eval_hflm_on_an_exported_directory(exported):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    out, model = exported
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=2)  # batches pad: right/left
    assert type(lm.model) is SubLLMForCausalLM and lm.max_length == 128
    # the subsampled path is exercised: eval mode keeps some tokens of these contexts, not all
    ids = torch.tensor([lm.tok_encode(REQUESTS[2][0] + REQUESTS[2][1])])
    with torch.no_grad():
        kept, entered = model(ids).kept[0], ids.shape[1]
    assert 0 < int(kept[0]) < entered
    check_loglikelihood(lm, model)

    text = "the quick brown fox jumps over a lazy dog"
    (rolling,) = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)],
        disable_tqdm=True)
    ids = lm.tok_encode(text)
    assert rolling == pytest.approx(reference_loglikelihood(model, [lm.prefix_token_id], ids)[0],
                                    abs=1e-4)

    until = ["\n\n", "jumps"]
    contexts = [c for c, _ in REQUESTS[:4]]
    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(c, {"until": until, "max_gen_toks": 8, "do_sample": False}))
                for i, c in enumerate(contexts)]
    texts = lm.generate_until(requests, disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(out)
    for context, text in zip(contexts, texts, strict=True):
        ids = torch.tensor([lm.tok_encode(context)])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False)[0, ids.shape[1]:]
        expected = tok.decode(new, skip_special_tokens=True)
        for stop in until:
            expected = expected.split(stop)[0]
        assert text == expected, context


def test_lm_eval_hflm_with_a_model_instance(exported):
    from lm_eval.models.huggingface import HFLM

    out, model = exported
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(out), batch_size=3)
    check_loglikelihood(lm, model)


@pytest.fixture
def remote_copy(exported, tmp_path, monkeypatch):
    """The exported directory's own code, imported as a separate package: the classes a
    `trust_remote_code=True` load gives, which are not subllm's."""
    out, model = exported
    name = f"subllm_remote_{abs(hash(str(tmp_path))) % 10**8}"
    shutil.copytree(out, tmp_path / name)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        modeling = importlib.import_module(f"{name}.hf")
        remote = modeling.SubLLMForCausalLM.from_pretrained(tmp_path / name).eval()
        yield remote, out, model
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_apply_mst_and_lm_eval_on_the_remote_code_copy(remote_copy):
    from lm_eval.models.huggingface import HFLM

    remote, out, model = remote_copy
    assert not isinstance(remote, SubLLMForCausalLM)
    assert not isinstance(remote.model, subllm.model.subllm.SubLLM)
    lm = HFLM(pretrained=remote, tokenizer=AutoTokenizer.from_pretrained(out), batch_size=2)
    check_loglikelihood(lm, model)

    ids = torch.tensor([PATTERN * 3])
    with torch.no_grad():
        expected = model(ids, labels=ids).loss
    assert apply_mst(remote, mlp_chunks=2, loss_chunks=2, min_chunk_tokens=4) is remote
    assert remote.model.loss_chunks == 2 and remote.model.gradient_checkpointing
    assert all(isinstance(b.mlp, MiniSequenceMLP) for b in remote.model.layers)
    with torch.no_grad():
        out = remote(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
