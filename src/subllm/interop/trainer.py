"""`SubLLMScheduleCallback`: SUBLLM's step-driven schedules under `transformers.Trainer`.

A SUBLLM's training depends on the step (design.md §3.6): the bypass scale's lower limit c_min
and the score balancer's probability follow schedules over the first steps. `subllm train`
calls `model.set_step(step)` before every optimizer step; `transformers.Trainer` knows
nothing of it, so without this callback the model stays at step 0 for the whole run.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SubLLMScheduleCallback()])
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from subllm.errors import SubLLMError
from subllm.model.mst import _is_subllm


def subllm_modules(model: Any) -> list[nn.Module]:
    """Every `SubLLM` inside `model`: the model itself, a `SubLLMForCausalLM`, or either one
    wrapped by PEFT, accelerate / DDP or `torch.compile` (all hold it as a submodule).
    A copy loaded with `trust_remote_code=True` counts too."""
    if not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if _is_subllm(m)]


class SubLLMScheduleCallback(TrainerCallback):
    """Sets the training step of every SUBLLM in the trained model before each optimizer
    step (`set_step(state.global_step)`: the number of steps done, as `subllm train` does),
    and at the start of training (so a resumed run continues its schedules where it
    stopped). Training a model without a SUBLLM inside is an error."""

    def _set_step(self, model: Any, step: int) -> None:
        targets = subllm_modules(model)  # looked up every step: cheap, and never stale
        if not targets:
            raise SubLLMError(
                f"SubLLMScheduleCallback: {type(model).__name__} holds no SUBLLM model "
                "(subllm.SubLLM / subllm.hf.SubLLMForCausalLM); remove the callback"
            )
        for target in targets:
            target.set_step(step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set_step(model, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_step(model, state.global_step)
