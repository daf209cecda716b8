"""The `geovr-pipeline` command line: wiring only; each command calls into its stage's module.

Every command turns expected errors (bad config values, unreadable inputs, schema mismatches, a
store another run is writing, a full disk) into one `error: ...` line and a non-zero exit, without a
traceback.
"""

from __future__ import annotations

import errno
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from geovr.teacher_cache.config import ConfigError
from geovr.teacher_cache.lease import StoreLeaseError

app = typer.Typer(
    name="geovr-pipeline",
    help="GeoVR distillation: precompute VGGT teacher labels once, train a Qwen3-VL student from the cache.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)

# Help panels, in the order of the workflow.
DATA = "Data"
STAGE_1 = "Stage 1: precompute teacher labels"
STAGE_2 = "Stage 2: train the student"
EVALUATION = "Evaluation"
DEMO = "Demo"


class UsageError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    UsageError,
    StoreLeaseError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)


def _register_commands() -> None:
    from geovr.app import commands  # noqa: F401  (registers the commands on `app`)


def main() -> None:
    _register_commands()
    try:
        # Not standalone: typer's own usage errors come back here and get the one-line treatment too.
        status = app(standalone_mode=False)
    except typer.TyperException as err:  # bad option values, missing options, unknown commands
        if type(err).__name__ == "NoArgsIsHelpError":  # typer printed the help when raising it
            sys.exit(err.exit_code)
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _print_error(f"{err.format_message()}{hint}")
        sys.exit(err.exit_code)
    except typer.Abort:
        _print_error("aborted")
        sys.exit(1)
    except (*EXPECTED_ERRORS, ValueError, OSError) as err:
        # Schema and validation errors of the stages are ValueErrors whose message names the input;
        # a full disk is expected too. GEOVR_DEBUG=1 shows the traceback instead.
        disk_full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        expected = disk_full or isinstance(err, (*EXPECTED_ERRORS, ValueError))
        if os.environ.get("GEOVR_DEBUG") or not expected:
            raise
        if disk_full:  # the message without "[Errno 28]"
            _print_error(err.strerror if err.filename is None else f"{err.strerror}: {err.filename}")
        else:
            _print_error(str(err))
        sys.exit(2)
    # Without standalone mode typer returns the exit code of `--help` and `typer.Exit` instead of exiting.
    sys.exit(status if isinstance(status, int) else 0)


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
