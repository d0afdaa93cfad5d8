"""Tokenizer files: a `tokenizers` tokenizer.json, its end-of-text token, and identity checks
(the same vocabulary in two files)."""

from __future__ import annotations

import hashlib
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

