"""Strict JSON in and out: what passuntil writes parses in every JSON reader.

Python's `json` writes NaN and Infinity as bare words that strict parsers (browsers, jq, Go,
Rust) reject. `dumps` turns every non-finite float into null (and numpy scalars and arrays into
plain numbers and lists) and refuses anything else non-standard; `loads` refuses the bare words
too, so a file a strict reader would reject is never taken in silently.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """A copy of obj with plain types only: non-finite floats become None, numpy values Python ones."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps of json_safe(obj), with NaN/Infinity refused (never written)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN or Infinity)")


def loads(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (raises ValueError)."""
    return json.loads(text, parse_constant=_refuse_constant)
