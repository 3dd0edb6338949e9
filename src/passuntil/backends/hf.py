"""The `transformers` backend: any local causal-LM folder through `AutoModelForCausalLM`.

For checkpoints the built-in sampler does not run (another architecture, grouped-query
attention, RoPE scaling, an untied head, a BPE or SentencePiece tokenizer). It decodes as the
built-in sampler does, through the model's own forward pass:

* each distinct prompt of a call is prefilled once (batch 1), and all its samples attend to that
  one copy of its keys and values: `hf_attention` registers an attention function with
  transformers that reads each prompt's cache once per step for all its rows and each row's own
  generated tokens (on a CPU in float32 one compiled pass per layer, else two PyTorch parts
  merged by log-sum-exp; `attention_path` says "shared prompt cache" for both).
  It is checked once per model against uncached forward passes; a model it does not fit (not
  `sdpa`, sliding windows, soft-capping, its own attention code, or a failed check) decodes with
  the prompt cache copied into each row instead, left-padded to the chunk's longest prompt
  (`attention_path` "per-row prompt copies (why)"). Either way masks and positions are explicit,
  so prompts of any length decode together;
* a row leaves the batch the step it emits an end-of-sequence token, completes a stop sequence
  or reaches max_tokens (its cache rows are dropped with it);
* sample j of a request is draw `first_sample + j` of the stream named by `seed`: the token at
  step t is the inverse CDF of the sampling distribution (`sampling_distribution`, the built-in
  sampler's) at a uniform that is a hash of (seed, first_sample + j, t) (passuntil.seeding). So
  a sample's text does not depend on the batch size, the chunking or what else is decoded with
  it (up to float rounding at a CDF boundary), and on a bundled checkpoint it is, to the same
  rounding, the text the built-in sampler draws.

Stop sequences are checked while decoding: a row's text is decoded again only when the new
token's own text holds the last character of one of its stops (or a partial UTF-8 character,
for a stop ending in a non-ASCII one: `_stop_triggers`, a table over the vocabulary per set of
stops, so a step's Python work is only for the rows that end or may have stopped), then cut at
the first stop, as `truncate_at_stop` cuts it. `score` splits prompt and continuation as
lm-eval's `_encode_pair` does: trailing whitespace of the prompt moves to the continuation, the
continuation's tokens are those of the whole text past the prompt's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import numpy as np

from passuntil.backends import hf_attention
from passuntil.backends.base import (
    Completion,
    SamplingParams,
    TokenScores,
    exact_stop_endings,
    truncate_at_stop,
)
from passuntil.errors import UserError
from passuntil.seeding import row_keys, step_uniforms

SHARED = "shared prompt cache"  # `attention_path`: the prompt's keys and values read once per prompt
COPIES = "per-row prompt copies"


class TransformersSampler:
    """Sampler over a transformers causal LM (see module docstring). `chunk` bounds the rows
    decoded together; fewer when their KV caches would pass `cache_bytes` (2 GiB on a CPU, a
    quarter of the device's memory on a GPU). `share_prompt=False` decodes with per-row prompt
    copies even where the shared prompt cache applies (to compare the two)."""

    def __init__(self, path: str, *, name: str | None = None, device: str = "cpu",
                 dtype: str = "float32", chunk: int = 1024, cache_bytes: int | None = None,
                 share_prompt: bool = True):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise UserError(f"the transformers backend needs `pip install transformers` ({err})") from None
        self.torch = torch
        self.name = name or path
        self.device = device
        self.chunk = chunk
        self.share_prompt = share_prompt
        self.warnings: list[str] = []  # stored with the run (runner.py): the attention path used
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load {path} with transformers: {str(err).splitlines()[0]}") from None
        cfg, gen = self.model.config, self.model.generation_config
        eos = [gen.eos_token_id, cfg.eos_token_id, self.tokenizer.eos_token_id]
        self.eos = sorted({e for x in eos if x is not None for e in (x if isinstance(x, list) else [x])})
        if not self.eos:
            raise UserError(f"{path}: no eos_token_id in its config or tokenizer")
        self.bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos[0]
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        accepts = inspect.signature(self.model.forward).parameters
        self._positions = "position_ids" in accepts
        self._cache_arg = "cache" if "cache" in accepts else "past_key_values"  # renamed in transformers 5.2x
        if cache_bytes is None:
            on_cpu = torch.device(device).type == "cpu"
            cache_bytes = 2 << 30 if on_cpu else torch.cuda.get_device_properties(device).total_memory // 4
        self.cache_bytes = cache_bytes
        self._pieces: list[str] | None = None
        self.row_steps = 0  # rows x decoding steps computed

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        """The prompt's tokens, the oldest cut so that max_tokens more fit the context; an empty
        prompt is the BOS (or EOS) token, as lm-eval conditions on nothing."""
        ids = self._ids(prompt) or [self.bos]
        if self.context and len(ids) > self.context - max_tokens:
            ids = ids[len(ids) - max(1, self.context - max_tokens):]
        return ids

    # generation -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[list[Completion]]:
        """Rows are decoded in chunks of at most `chunk` rows (fewer where their caches would pass
        `cache_bytes`), requests in order of prompt length. With per-row prompt copies a chunk is
        also cut where the next prompt is over twice (+16 tokens) the chunk's shortest, since every
        row then attends over the chunk's longest prompt (left padding); with the shared prompt
        cache a row holds only its generated tokens."""
        out: list[list[Completion | None]] = [[None] * sp.n for sp in params]
        ids = {r: self._prompt_ids(p, sp.max_tokens) for r, (p, sp) in enumerate(zip(prompts, params, strict=True))}
        if not ids:
            return out  # type: ignore[return-value]
        shared = self.attention_path == SHARED
        longest = max(sp.max_tokens for sp in params) + (0 if shared else max(len(i) for i in ids.values()))
        per_row = max(1, self._kv_bytes_per_token() * longest * 2)  # x2: the copy a repack makes
        size = max(1, min(self.chunk, self.cache_bytes // per_row))
        rows: list[tuple[int, int]] = []
        for r in sorted(ids, key=lambda r: len(ids[r])):
            if rows and not shared and len(ids[r]) > 2 * len(ids[rows[0][0]]) + 16:
                self._decode(rows, ids, params, out)
                rows = []
            for j in range(params[r].n):
                rows.append((r, j))
                if len(rows) == size:
                    self._decode(rows, ids, params, out)
                    rows = []
        if rows:
            self._decode(rows, ids, params, out)
        return out  # type: ignore[return-value]

    def _kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes in this model (measured once on a one-token prefill)."""
        if not hasattr(self, "_kv_per_token"):
            with self.torch.inference_mode():
                cache = _cache_of(self.model(input_ids=self.torch.tensor([[self.bos]], device=self.device),
                                             attention_mask=self.torch.ones(1, 1, dtype=self.torch.long,
                                                                            device=self.device), use_cache=True))
            self._kv_per_token = sum(t.numel() * t.element_size() for k, v in _layers(cache) for t in (k, v))
        return self._kv_per_token

    def _decode(self, rows: list[tuple[int, int]], ids: dict[int, list[int]], params, out) -> None:
        """Decode one chunk of rows (request, sample index) to its end; results into `out`."""
        torch = self.torch
        from passuntil.backends.torch_backend import sampling_distribution

        dev = self.device
        shared = self.attention_path == SHARED
        with torch.inference_mode():
            requests = list(dict.fromkeys(r for r, _ in rows))
            distinct = list(dict.fromkeys(tuple(ids[r]) for r in requests))
            which = {r: distinct.index(tuple(ids[r])) for r in requests}
            rows = sorted(rows, key=lambda row: which[row[0]])  # a prompt's rows together
            src = [which[r] for r, _ in rows]
            max_new = max(params[r].max_tokens for r in requests)
            caches, first = zip(*(self._prefill(p) for p in distinct), strict=True)
            cache = self._row_cache(list(caches), src, max_new, shared)
            T = max(len(p) for p in distinct)
            plen = torch.tensor([len(distinct[i]) for i in src], device=dev)
            mask = (torch.arange(T, device=dev)[None, :] >= (T - plen)[:, None]).long()
            logits = torch.stack(first)[torch.tensor(src, device=dev)]
            sp = [params[r] for r, _ in rows]
            keys = np.empty(len(rows), dtype=np.uint64)  # each row's draw stream, one call per request
            at: dict[int, list[int]] = {}
            for b, (r, _) in enumerate(rows):
                at.setdefault(r, []).append(b)
            for r, bs in at.items():
                keys[bs] = row_keys(params[r].seed or 0, params[r].first_sample + np.array([rows[b][1] for b in bs]))
            col = lambda f, dt: torch.tensor([f(s) for s in sp], dtype=dt, device=dev)  # noqa: E731
            temp, topk, topp = col(lambda s: s.temperature, torch.float32), col(lambda s: s.top_k, torch.long), \
                col(lambda s: s.top_p, torch.float32)
            filtered = (topk > 0) | (topp < 1) | (temp <= 0)
            steps = max(s.max_tokens for s in sp)
            live = np.arange(len(rows))  # the chunk's row of each batch row (-1: finished, not yet repacked away)
            tokens = np.zeros((len(rows), steps), dtype=np.int64)  # a live row has one token per step so far
            max_tokens = np.array([s.max_tokens for s in sp])
            stop_sets = list(dict.fromkeys(tuple(s.stop) for s in sp))
            stop_set = np.array([stop_sets.index(tuple(s.stop)) for s in sp])
            eos = torch.tensor(self.eos, device=dev)
            with hf_attention.active(cache) if shared else contextlib.nullcontext():
                for step in range(steps):
                    tok = self._draw(logits, temp, topk, topp, filtered, keys, step, sampling_distribution)
                    if step == 0:
                        triggers = np.stack([self._stop_triggers(st, logits.shape[-1]) for st in stop_sets])
                    drawn, ended = tok.cpu().numpy(), torch.isin(tok, eos).cpu().numpy()
                    at = np.flatnonzero(live >= 0)  # batch rows still decoding
                    i, t, end = live[at], drawn[at], ended[at]
                    tokens[i, step] = t  # an end token is written here but not counted
                    maybe_stop = triggers[stop_set[i], t]
                    full = step + 1 >= max_tokens[i]
                    for b in np.flatnonzero(end | maybe_stop | full).tolist():
                        r = int(i[b])
                        if end[b]:
                            self._finish(out, rows[r], tokens[r, :step].tolist(), "stop", sp[r].stop)
                        elif maybe_stop[b] and self._holds_stop(tokens[r, : step + 1].tolist(), sp[r].stop):
                            self._finish(out, rows[r], tokens[r, : step + 1].tolist(), "stop", sp[r].stop)
                        elif full[b]:
                            self._finish(out, rows[r], tokens[r, : step + 1].tolist(), "length", sp[r].stop)
                        else:
                            continue
                        live[at[b]] = -1
                    keep = np.flatnonzero(live >= 0)
                    if not len(keep):
                        return
                    if 4 * len(keep) <= 3 * len(live):  # finished rows leave the batch, with their cache rows
                        idx = torch.from_numpy(keep).to(dev)
                        cache.batch_select_indices(idx)
                        live = live[keep]
                        mask, plen, tok, temp, topk, topp, filtered = (
                            t[idx] for t in (mask, plen, tok, temp, topk, topp, filtered))
                        keys = keys[keep]
                    mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                    logits = self._step(cache, tok, mask, plen + step)
                    self.row_steps += len(live)

    def _prefill(self, prompt: Sequence[int]) -> tuple[list[tuple], object]:
        """One prompt alone (batch 1): its (keys, values) per layer and its last logits."""
        torch = self.torch
        o = self.model(input_ids=torch.tensor([list(prompt)], device=self.device),
                       attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=self.device), use_cache=True)
        return _layers(_cache_of(o)), o.logits[0, -1].float()

    def _row_cache(self, caches: list[list[tuple]], src: list[int], max_new: int, shared: bool):
        """The decoding cache of rows whose prompt is `caches[src[row]]`: shared prompt keys and
        values (`hf_attention`), or each row's own copy, left-padded to the longest prompt."""
        torch = self.torch
        if shared:
            # the last decode's buffers, reused: a fresh one costs a page fault per 4 KiB written
            self._spare = hf_attention.new_cache(caches, src, max_new, reuse=getattr(self, "_spare", None))
            return self._spare
        from transformers import DynamicCache

        T = max(c[0][0].shape[2] for c in caches)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, T - t.shape[2], 0))  # noqa: E731
        idx = torch.tensor(src, device=self.device)
        return _new_cache(DynamicCache, [(torch.cat([pad(c[li][0]) for c in caches])[idx],
                                          torch.cat([pad(c[li][1]) for c in caches])[idx])
                                         for li in range(len(caches[0]))], T + max_new)

    def _step(self, cache, tok, mask, positions):
        """One decoding step of every row: the next token's logits (float32)."""
        kwargs = {"position_ids": positions[:, None]} if self._positions else {}
        kwargs[self._cache_arg] = cache
        return self.model(input_ids=tok[:, None], attention_mask=mask, use_cache=True, **kwargs).logits[:, -1].float()

    @functools.cached_property
    def attention_path(self) -> str:
        """`SHARED` when the model runs with the shared-prefix attention and it passed its check
        (`_check_shared`), else the per-row copy path with the reason."""
        if not self.share_prompt:
            return f"{COPIES} (share_prompt=False)"
        reason = hf_attention.install(self.model)
        if reason is None:
            try:
                error = self._check_shared()
                reason = None if error <= (1e-4 if self.model.dtype == self.torch.float32 else 2e-2) \
                    else f"its check differs from uncached logits by {error:.2g}"
            except (hf_attention.Unsupported, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as err:
                reason = f"its check failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if reason is not None:
                hf_attention.uninstall(self.model)
        path = SHARED if reason is None else f"{COPIES} ({reason})"
        kernel = f"; kernel: {hf_attention.kernel_path(self.model)}" if reason is None else ""
        self.warnings.append(f"attention: {path}{kernel}")
        return path

    def _check_shared(self) -> float:
        """The largest difference (relative to the logits' size) between the shared-prefix path and
        uncached forward passes of the same texts: two prompts of different lengths, three
        steps, rows leaving so that prompts have unequal, then equal numbers of rows, then one
        prompt is left."""
        torch = self.torch
        V = self.model.get_output_embeddings().weight.shape[0] if self.model.get_output_embeddings() is not None \
            else self.model.config.vocab_size
        prompts = [[(7 * i + 3) % V for i in range(5)], [(5 * i + 1) % V for i in range(2)]]
        src = [0, 0, 1]
        worst = 0.0
        with torch.inference_mode():
            caches = [self._prefill(p)[0] for p in prompts]
            cache = hf_attention.new_cache(caches, src)
            seqs = [list(prompts[s]) for s in src]
            plen = torch.tensor([len(s) for s in seqs], device=self.device)
            mask = (torch.arange(5, device=self.device)[None, :] >= (5 - plen)[:, None]).long()
            for step, keep in enumerate(([0, 1, 2], [1, 2], [1])):
                if len(keep) < len(seqs):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    seqs, mask, plen = [seqs[b] for b in keep], mask[idx], plen[idx]
                tok = torch.tensor([(11 * step + 2 * b + 1) % V for b in range(len(seqs))], device=self.device)
                mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
                with hf_attention.active(cache):
                    got = self._step(cache, tok, mask, plen + step)
                for b, t in enumerate(tok.tolist()):
                    seqs[b].append(t)
                    want = self.model(input_ids=torch.tensor([seqs[b]], device=self.device),
                                      attention_mask=torch.ones(1, len(seqs[b]), dtype=torch.long,
                                                                device=self.device)).logits[0, -1].float()
                    worst = max(worst, float((got[b] - want).abs().max() / (1 + want.abs().max())))
        return worst

    def _draw(self, logits, temp, topk, topp, filtered, keys: np.ndarray, step: int, sampling_distribution):
        """Each row's token at `step`: the inverse CDF of its sampling distribution at its own
        uniform draw (as the built-in sampler draws)."""
        torch = self.torch
        probs = (logits / temp.clamp_min(1e-6)[:, None]).softmax(dim=-1)
        if bool(filtered.any()):
            probs[filtered] = sampling_distribution(logits[filtered], temp[filtered], topk[filtered], topp[filtered])
        u = torch.from_numpy(step_uniforms(keys, step)).to(probs.device, probs.dtype)
        cdf = probs.cumsum(dim=-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp_max(probs.shape[-1] - 1)

    def _stop_triggers(self, stops: Sequence[str], vocab: int) -> np.ndarray:
        """Which of `vocab` token ids could complete one of `stops` (vocab,) bool: the token's own
        text holds a stop's last character, or, for a stop ending in a non-ASCII character, part
        of a multi-byte character (an ASCII byte decodes as itself even beside partial
        characters); ids past the tokenizer's count as a partial character. Only a row whose new
        token is one of these has its text decoded again (`_holds_stop`); the final text is cut
        at the first stop in any case."""
        stops = tuple(s for s in stops if s)
        key = (stops, vocab)
        if not hasattr(self, "_triggers"):
            self._triggers: dict = {}
        if key not in self._triggers:
            hit = np.zeros(vocab, dtype=bool)
            if stops:
                if self._pieces is None:
                    self._pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
                ends = {s[-1] for s in stops}
                partial = any(not s[-1].isascii() for s in stops)
                for t in range(vocab):
                    piece = self._pieces[t] if t < len(self._pieces) else "\ufffd"
                    hit[t] = any(c in piece for c in ends) or (partial and "\ufffd" in piece)
            self._triggers[key] = hit
        return self._triggers[key]

    def _holds_stop(self, row: list[int], stops: Sequence[str]) -> bool:
        """Whether the row's text holds one of its stop sequences."""
        text = self.tokenizer.decode(row)
        return any(s in text for s in stops if s)

    def _finish(self, out, row: tuple[int, int], tokens: list[int], reason: str, stops: Sequence[str]) -> None:
        """Save a finished row: its text cut at the first stop sequence; "stop" for an end token
        or a stop sequence, "length" for max_tokens."""
        r, j = row
        text, stopped = truncate_at_stop(self.tokenizer.decode(tokens), stops)
        out[r][j] = Completion(j, text, tuple(tokens), "stop" if stopped or reason == "stop" else "length")

    # exact pass probability ---------------------------------------------------------------------

    def exact_pass_probability(self, prompt: str, references: Sequence[str], params: SamplingParams) -> float:
        """P(one sample's text is exactly one of `references`), under this sampler's own sampling
        distribution (`sampling_distribution` at the run's temperature, top-k and top-p, the
        prompt cut as `generate` cuts it), by teacher forcing.

        Sums, over references, the probability of drawing the reference's own tokenization
        (`_ids`) and then ending right after it: an end-of-sequence token, a stop sequence (its
        own tokenization, counted as `exact_stop_endings` says: none where the reference holds a
        stop, since the text is cut there) or max_tokens reached. With a tokenizer where a
        text has one token sequence (the bundled byte-level one) this is exact; with a BPE
        tokenizer other token sequences spelling the same text are not summed: a lower bound.
        For an `Exact(strip=True)` check it is a lower bound as well (whitespace variants pass).
        """
        base = self._prompt_ids(prompt, params.max_tokens)
        total = 0.0
        for ref in dict.fromkeys(references):
            ids, stops = self._ids(ref), exact_stop_endings(ref, params.stop)
            if len(ids) > params.max_tokens or stops is None:  # too long, or cut at a stop inside it
                continue
            probs = self._step_probs(base, ids, params)  # (len(ids) + 1, V)
            p_ref = float(probs[range(len(ids)), ids].prod()) if ids else 1.0
            if len(ids) == params.max_tokens:
                total += p_ref
                continue
            p_end = float(probs[len(ids), self.eos].sum())
            for stop in stops:
                sid = self._ids(stop)
                if len(ids) + len(sid) <= params.max_tokens:
                    p_end += float(self._step_probs(base + ids, sid, params)[range(len(sid)), sid].prod())
            total += p_ref * p_end
        return total

    def _step_probs(self, context: list[int], ids: list[int], params: SamplingParams):
        """The sampling distribution at each step of continuing `context` with `ids`: (len(ids) + 1, V)."""
        torch = self.torch
        from passuntil.backends.torch_backend import sampling_distribution

        full = context + ids
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([full], device=self.device),
                                attention_mask=torch.ones(1, len(full), dtype=torch.long, device=self.device)
                                ).logits[0, len(context) - 1:].float()
        n = logits.shape[0]
        return sampling_distribution(logits, torch.full((n,), float(params.temperature)),
                                     torch.full((n,), int(params.top_k or 0)),
                                     torch.full((n,), float(params.top_p))).cpu()

    # scoring ------------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm-eval's `_encode_pair` splits them: the
        context's trailing whitespace moves to the continuation, and the continuation's tokens
        are those of the whole text past the context's own encoding (so a token that spans the
        boundary belongs to the continuation). An empty context is the BOS (or EOS) token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.bos], self._ids(continuation)
        whole, ctx = self._ids(context + continuation), self._ids(context)
        return ctx, whole[len(ctx):]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        torch = self.torch
        out = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            ctx, cont_ids = self.encode_pair(prompt, cont)
            full = (ctx + cont_ids)[-(self.context + 1):] if self.context else ctx + cont_ids
            n = len(cont_ids)
            if n == 0:
                out.append(TokenScores(()))
                continue
            with torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([full[:-1]], device=self.device),
                                    attention_mask=torch.ones(1, len(full) - 1, dtype=torch.long,
                                                              device=self.device)).logits[0]
            logp = torch.log_softmax(logits[len(full) - 1 - n:].float(), -1)
            picked = logp.gather(1, torch.tensor(full[len(full) - n:], device=self.device)[:, None])[:, 0]
            out.append(TokenScores(tuple(picked.tolist())))
        return out


