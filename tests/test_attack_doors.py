"""Attacks on two user doors, `eval --exact` on served models and `eval --design forecast`:
inputs that used to give a silent wrong number or a traceback, each now right or one line.

The exact-mode attacks reuse the toy model, fake server and fake `vllm` module of
`tests/test_exact_backends.py` (probabilities computed by hand there)."""

from __future__ import annotations

import math
import sys

import pytest

from passuntil.store import Store
from tests.conftest import run_cli
from tests.test_exact_backends import (
    STEPS,
    TASK,
    exact_column,
    fake_vllm,
    files,
    invoke,
    toy_server,
)
from tests.test_openai_backend import FakeServer

# the toy task with the stop "1": a sample is cut at the first "1", so a reference that holds a
# "1" ("12", "21", "1") can never be a sample's whole text
STOP_ONE = TASK.replace('stop: ["\\n"]', 'stop: ["1"]')
# "2" ends by the end-of-text token or the stop "1" (the token "12" after it, cut to "2", is
# another spelling the bound leaves out)
STOP_ONE_B = STEPS[0]["2"] * (STEPS[1]["<|endoftext|>"] + STEPS[1]["1"])


def _exact_with_stop_one(tmp_path, backend: str, url: str = ""):
    assert STOP_ONE != TASK
    db = tmp_path / "s.sqlite"
    task, series = files(tmp_path, url, backend=backend)
    task.write_text(STOP_ONE)
    r = invoke("eval", "--exact", "--task", task, "--series", series, "--store", db)
    assert r.exit_code == 0, r.output
    return exact_column(db, tmp_path)


def test_served_exact_gives_zero_to_a_reference_that_holds_a_stop_sequence(tmp_path):
    """Sampling cuts "12" at the stop "1", so P(a sample is "12") = 0; it used to be stored as
    P("12") x P(end) = 0.05 (and instance c, "21" or "1", as 0.088): an upper bound where the
    docs promise a lower one. PassUntil on the same server never passes a or c."""
    with FakeServer(toy_server()) as server:
        df = _exact_with_stop_one(tmp_path, "openai", server.url)
        r = invoke("eval", "--task", tmp_path / "toy.yaml", "--series", tmp_path / "served.toml", "--k", "1",
                   "--max-samples", "300", "--store", tmp_path / "p.sqlite")
        assert r.exit_code == 0, r.output
    assert df.loc["a", "exact_p"] == 0 and df.loc["c", "exact_p"] == 0
    assert df.loc["b", "exact_p"] == pytest.approx(STOP_ONE_B, abs=1e-12)
    sampled = exact_column(tmp_path / "p.sqlite", tmp_path)
    assert sampled.loc["a", "passes"] == 0 and sampled.loc["c", "passes"] == 0
    assert sampled.loc["a", "samples"] == 300 and sampled.loc["b", "passes"] == 1


def test_vllm_exact_gives_zero_to_a_reference_that_holds_a_stop_sequence(tmp_path, monkeypatch):
    """The same on the vLLM backend (it used to store 0.05 for "12" under the stop "1")."""
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    df = _exact_with_stop_one(tmp_path, "vllm")
    assert df.loc["a", "exact_p"] == 0 and df.loc["c", "exact_p"] == 0
    assert df.loc["b", "exact_p"] == pytest.approx(STOP_ONE_B, abs=1e-12)


def test_a_stop_that_another_stop_could_cut_earlier_is_not_counted(monkeypatch):
    """Reference "2" with stops "\\n" and "2\\n": a sample "2\\n" is "" where the stop found first
    is the earliest one (the fake server, `truncate_at_stop`), "2" where a server checks "\\n" first,
    so that ending is left out (a lower bound either way); it used to be counted."""
    from passuntil.backends.base import SamplingParams
    from passuntil.backends.vllm_backend import VLLMSampler

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    sampler = VLLMSampler("toy")
    p = sampler.exact_pass_probability("y=", ["2"], SamplingParams(max_tokens=8, stop=("\n", "2\n")))
    assert p == pytest.approx(STEPS[0]["2"] * STEPS[1]["<|endoftext|>"], abs=1e-12)


def _mutated(change):
    """The toy server with each echo record passed through `change(logprobs record)`."""
    base = toy_server()

    def respond(body, headers):
        status, reply = base(body, headers)
        if body.get("echo") and len(reply["choices"][0]["logprobs"]["tokens"]) > 3:
            change(reply["choices"][0]["logprobs"])
        return status, reply
    return respond


def _set_last_echoed(value):
    def change(lp):
        lp["token_logprobs"][-2] = value
    return change


def _drop_last_value(lp):
    lp["token_logprobs"].pop()


