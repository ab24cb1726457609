"""Calibration data sources, token windows and streaming statistics (docs/design.md §6)."""

from .data import (
    DEFAULT_CORPUS,
    TextSource,
    default_corpus,
    package_dir,
    read_text_source,
    split_source,
    token_stream,
    token_windows,
)
from .stats import backbone, collect_grams, collect_stats

__all__ = [
    "DEFAULT_CORPUS",
    "TextSource",
    "backbone",
    "collect_grams",
    "collect_stats",
    "default_corpus",
    "package_dir",
    "read_text_source",
    "split_source",
    "token_stream",
    "token_windows",
]
