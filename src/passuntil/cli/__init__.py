"""The `passuntil` command line: thin wiring over the library.

    passuntil eval --task sim-scaling --series sim --store runs.sqlite --k 2 --max-samples 10000
    passuntil show runs.sqlite
    passuntil export runs.sqlite --out results.parquet
    passuntil demo

Every error a user can cause prints one line (`error: ...`) and exits with status 2.
"""

from __future__ import annotations

import sys

import click

from passuntil.cli import analysis, run  # noqa: F401 - registers the commands on the group
from passuntil.cli.common import cli
from passuntil.errors import UserError

__all__ = ["cli", "main"]


def main(argv=None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit status 2."""
    try:
        cli.main(args=argv, prog_name="passuntil", standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted; `passuntil eval --resume` continues a run", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; `passuntil eval --resume` continues a run", err=True)
        sys.exit(130)
