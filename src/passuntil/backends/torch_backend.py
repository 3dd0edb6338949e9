"""The built-in sampler for passuntil's Llama-compatible models (CPU or CUDA).

Each prompt is prefilled once (and kept in a small LRU cache across calls); its KV cache is
shared by all of its samples: attention over the prompt is computed against the one shared
prefix cache, attention over the generated tokens against a per-row suffix cache. Many
prompts and samples decode together; a row leaves the batch when it emits EOS, completes a
stop sequence or reaches max_tokens. Temperature, top-k and top-p are applied by one
function (`sampling_distribution`) that the exact pass probability uses too.

Randomness: the draw of sample j at decoding step t is a hash of (seed, first_sample + j, t),
so a sample does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from passuntil.backends.base import Completion, SamplingParams, TokenScores
from passuntil.models.checkpoint import load_checkpoint
from passuntil.models.model import Transformer, apply_rope, rope_tables
from passuntil.models.tokenizer import EOS_ID, decode, encode
from passuntil.seeding import row_keys, step_uniforms


def sampling_distribution(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, V) after temperature, top-k and top-p; per-row parameters (B,).

    Temperature 0 gives the one-hot argmax. top_k 0 and top_p 1 are off. Top-p keeps the
    smallest set of most likely tokens whose mass reaches p (always at least one token).
    """
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(logits.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (ranks < top_k[:, None])
    probs = probs * keep
    before = probs.cumsum(dim=-1) - probs
    keep = before < top_p[:, None] * probs.sum(dim=-1, keepdim=True)
    probs = probs * keep
    probs = probs / probs.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(probs).scatter(-1, order, probs)
    if greedy.any():
        onehot = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
        out = torch.where(greedy[:, None], onehot, out)
    return out


class TorchSampler:
    """Sampler over a `Transformer` (see module docstring)."""

    def __init__(self, model: Transformer, *, name: str = "model", device: str = "cpu",
                 max_rows: int = 512, prefix_cache: int = 256):
        self.model = model.to(device).eval()
        self.name = name
        self.device = device
        self.max_rows = max_rows
        self._prefixes: OrderedDict[str, tuple] = OrderedDict()
        self._prefix_cache = prefix_cache

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> TorchSampler:
        return cls(load_checkpoint(folder), name=kw.pop("name", Path(folder).name), **kw)

    # prompt prefill ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        ids = encode(prompt)
        room = self.model.cfg.max_position_embeddings - max_tokens
        return ids[-room:] if len(ids) > room else ids

    @torch.no_grad()
    def _prefill(self, ids: list[int]) -> tuple[list, torch.Tensor]:
        key = bytes(np.asarray(ids, dtype=np.uint16).tobytes())
        hit = self._prefixes.get(key)
        if hit is not None:
            self._prefixes.move_to_end(key)
            return hit
        idx = torch.tensor([ids], device=self.device)
        h, kvs = self.model.hidden(idx)
        logits = (h[:, -1] @ self.model.embed_tokens.weight.T)[0]
        self._prefixes[key] = (kvs, logits)
        if len(self._prefixes) > self._prefix_cache:
            self._prefixes.popitem(last=False)
        return kvs, logits

    # generation -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[list[Completion]]:
        out: list[list[Completion | None]] = [[None] * sp.n for sp in params]
        chunk, rows = [], 0
        for r, sp in enumerate(params):
            start = 0
            while start < sp.n:
                take = min(sp.n - start, self.max_rows - rows)
                chunk.append((r, start, take))
                rows += take
                start += take
                if rows == self.max_rows:
                    self._generate_chunk(chunk, prompts, params, out)
                    chunk, rows = [], 0
        if chunk:
            self._generate_chunk(chunk, prompts, params, out)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_chunk(self, chunk, prompts, params, out) -> None:
        m, dev = self.model, self.device
        cfg = m.cfg
        max_new = max(params[r].max_tokens for r, _, _ in chunk)
        groups = []  # per chunk entry: prefix kvs and first logits
        for r, _, _ in chunk:
            groups.append(self._prefill(self._prompt_ids(prompts[r], params[r].max_tokens)))
        counts = [n for _, _, n in chunk]
        B = sum(counts)
        group_of = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor(counts))
        first_logits = torch.stack([g[1] for g in groups])[group_of]
        prefix_len = torch.tensor([g[0][0][0].shape[2] for g in groups])[group_of]
        keys = np.concatenate([row_keys(params[r].seed or 0, np.arange(params[r].first_sample + s,
                               params[r].first_sample + s + n)) for r, s, n in chunk])
        temp = torch.tensor([params[r].temperature for r, _, _ in chunk])[group_of]
        topk = torch.tensor([params[r].top_k for r, _, _ in chunk])[group_of]
        topp = torch.tensor([params[r].top_p for r, _, _ in chunk])[group_of]
        limit = [params[r].max_tokens for r, _, n in chunk for _ in range(n)]
        stops = [[s.encode() for s in params[r].stop if s] for r, _, _ in chunk]
        # per-row bookkeeping (rows stay sorted by chunk entry, so groups are contiguous)
        row_id = torch.arange(B)
        tokens_out: list[list[int]] = [[] for _ in range(B)]
        finish = ["length"] * B
        H, d = cfg.num_attention_heads, cfg.head_dim
        Ks = [torch.empty(B, H, max_new, d, device=dev) for _ in m.layers]
        Vs = [torch.empty(B, H, max_new, d, device=dev) for _ in m.layers]
        logits = first_logits
        for step in range(max_new):
            probs = sampling_distribution(logits, temp, topk, topp)
            u = torch.from_numpy(step_uniforms(keys, step)).to(probs.dtype)
            cdf = probs.cumsum(dim=-1)
            tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(probs.shape[-1] - 1)[:, 0]
            done_rows = []
            for i, (row, g, t) in enumerate(zip(row_id.tolist(), group_of.tolist(), tok.tolist())):
                if t == EOS_ID:
                    finish[row] = "stop"
                    done_rows.append(i)
                    continue
                toks = tokens_out[row]
                toks.append(t)
                if stops[g] and _ends_with_stop(toks, stops[g]):
                    finish[row] = "stop"
                    done_rows.append(i)
                elif len(toks) >= limit[row]:
                    done_rows.append(i)
            done = torch.zeros(len(row_id), dtype=torch.bool)
            done[done_rows] = True
            if done.all() or step + 1 == max_new:
                break
            if done.any():
                keep = ~done
                row_id, group_of, keys = row_id[keep], group_of[keep], keys[keep.numpy()]
                temp, topk, topp, tok = temp[keep], topk[keep], topp[keep], tok[keep]
                prefix_len = prefix_len[keep]
                Ks = [k[keep] for k in Ks]
                Vs = [v[keep] for v in Vs]
            logits = self._decode_step(tok, prefix_len + step, step, group_of, groups, Ks, Vs)
        row = 0
        for r, s, n in chunk:
            for j in range(n):
                toks = tokens_out[row]
                text = decode(toks)
                for st in params[r].stop:
                    if st and text.endswith(st) and finish[row] == "stop":
                        text = text[: -len(st)]
                        break
                out[r][s + j] = Completion(s + j, text, tuple(toks), finish[row])
                row += 1

    def _decode_step(self, tok, positions, step, group_of, groups, Ks, Vs):
        """One token for every active row; returns next logits (B, V)."""
        m = self.model
        cfg = m.cfg
        B = tok.shape[0]
        H, d = cfg.num_attention_heads, cfg.head_dim
        cos, sin = rope_tables(cfg, positions)  # (B, d)
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        bounds = _group_bounds(group_of)
        scale = 1.0 / math.sqrt(d)
        x = m.embed_tokens(tok)[:, None, :]  # (B, 1, C)
        for li, layer in enumerate(m.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (proj(h).view(B, 1, H, d).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            Ks[li][:, :, step] = k[:, :, 0]
            Vs[li][:, :, step] = v[:, :, 0]
            ks, vs = Ks[li][:, :, : step + 1], Vs[li][:, :, : step + 1]
            s_suffix = (q @ ks.transpose(-1, -2)) * scale  # (B, H, 1, step+1)
            y = torch.empty(B, H, 1, d)
            for g, a, b in bounds:
                kp, vp = groups[g][0][li]  # (1, H, Tp, d)
                s_prefix = (q[a:b] @ kp.transpose(-1, -2)) * scale  # (n, H, 1, Tp)
                w = torch.cat([s_prefix, s_suffix[a:b]], dim=-1).softmax(dim=-1)
                tp = kp.shape[2]
                y[a:b] = w[..., :tp] @ vp + w[..., tp:] @ vs[a:b]
            x = x + att.o_proj(y.transpose(1, 2).reshape(B, 1, cfg.hidden_size))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.norm(x)[:, 0] @ m.embed_tokens.weight.T

    # scoring ------------------------------------------------------------------------------------

    @torch.no_grad()
    def token_logits(self, prompt: str, continuation_ids: list[int]) -> torch.Tensor:
        """Logits (len(continuation)+1, V) predicting each continuation token and the next one."""
        ids = encode(prompt) + continuation_ids
        room = self.model.cfg.max_position_embeddings
        cut = max(0, len(ids) - room)
        logits, _ = self.model(torch.tensor([ids[cut:]], device=self.device))
        start = len(ids) - cut - len(continuation_ids) - 1
        return logits[0, start:]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        out = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            ids = encode(cont)
            logp = self.token_logits(prompt, ids)[:-1].float().log_softmax(-1)
            out.append(TokenScores(tuple(logp[torch.arange(len(ids)), torch.tensor(ids)].tolist())))
        return out

    def exact_pass_probability(self, prompt: str, references: Sequence[str], params: SamplingParams) -> float:
        """P(one sample's text is exactly one of `references`), under the sampler's own distribution.

        Sums, over references, the product of the sampling probabilities of its tokens and of
        an ending right after it (EOS, a stop sequence, or max_tokens reached). Exact for this
        byte-level tokenizer; for an `Exact(strip=True)` check it is a lower bound (whitespace
        variants also pass).
        """
        total = 0.0
        stops = [s for s in params.stop if s and not any(o != s and s.startswith(o) for o in params.stop if o)]
        for ref in dict.fromkeys(references):
            ids = encode(ref)
            if len(ids) > params.max_tokens:
                continue
            p_ref = self._path_probability(prompt, ids, params)
            if len(ids) == params.max_tokens:
                total += p_ref
                continue
            p_end = self._path_probability(prompt + ref, [EOS_ID], params)
            for s in stops:
                sid = encode(s)
                if len(ids) + len(sid) <= params.max_tokens:
                    p_end += self._path_probability(prompt + ref, sid, params)
            total += p_ref * p_end
        return total

    def _path_probability(self, prompt: str, ids: list[int], params: SamplingParams) -> float:
        """Probability that sampling continues `prompt` with exactly the tokens `ids`."""
        text_ids = [i for i in ids if i != EOS_ID]
        logits = self.token_logits(prompt, text_ids)[: len(ids)]
        n = logits.shape[0]
        probs = sampling_distribution(logits, torch.full((n,), params.temperature),
                                      torch.full((n,), params.top_k), torch.full((n,), params.top_p))
        return float(torch.exp(torch.log(probs[torch.arange(n), torch.tensor(ids)]).sum()))


def _ends_with_stop(toks: list[int], stops: list[bytes]) -> bool:
    return any(len(toks) >= len(s) and bytes(toks[-len(s):]) == s for s in stops)


def _group_bounds(group_of: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, end) of each run of equal group ids (rows are sorted by group)."""
    ids, counts = torch.unique_consecutive(group_of, return_counts=True)
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return list(zip(ids.tolist(), starts, ends))
