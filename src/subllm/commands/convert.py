"""`subllm convert`: a Llama / Qwen2 / Qwen3 / Mistral or a SUBLLM-release checkpoint -> a
Hugging Face SubLLM directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from subllm.atomic import check_out_dir
from subllm.errors import SubLLMError
from subllm.flags import non_empty_path
from subllm.train.config import parse_keep

DESCRIPTION = ("Write a Hugging Face SubLLM directory (as `subllm export` does) from a local "
               "transformers Llama, Qwen2, Qwen3 or Mistral checkpoint (--from-hf: blocks "
               "copied, scorers and bypass "
               "scales freshly initialised) or from a checkpoint of the SUBLLM authors' "
               "release (--from-official). Continue training it with `subllm train "
               "--init-from DIR`.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", type=non_empty_path, metavar="HF_DIR",
                        help="a transformers LlamaForCausalLM, Qwen2ForCausalLM, "
                        "Qwen3ForCausalLM or MistralForCausalLM directory (config.json + "
                        "safetensors)")
    source.add_argument("--from-official", type=non_empty_path, metavar="CHECKPOINT",
                        help="the authors' state_dict: a torch.save file or .safetensors")
    p.add_argument("--official-config", type=non_empty_path, metavar="CONFIG_JSON",
                   help="the authors' model config JSON (required with --from-official)")
    p.add_argument("--structure", metavar="S", help="with --from-hf: structure over T ( ), one "
                   "'T' per layer of the model (default: all 'T', the model itself)")
    p.add_argument("--keep", metavar="K", help="with --from-hf: keep ratio, or one per depth: "
                   "0.64,0.5 (default 0.64)")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="with --from-hf: the converted model's context (default: "
                   "max_position_embeddings); YaRN configs as Qwen documents them keep "
                   "max_position_embeddings at the original context, so pass the extended one "
                   "(factor x original_max_position_embeddings) to reach it")
    p.add_argument("--rope-positions", choices=("parent", "original"),
                   help="with --from-official: RoPE positions of nested segments' blocks; "
                   "parent (default) reproduces the release's full forward pass, original "
                   "its cached decoding (design.md §3.3)")
    p.add_argument("--tokenizer", type=non_empty_path, metavar="FILE_OR_DIR",
                   help="a tokenizer.json, or a directory of Hugging Face tokenizer files (default "
                   "with --from-hf: the model directory's)")
    p.add_argument("--out", required=True, type=non_empty_path, metavar="DIR",
                   help="directory to write")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the saved weights (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the freshly initialised weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out, args.force,  # fail before the work (and the imports), not after
                  inputs=(args.from_hf, args.from_official, args.official_config,
                          args.tokenizer))
    import torch

    from subllm.interop.export import DTYPES, tokenizer_files, write_converted
    from subllm.interop.llama import from_hf_dir
    from subllm.interop.official import from_official, official_model_config
    from subllm.interop.weights import read_json, read_state_dict

    dtype = DTYPES[args.dtype] if args.dtype else None
    torch.manual_seed(args.seed)  # the fresh scorers and bypass scales
    if args.from_hf is not None:
        if args.official_config is not None:
            raise SubLLMError("--official-config goes with --from-official, not --from-hf")
        if args.rope_positions is not None:
            raise SubLLMError("--rope-positions goes with --from-official, not --from-hf")
        if args.max_seq_len is not None and args.max_seq_len <= 0:
            raise SubLLMError(f"--max-seq-len must be a positive integer, got {args.max_seq_len}")
        src = Path(args.from_hf)
        keep = parse_keep(args.keep) if args.keep is not None else None
        model = from_hf_dir(src, args.structure, keep, dtype=dtype, max_seq_len=args.max_seq_len)
        raw = read_json(src / "config.json", "no config")
        family = model.config.hf_family
        token_ids = model.hf_token_ids
        gen = src / "generation_config.json"
        tokenizer = args.tokenizer or (src if tokenizer_files(src) else None)
        arch = (raw.get("architectures") or [family])[0]
        info = {"converted from": f"{arch} checkpoint {src}"}
        if model.config.is_subllm:
            info["freshly initialised"] = (f"{len(model.subsamplers)} scorer(s) and "
                                           f"{len(model.bypasses)} bypass scale(s)")
        for note in _notes(model.config, raw, args.max_seq_len):
            print(f"note: {note}")
    else:
        if args.official_config is None:
            raise SubLLMError("--from-official needs --official-config CONFIG_JSON (the "
                              "release's model config)")
        if args.max_seq_len is not None:
            raise SubLLMError("--max-seq-len goes with --from-hf; the release's context is "
                              "its config's tokens_per_sample")
        for flag in ("structure", "keep"):
            if getattr(args, flag) is not None:
                raise SubLLMError(f"--{flag} does not apply to --from-official: the structure "
                                  "and keep ratio come from --official-config")
        src = Path(args.from_official)
        cfg_path = Path(args.official_config)
        official = read_json(cfg_path, "--official-config")
        positions = args.rope_positions or "parent"
        official_model_config(official, str(cfg_path))  # config errors before reading weights
        model = from_official(read_state_dict(src), official, dtype=dtype, source=str(src),
                              config_source=str(cfg_path), rope_positions=positions)
        token_ids = {"bos_token_id": official.get("bos_token_id"),
                     "eos_token_id": official.get("eos_token_id"),
                     "pad_token_id": official.get("pad_token_id", official.get("padding_idx"))}
        gen = None
        tokenizer = args.tokenizer
        info = {"converted from": f"SUBLLM release checkpoint {src} ({cfg_path.name})"}
        if model.config.max_depth >= 2:
            print(f"rope_positions: {positions} ("
                  + ("the release's full forward pass, which its model was trained with; "
                     "--rope-positions original gives its cached decoding's)"
                     if positions == "parent" else "the release's cached decoding)"))
    out = write_converted(model, args.out, tokenizer=tokenizer, token_ids=token_ids,
                          generation_config=gen if gen is not None and gen.is_file() else None,
                          dtype=args.dtype, force=args.force, info=info)
    c = model.config
    what = (f"SUBLLM {c.structure} (keep {c.keep})" if c.is_subllm
            else f"{c.hf_family or 'LLaMA'} ({c.n_layers} blocks)")
    print(f"converted {src} -> {out}: {what}, {model.num_params() / 1e6:.2f}M parameters"
          + ("" if tokenizer else "; no tokenizer (pass --tokenizer FILE_OR_DIR)"))
    print(f"continue training: subllm train --init-from {out} --data DATA_DIR --out RUN_DIR")
    return 0


def _notes(config, raw: dict, max_seq_len: int | None) -> list[str]:
    """What the conversion did that the source's config.json does not say."""
    notes = []
    if raw.get("tie_word_embeddings") and not config.tie_embeddings:
        notes.append("lm_head.weight differs from the embedding although "
                     "tie_word_embeddings is true: converted untied, as transformers loads it")
    rs = config.rope_scaling or {}
    if (max_seq_len is None and rs.get("rope_type") in ("yarn", "llama3")
            and rs["factor"] * rs["original_max_position_embeddings"] > config.max_seq_len):
        longer = int(rs["factor"] * rs["original_max_position_embeddings"])
        notes.append(f"{rs['rope_type']} rope scaling (factor {rs['factor']:g}) extends the "
                     f"context to {longer} tokens, but max_position_embeddings is "
                     f"{config.max_seq_len}, the converted model's context: pass "
                     f"--max-seq-len {longer} to reach it")
    return notes
