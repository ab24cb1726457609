"""Typed method options, declared once per method (docs/design.md §1 "Options are typed").

Every base, allocator and trainer declares its options once, as a frozen dataclass whose fields
carry their help (and bounds, choices, python-only) in field metadata, torchao-config style::

    @dataclass(frozen=True)
    class KFACOptions(MethodOptions):
        damping: float = opt(1e-6, "added to each factor's diagonal", bounds=(0.0, 1e6))
        shrink: float = opt(0.0, "shrink both factors toward their diagonals", bounds=(0.0, 1.0))

    @register_base("kfac")
    class KFACBase(Configurable):
        Options = KFACOptions

Everything else is derived from that one declaration: ``option_spec`` (one ``Opt`` per field:
name, type from the annotation, default, help), the one validator ``validate_options`` /
``parse_options`` (fills in defaults and refuses an unknown or ill-typed option with a one-line
``RanklmError``; the CLI prints it as ``error: ...`` and exits 2; the dataclass's
``__post_init__`` holds the rules that relate options or narrow a range, with their own one-line
messages), the listing ``describe_options`` (``ranklm methods``), the method's ``config``
(the validated instance; ``Configurable`` also sets each option as an attribute) and its
``options()`` report, and the record ``options_record`` written to ranklm.json
(``{"_type": "KFACOptions", "_version": 1, "options": {...}}``) that ``options_from_record``
reads back. A plugin class may still declare ``OPTIONS: tuple[Opt, ...]`` (validated the same way,
passed to its constructor as keywords).

Annotations: ``int``, ``float``, ``bool``, ``str``; ``Sequence[float]`` (or ``list[...]``) for a
list option whose elements are typed; ``Any`` for python-only values such as callables; ``X | None``
where the default is None or null is accepted.

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

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

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
    """One option of a base, allocator or trainer (derived from its options dataclass by ``option_spec``)."""

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
    kind: str, method: str, spec: Sequence[Opt] | type, given: Mapping[str, Any], from_cli: bool = False
) -> dict[str, Any]:
    """Every declared option of ``kind method`` (defaults filled in), or a one-line ``RanklmError``.

    ``spec`` is an options dataclass (or a tuple of ``Opt``). ``from_cli=True`` also refuses
    python-only options (callables and the like). Type rules only: ``parse_options`` also builds the
    dataclass, whose ``__post_init__`` checks the rest.
    """
    spec = _spec(spec)
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


def describe_options(kind: str, method: str, spec: Sequence[Opt] | type) -> str:
    """A block for listings: ``kind method`` then one line per (CLI-visible) option."""
    spec = _spec(spec)
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


# --------------------------------------------------------------------------- the one declaration

OPTION_METADATA = "ranklm"  # the dataclass field metadata key holding an option's help, choices, bounds


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options dataclass (declare subclasses ``@dataclass(frozen=True)``).

    ``VERSION`` is recorded with the options in ranklm.json; raise it when an option's meaning changes,
    so an older record is refused rather than misread. ``__post_init__`` (call ``super().__post_init__()``)
    holds the rules the types cannot say, each a one-line ``RanklmError``.
    """

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        pass


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """The options of a method that takes none."""


