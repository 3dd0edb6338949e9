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
        self._prefixes: OrderedDict[tuple[int, ...], tuple] = OrderedDict()
        self._prefix_cache = prefix_cache
        # fused projections for decoding: one matmul for q|k|v and one for gate|up per layer
        with torch.no_grad():
            layers = self.model.layers
            self._qkv = [torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight,
                                    b.self_attn.v_proj.weight]) for b in layers]
            self._gate_up = [torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]) for b in layers]

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
        key = tuple(ids)
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
        """Requests are cut into segments of R rows (R = n rounded up to a power of two, at most
        32); segments of one R decode together in chunks of at most `max_rows` rows."""
        out: list[list[Completion | None]] = [[None] * sp.n for sp in params]
        by_size: dict[int, list[int]] = {}
        for r, sp in enumerate(params):
            by_size.setdefault(min(32, 1 << (sp.n - 1).bit_length()), []).append(r)
        for seg, requests in sorted(by_size.items()):
            chunk = []
            for r in requests:
                for start in range(0, params[r].n, seg):
                    chunk.append((r, start, min(seg, params[r].n - start)))
                    if (len(chunk) + 1) * seg > self.max_rows:
                        self._generate_chunk(chunk, seg, prompts, params, out)
                        chunk = []
            if chunk:
                self._generate_chunk(chunk, seg, prompts, params, out)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, chunk, R, prompts, params, out) -> None:
        """Decode one chunk: S segments of R rows, each segment the samples [start, start+n) of one
        request (rows past n are padding and are discarded)."""
        m, dev, cfg = self.model, self.device, self.model.cfg
        S, H, d = len(chunk), cfg.num_attention_heads, cfg.head_dim
        B = S * R
        max_new = max(params[r].max_tokens for r, _, _ in chunk)
        # shared prefixes: each distinct request prefilled once, stacked and padded to T
        prefixes = [self._prefill(self._prompt_ids(prompts[r], params[r].max_tokens)) for r, _, _ in chunk]
        plen = torch.tensor([p[0][0][0].shape[2] for p in prefixes])
        T = int(plen.max())
        mask = torch.where(torch.arange(T)[None, :] < plen[:, None], 0.0, float("-inf"))[:, None, None, :]
        kp = [torch.cat([F.pad(p[0][li][0], (0, 0, 0, T - p[0][li][0].shape[2])) for p in prefixes]) for li in range(len(m.layers))]
        vp = [torch.cat([F.pad(p[0][li][1], (0, 0, 0, T - p[0][li][1].shape[2])) for p in prefixes]) for li in range(len(m.layers))]
        logits = torch.stack([p[1] for p in prefixes]).repeat_interleave(R, dim=0)  # (B, V)
        # per-row sampling state
        keys = np.concatenate([row_keys(params[r].seed or 0, np.arange(params[r].first_sample + s0,
                               params[r].first_sample + s0 + R)) for r, s0, _ in chunk])
        per_row = lambda f, dt: torch.tensor([f(params[r]) for r, _, _ in chunk], dtype=dt).repeat_interleave(R)  # noqa: E731
        temp = per_row(lambda p: p.temperature, torch.float32)
        topk = per_row(lambda p: p.top_k, torch.long)
        topp = per_row(lambda p: p.top_p, torch.float32)
        limit = per_row(lambda p: p.max_tokens, torch.long)
        filtered = bool((topk > 0).any() or (topp < 1).any() or (temp <= 0).any())
        stop_rows = {}
        for i, (r, _, _) in enumerate(chunk):
            for st in params[r].stop:
                if st:
                    stop_rows.setdefault(st.encode(), torch.zeros(S, dtype=torch.bool))[i] = True
        stops = [(torch.tensor(list(b)), rows.repeat_interleave(R)) for b, rows in stop_rows.items()]
        # per-row decoding state for the live segments only; finished segments are written to `final`
        tokens = torch.full((B, max_new), EOS_ID, dtype=torch.long)
        length = torch.zeros(B, dtype=torch.long)
        reason = torch.zeros(B, dtype=torch.long)  # 0 length, 1 EOS, 2 stop sequence
        alive = torch.ones(B, dtype=torch.bool)
        stop_has = [has for _, has in stops]
        seg_ids = torch.arange(S)  # original index of each live segment
        final_tokens = torch.empty((B, max_new), dtype=torch.long)
        final_length = torch.empty(B, dtype=torch.long)
        final_reason = torch.empty(B, dtype=torch.long)
        dt = m.embed_tokens.weight.dtype
        mask = mask.to(dt)
        Ks = [torch.empty(S, H, R, max_new, d, device=dev, dtype=dt) for _ in m.layers]
        Vs = [torch.empty(S, H, R, max_new, d, device=dev, dtype=dt) for _ in m.layers]
        retired = torch.zeros(S, dtype=torch.bool)  # finished segments whose results are saved
        for step in range(max_new):
            if filtered:
                probs = sampling_distribution(logits, temp, topk, topp)
            else:
                probs = (logits.float() / temp[:, None]).softmax(dim=-1)
            u = torch.from_numpy(step_uniforms(keys, step)).to(probs.dtype)
            cdf = probs.cumsum(dim=-1)
            tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp_max(probs.shape[-1] - 1)
            tokens[:, step] = torch.where(alive, tok, tokens[:, step])
            eos = alive & (tok == EOS_ID)
            length += (alive & ~eos).long()
            hit = torch.zeros_like(alive)
            for (seq, _), has in zip(stops, stop_has):
                if step + 1 >= len(seq):
                    hit |= has & (tokens[:, step + 1 - len(seq): step + 1] == seq).all(dim=1)
            hit &= alive & ~eos
            done = eos | hit | (alive & (length >= limit))
            reason = torch.where(eos, 1, torch.where(hit, 2, reason))
            alive &= ~done
            seg_live = alive.view(-1, R).any(dim=1)
            if step + 1 == max_new:
                seg_live = torch.zeros_like(seg_live)
            newly = ~seg_live & ~retired
            if newly.any():  # save the results of segments whose rows have all finished
                gone = (seg_ids[newly][:, None] * R + torch.arange(R)).reshape(-1)
                row_gone = newly.repeat_interleave(R)
                final_tokens[gone], final_length[gone], final_reason[gone] = \
                    tokens[row_gone], length[row_gone], reason[row_gone]
                retired |= newly
                if not seg_live.any():
                    break
            if retired.sum() * 2 >= len(retired):  # compact once half the segments are finished
                keep, row_keep = seg_live, seg_live.repeat_interleave(R)
                retired = retired[keep]
                seg_ids, mask, plen = seg_ids[keep], mask[keep], plen[keep]
                kp, vp = [k[keep] for k in kp], [v[keep] for v in vp]
                Ks, Vs = [k[keep] for k in Ks], [v[keep] for v in Vs]
                tok, tokens, length, reason, alive = (t[row_keep] for t in (tok, tokens, length, reason, alive))
                temp, topk, topp, limit = (t[row_keep] for t in (temp, topk, topp, limit))
                stop_has = [h[row_keep] for h in stop_has]
                keys = keys[row_keep.numpy()]
            logits = self._decode_step(tok, plen + step, step, R, kp, vp, mask, Ks, Vs)
        tokens, length, reason = final_tokens.tolist(), final_length.tolist(), final_reason.tolist()
        for i, (r, s0, n) in enumerate(chunk):
            for j in range(n):
                row = i * R + j
                toks = tokens[row][: length[row]]
                text = decode(toks)
                if reason[row] == 2:
                    text = next((text[: -len(st)] for st in params[r].stop if st and text.endswith(st)), text)
                out[r][s0 + j] = Completion(s0 + j, text, tuple(toks), "length" if reason[row] == 0 else "stop")

    def _decode_step(self, tok, positions, step, R, kp, vp, mask, Ks, Vs):
        """One token for every row of the live segments; returns the next logits (S*R, V)."""
        m, cfg = self.model, self.model.cfg
        S = positions.shape[0]
        H, d, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        cos, sin = rope_tables(cfg, positions)  # (S, d): one position per segment
        dt = m.embed_tokens.weight.dtype
        cos, sin = cos[:, None, None, :].to(dt), sin[:, None, None, :].to(dt)
        scale = 1.0 / math.sqrt(d)
        x = m.embed_tokens(tok)  # (S*R, C)
        for li, layer in enumerate(m.layers):
            att = layer.self_attn
            qkv = F.linear(layer.input_layernorm(x), self._qkv[li]).view(S, R, 3, H, d)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (S, H, R, d)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            Ks[li][..., step, :] = k
            Vs[li][..., step, :] = v
            ks, vs = Ks[li][..., : step + 1, :], Vs[li][..., : step + 1, :]  # (S, H, R, s, d)
            s_prefix = q @ kp[li].transpose(-1, -2) * scale + mask  # (S, H, R, T)
            # per-row suffix: elementwise products, not millions of 1 x d matmuls
            s_suffix = (ks * q[..., None, :]).sum(-1) * scale  # (S, H, R, s)
            w = torch.cat([s_prefix, s_suffix], dim=-1).softmax(dim=-1)
            T = s_prefix.shape[-1]
            y = w[..., :T] @ vp[li] + (w[..., T:, None] * vs).sum(-2)  # (S, H, R, d)
            x = x + att.o_proj(y.transpose(1, 2).reshape(S * R, C))
            gate, up = F.linear(layer.post_attention_layernorm(x), self._gate_up[li]).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act(gate) * up)
        return m.norm(x) @ m.embed_tokens.weight.T

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
