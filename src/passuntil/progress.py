"""Progress of a PassUntil run a person can read: which model, which tasks, which stage
(sampling, checking, reference scores), instances done, samples, rate and time left.

In a terminal it is a rich bar; otherwise (nohup, Slurm, a pipe) one plain line at most every
`log_every_s` seconds. The time left is given twice: an estimate from the instances finished so
far, and a bound — every unfinished instance can draw at most its budget, so at the current rate
the run ends within (total budget - samples drawn) / rate.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from passuntil.engine import Progress as EngineProgress


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3.5h, 2.1d."""
    if not math.isfinite(seconds):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            value = seconds / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{seconds:.0f}s"


class RichProgress(EngineProgress):
    """Instances finished out of models x instances, samples drawn, samples/s and time left."""

    def __init__(self, total_instances: int, *, max_samples: int | None = None,
                 console: Console | None = None, log_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, log_file=None):
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.log_every_s = log_every_s
        self.log_file = log_file
        self.total = total_instances
        self.max_samples = max_samples
        self.done = 0
        self.samples = 0
        self.model, self.tasks, self.stage_name = "", (), "starting"
        self.start = clock()
        self._last_log: float | None = None
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[samples]:,} samples ({task.fields[rate]:,.0f}/s)"),
            TimeRemainingColumn(), TextColumn("{task.fields[bound]}"),
            console=self.console, transient=False, disable=not self.console.is_terminal)
        self.task_id = self.bar.add_task("PassUntil", total=total_instances, samples=0, rate=0.0,
                                         bound="")

    # what the run layer and the engine report --------------------------------------------------

    def set_model(self, name: str, tasks: Sequence[str] = ()) -> None:
        self.model, self.tasks, self.stage_name = name, tuple(tasks), "loading"
        self._update()

    def stage(self, name: str) -> None:
        if name != self.stage_name:
            self.stage_name = name
            self._update()

    def advance(self, *, instances: int = 0, samples: int = 0) -> None:
        self.samples += samples
        self.done += instances
        self._update(advance=instances)

    # what is shown ----------------------------------------------------------------------------------

    def description(self) -> str:
        parts = [self.model or "PassUntil", ", ".join(self.tasks), self.stage_name]
        return " · ".join(p for p in parts if p)

    def rate(self) -> float:
        return self.samples / max(1e-9, self.clock() - self.start)

    def eta(self) -> tuple[float, float]:
        """(estimate from instances finished, bound from the budget left), in seconds."""
        elapsed, rate = self.clock() - self.start, self.rate()
        left = self.total - self.done
        estimate = elapsed * left / self.done if self.done else math.inf
        if left == 0:
            return 0.0, 0.0
        if not self.max_samples or rate <= 0:
            return estimate, math.inf
        bound = max(0.0, self.total * self.max_samples - self.samples) / rate
        return min(estimate, bound), bound

    def log_line(self) -> str:
        estimate, bound = self.eta()
        return (f"passuntil: {self.description()}: {self.done}/{self.total} instances, "
                f"{self.samples:,} samples ({self.rate():,.0f}/s), "
                f"ETA {duration(estimate)} (at most {duration(bound)})")

    def _update(self, advance: int = 0) -> None:
        bound = self.eta()[1]
        self.bar.update(self.task_id, advance=advance, description=escape(self.description()),
                        samples=self.samples, rate=self.rate(),
                        bound=f"≤ {duration(bound)}" if math.isfinite(bound) else "")
        if self.console.is_terminal:
            return
        now = self.clock()
        if self._last_log is None or now - self._last_log >= self.log_every_s:
            self._last_log = now
            print(self.log_line(), file=self.log_file or sys.stderr, flush=True)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()
