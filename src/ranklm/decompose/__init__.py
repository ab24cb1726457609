"""Base decompositions (docs/design.md §4): one module per base, one Factorization type."""

from ..registry import build, registered
from .base import Base, Factorization
from .asvd import ASVDBase
from .fwsvd import FWSVDBase
from .kfac import KFACBase
from .svd import SVDBase
from .tfwsvd import TFWSVDBase
from .whiten import WhitenBase, whitening_factor

# Filled by each module's @register_base as it is imported above (the registry's live table).
BASES: dict[str, type] = registered("base")


def get_base(name: str, **options) -> Base:
    return build("base", name, options)


__all__ = ["BASES", "Base", "Factorization", "get_base", "whitening_factor"]
