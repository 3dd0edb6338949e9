"""The built-in sampler for passuntil's Llama-compatible models (CPU or CUDA).

Each prompt is prefilled once (and kept in a small LRU cache across calls); its KV cache is
shared by all of its samples: attention over the prompt is computed against the one shared
prefix cache, attention over the generated tokens against a per-row suffix cache. Many
prompts and samples decode together; a row leaves the batch when it emits EOS, completes a
stop sequence or reaches max_tokens. Temperature, top-k and top-p are applied by one
function (`sampling_distribution`) that the exact pass probability uses too.

Randomness: the draw of sample j at decoding step t is a hash of (seed, first_sample + j, t),
so a sample does not depend on what else is in the batch.

On a CPU in float32 a decoding step's attention, norms and SiLU run in compiled C kernels
(cpu_kernel.py), and where PyTorch exports its BLAS sgemm (MKL in the x86-64 wheels) the whole
step, every layer and the LM head, is one C call; elsewhere, and without a C compiler, the step
runs in PyTorch. All compute the same thing. The sampler keeps the memory decoding writes into
(the suffix caches, at most `cache_bytes`, and the activations) between calls: PassUntil calls
it round after round, and fresh memory costs page faults.
"""

from __future__ import annotations

import inspect
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from passuntil.backends import cpu_kernel
from passuntil.backends.base import (
    Completion,
    SamplingParams,
    TokenScores,
    exact_stop_endings,
    truncate_at_stop,
)
from passuntil.errors import UserError
from passuntil.models.checkpoint import load_checkpoint
from passuntil.models.model import Transformer, rope_tables
from passuntil.models.tokenizer import EOS_ID, encode
from passuntil.models.tokenizer import _bytes_to_unicode as _byte_chars
from passuntil.seeding import row_keys, step_uniforms

# PyTorch's CPU flash-attention kernel, which returns the log-sum-exp as well (None where this
# torch lacks it or its attention mask)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _FLASH_CPU is not None and "attn_mask" not in str(_FLASH_CPU.default._schema):
    _FLASH_CPU = None


