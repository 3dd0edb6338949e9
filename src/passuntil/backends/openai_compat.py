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
import math
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
# spellings of end-of-text tokens in `top_logprobs` (GPT-2/Qwen, Llama 2/Mistral, Llama 3, Gemma);
# a series sets its model's own with `options.eos_tokens`
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
TOP_LOGPROBS = 20  # vLLM's default `max_logprobs`
OPENAI_TOP_LOGPROBS = 5  # OpenAI's cap
LOGPROB_SLACK = 1e-4  # a log-prob above 0 by more than rounding is no log-probability


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
                 server: str = "auto", check_sampling: bool = True,
                 eos_tokens: str | Sequence[str] = EOS_TOKENS):
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
        self.eos_tokens = (eos_tokens,) if isinstance(eos_tokens, str) else tuple(eos_tokens)
        self._top = TOP_LOGPROBS
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

    def _echo(self, text: str, top: int = 0) -> dict:
        """The server's `logprobs` record of `text` echoed (max_tokens 0), or, with `top` > 0, of
        `text` and one token generated after it with the `top` most likely tokens at each position;
        `ScoringUnavailable` where the server cannot echo log-probs."""
        body = {"model": self.model, "prompt": text, "max_tokens": 1 if top else 0, "echo": True,
                "logprobs": top}
        if top:
            body.update(temperature=1.0, top_p=1.0, seed=0)
        try:
            r = self._post("/completions", body, retries=min(self.retries, 1))
        except ServerError as err:
            if err.status not in NO_SCORING_STATUS:
                raise
            raise ScoringUnavailable(
                f"model {self.name}: the server cannot score continuations (echo + logprobs "
                f"with max_tokens {body['max_tokens']} gave HTTP {err.status}); reference scores "
                "need a server that returns prompt log-probs, e.g. vLLM") from None
        choices = r.get("choices") if isinstance(r, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(lp, dict) or not all(isinstance(lp.get(k), list) and lp[k]
                                               for k in ("text_offset", "token_logprobs", "tokens")):
            raise ScoringUnavailable(
                f"model {self.name}: the server returns no prompt log-probs (echo + "
                "logprobs); reference scores need a server that does, e.g. vLLM")
        if not len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]):
            raise ScoringUnavailable(
                f"model {self.name}: the server returns {len(lp['token_logprobs'])} log-probs for "
                f"{len(lp['tokens'])} echoed tokens ({len(lp['text_offset'])} offsets); they cannot be matched")
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in lp["text_offset"]):
            raise ScoringUnavailable(f"model {self.name}: the server returns text offsets that are not "
                                     "whole numbers; its echoed tokens cannot be placed")
        tops = [v for d in lp.get("top_logprobs") or () if isinstance(d, dict) for v in d.values()]
        check_logprobs(self.name, [*lp["token_logprobs"], *tops])
        return lp

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        """Log-probs of each continuation via `echo` + `logprobs` (servers that support them);
        `ScoringUnavailable` when the server cannot (the run goes on without reference scores)."""
        out = []
        for prompt, cont in zip(prompts, continuations):
            lp = self._echo(prompt + cont)
            out.append(TokenScores(tuple(v for o, v in zip(lp["text_offset"], lp["token_logprobs"])
                                         if o >= len(prompt) and v is not None)))
        return out

    # ---- exact pass probabilities ----

    exact_is_exact = False  # each reference in the server's own tokenization only (BPE: a lower bound)

    def exact_pass_probability(self, prompt: str, references: Sequence[str], params: SamplingParams) -> float:
        """P(one sample's text is exactly one of `references`), from the server's echo log-probs.

        Only at temperature 1, top-p 1 and no top-k (else `UserError`): the server returns the
        model's raw log-probs (vLLM: `logprobs_mode` "raw_logprobs", its default; at these settings
        its processed log-probs are the same numbers), which are the sampling distribution only
        there. Server behaviours relied on: `echo` with `logprobs` and `max_tokens` 0 returns each
        prompt token's text, offset and log-prob (OpenAI's legacy completions format; vLLM does,
        `transformers serve` and llama.cpp do not: `ScoringUnavailable`); with `max_tokens` 1 the
        last entry is the generated token, whose `top_logprobs` show the next position's most
        likely tokens; the server applies no defaults of its own (penalties, a generation config's
        top-k) to sampling requests.

        Per reference: P(its tokens, as the server tokenizes prompt + reference) × P(ending right
        after: an end-of-text token in `top_logprobs` (spelled as one of `eos_tokens`), each stop
        sequence as the server tokenizes prompt + reference + stop, or max_tokens reached). The
        prompt's tokens must be the same alone and before the reference (`UserError` otherwise: a
        token across their boundary). A lower bound: other token sequences spelling the same text
        are not summed (BPE), nor a stop inside a token that spans the reference's end; an
        end-of-text token outside the top log-probs counts as 0 (noted once in `warnings`). A
        reference that holds a stop sequence has 0 (sampling cuts it there; `stop_endings`).
        Log-probs that are no log-probabilities (NaN, above 0, fewer than the echoed tokens) are
        `ScoringUnavailable` (`_echo`), never a stored number.
        """
        raw_settings_check("openai", self.name, params)
        base = self._echo(prompt)["tokens"]
        total = 0.0
        for ref in dict.fromkeys(references):
            stops = stop_endings(ref, params.stop)
            if stops is None:  # sampling cuts the reference at a stop: never a sample's whole text
                continue
            tokens, values, after = _split_generated(self._echo_top(prompt + ref), prompt + ref)
            if tokens[:len(base)] != base:
                raise UserError(self._redact(
                    f"--exact: model {self.name}: the server tokenizes the prompt differently before the "
                    f"reference {ref!r} (a token spans their boundary), so its echo log-probs are not those "
                    f"of sampling after the prompt; prompt ends {prompt[-20:]!r}"))
            ref_values = values[len(base):]
            if any(v is None for v in ref_values):
                raise ScoringUnavailable(f"model {self.name}: the server returns no log-prob for some "
                                         "echoed tokens")
            if len(ref_values) > params.max_tokens:
                continue
            p_ref = math.exp(sum(ref_values))
            if len(ref_values) == params.max_tokens:
                total += p_ref
                continue
            p_end = self._eos_probability(after, ref)
            for stop in stops:
                echoed = self._echo(prompt + ref + stop)
                if echoed["tokens"][:len(tokens)] != tokens:  # a token spans the reference's end
                    self._warn("stop-boundary", f"a token spans the end of reference {ref!r} and stop "
                                                f"{stop!r} (or others): that ending is not counted, so "
                                                "exact pass probabilities are lower bounds")
                    continue
                stop_values = echoed["token_logprobs"][len(tokens):]
                if len(ref_values) + len(stop_values) <= params.max_tokens:
                    p_end += math.exp(sum(stop_values))
            total += p_ref * p_end
        return total

    def _echo_top(self, text: str) -> dict:
        """`_echo` with the top log-probs after `text`: `TOP_LOGPROBS`, or OpenAI's cap of 5 on a
        server that refuses that many."""
        for top in dict.fromkeys((self._top, OPENAI_TOP_LOGPROBS)):
            try:
                return self._echo(text, top)
            except ScoringUnavailable:
                if top == OPENAI_TOP_LOGPROBS:
                    raise
                self._top = OPENAI_TOP_LOGPROBS
        raise AssertionError("unreachable")

    def _eos_probability(self, top: dict, ref: str) -> float:
        """P(an end-of-text token next), from the generated position's `top_logprobs` (0, noted,
        where none of `eos_tokens` is among them)."""
        seen = [v for tok, v in top.items() if tok in self.eos_tokens and v is not None]
        if not seen:
            self._warn("eos", f"no end-of-text token ({', '.join(self.eos_tokens)}) among the server's top "
                              f"{len(top)} log-probs after reference {ref!r} (or others): its probability "
                              "counts as 0 there, so exact pass probabilities are lower bounds")
        return float(sum(math.exp(v) for v in seen))


