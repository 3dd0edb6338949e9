"""The built-in sampler's compiled CPU kernels (cpu_kernel.c): decoding attention, RMSNorm and
SiLU-times-up, each one pass over its data.

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
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

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


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not)."""
    if os.environ.get("PASSUNTIL_NO_KERNEL") == "1":
        return None, "PASSUNTIL_NO_KERNEL=1"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SOURCE.exists():
        return None, "no C compiler (cc or $CC)" if cc is None else f"{SOURCE.name} is missing"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_fingerprint(),
                                        platform.machine()]).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"cpu_kernel-{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            # built beside the target and renamed: concurrent workers never load a half-written file
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                built = Path(tmp) / lib.name
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                               capture_output=True, timeout=300)
                os.replace(built, lib)
        dll = ctypes.CDLL(str(lib))
    except subprocess.CalledProcessError as e:
        return None, f"{cc} failed: {e.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building or loading the kernel failed: {e}"
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for name, args in (("decode_attention", [ptr] * 10 + [i64] * 7 + [f32, i64]),
                       ("rms_norm", [ptr, ptr, i64, i64, f32, i64]),
                       ("silu_mul", [ptr, ptr, i64, i64, i64])):
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


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kp_t: torch.Tensor,
                     vp: torch.Tensor, seg_prefix: torch.Tensor, plen: torch.Tensor, ks: torch.Tensor,
                     vs: torch.Tensor, out: torch.Tensor, step: int, scale: float) -> None:
    """One layer's decoding attention for all rows, written into `out`; writes position `step`
    of the suffix caches. Shapes (S segments of R rows, P prompts, M positions):
    qkv (S*R, 3*H*d); cos, sin (S, d/2); kp_t (P, H, d, T); vp (P, H, T, d); seg_prefix (S,);
    plen (P,); ks (M/4, S*R, H, d, 4); vs (M/16, S*R, H, 16, d); out (S*R, H*d)."""
    _check((qkv, cos, sin, kp_t, vp, ks, vs, out), (seg_prefix, plen))
    Mk, rows, H, d, _ = ks.shape
    Mv = vs.shape[0]
    S = seg_prefix.shape[0]
    R = rows // S
    P, T = kp_t.shape[0], kp_t.shape[-1]
    if not (qkv.shape == (S * R, 3 * H * d) and out.shape == (S * R, H * d) and ks.shape[-1] == 4
            and vs.shape == (Mv, S * R, H, 16, d) and cos.shape == sin.shape == (S, d // 2)
            and kp_t.shape == (P, H, d, T) and vp.shape == (P, H, T, d) and plen.shape == (P,)
            and 0 <= step < min(4 * Mk, 16 * Mv) and int(seg_prefix.max()) < P and int(plen.max()) <= T):
        raise ValueError("decode_attention: tensors of inconsistent shapes")
    args = [t.data_ptr() for t in (qkv, cos, sin, kp_t, vp, seg_prefix, plen, ks, vs, out)]
    if load().decode_attention(*args, step, S, R, H, d, T, min(4 * Mk, 16 * Mv), scale, torch.get_num_threads()):
        raise ValueError("decode_attention: head size and prefix length must be multiples of 16")


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) per row of a float32 (n, C) tensor, without a weight."""
    _check((x,))
    out = torch.empty_like(x)
    load().rms_norm(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for each row of a float32 (n, 2F) gate|up projection: (n, F)."""
    _check((gate_up,))
    n, f2 = gate_up.shape
    out = torch.empty(n, f2 // 2)
    load().silu_mul(gate_up.data_ptr(), out.data_ptr(), n, f2 // 2, torch.get_num_threads())
    return out
