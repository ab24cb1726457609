"""The run options of ``compress`` and ``bench``, generated from ``CompressConfig``'s ``run_field``s.

A command decorated with ``@run_options()`` gets one click option per run field (flag, help, default and
shown default from the field) and receives their values as one ``run: dict`` argument, ready for
``CompressConfig(**run, ...)``. So a new run option is one dataclass field: the config validates it, both
commands take it, and ``config.run_args`` writes it back into a reproducing command line.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable

import typer

from ..config import CompressConfig, field_default, run_fields


def _option_type(config_cls: type, name: str) -> Any:
    return typing.get_type_hints(config_cls)[name]


def run_options(config_cls: type = CompressConfig, defaults: dict[str, Any] | None = None,
                shown: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``config_cls``'s run fields as options of a typer command, handed to it as ``run: dict``.

    ``defaults``/``shown`` override a field's default and the text ``--help`` shows for it, for a command
    whose meaning of "not given" differs (bench shares one window count between cells).
    """
    defaults, shown = defaults or {}, shown or {}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "run"]
        taken = {p.name for p in own}
        added, hints = [], {}
        for f in run_fields(config_cls):
            if f.name in taken:
                raise TypeError(f"{command.__name__} declares {f.name} itself and as a run field")
            default = defaults[f.name] if f.name in defaults else field_default(f)
            text = shown.get(f.name, f.metadata.get("show_default"))
            option = typer.Option(default, *f.metadata["flag"].split(" "), help=f.metadata["help"],
                                  **({"show_default": text} if text is not None else {}))
            hints[f.name] = _option_type(config_cls, f.name)
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]))
        names = [p.name for p in added]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            run = {name: kwargs.pop(name) for name in names if name in kwargs}
            for name in ("include", "exclude"):
                if name in run:
                    run[name] = list(run[name] or [])
            return command(*args, run=run, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**getattr(command, "__annotations__", {}), **hints}
        wrapper.__annotations__.pop("run", None)
        return wrapper

    return decorate


__all__ = ["run_options"]
