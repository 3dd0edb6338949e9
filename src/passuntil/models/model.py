"""A decoder-only transformer, numerically the same as Hugging Face `LlamaForCausalLM`.

RMSNorm, rotary embeddings (Llama's rotate-half convention), gated MLP (SiLU, or the paper's
gated GeLU), tied input/output embeddings, no biases. `forward(idx, targets=None)` returns
`(logits, loss)` like nanoGPT; `forward_cached` serves the sampler with a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters, named as in Hugging Face's LlamaConfig."""

    vocab_size: int = 264
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"  # or "gelu" (the paper's gated GeLU)
    bos_token_id: int = 256
    eos_token_id: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def non_embedding_params(self) -> int:
        """N of the scaling laws: every parameter except the (tied) token embedding."""
        w, f, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * w * w + 3 * w * f + 2 * w  # q,k,v,o + gate,up,down + two norms
        return layers * per_layer + w  # + final norm

    def to_hf(self) -> dict:
        """config.json for transformers' LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **asdict(self),
            "num_key_value_heads": self.num_attention_heads, "head_dim": self.head_dim,
            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
            "pad_token_id": self.eos_token_id,
        }

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        if d.get("model_type") != "llama":
            raise ValueError(f"expected a llama config, got model_type={d.get('model_type')!r}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) for the given positions."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, d); Llama's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.hidden_size
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(w, w, bias=False)
        self.k_proj = nn.Linear(w, w, bias=False)
        self.v_proj = nn.Linear(w, w, bias=False)
        self.o_proj = nn.Linear(w, w, bias=False)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape  # (B, T, C)
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = F.silu if cfg.hidden_act == "silu" else F.gelu

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Transformer(nn.Module):
    """Parameter names follow transformers' LlamaForCausalLM, so checkpoints load there too."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act not in ("silu", "gelu"):
            raise ValueError(f"hidden_act must be 'silu' or 'gelu', got {cfg.hidden_act!r}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.apply(self._init)
        for layer in self.layers:  # scaled init of residual projections (GPT-2)
            for p in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def hidden(self, idx, positions=None):
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device) if positions is None else positions
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = (t.to(x.dtype) for t in rope_tables(self.cfg, positions))
        kvs = []
        for layer in self.layers:
            x, kv = layer(x, cos, sin)
            kvs.append(kv)
        return self.norm(x), kvs

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy if targets are given."""
        h, _ = self.hidden(idx)
        logits = h @ self.embed_tokens.weight.T  # tied output embedding
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (matmuls incl. output layer) + attention (nanoGPT/PaLM)."""
        c = self.cfg
        n = c.non_embedding_params() + c.vocab_size * c.hidden_size
        return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len