def _cache_of(output):
    """The KV cache a forward pass returned (`cache` since transformers 5.2x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _layers(cache) -> list[tuple]:
    """(keys, values) of each layer of a transformers KV cache (B, heads, positions, head dim)."""
    if hasattr(cache, "key_cache"):  # transformers 4.x
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    layers = getattr(cache, "layers", None)
    if layers is None or not all(getattr(la, "keys", None) is not None for la in layers):
        raise UserError("the transformers backend needs a model with a key/value cache per layer")
    return [(la.keys, la.values) for la in layers]


def _new_cache(cls, layers: list[tuple], capacity: int):
    """A DynamicCache holding these (keys, values) per layer, with room for `capacity` positions."""
    reserved = _reserved_layer()
    if reserved is None:  # transformers 4.x: a step appends by concatenation
        return cls.from_legacy_cache(tuple(layers))
    cache = cls()
    cache.layers = [reserved(k, v, capacity) for k, v in layers]
    return cache


@functools.cache
def _reserved_layer():
    """transformers' DynamicLayer in buffers allocated once for the whole decode: a step writes
    its key and value in place, where DynamicLayer copies the whole cache (torch.cat) every step
    (its cost grows with rows x context, and dominated decoding long prompts)."""
    import torch

    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class ReservedLayer(DynamicLayer):
        def __init__(self, keys, values, capacity: int):
            super().__init__()
            B, H, L, _ = keys.shape
            self._k = keys.new_empty(B, H, max(capacity, L), keys.shape[-1])
            self._v = values.new_empty(B, values.shape[1], max(capacity, L), values.shape[-1])
            self._k[:, :, :L], self._v[:, :, :L] = keys, values
            self.device, self.is_initialized, self._len = keys.device, True, L
            self._views()

        def _views(self):
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self._len + n > self._k.shape[2]:  # past the reserved room: grow (not in a decode)
                grow = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], self._len + n, t.shape[-1])], 2)  # noqa: E731
                self._k, self._v = grow(self._k), grow(self._v)
            self._k[:, :, self._len: self._len + n] = key_states
            self._v[:, :, self._len: self._len + n] = value_states
            self._len += n
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices):
            """Keep these rows: their filled positions copied into new buffers of the same room."""
            def keep(t):
                out = t.new_empty(len(indices), *t.shape[1:])
                out[:, :, : self._len] = t[indices, :, : self._len]
                return out

            self._k, self._v = keep(self._k), keep(self._v)
            self._views()

    return ReservedLayer
