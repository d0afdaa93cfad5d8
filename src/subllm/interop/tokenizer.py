"""Tokenizer files: a `tokenizers` tokenizer.json, its end-of-text token, and identity checks
(the same vocabulary in two files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from subllm.errors import SubLLMError

EOT_TOKEN = "<|endoftext|>"


# End-of-text tokens we recognise in a tokenizer the user brings.
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def load_tokenizer(path: str | Path) -> Any:
    """A `tokenizers` tokenizer from its tokenizer.json (a one-line error otherwise)."""
    path = Path(path)
    if path.is_dir():
        hint = (f"pass {path / 'tokenizer.json'}" if (path / "tokenizer.json").is_file()
                else "pass the tokenizer.json file itself")
        raise SubLLMError(f"tokenizer {path} is a directory, not a tokenizer.json; {hint}")
    if not path.is_file():
        raise SubLLMError(f"tokenizer file {path} does not exist; pass a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SubLLMError(
            f"{path} is not a Hugging Face tokenizer.json ({first}); "
            "pass the tokenizer.json of a `tokenizers` tokenizer"
        ) from None


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_tokenizer(directory: str | Path) -> tuple[Any, int | None]:
    """(the `tokenizers` tokenizer of a model directory, its eos id or None), encoding text
    as transformers' `AutoTokenizer.from_pretrained(directory)` does: with the post-processor
    it applies (a Llama-3's `<|begin_of_text|>` first; what tokenizer_config.json's
    add_bos_token / add_eos_token make of it). Encode with `add_special_tokens=True`."""
    directory = Path(directory)
    if not (directory / "tokenizer_config.json").is_file():
        if (directory / "tokenizer.json").is_file():  # no config: the file is all there is
            return load_tokenizer(directory / "tokenizer.json"), None
        raise SubLLMError(f"tokenizer {directory} is a directory, not a tokenizer.json, and holds "
                          "no tokenizer.json / tokenizer_config.json; pass a tokenizer.json or "
                          "a model directory with its tokenizer")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # transformers raises many kinds; say which and where
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SubLLMError(f"transformers cannot load the tokenizer in {directory} ({first}); "
                          "pass its tokenizer.json instead") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise SubLLMError(f"the tokenizer in {directory} is not a `tokenizers` (fast) one; "
                          "pass a tokenizer.json")
    return backend, hf.eos_token_id


def model_token_ids(directory: str | Path) -> dict[str, dict[str, Any]]:
    """A model directory's bos/eos/pad ids, as its two files set them: {"config": those of
    config.json, "generation": those of generation_config.json (what `generate()` stops
    at; Llama 3 lists three eos ids there, one in config.json)}; {} for neither."""
    out = {}
    for key, name in (("config", "config.json"), ("generation", "generation_config.json")):
        try:
            raw = json.loads((Path(directory) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and (ids := {k: raw[k] for k in TOKEN_ID_KEYS
                                              if raw.get(k) is not None}):
            out[key] = ids
    return out


def eos_ids(token_ids: dict[str, dict[str, Any]], where: str | Path) -> list[int]:
    """The ids generation stops at, from `model_token_ids` (of a directory `where`, or as a
    run recorded them), as transformers' `generate()` reads them: generation_config.json's
    eos_token_id (one id or a list, e.g. a Llama-3's `<|eot_id|>` and `<|end_of_text|>`),
    else config.json's; [] when neither sets one."""
    for key, name in (("generation", "generation_config.json"), ("config", "config.json")):
        eos = token_ids.get(key, {}).get("eos_token_id")
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise SubLLMError(f"{Path(where) / name}: eos_token_id must be a token id or a "
                              f"list of them, got {eos!r}; fix the file")
        return ids
    return []


def eot_id_of(tokenizer: Any, path: str | Path = "the tokenizer") -> int:
    for token in EOT_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    raise SubLLMError(
        f"{path} has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}); "
        f"add `{EOT_TOKEN}` as a special token or let prepare train a tokenizer"
    )


def same_vocab(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer.json files map the same tokens to the same ids (a re-saved
    tokenizer, e.g. by `subllm export`, differs in bytes but not in this)."""
    return Path(a).is_file() and load_tokenizer(a).get_vocab() == load_tokenizer(b).get_vocab()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_pipeline(checkpoint: str | Path, tokenizer_path: str | Path, prompt: str,
                  ctx: int, token_ids: dict[str, Any] | None = None
                  ) -> tuple[Any, list[int], list[int]]:
    """(tokenizer, the ids generation stops at, the prompt's ids) for `checkpoint`, as
    `model_text` and `encode_prompt` give them."""
    tokenizer, stop = model_text(checkpoint, tokenizer_path, token_ids)
    return tokenizer, stop, encode_prompt(tokenizer, prompt, stop, ctx)


def model_text(checkpoint: str | Path, tokenizer_path: str | Path,
               token_ids: dict[str, Any] | None = None) -> tuple[Any, list[int]]:
    """(tokenizer, the ids generation stops at) of `checkpoint`, as transformers'
    AutoTokenizer + generate() see them for a Hugging Face directory (subllm export /
    convert): its tokenizer with its post-processor (a Llama-3's BOS first), stopping at any
    id of the model's eos_token_id list. A `subllm train` checkpoint's tokenizer.json
    encodes with its own post-processor and stops at its end-of-text token, and at the eos
    ids of the model it was initialised from (`token_ids`, which the run recorded at
    `--init-from`)."""
    directory = Path(checkpoint)
    hf_dir = (directory / "config.json").is_file()
    if hf_dir and (directory / "tokenizer_config.json").is_file():
        tokenizer, _ = model_tokenizer(directory)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
    if hf_dir:
        stop = eos_ids(model_token_ids(directory), directory) or [eot_id_of(tokenizer,
                                                                            tokenizer_path)]
    else:
        stop = [eot_id_of(tokenizer, tokenizer_path)]
        stop += [i for i in eos_ids(token_ids or {}, directory) if i not in stop]
    return tokenizer, stop


def encode_prompt(tokenizer: Any, prompt: str, stop: list[int], ctx: int,
                  add_special_tokens: bool = True) -> list[int]:
    """The prompt's ids (an empty prompt starts a new document: after an end-of-text
    token), or a one-line error when they do not fit in the context `ctx`."""
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
    if not ids:
        try:
            ids = [eot_id_of(tokenizer)]
        except SubLLMError:
            ids = stop[:1]
    if len(ids) > ctx:
        raise SubLLMError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                          f"{ctx}; shorten the prompt")
    return ids
