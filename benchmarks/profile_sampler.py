"""Where one `TorchSampler.generate` spends its time (PyTorch profiler, top operators).

    .venv/bin/python benchmarks/profile_sampler.py [--device cuda] [--n 4096] [--rows 25]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from passuntil.backends.base import SamplingParams
from passuntil.backends.torch_backend import TorchSampler
from passuntil.tasks import get_task

TINY7 = Path(__file__).parents[1] / "src/passuntil/bundled/tiny/tiny-7"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    args = ap.parse_args()
    sampler = TorchSampler.from_folder(TINY7, device=args.device)
    tasks = [get_task(t) for t in ("arith", "dates", "reverse", "code")]
    prompts = [t.prompt(t.instances[0]) for t in tasks]
    params = [SamplingParams(n=args.n, seed=1, stop=t.stop, max_tokens=t.max_new_tokens) for t in tasks]
    sampler.generate(prompts, params)  # warm-up
    sampler._prefixes.clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        sampler.generate(prompts, params)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))
    if args.device.startswith("cuda"):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