def opt(default: Any, help: str, *, choices: tuple | None = None, bounds: tuple[float, float] | None = None,
        python_only: bool = False) -> Any:
    """One option as a dataclass field: its default, one-line help and what it may take (type: the annotation).

    ``python_only``: accepted from the Python API, refused from the CLI, hidden from listings and records.
    """
    meta = {OPTION_METADATA: {"help": help, "choices": tuple(choices) if choices is not None else None,
                              "bounds": tuple(bounds) if bounds is not None else None, "python_only": python_only}}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _annotation(hint: Any) -> tuple[type, type | None, bool]:
    """An annotation as (option type, list item type, None allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        t, item, _ = _annotation(args[0]) if len(args) == 1 else (object, None, True)
        return t, item, len(args) < len(typing.get_args(hint))
    if hint in (int, float, bool, str):
        return hint, None, False
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and origin is not str and issubclass(origin, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return list, (args[0] if len(args) == 1 and args[0] in (int, float, bool, str) else None), False
    return object, None, True


def is_options_class(spec: Any) -> bool:
    return isinstance(spec, type) and issubclass(spec, MethodOptions)


@cache
def option_spec(cls: type) -> tuple[Opt, ...]:
    """The options an options dataclass declares, one ``Opt`` per field, in declaration order."""
    if not is_options_class(cls) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a MethodOptions dataclass")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(OPTION_METADATA)
        if meta is None:
            raise TypeError(f"option {f.name} of {cls.__name__}: declare it with opt(default, help, ...)")
        t, item, none_ok = _annotation(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if default is None and not none_ok:
            raise TypeError(f"option {f.name} of {cls.__name__}: default None needs an annotation 'X | None'")
        out.append(Opt(f.name, t, default, meta["help"], choices=meta["choices"], python_only=meta["python_only"],
                       item=item, nullable=none_ok and default is not None and t is not object, bounds=meta["bounds"]))
    return tuple(out)


def _spec(spec: Sequence[Opt] | type) -> Sequence[Opt]:
    return option_spec(spec) if isinstance(spec, type) else spec


def parse_options(kind: str, method: str, cls: type, given: Mapping[str, Any], from_cli: bool = False) -> Any:
    """``given`` validated (``validate_options``) into an instance of the options dataclass ``cls``."""
    return cls(**validate_options(kind, method, cls, given, from_cli=from_cli))


def option_values(options: Any, python_only: bool = False) -> dict[str, Any]:
    """An options instance as ``{name: value}``: the recordable ones (python-only left out unless asked)."""
    shown = [o for o in option_spec(type(options)) if python_only or not o.python_only]
    return {o.name: _plain(getattr(options, o.name)) for o in shown}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def options_record(options: Any) -> dict[str, Any]:
    """What ranklm.json records of one axis's options: ``{"_type", "_version", "options"}`` (python-only left out)."""
    cls = type(options)
    return {"_type": cls.__name__, "_version": cls.VERSION, "options": option_values(options)}


def options_from_record(kind: str, method: str, cls: type, record: Mapping[str, Any]) -> Any:
    """The options instance an ``options_record`` describes, validated again (one-line ``RanklmError``)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("options"), Mapping):
        raise RanklmError(f"the recorded options of {kind} {method} are not a {{_type, _version, options}} object")
    if record.get("_type") != cls.__name__:
        raise RanklmError(f"the recorded options of {kind} {method} are {record.get('_type')!r}; "
                          f"this ranklm's {kind} {method} takes {cls.__name__}")
    if record.get("_version") != cls.VERSION:
        raise RanklmError(f"the recorded options of {kind} {method} are {cls.__name__} version {record.get('_version')!r}; "
                          f"this ranklm reads version {cls.VERSION}")
    return parse_options(kind, method, cls, record["options"])


class Configurable:
    """A method whose options are its ``Options`` dataclass (default: none).

    ``Cls(options)`` takes a validated instance (what ``registry.build`` passes); ``Cls(**given)`` validates
    ``given`` with the one validator first. The instance is ``self.config``; each option is also set as an
    attribute of the same name, unless the class already defines that name (then read ``self.config``).
    """

    Options: ClassVar[type] = NoOptions
    registered_as: ClassVar[tuple[str, str]]  # (kind, name), set by the registry's decorators
    config: Any

    def __init__(self, options: Any = None, /, **given: Any) -> None:
        cls = type(self).Options
        if options is None:
            kind, name = getattr(type(self), "registered_as", ("method", type(self).__name__))
            options = parse_options(kind, name, cls, given)
        elif given or not isinstance(options, cls):
            raise TypeError(f"{type(self).__name__} takes one {cls.__name__} or keyword options, "
                            f"got {type(options).__name__}" + (" and keywords" if given else ""))
        self.config = options
        for f in dataclasses.fields(options):
            if not hasattr(type(self), f.name):
                setattr(self, f.name, getattr(options, f.name))

    def options(self) -> dict[str, Any]:
        """The options as recorded (ranklm.json, state fingerprints): every one but the python-only ones."""
        return option_values(self.config)


__all__ = ["Configurable", "MethodOptions", "NoOptions", "Opt", "describe_options", "is_options_class", "opt",
           "option_spec", "option_values", "options_from_record", "options_record", "parse_options",
           "validate_options"]
