"""Train a model series: `passuntil train-series CONFIG`.

Series rule (after the paper's Table 3): index i sets depth, heads and width together, with a
fixed head dimension: layers = i, heads = i, width = head_dim * i, FFN = 2.5 * width.
Training tokens = tokens_per_param * N (20, compute-optimal); the number of optimizer steps is
the same for every size (the batch grows with the token budget), so sizes differ in model
and data, not in optimisation length. AdamW with a linear warm-up and a cosine schedule that
ends at the last step.

Each size writes a Hugging Face checkpoint folder plus `train_log.jsonl` (train and validation
loss curves) and `metrics.json`. A killed run resumes: finished sizes are skipped and the size
in progress continues from its last saved training state (safetensors + JSON, no pickles).
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from passuntil.errors import UserError
from passuntil.models.checkpoint import save_checkpoint
from passuntil.models.corpus import MIX, token_stream
from passuntil.models.model import ModelConfig, Transformer
from passuntil.models.tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class SeriesConfig:
    """What `train-series` reads from its TOML file."""

    name: str = "tiny"
    out: str = "series/tiny"
    indices: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    head_dim: int = 16
    ffn_ratio: float = 2.5
    tokens_per_param: float = 20.0
    steps: int = 1200
    seq_len: int = 256
    lr: float = 0.01  # peak learning rate at width 32, scaled by sqrt(32 / width)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    hidden_act: str = "silu"
    seed: int = 0
    eval_every: int = 100
    save_every_s: float = 120.0
    threads: int = 0  # 0: torch's default
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> SeriesConfig:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"no series config file {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"cannot parse {p}: {err}") from None
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"{p}: unknown setting(s) {sorted(unknown)}")
        if isinstance(raw.get("indices"), list):
            raw["indices"] = tuple(raw["indices"])
        cfg = cls(**raw)
        _validate(cfg, p)
        return cfg


# (field, kind, lowest allowed, highest allowed): every number must be finite and in range
_RANGES = (("head_dim", int, 1, None), ("ffn_ratio", float, 0, None), ("tokens_per_param", float, 0, None),
           ("steps", int, 1, None), ("seq_len", int, 1, None), ("lr", float, 0, None),
           ("min_lr_ratio", float, 0, 1), ("warmup_steps", int, 0, None), ("weight_decay", float, 0, None),
           ("seed", int, 0, None), ("eval_every", int, 1, None), ("save_every_s", float, 0, None),
           ("threads", int, 0, None))
_POSITIVE = {"ffn_ratio", "tokens_per_param", "lr", "save_every_s"}  # > 0, not just >= 0


def _validate(cfg: SeriesConfig, path: Path) -> None:
    """Refuse a config that would crash or train nonsense, naming the file and the setting."""
    def bad(msg: str):
        raise UserError(f"{path}: {msg}")

    for key in ("name", "out", "hidden_act"):
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            bad(f"{key} must be a non-empty string")
    if cfg.hidden_act not in ("silu", "gelu"):
        bad(f"hidden_act must be 'silu' or 'gelu' (got {cfg.hidden_act!r})")
    if not isinstance(cfg.extra, dict):
        bad("extra must be a table")
    idx = cfg.indices
    if (not isinstance(idx, tuple) or not idx
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)):
        bad(f"indices must be a non-empty list of integers (got {idx!r})")
    if min(idx) < 2:
        bad("every model needs at least 2 layers (index >= 2)")
    if len(set(idx)) != len(idx):
        bad(f"indices must be unique (got {list(idx)})")
    for key, kind, low, high in _RANGES:
        v = getattr(cfg, key)
        ok_type = (isinstance(v, int) if kind is int else isinstance(v, int | float)) and not isinstance(v, bool)
        if not ok_type:
            bad(f"{key} must be {'an integer' if kind is int else 'a number'} (got {v!r})")
        too_low = v <= low if key in _POSITIVE else v < low
        if not math.isfinite(v) or too_low or (high is not None and v > high):
            rng = f"in [{low}, {high}]" if high is not None else f"{'>' if key in _POSITIVE else '>='} {low}"
            bad(f"{key} must be finite and {rng} (got {v!r})")
    out = Path(cfg.out)
    for folder in (out, *out.parents):  # the nearest existing ancestor must be a folder
        if folder.exists():
            if not folder.is_dir():
                bad(f"out = {cfg.out!r}: {folder} is a file, not a folder")
            break


def model_config(cfg: SeriesConfig, i: int) -> ModelConfig:
    width = cfg.head_dim * i
    ffn = int(round(cfg.ffn_ratio * width / 8)) * 8
    return ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=ffn,
                       num_hidden_layers=i, num_attention_heads=i,
                       max_position_embeddings=cfg.seq_len, hidden_act=cfg.hidden_act)


def plan(cfg: SeriesConfig, i: int) -> dict:
    """Sizes, batch and token budget of model i."""
    mc = model_config(cfg, i)
    n = mc.non_embedding_params()
    tokens = cfg.tokens_per_param * n
    batch = max(1, round(tokens / (cfg.steps * cfg.seq_len)))
    return {"name": f"tiny-{i}", "index": i, "n_params": n, "batch": batch,
            "tokens": batch * cfg.steps * cfg.seq_len,
            "peak_lr": cfg.lr * math.sqrt(32 / mc.hidden_size),
            "flops": Transformer(mc).flops_per_token(cfg.seq_len) * batch * cfg.steps * cfg.seq_len}


def lr_at(step: int, cfg: SeriesConfig, peak: float) -> float:
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch(data: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator):
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    window = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    x = torch.from_numpy(window)
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate_loss(model: Transformer, data: np.ndarray, seq_len: int, *, batches: int = 16) -> float:
    model.eval()
    rng = np.random.default_rng(12345)
    losses = [model(*_batch(data, 8, seq_len, rng))[1].item() for _ in range(batches)]
    model.train()
    return float(np.mean(losses))


def _save_state(folder: Path, model, opt, step: int, log_tail: dict) -> None:
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    adam_step = 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"exp_avg.{names[id(p)]}"] = st["exp_avg"].contiguous()
                tensors[f"exp_avg_sq.{names[id(p)]}"] = st["exp_avg_sq"].contiguous()
                adam_step = int(st["step"])
    save_file(tensors, str(folder / "train_state.tmp.safetensors"))
    (folder / "train_state.tmp.json").write_text(json.dumps({"step": step, "adam_step": adam_step, **log_tail}))
    (folder / "train_state.tmp.safetensors").replace(folder / "train_state.safetensors")
    (folder / "train_state.tmp.json").replace(folder / "train_state.json")


def _load_state(folder: Path, model, opt) -> dict | None:
    if not (folder / "train_state.json").is_file():
        return None
    meta = json.loads((folder / "train_state.json").read_text())
    tensors = load_file(str(folder / "train_state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
    for name, p in model.named_parameters():
        if f"exp_avg.{name}" in tensors:
            opt.state[p] = {"step": torch.tensor(float(meta["adam_step"])),
                            "exp_avg": tensors[f"exp_avg.{name}"], "exp_avg_sq": tensors[f"exp_avg_sq.{name}"]}
    return meta


def train_one(cfg: SeriesConfig, i: int, data: np.ndarray, val: np.ndarray, folder: Path, progress=None) -> dict:
    """Train (or finish training) model i into `folder`; returns its final metrics."""
    p = plan(cfg, i)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed * 1000 + i)
    model = Transformer(model_config(cfg, i))
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=p["peak_lr"], betas=(0.9, 0.95), eps=1e-8)
    meta = _load_state(folder, model, opt)
    start = meta["step"] if meta else 0
    elapsed = meta.get("elapsed", 0.0) if meta else 0.0
    log_path = folder / "train_log.jsonl"
    if log_path.exists():  # keep only the steps the saved state includes
        kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    log = log_path.open("a")
    t0, last_save = time.monotonic(), time.monotonic()
    tokens_here = data[: p["tokens"] + cfg.seq_len + 1]
    model.train()
    loss_ema = None
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg, p["peak_lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = _batch(tokens_here, p["batch"], cfg.seq_len, np.random.default_rng([cfg.seed, i, step]))
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        record = {"step": step + 1, "lr": lr, "train_loss": loss.item()}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val_loss"] = evaluate_loss(model, val, cfg.seq_len)
        log.write(json.dumps(record) + "\n")
        if progress:
            progress(p, step + 1, loss_ema)
        if time.monotonic() - last_save > cfg.save_every_s and step + 1 < cfg.steps:
            log.flush()
            _save_state(folder, model, opt, step + 1, {"elapsed": elapsed + time.monotonic() - t0})
            last_save = time.monotonic()
    log.close()
    wall = elapsed + time.monotonic() - t0
    metrics = {**p, "steps": cfg.steps, "seq_len": cfg.seq_len, "final_train_loss": loss_ema,
               "final_val_loss": evaluate_loss(model, val, cfg.seq_len, batches=64),
               "wall_s": wall, "gflops_per_s": p["flops"] / max(wall, 1e-9) / 1e9,
               "config": asdict(model.cfg), "series": asdict(cfg), "corpus_mix": MIX}
    save_checkpoint(model, folder, meta={"name": p["name"], "training": metrics})
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for f in ("train_state.safetensors", "train_state.json"):
        (folder / f).unlink(missing_ok=True)
    return metrics


def is_trained(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() and (folder / "model.safetensors").is_file()


def write_series_file(cfg: SeriesConfig, out: Path) -> Path:
    """series.toml listing every finished model (backend "torch", paths relative to the file)."""
    lines = [f'name = "{cfg.name}"', ""]
    for i in cfg.indices:
        folder = out / f"tiny-{i}"
        if not is_trained(folder):
            continue
        m = json.loads((folder / "metrics.json").read_text())
        lines += ["[[models]]", f'name = "tiny-{i}"', f"n_params = {m['n_params']}",
                  f"train_tokens = {m['tokens']}", 'backend = "torch"', f'path = "tiny-{i}"', ""]
    path = out / "series.toml"
    path.write_text("\n".join(lines))
    return path


def train_series(cfg: SeriesConfig, *, console=None) -> list[dict]:
    """Train every size not yet trained, smallest first."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plans = [plan(cfg, i) for i in cfg.indices]
    todo = [p for p in plans if not is_trained(out / p["name"])]
    need = max((p["tokens"] for p in plans), default=0) + cfg.seq_len + 1
    data = token_stream(need, seed=cfg.seed) if todo else None
    val = token_stream(200_000, seed=cfg.seed + 1000) if todo else None
    total = sum(p["flops"] for p in todo)
    done_flops = 0.0
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console, disable=console is not None and not console.is_terminal) as bar:
        task = bar.add_task("train-series", total=max(total, 1.0))
        last_print = [0.0]
        for p in todo:
            def report(pl, step, loss, base=done_flops):
                frac = step / cfg.steps
                bar.update(task, completed=base + frac * pl["flops"],
                           description=f"{pl['name']} (N={pl['n_params']:,}) step {step}/{cfg.steps} loss {loss:.3f}")
                if console is not None and not console.is_terminal and time.monotonic() - last_print[0] > 60:
                    last_print[0] = time.monotonic()
                    rem = bar.tasks[0].time_remaining
                    print(f"train-series: {pl['name']} step {step}/{cfg.steps} loss {loss:.3f}"
                          f" eta {rem / 60 if rem else float('nan'):.1f} min", flush=True)
            metrics = train_one(cfg, p["index"], data, val, out / p["name"], progress=report)
            done_flops += p["flops"]
            write_series_file(cfg, out)
            print(f"trained {p['name']}: N={metrics['n_params']:,} val loss {metrics['final_val_loss']:.4f} "
                  f"in {metrics['wall_s'] / 60:.1f} min ({metrics['gflops_per_s']:.0f} GFLOP/s)", flush=True)
    write_series_file(cfg, out)
    return [json.loads((out / p["name"] / "metrics.json").read_text()) for p in plans if is_trained(out / p["name"])]
