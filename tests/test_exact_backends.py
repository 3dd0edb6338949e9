"""`passuntil eval --exact` on served models: an OpenAI-compatible server (a fake one on
127.0.0.1) and vLLM's offline engine (a fake `vllm` module), both over the same toy language
model whose pass probabilities are computed here by hand. Exact where the API reproduces the
sampling distribution (temperature 1, top-p 1, no top-k), refused with one line elsewhere, a
lower bound with a BPE-like tokenizer (recorded with the run)."""

from __future__ import annotations

import math
import random
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from passuntil.cli import cli
from passuntil.runspec import run_notes
from passuntil.store import Store
from tests.conftest import run_cli
from tests.test_openai_backend import FakeServer

# ---- the toy model ------------------------------------------------------------------------------
# Tokens: single characters, one merge "12" (so "12" has two token sequences, as with BPE) and
# an end-of-text token. After the prompt's "=", the next token's distribution depends only on how
# many tokens came since the "=" (STEPS[0], STEPS[1], then STEPS[2]).

EOS = "<|endoftext|>"
BOS = "<s>"
STEPS = ({"1": .4, "2": .2, "12": .25, "\n": .05, EOS: .1},
         {"1": .1, "2": .5, "12": .1, "\n": .2, EOS: .1},
         {"1": .1, "2": .1, "12": .1, "\n": .4, EOS: .3})
ANSWERS = tuple(STEPS[0])
END = {s: d["\n"] + d[EOS] for s, d in enumerate(STEPS)}  # P(the sample ends) at each step

# the truth, by hand: P(the server's own token sequence of the reference) x P(end right after);
# "12" is the token "12" (the merge), and its other spelling "1" "2" is what the bound leaves out
TRUTH = {"a": STEPS[0]["12"] * END[1],                                    # "12": 0.075
         "b": STEPS[0]["2"] * END[1],                                     # "2": 0.06
         "c": STEPS[0]["2"] * STEPS[1]["1"] * END[2] + STEPS[0]["1"] * END[1]}  # "21" or "1": 0.134
FULL_A = TRUTH["a"] + STEPS[0]["1"] * STEPS[1]["2"] * END[2]  # every spelling of "12": 0.215

TASK = """name: toy
template: "{q}="
check: exact
stop: ["\\n"]
max_new_tokens: 8
instances:
  - {id: a, q: x, references: ["12"]}
  - {id: b, q: y, references: ["2"]}
  - {id: c, q: z, references: ["21", "1"]}
"""


def tokenize(text: str, merges: tuple[str, ...] = ("12",)) -> list[str]:
    """Greedy longest match: a two-character merge ("12"), else one character."""
    out, i = [], 0
    while i < len(text):
        step = 2 if any(text.startswith(m, i) for m in merges) else 1
        out.append(text[i:i + step])
        i += step
    return out


def next_dist(context: list[str]) -> dict[str, float] | None:
    """The next token's distribution after `context` (None before any "=": not modelled)."""
    if "=" not in context:
        return None
    since = len(context) - 1 - max(i for i, t in enumerate(context) if t == "=")
    return STEPS[min(since, 2)]


def logprob(context: list[str], token: str) -> float:
    d = next_dist(context)
    if d is None:
        return math.log(1 / 128)
    return math.log(d[token]) if token in d else -60.0


def top(context: list[str], n: int) -> dict[str, float]:
    d = next_dist(context) or {}
    return {t: math.log(p) for t, p in sorted(d.items(), key=lambda kv: -kv[1])[:n]}


def draw(context: list[str], rng: random.Random, temperature: float) -> str:
    d = next_dist(context) or {t: 1.0 for t in ANSWERS}
    w = [p ** (1 / temperature) for p in d.values()]
    return rng.choices(list(d), weights=w)[0]


# ---- a fake OpenAI-compatible server over the toy model -----------------------------------------

def toy_server(*, echo=True, top_cap=20, merges=("12",)):
    """Samples from the toy model (honouring n, seed, temperature, stop, max_tokens) and echoes
    log-probs as vLLM's server does (`top_cap`: the most top log-probs it returns; `merges`: the
    tokenizer's two-character tokens)."""
    def respond(body, headers):
        text, rng = body["prompt"], random.Random(body.get("seed", 0))
        if body.get("echo"):
            if not echo:
                return 400, {"error": {"message": "echo is not supported"}}
            n_top = min(body.get("logprobs") or 0, top_cap)
            return 200, {"choices": [_echo_choice(text, body, rng, n_top, merges)]}
        return 200, {"choices": [_sample(text, body, rng) | {"index": i} for i in range(body.get("n", 1))]}
    return respond


