"""``--quantize``, ``--quant-group-size`` and ``--budget-bytes``: parsed once, one error line when bad."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RanklmError

WIDTHS = (2, 3, 4, 5, 6, 7, 8)  # bits per stored integer (torchao's affine primitives, int8 storage)
DEFAULT_GROUP_SIZE = 64  # divides every hidden size of the packaged and common models (576, 768, 896, 2048, ...)


@dataclass(frozen=True)
class QuantSpec:
    """Allowed widths (one: every target at it; several: the joint allocator chooses per target) and the
    group size along each matrix's input."""

    bits: tuple[int, ...]
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def joint(self) -> bool:
        return len(self.bits) > 1

    def record(self) -> dict:
        return {"bits": list(self.bits), "group_size": self.group_size, "scheme": "asymmetric affine, per group",
                "scale": "float16", "zero": "int8", "library": "torchao quant_primitives"}


def parse_quantize(text: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> QuantSpec | None:
    """``int8`` / ``int4`` / ... or a comma list (``int2,int3,int4,int8``: joint choice); None or ``none``: off."""
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return None
    bits = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*int(\d+)\s*", part.lower())
        if not m or int(m.group(1)) not in WIDTHS:
            raise RanklmError(f"unknown quantization width {part.strip()!r} in --quantize {text}; valid: "
                              f"{', '.join(f'int{b}' for b in WIDTHS)} (or a comma list of them)")
        bits.append(int(m.group(1)))
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise RanklmError(f"--quant-group-size must be an even integer >= 2 (e.g. 32, 64, 128), got {group_size}")
    return QuantSpec(tuple(sorted(set(bits))), int(group_size))


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget_bytes(text: str | float | None, dense_target_bytes: int, dense_params: int) -> tuple[float, str] | None:
    """(absolute byte budget for the targets, how it was given) from ``--budget-bytes``:

    - a fraction in (0, 1]: of the targets' dense bytes in the model's own dtype (DESIGN §11);
    - ``Nbpw`` / ``Nbits``: N bits per dense target weight (``4bpw`` = a quarter of bf16's bytes);
    - an absolute size: ``150MB``, ``1.2GiB``, ``5e8`` (bytes, > 1).
    """
    if text is None or str(text).strip() == "":
        return None
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9.e+-]+)(bpw|bits)", s)
    try:
        if m:
            bits = float(m.group(1))
            if not 0 < bits <= 32:
                raise ValueError
            return bits * dense_params / 8.0, f"{bits:g} bits per target weight"
        m = re.fullmatch(r"([0-9.e+-]+)([kmg]i?b|b)?", s)
        if not m:
            raise ValueError
        value = float(m.group(1))
        if m.group(2):
            value *= _UNITS[m.group(2)]
        elif 0 < value <= 1:
            return value * dense_target_bytes, f"{value:g} of the targets' dense bytes"
        if not value > 1:
            raise ValueError
        return value, f"{value:,.0f} bytes"
    except (ValueError, OverflowError):
        raise RanklmError(f"bad --budget-bytes {text!r}: give a fraction in (0, 1] of the targets' dense bytes, "
                          "bits per weight (4bpw), or a size (150MB, 1.2GiB)") from None
