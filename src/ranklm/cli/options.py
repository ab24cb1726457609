"""Options that several commands take, defined once so their spelling, meaning and default cannot drift."""

from __future__ import annotations

from typing import Any

import typer

from .app import DEFAULT_MODEL_HELP


def model_argument(what: str = "HF model folder, hub id or ranklm checkpoint") -> Any:
    return typer.Argument(None, help=f"{what} (or give it as --model).", show_default=DEFAULT_MODEL_HELP,
                          metavar="[MODEL]")


def model_option(what: str = "HF model folder, hub id or ranklm checkpoint", default_help: str = DEFAULT_MODEL_HELP) -> Any:
    return typer.Option(None, "--model", "-m", help=f"{what} (or give it as the first argument).", show_default=default_help)


def threads_option() -> Any:
    return typer.Option(None, "--threads", help="torch CPU threads; results can depend on it, so it is recorded in "
                        "ranklm.json and in printed commands.", show_default="torch's default (the number of cores)")


def device_option(what: str) -> Any:
    return typer.Option("cpu", "--device", help=f"torch device to {what} on: cpu, cuda, cuda:1, ...")


def dtype_option(what: str) -> Any:
    return typer.Option("auto", "--dtype", help=f"{what}: auto (the folder's or checkpoint's own), float32, bfloat16, float16.")