def sampling_distribution(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, V) after temperature, top-k and top-p; per-row parameters (B,).

    Temperature 0 gives the one-hot argmax. top_k 0 and top_p 1 are off. Top-p keeps the
    smallest set of most likely tokens whose mass reaches p (always at least one token).
    """
    logits = logits.float()
    temperature, top_k, top_p = (t.to(logits.device) for t in (temperature, top_k, top_p))
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
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


def draw_tokens(logits: torch.Tensor, keys: np.ndarray, step: int, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, *, filtered: bool, kernel: bool) -> torch.Tensor:
    """The token (B,) on the CPU that each row draws at decoding step `step` from its logits
    (B, V): inverse CDF of `sampling_distribution` at the row's uniform `step_uniforms(keys,
    step)`. `filtered`: some row has top-k, top-p or temperature 0. Without those, and on the
    compiled kernel's path (`kernel`), the draw is one C pass per row (`cpu_kernel.
    sample_tokens`: the same uniform, the same distribution, up to rounding at a CDF boundary):
    0.29 ms for 1,024 rows of tiny-7, where PyTorch's softmax, cumsum and search of the full
    (B, V) tensors took 1.3-2.6 ms (docs/sampler.md)."""
    if kernel and not filtered and logits.dtype == torch.float32:
        return cpu_kernel.sample_tokens(logits, temperature, keys, step)
    dev = logits.device
    if filtered:
        probs = sampling_distribution(logits, temperature, top_k, top_p)
    else:
        probs = (logits.float() / temperature[:, None].to(dev)).softmax(dim=-1)
    u = torch.from_numpy(step_uniforms(keys, step)).to(dev, probs.dtype)
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp_max(probs.shape[-1] - 1).cpu()


class TorchSampler:
    """Sampler over a `Transformer` (see module docstring)."""

    exact_is_exact = True  # a byte-level tokenizer: every text has one token sequence

    def __init__(self, model: Transformer, *, name: str = "model", device: str = "cpu",
                 max_rows: int | None = None, cache_bytes: int | None = None, prefix_cache: int = 256):
        self.model = model.to(device).eval()
        self.name = name
        self.device = device
        # Rows decoded together. 1,024 is where a CPU's matmuls stop gaining. A GPU's step costs
        # about the same for 1,000 rows as for 60,000 (it waits on kernel launches), so there
        # a chunk takes up to a quarter of the device's memory for its suffix caches.
        on_cpu = torch.device(device).type == "cpu"
        self.max_rows = max_rows or (1024 if on_cpu else 1 << 17)
        if cache_bytes is None:
            cache_bytes = 2 << 30 if on_cpu else torch.cuda.get_device_properties(device).total_memory // 4
        self.cache_bytes = cache_bytes  # bound on the per-row suffix caches of one chunk
        self._prefixes: OrderedDict[tuple[int, ...], tuple] = OrderedDict()
        self._prefix_cache = prefix_cache
        self.row_steps = 0  # rows x decoding steps computed, padding and dead rows included
        self.repacks = 0
        # Memory that decoding writes into, kept between steps and calls (see _scratch)
        self._scratch_buffers: dict[tuple, torch.Tensor] = {}
        # Decoding's weights. Fused projections: one matmul for q|k|v and one for gate|up per
        # layer, each RMSNorm's weight folded into the matmul after it (so a norm is one kernel).
        # Each head's q and k dims are interleaved, the pairs (i, i + d/2) that RoPE rotates side
        # by side, so rotary is one complex multiply; q.k does not depend on the order of the
        # dims (prefix keys are permuted the same way).
        cfg = self.model.cfg
        H, d = cfg.num_attention_heads, cfg.head_dim
        self._pairs = torch.arange(d).view(2, d // 2).T.reshape(-1)
        interleave = lambda w: w.view(H, d, -1)[:, self._pairs].reshape(w.shape)  # noqa: E731
        fold = lambda w, norm: (w.float() * norm.weight.float()).to(w.dtype)  # noqa: E731
        with torch.no_grad():
            layers = self.model.layers
            self._qkv = [fold(torch.cat([interleave(b.self_attn.q_proj.weight), interleave(b.self_attn.k_proj.weight),
                                         b.self_attn.v_proj.weight]), b.input_layernorm) for b in layers]
            self._gate_up = [fold(torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]),
                                  b.post_attention_layernorm) for b in layers]
            self._head = fold(self.model.embed_tokens.weight, self.model.norm)
        # per layer, as the decoding step's matmuls take them: x @ w
        self._layers = [(qkv.T, b.self_attn.o_proj.weight.T, gate_up.T, b.mlp.down_proj.weight.T, b.mlp.act)
                        for qkv, gate_up, b in zip(self._qkv, self._gate_up, layers)]
        # cos and sin (positions, d/2) of every position, as decoding steps read them: computed
        # per step they were a dozen small kernels, about 1% of a small model's call
        cos, sin = rope_tables(cfg, torch.arange(cfg.max_position_embeddings, device=device))
        self._rope = tuple(t[:, : d // 2].to(self.model.embed_tokens.weight.dtype).contiguous() for t in (cos, sin))
        self.one_call = True  # whole steps in one C call where `kernel_path` allows (off: A/B benchmarks)
        cpu_kernel.announce(self.kernel_path)

    @property
    def kernel_path(self) -> str:
        """The path a decoding step takes (cpu_kernel.kernel_path() for a float32 CPU model)."""
        cfg, w = self.model.cfg, self.model.embed_tokens.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return "pytorch"
        if cfg.head_dim % 16:
            return "pytorch (head size not a multiple of 16)"
        path = cpu_kernel.kernel_path()
        return "c-kernels (GeLU gate)" if path.startswith("c-onecall") and cfg.hidden_act != "silu" else path

    @classmethod
    def from_folder(cls, folder: str | Path, *, dtype: str = "float32", **kw) -> TorchSampler:
        """A checkpoint folder, run in `dtype`: float32 (the default: faithful to the weights,
        and on a CPU the fastest, with the compiled kernels) or bfloat16 (it moves an
        instance's pass probability by up to 15%; docs/sampler.md#speed)."""
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "name"}
        unknown = set(kw) - known - {"name"}
        if unknown:
            raise UserError(f"unknown torch backend option(s) {sorted(unknown)}; known: "
                            f"{', '.join(['dtype', *sorted(known)])}")
        refuse_unsupported(folder)
        model = load_checkpoint(folder).to(getattr(torch, dtype))
        return cls(model, name=kw.pop("name", Path(folder).name), **kw)

    # prompt prefill ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        ids = encode(prompt)
        context = self.model.cfg.max_position_embeddings
        room = context - max_tokens
        if room < 1:  # ids[-0:] would keep the whole prompt and run past the positions
            raise UserError(f"model {self.name!r}: {max_tokens} new tokens leave no room for the "
                            f"prompt in its context of {context} positions; pass --max-tokens "
                            f"below {context}")
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
        32); segments of one R decode together in chunks of at most `max_rows` rows, fewer if
        their suffix caches would pass `cache_bytes`."""
        out: list[list[Completion | None]] = [[None] * sp.n for sp in params]
        cfg = self.model.cfg
        max_new = max((sp.max_tokens for sp in params), default=1)
        if self._use_kernel():  # K and V, positions padded to 4, two buffers each (see _generate_chunk)
            row_bytes = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * 4 * -(-max_new // 4) * 4
        else:
            row_bytes = 2 * cfg.num_hidden_layers * cfg.hidden_size * self.model.embed_tokens.weight.element_size() * max_new
        max_rows = min(self.max_rows, self.cache_bytes // row_bytes)
        by_size: dict[int, list[int]] = {}
        for r, sp in enumerate(params):
            by_size.setdefault(min(32, 1 << (sp.n - 1).bit_length()), []).append(r)
        for seg, requests in sorted(by_size.items()):
            chunk = []
            for r in requests:
                for start in range(0, params[r].n, seg):
                    chunk.append((r, start, min(seg, params[r].n - start)))
                    if (len(chunk) + 1) * seg > max_rows:
                        self._generate_chunk(chunk, seg, prompts, params, out)
                        chunk = []
            if chunk:
                self._generate_chunk(chunk, seg, prompts, params, out)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, chunk, R, prompts, params, out) -> None:
        """Decode one chunk: S segments of R rows, each segment the samples [start, start+n) of one
        request (rows past n are padding and are discarded).

        Scheduling only (rows, draws, stops, repacks); the numerics, caches and compute path are
        a `Decoder`'s. A row's result is saved the step it finishes. When the live rows would fit
        in at most 3/4 of the segments, they are repacked: the live rows of each prompt are
        gathered into as few segments as they fill (rows of one prompt share its prefix, so any
        of them can sit in any of its segments), and the dead rows stop costing compute.
        """
        S = len(chunk)
        B = S * R
        max_new = max(params[r].max_tokens for r, _, _ in chunk)
        ids = [tuple(self._prompt_ids(prompts[r], params[r].max_tokens)) for r, _, _ in chunk]
        distinct = list(dict.fromkeys(ids))  # each distinct prompt prefilled once
        seg_prefix = torch.tensor([distinct.index(i) for i in ids])  # (S,) prompt of each segment
        decoder = Decoder(self, [self._prefill(list(i)) for i in distinct], seg_prefix, R, max_new)
        logits = decoder.first_logits(seg_prefix)
        kernel = self._use_kernel()
        # Bookkeeping (row state, stops, repacking) is NumPy on the CPU (a few microseconds an
        # operation on a thousand rows, PyTorch's dispatch costs several times that); the model's
        # tensors stay on its device. Per-row sampling state; row_id is the row's place in the
        # chunk's output (-1: padding)
        keys = np.concatenate([row_keys(params[r].seed or 0, np.arange(params[r].first_sample + s0,
                               params[r].first_sample + s0 + R)) for r, s0, _ in chunk])
        per_row = lambda f, dt: torch.tensor([f(params[r]) for r, _, _ in chunk], dtype=dt).repeat_interleave(R)  # noqa: E731
        temp = per_row(lambda p: p.temperature, torch.float32)
        topk = per_row(lambda p: p.top_k, torch.long)
        topp = per_row(lambda p: p.top_p, torch.float32)
        limit = np.repeat([params[r].max_tokens for r, _, _ in chunk], R)
        filtered = bool((topk > 0).any() or (topp < 1).any() or (temp <= 0).any())
        alive = np.array([j < n for _, _, n in chunk for j in range(R)])
        row_id = np.where(alive, np.arange(B), -1)
        stop_rows: dict[bytes, np.ndarray] = {}
        for i, (r, _, _) in enumerate(chunk):
            for st in params[r].stop:
                if st:
                    stop_rows.setdefault(st.encode(), np.zeros(S, dtype=bool))[i] = True
        stops = [np.frombuffer(b, dtype=np.uint8).astype(np.int64) for b in stop_rows]
        stop_has = [np.repeat(rows, R) for rows in stop_rows.values()]
        tokens = np.full((B, max_new), EOS_ID, dtype=np.int64)
        length = np.zeros(B, dtype=np.int64)
        reason = np.zeros(B, dtype=np.int64)  # 0 length, 1 EOS, 2 stop sequence
        final_tokens = np.empty((B, max_new), dtype=np.int64)
        final_length = np.zeros(B, dtype=np.int64)  # padding rows stay 0
        final_reason = np.empty(B, dtype=np.int64)
        for step in range(max_new):
            tok = draw_tokens(logits, keys, step, temp, topk, topp, filtered=filtered, kernel=kernel).numpy()
            tokens[:, step] = tok  # a dead row's token is never read
            eos = alive & (tok == EOS_ID)
            length += alive & ~eos
            hit = np.zeros_like(alive)
            for seq, has in zip(stops, stop_has):
                if step + 1 >= len(seq):
                    hit |= has & (tokens[:, step + 1 - len(seq): step + 1] == seq).all(axis=1)
            hit &= alive & ~eos
            done = alive.copy() if step + 1 == max_new else eos | hit | (alive & (length >= limit))
            reason[eos], reason[hit] = 1, 2
            if done.any():  # save the rows that finished this step
                gone = row_id[done]
                final_tokens[gone], final_length[gone], final_reason[gone] = tokens[done], length[done], reason[done]
            alive &= ~done  # alive rows always have row_id >= 0
            if not alive.any():
                break
            row_prefix = np.repeat(seg_prefix.numpy(), R)
            counts = np.bincount(row_prefix[alive], minlength=len(distinct))
            need = int(((counts + R - 1) // R).sum())
            if 4 * need <= 3 * seg_prefix.shape[0]:
                src_t, seg_prefix = _repack(torch.from_numpy(alive), torch.from_numpy(row_prefix),
                                            torch.from_numpy(counts), R)
                self.repacks += 1
                padding, src_t = src_t < 0, src_t.clamp_min(0)
                src = src_t.numpy()
                row_id = np.where(padding.numpy(), -1, row_id[src])
                alive = alive[src] & (row_id >= 0)
                tok, tokens, length, reason, limit, keys = (a[src] for a in (tok, tokens, length, reason, limit, keys))
                temp, topk, topp = temp[src_t], topk[src_t], topp[src_t]
                stop_has = [h[src] for h in stop_has]
                decoder.repack(src_t, seg_prefix, step)
            logits = decoder.step(torch.from_numpy(tok), step)
            self.row_steps += len(tok)
        longest = int(final_length.max())
        tokens, length, reason = final_tokens[:, :longest].tolist(), final_length.tolist(), final_reason.tolist()
        for i, (r, s0, n) in enumerate(chunk):
            stops = [st for st in params[r].stop if st]
            for j in range(n):
                row = i * R + j
                toks = tokens[row][: length[row]]  # all bytes: EOS ends a row and is not counted
                text = bytes(toks).decode("utf-8", errors="replace")
                if reason[row] == 2:  # the stops all end here: the cut is at the earliest one
                    text = truncate_at_stop(text, stops)[0]
                out[r][s0 + j] = Completion(s0 + j, text, tuple(toks), "length" if reason[row] == 0 else "stop")

    def _use_kernel(self) -> bool:
        """Whether decoding attention runs in the compiled CPU kernel (cpu_kernel.py)."""
        cfg, w = self.model.cfg, self.model.embed_tokens.weight
        return (w.device.type == "cpu" and w.dtype == torch.float32 and cfg.head_dim % 16 == 0
                and cpu_kernel.load() is not None)

    @staticmethod
    def _segment_prefixes(kernel: bool, seg_prefix, kp_all, vp_all, mask_all, plen_all) -> tuple:
        """What `_decode_step` attends to, (kernel, keys, values, where): for the C kernel the
        distinct prefixes and where = (the prefix each segment reads, each prefix's length); for
        PyTorch a copy of its prefix per segment and where = the padding mask."""
        if kernel:
            return True, kp_all, vp_all, (seg_prefix.contiguous(), plen_all)
        on_dev = seg_prefix.to(kp_all[0].device)
        return False, [k[on_dev] for k in kp_all], [v[on_dev] for v in vp_all], mask_all[on_dev]

    def _scratch(self, name: tuple, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat buffer of `numel` (contents undefined) that the sampler keeps between steps and
        calls, grown when too small. Decoding writes its activations and the kernel's suffix
        caches into these: fresh allocations cost page faults (80,000 per benchmark call) and
        start cold in the caches (matmuls into a kept output ran 12-17% faster)."""
        buf = self._scratch_buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            self._scratch_buffers.pop(name, None)  # free the old one first
            buf = self._scratch_buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def _step_buffers(self, n: int) -> dict[str, torch.Tensor]:
        """A decoding step's activations for n rows, in buffers kept between steps."""
        cfg, dt = self.model.cfg, self.model.embed_tokens.weight.dtype
        C, F_ = cfg.hidden_size, cfg.intermediate_size
        return {name: self._scratch((name,), n * cols, dt).view(n, cols)
                for name, cols in (("norm", C), ("qkv", 3 * C), ("attention", C), ("gate_up", 2 * F_), ("act", F_),
                                   ("logits", self._head.shape[0]))}

    def _plan(self, prefix, Ks, Vs, n: int) -> cpu_kernel.DecodePlan | None:
        """The whole decoding step in one C call where it can run (the C kernels, PyTorch's sgemm,
        a SiLU-gated model); else None (the step runs layer by layer from Python)."""
        cfg = self.model.cfg
        if not (prefix[0] and self.one_call and cfg.hidden_act == "silu" and cpu_kernel.blas_sgemm()):
            return None
        _, kp, vp, (seg_prefix, plen) = prefix
        layers = [(w_qkv.T, w_o.T, w_gate_up.T, w_down.T) for w_qkv, w_o, w_gate_up, w_down, _ in self._layers]
        return cpu_kernel.DecodePlan(layers, self._head, cfg.rms_norm_eps, (kp, vp, seg_prefix, plen), Ks, Vs,
                                     self._step_buffers(n), 1.0 / math.sqrt(cfg.head_dim))

    def _decode_step(self, tok, positions, step, R, prefix, Ks, Vs, plan=None):
        """One token for every row of the live segments (in one C call where `plan` is given);
        returns the next logits (S*R, V), in a buffer the next step overwrites."""
        m, cfg = self.model, self.model.cfg
        S = positions.shape[0]
        n, H, d, C = S * R, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        kernel, kp, vp, mask = prefix
        at = positions.to(self.device)
        cos, sin = (t[at] for t in self._rope)  # (S, d/2): one position per segment
        scale = 1.0 / math.sqrt(d)
        x = m.embed_tokens(tok.to(self.device))  # (S*R, C), the residual stream, updated in place
        if plan is not None:
            return plan.step(x, cos, sin, step)
        buf = self._step_buffers(n)
        if kernel:
            norm = lambda x: cpu_kernel.rms_norm(x, cfg.rms_norm_eps, out=buf["norm"])  # noqa: E731
        else:
            norm = lambda x: F.rms_norm(x.float(), (C,), eps=cfg.rms_norm_eps).to(x.dtype)  # noqa: E731
        for li, (w_qkv, w_o, w_gate_up, w_down, act_fn) in enumerate(self._layers):
            qkv = torch.mm(norm(x), w_qkv, out=buf["qkv"])
            if kernel:
                y = buf["attention"]
                seg_prefix, plen = mask
                cpu_kernel.decode_attention(qkv, cos, sin, kp[li], vp[li], seg_prefix, plen, Ks[li], Vs[li], y,
                                            step, scale)
            else:
                qkv = qkv.view(S, R, 3, H, d)
                qk = _rotate_pairs(qkv[:, :, :2], *(t[:, None, None, None] for t in (cos, sin)))  # (S, R, 2, H, d)
                q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
                Ks[li][step] = k
                Vs[li][step] = v
                ks, vs = Ks[li][: step + 1], Vs[li][: step + 1]  # (s, S, H, R, d)
                y = _attend(q, kp[li], vp[li], mask, ks, vs, scale).transpose(1, 2).reshape(n, C)
            x.addmm_(y, w_o)
            gate_up = torch.mm(norm(x), w_gate_up, out=buf["gate_up"])
            if kernel and cfg.hidden_act == "silu":
                act = cpu_kernel.silu_mul(gate_up, out=buf["act"])
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = act_fn(gate).mul_(up)
            x.addmm_(act, w_down)
        return torch.mm(norm(x), self._head.T, out=buf["logits"])

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
            out.append(TokenScores(tuple(logp[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)].tolist())))
        return out

    def exact_pass_probability(self, prompt: str, references: Sequence[str], params: SamplingParams) -> float:
        """P(one sample's text is exactly one of `references`), under the sampler's own distribution.

        Sums, over references, the product of the sampling probabilities of its tokens and of
        an ending right after it (EOS, a stop sequence as `exact_stop_endings` counts them: none
        for a reference that holds a stop, since sampling cuts it there, or max_tokens reached). Exact for this
        byte-level tokenizer; for an `Exact(strip=True)` check it is a lower bound (whitespace
        variants also pass).
        """
        total = 0.0
        for ref in dict.fromkeys(references):
            ids, stops = encode(ref), exact_stop_endings(ref, params.stop)
            if len(ids) > params.max_tokens or stops is None:  # too long, or cut at a stop inside it
                continue
            # one forward pass of prompt + reference: its tokens' probabilities and the next
            # token's (EOS, or a one-token stop); a longer stop needs a pass of its own
            probs = self._sampling_probs(prompt, ids, params)
            p_ref = float(torch.exp(torch.log(probs[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)]).sum()))
            if len(ids) == params.max_tokens:
                total += p_ref
                continue
            p_end = float(probs[-1, EOS_ID])
            for s in stops:
                sid = encode(s)
                if len(ids) + len(sid) <= params.max_tokens:
                    p_end += float(probs[-1, sid[0]]) if len(sid) == 1 else self._path_probability(
                        prompt + ref, sid, params)
            total += p_ref * p_end
        return total

    def _sampling_probs(self, prompt: str, ids: list[int], params: SamplingParams) -> torch.Tensor:
        """(len(ids) + 1, V): the sampling distribution at each of `ids` after `prompt`, and after them."""
        logits = self.token_logits(prompt, [i for i in ids if i != EOS_ID])
        n = logits.shape[0]
        return sampling_distribution(logits, torch.full((n,), params.temperature),
                                     torch.full((n,), params.top_k), torch.full((n,), params.top_p))

    def _path_probability(self, prompt: str, ids: list[int], params: SamplingParams) -> float:
        """Probability that sampling continues `prompt` with exactly the tokens `ids`."""
        probs = self._sampling_probs(prompt, ids, params)[: len(ids)]
        return float(torch.exp(torch.log(probs[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)]).sum()))


class Decoder:
    """The per-step numerics of one chunk of S segments of R rows: the distinct prompts' prefix
    caches (stacked, padded), each row's suffix cache, and the compute path (C in one call, C
    kernels, or PyTorch: `TorchSampler.kernel_path`). The scheduler (`_generate_chunk`) hands it
    the tokens drawn and, when it repacks, which old row each new row is; it holds no cache."""

    def __init__(self, sampler: TorchSampler, prefixes: list[tuple], seg_prefix: torch.Tensor, R: int, max_new: int):
        m, cfg, dev = sampler.model, sampler.model.cfg, sampler.device
        self.sampler, self.R, self.max_new, self.B = sampler, R, max_new, len(seg_prefix) * R
        self.first = [logits for _, logits in prefixes]
        self.plen_all = torch.tensor([kvs[0][0].shape[2] for kvs, _ in prefixes])
        T = int(self.plen_all.max())
        dt = self.dtype = m.embed_tokens.weight.dtype
        self.mask_all = torch.where(torch.arange(T)[None, :] < self.plen_all[:, None], 0.0,
                                    float("-inf")).to(dev, dt)[:, None, None, :]
        pad = lambda t: F.pad(t, (0, 0, 0, T - t.shape[2]))  # noqa: E731
        self.kp_all = [torch.cat([pad(p[0][li][0])[..., sampler._pairs] for p in prefixes]) for li in range(len(m.layers))]
        self.vp_all = [torch.cat([pad(p[0][li][1]) for p in prefixes]) for li in range(len(m.layers))]
        self.kernel = sampler._use_kernel()
        S, H, d = len(seg_prefix), cfg.num_attention_heads, cfg.head_dim
        if self.kernel:  # the C kernel reads each prefix in place: T padded to 16, keys transposed (P, H, d, T)
            pad16 = lambda t: F.pad(t, (0, 0, 0, -T % 16))  # noqa: E731
            self.kp_all = [pad16(k).transpose(-1, -2).contiguous() for k in self.kp_all]
            self.vp_all = [pad16(v).contiguous() for v in self.vp_all]
            # The C kernel's suffix caches, per (segment, head) the keys of all its rows for 4
            # positions (each row's block transposed), then the next 4 (values: one position at
            # a time), so a block of rows reads one run of memory per position block. Each cache
            # has two buffers: a repack gathers the rows from one into the other.
            self.half = 0
            self.Ks = [self._k_buf(li, 0, S) for li in range(len(m.layers))]
            self.Vs = [self._v_buf(li, 0, S) for li in range(len(m.layers))]
        else:  # step-major (M, S, H, R, d): a step's keys are one contiguous slab
            self.Ks = [torch.empty(max_new, S, H, R, d, device=dev, dtype=dt) for _ in m.layers]
            self.Vs = [torch.empty(max_new, S, H, R, d, device=dev, dtype=dt) for _ in m.layers]
        self._layout(seg_prefix)

    def _k_buf(self, li: int, half: int, S: int) -> torch.Tensor:
        cfg = self.sampler.model.cfg
        H, d, R, Mk = cfg.num_attention_heads, cfg.head_dim, self.R, -(-self.max_new // 4)
        return self.sampler._scratch(("k", li, half), self.B * H * Mk * d * 4)[: S * H * Mk * R * d * 4].view(
            S, H, Mk, R, d, 4)

    def _v_buf(self, li: int, half: int, S: int) -> torch.Tensor:
        cfg = self.sampler.model.cfg
        H, d, R, M = cfg.num_attention_heads, cfg.head_dim, self.R, self.max_new
        return self.sampler._scratch(("v", li, half), self.B * H * M * d)[: S * H * M * R * d].view(S, H, M, R, d)

    def _layout(self, seg_prefix: torch.Tensor) -> None:
        """What the steps attend to for this segment layout, and its one-call plan (if any)."""
        sampler = self.sampler
        self.prefix = sampler._segment_prefixes(self.kernel, seg_prefix, self.kp_all, self.vp_all, self.mask_all,
                                                self.plen_all)
        self.plen = self.plen_all[seg_prefix]
        self.plan = sampler._plan(self.prefix, self.Ks, self.Vs, len(seg_prefix) * self.R)

    def first_logits(self, seg_prefix: torch.Tensor) -> torch.Tensor:
        """The logits of every row's first token: its prompt's prefill."""
        return torch.stack([self.first[i] for i in seg_prefix.tolist()]).repeat_interleave(self.R, dim=0)

    def step(self, tok: torch.Tensor, step: int) -> torch.Tensor:
        """Feed each row its token drawn at `step`; the next logits (a buffer the next step reuses)."""
        return self.sampler._decode_step(tok, self.plen + step, step, self.R, self.prefix, self.Ks, self.Vs, self.plan)

    def repack(self, src: torch.Tensor, seg_prefix: torch.Tensor, step: int) -> None:
        """New row i continues old row src[i] (its caches up to `step` moved); segments' prompts `seg_prefix`."""
        R = self.R
        if self.kernel:
            self.half ^= 1
            S_new = len(src) // R
            self.Ks = [cpu_kernel.gather_rows(k, self._k_buf(li, self.half, S_new), src, step // 4 + 1)
                       for li, k in enumerate(self.Ks)]
            self.Vs = [cpu_kernel.gather_rows(v, self._v_buf(li, self.half, S_new), src, step + 1)
                       for li, v in enumerate(self.Vs)]
        else:
            self.Ks = [_gather_rows(k, src, R, step) for k in self.Ks]
            self.Vs = [_gather_rows(v, src, R, step) for v in self.Vs]
        self._layout(seg_prefix)


def refuse_unsupported(folder: str | Path) -> None:
    """A UserError, one line, for a checkpoint the built-in sampler would run wrongly: it
    implements tied-embedding Llama blocks with plain RoPE, one key/value head per query head,
    and the byte tokenizer (token id = byte value, 256 = EOS). Anything else goes to the
    `transformers` backend, which runs what transformers runs."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # load_checkpoint says what is wrong with the folder
    heads = cfg.get("num_attention_heads", 1)
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    why = None
    if cfg.get("model_type", "llama") != "llama":
        why = f"model_type {cfg.get('model_type')!r} (it runs Llama blocks only)"
    elif cfg.get("num_key_value_heads", heads) != heads:
        why = f"grouped-query attention ({cfg['num_key_value_heads']} key/value heads for {heads} query heads)"
    elif cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default" or \
            rope.get("rope_theta", theta) != theta:
        why = f"RoPE scaling ({cfg.get('rope_scaling') or rope})"
    elif cfg.get("head_dim", cfg.get("hidden_size", 0) // heads) * heads != cfg.get("hidden_size"):
        why = f"head_dim {cfg.get('head_dim')} x {heads} heads != hidden_size {cfg.get('hidden_size')}"
    elif cfg.get("hidden_act", "silu") not in ("silu", "gelu") or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        why = "biases or a hidden_act other than silu/gelu"
    elif cfg.get("tie_word_embeddings") is False or (cfg.get("tie_word_embeddings") is None
                                                    and _has_tensor(folder, "lm_head.weight")):
        why = "an untied LM head (lm_head.weight, tie_word_embeddings not true)"
    elif cfg.get("eos_token_id", EOS_ID) != EOS_ID or cfg.get("vocab_size", 257) < 257:
        why = f"eos_token_id {cfg.get('eos_token_id')!r} / vocab_size {cfg.get('vocab_size')!r} (byte models use 256 / 257)"
    else:
        why = _non_byte_tokenizer(folder)
    if why:
        raise UserError(f"{folder}: the built-in sampler cannot run {why}; use backend = \"transformers\" "
                        "for this model")


def _has_tensor(folder: Path, name: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return name in list(f.keys())
    except (OSError, ValueError, RuntimeError):
        return False


def _non_byte_tokenizer(folder: Path) -> str | None:
    """Why the folder's tokenizer is not the byte tokenizer (None when it is, or has none: the
    built-in sampler always encodes UTF-8 bytes)."""
    if (folder / "tokenizer.model").exists():
        return "a SentencePiece tokenizer (tokenizer.model)"
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    try:
        model = json.loads(path.read_text()).get("model") or {}
    except ValueError:
        return "an unreadable tokenizer.json"
    vocab = model.get("vocab") or {}
    if model.get("type") != "BPE" or model.get("merges") or vocab != {ch: b for b, ch in _byte_chars().items()}:
        return f"a {model.get('type', 'non-byte')} tokenizer with {len(vocab)} tokens and " \
               f"{len(model.get('merges') or [])} merges (not one token per byte)"
    return None


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for vectors whose rotated pairs sit side by side: (x0 + i x1) * (cos + i sin).
    One complex multiply in fp32/fp64, one kernel instead of rotate-half's cat, neg, muls, add."""
    if x.dtype in (torch.float32, torch.float64):
        z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


def _attend(q, kp, vp, mask, ks, vs, scale: float) -> torch.Tensor:
    """Attention of every row's query q (S, H, R, d) to its segment's shared prompt prefix kp, vp
    (S, H, T, d; `mask` hides padding) and to its own suffix ks, vs (s, S, H, R, d).

    On the CPU the prefix part runs in PyTorch's fused flash-attention kernel, which also returns
    each query's log-sum-exp, and the suffix part is merged into it by log-sum-exp weights (3x
    faster than materialising the (S, H, R, T) scores: they do not fit in cache)."""
    s_suffix = (ks * q).sum(-1) * scale  # (s, S, H, R): per-row dot products with its own cache
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        # contiguous: with a strided last dim this op returns wrong results (torch 2.13)
        o, lse = _FLASH_CPU(q, kp.contiguous(), vp.contiguous(), 0.0, False, attn_mask=mask, scale=scale)
        top = torch.maximum(lse, s_suffix.amax(0))
        wp, ws = (lse - top).exp(), (s_suffix - top).exp()
        return ((wp[..., None] * o + (ws[..., None] * vs).sum(0)) / (wp + ws.sum(0))[..., None]).to(q.dtype)
    s_prefix = q @ kp.transpose(-1, -2) * scale + mask  # (S, H, R, T)
    w = torch.cat([s_prefix, s_suffix.permute(1, 2, 3, 0)], dim=-1).softmax(dim=-1)
    T = s_prefix.shape[-1]
    return w[..., :T] @ vp + (w[..., T:].permute(3, 0, 1, 2)[..., None] * vs).sum(0)


def _repack(alive: torch.Tensor, row_prefix: torch.Tensor, counts: torch.Tensor,
            R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New row layout with the live rows of each prefix packed into ceil(count / R) segments.

    Returns `src` (the old row each new row copies, -1 for padding) and the prefix of each new
    segment.
    """
    live = torch.nonzero(alive)[:, 0]
    live = live[torch.argsort(row_prefix[live], stable=True)]
    segs = (counts + R - 1) // R
    seg_prefix = torch.repeat_interleave(torch.arange(len(counts)), segs)
    # position of each live row in the new layout: its prefix's first slot + its rank in the prefix
    first_slot = (torch.cumsum(segs, 0) - segs) * R
    start = torch.cumsum(counts, 0) - counts
    p = row_prefix[live]
    slot = first_slot[p] + torch.arange(len(live)) - start[p]
    src = torch.full((int(segs.sum()) * R,), -1, dtype=torch.long)
    src[slot] = live
    return src, seg_prefix


def _gather_rows(cache: torch.Tensor, src: torch.Tensor, R: int, step: int) -> torch.Tensor:
    """A suffix cache (M, S, H, R, d) rebuilt with row i taken from old row src[i]; only the
    first step + 1 positions are copied (the rest is written later)."""
    M, _, H, _, d = cache.shape
    S_new = len(src) // R
    out = torch.empty(M, S_new, H, R, d, dtype=cache.dtype, device=cache.device)
    src = src.to(cache.device)
    rows = cache[: step + 1, src // R, :, src % R]  # (S_new * R, step + 1, H, d)
    out[: step + 1] = rows.view(S_new, R, step + 1, H, d).permute(2, 0, 3, 1, 4)
    return out
