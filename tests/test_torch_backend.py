from pathlib import Path

import pytest
import torch

from passuntil.backends import torch_backend
from passuntil.backends.base import SamplingParams
from passuntil.backends.torch_backend import TorchSampler, sampling_distribution
from passuntil.errors import UserError
from passuntil.models.tokenizer import encode
from passuntil.series import ModelSpec, open_sampler

BUNDLED = Path(__file__).parents[1] / "src/passuntil/bundled/tiny"
SMALL = BUNDLED / "tiny-3"


@pytest.fixture(scope="module")
def sampler():
    torch.set_num_threads(1)
    return TorchSampler.from_folder(SMALL)


def _texts(comps):
    return [c.text for c in comps]


def test_samples_do_not_depend_on_batching(sampler):
    a, b = "12+5=", "reverse: abc -> "
    sp = SamplingParams(n=12, seed=9, stop=("\n",), max_tokens=10)
    whole = sampler.generate([a], [sp])[0]
    first = sampler.generate([a], [SamplingParams(n=5, seed=9, stop=("\n",), max_tokens=10)])[0]
    rest, other = sampler.generate(
        [b, a], [SamplingParams(n=7, seed=1, stop=("\n",), max_tokens=10),
                 SamplingParams(n=7, seed=9, first_sample=5, stop=("\n",), max_tokens=10)])[::-1]
    assert _texts(whole) == _texts(first) + _texts(rest)
    small_rows = TorchSampler(sampler.model, max_rows=3)  # chunked into many small batches
    assert _texts(small_rows.generate([a], [sp])[0]) == _texts(whole)
    assert _texts(sampler.generate([a], [SamplingParams(n=12, seed=10, stop=("\n",), max_tokens=10)])[0]) != _texts(whole)


def test_repacking_rows_keeps_every_sample(sampler):
    """Rows that finish early are dropped and the rest repacked; each sample stays the one an
    unbatched decode (one row per chunk, never repacked) draws."""
    prompts = ["def f(x):\n", "reverse: hqt -> "]
    params = [SamplingParams(n=100, seed=4, stop=("\n\n",), max_tokens=40),
              SamplingParams(n=70, seed=5, stop=("\n",), max_tokens=30)]
    packed = TorchSampler(sampler.model)
    out = packed.generate(prompts, params)
    assert packed.repacks >= 2
    single = TorchSampler(sampler.model, max_rows=1)
    assert [_texts(o) for o in single.generate(prompts, params)] == [_texts(o) for o in out]
    assert single.repacks == 0 and single.row_steps > packed.row_steps


def test_split_attention_equals_one_softmax(monkeypatch):
    """Prefix (shared, padded) and per-row suffix attention, merged by log-sum-exps, equal one
    softmax over each row's whole context, with the fused CPU kernel and without it."""
    g = torch.Generator().manual_seed(0)
    S, H, R, T, d, s = 3, 2, 4, 7, 8, 5
    q = torch.randn(S, H, R, d, generator=g)
    kp, vp = torch.randn(2, S, H, T, d, generator=g)
    ks, vs = torch.randn(2, s, S, H, R, d, generator=g)
    plen = torch.tensor([7, 3, 5])
    mask = torch.where(torch.arange(T) < plen[:, None], 0.0, float("-inf"))[:, None, None, :]
    want = torch.empty(S, H, R, d)
    for i in range(S):
        for r in range(R):
            keys = torch.cat([kp[i, :, : plen[i]], ks[:, i, :, r].transpose(0, 1)], dim=1)  # (H, ctx, d)
            values = torch.cat([vp[i, :, : plen[i]], vs[:, i, :, r].transpose(0, 1)], dim=1)
            w = (keys @ q[i, :, r, :, None] / d**0.5).softmax(dim=1)  # (H, ctx, 1)
            want[i, :, r] = (w * values).sum(1)
    assert torch_backend._FLASH_CPU is not None  # torch 2.13 has the fused kernel
    fused = torch_backend._attend(q, kp, vp, mask, ks, vs, d**-0.5)
    monkeypatch.setattr(torch_backend, "_FLASH_CPU", None)
    plain = torch_backend._attend(q, kp, vp, mask, ks, vs, d**-0.5)
    assert (fused - want).abs().max() < 1e-5 and (plain - want).abs().max() < 1e-5


