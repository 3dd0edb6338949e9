"""The `passuntil` command line: thin wiring over the library.

    passuntil eval --task sim-scaling --series sim --store runs.sqlite --k 2 --max-samples 10000
    passuntil show runs.sqlite
    passuntil export runs.sqlite --out results.parquet
    passuntil demo

`main` is the one boundary: every error a user can cause (a `UserError` from any stage, a file
that cannot be read or written, a store SQLite cannot use) prints one line `error: ...` and exits
with status 2; Ctrl-C exits with 130 and, during `eval`, prints the exact command that continues
the run. PASSUNTIL_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import click

from passuntil.cli import analysis, run, tasks  # noqa: F401 - registers the commands on the group
from passuntil.cli.common import Interrupted, cli
from passuntil.errors import UserError

__all__ = ["cli", "main"]


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or err}: {err.filename}"
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def main(argv=None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="passuntil", standalone_mode=False)
    except Interrupted as err:
        click.echo(f"interrupted; continue the run with: {err.resume_command}", err=True)
        sys.exit(130)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except (UserError, OSError, sqlite3.Error) as err:
        if os.environ.get("PASSUNTIL_DEBUG") == "1":
            raise
        prefix = "run store: " if isinstance(err, sqlite3.Error) else ""
        click.echo(f"error: {prefix}{_one_line(err)}", err=True)
        sys.exit(2)
