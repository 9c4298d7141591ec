"""What both command lines share: the error model at the top (an uncaught :class:`NeflError` becomes one
``error:`` line and its exit code), ``--version``, and logging set-up."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn, Optional

import typer

from nefl_edge.core.errors import ExitCode, NeflError


class CliError(NeflError):
    """An error a command reports itself, with its exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = code


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    raise CliError(message, code)


def run_app(app: typer.Typer, prog_name: str, args: Optional[list[str]] = None) -> NoReturn:
    """Run a typer app; a :class:`NeflError` ends it with ``error: <message>`` and the error's exit code."""
    try:
        app(args=args, prog_name=prog_name)
    except NeflError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    sys.exit(0)


def version_callback(value: bool) -> None:
    if value:
        from nefl_edge.core import __version__

        typer.echo(f"nefl-edge {__version__}")
        raise typer.Exit()


def add_version_option(app: typer.Typer) -> None:
    """``--version`` on the app itself (``nefl-coord --version``)."""

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
        ),
    ) -> None:
        pass


def setup_logging(verbose: bool, handler: Optional[logging.Handler] = None) -> None:
    """INFO logs (DEBUG with ``--verbose``) with times on stderr, or through ``handler`` (the coordinator
    passes rich's for a terminal)."""
    fmt = "%(message)s" if handler is not None else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=fmt,
        datefmt="%H:%M:%S",
        handlers=[handler or logging.StreamHandler()],
    )
    logging.getLogger("paho").setLevel(logging.WARNING)
