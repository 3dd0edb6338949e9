"""Fuzz of the transformers backend's compiled shared-prefix attention (hf_attention_kernel.c).

Three doors, each over many seeded random shapes: the cache's own door (`new_cache`, `update`,
the attention function, `batch_select_indices`) with the kernel against the PyTorch path (rows
leaving in random patterns, in order and not, buffers growing, buffers of an earlier decode
reused after being poisoned with NaN); the C functions called directly against a float64
reference, with NaN in every position the kernel must not read and guard zones around every
buffer it writes (grouped-query ratios 1/2/4/7, head sizes 16-128, value size != key size,
prompt lengths on and off multiples of 8 and 16, one row and thousands, a long prompt, the
buffer exactly full); and the same direct fuzz in a subprocess against a copy built with
-fsanitize=address,undefined (reads past a buffer that do not change the numbers), where the
compiler and its sanitizer runtime exist.
"""

import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from passuntil.backends import hf_attention  # noqa: E402

GUARD = 64  # floats of sentinel before and after every buffer the kernel writes
SENTINEL = 12345.0


def _needs_kernel():
    if hf_attention._kernel()[0] is None:
        pytest.skip(f"no compiled kernel: {hf_attention._kernel()[1]}")


def _declare(lib):
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.shared_prefix_attention.restype = ctypes.c_int
    lib.shared_prefix_attention.argtypes = [ptr, i64, i64] * 3 + [ptr] * 7 + [i64] * 8 + [ctypes.c_float, i64]
    lib.compact_rows.restype = ctypes.c_int
    lib.compact_rows.argtypes = [ptr, ptr] + [i64] * 4
    return lib


class _Module:
    layer_idx = 0


# --- the cache's door: kernel against PyTorch ---------------------------------------------------

def _door_case(rng, spare):
    """One decode of random shape through both paths; (the kernel cache, worst relative error)."""
    g, Hkv = int(rng.choice([1, 2, 4, 7])), int(rng.integers(1, 4))
    H, d = g * Hkv, int(rng.choice([16, 32, 64, 80, 128]))
    P = int(rng.integers(1, 5))
    lens = [rng.integers(1, 70, P), 16 * rng.integers(1, 5, P), 8 * rng.integers(1, 9, P)][rng.integers(3)]
    counts = rng.integers(1, 12, P)
    src = [p for p in range(P) for _ in range(counts[p])]
    steps, capacity = int(rng.integers(1, 40)), int(rng.integers(1, 45))  # capacity < steps: buffers grow
    tg = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    prefixes = [[(torch.randn(1, Hkv, int(n), d, generator=tg), torch.randn(1, Hkv, int(n), d, generator=tg))]
                for n in lens]
    if spare is not None and rng.random() < 0.5:
        for t in spare.layers[0].spare:  # an earlier decode's buffers: nothing in them may be read
            t.fill_(float("nan"))
    caches = {}
    for kernel in (True, False):
        hf_attention.USE_KERNEL = kernel
        caches[kernel] = hf_attention.new_cache(prefixes, src, capacity, reuse=spare if kernel else None)
        assert caches[kernel].layers[0].kernel == kernel
    rows, worst = len(src), 0.0
    for step in range(steps):
        if step and rows > 1 and rng.random() < 0.3:
            keep = np.flatnonzero(rng.random(rows) < rng.random())  # increasing: moved up in place
            if not len(keep):
                keep = np.array([rng.integers(rows)])
            if rng.random() < 0.15 and len(keep) > 1 and src[keep[0]] == src[keep[1]]:
                keep[[0, 1]] = keep[[1, 0]]  # not increasing: copied
            for cache in caches.values():
                cache.batch_select_indices(torch.from_numpy(keep))
            src, rows = [src[i] for i in keep], len(keep)
        if rng.random() < 0.1:  # an update that no attention call follows (flushed by the next)
            k = torch.randn(rows, Hkv, 1, d, generator=tg)
            for cache in caches.values():
                cache.layers[0].update(k, -k)
        qkv = torch.randn(rows, 1, H * d + 2 * Hkv * d, generator=tg)
        q = qkv[..., : H * d].view(rows, 1, H, d).transpose(1, 2)  # strided, as GPT-2's
        k = qkv[..., H * d: (H + Hkv) * d].reshape(rows, 1, Hkv, d).transpose(1, 2)
        v = qkv[..., (H + Hkv) * d:].reshape(rows, 1, Hkv, d).transpose(1, 2)
        scale = float(rng.uniform(0.05, 1.05))
        got = {}
        for kernel, cache in caches.items():
            keys, values = cache.layers[0].update(k, v)
            with hf_attention.active(cache):
                got[kernel] = hf_attention.shared_prefix_attention(_Module, q, keys, values, None, scaling=scale)[0]
        assert got[True].shape == (rows, 1, H, d)
        worst = max(worst, float((got[True] - got[False]).abs().max() / (1 + got[False].abs().max())))
    return caches[True], worst