def test_series_options_choose_dtype_and_reject_unknown_ones(sampler):
    """`options: {dtype: bfloat16}` in a series file runs the checkpoint in bf16 (every sample
    still a well-formed completion, the exact probability within 25% of fp32's); a misspelt
    option is one clear error."""
    spec = ModelSpec("tiny-3", 8e4, "torch", str(SMALL), None, {"dtype": "bfloat16", "max_rows": 64})
    bf16 = open_sampler(spec, [])
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and bf16.max_rows == 64
    sp = SamplingParams(n=40, seed=2, stop=("\n",), max_tokens=6)
    comps = bf16.generate(["12+34="], [sp])[0]
    assert len(comps) == 40 and all(len(c.token_ids) <= 6 for c in comps)
    p16, p32 = (s.exact_pass_probability("12+34=", ["46"], sp) for s in (bf16, sampler))
    assert 0.8 < p16 / p32 < 1.25
    for options in ({"dtyp": "bfloat16"}, {"dtype": "fp8"}):
        with pytest.raises(UserError):
            open_sampler(ModelSpec("tiny-3", 8e4, "torch", str(SMALL), None, options), [])


def test_stop_and_length(sampler):
    comps = sampler.generate(["def f(x):\n"], [SamplingParams(n=64, seed=2, stop=("\n\n", "\ndef "), max_tokens=40)])[0]
    for c in comps:
        assert "\n\n" not in c.text and "\ndef " not in c.text
        assert len(c.token_ids) <= 40
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == 40
    assert {c.finish_reason for c in comps} == {"stop", "length"}


def test_greedy_matches_uncached_argmax_decoding(sampler):
    prompt = "reverse: hello -> "
    c = sampler.generate([prompt], [SamplingParams(n=3, temperature=0.0, max_tokens=12, stop=())])[0]
    assert len({x.text for x in c}) == 1
    ids = encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(12):
            logits, _ = sampler.model(torch.tensor([ids + out]))
            nxt = int(logits[0, -1].argmax())
            if nxt == 256:
                break
            out.append(nxt)
    assert list(c[0].token_ids) == out


def test_sampling_distribution_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    one = torch.ones(1)
    p = sampling_distribution(logits, one, torch.tensor([2]), one)
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    p = sampling_distribution(logits, one, torch.zeros(1, dtype=torch.long), torch.tensor([0.8]))
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    p = sampling_distribution(logits, torch.zeros(1), torch.zeros(1, dtype=torch.long), one)
    assert p.tolist() == [[1.0, 0, 0, 0, 0]]
    p = sampling_distribution(logits, torch.tensor([2.0]), torch.zeros(1, dtype=torch.long), one)
    assert torch.allclose(p, torch.softmax(logits / 2, -1))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.0, 5, 1.0)])
def test_exact_probability_matches_sampling(sampler, temperature, top_k, top_p):
    """The sampler samples what it claims: frequencies agree with the exact path probability."""
    n, informative = 4000, 0
    for prompt, ref in [("2+2=", "4"), ("3+4=", "7")]:
        sp = SamplingParams(n=n, seed=3, stop=("\n",), max_tokens=8, temperature=temperature,
                            top_k=top_k, top_p=top_p)
        freq = sum(c.text == ref for c in sampler.generate([prompt], [sp])[0]) / n
        exact = sampler.exact_pass_probability(prompt, [ref], sp)
        informative += exact > 0.005
        assert abs(freq - exact) <= 4 * (exact * (1 - exact) / n) ** 0.5 + 1e-12
    assert informative


