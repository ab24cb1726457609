"""Base decompositions (docs/design.md §4): one module per base, one Factorization type."""

from ..registry import build
from .base import Base, Factorization
from .asvd import ASVDBase
from .fwsvd import FWSVDBase
from .kfac import KFACBase
from .svd import SVDBase
from .tfwsvd import TFWSVDBase
from .whiten import WhitenBase, whitening_factor

BASES: dict[str, type] = {
    "svd": SVDBase,
    "fwsvd": FWSVDBase,
    "tfwsvd": TFWSVDBase,
    "asvd": ASVDBase,
    "whiten": WhitenBase,
    "kfac": KFACBase,
}


def get_base(name: str, **options) -> Base:
    return build("base", BASES, name, options)


__all__ = ["BASES", "Base", "Factorization", "get_base", "whitening_factor"]
