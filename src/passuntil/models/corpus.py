"""The training corpus: Python's own standard library (real code, a stand-in for StarCoder)
mixed with generated documents in the bundled tasks' formats, never containing an
evaluation item.

Deterministic for a given seed and Python installation (the standard library differs
slightly between Python versions). Documents are joined with the EOS token.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from passuntil.models.tokenizer import EOS_ID
from passuntil.tasks import bundled as B

MIX = {"stdlib": 0.25, "arith": 0.20, "dates": 0.20, "reverse": 0.15, "code": 0.20}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "idlelib", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(s in p.parts for s in skip))


def _stdlib_docs(rng: random.Random) -> Iterator[str]:
    files = stdlib_files()
    rng.shuffle(files)
    while True:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for start in range(0, len(text), 4000):  # chunks of about a context's worth
                yield text[start:start + 4000]


def _arith_doc(rng: random.Random, held: set) -> str:
    lines = []
    while len(lines) < rng.randrange(8, 24):
        digits_a, digits_b = rng.choice([(1, 1), (1, 2), (2, 1), (2, 2), (2, 2), (2, 2)])
        a = rng.randrange(10 ** (digits_a - 1), 10**digits_a)
        b = rng.randrange(10 ** (digits_b - 1), 10**digits_b)
        if (a, b) in held or (b, a) in held:
            continue
        lines.append(f"{a}+{b}={a + b}")
    return "\n".join(lines) + "\n"


def _dates_doc(rng: random.Random, held: set) -> str:
    transform = rng.choice(B.DATE_TRANSFORMS)
    lines = []
    while len(lines) < rng.randrange(5, 12):
        d = B.random_date(rng)
        if d not in held:
            lines.append("".join(B.date_line(d, transform)))
    return "\n".join(lines) + "\n"


def _reverse_doc(rng: random.Random, held: set) -> str:
    lines = []
    while len(lines) < rng.randrange(6, 16):
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.choice([2, 3, 3, 4])))
        if s not in held and s[::-1] not in held:
            lines.append(f"reverse: {s} -> {s[::-1]}")
    return "\n".join(lines) + "\n"


def _code_doc(rng: random.Random, held: set) -> str:
    funcs = []
    while len(funcs) < rng.randrange(2, 6):
        variant = rng.choice(B.code_variants())
        if variant in held:
            continue
        prompt, body, _, _ = B.code_function(*variant)
        funcs.append(prompt + body)
    return "\n\n".join(funcs) + "\n"


def documents(seed: int = 0) -> Iterator[str]:
    """An endless, deterministic stream of training documents."""
    rng = random.Random(seed)
    items = B.heldout()
    held = {"arith": set(items["arith"]), "dates": set(items["dates"]),
            "reverse": set(items["reverse"]), "code": set(items["code"])}
    stdlib = _stdlib_docs(random.Random(seed + 1))
    makers = {"arith": _arith_doc, "dates": _dates_doc, "reverse": _reverse_doc, "code": _code_doc}
    kinds, weights = list(MIX), list(MIX.values())
    while True:
        kind = rng.choices(kinds, weights)[0]
        yield next(stdlib) if kind == "stdlib" else makers[kind](rng, held[kind])


def token_stream(n_tokens: int, *, seed: int = 0) -> np.ndarray:
    """The first n_tokens tokens of the corpus (bytes, EOS between documents), as uint16."""
    out = np.empty(n_tokens, dtype=np.uint16)
    pos = 0
    for doc in documents(seed):
        ids = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8)
        take = min(len(ids), n_tokens - pos)
        out[pos:pos + take] = ids[:take]
        pos += take
        if pos < n_tokens:
            out[pos] = EOS_ID
            pos += 1
        if pos >= n_tokens:
            return out
    raise AssertionError("unreachable")
