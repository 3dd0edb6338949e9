"""Save and load Hugging Face checkpoint folders (config.json, model.safetensors, tokenizer).

Weights are safetensors only: nothing is ever unpickled. `passuntil.json` beside them records
the non-embedding parameter count N and how the model was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from passuntil.errors import UserError
from passuntil.models.model import ModelConfig, Transformer
from passuntil.models.tokenizer import save_tokenizer


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under LlamaForCausalLM's names (lm_head is tied, so not stored)."""
    return {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: Transformer, folder: str | Path, *, meta: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    save_file(hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "pad_token_id": cfg.eos_token_id}, indent=1))
    save_tokenizer(folder, max_length=cfg.max_position_embeddings)
    info = {"n_params": cfg.non_embedding_params(), **(meta or {})}
    (folder / "passuntil.json").write_text(json.dumps(info, indent=1))
    return folder


def load_checkpoint(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a Llama-format folder written by us (or any compatible tiny Llama)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} is not a checkpoint folder (needs config.json and model.safetensors)")
    try:
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{folder}/config.json: {err}") from None
    model = Transformer(cfg)
    state = load_file(str(folder / "model.safetensors"))
    state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"{folder}: weights do not match config.json ({str(err).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not match config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.to(dtype).eval()


def checkpoint_info(folder: str | Path) -> dict:
    path = Path(folder) / "passuntil.json"
    return json.loads(path.read_text()) if path.is_file() else {}
