"""The backend registry: each backend's name, factory, the options it accepts and its fingerprint.

A series file names a backend per model; everything about that backend the rest of passuntil
needs lives in one `Backend` record here: how to build a sampler, which `options` it takes (with
their types and ranges, so a typo or a bad value is refused before a run is recorded), what its
`path` holds (a checkpoint folder relative to the series file, or a URL that stays a URL), and
its *sampler fingerprint* (backend, package versions, dtype, kernel path, threads), recorded
with each run so that `--resume` on a different sampler is refused instead of mixing samples.

A new backend is one `register(Backend(...))` call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from passuntil.errors import UserError

if TYPE_CHECKING:  # ModelSpec lives in series.py, which imports this module
    from passuntil.backends.base import Sampler
    from passuntil.series import ModelSpec
    from passuntil.tasks.base import Task

# Fingerprint keys that may differ on resume: they do not change which sample a (seed, index)
# draws (the crash and Ray tests resume and shard across thread counts and get the same counts).
INFORMATIVE_KEYS = frozenset({"threads"})
# Keys added to fingerprints after runs were recorded without them: their absence from a stored
# fingerprint is not a mismatch (a run from before keeps resuming), a different value is.
LATER_KEYS = frozenset({"weights", "attention_kernel"})
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", "config.json", "tokenizer.json",
                "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")
BLOCK, BLOCKS = 1 << 16, 16  # a large file is digested by its size and 16 blocks of 64 KiB


@dataclass(frozen=True)
class Option:
    """One backend option: its type, and the range it must lie in."""

    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # said when `check` fails, e.g. "> 0"

    def validate(self, value: Any, *, where: str, name: str) -> None:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise UserError(f"{where}: option {name!r} must be a finite {names}, not {value!r}")
        if self.check is not None and not self.check(value):
            raise UserError(f"{where}: option {name!r} must be {self.requirement} (got {value!r})")


def _positive(x) -> bool:
    return x > 0


def _non_negative(x) -> bool:
    return x >= 0


def _one_of(*values: str) -> Option:
    return Option(str, lambda v: v in values, "one of " + ", ".join(values))


@dataclass(frozen=True)
class Backend:
    """Everything passuntil knows about one backend."""

    name: str
    factory: Callable[[ModelSpec, Sequence[Task]], Sampler]
    options: Mapping[str, Option] = field(default_factory=dict)
    path: str = "none"  # "none", "folder" (must exist), "folder-or-id", "url"
    fingerprint: Callable[[ModelSpec], dict] | None = None
    description: str = ""

    def validate(self, spec: ModelSpec, *, where: str) -> None:
        """Refuse unknown or out-of-range options and a missing or malformed `path`."""
        label = f"{where}: model {spec.name!r} ({self.name})"
        unknown = sorted(set(spec.options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise UserError(f"{label}: unknown option(s) {unknown}; the {self.name} backend "
                            f"accepts: {known}")
        for key, value in spec.options.items():
            self.options[key].validate(value, where=label, name=key)
        if self.path == "none":
            return
        if not spec.path:
            what = "the server's base URL" if self.path == "url" else "a checkpoint folder"
            raise UserError(f"{label}: needs 'path' = {what}")
        if self.path == "url" and urlsplit(spec.path).scheme not in ("http", "https"):
            raise UserError(f"{label}: 'path' must be an http(s) URL, not {redact_url(spec.path)!r}")
        if self.path == "url" and (urlsplit(spec.path).username or urlsplit(spec.path).password):
            # the URL is stored with the run and shown in reports: credentials never go there
            raise UserError(f"{label}: the URL {redact_url(spec.path)!r} carries credentials; put "
                            "the key in an environment variable named by options.api_key_env")
        if self.path == "folder" and not os.path.isdir(spec.path):
            raise UserError(f"{label}: no checkpoint folder at {spec.path}")

    def sampler_fingerprint(self, spec: ModelSpec) -> dict:
        """What decides the samples this backend draws for a (seed, index), besides the model."""
        fp = {"backend": self.name, "passuntil": _version("passuntil")}
        if self.fingerprint is not None:
            fp.update(self.fingerprint(spec))
        return fp


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; the series files, `open_sampler` and the run layer see it."""
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str, *, where: str = "") -> Backend:
    if name not in _REGISTRY:
        raise UserError(f"{where + ': ' if where else ''}unknown backend {name!r} "
                        f"(available: {', '.join(names())})")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def open_sampler(spec: ModelSpec, tasks: Iterable[Task]) -> Sampler:
    """Build the sampler of one model through its backend's factory."""
    return get_backend(spec.backend).factory(spec, list(tasks))


