"""Name -> class lookup shared by the base, allocator and trainer registries.

Each registered class declares ``OPTIONS: tuple[Opt, ...]`` (see ``options``); ``build``
validates the given options against it before calling the constructor, so an unknown or
ill-typed option is one ``RanklmError`` line, never a silently ignored keyword.

This module imports no method module at import time (the registries import it); the
tables are looked up lazily by ``method_table``.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import RanklmError
from .options import Opt, describe_options, validate_options

KINDS = ("base", "allocator", "trainer")


def build(kind: str, table: Mapping[str, type], name: str, options: Mapping[str, Any], from_cli: bool = False) -> Any:
    """Instantiate ``table[name]`` with validated options, or explain which names exist.

    A class without ``OPTIONS`` is called with the options as given (no validation).
    """
    cls = lookup(kind, table, name)
    spec = getattr(cls, "OPTIONS", None)
    if spec is None:
        return cls(**options)
    return cls(**validate_options(kind, name, spec, options, from_cli=from_cli))


def lookup(kind: str, table: Mapping[str, type], name: str) -> type:
    if name not in table:
        raise RanklmError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}")
    return table[name]


def method_table(kind: str) -> dict[str, type]:
    """The registry of one kind: ``BASES``, ``ALLOCATORS`` or ``TRAINERS`` (empty if there is none yet)."""
    if kind == "base":
        from .decompose import BASES

        return dict(BASES)
    if kind == "allocator":
        from .allocate import ALLOCATORS

        return dict(ALLOCATORS)
    if kind == "trainer":
        try:
            from . import train
        except ImportError:
            return {}
        return dict(getattr(train, "TRAINERS", None) or {})
    raise ValueError(f"unknown method kind {kind!r}; valid: {', '.join(KINDS)}")


def method_options(kind: str, name: str) -> tuple[Opt, ...]:
    """The declared options of one base/allocator/trainer (``()`` if it declares none)."""
    return tuple(getattr(lookup(kind, method_table(kind), name), "OPTIONS", ()))


def check_options(kind: str, name: str, options: Mapping[str, Any], from_cli: bool = False) -> dict[str, Any]:
    """Validate options for ``kind name`` without building it (e.g. before loading a model)."""
    cls = lookup(kind, method_table(kind), name)
    spec = getattr(cls, "OPTIONS", None)
    if spec is None:
        return dict(options)
    return validate_options(kind, name, spec, options, from_cli=from_cli)


def _axes(axes: Any) -> list[str]:
    """A recipe's axes as names: ``("whiten", "uniform")`` or ``{"base": ..., "allocator": ..., ...}``."""
    values = axes.values() if isinstance(axes, Mapping) else axes if isinstance(axes, (tuple, list)) else [axes]
    return [str(a) for a in values if a and a != "none"]


def list_methods() -> str:
    """Every base, allocator, trainer and recipe with its options, defaults and help (``ranklm methods``)."""
    from .config import DEFAULT_RECIPE, LAYERWISE_DEFAULT_RECIPE, RECIPES

    sections = []
    for kind, title in (("base", "Bases"), ("allocator", "Allocators"), ("trainer", "Trainers")):
        table = method_table(kind)
        if not table:
            continue
        flag = {"base": "--base-opt", "allocator": "--alloc-opt", "trainer": "--train-opt"}[kind]
        blocks = []
        for name, cls in sorted(table.items()):
            spec = getattr(cls, "OPTIONS", None)
            blocks.append(describe_options(kind, name, spec) if spec is not None
                          else f"{kind} {name}\n    (options not declared)")
        sections.append(f"{title} (options: {flag} KEY=VALUE)\n\n" + "\n\n".join(blocks))
    width = max(len(r) for r in RECIPES)
    recipes = [f"    {name:<{width}}  = {' + '.join(_axes(axes))}" for name, axes in sorted(RECIPES.items())]
    recipes.append(f"\n    default: {DEFAULT_RECIPE} for models with an LM head; {LAYERWISE_DEFAULT_RECIPE} for encoders "
                   "(no LM loss) and with --sequential")
    sections.append("Recipes (--recipe NAME; --base/--allocator override an axis)\n\n" + "\n".join(recipes))
    return "\n\n".join(sections)


__all__ = ["build", "lookup", "method_table", "method_options", "check_options", "list_methods", "KINDS"]
