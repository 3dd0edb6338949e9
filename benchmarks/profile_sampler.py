"""Where one `generate` call spends its time (PyTorch profiler, top operators), for the built-in
sampler or for the transformers backend (tiny-7, or a GPT-2 / GPT-NeoX of its shape with random
weights, as `benchmarks/sampling.py --backend transformers --arch ...` builds them).

    .venv/bin/python benchmarks/profile_sampler.py [--device cuda] [--n 4096] [--rows 25]
    .venv/bin/python benchmarks/profile_sampler.py --backend transformers [--arch gpt2] [--n 256]

The transformers backend's compiled attention (one C call per layer, not a PyTorch operator)
shows as `passuntil::shared_prefix_attention`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from passuntil.backends.base import SamplingParams
from passuntil.tasks import get_task

TINY7 = Path(__file__).parents[1] / "src/passuntil/bundled/tiny/tiny-7"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    ap.add_argument("--backend", default="torch", choices=["torch", "transformers"])
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2", "gpt-neox"])
    ap.add_argument("--tasks", default="arith,dates,reverse,code", help="one prompt of each")
    ap.add_argument("--max-tokens", type=int, default=None, help="instead of each task's own")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [get_task(t) for t in args.tasks.split(",")]
    prompts = [t.prompt(t.instances[0]) for t in tasks]
    params = [SamplingParams(n=args.n, seed=1, stop=t.stop, max_tokens=args.max_tokens or t.max_new_tokens)
              for t in tasks]
    with tempfile.TemporaryDirectory() as tmp:
        if args.backend == "torch":
            from passuntil.backends.torch_backend import TorchSampler

            sampler = TorchSampler.from_folder(TINY7, device=args.device)
        else:
            from sampling import _random_model  # benchmarks/sampling.py, beside this file

            from passuntil.backends.hf import TransformersSampler

            folder = TINY7 if args.arch == "llama" else _random_model(args.arch, TINY7, Path(tmp))
            sampler = TransformersSampler(str(folder), device=args.device)
        sampler.generate(prompts, params)  # warm-up
        if hasattr(sampler, "_prefixes"):
            sampler._prefixes.clear()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            sampler.generate(prompts, params)
        if hasattr(sampler, "attention_path"):
            print(f"attention path: {sampler.attention_path}")
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))
    if args.device.startswith("cuda"):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
