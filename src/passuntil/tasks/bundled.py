"""The bundled tasks, generated with a fixed seed, and the formats the training corpus uses.

* "arith":   2-digit addition with a three-digit sum, 8 solved examples then the query,
             "...\n31+25=56\n47+85=" -> "132" (the corpus has such lines).
* "dates":   in-context date-format transforms in the style of BIG-bench's unnatural in-context
             learning: 4 solved examples of one transform, then a query.
* "reverse": reverse a 3-letter string, "reverse: hqt -> " -> "tqh".
* "code":    a small HumanEval: a Python signature and docstring; the completion is the body,
             checked by executing unit tests.

Every evaluation item is held out: `heldout()` names the items (operand pairs, query dates,
strings, function variants) that the corpus generator must never emit.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from dataclasses import dataclass

from passuntil.tasks.base import Instance, Task
from passuntil.tasks.checks import Exact, UnitTests

SEED = 20231001
N_EVAL = 40
ARITH_SHOTS = 8
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty"]


# ---- dates ---------------------------------------------------------------------------------

DATE_FORMATS = {
    "iso": lambda d: d.isoformat(),
    "us": lambda d: d.strftime("%m/%d/%Y"),
    "eu": lambda d: d.strftime("%d.%m.%Y"),
    "long": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
}
DATE_TRANSFORMS = [("iso", "us"), ("iso", "eu"), ("us", "iso")]
REVERSE_LEN = 3


def random_date(rng: random.Random) -> dt.date:
    return dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(200 * 365))


def date_line(d: dt.date, transform: tuple[str, str]) -> tuple[str, str]:
    src, dst = transform
    return f"{DATE_FORMATS[src](d)} -> ", DATE_FORMATS[dst](d)


# ---- code ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeFamily:
    name: str  # with {w}: the number word
    arg: str
    doc: str  # with {k}
    body: str  # with {k}
    tests: tuple[tuple[str, str], ...]  # (call args, expected) with {k}


CODE_FAMILIES = [
    CodeFamily("add_{w}", "x", "Return x plus {k}.", "return x + {k}", (("3", "3 + {k}"), ("-10", "-10 + {k}"))),
    CodeFamily("subtract_{w}", "x", "Return x minus {k}.", "return x - {k}", (("50", "50 - {k}"), ("0", "-{k}"))),
    CodeFamily("times_{w}", "x", "Return x multiplied by {k}.", "return x * {k}", (("4", "4 * {k}"), ("-3", "-3 * {k}"))),
    CodeFamily("is_multiple_of_{w}", "n", "Return True if n is divisible by {k}.", "return n % {k} == 0",
               (("{k} * 7", "True"), ("{k} * 3 + 1", "False"))),
    CodeFamily("repeat_{w}", "s", "Return the string s repeated {k} times.", "return s * {k}",
               (("'ab'", "'ab' * {k}"), ("''", "''"))),
    CodeFamily("first_{w}", "xs", "Return the first {k} items of the list xs.", "return xs[:{k}]",
               (("list(range(30))", "list(range({k}))"), ("[]", "[]"))),
    CodeFamily("power_{w}", "x", "Return x to the power {k}.", "return x ** {k}", (("2", "2 ** {k}"), ("-1", "(-1) ** {k}"))),
    CodeFamily("floor_divide_{w}", "x", "Return x divided by {k}, rounded down.", "return x // {k}",
               (("100", "100 // {k}"), ("-7", "-7 // {k}"))),
]


def code_variants() -> list[tuple[int, int]]:
    """Every (family index, k) pair: k from 2 to 20."""
    return [(f, k) for f in range(len(CODE_FAMILIES)) for k in range(2, 21)]


def code_function(family: int, k: int) -> tuple[str, str, str, str]:
    """(prompt, canonical body, test code defining check(candidate), entry point) for a variant."""
    fam = CODE_FAMILIES[family]
    name = fam.name.format(w=NUMBER_WORDS[k])
    prompt = f'def {name}({fam.arg}):\n    """{fam.doc.format(k=k)}"""\n'
    body = f"    {fam.body.format(k=k)}\n"
    asserts = "".join(f"    assert candidate({a.format(k=k)}) == {e.format(k=k)}\n"
                      for a, e in fam.tests)
    return prompt, body, "def check(candidate):\n" + asserts, name


# ---- held-out evaluation items -------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def heldout() -> dict[str, list]:
    """The evaluation items of every bundled task, fixed by SEED."""
    rng = random.Random(SEED)
    arith = []
    while len(arith) < N_EVAL:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        if (a, b) not in arith and (b, a) not in arith:
            arith.append((a, b))
    dates = []
    while len(dates) < N_EVAL:
        d = random_date(rng)
        if d not in dates:
            dates.append(d)
    letters = "abcdefghijklmnopqrstuvwxyz"
    strings = []
    while len(strings) < N_EVAL:
        s = "".join(rng.choice(letters) for _ in range(REVERSE_LEN))
        if s not in strings and s[::-1] not in strings:
            strings.append(s)
    code = rng.sample(code_variants(), N_EVAL)
    return {"arith": arith, "dates": dates, "reverse": strings, "code": code}


# Held-out code variants whose function name Python's own standard library defines (3.11:
# test/test_decorators.py has add_five, typing.py add_two). The corpus includes the standard
# library, so these would leak; they are left out of the evaluation set (38 instances remain).
STDLIB_CLASHES = frozenset({"add_five", "add_two"})


def make_bundled(name: str) -> Task:
    items = heldout()
    if name == "arith":
        # The held-out pairs whose sum has three digits (26 of 40), each after 8 solved examples:
        # zero-shot, the small models mostly answer with two digits, and the curve of the exact
        # pass probability dips and plateaus (1.4 orders over the series); with the examples it
        # rises steadily, 2.2 orders (docs/bundled-series.md).
        rng = random.Random(SEED + 2)
        held = set(items["arith"]) | {(b, a) for a, b in items["arith"]}
        inst = []
        for i, (a, b) in enumerate(items["arith"]):
            if a + b < 100:
                continue
            shots = []
            while len(shots) < ARITH_SHOTS:
                x, y = rng.randrange(10, 100), rng.randrange(10, 100)
                if (x, y) not in held:
                    shots.append(f"{x}+{y}={x + y}")
            inst.append(Instance(f"{i:02d}", "\n".join(shots) + f"\n{a}+{b}=", (str(a + b),)))
        return Task("arith", tuple(inst), Exact(), stop=("\n",), max_new_tokens=6,
                    source="bundled: 2-digit addition", description="8-shot a+b= with a three-digit sum")
    if name == "dates":
        rng = random.Random(SEED + 1)
        inst = []
        for i, d in enumerate(items["dates"]):
            transform = DATE_TRANSFORMS[i % len(DATE_TRANSFORMS)]
            shots = []
            while len(shots) < 4:
                s = random_date(rng)
                if s not in items["dates"]:
                    shots.append("".join(date_line(s, transform)))
            query, answer = date_line(d, transform)
            inst.append(Instance(f"{i:02d}", "\n".join(shots) + "\n" + query, (answer,),
                                 {"transform": "->".join(transform)}))
        return Task("dates", tuple(inst), Exact(), stop=("\n",), max_new_tokens=24,
                    source="bundled: in-context date transforms (UICL style)",
                    description="4-shot date-format transform")
    if name == "reverse":
        inst = tuple(Instance(f"{i:02d}", f"reverse: {s} -> ", (s[::-1],)) for i, s in enumerate(items["reverse"]))
        return Task("reverse", inst, Exact(), stop=("\n",), max_new_tokens=8,
                    source="bundled: string reversal", description="reverse a 3-letter string")
    if name == "code":
        inst = []
        for i, (f, k) in enumerate(items["code"]):
            if CODE_FAMILIES[f].name.format(w=NUMBER_WORDS[k]) in STDLIB_CLASHES:
                continue
            prompt, body, test, entry_point = code_function(f, k)
            inst.append(Instance(f"{i:02d}", prompt, (body.rstrip("\n"),),
                                 {"test": test, "entry_point": entry_point,
                                  "family": CODE_FAMILIES[f].name}))
        return Task("code", tuple(inst), UnitTests(), stop=("\n\n", "\ndef ", "\nclass "),
                    max_new_tokens=48, source="bundled: small HumanEval (unit tests executed)",
                    description="complete a one-line Python function")
    raise KeyError(name)


BUNDLED_TASKS = ("arith", "dates", "reverse", "code")
