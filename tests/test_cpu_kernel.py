"""The compiled CPU kernels against plain PyTorch, and the sampler with them against without."""

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from passuntil.backends import cpu_kernel, torch_backend
from passuntil.backends.base import SamplingParams
from passuntil.backends.torch_backend import TorchSampler
from passuntil.seeding import row_keys

SMALL = Path(__file__).parents[1] / "src/passuntil/bundled/tiny/tiny-3"

if os.environ.get("PASSUNTIL_REQUIRE_KERNEL") == "1" and cpu_kernel.load() is None:  # CI has a compiler
    raise RuntimeError(f"PASSUNTIL_REQUIRE_KERNEL=1 but no CPU kernel: {cpu_kernel.unavailable()}")
needs_kernel = pytest.mark.skipif(cpu_kernel.load() is None, reason=f"no CPU kernel: {cpu_kernel.unavailable()}")


@needs_kernel
@pytest.mark.parametrize("d", [16, 32])
def test_decode_attention_equals_one_softmax_over_prefix_and_suffix(d):
    """Step by step, across a block boundary of the suffix caches: each row's output is one
    softmax over its segment's prefix (unpadded part) and its own rotated suffix keys; rows
    past a multiple of 8, prefixes shared by several segments."""
    g = torch.Generator().manual_seed(0)
    P, H, R, M = 2, 3, 3, 20
    plen = torch.tensor([20, 7])
    T = 32  # padded to 16
    seg_prefix = torch.tensor([0, 1, 0])
    S = len(seg_prefix)
    kp = torch.randn(P, H, T, d, generator=g)
    vp = torch.randn(P, H, T, d, generator=g)
    for p in range(P):  # padding is zero, as the sampler pads it
        kp[p, :, plen[p]:] = 0
        vp[p, :, plen[p]:] = 0
    ks = torch.zeros(S, H, -(-M // 4), R, d, 4)
    vs = torch.zeros(S, H, M, R, d)
    keys, values = [], []  # the reference's suffix: (S*R, H, d) per step
    for step in range(M):
        qkv = torch.randn(S * R, 3 * H * d, generator=g)
        angle = torch.rand(S, d // 2, generator=g) * 6.3
        cos, sin = angle.cos(), angle.sin()
        out = torch.empty(S * R, H * d)
        cpu_kernel.decode_attention(qkv, cos, sin, kp.transpose(-1, -2).contiguous(), vp, seg_prefix, plen,
                                    ks, vs, out, step, d**-0.5)
        q, k, v = qkv.view(S, R, 3, H, d).unbind(2)
        c, s = cos[:, None, None], sin[:, None, None]
        keys.append(torch_backend._rotate_pairs(k, c, s).reshape(S * R, H, d))
        values.append(v.reshape(S * R, H, d))
        q = torch_backend._rotate_pairs(q, c, s).reshape(S * R, H, d)
        for row in range(S * R):
            p = seg_prefix[row // R]
            kk = torch.cat([kp[p, :, : plen[p]], torch.stack([x[row] for x in keys], dim=1)], dim=1)
            vv = torch.cat([vp[p, :, : plen[p]], torch.stack([x[row] for x in values], dim=1)], dim=1)
            w = (kk @ q[row, :, :, None] * d**-0.5).softmax(dim=1)  # (H, ctx, 1)
            want = (w * vv).sum(1).reshape(-1)
            assert (out[row] - want).abs().max() < 1e-5, (step, row)
        rows = lambda c: c.transpose(1, 2).reshape(S * R, H, d)  # noqa: E731  (S, H, R, d) -> (S*R, H, d)
        assert torch.allclose(rows(ks[:, :, step // 4, ..., step % 4]), keys[-1], atol=1e-6)  # rounding of RoPE
        assert torch.equal(rows(vs[:, :, step]), values[-1])


@needs_kernel
def test_decode_attention_refuses_inconsistent_tensors():
    args = [torch.zeros(6, 96), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(1, 2, 16, 16),
            torch.zeros(1, 2, 16, 16), torch.zeros(2, dtype=torch.long), torch.tensor([5]),
            torch.zeros(2, 2, 4, 3, 16, 4), torch.zeros(2, 2, 16, 3, 16), torch.zeros(6, 32)]
    cpu_kernel.decode_attention(*args, 0, 0.25)  # consistent: runs
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernel.decode_attention(*args, 16, 0.25)  # past the cache
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernel.decode_attention(args[0].T, *args[1:], 0, 0.25)
    with pytest.raises(ValueError, match="int64"):
        cpu_kernel.decode_attention(*args[:5], args[5].int(), *args[6:], 0, 0.25)


@needs_kernel
def test_rms_norm_and_silu_mul_equal_pytorch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 112, generator=g) * 3
    assert torch.allclose(cpu_kernel.rms_norm(x, 1e-5), F.rms_norm(x, (112,), eps=1e-5), rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(37, 2 * 280, generator=g) * 20  # SiLU far into both tails; 280 = 17 * 16 + 8
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(cpu_kernel.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_sample_tokens_draws_the_pytorch_paths_tokens_from_the_softmax():
    """The C draw (`sample_tokens`) against the sampler's PyTorch draw on the same uniforms:
    the same token on (almost) every row, at several temperatures and a vocabulary that is not
    a multiple of 16; on one row drawn 20,000 times, the softmax's frequencies (chi-square);
    a token of weight zero (logit -inf) is never drawn, even where the uniform is the last."""
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    B, V = 700, 257
    logits = torch.randn(B, V, generator=g) * 3
    temp = torch.rand(B, generator=g) + 0.3
    keys = row_keys(1, np.arange(B))
    off = torch.zeros(B, dtype=torch.long), torch.ones(B)
    same = 0
    for step in range(20):
        ours = cpu_kernel.sample_tokens(logits, temp, keys, step)
        theirs = torch_backend.draw_tokens(logits, keys, step, temp, *off, filtered=False, kernel=False)
        same += int((ours == theirs).sum())
    assert same >= 0.999 * 20 * B
    row = (torch.randn(1, V, generator=g) * 2).repeat(20_000, 1)
    drawn = cpu_kernel.sample_tokens(row, torch.full((20_000,), 0.9), row_keys(7, np.arange(20_000)), 3)
    expected = (row[0] / 0.9).softmax(-1).double() * 20_000
    common = expected >= 5  # chi-square cells: pool the rare tokens into one
    observed = torch.bincount(drawn, minlength=V).double()
    obs = torch.cat([observed[common], observed[~common].sum()[None]])
    exp = torch.cat([expected[common], expected[~common].sum()[None]])
    assert stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3
    masked = torch.randn(64, 40, generator=g)
    masked[:, 20:] = float("-inf")  # the last tokens weigh 0: the top of the CDF is flat there
    drawn = cpu_kernel.sample_tokens(masked, torch.ones(64), row_keys(3, np.arange(64)), 0)
    assert int(drawn.max()) < 20


@needs_kernel
def test_sample_tokens_refuses_what_it_cannot_draw():
    logits, keys = torch.randn(4, 10), row_keys(1, np.arange(4))
    cpu_kernel.sample_tokens(logits, torch.ones(4), keys, 0)  # consistent: runs
    for bad in [(logits, torch.zeros(4), keys),  # temperature 0 is greedy: the PyTorch path's
                (logits.double(), torch.ones(4), keys), (logits, torch.ones(3), keys),
                (logits, torch.ones(4), keys.astype(np.int64)), (logits.T, torch.ones(10), row_keys(1, np.arange(10)))]:
        with pytest.raises(ValueError):
            cpu_kernel.sample_tokens(*bad, 0)


@needs_kernel
def test_sampler_draws_the_same_samples_with_and_without_the_kernel(monkeypatch):
    """Same seeds, same samples: the kernel path and the PyTorch path differ only by rounding
    (a draw that falls on a CDF boundary), with stops, early finishes and repacking."""
    torch.set_num_threads(2)
    prompts = ["def f(x):\n", "reverse: hqt -> ", "12+5="]
    params = [SamplingParams(n=150, seed=4, stop=("\n\n",), max_tokens=40),
              SamplingParams(n=100, seed=5, stop=("\n",), max_tokens=30),
              SamplingParams(n=50, seed=6, stop=("\n",), max_tokens=6, temperature=0.8)]
    fast = TorchSampler.from_folder(SMALL)
    assert fast._use_kernel()
    with_kernel = [[c.text for c in o] for o in fast.generate(prompts, params)]
    assert fast.repacks >= 2
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    plain = TorchSampler.from_folder(SMALL)
    assert not plain._use_kernel()
    without = [[c.text for c in o] for o in plain.generate(prompts, params)]
    same = sum(a == b for x, y in zip(with_kernel, without) for a, b in zip(x, y))
    assert same >= 0.99 * 300


@needs_kernel
def test_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch):
    """Built into $PASSUNTIL_DATA/kernels and reused; PASSUNTIL_NO_KERNEL=1 turns it off."""
    monkeypatch.setenv("PASSUNTIL_DATA", str(tmp_path))
    try:
        cpu_kernel._build.cache_clear()
        assert cpu_kernel.load() is not None and cpu_kernel.unavailable() == ""
        (lib,) = (tmp_path / "kernels").glob("cpu_kernel-*.so")
        stamp = lib.stat().st_mtime_ns
        cpu_kernel._build.cache_clear()
        assert cpu_kernel.load() is not None and lib.stat().st_mtime_ns == stamp
        monkeypatch.setenv("PASSUNTIL_NO_KERNEL", "1")
        cpu_kernel._build.cache_clear()
        assert cpu_kernel.load() is None and "PASSUNTIL_NO_KERNEL" in cpu_kernel.unavailable()
    finally:
        monkeypatch.undo()
        cpu_kernel._build.cache_clear()


@needs_kernel
def test_gather_rows_moves_whole_rows_of_the_suffix_caches():
    """Repacking: new row i is old row src[i] in every head and used block; padding rows (-1) and
    blocks past `used` are left as they were."""
    g = torch.Generator().manual_seed(3)
    S, H, Mb, R, X = 3, 2, 5, 4, 16
    cache = torch.randn(S, H, Mb, R, X, generator=g)
    src = torch.tensor([5, 0, -1, 11, 2, 7, 3, -1])  # two new segments
    out = torch.full((2, H, Mb, R, X), 7.0)
    cpu_kernel.gather_rows(cache, out, src, 3)
    rows = lambda t: t.permute(0, 3, 1, 2, 4).reshape(-1, H, Mb, X)  # noqa: E731  (rows, H, blocks, X)
    new, old = rows(out), rows(cache)
    for i, j in enumerate(src.tolist()):
        assert torch.equal(new[i, :, :3], old[j, :, :3] if j >= 0 else torch.full((H, 3, X), 7.0))
    assert (new[:, :, 3:] == 7.0).all()
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernel.gather_rows(cache, out, torch.tensor([12, 0, 0, 0, 0, 0, 0, 0]), 3)  # no row 12


@needs_kernel
def test_whole_step_in_one_call_equals_the_layer_by_layer_step(monkeypatch):
    """The decoding step in one C call (matmuls in PyTorch's sgemm) draws what the step run
    layer by layer from Python draws, through repacks and rebuilt plans."""
    if cpu_kernel.blas_sgemm() is None:
        pytest.skip("this PyTorch exports no sgemm")
    prompts = ["def f(x):\n", "reverse: hqt -> ", "12+5="]
    params = [SamplingParams(n=150, seed=4, stop=("\n\n",), max_tokens=40),
              SamplingParams(n=100, seed=5, stop=("\n",), max_tokens=30),
              SamplingParams(n=50, seed=6, stop=("\n",), max_tokens=6, temperature=0.8)]
    fused = TorchSampler.from_folder(SMALL)
    one_call = [[c.text for c in o] for o in fused.generate(prompts, params)]
    assert fused.repacks >= 2
    again = [[c.text for c in o] for o in fused.generate(prompts, params)]  # in the buffers the first call kept
    assert again == one_call
    monkeypatch.setattr(cpu_kernel, "blas_sgemm", lambda: None)
    by_layer = [[c.text for c in o] for o in TorchSampler.from_folder(SMALL).generate(prompts, params)]
    assert sum(a == b for x, y in zip(one_call, by_layer) for a, b in zip(x, y)) >= 0.99 * 300


def _fake_sgemm(int_type, *, wrong: str = ""):
    """A BLAS sgemm_ in Python for the one call the kernel makes (C = alpha A^T B + beta C,
    column-major), reading its integers as `int_type` (c_int32: LP64, c_int64: ILP64); `wrong` =
    "beta" ignores beta, "overrun" also zeroes the column after C."""
    P = ctypes.POINTER
    f32p, ip = P(ctypes.c_float), P(int_type)
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ip, ip, ip, f32p, f32p, ip, f32p, ip, f32p,
                             f32p, ip)

    def gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        assert (ta, tb) == (b"T", b"N")
        m, n, k, lda, ldb, ldc = (v[0] for v in (m, n, k, lda, ldb, ldc))
        A = np.ctypeslib.as_array(a, (m * lda,)).reshape(m, lda)[:, :k]  # op(A) = A^T: (m, k)
        B = np.ctypeslib.as_array(b, (n * ldb,)).reshape(n, ldb)[:, :k].T  # (k, n)
        C = np.ctypeslib.as_array(c, (n * ldc + ldc,))  # one column past the end, for "overrun"
        Cv = C[: n * ldc].reshape(n, ldc)[:, :m].T  # (m, n) view
        Cv[:] = alpha[0] * A @ B + (0.0 if wrong == "beta" else beta[0]) * Cv
        if wrong == "overrun":
            C[n * ldc:] = 0.0

    fn = proto(gemm)
    return fn, ctypes.cast(fn, ctypes.c_void_p).value


@needs_kernel
def test_sgemm_self_test_accepts_both_integer_widths_and_refuses_a_wrong_blas(monkeypatch, capsys):
    """The one-call step's integer arguments read right as 32-bit (LP64) and as 64-bit (ILP64)
    ints; a BLAS that computes something else, or writes past its output, is refused at load
    time: the step then runs kernel by kernel, the fingerprint says so, stderr says so once."""
    keep = []
    for int_type in (ctypes.c_int32, ctypes.c_int64):
        fn, addr = _fake_sgemm(int_type)
        keep.append(fn)
        assert cpu_kernel.self_test(addr) == ""
    for wrong, message in (("beta", "differs from torch.mm"), ("overrun", "wrote outside")):
        fn, addr = _fake_sgemm(ctypes.c_int32, wrong=wrong)
        keep.append(fn)
        assert message in cpu_kernel.self_test(addr)
    monkeypatch.setattr(cpu_kernel, "self_test", lambda addr: "sgemm self-test: differs from torch.mm")
    monkeypatch.setattr(cpu_kernel, "_said", [])
    cpu_kernel._sgemm.cache_clear()
    try:
        assert cpu_kernel.blas_sgemm() is None
        assert cpu_kernel.kernel_path() == "c-kernels (sgemm self-test: differs from torch.mm)"
        sampler = TorchSampler.from_folder(SMALL)
        TorchSampler.from_folder(SMALL)
        assert sampler._plan((True, None, None, (None, None)), [], [], 1) is None
        err = capsys.readouterr().err
        assert err.count("runs on c-kernels (sgemm self-test: differs from torch.mm)") == 1
    finally:
        monkeypatch.undo()
        cpu_kernel._sgemm.cache_clear()


def test_without_a_compiler_eval_runs_says_so_once_and_records_the_path(tmp_path):
    """PATH without cc: `passuntil eval` samples in PyTorch, prints one line naming that path,
    and records it in the run's sampler fingerprint."""
    import json
    import sqlite3
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("CC", "PASSUNTIL_NO_KERNEL")}
    env.update(PATH=str(tmp_path), PASSUNTIL_DATA=str(tmp_path / "data"))
    store = tmp_path / "k.sqlite"
    done = subprocess.run([str(Path(sys.executable).with_name("passuntil")), "eval", "--task", "arith", "--model",
                           "tiny-2", "--store", str(store), "--max-samples", "4", "--limit", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [ln for ln in done.stderr.splitlines() if "runs on" in ln]
    assert said == ["passuntil: the built-in CPU sampler runs on pytorch (no C compiler (cc or $CC)), "
                    "not its fastest path"]
    config = json.loads(sqlite3.connect(store).execute("SELECT config_json FROM runs").fetchone()[0])
    assert config["samplers"]["tiny-2"]["kernel"] == "pytorch (no C compiler (cc or $CC))"


def _plan_inputs(S: int, R: int, seed: int):
    """Random weights, prefixes of unequal lengths and empty suffix caches for a DecodePlan of S
    segments of R rows (2 layers, 3 heads of 16, F = 40, V = 37)."""
    g = torch.Generator().manual_seed(seed)
    L, H, d, F_, V, T, M, P = 2, 3, 16, 40, 37, 32, 12, 2
    C = H * d
    rnd = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5  # noqa: E731
    layers = [(rnd(3 * C, C), rnd(C, C), rnd(2 * F_, C), rnd(C, F_)) for _ in range(L)]
    plen = torch.tensor([29, 5])
    kp, vp = [], []
    for _ in range(L):
        k, v = torch.randn(P, H, T, d, generator=g), torch.randn(P, H, T, d, generator=g)
        for p in range(P):
            k[p, :, plen[p]:] = 0
            v[p, :, plen[p]:] = 0
        kp.append(k.transpose(-1, -2).contiguous())
        vp.append(v)
    seg_prefix = torch.tensor([1, 0, 1])[:S].contiguous()
    ks = [torch.zeros(S, H, M // 4, R, d, 4) for _ in range(L)]
    vs = [torch.zeros(S, H, M, R, d) for _ in range(L)]
    n = S * R
    buffers = {k: torch.empty(n, cols) for k, cols in (("norm", C), ("qkv", 3 * C), ("attention", C),
                                                       ("gate_up", 2 * F_), ("act", F_), ("logits", V))}
    return layers, rnd(V, C), (kp, vp, seg_prefix, plen), ks, vs, buffers, d**-0.5


@needs_kernel
@pytest.mark.parametrize("S, R", [(1, 13), (3, 13), (3, 5), (2, 32)])
def test_whole_step_split_over_threads_equals_one_thread(S, R):
    """decode_step splits the rows over 2 or 5 threads (blocks of 8 rows inside segments, each thread
    running every layer for its rows): step after step, the same logits, residual stream and
    suffix caches as on one thread, up to the rounding of matrix products of other sizes; rows
    past a multiple of 8 and segments with prefixes of unequal length."""
    if cpu_kernel.blas_sgemm() is None:
        pytest.skip("this PyTorch exports no sgemm")
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2, 5):  # 5: more threads than (3, 5)'s and (1, 13)'s row blocks
        layers, head, prefix, ks, vs, buffers, scale = _plan_inputs(S, R, seed=7)
        plan = cpu_kernel.DecodePlan(layers, head, 1e-5, prefix, ks, vs, buffers, scale)
        g = torch.Generator().manual_seed(8)
        logits, xs = [], []
        torch.set_num_threads(threads)
        try:
            for step in range(6):
                x = torch.randn(S * R, plan.C, generator=g)
                angle = torch.rand(S, plan.d // 2, generator=g) * 6.3
                logits.append(plan.step(x, angle.cos(), angle.sin(), step).clone())
                xs.append(x)
        finally:
            torch.set_num_threads(before)
        runs.append((logits, xs, ks, vs))
    (l1, x1, k1, v1), *others = runs
    assert all(torch.isfinite(a).all() and a.abs().max() > 0.1 for a in l1)
    for l2, x2, k2, v2 in others:
        for a, b in zip(l1 + x1 + k1 + v1, l2 + x2 + k2 + v2):
            assert (a - b).abs().max() <= 1e-5
