"""The built-in sampler's compiled CPU kernels (cpu_kernel.c): decoding attention, RMSNorm,
SiLU-times-up and the repack's row moves, each one pass over its data; and a whole decoding step
in one call (`DecodePlan`), its matrix products in the BLAS sgemm that PyTorch exports.

Eager PyTorch spent more than half of a small model's decoding step outside its matrix
multiplies: a dozen memory-bound kernels per layer for RoPE, cache writes, prefix and suffix
attention and their merge, and single-threaded norms. The C attention does all of that in one
pass per (segment, head), with the shared prompt prefix in L1 for all of the segment's rows
(docs/sampler.md#speed).

The library is compiled on first use with the system C compiler (`cc -O3 -march=native
-fopenmp`, about a second) into $PASSUNTIL_DATA/kernels (default ~/.cache/passuntil), keyed by
the source, the compiler and this CPU, so a shared home directory never hands one machine's
build to another CPU. Loaded after PyTorch, it
shares PyTorch's OpenMP runtime and threads. Without a compiler, or with PASSUNTIL_NO_KERNEL=1,
the sampler runs the same computation in PyTorch; `unavailable()` says why.

The one-call step borrows the BLAS `sgemm_` that libtorch_cpu.so exports (MKL in the x86-64
wheels): not a public PyTorch API. Its integer arguments are passed so that an LP64 and an ILP64
BLAS both read them right (see `linear` in cpu_kernel.c), and before first use `blas_sgemm()`
checks it against torch.mm on shapes where a wrong integer width, transposition or leading
dimension would show; on any mismatch the step runs kernel by kernel instead. `kernel_path()`
names the path in use (recorded in each run's sampler fingerprint), and a fallback from the
fastest path is said once per process on stderr.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    """kernels/ in passuntil's data directory ($PASSUNTIL_DATA, default ~/.cache/passuntil)."""
    from passuntil.tasks.bigbench import data_root

    return data_root() / "kernels"


def _cpu_fingerprint() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep))


def compile_library(source: Path, stem: str) -> tuple[ctypes.CDLL | None, str]:
    """(the library compiled from `source` and loaded, "") or (None, why not). Built with `FLAGS`
    into the cache directory as `{stem}-{key}.so`, the key covering the source, the flags, the
    compiler's version and this CPU; off with PASSUNTIL_NO_KERNEL=1. Shared by the built-in
    sampler's kernels and the transformers sampler's attention (`hf_attention`)."""
    if os.environ.get("PASSUNTIL_NO_KERNEL") == "1":
        return None, "PASSUNTIL_NO_KERNEL=1"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not source.exists():
        return None, "no C compiler (cc or $CC)" if cc is None else f"{source.name} is missing"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), version, _cpu_fingerprint(),
                                        platform.machine()]).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"{stem}-{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            # built beside the target and renamed: concurrent workers never load a half-written file
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                built = Path(tmp) / lib.name
                subprocess.run([cc, *FLAGS, str(source), "-o", str(built), "-lm"], check=True,
                               capture_output=True, timeout=300)
                os.replace(built, lib)
        return ctypes.CDLL(str(lib)), ""
    except subprocess.CalledProcessError as e:
        return None, f"{cc} failed: {e.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building or loading the kernel failed: {e}"


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not)."""
    dll, why = compile_library(SOURCE, "cpu_kernel")
    if dll is None:
        return None, why
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for name, args in (("decode_attention", [ptr] * 10 + [i64] * 7 + [f32, i64]),
                       ("rms_norm", [ptr, ptr, i64, i64, f32, i64]),
                       ("silu_mul", [ptr, ptr, i64, i64, i64]),
                       ("gather_rows", [ptr, ptr, ptr] + [i64] * 7),
                       ("gemm_check", [ptr] * 4 + [i64] * 3 + [f32]),
                       ("decode_step", [ptr, i64, ptr] + [ptr] * 8 + [i64] * 4 + [f32] + [ptr] * 8 + [i64] * 7
                        + [f32, i64]),
                      ("sample_tokens", [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64])):
        getattr(dll, name).restype = ctypes.c_int
        getattr(dll, name).argtypes = args
    return dll, ""


def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built or is switched off."""
    return _build()[0]


def unavailable() -> str:
    """Why the kernels are not in use ("" when they are)."""
    return _build()[1]