def test_score_is_teacher_forced_logprob(sampler):
    prompt, cont = "12+5=", "17"
    (s,) = sampler.score([prompt], [cont])
    sp = SamplingParams(temperature=1.0, max_tokens=8)
    path = sampler._path_probability(prompt, encode(cont), sp)
    assert len(s.token_logprobs) == 2
    assert s.logprob == pytest.approx(torch.log(torch.tensor(path)).item(), abs=1e-4)
    assert s.loss == pytest.approx(-s.logprob / 2)


def test_transformers_sampler_gives_the_same_pass_rate(sampler):
    """transformers' own sampler on the same checkpoint passes as often as ours."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMALL).eval()
    prompt, ref, n = "2+2=", "4", 3000
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([encode(prompt)]), do_sample=True, top_k=0, top_p=1.0,
                          temperature=1.0, max_new_tokens=4, num_return_sequences=n,
                          pad_token_id=256, eos_token_id=256)
    hf_pass = 0
    for row in out[:, len(encode(prompt)):].tolist():
        text = bytes(t for t in row if t < 256).decode("utf-8", "replace")
        first_line, ended = text.split("\n")[0], "\n" in text or 256 in row  # stop or EOS
        hf_pass += first_line == ref and ended
    ours = sampler.generate([prompt], [SamplingParams(n=n, seed=4, stop=("\n",), max_tokens=4)])[0]
    our_pass = sum(c.text == ref and c.finish_reason == "stop" for c in ours)
    p = (hf_pass + our_pass) / (2 * n)
    assert p > 0.005
    assert abs(hf_pass - our_pass) / n <= 4 * (2 * p * (1 - p) / n) ** 0.5


@pytest.mark.slow
def test_passuntil_agrees_with_exact_probability_on_bundled_task():
    """Every instance of `arith`: PassUntil's interval covers the exact pass probability."""
    import dataclasses

    from passuntil import stats
    from passuntil.engine import EngineConfig, run_passuntil
    from passuntil.tasks import get_task
    from passuntil.tasks.checks import Exact

    model = TorchSampler.from_folder(BUNDLED / "tiny-4")
    task = dataclasses.replace(get_task("arith"), check=Exact(strip=False))  # exactly the references
    params = SamplingParams(stop=task.stop, max_tokens=task.max_new_tokens)
    exact = {x.id: model.exact_pass_probability(task.prompt(x), x.references, params) for x in task.instances}
    task = task.subset([i for i, p in exact.items() if p >= 1e-3])  # keep the sampling cost small
    assert len(task.instances) >= 10
    results = run_passuntil(model, [task], EngineConfig(k_target=2, max_samples=20_000, batch_size=4096, seed=1),
                            model="tiny-4")
    misses, ratios = 0, []
    for inst, r in zip(task.instances, results):
        p = exact[inst.id]
        low, high = stats.interval(r.passes, r.samples, k_target=2, confidence=0.999)
        misses += not (low <= p <= high)
        ratios.append(stats.pu_unbiased(r.passes, r.samples, k_target=2) / p)
    assert misses == 0
    assert 0.7 < sum(ratios) / len(ratios) < 1.3  # unbiased on average


