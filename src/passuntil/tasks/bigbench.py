"""BIG-bench tasks read from the `bigbench` package's own `task.json` files.

The full `bigbench` install is 1.8 GB, so `fetch_bigbench` downloads its source distribution from
PyPI once (pip verifies the index's hash) and extracts only the task files used here, plus the
package metadata (PKG-INFO: Apache-2.0) and its scoring code (used by the parity test), into a cache directory
(`$PASSUNTIL_DATA`, default `~/.cache/passuntil`). Nothing from BIG-bench is vendored.

Test sets follow the paper's Appendix D.4: fixed-seed draws, 4-shot in-context prompts with shots
from the remaining items, distracting items removed (Emoji Movie titles that are common English
words; Date Understanding items whose answer can be copied from the question).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from passuntil.errors import UserError
from passuntil.tasks.base import Instance, Task
from passuntil.tasks.checks import Contains

VERSION = "1.0.0"
SEED = 20231001
UICL = ("dates", "dates_unnatural_content", "dates_unnatural_content_and_form",
        "dates_unnatural_form", "identity", "reverse_natural_content",
        "reverse_to_natural_content", "unnatural_addition_2_digit")
MODIFIED_ARITHMETIC = ("three_digit_addition_control", "three_digit_addition_plus_one",
                       "three_digit_subtraction_control", "three_digit_subtraction_plus_one",
                       "two_digit_multiplication_control", "two_digit_multiplication_plus_one")
TASK_DIRS = ("emoji_movie", "date_understanding",
             *(f"unnatural_in_context_learning/{s}" for s in UICL),
             *(f"modified_arithmetic/{s}" for s in MODIFIED_ARITHMETIC))
EXTRA_FILES = ("PKG-INFO", "bigbench/api/task_metrics.py", "bigbench/models/model_utils.py")
N_PER_SUBTASK = 20


def data_root() -> Path:
    return Path(os.environ.get("PASSUNTIL_DATA") or Path.home() / ".cache" / "passuntil")


def cache_dir() -> Path:
    return data_root() / f"bigbench-{VERSION}"


def fetch_bigbench(dest: Path | None = None, log=print) -> Path:
    """Download the bigbench sdist from PyPI and extract the needed files; returns the folder."""
    dest = dest or cache_dir()
    if (dest / "MANIFEST.json").exists():
        return dest
    wanted = {f"bigbench/benchmark_tasks/{d}/task.json" for d in TASK_DIRS} | set(EXTRA_FILES)
    with tempfile.TemporaryDirectory(prefix="passuntil-bigbench-") as tmp:
        log(f"downloading bigbench=={VERSION} source from PyPI (about 360 MB) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
               ":all:", f"bigbench=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("bigbench-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise UserError(f"could not download bigbench from PyPI: {done.stderr.strip()[-300:]}")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_mkdir(dest.parent)))
        try:
            found = _extract(sdists[0], staging, wanted)
            (staging / "MANIFEST.json").write_text(json.dumps(
                {"package": f"bigbench=={VERSION}", "source": sdists[0].name,
                 "files": sorted(found)}, indent=1))
            if not (dest / "MANIFEST.json").exists():  # another fetch may have finished first
                staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"extracted {len(found)} files into {dest}")
    return dest


def _extract(sdist: Path, staging: Path, wanted: set[str]) -> list[str]:
    """Extract just the wanted members (paths relative to the sdist's top folder)."""
    found = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = member.name.split("/", 1)[-1]
            if member.isfile() and name in wanted:
                member.name = name
                tar.extract(member, staging, filter="data")
                found.append(name)
    missing = wanted - set(found)
    if missing:
        raise UserError(f"bigbench sdist lacks {sorted(missing)[:3]}")
    return found


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def available() -> bool:
    return (cache_dir() / "MANIFEST.json").exists()


def load_task_json(task_dir: str) -> dict:
    """A BIG-bench task.json from the data cache (read once per path, checked for its shape)."""
    path = cache_dir() / "bigbench" / "benchmark_tasks" / task_dir / "task.json"
    if not path.exists():
        raise UserError(f"BIG-bench data not found in {cache_dir()}; run `passuntil fetch-data` "
                        "(downloads the bigbench source from PyPI once)")
    return _read_task_json(str(path))


@functools.lru_cache(maxsize=32)
def _read_task_json(path: str) -> dict:
    """Keyed by the full path, so a changed `$PASSUNTIL_DATA` is never served stale data."""
    hint = "; delete the folder and run `passuntil fetch-data` again"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read BIG-bench file {path} ({err}){hint}") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if (not isinstance(examples, list) or not examples
            or not all(isinstance(e, dict) and isinstance(e.get("input"), str)
                       and ("target" in e or isinstance(e.get("target_scores"), dict)) for e in examples)):
        raise UserError(f"{path} is not a BIG-bench task file (needs a non-empty 'examples' list, "
                        f"each with 'input' and 'target' or 'target_scores'){hint}")
    return data