def _nan_top(lp):
    lp["top_logprobs"][-1] = {k: math.nan for k in lp["top_logprobs"][-1] or {"x": 0}}


@pytest.mark.parametrize("change, shows", [(_set_last_echoed(math.nan), "nan"), (_set_last_echoed(3.0), "3.0"),
                                           (_drop_last_value, "log-probs for"), (_nan_top, "nan")],
                         ids=["nan", "positive", "fewer-values-than-tokens", "nan-top-logprob"])
def test_a_server_with_impossible_logprobs_fails_exact_with_one_line(capsys, tmp_path, change, shows):
    """Log-probs that are not log-probabilities used to be stored silently: NaN crashed the store
    (IntegrityError traceback), +3.0 gave exact_p = 6.0, one value missing gave 1.1, a NaN
    end-of-text log-prob dropped every row while the run said "3 exact pass probabilities". Now
    one `error:` line (exit 2) naming the model, and no exact number stored."""
    db = tmp_path / "s.sqlite"
    with FakeServer(_mutated(change)) as server:
        task, series = files(tmp_path, server.url)
        code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                               "--store", str(db))
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "model m" in lines[0] and shows in lines[0]
    if db.exists() and "main" in Store(db, create=False).runs():
        assert Store(db, create=False).db.execute("SELECT COUNT(*) FROM reference_scores").fetchone()[0] == 0


def test_impossible_logprobs_without_exact_leave_a_note_not_a_traceback(capsys, tmp_path):
    """Beside sampling, reference scores from a server that returns NaN log-probs are not stored
    (they crashed the run with an IntegrityError after all the sampling); the run ends, noted."""
    db = tmp_path / "s.sqlite"
    with FakeServer(_mutated(_set_last_echoed(math.nan))) as server:
        task, series = files(tmp_path, server.url)
        code, out, err = run_cli(capsys, "eval", "--task", str(task), "--series", str(series), "--k", "1",
                                 "--max-samples", "16", "--store", str(db))
    assert code == 0, err
    assert "no reference scores" in out and "nan" in out
    df = exact_column(db, tmp_path)
    assert (df["samples"] > 0).all() and df["ref_logprob"].isna().all()


def test_a_temperature_a_hair_off_one_is_refused_with_its_own_value(capsys, tmp_path):
    """--temperature 1.0000001 is not 1, so --exact refuses; the line used to say "(this run:
    temperature 1)", a refusal that named the very setting it asks for."""
    with FakeServer(toy_server()) as server:
        task, series = files(tmp_path, server.url)
        code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                               "--temperature", "1.0000001", "--store", str(tmp_path / "s.sqlite"))
        assert not server.bodies
    assert code == 2 and "(this run: temperature 1.0000001)" in err


# ---- eval --design forecast ----------------------------------------------------------------------

def test_the_designs_interval_is_the_one_forecast_reports_when_some_models_were_never_sampled(capsys, tmp_path):
    """Two instances, rounds from 4 samples: the pilot and the cold start leave some sizes
    unsampled. The design used to fit them as sizes without data, which moved its interval
    (±0.165 where `forecast` on the same run says ±0.24): the width stop fired on an interval
    the user is never shown. Now the recorded interval is `forecast`'s, digit for digit."""
    import re

    db = tmp_path / "d.sqlite"
    code, out, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--design", "forecast", "--target-model",
                             "2.4B", "--total-budget", "200", "--round-size", "4", "--limit", "2",
                             "--store", str(db), "--run", "d")
    assert code == 0, err
    sampled = Store(db, create=False).results("d").query("samples > 0")["model"].nunique()
    assert 2 <= sampled < 6  # some of the six sizes were never sampled
    design = re.search(r"2\.4B\): (\S+) \[(\S+), (\S+)\]", out).groups()
    code, out, err = run_cli(capsys, "forecast", str(db), "--run", "d", "--task", "sim-scaling",
                             "--target-n", "2.45e9", "--out", str(tmp_path / "f.json"))
    assert code == 0, err
    shown = re.search(r"mean PU (\S+); these instances \[(\S+), (\S+)\]", out).groups()
    assert design == shown


def test_vllm_nan_logprobs_fail_exact_with_one_line(capsys, tmp_path, monkeypatch):
    """A NaN prompt log-prob from vLLM (e.g. an fp16 overflow) used to crash the store with an
    IntegrityError; now one `error:` line naming the model, nothing stored."""
    import tests.test_exact_backends as toy

    real = toy.logprob
    monkeypatch.setattr(toy, "logprob", lambda context, token: math.nan if token == "2" else real(context, token))
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    task, series = files(tmp_path, "", backend="vllm")
    code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                           "--store", str(tmp_path / "s.sqlite"))
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "model m" in lines[0] and "nan" in lines[0]


