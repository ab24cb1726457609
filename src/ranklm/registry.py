"""Name -> class lookup shared by the base and allocator registries."""

from __future__ import annotations

from typing import Any

from .errors import RanklmError


def build(kind: str, table: dict[str, type], name: str, options: dict[str, Any]) -> Any:
    """Instantiate ``table[name](**options)`` or explain which names exist."""
    if name not in table:
        raise RanklmError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}")
    return table[name](**options)
