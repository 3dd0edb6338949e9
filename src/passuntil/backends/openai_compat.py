"""A client for any OpenAI-compatible completions server (vLLM, llama.cpp, `transformers serve`).

POST {base_url}/completions with prompt, n, temperature, top_p, max_tokens, stop and seed.
Servers differ: some ignore `n` (then the client asks again for the rest), some return the stop
sequence in the text (the client cuts at the first stop sequence itself). Retries with
exponential back-off on connection errors, 429 and 5xx; at most `concurrency` requests at once.
The API key is read from the environment variable named by `api_key_env` at request time and
never stored; every error line is passed through `redact` first. A `user:pass@` in the URL is
sent as Basic authorization (when no key is set) and kept out of `base_url`. Reproducibility: each request
carries a seed derived from the sample index, so results repeat as far as the server honours
seeds.

Sampling is checked, not assumed (`sanity.py`): before the first request at temperature > 0 a
probe of a few short samples at a huge temperature tells whether the server honours temperature
and seed; every prompt's samples are checked against the server's log-probs when it returns
them; a dropped `n` or `logprobs` is noticed. Each problem is recorded once in
`sampler.warnings` and printed once to stderr.

`transformers serve` (5.x) samples only when the model's generation config says `do_sample`;
its `temperature` alone changes nothing, so every sample is the greedy text. With
`server = "transformers"`, or when `server = "auto"` and the probe finds temperature ignored,
requests carry a `generation_config` (a field of that server) with `do_sample`, temperature,
top_p and top_k (0 = off; that server's default is 50), and the probe is repeated to confirm.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from passuntil.backends import sanity
from passuntil.backends.base import (
    Completion,
    SamplingParams,
    ScoringUnavailable,
    TokenScores,
    truncate_at_stop,
)
from passuntil.backends.redact import redact
from passuntil.errors import UserError
from passuntil.seeding import derive_seed

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
SERVERS = ("auto", "openai", "transformers")
# statuses with which a server says it cannot do echo + logprobs (500: `transformers serve`)
NO_SCORING_STATUS = {400, 404, 405, 422, 500, 501}


class ServerError(UserError):
    """An HTTP error status from the server (one redacted line)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class OpenAICompatSampler:
    """Sampler protocol over HTTP; `model` is the server's model name.

    `server`: "auto" (detect a server that needs `generation_config` to sample), "openai" (plain
    OpenAI fields only) or "transformers" (always send `generation_config`). `check_sampling`:
    run the temperature/seed probe (a few requests of `PROBE_TOKENS` tokens, once)."""

    def __init__(self, base_url: str, model: str, *, name: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, retries: int = 5,
                 timeout_s: float = 120.0, backoff_s: float = 0.5, logprobs: bool = False,
                 server: str = "auto", check_sampling: bool = True):
        if server not in SERVERS:
            raise UserError(f"openai backend: server must be one of {', '.join(SERVERS)}, "
                            f"not {server!r}")
        self.base_url, self._basic_auth = _split_userinfo(base_url.rstrip("/"))
        self.model = model
        self.name = name or model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.logprobs = logprobs  # ask for token log-probs (-> Completion.cumulative_logprob)
        self.server = server
        self.check_sampling = check_sampling
        self.warnings: list[str] = []  # each sampling problem found, once (the run stores them)
        self.generation_config = server == "transformers"  # send `generation_config` to sample
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._probed = False

    # ---- transport ----

    def _redact(self, text: str) -> str:
        return redact(text, secrets=[os.environ.get(self.api_key_env)])

    def _post(self, path: str, body: dict, *, retries: int | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self._basic_auth:
            headers["Authorization"] = f"Basic {self._basic_auth}"
        data = json.dumps(body).encode()
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise UserError(self._redact(f"{self.base_url}{path}: the server answered "
                                                 f"with no JSON: {raw[:200]!r}")) from None
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS or attempt == retries:
                    detail = " ".join(err.read()[:300].decode(errors="replace").split())
                    raise ServerError(self._redact(f"{self.base_url}{path}: HTTP {err.code}: "
                                                   f"{detail}"), err.code) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == retries:
                    raise UserError(self._redact(f"cannot reach {self.base_url}: {err}")) from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _warn(self, kind: str, message: str | None) -> None:
        """Record a sampling problem once per kind and print it once to stderr."""
        if message is None:
            return
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
            self.warnings.append(message)
        print(f"warning: model {self.name}: {message}", file=sys.stderr, flush=True)

    # ---- sampling ----

    def _body(self, prompt: str, sp: SamplingParams, n: int, seed: int) -> dict:
        body = {"model": self.model, "prompt": prompt, "n": n, "temperature": sp.temperature,
                "top_p": sp.top_p, "max_tokens": sp.max_tokens, "seed": seed % (2**31)}
        if sp.stop:
            body["stop"] = list(sp.stop)[:4]  # the OpenAI API accepts at most four
        if self.logprobs:
            body["logprobs"] = 1
        if self.generation_config and sp.temperature > 0:
            body["generation_config"] = json.dumps(
                {"do_sample": True, "temperature": sp.temperature, "top_p": sp.top_p,
                 "top_k": sp.top_k})
        elif sp.top_k:
            body["top_k"] = sp.top_k  # vLLM's extension; a server without it refuses, not ignores
        return body

    def _one_prompt(self, prompt: str, sp: SamplingParams) -> list[Completion]:
        texts: list[tuple[str, str, float | None]] = []
        while len(texts) < sp.n:  # each pass adds >= 1 sample: at most n requests
            want = sp.n - len(texts)
            seed = derive_seed(sp.seed or 0, "openai", sp.first_sample + len(texts))
            choices = self._post("/completions", self._body(prompt, sp, want, seed)).get("choices")
            if not choices or not isinstance(choices, list):
                raise UserError(self._redact(f"{self.base_url}: the server returned no choices"))
            self._warn("n", sanity.dropped_n_warning(want, len(choices)))
            for c in sorted(choices, key=lambda c: c.get("index", 0))[:want]:
                text, stopped = truncate_at_stop(c.get("text", ""), sp.stop)
                reason = "stop" if stopped or c.get("finish_reason") == "stop" else "length"
                lp = _text_logprob(c.get("logprobs"), text, stopped)
                if self.logprobs and lp is None:
                    self._warn("logprobs", "the server ignores logprobs: none came back, so "
                                           "identical samples cannot be checked against them")
                texts.append((text, reason, lp))
        if sp.temperature > 0:
            self._warn("identical", sanity.identical_samples_warning(
                [t for t, _, _ in texts], [lp for _, _, lp in texts]))
        return [Completion(j, t, finish_reason=r, cumulative_logprob=lp)
                for j, (t, r, lp) in enumerate(texts)]

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]
                 ) -> list[list[Completion]]:
        hot = [p for p, sp in zip(prompts, params) if sp.temperature > 0]
        if hot and self.check_sampling and not self._probed:
            with self._lock:
                probe = not self._probed
                self._probed = True
            if probe:
                self._probe(hot[0])
        with ThreadPoolExecutor(max(1, self.concurrency)) as ex:
            return list(ex.map(self._one_prompt, prompts, params))

    def _probe_texts(self, prompt: str, seeds: Sequence[int]) -> list[str] | None:
        """One short sample per seed at the probe temperature; None if the server refuses it."""
        sp = SamplingParams(temperature=sanity.PROBE_TEMPERATURE, max_tokens=sanity.PROBE_TOKENS)
        out = []
        for seed in seeds:
            body = self._body(prompt, sp, 1, seed)
            body.pop("logprobs", None)
            try:
                r = self._post("/completions", body, retries=min(self.retries, 1))
            except ServerError as err:
                if 400 <= err.status < 500 and err.status not in (401, 403):
                    return None  # e.g. a temperature cap: the probe cannot tell
                raise
            out.append(((r.get("choices") or [{}])[0]).get("text", ""))
        return out

    def _probe(self, prompt: str) -> None:
        """Does the server honour temperature and seed? Switch to `generation_config` if needed."""
        seeds = list(range(1, sanity.PROBE_SAMPLES + 1))
        texts = self._probe_texts(prompt, seeds)
        if texts is None:
            return
        ignored = sanity.temperature_probe_warning(texts)
        if ignored and self.server == "auto":
            self.generation_config = True
            texts = self._probe_texts(prompt, seeds)
            if texts is not None and sanity.temperature_probe_warning(texts) is None:
                print(f"note: model {self.name}: the server samples only when asked through "
                      "`generation_config` (as `transformers serve` does); passuntil sends it",
                      file=sys.stderr, flush=True)
                ignored = None
            else:
                self.generation_config = False
        if ignored or texts is None:
            self._warn("temperature", ignored)
            return
        again = self._probe_texts(prompt, seeds[:1])
        if again is not None:
            self._warn("seed", sanity.seed_probe_warning(texts[0], again[0]))

    # ---- scoring ----

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        """Log-probs of each continuation via `echo` + `logprobs` (servers that support them);
        `ScoringUnavailable` when the server cannot (the run goes on without reference scores)."""
        out = []
        for prompt, cont in zip(prompts, continuations):
            try:
                r = self._post("/completions", {"model": self.model, "prompt": prompt + cont,
                                                "max_tokens": 0, "echo": True, "logprobs": 0},
                               retries=min(self.retries, 1))
            except ServerError as err:
                if err.status not in NO_SCORING_STATUS:
                    raise
                raise ScoringUnavailable(
                    f"model {self.name}: the server cannot score continuations (echo + logprobs "
                    f"with max_tokens 0 gave HTTP {err.status}); reference scores need a server "
                    "that returns prompt log-probs, e.g. vLLM") from None
            lp = ((r.get("choices") or [{}])[0].get("logprobs") or {})
            offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
            if not offsets or not values:
                raise ScoringUnavailable(
                    f"model {self.name}: the server returns no prompt log-probs (echo + "
                    "logprobs); reference scores need a server that does, e.g. vLLM")
            out.append(TokenScores(tuple(v for o, v in zip(offsets, values)
                                         if o >= len(prompt) and v is not None)))
        return out


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """(the URL without `user:pass@`, those credentials for a Basic Authorization header)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)),
            base64.b64encode(creds.encode()).decode())


def _text_logprob(logprobs: dict | None, text: str, stopped: bool) -> float | None:
    """Summed log-prob of the tokens that make up `text` (the choice cut at a stop sequence)."""
    values = (logprobs or {}).get("token_logprobs")
    if not values:
        return None
    tokens = logprobs.get("tokens")
    if stopped and tokens and len(tokens) == len(values):
        kept, length = [], 0
        for tok, v in zip(tokens, values):
            if length >= len(text):
                break
            kept.append(v)
            length += len(tok)
        values = kept
    return float(sum(v for v in values if v is not None))
