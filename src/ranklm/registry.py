"""The method tables: name -> class for bases, allocators, trainers and calibration statistics.

Passive by design: this module imports no method. Methods register themselves with a class
decorator where they are defined (``@register_base("kfac")``, ``@register_allocator("global")``,
``@register_trainer("finetune")``, ``@register_statistic("gram")``), as peft's
``register_peft_method`` and torchao's ``register_quantize_module_handler`` do. The tables are
filled on first lookup (``table(kind)``): the built-in method packages are loaded as ranklm's own
plugin, then every entry point of the ``ranklm.methods`` group, so a third-party package adds a
method with one module and one line of packaging metadata::

    [project.entry-points."ranklm.methods"]
    my_method = "my_package.my_module"

Each registered class declares its options once, as its ``Options`` dataclass (``options.MethodOptions``;
a plugin may instead declare ``OPTIONS: tuple[Opt, ...]``); ``build`` validates the given options
against it and hands the constructor the validated instance, so an unknown or ill-typed option is
one ``RanklmError`` line, never a silently ignored keyword.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Mapping, TypeVar

from .errors import RanklmError
from .options import Opt, is_options_class, option_spec, options_record, parse_options, validate_options

KINDS = ("base", "allocator", "trainer", "statistic")
ENTRY_POINT_GROUP = "ranklm.methods"
# ranklm's own methods, loaded like any plugin: importing each package runs its modules' decorators.
BUILTIN_PLUGINS = ("ranklm.decompose", "ranklm.allocate", "ranklm.train", "ranklm.calibration")

_TABLES: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_loaded = False
_loading = False
logger = logging.getLogger(__name__)
T = TypeVar("T", bound=type)


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: enter ``cls`` in the ``kind`` table under ``name`` (a second class under a taken name is refused)."""
    if kind not in _TABLES:
        raise ValueError(f"unknown method kind {kind!r}; valid: {', '.join(KINDS)}")

    def decorate(cls: T) -> T:
        have = _TABLES[kind].get(name)
        if have is not None and have is not cls and (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RanklmError(f"two {kind}s named {name!r}: {have.__module__}.{have.__qualname__} and "
                              f"{cls.__module__}.{cls.__qualname__}")
        _TABLES[kind][name] = cls
        cls.name = name  # type: ignore[attr-defined]
        cls.registered_as = (kind, name)  # type: ignore[attr-defined]  (names it in option errors)
        return cls

    return decorate


def register_base(name: str) -> Callable[[T], T]:
    return register("base", name)


def register_allocator(name: str) -> Callable[[T], T]:
    return register("allocator", name)


def register_trainer(name: str) -> Callable[[T], T]:
    return register("trainer", name)


def register_statistic(name: str) -> Callable[[T], T]:
    return register("statistic", name)


def registered(kind: str) -> dict[str, type]:
    """The live table of one kind as filled so far, without loading anything (for the packages that fill it)."""
    return _TABLES[kind]


def load_methods() -> None:
    """Load the built-in methods and every ``ranklm.methods`` entry point, once."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        for module in BUILTIN_PLUGINS:
            importlib.import_module(module)
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin is named, not a traceback from deep inside
                raise RanklmError(f"the ranklm plugin {ep.name!r} ({ep.value}) failed to load: "
                                  f"{type(e).__name__}: {e}") from None
        _loaded = True
    finally:
        _loading = False


def table(kind: str) -> dict[str, type]:
    """The live table of one kind (methods loaded first)."""
    if kind not in _TABLES:
        raise ValueError(f"unknown method kind {kind!r}; valid: {', '.join(KINDS)}")
    load_methods()
    return _TABLES[kind]


def names(kind: str) -> tuple[str, ...]:
    return tuple(sorted(table(kind)))


def lookup(kind: str, name: str) -> type:
    found = table(kind)
    if name not in found:
        raise RanklmError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(found))}")
    return found[name]


def options_class(cls: type) -> type | None:
    """A method class's options dataclass, or None (a plugin with an ``OPTIONS`` tuple, or none declared)."""
    found = getattr(cls, "Options", None)
    return found if is_options_class(found) else None


def declared_options(cls: type) -> tuple[Opt, ...] | None:
    """What a method class declares (derived from its options dataclass), or None if it declares nothing."""
    found = options_class(cls)
    if found is not None:
        return option_spec(found)
    spec = getattr(cls, "OPTIONS", None)
    return None if spec is None else tuple(spec)


def build(kind: str, name: str, options: Mapping[str, Any] | None = None, from_cli: bool = False) -> Any:
    """Instantiate the ``kind`` called ``name`` with validated options, or explain which names exist."""
    cls = lookup(kind, name)
    if options_class(cls) is not None:
        return cls(method_config(kind, name, options or {}, from_cli))
    return cls(**check_options(kind, name, options or {}, from_cli))


def method_options(kind: str, name: str) -> tuple[Opt, ...]:
    """The declared options of one method (``()`` if it declares none)."""
    return declared_options(lookup(kind, name)) or ()


def method_config(kind: str, name: str, options: Mapping[str, Any], from_cli: bool = False) -> Any:
    """The validated options instance of ``kind name`` (its ``Options`` dataclass), or a one-line ``RanklmError``."""
    found = options_class(lookup(kind, name))
    if found is None:
        raise RanklmError(f"{kind} {name} declares no options dataclass")
    return parse_options(kind, name, found, options, from_cli=from_cli)


def method_record(kind: str, name: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``options_record`` of ``kind name`` with ``options`` (None for a plugin without an options dataclass)."""
    if options_class(lookup(kind, name)) is None:
        return None
    return options_record(method_config(kind, name, options))


def check_options(kind: str, name: str, options: Mapping[str, Any], from_cli: bool = False) -> dict[str, Any]:
    """Validate options for ``kind name`` without building it (e.g. before loading a model): every option, defaults in."""
    cls = lookup(kind, name)
    if options_class(cls) is not None:
        config = method_config(kind, name, options, from_cli)
        return {o.name: getattr(config, o.name) for o in option_spec(type(config))}
    spec = getattr(cls, "OPTIONS", None)
    if spec is None:
        return dict(options)
    return validate_options(kind, name, spec, options, from_cli=from_cli)


__all__ = ["KINDS", "build", "check_options", "declared_options", "load_methods", "lookup", "method_config",
           "method_options", "method_record", "names", "options_class", "register", "register_allocator",
           "register_base", "register_statistic", "register_trainer", "registered", "table"]
