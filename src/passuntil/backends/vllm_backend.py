"""The vLLM backend: `LLM.generate` with `SamplingParams(n=...)` and automatic prefix caching.

Needs a GPU and `pip install vllm`; imported only when a series names `backend = "vllm"`. Each
request's seed is derived from (seed, first sample index), so a request repeats as far as vLLM's
seeded sampling does. `score` uses `prompt_logprobs` on prompt + reference, and so does
`exact_pass_probability` on prompt + reference + each ending (at temperature 1 only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from passuntil.backends.base import Completion, SamplingParams, TokenScores, truncate_at_stop
from passuntil.backends.openai_compat import check_logprobs, raw_settings_check, stop_endings
from passuntil.errors import UserError
from passuntil.seeding import derive_seed


class VLLMSampler:
    exact_is_exact = False  # the tokenizer's own encodings only (BPE: a lower bound)

    def __init__(self, path: str, *, name: str | None = None, **engine_args):
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs `pip install vllm` and a GPU") from None
        self.vllm = vllm
        self.name = name or path
        self.llm = vllm.LLM(model=path, enable_prefix_caching=True, **engine_args)

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]
                 ) -> list[list[Completion]]:
        sps = [self.vllm.SamplingParams(
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or -1,
            max_tokens=sp.max_tokens, stop=list(sp.stop),
            seed=derive_seed(sp.seed or 0, "vllm", sp.first_sample) % (2**31)) for sp in params]
        outs = self.llm.generate(list(prompts), sps, use_tqdm=False)
        result = []
        for out, sp in zip(outs, params):
            comps = []
            for j, o in enumerate(out.outputs):
                text, _ = truncate_at_stop(o.text, sp.stop)
                comps.append(Completion(j, text, tuple(o.token_ids),
                                        "length" if o.finish_reason == "length" else "stop",
                                        o.cumulative_logprob))
            result.append(comps)
        return result

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        tok = self.llm.get_tokenizer()
        sp = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate([p + c for p, c in zip(prompts, continuations)], sp,
                                 use_tqdm=False)
        scores = []
        for prompt, out in zip(prompts, outs):
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            ids = out.prompt_token_ids
            offset = len(ids) - len(tok(out.prompt, add_special_tokens=False)["input_ids"])
            lps = out.prompt_logprobs
            values = tuple(lps[i][ids[i]].logprob for i in range(start + offset, len(ids)))
            check_logprobs(self.name, values)
            scores.append(TokenScores(values))
        return scores

    # exact pass probabilities ---------------------------------------------------------------------

    def exact_pass_probability(self, prompt: str, references: Sequence[str], params: SamplingParams) -> float:
        """P(one sample's text is exactly one of `references`), by vLLM's prompt log-probs.

        Only at temperature 1, top-p 1 and no top-k (else `UserError`): vLLM's prompt log-probs are
        the model's raw distribution (V1 computes them from the raw logits whatever its
        `logprobs_mode`), the sampling distribution only there. The prompt is tokenized as
        `generate` has vLLM tokenize it (special tokens added). Each reference is spelled by its
        own encoding and by the encoding of prompt + reference past the prompt's tokens (where that
        keeps the prompt's tokens), each kept only if it decodes to the reference after the
        prompt; the distinct ones are summed, each times P(ending right after: one of the
        end-of-sequence tokens of the tokenizer and the model's generation config, each stop
        sequence's own encoding, or max_tokens reached). Other token sequences spelling the same
        text are not summed: with BPE a lower bound, exact where a text has one token sequence.
        A reference that holds a stop sequence has 0 (sampling cuts it there); a stop that
        another stop could cut earlier is not counted (`openai_compat.stop_endings`).
        """
        raw_settings_check("vllm", self.name, params)
        tok = self.llm.get_tokenizer()
        base = list(tok(prompt)["input_ids"])
        paths = []  # (reference spelling, ending tokens or None: max_tokens reached)
        for ref in dict.fromkeys(references):
            stops = stop_endings(ref, params.stop)
            if stops is None:  # sampling cuts the reference at a stop: never a sample's whole text
                continue
            for ids in _spellings(tok, base, prompt, ref):
                if len(ids) > params.max_tokens:
                    continue
                if len(ids) == params.max_tokens:
                    paths.append((ids, None))
                    continue
                paths += [(ids, [e]) for e in self._eos_ids(tok)]
                paths += [(ids, sid) for sid in (_own_ids(tok, stop) for stop in stops)
                          if sid and len(ids) + len(sid) <= params.max_tokens]
        if not paths:
            return 0.0
        sp = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": base + ids + (end or [])} for ids, end in paths], sp,
                                 use_tqdm=False)
        total = 0.0
        for out in outs:
            ids, lps = list(out.prompt_token_ids), out.prompt_logprobs
            values = [lps[i][ids[i]].logprob for i in range(len(base), len(ids))]
            check_logprobs(self.name, values)
            total += math.exp(sum(values))
        return total

    def _eos_ids(self, tok) -> list[int]:
        """The tokens that end a sample: the tokenizer's EOS and the generation config's."""
        engine = getattr(self.llm, "llm_engine", None)
        fields = getattr(engine, "generation_config_fields", None)  # vLLM V0; V1 reads the model config
        if fields is None and hasattr(getattr(engine, "model_config", None), "try_get_generation_config"):
            fields = engine.model_config.try_get_generation_config()
        fields = fields or {}
        extra = fields.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra]
        return sorted({e for e in (tok.eos_token_id, *extra) if e is not None})


def _own_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _spellings(tok, base: list[int], prompt: str, ref: str) -> list[list[int]]:
    """The distinct token sequences tried for `ref` after the prompt's tokens `base`: its own
    encoding, and prompt + reference encoded together past `base` (where that keeps `base`), each
    only if it decodes to `ref` after the prompt."""
    joint = list(tok(prompt + ref)["input_ids"])
    tries = [_own_ids(tok, ref), joint[len(base):] if joint[:len(base)] == base else None]
    text = tok.decode(base, skip_special_tokens=True)
    out = []
    for ids in tries:
        if ids is not None and ids not in out and tok.decode(base + ids, skip_special_tokens=True) == text + ref:
            out.append(ids)
    return out
