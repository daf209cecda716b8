"""The `geovr-pipeline` command line: wiring only; each command calls into its stage's module.

Every command turns expected errors (bad config values, unreadable inputs, schema mismatches) into
one `error: ...` line and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from geovr.teacher_cache.config import ConfigError

app = typer.Typer(
    name="geovr-pipeline",
    help="GeoVR distillation: precompute VGGT teacher labels once, train a Qwen3-VL student from the cache.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


class UsageError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ConfigError, UsageError, FileNotFoundError, PermissionError)


def _register_commands() -> None:
    from geovr.pipeline import commands  # noqa: F401  (registers the commands on `app`)


def main() -> None:
    _register_commands()
    try:
        app()
    except (*EXPECTED_ERRORS, ValueError) as err:
        # Schema and validation errors of the stages are ValueErrors whose message names the input.
        # GEOVR_DEBUG=1 shows the traceback instead.
        if os.environ.get("GEOVR_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
