"""Option types that refuse nonsense numbers at parse time, before any work is done.

`Number(low, high, ...)` accepts a finite float inside an interval (open or closed at each
end); NaN and infinities are refused even where click's FloatRange would let NaN through
(every comparison with NaN is false). A refusal is a click usage error, which the CLI prints as
one line (`error: Invalid value for '--level': 1.5 is not in (0, 1)`) with exit status 2.
"""

from __future__ import annotations

import math

import click


class Number(click.ParamType):
    """A finite float in (low, high) / [low, high] / ... (None: unbounded on that side)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, *,
                 low_open: bool = True, high_open: bool = True):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _interval(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value):
            v = value
        else:
            try:
                v = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        below = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        above = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if below or above:
            self.fail(f"{v:g} is not in {self._interval()}", param, ctx)
        return v


PROBABILITY = Number(0.0, 1.0)  # an interval level, a confidence, a threshold PU: strictly inside (0, 1)
PASS_PROBABILITY = Number(0.0, 1.0, low_open=False, high_open=False)  # a guessed pass probability: [0, 1]
POSITIVE = Number(0.0)  # a size, a throughput: finite and > 0
COUNT = click.IntRange(min=1)  # K, a budget, a number of draws: >= 1
