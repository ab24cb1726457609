"""Typed method options, declared once per method (docs/design.md §1 "Options are typed").

Every base, allocator and trainer class declares ``OPTIONS: tuple[Opt, ...]``: each
option's name, type, default, one-line help and (optionally) the values it may take.
``validate_options`` is the one validator: it fills in defaults and refuses an unknown
or ill-typed option with a one-line ``RanklmError`` (the CLI prints it as ``error: ...``
and exits 2). ``describe_options`` renders a method's options for ``ranklm methods``.

Coercion rules (values from the CLI arrive JSON-parsed: ``3`` -> int, ``true`` -> bool,
``[0.3, 0.7]`` -> list, anything else stays a string):

- ``int``: an int (not a bool), or a float with an integral value;
- ``float``: an int or float (not a bool), finite;
- ``bool``: a bool, or the strings ``true``/``false`` (any case);
- ``str``: a string;
- ``list``: a list (a tuple is accepted from Python); ``Opt.item`` types the elements;
- ``object``: anything (python-only values such as callables);
- ``None`` wherever the default is ``None``.

Keys may be written with dashes (``adam-steps``) or underscores (``adam_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import RanklmError

_TYPE_WORDS: dict[type, str] = {
    int: "an integer",
    float: "a float",
    bool: "a boolean (true or false)",
    str: "a string",
    list: "a list",
    object: "a value",
}


@dataclass(frozen=True)
class Opt:
    """One declared option of a base, allocator or trainer."""

    name: str
    type: type  # int, float, bool, str, list, or object (python-only values such as callables)
    default: Any
    help: str
    choices: tuple | None = None
    python_only: bool = False  # accepted from the Python API, refused from the CLI, hidden from listings
    item: type | None = None  # for list options: the type of each element (int, float, bool or str)
    nullable: bool = False  # None (JSON null) is accepted although the default is not None
    bounds: tuple[float, float] | None = None  # closed interval an int/float value must lie in

    def __post_init__(self) -> None:
        if self.type not in _TYPE_WORDS:
            raise TypeError(f"option {self.name}: unsupported type {self.type!r}")
        if self.item is not None and (self.type is not list or self.item not in _TYPE_WORDS):
            raise TypeError(f"option {self.name}: item type only for list options, got {self.item!r}")
        if self.bounds is not None and self.type not in (int, float):
            raise TypeError(f"option {self.name}: bounds only for int/float options")


class _Bad(Exception):
    """A value that does not fit its option's type (message: what it must be)."""


def _coerce_scalar(t: type, value: Any) -> Any:
    if t is object:
        return value
    if t is int:
        if isinstance(value, bool):
            raise _Bad(_TYPE_WORDS[int])
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Bad(_TYPE_WORDS[int])
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(_TYPE_WORDS[float])
        if not math.isfinite(value):
            raise _Bad("a finite float")
        return float(value)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Bad(_TYPE_WORDS[bool])
    if t is str:
        if isinstance(value, str):
            return value
        raise _Bad(_TYPE_WORDS[str])
    raise AssertionError(t)  # pragma: no cover - Opt.__post_init__ refuses other types


def _coerce(opt: Opt, value: Any) -> Any:
    if value is None and (opt.default is None or opt.nullable):
        return None
    if opt.type is list:
        if not isinstance(value, (list, tuple)):
            raise _Bad(_TYPE_WORDS[list] + (f" of {_plural(opt.item)}" if opt.item else ""))
        if opt.item is None:
            return list(value)
        try:
            return [_coerce_scalar(opt.item, v) for v in value]
        except _Bad:
            raise _Bad(f"a list of {_plural(opt.item)}") from None
    return _coerce_scalar(opt.type, value)


def _plural(t: type | None) -> str:
    return {int: "integers", float: "floats", bool: "booleans", str: "strings"}.get(t, "values")  # type: ignore[arg-type]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _visible(spec: Sequence[Opt], from_cli: bool) -> list[Opt]:
    return [o for o in spec if not (from_cli and o.python_only)]


def validate_options(
    kind: str, method: str, spec: Sequence[Opt], given: Mapping[str, Any], from_cli: bool = False
) -> dict[str, Any]:
    """Every declared option of ``kind method`` (defaults filled in), or a one-line ``RanklmError``.

    ``from_cli=True`` also refuses python-only options (callables and the like).
    """
    by_name = {o.name: o for o in spec}
    out = {o.name: o.default for o in spec}
    seen: dict[str, str] = {}
    for raw_key, value in given.items():
        key = str(raw_key).strip().replace("-", "_")
        opt = by_name.get(key)
        if opt is None or (from_cli and opt.python_only):
            valid = [o.name for o in _visible(spec, from_cli)]
            if opt is not None:
                raise RanklmError(f"option {key} of {kind} {method} can only be given from Python, not the command line")
            listing = f"valid options: {', '.join(valid)}" if valid else f"{kind} {method} takes no options"
            raise RanklmError(f"unknown option {raw_key!r} for {kind} {method}; {listing}")
        if key in seen:
            raise RanklmError(f"option {key} of {kind} {method} is given twice ({seen[key]!r} and {raw_key!r})")
        seen[key] = str(raw_key)
        try:
            v = _coerce(opt, value)
        except _Bad as e:
            null = " or null" if opt.default is None or opt.nullable else ""
            raise RanklmError(f"option {key} of {kind} {method} must be {e}{null}, got {_show(value)}") from None
        if opt.choices is not None and v is not None and v not in opt.choices:
            raise RanklmError(
                f"option {key} of {kind} {method} must be one of {', '.join(map(str, opt.choices))}, got {_show(value)}"
            )
        if opt.bounds is not None and v is not None and not opt.bounds[0] <= v <= opt.bounds[1]:
            lo, hi = opt.bounds
            raise RanklmError(f"option {key} of {kind} {method} must lie in [{lo:g}, {hi:g}], got {_show(value)}")
        out[key] = v
    return out


def _type_name(o: Opt) -> str:
    if o.type is list and o.item is not None:
        return f"list[{o.item.__name__}]"
    return o.type.__name__


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_default_text(v) for v in value) + "]"
    return str(value)


def describe_options(kind: str, method: str, spec: Sequence[Opt]) -> str:
    """A block for listings: ``kind method`` then one line per (CLI-visible) option."""
    lines = [f"{kind} {method}"]
    shown = _visible(spec, from_cli=True)
    if not shown:
        lines.append("    (no options)")
    w_name = max([len(o.name) for o in shown] + [4])
    w_type = max([len(_type_name(o)) for o in shown] + [3])
    w_default = min(max([len(_default_text(o.default)) for o in shown] + [4]), 12)
    for o in shown:
        choices = f" (one of: {', '.join(map(str, o.choices))})" if o.choices else ""
        if o.bounds is not None:
            choices += f" (in [{o.bounds[0]:g}, {o.bounds[1]:g}])"
        lines.append(
            f"    {o.name:<{w_name}}  {_type_name(o):<{w_type}}  default {_default_text(o.default):<{w_default}}  "
            f"{o.help}{choices}"
        )
    return "\n".join(lines)


__all__ = ["Opt", "validate_options", "describe_options"]
