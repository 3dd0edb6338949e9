"""Every `passuntil ...` command the docs show runs (issue 15, "Docs are tested").

The commands are extracted from every fenced bash block of README.md and docs/tutorial.md (lines
that start with `passuntil `, backslash continuations joined, comments dropped) and run in the
order the docs give them, in one temporary folder, so later commands read the stores earlier
ones made. Only budgets are rewritten (`REWRITES`, below, says which and why); commands CI
cannot run are listed in `NOT_RUN` with the reason. A doc command that stops working fails here.

Each command runs through `passuntil.cli.main` (the console script's entry point) in-process:
the same door as the installed script without a fresh interpreter per command.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "docs" / "tutorial.md")

# What is rewritten, how, and why (the only changes made to a documented command).
REWRITES = [
    ("eval: --max-samples N (or none)", "--max-samples 32", "the docs' 10,000 per instance takes "
     "minutes to hours on 2 CPU cores"),
    ("eval: all instances", "--limit 6", "a pilot of each task's first instances (same reason)"),
    ("humaneval (every command)", "the task `code`",
     "HumanEval is 164 problems x 512 tokens; the bundled small HumanEval (`code`) is what the "
     "bundled models can pass, so the forecast that follows has data"),
    ("train-series configs/tiny.toml", "a copy with indices = [2], steps = 3, tokens_per_param = 1, "
     "out = a temp folder",
     "the full series trains for 44 min, and must not overwrite the bundled checkpoints"),
    ("demo [--quick] [--series sim]", "demo --quick --series sim --out <temp folder>", "seconds "
     "instead of 4-5 min (tests/test_demo.py runs the tiny demo)"),
    ("[--flag] (optional flags)", "the command without and with them", "both documented forms run"),
    ("my-series.toml (tutorial)", "examples/my-series.toml", "the tutorial's series file is the "
     "repo's example"),
]
BUDGET = {"--max-samples": "32", "--limit": "6"}
SUBSTITUTE = {"humaneval": "code", "my-series.toml": str(REPO / "examples" / "my-series.toml")}

# Documented commands CI cannot run, with the reason.
NOT_RUN = {
    "eval ... --ray": "`...` stands for any eval and ADDRESS for a Ray cluster; the local form is "
                      "tested in tests/test_distributed.py",
}


def doc_commands() -> list[tuple[str, str]]:
    """(id, command line) for every `passuntil` line of every fenced bash block, in doc order."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if line.startswith("passuntil "):
                    out.append((f"{doc.stem}-{len(out) + 1:02d}", line))
    return out


def _not_run(line: str) -> str | None:
    body = line[len("passuntil "):]
    if body.startswith("fetch-data"):  # a no-op where the data is already fetched
        from passuntil.tasks.bigbench import available

        return None if available() else "the BIG-bench data is not fetched here (358 MB from PyPI)"
    return next((why for prefix, why in NOT_RUN.items() if body.startswith(prefix)), None)


def variants(line: str, tmp: Path) -> list[list[str]]:
    """The argument lists to run for one documented line (see REWRITES)."""
    line = line.split(" #", 1)[0] if not line.startswith("#") else ""
    optional = re.findall(r"\[([^\]]+)\]", line)
    bare = re.sub(r"\s*\[[^\]]+\]", "", line)
    full = re.sub(r"\[([^\]]+)\]", r"\1", line)
    forms = [bare, full] if optional else [bare]
    runs = []
    for form in forms:
        args = [SUBSTITUTE.get(a, a) for a in shlex.split(form)[1:]]
        if args[0] == "demo":
            if form is bare and optional:
                continue  # the full demo: tests/test_demo.py
            args = [*args, "--out", str(tmp / "demo-out")]
        elif args[0] == "train-series":
            args = ["train-series", str(_small_training_config(REPO / args[1], tmp))]
        elif args[0] == "eval":
            args = _eval_budget(args)
        runs.append(args)
    return runs


def _eval_budget(args: list[str]) -> list[str]:
    if "--resume" in args:
        return args
    for flag, value in BUDGET.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def _small_training_config(config: Path, tmp: Path) -> Path:
    text = config.read_text()
    for key, value in (("indices", "[2]"), ("steps", "3"), ("tokens_per_param", "1.0"),
                       ("out", f'"{tmp / "series"}"')):
        text = re.sub(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
    small = tmp / "tiny-small.toml"
    small.write_text(text)
    return small


def run_main(args: list[str]) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `passuntil ARGS` in-process."""
    from passuntil.cli import main

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    return code, buf.getvalue()


COMMANDS = doc_commands()
OWNED_FAILURES: dict[str, str] = {}  # command prefix -> "owner: ..." while another engineer fixes it


def _param(case_id: str, line: str):
    why = _not_run(line)
    marks = [pytest.mark.skip(reason=f"not run in CI: {why}")] if why else []
    owner = next((o for prefix, o in OWNED_FAILURES.items() if line.startswith(prefix)), None)
    if owner:
        marks.append(pytest.mark.xfail(strict=True, reason=owner))
    return pytest.param(line, id=case_id, marks=marks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for the whole chain; `done` remembers which documented lines have run."""
    tmp = tmp_path_factory.mktemp("docs-commands")
    for folder in ("examples", "configs"):  # the repo's example files, at the paths the docs use
        shutil.copytree(REPO / folder, tmp / folder)
    return {"dir": tmp, "done": set()}


def _run_line(line: str, workdir) -> list[tuple[list[str], int, str]]:
    tmp = workdir["dir"]
    results = []
    for args in variants(line, tmp):
        results.append((args, *run_main(args)))
    workdir["done"].add(line)
    return results


def test_the_docs_show_commands(tmp_path):
    ids = [line.split()[1] for _, line in COMMANDS]
    assert {"eval", "show", "forecast", "score-forecast", "report", "train-series"} <= set(ids), ids
    assert all(_not_run(line) or variants(line, tmp_path) for _, line in COMMANDS)
    for key in (*BUDGET, *SUBSTITUTE):  # the table above names every rewrite the code makes
        assert any(key in what or key in how for what, how, _ in REWRITES), key


@pytest.mark.slow
@pytest.mark.parametrize("line", [_param(i, line) for i, line in COMMANDS])
def test_documented_command_runs(line, workdir, monkeypatch):
    monkeypatch.chdir(workdir["dir"])
    for _, earlier in COMMANDS:  # a command selected alone still finds what the docs made before it
        if earlier == line:
            break
        if earlier not in workdir["done"] and not _not_run(earlier):
            _run_line(earlier, workdir)
    for args, code, output in _run_line(line, workdir):
        assert "Traceback" not in output, output[-3000:]
        assert code == 0, f"passuntil {shlex.join(args)} exited {code}:\n{output[-2000:]}"
