"""Shared-prefix attention for the transformers backend: the prompt's keys and values are read
once per prompt, not once per sample.

When n samples of one prompt decode together, a per-row KV cache holds n copies of the prompt's
keys and values, and every step reads all of them (memory traffic ∝ rows × prompt length: on a
GPT-2 of tiny-7's shape, 56% of the decoding time). Here the cache keeps each distinct prompt's
keys and values once (`new_cache`: (prompts, kv heads, positions, head dim), right-padded
to the longest prompt and masked) and only the generated tokens per row. The attention function
registered with transformers (`NAME`, through `AttentionInterface.register`) computes a step's
attention over the row's prompt and its own generated tokens, the softmax over the whole context
that `sdpa` computes:

* on a CPU in float32, with head sizes that are multiples of 16: in one compiled call per layer
  (`hf_attention_kernel.c`, built on first use as the built-in sampler's kernels are), which
  writes the step's key and value into the row's buffers and, per (KV head, block of 8 query
  vectors of one prompt), scores the prompt's keys (kept in L1 for all its blocks) and the rows'
  own keys, takes the softmax and the weighted values in one pass. The rows' buffers reserve the
  whole decode up front, rows that leave are moved up in place, and a decode reuses the last
  one's buffers (`reuse`): fresh memory costs a page fault per 4 KiB on first write;
* otherwise in PyTorch, in two parts merged by log-sum-exp: the prompt part, where the queries
  of all rows of one prompt (and, with grouped-query attention, of all query heads of one KV
  head) are the rows of one matrix multiplied by that prompt's keys, one batched product over
  (prompt, KV head), the prompt cache read once; and the generated part, each row against its
  own generated keys (a batched product per row).

Inside a decode the registered mask function builds no mask (`_mask`): the attention masks by
each prompt's length and the step count itself.

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
import ctypes
import functools
import os
import sys
from pathlib import Path

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
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
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
    AttentionMaskInterface.register(NAME, _mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError) as err:
        return f"set_attn_implementation: {str(err).splitlines()[0]}"
    return None


def _mask(*args, **kwargs):
    """The mask function registered with the attention: none inside a decode (the shared-prefix
    attention masks by each prompt's length and the rows' step count, and building a (rows x
    context) mask every step was wasted), `sdpa`'s outside."""
    if _ACTIVE.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


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
KERNEL_SOURCE = Path(__file__).with_name("hf_attention_kernel.c")
USE_KERNEL = True  # the compiled one-pass attention on CPU float32 where it builds (tests switch it off)