def _echo_choice(text: str, body: dict, rng: random.Random, n_top: int, merges: tuple[str, ...]) -> dict:
    toks = tokenize(text, merges)
    offsets = list(np.cumsum([0] + [len(t) for t in toks[:-1]]).tolist())
    lp = {"tokens": list(toks), "text_offset": offsets,
          "token_logprobs": [None] + [logprob(toks[:i], toks[i]) for i in range(1, len(toks))],
          "top_logprobs": [None] + [top(toks[:i], n_top) for i in range(1, len(toks))]}
    out = ""
    if body.get("max_tokens"):
        tok = draw(toks, rng, 1.0)
        lp["tokens"].append(tok)
        lp["text_offset"].append(len(text))
        lp["token_logprobs"].append(logprob(toks, tok))
        lp["top_logprobs"].append(top(toks, n_top))
        out = "" if tok == EOS else tok
    return {"index": 0, "text": text + out, "logprobs": lp, "finish_reason": "length"}


def _sample(prompt: str, body: dict, rng: random.Random) -> dict:
    context, text = tokenize(prompt), ""
    for _ in range(body["max_tokens"]):
        tok = draw(context, rng, max(body.get("temperature", 1.0), 1e-3))
        if tok == EOS:
            return {"text": text, "finish_reason": "stop"}
        context.append(tok)
        text += tok
        cut = min((text.find(s) for s in body.get("stop", []) if s in text), default=-1)
        if cut >= 0:
            return {"text": text[:cut], "finish_reason": "stop"}
    return {"text": text, "finish_reason": "length"}


# ---- helpers --------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def files(tmp_path: Path, url: str, backend: str = "openai") -> tuple[Path, Path]:
    task = tmp_path / "toy.yaml"
    task.write_text(TASK)
    series = tmp_path / "served.toml"
    where = f'path = "{url}"\noptions = {{ model = "toy" }}\n' if backend == "openai" else 'path = "toy"\n'
    series.write_text(f'name = "served"\n[[models]]\nname = "m"\nn_params = 1e6\nbackend = "{backend}"\n{where}')
    return task, series


def exact_column(db: Path, tmp_path: Path, run: str = "main") -> pd.DataFrame:
    out = tmp_path / f"{run}.csv"
    assert invoke("export", db, "--run", run, "--out", out).exit_code == 0
    return pd.read_csv(out, dtype={"instance_id": str}).set_index("instance_id")


# ---- the OpenAI-compatible backend ----------------------------------------------------------------

def test_served_exact_probability_is_the_toy_models_by_hand(tmp_path):
    """(a) + (f): the stored numbers are the hand-computed probabilities of the server's own token
    sequences (to 1e-9), no sample is drawn, and the run says they are lower bounds with BPE."""
    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server()) as server:
        task, series = files(tmp_path, server.url)
        r = invoke("eval", "--exact", "--task", task, "--series", series, "--store", db)
        assert r.exit_code == 0, r.output
        sampled = [b for b in server.bodies if not b.get("echo")]
    assert "0 samples drawn" in r.output and "3 exact pass probabilities" in r.output
    assert not sampled  # only echo requests: nothing sampled
    df = exact_column(db, tmp_path)
    assert (df["stopped"] == "exact").all() and (df["samples"] == 0).all()
    for inst, p in TRUTH.items():
        assert df.loc[inst, "exact_p"] == pytest.approx(p, abs=1e-9, rel=0)
    assert TRUTH["a"] < FULL_A  # "12" is a lower bound: its spelling "1" "2" is not summed
    notes = [n["note"] for n in run_notes(Store(db, create=False), "main") if n["stage"] == "exact"]
    assert any("lower bound with BPE" in n and "temperature 1" in n for n in notes)


@pytest.mark.parametrize("flag", [("--temperature", "0.7"), ("--top-p", "0.9"), ("--top-k", "5")])
def test_served_exact_refuses_a_setting_raw_logprobs_cannot_reproduce(capsys, tmp_path, flag):
    """(b) one `error:` line, exit 2, before anything is recorded (the server is never asked)."""
    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server()) as server:
        task, series = files(tmp_path, server.url)
        code, out, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                                 *flag, "--store", str(db))
        assert not server.bodies
    lines = err.strip().splitlines()
    assert code == 2 and not out and len(lines) == 1
    assert lines[0].startswith("error: --exact: the openai backend returns the model's raw log-probs")
    assert f"this run: {flag[0][2:]} " in lines[0] and "--exact=auto" in lines[0]
    assert not db.exists() or "main" not in Store(db, create=False).runs()


