"""Shared-prefix attention for the transformers backend: the prompt's keys and values are read
once per prompt, not once per sample.

When n samples of one prompt decode together, a per-row KV cache holds n copies of the prompt's
keys and values, and every step reads all of them (memory traffic ∝ rows × prompt length: on a
GPT-2 of tiny-7's shape, 56% of the decoding time). Here the cache keeps each distinct prompt's
keys and values once (`new_cache`: (prompts, kv heads, positions, head dim), right-padded
to the longest prompt and masked) and only the generated tokens per row. The attention function
registered with transformers (`NAME`, through `AttentionInterface.register`) splits a step's
attention in two:

* the prompt part: the queries of all rows of one prompt (and, with grouped-query attention, of
  all query heads of one KV head) are the rows of one matrix multiplied by that prompt's keys —
  one batched product over (prompt, KV head), the prompt cache read once;
* the generated part: each row against its own generated keys (a batched product per row);

merged by log-sum-exp, so the result is softmax over the whole context, as `sdpa` computes it.

It applies to a model whose attention modules call `cache.update` and then
`ALL_ATTENTION_FUNCTIONS` (Llama, GPT-2, GPT-NeoX, Qwen, Mistral, … in transformers 5), loaded
with `sdpa` attention, without sliding windows, logit soft-capping or attention sinks (those
raise `Unsupported`). Outside a decode (`active(cache)` not set: prefills, `score`, the model's
own `generate`) the function is transformers' `sdpa_attention_forward` unchanged, with `sdpa`'s
mask. `TransformersSampler` checks it once per model against uncached forward passes before
using it, and otherwise decodes with per-row copies of the prompt cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

NAME = "passuntil_shared_prefix"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("passuntil_shared_prefix_cache", default=None)


class Unsupported(RuntimeError):
    """The model asked the attention for something the shared-prefix path does not compute."""


@contextlib.contextmanager
def active(cache):
    """Forward passes inside this block attend through `cache`'s shared prompt keys and values."""
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def install(model) -> str | None:
    """Switch `model` to the shared-prefix attention (registered once); None when done, else the
    reason it cannot be."""
    try:
        from transformers import AttentionInterface
        from transformers.cache_utils import DynamicLayer  # noqa: F401 (the cache layer's base)
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        return f"this transformers lacks {err.name or err}"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == NAME:
        return None
    if impl != "sdpa":
        return f"attention implementation {impl!r}, not sdpa"
    for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(model.config, key, None):
            return f"{key} in its config"
    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError) as err:
        return f"set_attn_implementation: {str(err).splitlines()[0]}"
    return None


def uninstall(model) -> None:
    """Back to sdpa (after a failed check)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")


# PyTorch's fused CPU attention, which returns each query's log-sum-exp too (None where this torch
# lacks it or its mask argument)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _FLASH_CPU is not None and "attn_mask" not in str(_FLASH_CPU.default._schema):
    _FLASH_CPU = None
BLOCK = 16  # the generated part's buffers grow by this many positions


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """transformers' attention-function signature; query (B, heads, 1, D), key and value the
    rows' generated keys and values (B, kv heads, s, D) as the cache layer's `update` returns
    them; returns ((B, 1, heads, D), None) as `sdpa_attention_forward` does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = _ACTIVE.get()
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None \
            or getattr(module, "sinks", None) is not None or kwargs.get("position_bias") is not None:
        raise Unsupported("sliding window, soft-capping, sinks or a position bias")
    if query.shape[2] != 1:
        raise Unsupported(f"{query.shape[2]} query positions per row in a decoding step")
    layer = cache.layers[getattr(module, "layer_idx", -1)]
    if not isinstance(layer, _layer_class()) or key.shape[0] != query.shape[0] or key.shape[2] != layer.length:
        raise Unsupported("the keys given are not the shared-prefix cache layer's")
    B, H, _, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    g = H // Hkv
    P, G = cache.prompts, cache.group
    scale = scaling if scaling is not None else D ** -0.5
    q = query.reshape(B, Hkv, g, D).float()  # query head kv*g + i uses KV head kv (repeat_kv's order)
    qs = q * scale

    # the prompt part: one (G g, D) x (D, T) product per (prompt, KV head), the prompt read once
    kp, vp, mask = layer.prefix_keys, layer.prefix_values, cache.prefix_mask
    if cache.buckets is None:  # every prompt has G rows: the rows are the (P, G) grid
        part1 = _prompt_part(q, kp, vp, mask, P, G, scale)
    else:  # prompts with about as many rows (up to 2x) share a padded grid; its cells gather rows
        qx = torch.cat([q, q.new_zeros(1, Hkv, g, D)])
        part1 = q.new_empty(B + 1, Hkv, g, Dv + 1)
        for sel, Pb, Gb, gather in cache.buckets:
            part1[gather] = _prompt_part(qx[gather], kp if sel is None else kp[sel], vp if sel is None else vp[sel],
                                         mask if mask is None or sel is None else mask[sel], Pb, Gb, scale)
        part1 = part1[:B]  # the last row took the empty cells
    o1, lse1 = part1[..., :Dv], part1[..., Dv:]

    # the generated part: each row against its own keys, over the whole contiguous buffer (the
    # positions not yet written masked out: a strided slice would be copied by every product)
    s2 = qs @ layer.key_buffer.float().transpose(-1, -2)  # (B, Hkv, g, capacity)
    s2[..., layer.length:] = float("-inf")
    top = torch.maximum(lse1, s2.amax(-1, keepdim=True))
    w1, e2 = (lse1 - top).exp_(), (s2 - top).exp_()
    out = (w1 * o1 + e2 @ layer.value_buffer.float()) / (w1 + e2.sum(-1, keepdim=True))
    return out.reshape(B, 1, H, Dv).to(query.dtype), None


