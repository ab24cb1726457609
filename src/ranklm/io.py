"""Checkpoints: safetensors + ranklm.json, written atomically, loaded strictly (docs/design.md §3).

The face of ``ranklm.checkpoint`` (format and metadata, writing, reading and verification,
dense export) and of the helpers checkpoints are made with (``ranklm.atomic``: atomic folder
writes, sha256; ``ranklm.loading.tokenizer``): every name importable from here as before.
"""

from __future__ import annotations

from .atomic import (
    atomic_dir,
    check_output_dir,
    public_dir_mode,
    public_tree_modes,
    sha256_file,
)
from .checkpoint.dense import export_dense
from .checkpoint.metadata import (
    ARTIFACTS_FILE,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    metadata_summary,
    read_metadata,
    validate_metadata,
)
from .checkpoint.reading import check_checkpoint, load, verify_files
from .checkpoint.writing import build_metadata, save
from .loading.tokenizer import TOKENIZER_FILES, has_tokenizer_files, load_tokenizer

__all__ = [
    "ARTIFACTS_FILE",
    "FORMAT_VERSION",
    "META_FILE",
    "TOKENIZER_FILES",
    "WEIGHTS_FILE",
    "atomic_dir",
    "build_metadata",
    "check_checkpoint",
    "check_output_dir",
    "export_dense",
    "has_tokenizer_files",
    "load",
    "load_tokenizer",
    "metadata_summary",
    "public_dir_mode",
    "public_tree_modes",
    "read_metadata",
    "save",
    "sha256_file",
    "validate_metadata",
    "verify_files",
]
