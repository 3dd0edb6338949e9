"""The openai backend against fake servers on 127.0.0.1: credentials never printed, a server that
does not sample as asked (temperature, seed, n, logprobs ignored) is noticed and recorded, a
server that cannot score raises `ScoringUnavailable`; and the pure checks behind it."""

from __future__ import annotations

import http.server
import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from passuntil.backends.base import SamplingParams, ScoringUnavailable
from passuntil.backends.openai_compat import OpenAICompatSampler
from passuntil.backends.redact import redact
from passuntil.backends.sanity import (
    chance_all_identical,
    identical_samples_warning,
    seed_probe_warning,
    temperature_probe_warning,
)
from passuntil.errors import UserError

KEY = "sk-proj-THISisAsecret0123456789"
PASSUNTIL = Path(sys.executable).parent / "passuntil"


class FakeServer:
    """A threaded HTTP server on 127.0.0.1; `respond(body, headers) -> (status, dict)`."""

    def __init__(self, respond):
        lock = threading.Lock()
        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.bodies.append(body)
                status, reply = respond(body, self.headers)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def choice(text, i=0, logprobs=None):
    c = {"index": i, "text": text, "finish_reason": "stop"}
    if logprobs is not None:
        c["logprobs"] = {"token_logprobs": logprobs}
    return c


def greedy_server(*, logprobs=None, honour_n=True):
    """Ignores temperature and seed: always the same text (what `transformers serve` did)."""
    def respond(body, headers):
        n = body.get("n", 1) if honour_n else 1
        return 200, {"choices": [choice("133\n", i, logprobs) for i in range(n)]}
    return respond


def sampling_server(*, honour_seed=True, honour_n=True):
    """Samples: each choice is a random 3-digit text drawn from the request's seed (or not)."""
    fresh = random.Random(12345)

    def respond(body, headers):
        rng = random.Random(body["seed"]) if honour_seed else fresh
        n = body.get("n", 1) if honour_n else 1
        return 200, {"choices": [choice(f"{rng.randrange(1000)}\n", i, [-3.0, -3.0])
                                 for i in range(n)]}
    return respond


def sample(sampler, n=8, prompts=("47+85=",)):
    params = [SamplingParams(n=n, temperature=1.0, max_tokens=6, stop=("\n",), seed=7)]
    return sampler.generate(list(prompts), params * len(prompts))


# ---- credentials ----

def test_redact_masks_every_credential_form_and_keeps_ordinary_text(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "plainvalue-no-prefix-42")
    cases = {
        "HTTP 401: {'authorization': 'Bearer abc.DEF-123'}": "abc.DEF-123",
        f"invalid key {KEY} given": KEY[8:],
        "http://alice:pa55word@127.0.0.1:8000/v1": "pa55word",
        "http://127.0.0.1/v1?api_key=QQQ123&x=1": "QQQ123",
        '{"x-api-key": "zz9988zz"}': "zz9988zz",
        "Basic YWxpY2U6cGE1NQ==": "YWxpY2U6cGE1NQ",
        "echo: plainvalue-no-prefix-42": "plainvalue-no-prefix-42",  # the env var's value
        "mine: my-own-token-value": "my-own-token-value",  # a secret the caller names
    }
    for text, secret in cases.items():
        out = redact(text, secrets=["my-own-token-value"])
        assert secret not in out and "***" in out, (text, out)
    for plain in ("max_tokens=5; the prompt has 3000 tokens", "http://127.0.0.1:8000/v1/completions",
                  "token id 5 is out of range"):
        assert redact(plain) == plain


def _echo_401(body, headers):
    """A server that repeats the request's credentials in its error body."""
    auth = headers.get("Authorization", "")
    return 401, {"error": {"message": f"bad key; you sent Authorization: {auth} (key {auth[7:]})"}}


def test_a_401_that_echoes_the_authorization_header_gives_a_line_without_the_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", "nonstandard-secret-777")
    with FakeServer(_echo_401) as server:
        sampler = OpenAICompatSampler(server.url, "m", api_key_env="MY_KEY", retries=0)
        with pytest.raises(UserError) as err:
            sample(sampler)
    line = str(err.value)
    assert "HTTP 401" in line and "nonstandard-secret-777" not in line and "\n" not in line
    assert "***" in line


def _series_file(tmp_path: Path, url: str, *, api_key_env: str) -> Path:
    path = tmp_path / "served.toml"
    path.write_text(f'name = "s"\n[[models]]\nname = "served"\nn_params = 1011472\n'
                    f'backend = "openai"\npath = "{url}"\n'
                    f'options = {{ model = "tiny-7", api_key_env = "{api_key_env}" }}\n')
    return path