def _prompt_part(q, kp, vp, mask, P: int, G: int, scale: float):
    """Attention of P x G query rows (B', kv heads, g, D), prompt-major, to their P prompts'
    keys and values (P, kv heads, T, D): (P G, kv heads, g, Dv + 1), the output and its
    log-sum-exp."""
    _, Hkv, g, D = q.shape
    Dv = vp.shape[-1]
    Q = q.view(P, G, Hkv, g, D).transpose(1, 2).reshape(P, Hkv, G * g, D)
    if Q.device.type == "cpu" and _FLASH_CPU is not None:
        o, lse = _FLASH_CPU(Q, kp, vp, 0.0, False, attn_mask=mask, scale=scale)
    else:
        s = Q @ kp.transpose(-1, -2) * scale + (mask if mask is not None else 0.0)
        lse = s.logsumexp(-1)
        o = (s - lse[..., None]).exp_() @ vp
    part = torch.cat([o, lse[..., None]], -1).view(P, Hkv, G, g, Dv + 1).transpose(1, 2)
    return part.reshape(P * G, Hkv, g, Dv + 1)


@functools.cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class Layer(DynamicLayer):
        """One layer's cache: each prompt's keys and values once (P, kv heads, T, D), float32,
        and each row's generated keys and values in contiguous buffers (B, kv heads, capacity,
        D) that grow by `BLOCK` positions. `update` writes the step's key and value in place and
        returns views of the rows' generated part. Its length is T + the steps so far, so masks
        and positions are those of a per-row cache left-padded to T."""

        def __init__(self, keys, values, rows: int):
            super().__init__()
            P, Hkv, T, D = keys.shape
            self.prefix_keys, self.prefix_values = keys.float().contiguous(), values.float().contiguous()
            self.key_buffer = keys.new_zeros(rows, Hkv, BLOCK, D)
            self.value_buffer = values.new_zeros(rows, values.shape[1], BLOCK, values.shape[-1])
            self.device, self.is_initialized, self.length, self._T = keys.device, True, 0, T
            self._views()

        def _views(self):
            self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

        def get_seq_length(self) -> int:
            return self._T + self.length

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.length + n > self.key_buffer.shape[2]:
                room = -(-(self.length + n) // BLOCK) * BLOCK
                self.key_buffer, self.value_buffer = (self._moved(t, None, room)
                                                      for t in (self.key_buffer, self.value_buffer))
            self.key_buffer[:, :, self.length: self.length + n] = key_states
            self.value_buffer[:, :, self.length: self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def _moved(self, t, rows, room: int):
            """`t`'s filled positions (of these rows) in a new buffer of `room` positions, the rest
            zero (a masked position's weight is exactly 0, and 0 x NaN would not be)."""
            out = t.new_empty(len(rows) if rows is not None else t.shape[0], t.shape[1], room, t.shape[-1])
            out[:, :, : self.length] = t[:, :, : self.length] if rows is None else t[rows, :, : self.length]
            out[:, :, self.length:] = 0
            return out

        def select(self, rows, prompts):
            """Keep these rows (their generated part copied into new buffers) and these prompts."""
            room = self.key_buffer.shape[2]
            self.key_buffer, self.value_buffer = (self._moved(t, rows, room) for t in (self.key_buffer, self.value_buffer))
            if prompts is not None:
                self.prefix_keys, self.prefix_values = self.prefix_keys[prompts], self.prefix_values[prompts]
            self._views()

    return Layer


def new_cache(prefixes: list[list[tuple]], src: list[int]):
    """A cache for rows whose prompt is `src[row]` (non-decreasing: the rows of a prompt are
    contiguous), from each prompt's prefill cache `prefixes[p]` = [(keys, values) per layer],
    each (1, kv heads, its length, D)."""
    from transformers import DynamicCache

    T = max(p[0][0].shape[2] for p in prefixes)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[2]))  # noqa: E731
    layer = _layer_class()
    cache = DynamicCache()
    cache.layers = [layer(torch.cat([pad(p[li][0]) for p in prefixes]), torch.cat([pad(p[li][1]) for p in prefixes]),
                          len(src)) for li in range(len(prefixes[0]))]
    dev = prefixes[0][0][0].device
    cache.prefix_lengths = torch.tensor([p[0][0].shape[2] for p in prefixes], device=dev)
    _set_rows(cache, torch.tensor(src, device=dev))
    cache.batch_select_indices = functools.partial(_select, cache)
    return cache


