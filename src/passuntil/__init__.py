"""passuntil: make the task performance of language models predictable across scale.

PassUntil evaluation (sample until K passes or a budget is spent), exact estimators and
intervals, a crash-safe run store, and (in later modules) task-scaling-law fits, forecasts
and emergence analysis. See README.md for the two commands that start everything.
"""

__version__ = "0.1.0"

from passuntil.backends.base import Completion, Sampler, SamplingParams, TokenScores
from passuntil.engine import EngineConfig, InstanceResult, run_passuntil
from passuntil.errors import UserError
from passuntil.tasks.base import Instance, Task

__all__ = [
    "Completion",
    "EngineConfig",
    "Instance",
    "InstanceResult",
    "Sampler",
    "SamplingParams",
    "Task",
    "TokenScores",
    "UserError",
    "__version__",
    "run_passuntil",
]