# ---- scoring as BIG-bench does it ------------------------------------------------------------

def postprocess(text: str, stop_string: str | None, output_regex: str | None) -> str:
    """BIG-bench's output post-processing: cut after the stop string, then take the regex match."""
    if stop_string:
        index = text.find(stop_string)
        if index > 0:
            text = text[: index + len(stop_string)]
    if output_regex:
        text = next(iter(re.findall(output_regex, text)), "")
    return text


@dataclass(frozen=True)
class BigBenchExact:
    """BIG-bench's `exact_str_match` on the post-processed output (the task's stop and regex)."""

    stop_string: str | None = None
    output_regex: str | None = None

    @property
    def spec(self) -> str:
        return "bigbench_exact_str_match"

    def __call__(self, instance: Instance, text: str) -> bool:
        return postprocess(text, self.stop_string, self.output_regex) in instance.references


# ---- test sets -----------------------------------------------------------------------------

def is_common_word(title: str, zipf_min: float = 3.5) -> bool:
    """A one-word title that is a common English word (wordfreq's Zipf frequency >= zipf_min)."""
    from wordfreq import zipf_frequency

    return title.isalpha() and zipf_frequency(title, "en") >= zipf_min


_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]


def copyable_date(question: str, answer: str) -> bool:
    """The answer's date is written in the question already (so copying answers it)."""
    try:
        d = dt.datetime.strptime(answer, "%m/%d/%Y").date()
    except ValueError:
        return answer in question
    month = _MONTHS[d.month - 1]
    spelled = [answer, f"{month} {d.day}, {d.year}", f"{month[:3]} {d.day}, {d.year}",
               f"{month} {d.day}th, {d.year}", f"{d.month}/{d.day}/{d.year}", d.isoformat()]
    return any(s in question for s in spelled)


def _target(example: dict) -> str:
    if "target" in example:
        t = example["target"]
        return t[0] if isinstance(t, list) else t
    scores = example["target_scores"]
    return max(scores, key=scores.get)


def _choices(example: dict) -> list[str]:
    return list(example.get("target_scores", {}))


EMOJI_SHOTS = {  # the four designated few-shot items, with the project's chain-of-thought
    "the lion king": "A lion and a crown: a lion who is king. The film about a lion cub who "
                     "becomes king is The Lion King.",
    "finding nemo": "A girl and several fish, one of them a clownfish. A film about searching for "
                    "a lost little clownfish is Finding Nemo.",
    "harry potter": "A boy with glasses and a lightning bolt, the scar on his forehead. That is "
                    "the young wizard Harry Potter.",
    "toy story": "A boy, a teddy bear, a cowboy and an astronaut: toys that come alive, Woody and "
                 "Buzz Lightyear. That is Toy Story.",
}


