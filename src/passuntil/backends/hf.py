"""The `transformers` backend: any local causal-LM folder through `AutoModelForCausalLM`.

Use it for architectures the built-in sampler does not implement; for Llama-shaped models the
built-in sampler (shared-prefix KV cache, rows leave at their stop) is several times faster
(benchmarks/sampling.py). Sampling runs `generate(num_return_sequences=n)` per prompt, seeded
per request from (seed, first sample index), so a request repeats exactly; stop sequences are
applied to the decoded text. `score` is one teacher-forced forward pass per pair.
"""

from __future__ import annotations

from collections.abc import Sequence

from passuntil.backends.base import Completion, SamplingParams, TokenScores, truncate_at_stop
from passuntil.errors import UserError
from passuntil.seeding import derive_seed


class TransformersSampler:
    def __init__(self, path: str, *, name: str | None = None, device: str = "cpu",
                 dtype: str = "float32", chunk: int = 256):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise UserError(f"the transformers backend needs `pip install transformers` ({err})"
                            ) from None
        self.torch = torch
        self.name = name or path
        self.device = device
        self.chunk = chunk
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype)).to(device).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load {path} with transformers: {str(err).splitlines()[0]}"
                            ) from None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]
                 ) -> list[list[Completion]]:
        torch = self.torch
        out = []
        for prompt, sp in zip(prompts, params, strict=True):
            ids = torch.tensor([self._ids(prompt)], device=self.device)
            texts: list[Completion] = []
            while len(texts) < sp.n:
                n = min(self.chunk, sp.n - len(texts))
                torch.manual_seed(derive_seed(sp.seed or 0, "hf", sp.first_sample + len(texts)))
                greedy = sp.temperature == 0
                kwargs = {} if greedy else {"temperature": sp.temperature, "top_p": sp.top_p,
                                            "top_k": sp.top_k or 0}
                with torch.no_grad():
                    gen = self.model.generate(
                        ids.expand(n, -1), do_sample=not greedy, max_new_tokens=sp.max_tokens,
                        pad_token_id=self.tokenizer.eos_token_id, **kwargs)
                for row in gen[:, ids.shape[1]:].tolist():
                    eos = self.tokenizer.eos_token_id
                    hit_eos = eos in row
                    row = row[: row.index(eos)] if hit_eos else row
                    text, stopped = truncate_at_stop(self.tokenizer.decode(row), sp.stop)
                    texts.append(Completion(len(texts), text, tuple(row),
                                            "stop" if stopped or hit_eos else "length"))
            out.append(texts)
        return out

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        torch = self.torch
        out = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            p = self._ids(prompt)
            full = p + self._ids(cont)
            with torch.no_grad():
                logits = self.model(torch.tensor([full], device=self.device)).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            targets = torch.tensor(full[len(p):], device=self.device)
            picked = logp[len(p) - 1: len(full) - 1].gather(1, targets[:, None])[:, 0]
            out.append(TokenScores(tuple(picked.tolist())))
        return out
