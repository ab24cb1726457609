"""Calibration data sources, token windows and streaming statistics (docs/design.md §6).

Loaded by the registry as one of ranklm's built-in plugins: importing ``activations`` and
``gradients`` registers the built-in statistics (``@register_statistic``).
"""

from . import activations, gradients  # noqa: F401 - their decorators fill the "statistic" table
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
from .statistic import (
    ACTIVATION,
    GRADIENT,
    Statistic,
    StatisticNames,
    blockwise,
    collection_passes,
    get_statistic,
)
from .stats import backbone, collect_activations, collect_grams, collect_stats

__all__ = [
    "ACTIVATION",
    "DEFAULT_CORPUS",
    "GRADIENT",
    "Statistic",
    "StatisticNames",
    "TextSource",
    "backbone",
    "blockwise",
    "collect_activations",
    "collect_grams",
    "collect_stats",
    "collection_passes",
    "default_corpus",
    "get_statistic",
    "package_dir",
    "read_text_source",
    "split_source",
    "token_stream",
    "token_windows",
]
