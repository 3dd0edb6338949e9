"""Seeds are derived, never constant.

`derive_seed(base, model, instance, ...)` names one random stream; `uniforms(seed, indices)`
gives the uniform draw of each *sample index* of that stream. Because sample j of an instance
always uses the same draw, a PassUntil result does not depend on how samples were batched,
sharded over workers, or resumed after a crash.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes and Python versions."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised over uint64 (a high-quality counter-based hash)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def uniforms(seed: int, indices: np.ndarray, *, stream: int = 0) -> np.ndarray:
    """Uniform draws in [0, 1), one per sample index, for the stream named by `seed`."""
    key = splitmix64(np.array([(seed ^ (stream * 0x632BE59BD9B4E019)) & _MASK64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        bits = splitmix64(np.asarray(indices, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03) ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def row_keys(seed: int, indices: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample index of the stream `seed` (for per-step draws)."""
    key = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(indices, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03) ^ key)


def step_uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """The uniform draw of every row at decoding step `step`; depends only on (key, step)."""
    with np.errstate(over="ignore"):
        bits = splitmix64(keys ^ np.uint64((step * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
