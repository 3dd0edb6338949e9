"""One contract for every sampler backend, and the OpenAI-compatible client against a real
server this project did not write (`transformers serve`, started and stopped by the test)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from passuntil.backends.base import SamplingParams
from passuntil.backends.openai_compat import OpenAICompatSampler
from passuntil.engine import EngineConfig, run_passuntil
from passuntil.series import load_series, open_sampler
from passuntil.tasks import get_task

TINY4 = Path(load_series("tiny").select(["tiny-4"])[0].path)


def check_contract(sampler, *, reproducible: bool = True, task_name: str = "arith"):
    """What the engine relies on: n completions per prompt, stop sequences cut, per-sample
    reproducibility, and a PassUntil run that ends."""
    task = get_task(task_name)
    task = task.subset([x.id for x in task.instances[:2]])
    prompts = [task.prompt(x) for x in task.instances]
    params = [SamplingParams(n=3, temperature=1.0, max_tokens=6, stop=("\n",), seed=5)] * 2
    outs = sampler.generate(prompts, params)
    assert [len(o) for o in outs] == [3, 3]
    assert all("\n" not in c.text and len(c.text) <= 6 * 4 for o in outs for c in o)
    if reproducible:
        again = sampler.generate(prompts, params)
        assert [[c.text for c in o] for o in outs] == [[c.text for c in o] for o in again]
    results = run_passuntil(sampler, [task], EngineConfig(k_target=1, max_samples=6, batch_size=6),
                            model="m")
    assert all(r.stopped in ("k_passes", "budget") and 1 <= r.samples <= 6 for r in results)


def test_simulated_backend_meets_the_contract():
    spec = load_series("sim").select(["0.5B"])[0]
    check_contract(open_sampler(spec, [get_task("sim-scaling")]), task_name="sim-scaling")


def test_builtin_torch_backend_meets_the_contract():
    check_contract(open_sampler(load_series("tiny").select(["tiny-4"])[0], []))


def test_transformers_backend_meets_the_contract_and_scores_like_ours():
    from passuntil.backends.hf import TransformersSampler
    from passuntil.backends.torch_backend import TorchSampler

    hf = TransformersSampler(str(TINY4), name="tiny-4")
    check_contract(hf)
    ours = TorchSampler.from_folder(str(TINY4), name="tiny-4")
    a = hf.score(["47+85="], ["132"])[0].token_logprobs
    b = ours.score(["47+85="], ["132"])[0].token_logprobs
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4


@pytest.mark.gpu
def test_vllm_backend_meets_the_contract():
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from passuntil.backends.vllm_backend import VLLMSampler

    check_contract(VLLMSampler(str(TINY4), name="tiny-4"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server():
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("transformers CLI not installed")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        pytest.skip("transformers serve needs fastapi and uvicorn (the dev extra installs them)")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(port), str(TINY4)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # bounded; a loaded CI machine starts it slowly
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("transformers serve exited at start")
                if time.monotonic() > deadline:
                    pytest.fail("transformers serve did not come up in 180 s")
                time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_client_against_a_real_server(transformers_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    sampler = OpenAICompatSampler(transformers_server, str(TINY4), concurrency=1)
    # The server seeds torch globally per request: reproducible when requests do not overlap.
    check_contract(sampler)
    # It samples only through `generation_config` (temperature alone is greedy) and ignores n.
    assert sampler.generation_config is True
    assert len(sampler.warnings) == 1 and "ignores n" in sampler.warnings[0]


def test_transformers_serve_samples_the_models_distribution(transformers_server):
    """The first digit of 40 samples at temperature 1 against the model's own probability of it
    (0.424, from the built-in sampler): greedy decoding (the old behaviour) gives 40 of 40."""
    from scipy.stats import binomtest

    from passuntil.backends.torch_backend import TorchSampler

    task = get_task("arith")
    prompt = task.prompt(task.instances[0])
    p_one = TorchSampler.from_folder(str(TINY4), name="tiny-4").score([prompt], ["1"])[0].logprob
    sampler = OpenAICompatSampler(transformers_server, str(TINY4), concurrency=1)
    out = sampler.generate([prompt], [SamplingParams(n=40, temperature=1.0, max_tokens=1, seed=3)])
    firsts = [c.text[:1] for c in out[0]]
    ones = firsts.count("1")
    assert math.exp(p_one) == pytest.approx(0.424, abs=0.01)
    assert binomtest(ones, 40, math.exp(p_one)).pvalue > 1e-4, (ones, firsts)
    assert len(set(firsts)) >= 4


def test_transformers_serve_temperature_alone_is_caught_and_recorded(transformers_server, capsys):
    """With plain OpenAI fields only, this server decodes greedily: the probe says so, once."""
    sampler = OpenAICompatSampler(transformers_server, str(TINY4), server="openai", concurrency=1)
    params = [SamplingParams(n=4, temperature=1.0, max_tokens=4, stop=("\n",), seed=1)]
    texts = [c.text for o in sampler.generate(["47+85="] * 2, params * 2) for c in o]
    assert len(set(texts)) == 1 and sampler.generation_config is False
    assert any("ignores temperature" in w for w in sampler.warnings)
    assert capsys.readouterr().err.count("ignores temperature") == 1


def test_transformers_serve_cannot_score_so_scoring_is_unavailable(transformers_server):
    from passuntil.backends.base import ScoringUnavailable

    sampler = OpenAICompatSampler(transformers_server, str(TINY4), backoff_s=0.01)
    with pytest.raises(ScoringUnavailable, match="HTTP 500"):
        sampler.score(["47+85="], ["132"])


def test_openai_client_errors_are_one_line():
    from passuntil.errors import UserError

    sampler = OpenAICompatSampler(f"http://127.0.0.1:{_free_port()}/v1", "m", retries=1,
                                  backoff_s=0.01)
    with pytest.raises(UserError, match="cannot reach"):
        sampler.generate(["x"], [SamplingParams(n=1, max_tokens=2)])


class _FlakyServer:
    """A minimal stand-in server for client-side properties only (retries, concurrency, the key):
    503 for the first two requests, then one completion per request; records what it saw."""

    def __init__(self):
        import http.server
        import threading

        self.requests, self.auth, self.active, self.max_active = 0, set(), 0, 0
        lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    outer.requests += 1
                    outer.auth.add(self.headers.get("Authorization"))
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                    fail = outer.requests <= 2
                time.sleep(0.02)
                with lock:
                    outer.active -= 1
                if fail:
                    self.send_response(503)
                    self.end_headers()
                    return
                import json

                req = json.loads(body)
                reply = {"choices": [{"index": 0, "text": "42\nmore", "finish_reason": "length",
                                      "logprobs": {"token_logprobs": [-0.5, -0.25]}}]}
                assert req["n"] >= 1
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_openai_client_retries_limits_concurrency_and_keeps_the_key_secret(tmp_path, monkeypatch):
    server = _FlakyServer()
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    sampler = OpenAICompatSampler(server.url, "m", api_key_env="MY_KEY", concurrency=2,
                                  backoff_s=0.01, logprobs=True, check_sampling=False)
    outs = sampler.generate(["a", "b", "c", "d"], [SamplingParams(n=3, stop=("\n",), seed=1)] * 4)
    assert [[c.text for c in o] for o in outs] == [["42"] * 3] * 4  # server ignores n: re-asked
    assert outs[0][0].finish_reason == "stop" and outs[0][0].cumulative_logprob == -0.75
    assert server.requests == 2 + 12 and server.max_active <= 2
    assert server.auth == {"Bearer sk-secret-123"}
    # the key never reaches the run store
    from passuntil.series import ModelSpec
    from passuntil.store import Store

    store = Store(tmp_path / "s.sqlite")
    spec = ModelSpec("served", 1e6, backend="openai", path=server.url,
                     options={"model": "m", "api_key_env": "MY_KEY", "backoff_s": 0.01})
    store.create_run("r", {"models": [spec.to_dict()]}, [spec.to_dict()])
    store.close()
    assert b"sk-secret" not in (tmp_path / "s.sqlite").read_bytes()
    server.httpd.shutdown()
