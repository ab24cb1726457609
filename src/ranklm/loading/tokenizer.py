"""A model folder's tokenizer: loaded when its files are there, None when it has none, an error when they do not load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from ..errors import RanklmError

# Files a tokenizer is loaded from (any one present means the folder has a tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json", "vocab.model", "tokenizer.tiktoken")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return any((p / name).is_file() for name in TOKENIZER_FILES) or any(p.glob("*.tiktoken"))


def load_tokenizer(path: str | os.PathLike, local: bool = True, **kwargs: Any):
    """The tokenizer of a model folder; None when it has no tokenizer files at all.

    Files present but unloadable (corrupt ``tokenizer.json``, a tokenizer class this transformers
    lacks, a missing ``sentencepiece``) is an error naming the folder and the cause, not a later
    "tokenizer missing". ``local=False`` (a hub id): a repository without tokenizer files (an
    ``OSError`` from transformers) gives None, any other failure is an error.
    """
    if local and not has_tokenizer_files(path) and "gguf_file" not in kwargs:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - one line naming the folder and the cause
        if not local and isinstance(e, OSError):
            return None
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RanklmError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {cause}") from None


def require_tokenizer(tokenizer, where: str):
    """``tokenizer``, or a RanklmError saying ``where`` has none."""
    if tokenizer is None:
        raise RanklmError(f"tokenizer missing: {where} has no tokenizer files, so text cannot be tokenized")
    return tokenizer


__all__ = ["TOKENIZER_FILES", "has_tokenizer_files", "load_tokenizer", "require_tokenizer"]
