"""Reports: plots of rank maps (and, later, bench tables)."""

from .plot import plot_rank_map

__all__ = ["plot_rank_map"]