def _qa(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


def emoji_movie(cot: bool = False, n: int = 41) -> Task:
    examples = load_task_json("emoji_movie")["examples"]
    shots = [e for t in EMOJI_SHOTS for e in examples if e["target"] == t]
    pool = [e for e in examples if e["target"] not in EMOJI_SHOTS and not is_common_word(e["target"])]
    chosen = random.Random(SEED).sample(pool, n)
    if cot:
        context = "\n\n".join(_qa(e["input"], f"{EMOJI_SHOTS[e['target']]} So the answer is "
                                  f"{e['target']}.") for e in shots)
    else:
        context = "\n\n".join(_qa(e["input"], e["target"]) for e in shots)
    inst = tuple(Instance(f"{i:02d}", f"{context}\n\nQ: {e['input']}\nA:", (e["target"],),
                          {"choices": _choices(e)}) for i, e in enumerate(chosen))
    name = "bigbench/emoji_movie" + ("_cot" if cot else "")
    return Task(name, inst, Contains(), stop=("\n\nQ:", "\nQ:"), max_new_tokens=96 if cot else 24, answer_prefix=" ",
                source=f"bigbench=={VERSION} emoji_movie/task.json",
                description="4-shot" + (" chain-of-thought" if cot else "") +
                            ", common-word titles removed; extract string match")


def date_understanding(n: int = 47) -> Task:
    examples = load_task_json("date_understanding")["examples"]
    keep = [e for e in examples if not copyable_date(e["input"], _target(e))]
    rng = random.Random(SEED)
    chosen = rng.sample(keep, n)
    rest = [e for e in examples if e not in chosen]
    inst = []
    for i, e in enumerate(chosen):
        shots = random.Random(f"{SEED}:{i}").sample(rest, 4)
        context = "\n\n".join(_qa(s["input"], _target(s)) for s in shots)
        inst.append(Instance(f"{i:02d}", f"{context}\n\nQ: {e['input']}\nA:", (_target(e),),
                             {"choices": _choices(e)}))
    return Task("bigbench/date_understanding", tuple(inst), Contains(), stop=("\n",), answer_prefix=" ",
                max_new_tokens=16, source=f"bigbench=={VERSION} date_understanding/task.json",
                description="4-shot, copyable items removed; extract string match")


def _json_task(task_dir: str, name: str, shots: int, n: int = N_PER_SUBTASK) -> Task:
    """A generative BIG-bench JSON task with its own prefixes, separator, stop and regex."""
    data = load_task_json(task_dir)
    examples = data["examples"]
    in_prefix = data.get("example_input_prefix", "\nQ: ")
    out_prefix = data.get("example_output_prefix", "\nA: ")
    sep = data.get("few_shot_example_separator", "\n")
    stop, regex = data.get("stop_string"), data.get("output_regex")
    if stop is None and regex is None:
        regex = r"[^\.\?\!\;\n]+"
    rng = random.Random(f"{SEED}:{name}")
    order = rng.sample(range(len(examples)), n)
    chosen = set(order)
    inst = []
    for i, idx in enumerate(order):
        e = examples[idx]
        context = []
        while len(context) < shots:
            j = rng.randrange(len(examples))
            if j not in chosen and j not in context:
                context.append(j)
        parts = [in_prefix + examples[j]["input"] + out_prefix + _target(examples[j])
                 for j in context]
        prompt = sep.join([*parts, in_prefix + e["input"] + out_prefix])
        refs = e["target"] if isinstance(e["target"], list) else [e["target"]]
        inst.append(Instance(f"{i:02d}", prompt, tuple(refs)))
    return Task(name, tuple(inst), BigBenchExact(stop, regex), stop=(stop or sep,), max_new_tokens=24,
                source=f"bigbench=={VERSION} {task_dir}/task.json",
                description=f"{shots}-shot; BIG-bench exact_str_match")


def bigbench_task_names() -> list[str]:
    return ["bigbench/emoji_movie", "bigbench/emoji_movie_cot", "bigbench/date_understanding",
            *(f"bigbench/uicl/{s}" for s in UICL),
            *(f"bigbench/modified_arithmetic/{s}" for s in MODIFIED_ARITHMETIC)]


def make_bigbench(name: str) -> Task:
    """The named BIG-bench task; a data cache whose files lack what the task needs is one error."""
    try:
        return _make_bigbench(name)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        if isinstance(err, KeyError) and err.args == (name,):
            raise
        raise UserError(f"the BIG-bench data in {cache_dir()} does not hold what {name} needs "
                        f"({type(err).__name__}: {err}); delete the folder and run "
                        "`passuntil fetch-data` again") from None


def _make_bigbench(name: str) -> Task:
    if name == "bigbench/emoji_movie":
        return emoji_movie()
    if name == "bigbench/emoji_movie_cot":
        return emoji_movie(cot=True)
    if name == "bigbench/date_understanding":
        return date_understanding()
    sub = name.rsplit("/", 1)[-1]
    if name.startswith("bigbench/uicl/") and sub in UICL:
        return _json_task(f"unnatural_in_context_learning/{sub}", name, shots=4)
    if name.startswith("bigbench/modified_arithmetic/") and sub in MODIFIED_ARITHMETIC:
        # These inputs already hold their in-context examples.
        return _json_task(f"modified_arithmetic/{sub}", name, shots=0)
    raise KeyError(name)
