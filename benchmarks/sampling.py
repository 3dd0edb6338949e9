"""Built-in sampler vs transformers' generate, on the largest bundled model and real task prompts.

    .venv/bin/python benchmarks/sampling.py [--n 256] [--model tiny-7] [--dtype float32|bfloat16]
        [--tasks arith,dates,reverse,code] [--max-tokens M]

`--tasks humaneval --max-tokens 64` measures a long prompt (HumanEval/0's last 192 bytes: the
bundled models see 256 positions).

Both sample the same weights for the same prompts (one instance of each bundled task):
ours through `TorchSampler.generate` (prompt prefilled once, shared KV cache, rows leave the
batch at their stop sequence), theirs with `generate(do_sample=True, num_return_sequences=n)`.
Prints samples/s for each and the ratio, and ours in GFLOP/s against this machine's fp32
matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from passuntil.backends import cpu_kernel
from passuntil.backends.base import SamplingParams
from passuntil.backends.torch_backend import TorchSampler
from passuntil.models.tokenizer import decode
from passuntil.tasks import get_task

BUNDLED = Path(__file__).parents[1] / "src/passuntil/bundled/tiny"


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> float:
    """GFLOP/s of a large square matmul (the device's practical peak): 1024² on a CPU, 8192² on
    a GPU."""
    size = 1024 if device == "cpu" else 8192
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-rows", type=int, default=None, help="TorchSampler's rows per batch")
    ap.add_argument("--tasks", default="arith,dates,reverse,code", help="one prompt of each")
    ap.add_argument("--max-tokens", type=int, default=None, help="instead of each task's own")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both samplers run there)")
    args = ap.parse_args()
    folders = sorted((p for p in BUNDLED.glob("tiny-*") if (p / "metrics.json").exists()),
                     key=lambda p: int(p.name.split("-")[1]))
    folder = BUNDLED / args.model if args.model else folders[-1]
    dtype = getattr(torch, args.dtype)
    kw = {"max_rows": args.max_rows} if args.max_rows else {}
    ours = TorchSampler.from_folder(folder, dtype=args.dtype, device=args.device, **kw)
    tasks = [get_task(t) for t in args.tasks.split(",")]
    prompts = [t.prompt(t.instances[0]) for t in tasks]
    params = [SamplingParams(n=args.n, seed=1, stop=t.stop, max_tokens=args.max_tokens or t.max_new_tokens)
              for t in tasks]
    cfg = ours.model.cfg
    n_nonemb = cfg.non_embedding_params()
    print(f"model {folder.name}: N={n_nonemb:,} non-embedding, width {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers; {len(prompts)} prompts x {args.n} samples; dtype {args.dtype}; "
          f"threads {torch.get_num_threads()}; C kernels: "
          f"{'on' if ours._use_kernel() else 'off (' + (cpu_kernel.unavailable() or 'not for this dtype/device') + ')'}")

    ours.generate(prompts, params)  # warm-up: the steady state of repeated calls (PassUntil's rounds)
    times = []
    for _ in range(5):  # median of 5 runs, each with an empty prefix cache
        ours._prefixes.clear()
        ours.row_steps = 0
        t0 = time.perf_counter()
        out = ours.generate(prompts, params)
        times.append(time.perf_counter() - t0)
    ours_s = sorted(times)[2]
    # Useful work: each prompt's prefill once, then one forward position per sampled token after
    # the first (the first comes from the prefill; a row that ends computes nothing more).
    per_token = 2 * (n_nonemb + cfg.vocab_size * cfg.hidden_size)
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size  # per token per context position
    flops, useful = 0.0, 0
    for prompt, sp, comps in zip(prompts, params, out):
        ctx = len(ours._prompt_ids(prompt, sp.max_tokens))  # prefill: the LM head on the last position only
        flops += ctx * per_token - (ctx - 1) * 2 * cfg.vocab_size * cfg.hidden_size + attention * ctx * (ctx + 1) / 2
        for c in comps:
            ended_by_eos = c.finish_reason == "stop" and not any(decode(c.token_ids).endswith(st) for st in sp.stop)
            sampled = len(c.token_ids) + ended_by_eos
            useful += sampled - 1
            flops += sum(per_token + attention * (ctx + j) for j in range(1, sampled))
    n_samples = sum(len(c) for c in out)

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    with torch.no_grad():  # warm-up
        hf.generate(torch.tensor([[10, 11]], device=args.device), do_sample=True, max_new_tokens=4,
                    num_return_sequences=8, pad_token_id=256, eos_token_id=256)
    hf_samples, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for prompt, sp in zip(prompts, params):
            ids = ours._prompt_ids(prompt, sp.max_tokens)  # the prompt as ours sees it (cut to the context)
            hf.generate(torch.tensor([ids], device=args.device), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                        max_new_tokens=sp.max_tokens, num_return_sequences=sp.n, pad_token_id=256,
                        eos_token_id=256)
            hf_samples += sp.n
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    hf_s = time.perf_counter() - t0

    peak = matmul_peak(args.device, dtype)
    ours_rate, hf_rate = n_samples / ours_s, hf_samples / hf_s
    print(f"  passuntil TorchSampler: {n_samples:,} samples in {ours_s:.2f}s = {ours_rate:,.0f} samples/s, "
          f"{flops / ours_s / 1e9:.1f} GFLOP/s; {useful:,} of {ours.row_steps:,} computed row-steps needed "
          f"({100 * useful / ours.row_steps:.0f}%)")
    print(f"  transformers generate:  {hf_samples:,} samples in {hf_s:.2f}s = {hf_rate:,.0f} samples/s")
    print(f"  {args.dtype} matmul peak ({'1024' if args.device == 'cpu' else '8192'}^2 on {args.device}): "
          f"{peak:.1f} GFLOP/s")
    print(f"speed-up {ours_rate / hf_rate:.1f}x over transformers (target >= 15x); "
          f"{100 * flops / ours_s / 1e9 / peak:.0f}% of matmul peak (target >= 60%)")


if __name__ == "__main__":
    main()