@pytest.mark.gpu
def test_cuda_sampler_agrees_with_cpu(sampler):
    """On a GPU the sampler draws (nearly) the same samples: same seeds, floating point aside."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = TorchSampler.from_folder(SMALL, device="cuda")
    prompts = ["def f(x):\n", "reverse: hqt -> "]
    params = [SamplingParams(n=300, seed=4, stop=("\n\n",), max_tokens=40),
              SamplingParams(n=200, seed=5, stop=("\n",), max_tokens=30, top_p=0.9)]
    a = [_texts(o) for o in sampler.generate(prompts, params)]
    b = [_texts(o) for o in gpu.generate(prompts, params)]
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    assert same >= 0.95 * 500
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=20, stop=())
    assert _texts(gpu.generate(prompts[:1], [greedy])[0]) == _texts(sampler.generate(prompts[:1], [greedy])[0])
    exact = SamplingParams(max_tokens=6, stop=("\n",))
    assert gpu.exact_pass_probability("12+5=", ["17"], exact) == pytest.approx(
        sampler.exact_pass_probability("12+5=", ["17"], exact), rel=1e-3)
    assert gpu.score(["12+5="], ["17"])[0].token_logprobs == pytest.approx(
        sampler.score(["12+5="], ["17"])[0].token_logprobs, abs=1e-4)


def _modified_checkpoint(tmp_path, change: str) -> Path:
    """A copy of tiny-2 changed the one way the built-in sampler cannot run."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / change
    shutil.copytree(BUNDLED / "tiny-2", folder)
    cfg = json.loads((folder / "config.json").read_text())
    if change == "untied-head":
        state = load_file(str(folder / "model.safetensors"))
        state["lm_head.weight"] = state["model.embed_tokens.weight"] * 1.5
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg["tie_word_embeddings"] = False
    elif change == "gqa":  # one key/value head (the first one's weights) for the two query heads
        state = load_file(str(folder / "model.safetensors"))
        for name in [n for n in state if n.endswith(("k_proj.weight", "v_proj.weight"))]:
            state[name] = state[name][: cfg["head_dim"]].contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg["num_key_value_heads"] = 1
    elif change == "rope-scaling":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    elif change == "bpe-tokenizer":
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["model"]["vocab"]["Ġt"] = 257
        tok["model"]["merges"] = [["Ġ", "t"]]
        (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("change, said", [
    ("untied-head", "an untied LM head"), ("gqa", "grouped-query attention (1 key/value heads for 2"),
    ("rope-scaling", "RoPE scaling"), ("bpe-tokenizer", "a BPE tokenizer with 257 tokens and 1 merges")])
def test_checkpoints_it_cannot_run_are_refused_in_one_line(tmp_path, capsys, change, said):
    """Untied head, grouped-query attention, RoPE scaling, a tokenizer with merges: the old
    loader ran them silently wrong (head dropped, k/v heads or scaling ignored, bytes encoded);
    now `passuntil eval` says which and points to the transformers backend, in one line, and
    transformers still loads the same folder."""
    from conftest import run_cli

    folder = _modified_checkpoint(tmp_path, change)
    series = tmp_path / "s.toml"
    series.write_text(f'[[models]]\nname = "m"\nn_params = 23712\nbackend = "torch"\npath = "{folder}"\n')
    code, _, err = run_cli(capsys, "eval", "--task", "arith", "--series", str(series), "--store",
                           str(tmp_path / "r.sqlite"), "--max-samples", "2", "--limit", "1")
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(line) == 1 and said in line[0] and 'backend = "transformers"' in line[0], err
    assert "Traceback" not in err
    if change != "bpe-tokenizer":  # (the vocabulary grew past the embedding: transformers refuses that too)
        transformers = pytest.importorskip("transformers")
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_the_bundled_series_is_accepted():
    for folder in sorted(BUNDLED.glob("tiny-*")):
        torch_backend.refuse_unsupported(folder)


def test_a_token_budget_that_fills_the_context_is_refused_in_one_line(sampler):
    """`max_tokens` equal to the context (lm-eval's default 256 on the tiny series) used to keep
    the whole prompt (`ids[-0:]`) and run past the model's positions."""
    context = sampler.model.cfg.max_position_embeddings
    for max_tokens in (context, context + 10):
        with pytest.raises(UserError, match="leave no room for the prompt"):
            sampler.generate(["12+34="], [SamplingParams(n=2, max_tokens=max_tokens, seed=0)])
    out = sampler.generate(["12+34="], [SamplingParams(n=2, max_tokens=context - 8, stop=("\n",), seed=0)])
    assert len(out[0]) == 2