def fingerprint_mismatch(old: Mapping, new: Mapping) -> str | None:
    """The first fingerprint field that differs (and matters), as "key: old -> new"; else None."""
    for key in [*new, *(k for k in old if k not in new)]:
        if key in LATER_KEYS and key not in old:
            continue
        if key not in INFORMATIVE_KEYS and old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def weights_digest(path: str | None) -> str | None:
    """A digest of a checkpoint folder's weights, config and tokenizer files, so that `--resume`
    after the checkpoint was retrained or replaced in place is refused instead of mixing samples
    of two models. Files up to 4 MiB are read whole; a larger one by its size and 16 evenly
    spaced 64 KiB blocks (first and last included): retraining changes every block, while a
    copied, moved or re-touched checkpoint keeps its digest (no file times are used). None for a
    path that is not a local folder (a hub id, a URL)."""
    import hashlib

    if not path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(WEIGHT_FILES):
                continue
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            h.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
            with open(full, "rb") as f:
                if size <= BLOCKS * BLOCK * 4:
                    h.update(f.read())
                    continue
                for i in range(BLOCKS):
                    f.seek((size - BLOCK) * i // (BLOCKS - 1))
                    h.update(f.read(BLOCK))
    return h.hexdigest()[:16]


def redact_url(url: str) -> str:
    """A URL without credentials (user:password@) or query string, safe to store and print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# the built-in backends ---------------------------------------------------------------------------

def _simulated(spec: ModelSpec, tasks: Sequence[Task]) -> Sampler:
    from passuntil.backends.simulated import SimulatedSampler
    from passuntil.tasks.simulated import law_probability

    truth = {}
    for task in tasks:
        for inst in task.instances:
            if "law" not in inst.meta:
                raise UserError(f"the simulated backend cannot run task {task.name!r}: "
                                "it knows only the simulated tasks")
            truth[task.prompt(inst)] = (inst.references[0],
                                        law_probability(inst.meta["law"], spec.n_params))
    return SimulatedSampler(spec.name, truth, **dict(spec.options))


def _torch(spec: ModelSpec, tasks: Sequence[Task]) -> Sampler:
    from passuntil.backends.torch_backend import TorchSampler

    return TorchSampler.from_folder(spec.path, name=spec.name, **dict(spec.options))


def _torch_fingerprint(spec: ModelSpec) -> dict:
    import torch

    from passuntil.backends import cpu_kernel

    dtype = spec.options.get("dtype", "float32")
    device = spec.options.get("device", "cpu")
    fp = {"torch": torch.__version__, "dtype": dtype, "device": torch.device(device).type,
          "threads": torch.get_num_threads(), "weights": weights_digest(spec.path)}
    if fp["device"] == "cpu" and dtype == "float32":
        # the compiled kernel is built with -march=native: the CPU's features can change its sums
        fp["kernel"] = cpu_kernel.kernel_path()  # e.g. "c-onecall+mkl-sgemm", "pytorch (why)"
        if cpu_kernel.load() is not None:
            import hashlib

            fp["cpu"] = hashlib.sha256(cpu_kernel._cpu_fingerprint().encode()).hexdigest()[:12]
    else:
        fp["kernel"] = "pytorch"
    return fp


def _transformers(spec: ModelSpec, tasks: Sequence[Task]) -> Sampler:
    from passuntil.backends.hf import TransformersSampler

    return TransformersSampler(spec.path, name=spec.name, **dict(spec.options))


def _transformers_fingerprint(spec: ModelSpec) -> dict:
    import torch

    return {"torch": torch.__version__, "transformers": _version("transformers"),
            "sampling": "row-keyed inverse CDF",  # draws as the built-in sampler's (backends/hf.py)
            "dtype": spec.options.get("dtype", "float32"),
            "device": torch.device(spec.options.get("device", "cpu")).type,
            "threads": torch.get_num_threads(), "weights": weights_digest(spec.path),
            "attention_kernel": _hf_attention_kernel(spec)}


def _hf_attention_kernel(spec: ModelSpec) -> str:
    """Whether a CPU float32 decode can run the compiled attention (`hf_attention`): its sums
    differ from PyTorch's by float rounding, so a resume or a Ray worker must use the same."""
    import torch

    if spec.options.get("dtype", "float32") != "float32" or torch.device(spec.options.get("device", "cpu")).type != "cpu":
        return "pytorch"
    if not spec.options.get("share_prompt", True):
        return "pytorch (share_prompt=False)"
    from passuntil.backends import hf_attention

    lib, why = hf_attention._kernel()
    return "compiled one-pass" if lib is not None else f"pytorch ({why})"


def _vllm(spec: ModelSpec, tasks: Sequence[Task]) -> Sampler:
    from passuntil.backends.vllm_backend import VLLMSampler

    return VLLMSampler(spec.path, name=spec.name, **dict(spec.options))


def _vllm_fingerprint(spec: ModelSpec) -> dict:
    return {"vllm": _version("vllm"), "torch": _version("torch"), "weights": weights_digest(spec.path),
            "dtype": spec.options.get("dtype", "auto"),
            "tensor_parallel_size": spec.options.get("tensor_parallel_size", 1)}


def _openai(spec: ModelSpec, tasks: Sequence[Task]) -> Sampler:
    from passuntil.backends.openai_compat import OpenAICompatSampler

    opts = dict(spec.options)
    return OpenAICompatSampler(spec.path, opts.pop("model", spec.name), name=spec.name, **opts)


def _openai_fingerprint(spec: ModelSpec) -> dict:
    return {"url": redact_url(spec.path or ""), "model": spec.options.get("model", spec.name)}


_DTYPES = _one_of("float32", "bfloat16", "float16")

register(Backend(
    "simulated", _simulated, path="none", description="known pass probabilities, no model",
    options={"n_wrong": Option(int, _positive, "> 0"),
             "latency_s": Option(float, _non_negative, ">= 0")}))
register(Backend(
    "torch", _torch, path="folder", fingerprint=_torch_fingerprint,
    description="the built-in sampler (Llama-shaped checkpoint folders)",
    options={"dtype": _DTYPES, "device": Option(str),
             "max_rows": Option(int, _positive, "> 0"),
             "cache_bytes": Option(int, _positive, "> 0"),
             "prefix_cache": Option(int, _non_negative, ">= 0")}))
register(Backend(
    "transformers", _transformers, path="folder-or-id", fingerprint=_transformers_fingerprint,
    description="any causal LM that transformers loads",
    options={"dtype": _DTYPES, "device": Option(str), "chunk": Option(int, _positive, "> 0"),
             "cache_bytes": Option(int, _positive, "> 0"), "share_prompt": Option(bool)}))
register(Backend(
    "vllm", _vllm, path="folder-or-id", fingerprint=_vllm_fingerprint,
    description="vLLM's offline engine (GPU)",
    options={"dtype": Option(str), "tensor_parallel_size": Option(int, _positive, "> 0"),
             "gpu_memory_utilization": Option(float, lambda v: 0 < v <= 1, "in (0, 1]"),
             "max_model_len": Option(int, _positive, "> 0"),
             "max_num_seqs": Option(int, _positive, "> 0"),
             "enforce_eager": Option(bool), "trust_remote_code": Option(bool),
             "quantization": Option(str), "seed": Option(int, _non_negative, ">= 0"),
             "swap_space": Option(float, _non_negative, ">= 0")}))
register(Backend(
    "openai", _openai, path="url", fingerprint=_openai_fingerprint,
    description="any OpenAI-compatible /v1/completions server",
    options={"model": Option(str), "api_key_env": Option(str),
             "concurrency": Option(int, _positive, "> 0"), "retries": Option(int, _non_negative, ">= 0"),
             "timeout_s": Option(float, _positive, "> 0"), "backoff_s": Option(float, _non_negative, ">= 0"),
             "logprobs": Option(bool), "check_sampling": Option(bool),
             "server": _one_of("auto", "openai", "transformers"), "eos_tokens": Option((str, list))}))