def _set_rows(cache, src) -> None:
    """The layout of rows by prompt: P prompts, G the most rows of one. Unless all prompts have G
    rows, prompts are put in buckets of about equal row counts (those with 2^(k-1) < count <= 2^k
    together), each bucket a padded (prompts x its largest count) grid whose cells `gather` their
    rows (B, one past the last row, for an empty cell): so a prompt with one row beside one with
    a thousand costs one cell, not a thousand."""
    counts = torch.bincount(src, minlength=len(cache.prefix_lengths)).tolist()
    P, G, B = len(counts), max(counts), len(src)
    dev = src.device
    cache.src, cache.prompts, cache.group = src, P, G
    T = cache.layers[0].prefix_keys.shape[2]
    full = bool((cache.prefix_lengths == T).all())
    cache.prefix_mask = None if full else torch.where(torch.arange(T, device=dev)[None, :] < cache.prefix_lengths[:, None],
                                                      0.0, float("-inf"))[:, None, None, :]
    cache.buckets = None
    if any(c != G for c in counts):
        start = [0] * P
        for p in range(1, P):
            start[p] = start[p - 1] + counts[p - 1]
        groups: dict[int, list[int]] = {}
        for p, c in enumerate(counts):
            groups.setdefault((c - 1).bit_length(), []).append(p)
        cache.buckets = []
        for ps in groups.values():
            Gb = max(counts[p] for p in ps)
            first = torch.tensor([start[p] for p in ps], device=dev)[:, None]
            n = torch.tensor([counts[p] for p in ps], device=dev)[:, None]
            r = torch.arange(Gb, device=dev)[None, :]
            gather = torch.where(r < n, first + r, B).reshape(-1)
            sel = None if len(ps) == P else torch.tensor(ps, device=dev)
            cache.buckets.append((sel, len(ps), Gb, gather))


def _select(cache, indices) -> None:
    """Keep these rows (in this order, which keeps each prompt's rows contiguous); prompts with
    no row left are dropped from the prefix."""
    src = cache.src[indices]
    present = torch.unique(src)
    prompts = None
    if len(present) < cache.prompts:
        prompts = present
        remap = torch.full((cache.prompts,), -1, dtype=torch.long, device=src.device)
        remap[present] = torch.arange(len(present), device=src.device)
        src = remap[src]
        cache.prefix_lengths = cache.prefix_lengths[present]
    for layer in cache.layers:
        layer.select(indices, prompts)
    _set_rows(cache, src)
