"""One contract for every sampler backend, and the OpenAI-compatible client against a real
server this project did not write (`transformers serve`, started and stopped by the test)."""

from __future__ import annotations

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


def check_contract(sampler, *, reproducible: bool = True):
    """What the engine relies on: n completions per prompt, stop sequences cut, per-sample
    reproducibility, and a PassUntil run that ends."""
    task = get_task("arith").subset(["00", "01"])
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
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("transformers serve exited at start")
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not come up in 60 s")
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_client_against_a_real_server(transformers_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    sampler = OpenAICompatSampler(transformers_server, str(TINY4), concurrency=2)
    # This server ignores `n` and seeds are per process, so reproducibility is not asserted.
    check_contract(sampler, reproducible=False)


def test_openai_client_errors_are_one_line():
    from passuntil.errors import UserError

    sampler = OpenAICompatSampler(f"http://127.0.0.1:{_free_port()}/v1", "m", retries=1,
                                  backoff_s=0.01)
    with pytest.raises(UserError, match="cannot reach"):
        sampler.generate(["x"], [SamplingParams(n=1, max_tokens=2)])