def _split_generated(lp: dict, text: str) -> tuple[list, list, dict]:
    """(echoed tokens, their log-probs, the next position's top log-probs) of an `_echo` record of
    `text` with one generated token: the entry at or past the end of `text` (none: {})."""
    tokens, values, offsets = lp["tokens"], lp["token_logprobs"], lp["text_offset"]
    if len(tokens) > 1 and offsets[-1] >= len(text):
        return tokens[:-1], values[:-1], ((lp.get("top_logprobs") or [None])[-1] or {})
    return tokens, values, {}


def stop_endings(ref: str, stop: Sequence[str]) -> list[str] | None:
    """The stop sequences whose text right after `ref` ends a sample that is exactly `ref`, or
    None when `ref` holds a stop (sampling cuts it there: it is never a sample's whole text).

    A stop counts only where it is the one stop in `ref` + it, found first at the end of `ref`:
    where another stop also occurs there (one that starts it, or one across the reference's end),
    which stop cuts the text depends on the server (the earliest, as `truncate_at_stop`; vLLM:
    the first in the list), so that ending is left out: a lower bound either way."""
    stops = [s for s in stop if s]
    if any(s in ref for s in stops):
        return None
    return [s for s in dict.fromkeys(stops) if (ref + s).find(s) == len(ref)
            and not any(o != s and o in ref + s for o in stops)]


def check_logprobs(name: str, values: Sequence) -> None:
    """`ScoringUnavailable` (one line) for a value that is no log-probability: NaN, above 0 (past
    rounding), or not a number; None (the first prompt token's) and -inf pass."""
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or v > LOGPROB_SLACK:
            raise ScoringUnavailable(f"model {name}: the server returns {v!r} as a token log-prob, which is no "
                                     "log-probability (a number <= 0); its scores cannot be used")


def raw_settings_check(backend: str, name: str, params: SamplingParams) -> None:
    """Refuse sampling settings that raw log-probs cannot reproduce (the run checks this before
    it starts: `passuntil.reference.exact_refusal`)."""
    if params.temperature != 1 or params.top_p != 1 or params.top_k:
        raise UserError(f"--exact: model {name}: the {backend} backend returns raw log-probs, the sampling "
                        "distribution only at temperature 1, top-p 1 and no top-k")


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
