import json

import pytest
import torch

from passuntil.errors import UserError
from passuntil.models.checkpoint import load_checkpoint, save_checkpoint
from passuntil.models.model import ModelConfig, Transformer
from passuntil.models.tokenizer import VOCAB_SIZE, decode, encode
from passuntil.models.train import SeriesConfig, lr_at, model_config, plan, train_one


def tiny_model(act="silu", seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=2, hidden_act=act)).eval()


def test_non_embedding_count_is_exact():
    m = tiny_model()
    total = sum(p.numel() for p in m.parameters())
    assert m.cfg.non_embedding_params() == total - m.embed_tokens.weight.numel()


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_checkpoint_round_trip_and_transformers_parity(tmp_path, act):
    transformers = pytest.importorskip("transformers")
    m = tiny_model(act)
    with torch.no_grad():  # non-trivial norms so a wrong norm convention would show
        for layer in m.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    save_checkpoint(m, tmp_path / "ck")
    assert not list((tmp_path / "ck").glob("*.bin")) and not list((tmp_path / "ck").glob("*.pt"))
    x = torch.randint(0, VOCAB_SIZE, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = m(x)[0]
        again = load_checkpoint(tmp_path / "ck")(x)[0]
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
        theirs = hf(x).logits
    assert torch.equal(ours, again)
    assert (ours - theirs).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ck")
    text = "def f(x):\n\treturn x + 1  # é ✓"
    assert tok.encode(text) == encode(text)
    assert decode(encode(text)) == text


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)
    save_checkpoint(tiny_model(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not match"):
        load_checkpoint(tmp_path / "ck")


def test_series_rule():
    cfg = SeriesConfig()
    plans = [plan(cfg, i) for i in cfg.indices]
    ns = [p["n_params"] for p in plans]
    assert len(ns) >= 6 and ns == sorted(ns) and ns[-1] / ns[0] >= 25
    for i in cfg.indices:
        mc = model_config(cfg, i)
        assert mc.num_hidden_layers == i >= 2 and mc.num_attention_heads == i
        assert mc.head_dim == cfg.head_dim and abs(mc.intermediate_size / mc.hidden_size - 2.5) < 0.2
    for p in plans:  # ~20 tokens per parameter, the same number of steps for every size
        assert 15 <= p["tokens"] / p["n_params"] <= 30


def test_cosine_schedule_ends_at_last_step():
    cfg = SeriesConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(9, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(99, cfg, 1.0) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 1.0) >= lr_at(s + 1, cfg, 1.0) for s in range(10, 99))


def test_training_resumes_to_identical_weights(tmp_path):
    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint16)
    cfg = SeriesConfig(steps=12, seq_len=32, eval_every=6, save_every_s=0.0, tokens_per_param=0.05)
    train_one(cfg, 2, data, data, tmp_path / "a")

    def crash(plan_, step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_one(cfg, 2, data, data, tmp_path / "b", progress=crash)
    assert (tmp_path / "b" / "train_state.json").exists()
    train_one(cfg, 2, data, data, tmp_path / "b")
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert not (tmp_path / "b" / "train_state.json").exists()