@pytest.mark.parametrize("reply", [[], {"choices": [None]}, {"choices": "x"},
                                   {"choices": [{"logprobs": {"tokens": "ab", "token_logprobs": "cd",
                                                              "text_offset": "ef"}}]}],
                         ids=["list", "null-choice", "choices-text", "fields-text"])
def test_a_malformed_echo_reply_fails_exact_with_one_line(capsys, tmp_path, reply):
    """A proxy or a half-compatible server answering echo with JSON of another shape (a list
    used to raise AttributeError with a traceback): one line, the server lacks echo log-probs."""
    base = toy_server()

    def respond(body, headers):
        return (200, reply) if body.get("echo") else base(body, headers)

    with FakeServer(respond) as server:
        task, series = files(tmp_path, server.url)
        code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                               "--store", str(tmp_path / "s.sqlite"))
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "model m: the server returns no prompt log-probs" in lines[0]


@pytest.mark.parametrize("option", ["--total-budget", "--round-size", "--width-stop-after"])
def test_a_design_budget_past_the_stores_integers_is_refused_naming_the_option(capsys, tmp_path, option):
    """--total-budget 1e19 used to be refused as "k-target must be below 2**62", an option the
    user never gave (the per-cell cap defaults to the budget), and --round-size 1e19 was taken."""
    extra = {"--total-budget": (), "--round-size": ("--total-budget", "100"),
             "--width-stop-after": ("--total-budget", "100", "--target-width", "0.1")}[option]
    code, out, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--design", "forecast", "--target-model",
                             "2.4B", *extra, option, "1e19", "--store", str(tmp_path / "s.sqlite"))
    assert code == 2 and not out
    assert err.strip() == f"error: {option} must be below 2**62 samples (got 1e+19)"


def _sampled_text(stream: str, stops: list[str]) -> str | None:
    """What the torch and transformers samplers make of a stream of characters: the row ends the
    moment its text holds a stop, and the text is cut at the earliest stop (None: no stop)."""
    from passuntil.backends.base import truncate_at_stop

    for end in range(1, len(stream) + 1):
        if any(s in stream[:end] for s in stops):
            return truncate_at_stop(stream[:end], stops)[0] if end == len(stream) else None
    return None


@pytest.mark.parametrize("stops", [["1"], ["\n"], ["\n", "2\n"], ["2\n", "\n"], ["12", "x"], ["1", "12"],
                                   ["21", "1"], ["a", "aa", "ba"]])
def test_exact_stop_endings_are_the_streams_that_sample_to_the_reference(stops):
    """Brute force over every stream of up to 5 characters from {1, 2, a, b, x, \\n}: the streams
    ended by a stop whose sample is exactly the reference are the reference followed by
    `exact_stop_endings` (none where the reference holds a stop), each once."""
    import itertools

    from passuntil.backends.base import exact_stop_endings

    alphabet = "12abx\n"
    streams = ["".join(c) for n in range(1, 6) for c in itertools.product(alphabet, repeat=n)]
    for ref in ["", "1", "2", "12", "22", "a", "ab", "2b"]:
        ending = exact_stop_endings(ref, stops)
        wanted = sorted(ref + s for s in (ending or []))
        found = sorted(t for t in streams if t.startswith(ref) and len(t) > len(ref)
                       and _sampled_text(t, stops) == ref and any(t == ref + s for s in stops))
        assert wanted == found, (ref, stops)
        assert ending is None or all(len(ref + s) <= 5 for s in ending)


def test_the_bundled_sampler_gives_zero_to_a_reference_that_holds_a_stop(tmp_path, capsys):
    """The built-in sampler claims exact numbers: a reference with the stop "6" inside is never
    a sample's whole text (sampling cuts it at the "6"), so its exact probability is 0, while
    the same instance without that stop has a positive one."""
    import json

    rows = []
    for stop in ("6", "\\n"):
        task = tmp_path / f"stop{len(stop)}.yaml"
        task.write_text(f'name: stop{len(stop)}\ntemplate: "{{q}}="\ncheck: exact\nstop: ["{stop}"]\n'
                        'max_new_tokens: 8\ninstances:\n  - {id: a, q: "12+34", references: ["46"]}\n')
        db = tmp_path / f"s{len(stop)}.sqlite"
        code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", "tiny",
                               "--model", "tiny-6", "--store", str(db))
        assert code == 0, err
        assert run_cli(capsys, "export", str(db), "--out", str(tmp_path / f"s{len(stop)}.json"))[0] == 0
        rows.append(json.loads((tmp_path / f"s{len(stop)}.json").read_text())[0]["exact_p"])
    assert rows[0] == 0 and rows[1] > 0
