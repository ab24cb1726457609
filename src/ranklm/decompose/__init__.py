"""Base decompositions (DESIGN §4): one module per base, one Factorization type."""

from .base import Base, Factorization
from .asvd import ASVDBase
from .fwsvd import FWSVDBase
from .svd import SVDBase
from .tfwsvd import TFWSVDBase
from .whiten import WhitenBase, whitening_factor

BASES: dict[str, type] = {
    "svd": SVDBase,
    "fwsvd": FWSVDBase,
    "tfwsvd": TFWSVDBase,
    "asvd": ASVDBase,
    "whiten": WhitenBase,
}


def get_base(name: str, **options) -> Base:
    from ..errors import RanklmError

    if name not in BASES:
        raise RanklmError(f"unknown base {name!r}; valid bases: {', '.join(sorted(BASES))}")
    return BASES[name](**options)


__all__ = ["BASES", "Base", "Factorization", "get_base", "whitening_factor"]
