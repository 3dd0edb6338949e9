"""A progress bar with ETA for long PassUntil runs (rich), quiet when output is not a terminal."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from passuntil.engine import Progress as EngineProgress


class RichProgress(EngineProgress):
    """Instances finished out of models x instances, samples drawn, samples/s and ETA."""

    def __init__(self, total_instances: int, *, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[samples]:,} samples ({task.fields[rate]:,.0f}/s)"),
            TimeRemainingColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal,
        )
        self.task_id = self.bar.add_task("PassUntil", total=total_instances, samples=0, rate=0.0)
        self.samples = 0
        self.start = time.monotonic()
        self._last_log = self.start
        self.total = total_instances
        self.done = 0

    def set_model(self, name: str) -> None:
        self.bar.update(self.task_id, description=f"PassUntil [{name}]")

    def advance(self, *, instances: int = 0, samples: int = 0) -> None:
        self.samples += samples
        self.done += instances
        rate = self.samples / max(1e-9, time.monotonic() - self.start)
        self.bar.update(self.task_id, advance=instances, samples=self.samples, rate=rate)
        if not self.console.is_terminal and time.monotonic() - self._last_log > 30:
            self._last_log = time.monotonic()
            print(f"passuntil: {self.done}/{self.total} instances, {self.samples:,} samples "
                  f"({rate:,.0f}/s)", file=sys.stderr)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()
