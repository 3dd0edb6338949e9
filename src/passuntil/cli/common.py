"""Shared pieces of the command line: the click group, the console, and opening a store's runs."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from passuntil import __version__

console = Console(width=None if sys.stdout.isatty() else 160)  # no truncation in pipes and logs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="passuntil")
def cli() -> None:
    """Predict the task performance of language models across scale (PassUntil)."""


class Interrupted(Exception):
    """Ctrl-C during a command that can be continued: carries the exact command that does it."""

    def __init__(self, resume_command: str):
        super().__init__(resume_command)
        self.resume_command = resume_command


def open_store(path: str, *, create: bool):
    from passuntil.store import Store

    return Store(path, create=create)
