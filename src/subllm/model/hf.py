"""Our model as a Hugging Face model: `SubLLMForCausalLM` (its `SubLLMConfig` is hf_config.py).

`SubLLMConfig` (hf_config.py) is the configuration.

`SubLLMForCausalLM` wraps `SubLLM` (held as `self.model`, so weight names are
`model.layers.0.self_attn.q_proj.weight`, ... as in `LlamaForCausalLM`) and adds what the
Hugging Face ecosystem expects: `from_pretrained` / `save_pretrained` (safetensors),
`generate()`, `labels` -> loss (with `num_items_in_batch` for `Trainer`'s gradient
accumulation), `gradient_checkpointing_enable()`, PEFT, and `apply_mst`.

`generate()` runs on our KV cache (docs/design.md §3.7), not on `transformers`'
`DynamicCache`: a SUBLLM's inner blocks cache only the tokens their segment kept, per
row, which no `transformers` cache layout expresses. The cache comes back from `forward`
as `past_key_values` (`cache` from transformers 5.24 on, which renamed it; both names are
accepted), and `prepare_inputs_for_generation` feeds the model only the tokens the cache
has not seen.

Like every file of this package, this one imports only its siblings (relative imports):
`subllm export` copies the package verbatim into a model directory, which then loads with
`trust_remote_code=True` where subllm is not installed. Registration with the Auto
classes happens in `subllm.hf`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .bypass import Bypass
from .config import ModelConfig
from .hf_config import SubLLMConfig
from .kv_cache import KVCache
from .subllm import SubLLM
from .subsample import CUTOFF_BUFFERS, ScoreBalancer, Subsampler

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
    "past_key_values")


@dataclass
class SubLLMCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, per subsampling module, the tokens kept and entered
    per row ((B,) tensors), from which the kept fractions follow."""

    kept: tuple[torch.Tensor, ...] | None = None
    entered: tuple[torch.Tensor, ...] | None = None


class SubLLMPreTrainedModel(PreTrainedModel):
    config_class = SubLLMConfig
    config: SubLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _can_compile_fullgraph = False  # the subsamplers' kept counts are data-dependent shapes

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear, Embedding, RMSNorm
        if isinstance(module, Bypass):
            init.constant_(module.scale, self.config.bypass_init)
        elif isinstance(module, ScoreBalancer):
            init.zeros_(module.g_rms)
        elif isinstance(module, Subsampler):  # a model saved before the calibrated cut-off
            for name in CUTOFF_BUFFERS:       # gets 0: exactly the rule it was trained with
                init.zeros_(getattr(module, name))


class SubLLMForCausalLM(SubLLMPreTrainedModel, GenerationMixin):
    """A SUBLLM (or, with an all-"T" structure, a LLaMA) causal language model."""

    def __init__(self, config: SubLLMConfig) -> None:
        super().__init__(config)
        self.model = SubLLM(config.to_model_config(ModelConfig))
        self.post_init()

    # The LM head is tied to the embedding when config.tie_word_embeddings says so (SubLLM
    # ties it itself; transformers re-ties after loading and saves the tensor once).
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def set_step(self, step: int) -> None:
        """Training step for SUBLLM's schedules (bypass limit, balancer probability).

        `transformers.Trainer` does not know about them; `SubLLMScheduleCallback` calls
        this every step."""
        self.model.set_step(step)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> SubLLMCausalLMOutput | tuple:
        """Causal LM forward. Positions come from `attention_mask` (left padding: a row's
        first real token is position 0), so `position_ids` must be None or equal those, or
        restart at 0 at each document of a packed row (transformers' padding-free
        collator, DataCollatorWithFlattening): then the documents are kept apart
        (`document_ids`, design.md §3.10).
        With `labels` (aligned with the inputs, -100 ignored) the loss is returned; with
        `use_cache` (eval mode) the KV cache comes back as `past_key_values` (`cache`)."""
        if cache is not None:
            past_key_values = cache
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, None):
                raise ValueError(f"SubLLMForCausalLM does not return {name[len('output_'):]}")
        docs = None
        if position_ids is not None:
            docs = self._packed_documents(position_ids, attention_mask, past_key_values)
            if docs is None:
                self._check_positions(position_ids, attention_mask, past_key_values,
                                      input_ids if input_ids is not None else inputs_embeds)
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise ValueError(
                f"past_key_values must be the KV cache this model returned, got "
                f"{type(past_key_values).__name__}; do not pass a transformers Cache"
            )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and labels is None
        if self.training or docs is not None:  # packed documents: a full forward only
            use_cache = False
        out = self.model(
            input_ids,
            labels=labels,
            attention_mask=attention_mask,
            cache=past_key_values,
            use_cache=bool(use_cache),
            inputs_embeds=inputs_embeds,
            logits_to_keep=int(logits_to_keep),
            num_items_in_batch=num_items_in_batch,
            document_ids=docs,
        )
        result = SubLLMCausalLMOutput(
            loss=out.loss,
            logits=out.logits,
            **{CACHE_FIELD: out.cache if use_cache else None},
            kept=tuple(out.kept) or None,
            entered=tuple(out.entered) or None,
        )
        if return_dict is False:
            return result.to_tuple()
        return result

    @staticmethod
    def _packed_documents(position_ids, attention_mask, cache) -> torch.Tensor | None:
        """Document ids of packed rows given as transformers' padding-free convention
        (DataCollatorWithFlattening): no mask, no cache, position_ids restarting at 0 at
        each document and counting up within it; None for any other position_ids."""
        if attention_mask is not None or cache is not None or position_ids.dim() != 2:
            return None
        starts = position_ids == 0
        if not bool(starts[:, 1:].any()):
            return None  # one document per row: the plain positions, checked as usual
        docs = starts.long().cumsum(1) - 1
        steps = position_ids[:, 1:] == position_ids[:, :-1] + 1
        return docs if bool((steps | starts[:, 1:]).all() & starts[:, 0].all()) else None

    @staticmethod
    def _check_positions(position_ids, attention_mask, cache, inputs) -> None:
        B, L = inputs.shape[:2]
        past = cache.seen if cache is not None else 0
        if attention_mask is None:
            expected = torch.arange(past, past + L, device=position_ids.device).expand(B, L)
        else:
            full = attention_mask.to(position_ids.device).long()
            expected = (full.cumsum(1) - 1).clamp(min=0)[:, -L:]
            real = full[:, -L:].bool()
            position_ids = torch.where(real, position_ids, expected)
        if position_ids.shape != expected.shape or not torch.equal(position_ids, expected):
            raise ValueError(
                "SubLLMForCausalLM derives positions from attention_mask; other position_ids "
                "than those, or than 0, 1, ... restarting at each packed document (without "
                "an attention_mask), are not supported - pass position_ids=None"
            )

    # ---- generation ---------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache (see the module docstring)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      cache=None,
                                      inputs_embeds=None, use_cache=None, logits_to_keep=None,
                                      **kwargs):
        cache = cache if cache is not None else past_key_values
        model_inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and cache.seen > 0:
            model_inputs["input_ids"] = input_ids[:, cache.seen:]
        elif inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        model_inputs[CACHE_FIELD] = cache
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        return model_inputs

    def _reorder_cache(self, cache: KVCache, beam_idx: torch.LongTensor) -> KVCache:
        cache.reorder(beam_idx)
        return cache