def _check(f32: tuple[torch.Tensor, ...], i64: tuple[torch.Tensor, ...] = ()) -> None:
    """The C side trusts its pointers: CPU, contiguous, float32 and int64 where it says."""
    for ts, dt in ((f32, torch.float32), (i64, torch.int64)):
        if not all(t.dtype == dt and t.device.type == "cpu" and t.is_contiguous() for t in ts):
            raise ValueError(f"cpu_kernel: expected contiguous CPU {dt} tensors")


def _check_attention(qkv, cos, sin, kp_t, vp, seg_prefix, plen, ks, vs, out, step: int) -> tuple[int, ...]:
    """decode_attention's arguments are consistent (see there): (S, R, H, d, T, M)."""
    _check((qkv, cos, sin, kp_t, vp, ks, vs, out), (seg_prefix, plen))
    S, H, M, R, d = vs.shape
    P, T = kp_t.shape[0], kp_t.shape[-1]
    if not (qkv.shape == (S * R, 3 * H * d) and out.shape == (S * R, H * d)
            and ks.shape == (S, H, -(-M // 4), R, d, 4) and seg_prefix.shape == (S,)
            and cos.shape == sin.shape == (S, d // 2) and kp_t.shape == (P, H, d, T) and vp.shape == (P, H, T, d)
            and plen.shape == (P,) and 0 <= step < M and int(seg_prefix.min()) >= 0 and int(seg_prefix.max()) < P
            and int(plen.max()) <= T):
        raise ValueError("decode_attention: tensors of inconsistent shapes")
    return S, R, H, d, T, M


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kp_t: torch.Tensor,
                     vp: torch.Tensor, seg_prefix: torch.Tensor, plen: torch.Tensor, ks: torch.Tensor,
                     vs: torch.Tensor, out: torch.Tensor, step: int, scale: float) -> None:
    """One layer's decoding attention for all rows, written into `out`; writes position `step`
    of the suffix caches. Shapes (S segments of R rows, P prompts, M positions):
    qkv (S*R, 3*H*d); cos, sin (S, d/2); kp_t (P, H, d, T); vp (P, H, T, d); seg_prefix (S,);
    plen (P,); ks (S, H, ceil(M/4), R, d, 4); vs (S, H, M, R, d); out (S*R, H*d)."""
    S, R, H, d, T, M = _check_attention(qkv, cos, sin, kp_t, vp, seg_prefix, plen, ks, vs, out, step)
    args = [t.data_ptr() for t in (qkv, cos, sin, kp_t, vp, seg_prefix, plen, ks, vs, out)]
    if load().decode_attention(*args, step, S, R, H, d, T, M, scale, torch.get_num_threads()):
        raise ValueError("decode_attention: head size and prefix length must be multiples of 16")


# (n, N, K, beta) of the self-test's products y (n, N) = x (n, K) . w^T + beta * y: no two sizes
# equal (a swapped or transposed argument shows), K > N (a leading dimension read as the other
# size shows), odd sizes past a vector width, and beta = 1 (the accumulation the residual uses)
SELF_TEST_SHAPES = ((3, 5, 7, 0.0), (37, 19, 113, 0.0), (64, 130, 33, 1.0), (1, 257, 112, 0.0))


@functools.cache
def _sgemm() -> tuple[int | None, str]:
    """(address of a checked BLAS sgemm, "") or (None, why not)."""
    if load() is None:
        return None, unavailable()
    if sys.byteorder != "little":
        return None, "big-endian CPU"
    try:
        addr = ctypes.cast(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).sgemm_,
                           ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None, "this PyTorch exports no sgemm_"
    why = self_test(addr)
    return (addr, "") if not why else (None, why)


def self_test(addr: int) -> str:
    """Empty if the sgemm at `addr`, called as the one-call step calls it (`gemm_check`), equals
    torch.mm on SELF_TEST_SHAPES without writing past its output; else what went wrong."""
    g = torch.Generator().manual_seed(0)
    for n, N, K, beta in SELF_TEST_SHAPES:
        x, w = torch.randn(n, K, generator=g), torch.randn(N, K, generator=g)
        y0 = torch.randn(n, N, generator=g)
        guarded = torch.full((n + 2, N), 12345.0)  # a row of sentinels on each side of the output
        guarded[1:-1] = y0
        y = guarded[1:-1]
        if load().gemm_check(addr, x.data_ptr(), w.data_ptr(), y.data_ptr(), n, N, K, beta):
            return f"sgemm self-test: shape {(n, N, K)} refused"
        want = torch.mm(x, w.T) + beta * y0
        if not (guarded[0] == 12345.0).all() or not (guarded[-1] == 12345.0).all():
            return f"sgemm self-test: wrote outside its output at shape {(n, N, K)}"
        if not torch.allclose(y, want, rtol=1e-4, atol=1e-4):
            return f"sgemm self-test: differs from torch.mm at shape {(n, N, K)}"
    return ""


def blas_sgemm() -> int | None:
    """The address of the BLAS `sgemm_` that PyTorch's CPU library exports (MKL in the x86-64
    wheels) once it passed `self_test`, or None (`kernel_path()` says why)."""
    return _sgemm()[0]


def kernel_path() -> str:
    """The path a float32 CPU step of a SiLU-gated model takes on this machine, as recorded in a
    run's sampler fingerprint: "c-onecall+mkl-sgemm" (or "+blas-sgemm": the whole step in one C
    call), "c-kernels (why not one call)" (C attention, norms and SiLU, matmuls in PyTorch), or
    "pytorch (why no C)"."""
    addr, why = _sgemm()
    if addr is not None:
        return "c-onecall+" + ("mkl" if torch.backends.mkl.is_available() else "blas") + "-sgemm"
    return f"c-kernels ({why})" if load() is not None else f"pytorch ({unavailable()})"


def announce(path: str) -> None:
    """Say on stderr, once per process, that a float32 CPU sampler fell back from its fastest path
    (`path` names why in parentheses; plain "pytorch", bf16 or CUDA, is no fallback). Not when
    PASSUNTIL_NO_KERNEL=1 asked for it: that choice is recorded with the run all the same."""
    fallback = "(" in path and not path.startswith("c-onecall")
    if fallback and os.environ.get("PASSUNTIL_NO_KERNEL") != "1" and not _said:
        _said.append(path)
        print(f"passuntil: the built-in CPU sampler runs on {path}, not its fastest path", file=sys.stderr)


_said: list[str] = []


class DecodePlan:
    """A decoding step in one C call (`decode_step`: every layer and the LM head, matmuls in
    PyTorch's sgemm) for one layout of a chunk: n rows in S segments, with these caches,
    prefixes and scratch buffers, all checked here once; `step` then checks only its inputs.
    On several threads the rows are split between them (blocks of 8 rows of a segment), each
    thread running the whole step for its rows in one parallel region: the same logits as one
    thread up to the rounding of smaller matrix products. Needs `blas_sgemm()` and a SiLU-gated
    model."""

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], head: torch.Tensor, eps: float, prefix: tuple,
                 ks: list[torch.Tensor], vs: list[torch.Tensor], buffers: dict[str, torch.Tensor], scale: float):
        self._gemm = blas_sgemm()
        if self._gemm is None:
            raise ValueError("DecodePlan: this PyTorch exports no sgemm")
        kp, vp, seg_prefix, plen = prefix
        n, C = buffers["norm"].shape
        V, F = head.shape[0], layers[0][3].shape[1]
        S, H, M, R, d = vs[0].shape
        qkv = torch.empty(n, 3 * C)
        for li, (w_qkv, w_o, w_gate_up, w_down) in enumerate(layers):  # the attention's own check, once
            _check((w_qkv, w_o, w_gate_up, w_down))
            if not (w_qkv.shape == (3 * C, C) and w_o.shape == (C, C) and w_gate_up.shape == (2 * F, C)
                    and w_down.shape == (C, F)):
                raise ValueError("DecodePlan: weights of inconsistent shapes")
            _check_attention(qkv, torch.empty(S, d // 2), torch.empty(S, d // 2), kp[li], vp[li], seg_prefix, plen,
                             ks[li], vs[li], torch.empty(n, C), 0)
        expect = {"norm": (n, C), "qkv": (n, 3 * C), "attention": (n, C), "gate_up": (n, 2 * F), "act": (n, F),
                  "logits": (n, V)}
        _check((head, *buffers.values()))
        if head.shape != (V, C) or any(buffers[k].shape != shape for k, shape in expect.items()) or n != S * R:
            raise ValueError("DecodePlan: buffers of inconsistent shapes")
        ptrs = lambda ts: (ctypes.c_int64 * len(ts))(*(t.data_ptr() for t in ts))  # noqa: E731
        self._keep = (layers, head, prefix, ks, vs, buffers)  # the memory the pointers point into
        self.logits = buffers["logits"]
        self.n, self.C, self.S, self.d, self.M = n, C, S, d, M
        self._args = (len(layers), ptrs([w for layer in layers for w in layer]), head.data_ptr(),
                      *(buffers[k].data_ptr() for k in ("norm", "qkv", "attention", "gate_up", "act", "logits")),
                      n, C, F, V, eps)
        self._attention = (ptrs(kp), ptrs(vp), seg_prefix.data_ptr(), plen.data_ptr(), ptrs(ks), ptrs(vs))
        self._shape = (S, R, H, d, kp[0].shape[-1], M, scale)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: int) -> torch.Tensor:
        """One decoding step from the residual stream x (n, C), updated in place; the logits."""
        _check((x, cos, sin))
        if x.shape != (self.n, self.C) or not cos.shape == sin.shape == (self.S, self.d // 2) or not 0 <= step < self.M:
            raise ValueError("DecodePlan.step: inputs of inconsistent shapes")
        if load().decode_step(self._gemm, *self._args[:3], x.data_ptr(), *self._args[3:], cos.data_ptr(),
                              sin.data_ptr(), *self._attention, step, *self._shape, torch.get_num_threads()):
            raise ValueError("DecodePlan.step: inconsistent shapes")
        return self.logits


def gather_rows(cache: torch.Tensor, out: torch.Tensor, src: torch.Tensor, used: int) -> torch.Tensor:
    """A suffix cache in the kernel's layout, (S, H, blocks, R, ...), rebuilt in `out` (S', H,
    blocks, R, ...; not overlapping `cache`): row i (rows numbered segment-major) is old row
    src[i], -1 a padding row (left as is); only the first `used` blocks are copied."""
    _check((cache, out), (src,))
    S, H, Mb, R, *rest = cache.shape
    if not (out.shape[1:] == cache.shape[1:] and src.shape == (out.shape[0] * R,) and 0 <= used <= Mb
            and (len(src) == 0 or int(src.max()) < S * R)):
        raise ValueError("gather_rows: tensors of inconsistent shapes")
    load().gather_rows(cache.data_ptr(), out.data_ptr(), src.data_ptr(), len(src), R, H, Mb, math.prod(rest), used,
                       torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) per row of a float32 (n, C) tensor, without a weight; into
    `out` (n, C) where given."""
    out = torch.empty_like(x) if out is None else out
    _check((x, out))
    if out.shape != x.shape:
        raise ValueError("rms_norm: out must have the shape of x")
    load().rms_norm(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up for each row of a float32 (n, 2F) gate|up projection: (n, F), into `out`
    where given."""
    n, f2 = gate_up.shape
    out = torch.empty(n, f2 // 2) if out is None else out
    _check((gate_up, out))
    if out.shape != (n, f2 // 2):
        raise ValueError("silu_mul: out must be (n, F)")
    load().silu_mul(gate_up.data_ptr(), out.data_ptr(), n, f2 // 2, torch.get_num_threads())
    return out


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, keys: np.ndarray, step: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row (B,) from softmax(logits / temperature) of float32 (B, V) logits with
    positive per-row temperatures (B,), row b drawn with `seeding.step_uniforms(keys, step)[b]`:
    the draw of the sampler's PyTorch path (`TorchSampler`) in one pass per row, up to rounding
    at a CDF boundary. Into `out` (B,) int64 where given."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long) if out is None else out
    _check((temperature,), (out,))
    if not (logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.stride(1) == 1
            and temperature.shape == (B,) and out.shape == (B,) and keys.shape == (B,)
            and keys.dtype == np.uint64 and keys.flags.c_contiguous and bool((temperature > 0).all())):
        raise ValueError("sample_tokens: inconsistent logits, temperatures, keys or out")
    load().sample_tokens(logits.data_ptr(), B, V, logits.stride(0), temperature.data_ptr(), keys.ctypes.data,
                         step, out.data_ptr(), torch.get_num_threads())
    return out
