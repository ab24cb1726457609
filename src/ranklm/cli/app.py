"""The typer application every command registers on, and its --version/-h."""

from __future__ import annotations

import typer

from .._version import __version__

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: brackets in help strings stay text, defaults show as [default: ...]
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Low-rank compression of transformer language models with adaptive rank selection.",
)


DEFAULT_MODEL_HELP = "packaged SmolLM2-135M-Instruct"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ranklm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the ranklm version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Low-rank compression of transformer language models with adaptive rank selection."""
