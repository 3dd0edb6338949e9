"""Built-in sampler vs transformers' generate, on the largest bundled model and real task prompts.

    .venv/bin/python benchmarks/sampling.py [--n 256] [--model tiny-7] [--dtype float32|bfloat16]
        [--tasks arith,dates,reverse,code] [--max-tokens M]

`--tasks humaneval --max-tokens 64` measures a long prompt (HumanEval/0's last 192 bytes: the
bundled models see 256 positions).

    .venv/bin/python benchmarks/sampling.py --ab-onecall 6 [--n 1024]

alternates the built-in sampler's whole-step-in-one-C-call path (BLAS sgemm) with the C kernels
called layer by layer from Python, in one process, and prints each one's times and medians.

    .venv/bin/python benchmarks/sampling.py --backend transformers [--arch llama|gpt2|gpt-neox|all] [--n 256]
        [--tasks humaneval --max-tokens 64] [--share-prompt off] [--rounds 3]

measures passuntil's transformers backend (`TransformersSampler`) against `generate(
num_return_sequences=n)` on the same weights and prompts: tiny-7 for llama; for gpt2 and gpt-neox
a model of tiny-7's width and depth (1,024 positions) built from a config with random weights
(and the bundled byte tokenizer); `--arch all` runs the three in one process and prints a summary
of the three ratios with the load average. Prints samples/s of each, the ratio, and, per prompt,
the share of samples whose first token is the model's likeliest and whose second is ASCII, for
each sampler with a two-proportion z (|z| < 4: the same distribution), and on llama the pass rate
of the task's references. With `--tasks humaneval` the prompt is HumanEval/0's (348 tokens; cut
to 256 - max tokens on tiny-7). `--rounds R` times ours then generate R times, alternating, and
prints the median of the per-round ratios (a round's two ran under about the same load).

Both sample the same weights for the same prompts (one instance of each bundled task):
ours through `TorchSampler.generate` (prompt prefilled once, shared KV cache, rows leave the
batch at their stop sequence), theirs with `generate(do_sample=True, num_return_sequences=n)`.
Prints samples/s for each and the ratio, and ours in GFLOP/s against this machine's fp32
matmul peak measured between its runs (each run against the peak just before and after it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
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
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--ab-onecall", type=int, default=0, metavar="ROUNDS",
                    help="alternate one-call steps with layer-by-layer C kernels, ROUNDS each")
    ap.add_argument("--backend", default="torch", choices=["torch", "transformers"])
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2", "gpt-neox", "all"])
    ap.add_argument("--rounds", type=int, default=1, help="transformers backend: alternate ours/generate")
    ap.add_argument("--share-prompt", default="on", choices=["on", "off"],
                    help="TransformersSampler's shared prompt cache (off: per-row prompt copies)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend == "transformers":
        return transformers_backend(args)
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
    if args.ab_onecall:
        return ab_onecall(ours, prompts, params, args.ab_onecall)
    # Median of 5 runs, each with an empty prefix cache. The matmul peak is measured between the
    # runs (1 s before the first and after each), so each run's share of it is taken against the
    # peak of the same minutes: on a shared machine the peak itself drifts by 20-40% in minutes.
    times, peaks = [], [matmul_peak(args.device, dtype, seconds=1.0)]
    for _ in range(5):
        ours._prefixes.clear()
        ours.row_steps = 0
        t0 = time.perf_counter()
        out = ours.generate(prompts, params)
        times.append(time.perf_counter() - t0)
        peaks.append(matmul_peak(args.device, dtype, seconds=1.0))
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

    # each run against the mean of the peaks measured just before and just after it
    shares = sorted(flops / t / 1e9 / ((peaks[i] + peaks[i + 1]) / 2) for i, t in enumerate(times))
    peak = float(np.median(peaks))
    ours_rate, hf_rate = n_samples / ours_s, hf_samples / hf_s
    print(f"  passuntil TorchSampler: {n_samples:,} samples in {ours_s:.2f}s = {ours_rate:,.0f} samples/s, "
          f"{flops / ours_s / 1e9:.1f} GFLOP/s; {useful:,} of {ours.row_steps:,} computed row-steps needed "
          f"({100 * useful / ours.row_steps:.0f}%)")
    print(f"  transformers generate:  {hf_samples:,} samples in {hf_s:.2f}s = {hf_rate:,.0f} samples/s")
    print(f"  {args.dtype} matmul peak ({'1024' if args.device == 'cpu' else '8192'}^2 on {args.device}), "
          f"measured between the runs: median {peak:.1f} GFLOP/s (range {min(peaks):.1f}-{max(peaks):.1f})")
    print(f"  share of the peak measured around each run: {', '.join(f'{100 * x:.0f}%' for x in shares)}")
    print(f"speed-up {ours_rate / hf_rate:.1f}x over transformers (target >= 15x); "
          f"{100 * shares[2]:.0f}% of matmul peak, median of the runs (target >= 55%)")


def ab_onecall(ours: TorchSampler, prompts, params, rounds: int) -> None:
    """One-call steps (sgemm) against layer-by-layer C kernels, alternating in one process: wall
    and CPU seconds of each call, medians, and the median of the per-round ratios (a round's two
    calls ran under about the same load)."""
    print(f"kernel path: {ours.kernel_path}")
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for one_call in (True, False):
            ours.one_call = one_call
            ours._prefixes.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            ours.generate(prompts, params)
            wall[one_call].append(time.perf_counter() - t0)
            cpu[one_call].append(time.process_time() - c0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for k, label in ((True, "one C call per step (sgemm)"), (False, "C kernels, matmuls from Python")):
        print(f"  {label}: wall median {med(wall[k]):.3f}s of {', '.join(f'{t:.3f}' for t in wall[k])}; "
              f"CPU median {med(cpu[k]):.3f}s of {', '.join(f'{t:.3f}' for t in cpu[k])}")
    for name, t in (("wall", wall), ("CPU", cpu)):
        ratio = med([a / b for a, b in zip(t[True], t[False])])
        print(f"one call / C kernels, median of per-round {name} ratios: {ratio:.3f} "
              f"(one call saves {100 * (1 - ratio):.1f}%; noisy on a shared machine)")


def _random_model(arch: str, like: Path, folder: Path, positions: int = 1024) -> Path:
    """A causal LM of `arch` with `like`'s width, depth, heads and vocabulary, random weights,
    `positions` positions (so that a HumanEval prompt fits whole), and `like`'s byte tokenizer
    files, saved in `folder`."""
    import json
    import shutil

    import transformers

    c = json.loads((like / "config.json").read_text())
    common = {"vocab_size": c["vocab_size"], "bos_token_id": 256, "eos_token_id": 256}
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=c["hidden_size"], n_layer=c["num_hidden_layers"],
                                      n_head=c["num_attention_heads"], n_positions=positions,
                                      initializer_range=0.2, **common)
    else:
        cfg = transformers.GPTNeoXConfig(hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                                         num_attention_heads=c["num_attention_heads"],
                                         intermediate_size=4 * c["hidden_size"], rotary_pct=0.25,
                                         max_position_embeddings=positions, initializer_range=0.2, **common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(like / name, folder / name)
    tok = json.loads((like / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": positions}))
    return folder


def transformers_backend(args) -> None:
    """passuntil's transformers backend against generate(num_return_sequences) (see module doc),
    for one architecture or (`--arch all`) each of llama (tiny-7), gpt2 and gpt-neox in turn,
    with a summary of the ratios and the load average before and after."""
    import os
    import tempfile

    archs = ["llama", "gpt2", "gpt-neox"] if args.arch == "all" else [args.arch]
    load0, ratios = os.getloadavg(), {}
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            ratios[arch] = _transformers_one(args, arch, Path(tmp))
    load1 = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load0)}; "
          f"after {', '.join(f'{x:.2f}' for x in load1)} ({os.cpu_count()} cores)")
    print("summary, TransformersSampler / generate: " + ", ".join(f"{a} {r:.1f}x" for a, r in ratios.items())
          + f" (target >= 5x; --tasks {args.tasks}, --n {args.n}"
          + (f", --max-tokens {args.max_tokens}" if args.max_tokens else "") + ")")


def _transformers_one(args, arch: str, tmp: Path) -> float:
    """One architecture: samples/s of each sampler, the ratio, and the same-distribution checks."""
    from passuntil.backends.hf import TransformersSampler

    like = BUNDLED / (args.model or "tiny-7")
    folder = like if arch == "llama" else _random_model(arch, like, tmp)
    ours = TransformersSampler(str(folder), device=args.device, dtype=args.dtype,
                               share_prompt=args.share_prompt == "on")
    tasks = [get_task(t) for t in args.tasks.split(",")]
    prompts = [t.prompt(t.instances[0]) for t in tasks]
    params = [SamplingParams(n=args.n, seed=1, stop=t.stop, max_tokens=args.max_tokens or t.max_new_tokens)
              for t in tasks]
    ours.generate(prompts, [SamplingParams(n=4, seed=0, stop=p.stop, max_tokens=p.max_tokens) for p in params])
    hf, rounds = ours.model, []
    for _ in range(args.rounds):  # ours then generate, alternating: a round's two ran under about the same load
        ours.row_steps = 0
        t0 = time.perf_counter()
        mine = ours.generate(prompts, params)
        ours_s = time.perf_counter() - t0
        theirs = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for prompt, sp in zip(prompts, params):
                ids = torch.tensor([ours._prompt_ids(prompt, sp.max_tokens)], device=args.device)
                gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                  temperature=1.0, max_new_tokens=sp.max_tokens, num_return_sequences=sp.n,
                                  pad_token_id=256, eos_token_id=256)
                theirs.append(gen[:, ids.shape[1]:].tolist())
        rounds.append((ours_s, time.perf_counter() - t0))
    n_samples = sum(sp.n for sp in params)
    lengths = [len(ours._prompt_ids(p, sp.max_tokens)) for p, sp in zip(prompts, params)]
    print(f"{arch} ({folder.name if arch == 'llama' else 'random weights, tiny-7 shape'}): "
          f"{len(prompts)} prompts ({', '.join(map(str, lengths))} tokens) x {args.n} samples, max tokens "
          f"{', '.join(str(sp.max_tokens) for sp in params)}; threads {torch.get_num_threads()}; "
          f"attention: {ours.attention_path}")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    ours_s, hf_s = med([a for a, _ in rounds]), med([b for _, b in rounds])
    ratio = med([b / a for a, b in rounds])
    print(f"  passuntil TransformersSampler: {n_samples / ours_s:,.0f} samples/s ({ours_s:.2f}s; "
          f"{ours.row_steps:,} row-steps)")
    print(f"  transformers generate:        {n_samples / hf_s:,.0f} samples/s ({hf_s:.2f}s)")
    # generate prefills every sample's prompt; ours each prompt once; both compute the rows' steps
    forwards = sum(lengths), sum(n * sp.n for n, sp in zip(lengths, params))
    print(f"  token positions through the model: ours {forwards[0]:,} prefill + {ours.row_steps:,} decoding; "
          f"generate {forwards[1]:,} prefill + its decoding steps")
    each = ", ".join(f"{b / a:.1f}" for a, b in rounds)
    print(f"  speed-up {ratio:.1f}x (target >= 5x)" + (f"; median of rounds {each}" if len(rounds) > 1 else ""))
    for task, prompt, sp, a, b in zip(tasks, prompts, params, mine, theirs):
        ids = torch.tensor([ours._prompt_ids(prompt, sp.max_tokens)], device=args.device)
        with torch.no_grad():
            top = int(hf(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        x = sum(bool(c.token_ids) and c.token_ids[0] == top for c in a)
        y = sum(row[0] == top for row in b)
        line = f"  {task.name}: first token = likeliest in {x}/{sp.n} (ours) vs {y}/{sp.n} (generate), " \
               f"z = {_z(x, y, sp.n):+.1f}"
        # the second token is drawn after a decoding step (the first comes from the prefill)
        x2 = sum(len(c.token_ids) > 1 and c.token_ids[1] < 128 for c in a)
        y2 = sum(len(row) > 1 and row[1] < 128 for row in b)
        line += f"; 2nd token ASCII {x2} vs {y2}, z = {_z(x2, y2, sp.n):+.1f}"
        if arch == "llama":
            refs = task.instances[0].references
            x = sum(c.text in refs for c in a)
            y = sum(decode(row).split(sp.stop[0])[0] in refs if sp.stop else decode(row) in refs for row in b)
            line += f"; passes {x} vs {y}, z = {_z(x, y, sp.n):+.1f}"
        print(line)
    return ratio


def _z(x: int, y: int, n: int) -> float:
    """Two-proportion z statistic of x/n against y/n."""
    p = (x + y) / (2 * n)
    return 0.0 if p in (0.0, 1.0) else (x - y) / n / (2 * p * (1 - p) / n) ** 0.5


if __name__ == "__main__":
    main()
