"""A client for any OpenAI-compatible completions server (vLLM, llama.cpp, `transformers serve`).

POST {base_url}/completions with prompt, n, temperature, top_p, max_tokens, stop and seed.
Servers differ: some ignore `n` (then the client asks again for the rest), some return the stop
sequence in the text (the client cuts at the first stop sequence itself). Retries with
exponential back-off on connection errors, 429 and 5xx; at most `concurrency` requests at once.
The API key is read from the environment variable named by `api_key_env` at request time and
never stored or logged. Reproducibility: each request carries a seed derived from the sample
index, so results repeat as far as the server honours seeds.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from passuntil.backends.base import Completion, SamplingParams, TokenScores, truncate_at_stop
from passuntil.errors import UserError
from passuntil.seeding import derive_seed

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAICompatSampler:
    """Sampler protocol over HTTP; `model` is the server's model name."""

    def __init__(self, base_url: str, model: str, *, name: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, retries: int = 5,
                 timeout_s: float = 120.0, backoff_s: float = 0.5, logprobs: bool = False):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.logprobs = logprobs  # ask for token log-probs (-> Completion.cumulative_logprob)

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS or attempt == self.retries:
                    detail = err.read()[:200].decode(errors="replace")
                    raise UserError(f"{self.base_url}{path}: HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.retries:
                    raise UserError(f"cannot reach {self.base_url}: {err}") from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _one_prompt(self, prompt: str, sp: SamplingParams) -> list[Completion]:
        texts: list[tuple[str, str, float | None]] = []
        while len(texts) < sp.n:
            index = sp.first_sample + len(texts)
            body = {"model": self.model, "prompt": prompt, "n": sp.n - len(texts),
                    "temperature": sp.temperature, "top_p": sp.top_p, "max_tokens": sp.max_tokens,
                    "seed": derive_seed(sp.seed or 0, "openai", index) % (2**31)}
            if sp.stop:
                body["stop"] = list(sp.stop)[:4]  # the OpenAI API accepts at most four
            if self.logprobs:
                body["logprobs"] = 1
            choices = self._post("/completions", body).get("choices") or []
            if not choices:
                raise UserError(f"{self.base_url}: the server returned no choices")
            for c in sorted(choices, key=lambda c: c.get("index", 0))[: sp.n - len(texts)]:
                text, stopped = truncate_at_stop(c.get("text", ""), sp.stop)
                reason = "stop" if stopped or c.get("finish_reason") == "stop" else "length"
                lps = (c.get("logprobs") or {}).get("token_logprobs")
                texts.append((text, reason, float(sum(v for v in lps if v is not None))
                              if lps else None))
        return [Completion(j, t, finish_reason=r, cumulative_logprob=lp)
                for j, (t, r, lp) in enumerate(texts)]

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]
                 ) -> list[list[Completion]]:
        with ThreadPoolExecutor(max(1, self.concurrency)) as ex:
            return list(ex.map(self._one_prompt, prompts, params))

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        """Log-probs of each continuation via `echo` + `logprobs` (servers that support them)."""
        out = []
        for prompt, cont in zip(prompts, continuations):
            r = self._post("/completions", {"model": self.model, "prompt": prompt + cont,
                                            "max_tokens": 0, "echo": True, "logprobs": 0})
            lp = ((r.get("choices") or [{}])[0].get("logprobs") or {})
            offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
            if not offsets or not values:
                raise UserError(f"{self.base_url} does not return prompt log-probs (echo + "
                                "logprobs); reference scores need a server that does, e.g. vLLM")
            out.append(TokenScores(tuple(v for o, v in zip(offsets, values)
                                         if o >= len(prompt) and v is not None)))
        return out