@functools.cache
def _kernel() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled one-pass attention, "") or (None, why not). Built as the built-in sampler's
    kernels are (`cpu_kernel`: the same flags and cache directory, keyed by source, compiler and
    CPU; off with PASSUNTIL_NO_KERNEL=1)."""
    from passuntil.backends import cpu_kernel

    dll, why = cpu_kernel.compile_library(KERNEL_SOURCE, "hf_attention")
    if dll is None:
        return None, why
    dll.shared_prefix_attention.restype = ctypes.c_int
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    dll.shared_prefix_attention.argtypes = [ptr, i64, i64] * 3 + [ptr] * 7 + [i64] * 8 + [ctypes.c_float, i64]
    dll.compact_rows.restype = ctypes.c_int
    dll.compact_rows.argtypes = [ptr, ptr] + [i64] * 4
    return dll, ""


def kernel_path(model) -> str:
    """Which attention a decode of `model` runs, as its sampler note and fingerprint say:
    "compiled one-pass" or "pytorch (why not)". Says on stderr, once per process, when a CPU
    float32 model falls back because the kernel cannot be built (not when PASSUNTIL_NO_KERNEL=1
    asked for it)."""
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"pytorch ({model.device.type}, {str(model.dtype).removeprefix('torch.')})"
    if head % 16:
        return f"pytorch (head size {head}, not a multiple of 16)"
    if not USE_KERNEL:
        return "pytorch (switched off)"
    lib, why = _kernel()
    if lib is not None:
        return "compiled one-pass"
    if os.environ.get("PASSUNTIL_NO_KERNEL") != "1" and not _said:
        _said.append(why)
        print(f"passuntil: the transformers sampler's attention runs in PyTorch ({why}), "
              "not its compiled kernel", file=sys.stderr)
    return f"pytorch ({why})"


_said: list[str] = []


def _kernel_fits(keys, values) -> bool:
    """Whether the compiled attention takes this layer: on, built, CPU, float32, head sizes of 16k."""
    return (USE_KERNEL and keys.device.type == "cpu" and keys.dtype == values.dtype == torch.float32
            and keys.shape[-1] % 16 == 0 and values.shape[-1] % 16 == 0 and _kernel()[0] is not None)


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
    if layer.kernel:
        return _kernel_attention(cache, layer, _lastdim(query), H, Hkv, D, Dv, scale), None
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


def _lastdim(t):
    """`t` as float32 with its last dimension contiguous (the compiled kernel's strides)."""
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()


def _kernel_attention(cache, layer, query, H: int, Hkv: int, D: int, Dv: int, scale: float):
    """The compiled one-pass attention (hf_attention_kernel.c): writes the step's pending key and
    value into the layer's buffers, then every (row, query head) attends to its prompt and its
    own generated tokens; (B, 1, heads, Dv)."""
    B = query.shape[0]
    if layer.pending is None:
        raise Unsupported("an attention call without the cache update before it")
    k, v = layer.pending
    layer.pending = None
    out = query.new_empty(B, 1, H, Dv)
    with torch.profiler.record_function("passuntil::shared_prefix_attention"):  # named in profiles
        failed = _kernel()[0].shared_prefix_attention(
            query.data_ptr(), query.stride(0), query.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
            v.data_ptr(), v.stride(0), v.stride(1), layer.prefix_keys_t.data_ptr(), layer.prefix_values.data_ptr(),
            cache.prefix_lengths.data_ptr(), cache.src.data_ptr(), layer.key_buffer.data_ptr(),
            layer.value_buffer.data_ptr(), out.data_ptr(), B, H, Hkv, D, Dv, layer.prefix_values.shape[2],
            layer.value_buffer.shape[2], layer.length, scale, torch.get_num_threads())
    if failed:
        raise Unsupported("the compiled attention refused these sizes")
    return out


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
        and positions are those of a per-row cache left-padded to T.

        For the compiled attention (`kernel`): the prompt's keys transposed (P, kv heads, D, T)
        and its values (P, kv heads, T, Dv), T padded with zeros to a multiple of 16; each row's
        generated keys in blocks of 16 positions, each block transposed (B, kv heads, capacity /
        16, D, 16), so that a row's keys are one run of memory read in order, and its values (B,
        kv heads, capacity, Dv); room for the whole decode from the start. `update` leaves the
        step's key and value pending for the kernel to write, and returns stand-ins of the right
        shapes (nothing else reads them)."""

        def __init__(self, keys, values, rows: int, capacity: int = BLOCK, spare=None):
            super().__init__()
            P, Hkv, T, D = keys.shape
            Dv = values.shape[-1]
            self.kernel = _kernel_fits(keys, values)
            if self.kernel:
                Tp, room = -(-T // 16) * 16, -(-max(capacity, 1) // BLOCK) * BLOCK
                self.prefix_keys_t = keys.new_zeros(P, Hkv, D, Tp)
                self.prefix_keys_t[..., :T] = keys.transpose(-1, -2)
                self.prefix_values = values.new_zeros(P, Hkv, Tp, Dv)
                self.prefix_values[:, :, :T] = values
                k, v = spare if spare is not None else (None, None)
                if k is None or k.shape[0] < rows or k.shape[1:] != (Hkv, k.shape[2], D, 16) \
                        or 16 * k.shape[2] < room or v.shape[1:] != (Hkv, 16 * k.shape[2], Dv):
                    k, v = keys.new_empty(rows, Hkv, room // 16, D, 16), values.new_empty(rows, Hkv, room, Dv)
                self.spare = (k, v)  # the whole buffers (a later decode may reuse them: `new_cache`)
                self.key_buffer, self.value_buffer = k[:rows], v[:rows]
                self._stand_in = keys.new_empty(1, 1, 1, 1)
            else:
                self.prefix_keys, self.prefix_values = keys.float().contiguous(), values.float().contiguous()
                self.key_buffer = keys.new_zeros(rows, Hkv, BLOCK, D)
                self.value_buffer = values.new_zeros(rows, Hkv, BLOCK, Dv)
            self.pending = None  # kernel: the step's key and value, written by the kernel itself
            self.device, self.is_initialized, self.length, self._T = keys.device, True, 0, T
            self._views()

        def _views(self):
            if self.kernel:
                B, Hkv, _, D, _ = self.key_buffer.shape
                self.keys = self._stand_in.expand(B, Hkv, self.length, D)
            else:
                self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def get_seq_length(self) -> int:
            return self._T + self.length

        def update(self, key_states, value_states, *args, **kwargs):
            self._flush()
            n = key_states.shape[-2]
            if self.length + n > self.value_buffer.shape[2]:
                self._resize(None, -(-(self.length + n) // BLOCK) * BLOCK)
            if self.kernel and n == 1:
                self.pending = (_lastdim(key_states), _lastdim(value_states))
            elif self.kernel:
                self._write_kernel_keys(key_states, self.length)
                self.value_buffer[:, :, self.length: self.length + n] = value_states
            else:
                self.key_buffer[:, :, self.length: self.length + n] = key_states
                self.value_buffer[:, :, self.length: self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def _write_kernel_keys(self, key_states, start: int):
            for i in range(key_states.shape[-2]):
                p = start + i
                self.key_buffer[:, :, p // 16, :, p % 16] = key_states[:, :, i]

        def _flush(self):
            """Write a pending key and value (an update that no attention call followed)."""
            if self.pending is not None:
                k, v = self.pending
                self.pending = None
                self._write_kernel_keys(k, self.length - 1)
                self.value_buffer[:, :, self.length - 1: self.length] = v

        def _compact(self, rows) -> bool:
            """Rows `rows` (strictly increasing) moved to the front of the kernel's buffers."""
            rows = rows.to(torch.int64).contiguous()
            k, v = self.key_buffer, self.value_buffer
            if rows.device.type != "cpu" or not (k.is_contiguous() and v.is_contiguous()) \
                    or not len(rows) or int(rows[-1]) >= k.shape[0]:  # (rows increase: the last is the largest)
                return False
            lib, n, Hkv = _kernel()[0], len(rows), k.shape[1]
            if lib.compact_rows(k.data_ptr(), rows.data_ptr(), n, Hkv, k[0, 0].numel(), -(-self.length // 16) * k[0, 0, 0].numel()):
                return False
            lib.compact_rows(v.data_ptr(), rows.data_ptr(), n, Hkv, v[0, 0].numel(), self.length * v.shape[-1])
            self.key_buffer, self.value_buffer = k[:n], v[:n]
            return True

        def _resize(self, rows, room: int):
            """The buffers with `room` positions (of these rows, if given), the filled part
            copied; past it zeros for PyTorch's products (a masked position's weight is exactly 0,
            and 0 x NaN would not be), left as is for the kernel (it reads only what is filled)."""
            def moved(t, filled: int, size: int):
                out = t.new_empty(len(rows) if rows is not None else t.shape[0], t.shape[1], size, *t.shape[3:])
                part = t[:, :, :filled]
                out[:, :, :filled] = part if rows is None else part[rows]
                if not self.kernel:
                    out[:, :, filled:] = 0
                return out

            blocks = -(-self.length // 16) if self.kernel else self.length  # keys: blocks of 16 for the kernel
            self.key_buffer = moved(self.key_buffer, blocks, room // 16 if self.kernel else room)
            self.value_buffer = moved(self.value_buffer, self.length, room)
            if self.kernel:
                self.spare = (self.key_buffer, self.value_buffer)

        def select(self, rows, prompts):
            """Keep these rows and these prompts: for the kernel the rows moved up in place
            (`compact_rows`, when `rows` increase, as the sampler's do), else copied into new
            buffers."""
            self._flush()
            if not (self.kernel and self._compact(rows)):
                self._resize(rows, self.value_buffer.shape[2])
            if prompts is not None:
                if self.kernel:
                    self.prefix_keys_t = self.prefix_keys_t[prompts]
                else:
                    self.prefix_keys = self.prefix_keys[prompts]
                self.prefix_values = self.prefix_values[prompts]
            self._views()

    return Layer


def new_cache(prefixes: list[list[tuple]], src: list[int], capacity: int = BLOCK, reuse=None):
    """A cache for rows whose prompt is `src[row]` (non-decreasing: the rows of a prompt are
    contiguous), from each prompt's prefill cache `prefixes[p]` = [(keys, values) per layer],
    each (1, kv heads, its length, D). The compiled kernel's buffers reserve `capacity` generated
    positions at once (the PyTorch path's grow by `BLOCK`: its products read the whole buffer),
    in the buffers of `reuse` (an earlier cache, done with) where they are large enough: fresh
    buffers cost a page fault per 4 KiB on first write, for every decode."""
    from transformers import DynamicCache

    T = max(p[0][0].shape[2] for p in prefixes)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[2]))  # noqa: E731
    layer = _layer_class()
    cache = DynamicCache()
    cache.layers = [layer(torch.cat([pad(p[li][0]) for p in prefixes]), torch.cat([pad(p[li][1]) for p in prefixes]),
                          len(src), capacity, _spare(reuse, li))
                    for li in range(len(prefixes[0]))]
    dev = prefixes[0][0][0].device
    # int64: the compiled kernel reads both as int64_t (numpy's int32 `src` would be misread)
    cache.prefix_lengths = torch.tensor([p[0][0].shape[2] for p in prefixes], dtype=torch.int64, device=dev)
    _set_rows(cache, torch.tensor(src, dtype=torch.int64, device=dev))
    cache.batch_select_indices = functools.partial(_select, cache)
    return cache


def _spare(cache, li: int):
    """Layer li's kernel buffers in an earlier cache (None if it has none)."""
    layers = getattr(cache, "layers", None) or []
    return getattr(layers[li], "spare", None) if li < len(layers) else None


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
    T = cache.layers[0]._T
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