def test_a_server_without_echo_logprobs_fails_exact_with_one_line(capsys, tmp_path):
    """(c) the exact data cannot be computed: one line, exit 2, not a run that silently holds nothing
    (the empty run record does not block a rerun under the same name)."""
    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server(echo=False)) as server:
        task, series = files(tmp_path, server.url)
        code, out, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                                 "--store", str(db))
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "--exact: model m: the server cannot score continuations" in lines[0] and "HTTP 400" in lines[0]
    with FakeServer(toy_server()) as server:  # the same command on a server that can: runs
        task, series = files(tmp_path, server.url)
        assert invoke("eval", "--exact", "--task", task, "--series", series, "--store", db).exit_code == 0


def test_exact_auto_at_another_temperature_samples_with_a_note(tmp_path):
    """(d) --exact=auto at temperature 0.7: PassUntil samples the task, and the run says why."""
    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server()) as server:
        task, series = files(tmp_path, server.url)
        r = invoke("eval", "--exact=auto", "--temperature", "0.7", "--task", task, "--series", series,
                   "--k", "1", "--max-samples", "64", "--store", db)
        assert r.exit_code == 0, r.output
        assert {b.get("temperature") for b in server.bodies if not b.get("echo")} >= {0.7}
    df = exact_column(db, tmp_path)
    assert (df["samples"] > 0).all() and df["exact_p"].isna().all()
    shown = invoke("show", db)
    assert "--exact=auto sampled with PassUntil instead: toy (the openai backend returns the model's raw " \
           "log-probs" in " ".join(shown.output.split())


def test_an_end_of_text_token_the_server_does_not_show_makes_a_noted_lower_bound(tmp_path):
    """(f) a server that returns only the top 2 log-probs: where the end-of-text token is not
    among them it counts as 0 (the stop alone ends the sample) and the run records the bound."""
    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server(top_cap=2)) as server:
        task, series = files(tmp_path, server.url)
        assert invoke("eval", "--exact", "--task", task, "--series", series, "--store", db).exit_code == 0
    df = exact_column(db, tmp_path)
    # top 2 after one token: "2" (.5) and "\n" (.2); after two: "\n" (.4) and EOS (.3)
    assert df.loc["b", "exact_p"] == pytest.approx(STEPS[0]["2"] * STEPS[1]["\n"], abs=1e-12)
    assert df.loc["c", "exact_p"] == pytest.approx(STEPS[0]["2"] * STEPS[1]["1"] * END[2]
                                                   + STEPS[0]["1"] * STEPS[1]["\n"], abs=1e-12)
    notes = [n["note"] for n in run_notes(Store(db, create=False), "main") if n["stage"] == "exact"]
    assert any("no end-of-text token" in n and "lower bounds" in n for n in notes)


def test_a_token_across_the_prompts_end_fails_exact_with_one_line(capsys, tmp_path):
    """A server whose tokenizer merges "=2": the prompt "y=" alone ends in "=", but before the
    reference "2" the "=" belongs to the token "=2", so no echo is P(reference | the prompt's own
    tokens): one line naming the reference, exit 2, no number stored."""
    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server(merges=("12", "=2"))) as server:
        task, series = files(tmp_path, server.url)
        code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                               "--store", str(db))
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "a token spans their boundary" in lines[0] and "reference '2'" in lines[0]
    assert not Store(db, create=False).has_reference_scores("main", "m")