def _eval(tmp_path: Path, series: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": KEY, "HOME": str(tmp_path)}
    return subprocess.run([str(PASSUNTIL), *args, "--series", str(series), "--task", "arith",
                           "--limit", "3", "--k", "1", "--max-samples", "8", "--store",
                           str(tmp_path / "s.sqlite")], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def eval_against_echo_401(tmp_path_factory) -> tuple[str, Path]:
    """`passuntil eval` on a served model (key in OPENAI_API_KEY) whose server answers 401
    echoing the credentials it received: (output, store)."""
    tmp_path = tmp_path_factory.mktemp("echo401")
    with FakeServer(_echo_401) as server:
        series = _series_file(tmp_path, server.url, api_key_env="OPENAI_API_KEY")
        proc = _eval(tmp_path, series, "eval")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    return out, tmp_path / "s.sqlite"


def test_cli_error_line_has_no_key_when_the_server_echoes_it(eval_against_echo_401):
    out, _ = eval_against_echo_401
    errors = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "HTTP 401" in errors[0] and "***" in errors[0]
    assert KEY not in out and KEY[3:12] not in out


def test_the_store_keeps_no_key(eval_against_echo_401):
    _, store = eval_against_echo_401
    assert not store.exists() or KEY.encode() not in store.read_bytes()


def test_a_series_url_with_credentials_is_refused_without_echoing_them(tmp_path):
    """A series URL is stored with the run and shown in reports, so `user:pass@` is refused
    before anything is recorded, and the line names neither."""
    series = _series_file(tmp_path, "http://alice:pa55word@127.0.0.1:9/v1", api_key_env="OPENAI_API_KEY")
    proc = _eval(tmp_path, series, "eval")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    errors = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "carries credentials" in errors[0] and "api_key_env" in errors[0]
    assert "pa55word" not in out and "alice" not in out
    assert not (tmp_path / "s.sqlite").exists() or b"pa55word" not in (tmp_path / "s.sqlite").read_bytes()


def test_a_server_that_ignores_temperature_is_recorded_with_the_run(tmp_path):
    """What the sampler notices about a server is stored with the run and shown by `show`."""
    with FakeServer(greedy_server()) as server:
        series = tmp_path / "greedy.toml"
        series.write_text(f'name = "s"\n[[models]]\nname = "served"\nn_params = 1011472\n'
                          f'backend = "openai"\npath = "{server.url}"\n'
                          f'options = {{ model = "m", server = "openai" }}\n')
        proc = _eval(tmp_path, series, "eval", "--no-reference-scores")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = subprocess.run([str(PASSUNTIL), "show", str(tmp_path / "s.sqlite")],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "served" in text and "temperature" in text.lower() and "ignore" in text.lower(), text


# ---- samplers that do not sample ----

def test_identical_samples_warning_follows_the_models_own_probability():
    texts = ["133"] * 8
    assert chance_all_identical(8, -2.0) == pytest.approx(math.exp(-14.0))
    # 8 equal draws of a text of log-prob -2 (p = 0.135): chance e^-14 = 8e-7 < 1e-6 -> warn
    assert "not independent draws" in identical_samples_warning(texts, [-2.0] * 8)
    assert identical_samples_warning(texts, [-1.9] * 8) is None  # e^-13.3 = 1.7e-6: plausible
    assert identical_samples_warning(texts, [-20.0] * 7 + [-1.0]) is None  # kindest reading
    assert identical_samples_warning(["133"] * 2, [-5.0] * 2) is None  # e^-5: too few samples
    assert identical_samples_warning(["133"] * 3, [-7.0, -7.0, None]) is not None  # e^-14
    assert identical_samples_warning(["133", "134"] * 4, [-9.0] * 8) is None  # not identical
    assert identical_samples_warning(texts, None) is None  # without log-probs: cannot tell
    assert identical_samples_warning(["133"], [-30.0]) is None
    assert temperature_probe_warning(["a", "a", "a"]) is not None
    assert temperature_probe_warning(["a", "b", "a"]) is None
    assert seed_probe_warning("x", "x") is None and seed_probe_warning("x", "y") is not None


def test_a_server_that_ignores_temperature_is_caught_by_its_own_logprobs(capsys):
    with FakeServer(greedy_server(logprobs=[-1.5, -1.0])) as server:
        sampler = OpenAICompatSampler(server.url, "m", check_sampling=False, logprobs=True)
        outs = sample(sampler, n=8, prompts=["a", "b", "c"])
        sample(sampler, n=8)
    assert [c.text for c in outs[0]] == ["133"] * 8
    assert len(sampler.warnings) == 1 and "chance of 8 equal draws: 3e-08" in sampler.warnings[0]
    assert capsys.readouterr().err.count("not independent draws") == 1  # printed once


def test_a_server_that_ignores_temperature_is_caught_by_the_probe_without_logprobs(capsys):
    with FakeServer(greedy_server()) as server:
        sampler = OpenAICompatSampler(server.url, "m", server="openai")
        sample(sampler, n=4)
        sample(sampler, n=4)
        probes = [b for b in server.bodies if b["temperature"] == 1000]
    assert len(probes) == 3 and {b["seed"] for b in probes} == {1, 2, 3}
    assert all(b["max_tokens"] == 4 for b in probes)
    assert all("generation_config" not in b for b in server.bodies)  # server="openai": never
    assert len(sampler.warnings) == 1 and "ignores temperature" in sampler.warnings[0]
    assert capsys.readouterr().err.count("ignores temperature") == 1


def test_an_honest_server_gives_no_warning_and_is_probed_once():
    with FakeServer(sampling_server()) as server:
        sampler = OpenAICompatSampler(server.url, "m", logprobs=True)
        outs = sample(sampler, n=8) + sample(sampler, n=8, prompts=["x", "y"])
        probes = [b for b in server.bodies if b["temperature"] == 1000]
    assert sampler.warnings == [] and sampler.generation_config is False
    assert len(probes) == 4 and [b["seed"] for b in probes] == [1, 2, 3, 1]  # + the seed check
    assert len({c.text for c in outs[0]}) > 1
    assert all(len(o) == 8 and o[0].cumulative_logprob == -6.0 for o in outs)


def test_dropped_seed_n_and_logprobs_are_each_recorded_once():
    with FakeServer(sampling_server(honour_seed=False, honour_n=False)) as server:
        sampler = OpenAICompatSampler(server.url, "m")
        outs = sample(sampler, n=3, prompts=["a", "b"])
        assert [len(o) for o in outs] == [3, 3]  # the client asked again for the missing ones
    assert len(sampler.warnings) == 2
    assert "ignores seed" in sampler.warnings[0] and "ignores n" in sampler.warnings[1]
    with FakeServer(greedy_server(honour_n=True)) as server:
        sampler = OpenAICompatSampler(server.url, "m", check_sampling=False, logprobs=True)
        sample(sampler, n=2)
    assert len(sampler.warnings) == 1 and "ignores logprobs" in sampler.warnings[0]


def test_greedy_only_server_switches_to_generation_config_when_that_makes_it_sample():
    """What `transformers serve` needs: `generation_config` with do_sample, else greedy."""
    def respond(body, headers):
        if "generation_config" in body:
            cfg = json.loads(body["generation_config"])
            assert cfg == {"do_sample": True, "temperature": body["temperature"],
                           "top_p": 1.0, "top_k": 0}
            return sampling_server()(body, headers)
        return greedy_server()(body, headers)

    with FakeServer(respond) as server:
        sampler = OpenAICompatSampler(server.url, "m")
        outs = sample(sampler, n=8)
    assert sampler.generation_config is True and sampler.warnings == []
    assert len({c.text for c in outs[0]}) > 1


def test_a_server_that_cannot_score_raises_scoring_unavailable_with_one_line():
    with FakeServer(lambda body, headers: (500, {"detail": "Internal Server Error"})) as server:
        sampler = OpenAICompatSampler(server.url, "m", backoff_s=0.01)
        with pytest.raises(ScoringUnavailable, match="HTTP 500") as err:
            sampler.score(["47+85="], ["132"])
        assert len(server.bodies) == 2  # one retry, not five
    assert "\n" not in str(err.value)
    no_lp = lambda body, headers: (200, {"choices": [{"text": "47+85=132"}]})  # noqa: E731
    with FakeServer(no_lp) as server, pytest.raises(ScoringUnavailable, match="no prompt log"):
        OpenAICompatSampler(server.url, "m").score(["47+85="], ["132"])
    with FakeServer(_echo_401) as server:  # a wrong key is an error, not a missing feature
        with pytest.raises(UserError, match="HTTP 401") as err:
            OpenAICompatSampler(server.url, "m", retries=0).score(["a"], ["b"])
        assert not isinstance(err.value, ScoringUnavailable)