def test_kernel_equals_pytorch_over_random_shapes_and_leaving_patterns(monkeypatch):
    _needs_kernel()
    monkeypatch.setattr(hf_attention, "USE_KERNEL", True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # more threads than cores: the split is exercised
    rng, spare, worst = np.random.default_rng(20261201), None, 0.0
    for _ in range(22):
        spare, w = _door_case(rng, spare)
        worst = max(worst, w)
    assert worst < 1e-5


def test_thousands_of_rows_and_a_long_prompt_through_the_cache(monkeypatch):
    _needs_kernel()
    rng, tg = np.random.default_rng(7), torch.Generator().manual_seed(7)
    for lens, counts, d in (((3, 40), (1500, 700), 16), ((2900, 5), (3, 2), 32)):
        prefixes = [[(torch.randn(1, 2, n, d, generator=tg), torch.randn(1, 2, n, d, generator=tg))] for n in lens]
        src = [p for p, c in enumerate(counts) for _ in range(c)]
        caches = {}
        for kernel in (True, False):
            monkeypatch.setattr(hf_attention, "USE_KERNEL", kernel)
            caches[kernel] = hf_attention.new_cache(prefixes, src, 4)
        rows = len(src)
        for step in range(6):
            if step in (2, 4):
                keep = np.flatnonzero(rng.random(rows) < 0.6)
                for cache in caches.values():
                    cache.batch_select_indices(torch.from_numpy(keep))
                rows = len(keep)
            q, k, v = (torch.randn(rows, n, 1, d, generator=tg) for n in (4, 2, 2))
            got = {}
            for kernel, cache in caches.items():
                keys, values = cache.layers[0].update(k, v)
                with hf_attention.active(cache):
                    got[kernel] = hf_attention.shared_prefix_attention(_Module, q, keys, values, None)[0]
            assert float((got[True] - got[False]).abs().max() / (1 + got[False].abs().max())) < 1e-5


def test_rows_given_as_a_numpy_int32_array_are_read_as_int64(monkeypatch):
    """The kernel reads each row's prompt as int64_t: `src` as numpy int32 once became an int32
    tensor, misread (a segmentation fault, or another prompt's keys)."""
    _needs_kernel()
    tg = torch.Generator().manual_seed(3)
    prefixes = [[(torch.randn(1, 2, n, 16, generator=tg), torch.randn(1, 2, n, 16, generator=tg))] for n in (5, 9)]
    q, k, v = (torch.randn(3, 2, 1, 16, generator=tg) for _ in range(3))
    got = {}
    for kernel, src in ((True, np.array([0, 0, 1], dtype=np.int32)), (False, [0, 0, 1])):
        monkeypatch.setattr(hf_attention, "USE_KERNEL", kernel)
        cache = hf_attention.new_cache(prefixes, src)
        assert cache.src.dtype == cache.prefix_lengths.dtype == torch.int64
        keys, values = cache.layers[0].update(k, v)
        with hf_attention.active(cache):
            got[kernel] = hf_attention.shared_prefix_attention(_Module, q, keys, values, None)[0]
    assert float((got[True] - got[False]).abs().max()) < 1e-5


# --- the C functions directly, against float64 ----------------------------------------------------

def _guarded(shape, fill=np.nan):
    """A float32 array of `shape` between two zones of SENTINEL (returned: the whole, the view)."""
    n = int(np.prod(shape))
    whole = np.full(n + 2 * GUARD, SENTINEL, dtype=np.float32)
    view = whole[GUARD: GUARD + n].reshape(shape)
    view[...] = fill
    return whole, view


def _intact(whole) -> bool:
    """The guard zones of a `_guarded` array still hold SENTINEL."""
    return bool((whole[:GUARD] == SENTINEL).all() and (whole[len(whole) - GUARD:] == SENTINEL).all())


def _c_case(lib, rng, big=False):
    """One direct call on random sizes; the worst error relative to the values' size, in units
    of its tolerance."""
    g, Hkv = int(rng.choice([1, 2, 4, 7])), int(rng.integers(1, 4))
    d = int(rng.choice([16, 32, 64, 80, 128]))
    dv = d if rng.random() < 0.6 else int(rng.choice([16, 32, 48, 80]))
    P = int(rng.integers(1, 5))
    plen = [rng.integers(1, 70, P), 16 * rng.integers(1, 5, P), 8 * rng.integers(1, 9, P)][rng.integers(3)]
    counts = rng.integers(1, 20, P) if rng.random() < 0.85 else np.ones(P, dtype=np.int64)
    if big:  # thousands of rows, or a long prompt
        g, d, dv = 1, 16, 16
        if rng.random() < 0.5:
            counts = rng.integers(500, 1500, P)
        else:
            counts, plen = np.ones(P, dtype=np.int64), rng.integers(2000, 4000, P)
    plen = plen.astype(np.int64)
    H, T = g * Hkv, int(-(-plen.max() // 16) * 16) + 16 * int(rng.integers(0, 2))
    src = np.repeat(np.arange(P), counts).astype(np.int64)
    B, C = len(src), 16 * int(rng.integers(1, 6))
    L = C if rng.random() < 0.2 else 1 if rng.random() < 0.1 else int(rng.integers(1, C + 1))
    kp = rng.standard_normal((P, Hkv, T, d)).astype(np.float32)
    for p in range(P):
        kp[p, :, plen[p]:] = 0.0  # the prompt's zero padding (as the cache stores it)
    _, kpT = _guarded((P, Hkv, d, T))
    kpT[...] = kp.transpose(0, 1, 3, 2)
    _, vp = _guarded((P, Hkv, T, dv))
    vp[...] = rng.standard_normal(vp.shape)
    for p in range(P):
        vp[p, :, plen[p]:] = np.nan  # past a prompt: never read
    kg = rng.standard_normal((B, Hkv, C, d)).astype(np.float32)
    vg = rng.standard_normal((B, Hkv, C, dv)).astype(np.float32)
    kg[:, :, L - 1:] = vg[:, :, L - 1:] = np.nan  # not yet written (L - 1: the kernel writes it)
    kwhole, ksT = _guarded((B, Hkv, C // 16, d, 16))
    ksT[...] = kg.reshape(B, Hkv, C // 16, 16, d).transpose(0, 1, 2, 4, 3)
    vwhole, vs = _guarded((B, Hkv, C, dv))
    vs[...] = vg
    amp = 30.0 if rng.random() < 0.1 else 1.0  # large logits (score ranges in the thousands)
    q = (amp * rng.standard_normal((B, H + 3, d))).astype(np.float32)[:, 1: H + 1]  # strided
    knew = rng.standard_normal((B, Hkv, 2, d)).astype(np.float32)[:, :, 1]
    vnew = rng.standard_normal((B, 2 * Hkv, dv)).astype(np.float32)[:, ::2]
    owhole, out = _guarded((B, H, dv))
    scale = float(rng.uniform(0.05, 1.0))
    s4 = lambda a, i: a.strides[i] // 4  # noqa: E731
    rc = lib.shared_prefix_attention(
        q.ctypes.data, s4(q, 0), s4(q, 1), knew.ctypes.data, s4(knew, 0), s4(knew, 1), vnew.ctypes.data,
        s4(vnew, 0), s4(vnew, 1), kpT.ctypes.data, vp.ctypes.data, plen.ctypes.data, src.ctypes.data,
        ksT.ctypes.data, vs.ctypes.data, out.ctypes.data, B, H, Hkv, d, dv, T, C, L, scale, int(rng.integers(1, 4)))
    assert rc == 0
    assert all(_intact(w) for w in (kwhole, vwhole, owhole))  # nothing written outside the buffers
    kg[:, :, L - 1], vg[:, :, L - 1] = knew, vnew
    written = ksT.transpose(0, 1, 2, 4, 3).reshape(B, Hkv, C, d)
    assert np.array_equal(written[:, :, :L], kg[:, :, :L]) and np.array_equal(vs[:, :, :L], vg[:, :, :L])
    assert np.isnan(written[:, :, L:]).all() and np.isnan(vs[:, :, L:]).all()  # nothing else written
    assert np.isfinite(out).all()  # every output written, no NaN read
    worst = 0.0
    for b in range(B) if B <= 60 else rng.choice(B, 40, replace=False):
        p = src[b]
        keys = np.concatenate([kp[p, :, :plen[p]], kg[b, :, :L]], 1).astype(np.float64)
        vals = np.concatenate([vp[p, :, :plen[p]], vg[b, :, :L]], 1).astype(np.float64)
        s = np.einsum("hgd,hnd->hgn", q[b].reshape(Hkv, g, d) * np.float32(scale), keys)
        w = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("hgn,hnv->hgv", w / w.sum(-1, keepdims=True), vals).reshape(H, dv)
        # float32 scores are off by a few units in their last place: weights by that much relative
        tol = 2e-5 + 3e-7 * np.abs(s).max()
        worst = max(worst, float(np.abs(out[b] - want).max() / np.abs(vals).max() / tol))
    return worst


def _compact_case(lib, rng):
    n0, Hkv = int(rng.integers(1, 40)), int(rng.integers(1, 4))
    stride = int(rng.integers(1, 50))
    used = int(rng.integers(0, stride + 1))
    whole, buf = _guarded((n0, Hkv, stride))
    buf[...] = rng.standard_normal(buf.shape)
    before = buf.copy()
    keep = np.flatnonzero(rng.random(n0) < rng.random()).astype(np.int64)
    keep = keep if len(keep) else np.array([n0 - 1], dtype=np.int64)
    assert lib.compact_rows(buf.ctypes.data, keep.ctypes.data, len(keep), Hkv, stride, used) == 0
    assert np.array_equal(buf[: len(keep), :, :used], before[keep, :, :used])  # overlapping moves
    assert np.array_equal(buf[len(keep):], before[len(keep):])  # rows past the kept: untouched
    assert _intact(whole)
    if len(keep) > 1:  # not increasing: refused, nothing moved
        after = buf.copy()
        assert lib.compact_rows(buf.ctypes.data, keep[::-1].copy().ctypes.data, len(keep), Hkv, stride, used) == 1
        assert np.array_equal(buf, after)


def _direct_fuzz(lib, seed: int, cases: int, big_cases: int) -> float:
    rng = np.random.default_rng(seed)
    worst = 0.0
    for i in range(cases + big_cases):
        worst = max(worst, _c_case(lib, rng, big=i >= cases))
        _compact_case(lib, rng)
    return worst


def test_kernel_equals_a_float64_reference_and_writes_only_its_buffers():
    _needs_kernel()
    assert _direct_fuzz(hf_attention._kernel()[0], 11, 150, 6) < 1


def test_kernel_refuses_sizes_it_does_not_take():
    _needs_kernel()
    lib, z = hf_attention._kernel()[0], np.zeros(1 << 12, dtype=np.float32)
    i = np.zeros(4, dtype=np.int64)
    call = lambda B, H, Hkv, d, dv, T, C, L: lib.shared_prefix_attention(  # noqa: E731
        *[z.ctypes.data, 0, 0] * 3, *[z.ctypes.data] * 2, i.ctypes.data, i.ctypes.data, *[z.ctypes.data] * 3,
        B, H, Hkv, d, dv, T, C, L, 1.0, 1)
    assert call(1, 2, 1, 16, 16, 16, 16, 1) == 0
    for bad in ((1, 2, 1, 8, 16, 16, 16, 1), (1, 2, 1, 16, 24, 16, 16, 1), (1, 2, 1, 16, 16, 8, 16, 1),
                (1, 2, 1, 16, 16, 16, 8, 1), (1, 2, 1, 16, 16, 16, 16, 17), (1, 2, 1, 16, 16, 16, 16, 0),
                (1, 3, 2, 16, 16, 16, 16, 1), (0, 2, 1, 16, 16, 16, 16, 1)):
        assert call(*bad) == 1, bad


# --- the same, under AddressSanitizer ---------------------------------------------------------------

def test_no_out_of_bounds_access_under_address_sanitizer(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    runtimes = []
    for name in ("libasan.so", "libubsan.so"):
        found = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(found):
            pytest.skip(f"{cc} has no {name}")
        runtimes.append(found)
    lib = tmp_path / "hf_attention_asan.so"
    built = subprocess.run([cc, "-O1", "-g", "-fno-omit-frame-pointer", "-march=native", "-fopenmp", "-shared",
                            "-fPIC", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                            str(hf_attention.KERNEL_SOURCE), "-o", str(lib), "-lm"], capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"no sanitizer build: {built.stderr.strip().splitlines()[-1:]}")
    env = dict(os.environ, LD_PRELOAD=" ".join(runtimes), ASAN_OPTIONS="detect_leaks=0", OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, __file__, str(lib)], env=env, capture_output=True, text=True, timeout=300)
    if "imported" not in run.stdout:  # this python, torch or transformers does not load under ASan
        pytest.skip(f"no python under the sanitizer: {run.stderr.strip().splitlines()[-1:]}")
    assert run.returncode == 0 and "fuzz ok" in run.stdout, run.stderr[-3000:]


if __name__ == "__main__":  # the direct fuzz on the library given (the sanitizer build)
    GUARD = 0  # buffers of exactly their size: the sanitizer's red zones lie right at their ends
    print("imported", flush=True)
    worst = _direct_fuzz(_declare(ctypes.CDLL(sys.argv[1])), 5, 60, 4)
    assert worst < 1, worst
    print("fuzz ok", worst)
