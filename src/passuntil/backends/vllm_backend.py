"""The vLLM backend: `LLM.generate` with `SamplingParams(n=...)` and automatic prefix caching.

Needs a GPU and `pip install vllm`; imported only when a series names `backend = "vllm"`. Each
request's seed is derived from (seed, first sample index), so a request repeats as far as vLLM's
seeded sampling does. `score` uses `prompt_logprobs` on prompt + reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from passuntil.backends.base import Completion, SamplingParams, TokenScores, truncate_at_stop
from passuntil.errors import UserError
from passuntil.seeding import derive_seed


class VLLMSampler:
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
            scores.append(TokenScores(tuple(lps[i][ids[i]].logprob
                                            for i in range(start + offset, len(ids)))))
        return scores