def test_served_exact_agrees_with_passuntil_on_the_same_server(tmp_path):
    """PassUntil sampling the same fake server (K = 30, seeded): the exact number lies in the 99.9%
    interval where the reference has one token sequence, and below it for "12", whose second
    spelling the bound leaves out (the full truth, 0.215, lies inside)."""
    from passuntil import stats

    db = tmp_path / "s.sqlite"
    with FakeServer(toy_server()) as server:
        task, series = files(tmp_path, server.url)
        common = ("--task", task, "--series", series, "--store", db)
        assert invoke("eval", "--exact", *common).exit_code == 0
        r = invoke("eval", "--run", "pu", "--k", "30", "--max-samples", "4000", "--seed", "3", *common)
        assert r.exit_code == 0, r.output
    exact = exact_column(db, tmp_path)["exact_p"]
    pu = exact_column(db, tmp_path, "pu")
    low, high = stats.interval(pu["passes"].to_numpy(), pu["samples"].to_numpy(), k_target=30, confidence=0.999)
    bounds = dict(zip(pu.index, zip(low, high)))
    assert (pu["passes"] == 30).all()
    for inst in ("b", "c"):
        assert bounds[inst][0] <= exact[inst] <= bounds[inst][1], (inst, exact[inst], bounds[inst])
    assert exact["a"] < bounds["a"][0] and bounds["a"][0] <= FULL_A <= bounds["a"][1]


# ---- the vLLM backend, with a fake `vllm` module over the same toy model ------------------------

VOCAB = [BOS, EOS, "12", *(chr(c) for c in range(32, 127)), "\n"]
ID = {t: i for i, t in enumerate(VOCAB)}


class ToyTokenizer:
    eos_token_id = ID[EOS]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([ID[BOS]] if add_special_tokens else []) + [ID[t] for t in tokenize(text)]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and VOCAB[i] in (BOS, EOS)))


def fake_vllm() -> types.ModuleType:
    """The shapes passuntil uses: `LLM(model=...)`, `get_tokenizer()`, `generate(prompts, sp)`
    with text or `{"prompt_token_ids": ...}` prompts, outputs with `prompt`, `prompt_token_ids`,
    `prompt_logprobs` ([None, {id: Logprob}, ...]) and `outputs`; `SamplingParams`."""
    mod = types.ModuleType("vllm")
    tok = ToyTokenizer()

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        calls: list = []

        def __init__(self, model: str, **kw):
            self.llm_engine = types.SimpleNamespace(generation_config_fields={})

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, sp, use_tqdm=False):
            LLM.calls.append((prompts, sp))
            assert sp.max_tokens == 1 and sp.prompt_logprobs == 0
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"] if isinstance(p, dict) else tok(p)["input_ids"]
                names = [VOCAB[i] for i in ids]
                lps = [None] + [{ids[i]: types.SimpleNamespace(logprob=logprob(names[:i], names[i]))}
                                for i in range(1, len(ids))]
                outs.append(types.SimpleNamespace(prompt=None if isinstance(p, dict) else p, prompt_token_ids=ids,
                                                  prompt_logprobs=lps, outputs=[]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_exact_probability_is_the_toy_models_by_hand(capsys, tmp_path, monkeypatch):
    """(e) `eval --exact` on a vLLM model: prompt log-probs of prompt + reference + each ending
    (the EOS token, the stop's tokens) give the same hand-computed numbers, to 1e-9."""
    vllm = fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    db = tmp_path / "s.sqlite"
    task, series = files(tmp_path, "", backend="vllm")
    r = invoke("eval", "--exact", "--task", task, "--series", series, "--store", db)
    assert r.exit_code == 0, r.output
    df = exact_column(db, tmp_path)
    for inst, p in TRUTH.items():
        assert df.loc[inst, "exact_p"] == pytest.approx(p, abs=1e-9, rel=0)
    scored = [p for prompts, _ in vllm.LLM.calls for p in prompts if isinstance(p, dict)]
    assert [ID[EOS]] == scored[0]["prompt_token_ids"][-1:]  # an ending scored as a prompt token
    code, _, err = run_cli(capsys, "eval", "--exact", "--task", str(task), "--series", str(series),
                           "--top-p", "0.5", "--store", str(tmp_path / "t.sqlite"))
    assert code == 2 and "error: --exact: the vllm backend returns the model's raw log-probs" in err


def test_vllm_sampler_refuses_settings_it_cannot_reproduce(monkeypatch):
    """The sampler itself refuses a tempered distribution (a caller past the run's check)."""
    from passuntil.backends.base import SamplingParams
    from passuntil.backends.vllm_backend import VLLMSampler
    from passuntil.errors import UserError

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    sampler = VLLMSampler("toy")
    assert sampler.exact_pass_probability("y=", ["2"], SamplingParams(max_tokens=8, stop=("\n",))) \
        == pytest.approx(TRUTH["b"], abs=1e-12)
    with pytest.raises(UserError, match="temperature 1"):
        sampler.exact_pass_probability("y=", ["2"], SamplingParams(temperature=0.5, stop=("\n",)))
