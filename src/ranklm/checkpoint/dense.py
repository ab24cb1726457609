"""Dense export: a checkpoint's factors multiplied back into a plain Hugging Face folder (no ranklm needed to load it)."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_dir, check_output_dir
from ..hf import merge_and_unload
from .reading import load


def export_dense(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Multiply the factors back and write a plain Hugging Face folder (no ranklm needed to load it)."""
    check_output_dir(out, overwrite)
    model, tokenizer = load(checkpoint)
    merge_and_unload(model)  # also drops the quantization_config: the export is a plain dense folder
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


__all__ = ["export_dense"]
