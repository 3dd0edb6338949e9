"""The transformers backend: reproducible per-sample draws, stops while decoding, the model's own
distribution, the shared prompt cache (and its fallback), lm-eval's prompt/continuation split; on
the bundled checkpoints (which transformers loads as Llama) and on a GPT-2 and a GPT-NeoX built
here from configs with random weights and a BPE tokenizer trained here (nothing is downloaded)."""

import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from passuntil.backends import hf_attention  # noqa: E402
from passuntil.backends.base import SamplingParams  # noqa: E402
from passuntil.backends.hf import COPIES, SHARED, TransformersSampler  # noqa: E402
from passuntil.backends.torch_backend import TorchSampler, sampling_distribution  # noqa: E402

BUNDLED = Path(__file__).parents[1] / "src/passuntil/bundled/tiny"
SMALL = BUNDLED / "tiny-3"
CORPUS = "the cat sat on the mat. the dog sat on the log. a cat and a dog ate the rat.\n" * 50


@pytest.fixture(scope="module")
def llama():
    torch.set_num_threads(1)
    return TransformersSampler(str(SMALL))


def _bpe_folder(folder: Path):
    """A byte-level BPE tokenizer whose merges join a space to the word after it ("Ġsat"),
    trained here and saved in `folder`; returns its EOS id and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast.convert_tokens_to_ids("<|endoftext|>"), len(fast)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A 2-layer GPT-2 (learned absolute positions) with random, peaked weights and a byte-level
    BPE tokenizer."""
    folder = tmp_path_factory.mktemp("gpt2")
    eos, vocab = _bpe_folder(folder)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=eos, eos_token_id=eos, initializer_range=0.3)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return TransformersSampler(str(folder))


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A 2-layer GPT-NeoX as in Pythia (partial rotary embeddings, parallel residual), random
    peaked weights, the same BPE tokenizer."""
    folder = tmp_path_factory.mktemp("neox")
    eos, vocab = _bpe_folder(folder)
    torch.manual_seed(1)
    cfg = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64,
                                     bos_token_id=eos, eos_token_id=eos, initializer_range=0.3)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    return TransformersSampler(str(folder))


def _texts(comps):
    return [c.text for c in comps]


def test_sample_j_is_the_same_text_whatever_the_batch_size(llama):
    """256 samples drawn in one batch, in batches of 7 (`chunk`) beside another prompt, and one
    at a time (batch size 1: the first 64 by `chunk`, three more alone by `first_sample`): sample j is the same text every time
    (a hash of (seed, j, step) is its draw), on the shared prompt cache, whose rows of one prompt
    fill the batch, or share it unevenly with another prompt's."""
    assert llama.attention_path == SHARED
    prompt, other = "def f(x):\n", "reverse: abc -> "
    sp = SamplingParams(n=256, seed=9, stop=("\n\n",), max_tokens=8)
    whole = _texts(llama.generate([prompt], [sp])[0])
    assert len(set(whole)) > 25  # real variety, not one repeated text
    try:
        llama.chunk = 7
        sevens = _texts(llama.generate([other, prompt], [SamplingParams(n=5, seed=1), sp])[1])
        llama.chunk = 1  # the first 64 (each its own decode: seconds), three more alone below
        ones = _texts(llama.generate([prompt], [SamplingParams(n=64, seed=9, stop=("\n\n",), max_tokens=8)])[0])
    finally:
        llama.chunk = 1024
    assert whole == sevens and whole[:64] == ones
    alone = [llama.generate([prompt], [SamplingParams(n=1, seed=9, stop=("\n\n",), max_tokens=8, first_sample=j)])
             [0][0].text for j in (0, 100, 255)]
    assert alone == [whole[0], whole[100], whole[255]]
    assert _texts(llama.generate([prompt], [SamplingParams(n=256, seed=10, stop=("\n\n",), max_tokens=8)])[0]) \
        != whole


def test_draws_what_the_builtin_sampler_draws_on_a_bundled_checkpoint(llama):
    """Same seeds, same sampling function, same model: the same texts, token ids and finish
    reasons as the built-in sampler (floating point aside), with stops, early finishes and top-p."""
    prompts = ["def f(x):\n", "reverse: hqt -> ", "12+5="]
    params = [SamplingParams(n=150, seed=4, stop=("\n\n",), max_tokens=40),
              SamplingParams(n=100, seed=5, stop=("\n",), max_tokens=30),
              SamplingParams(n=50, seed=6, stop=("\n",), max_tokens=6, temperature=0.8, top_p=0.9)]
    ours = llama.generate(prompts, params)
    builtin = TorchSampler.from_folder(SMALL).generate(prompts, params)
    same = sum((a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
               for x, y in zip(ours, builtin) for a, b in zip(x, y))
    assert same >= 0.99 * 300


def test_rows_leave_the_batch_at_their_stop(llama):
    """Stops are applied while decoding: a row is computed only until its stop sequence (or
    EOS), far fewer row-steps than n x max_tokens, and no text holds a stop."""
    llama.row_steps = 0
    comps = llama.generate(["reverse: hqt -> "], [SamplingParams(n=200, seed=3, stop=("\n",), max_tokens=48)])[0]
    assert all("\n" not in c.text for c in comps)
    assert sum(c.finish_reason == "stop" for c in comps) >= 0.9 * 200
    assert all(len(c.token_ids) == 48 for c in comps if c.finish_reason == "length")
    needed = sum(len(c.token_ids) for c in comps)
    assert needed < 0.3 * 200 * 48 and llama.row_steps <= 1.5 * needed


def test_greedy_equals_transformers_generate_for_prompts_of_different_lengths(gpt2, neox, llama):
    """Prompts of different lengths decode together (explicit mask and positions, the shared
    prompt cache): greedy texts equal `generate(do_sample=False)` on each prompt alone, for
    GPT-2's learned positions, GPT-NeoX's partial rotary embeddings and Llama's RoPE; and no
    "attention mask is not set" warning."""
    for sampler, prompts in ((gpt2, ["the cat", "a dog ate the rat. the"]), (neox, ["the dog", "a cat sat on the"]),
                             (llama, ["1+1=", "reverse: abcdef -> "])):
        assert sampler.attention_path == SHARED
        sp = SamplingParams(n=2, temperature=0.0, max_tokens=12)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = sampler.generate(prompts, [sp, sp])
        assert not [w for w in caught if "attention mask" in str(w.message)]
        for prompt, comps in zip(prompts, ours):
            ids = torch.tensor([sampler._ids(prompt)])
            want = sampler.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                          pad_token_id=sampler.eos[0], eos_token_id=sampler.eos)[0, ids.shape[1]:]
            want = [t for t in want.tolist() if t not in sampler.eos]
            assert [list(c.token_ids) for c in comps] == [want, want]


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_shared_prompt_cache_draws_what_per_row_copies_draw(arch, request, monkeypatch):
    """The shared-prefix attention computes what the per-row prompt copies compute: its check
    against uncached forward passes agrees to 1e-5, and the same seeds draw the same texts,
    token ids and finish reasons (float rounding aside) for three prompts of different lengths
    with 90, 30 and 20 samples (two buckets of the prompt part, one of two prompts with empty
    cells), rows leaving at stops and at max_tokens; with the compiled one-pass attention (where
    the head size is a multiple of 16: GPT-2 and Llama here), PyTorch's fused CPU attention for
    the prompt part, and the matrix-product prompt part (CUDA's)."""
    shared = request.getfixturevalue(arch)
    copies = TransformersSampler(shared.name, share_prompt=False)
    assert shared.attention_path == SHARED and copies.attention_path.startswith(COPIES)
    assert shared._check_shared() < 1e-5
    prompts = ["the cat sat on the mat. the", "a dog", "the"] if arch != "llama" else \
        ["reverse: hqt -> ", "12+5=", "def"]
    params = [SamplingParams(n=90, seed=3, stop=(".",) if arch != "llama" else ("\n",), max_tokens=12),
              SamplingParams(n=30, seed=4, max_tokens=7, temperature=0.8, top_p=0.9),
              SamplingParams(n=20, seed=5, max_tokens=9)]
    want = [[(c.text, c.token_ids, c.finish_reason) for c in x] for x in copies.generate(prompts, params)]
    assert sum(len(c[1]) < 12 for c in want[0]) >= 10  # some rows leave early
    for kernel, flash in ((True, hf_attention._FLASH_CPU), (False, hf_attention._FLASH_CPU), (False, None)):
        monkeypatch.setattr(hf_attention, "USE_KERNEL", kernel)
        monkeypatch.setattr(hf_attention, "_FLASH_CPU", flash)
        got = [[(c.text, c.token_ids, c.finish_reason) for c in x] for x in shared.generate(prompts, params)]
        assert sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) >= 0.99 * 140


@pytest.mark.parametrize("heads, kv_heads, d", [(4, 2, 32), (3, 3, 16)])
def test_compiled_attention_computes_what_the_pytorch_path_computes(heads, kv_heads, d, monkeypatch):
    """The compiled shared-prefix attention against the PyTorch one on random keys and values:
    grouped-query heads (2 query heads per KV head) and not, prompts of 5, 19 and 33 positions
    (not multiples of 16) with 3, 10 and 1 rows, over 20 steps (the generated buffers grow past
    16 positions), rows leaving after step 7 (one prompt dropped: moved up in place) and two
    swapping places after step 12 (copied), queries given as a strided view (as GPT-2's
    attention passes them)."""
    if hf_attention._kernel()[0] is None:
        pytest.skip(f"no compiled kernel: {hf_attention._kernel()[1]}")
    gen = torch.Generator().manual_seed(0)
    prefixes = [[(torch.randn(1, kv_heads, n, d, generator=gen), torch.randn(1, kv_heads, n, d, generator=gen))]
                for n in (5, 19, 33)]
    src = [0] * 3 + [1] * 10 + [2]

    class Module:
        layer_idx = 0

    caches = {}
    for kernel in (True, False):
        monkeypatch.setattr(hf_attention, "USE_KERNEL", kernel)
        caches[kernel] = hf_attention.new_cache(prefixes, src)
        assert caches[kernel].layers[0].kernel == kernel
    rows, worst = len(src), 0.0
    for step in range(20):
        if step in (7, 12):  # prompt 2's only row leaves, and more; then two rows swap places
            keep = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] if step == 7 else [1, 0, *range(2, rows)])
            for cache in caches.values():
                cache.batch_select_indices(keep)
            rows = len(keep)
        qkv = torch.randn(rows, 1, heads * d + 2 * kv_heads * d, generator=gen)
        q = qkv[..., : heads * d].view(rows, 1, heads, d).transpose(1, 2)  # strided, as GPT-2's
        k = qkv[..., heads * d: (heads + kv_heads) * d].reshape(rows, 1, kv_heads, d).transpose(1, 2)
        v = qkv[..., (heads + kv_heads) * d:].reshape(rows, 1, kv_heads, d).transpose(1, 2)
        got = {}
        for kernel, cache in caches.items():
            keys, values = cache.layers[0].update(k, v)
            with hf_attention.active(cache):
                got[kernel] = hf_attention.shared_prefix_attention(Module, q, keys, values, None, scaling=0.3)[0]
        assert got[True].shape == (rows, 1, heads, d)
        worst = max(worst, float((got[True] - got[False]).abs().max()))
    assert worst < 1e-5


def test_falls_back_to_per_row_copies_where_the_shared_attention_does_not_apply(monkeypatch):
    """A model not on `sdpa` attention (here eager), or one whose check fails, decodes with
    per-row prompt copies, says why in `attention_path`, and draws the same texts."""
    eager = TransformersSampler(str(SMALL))
    eager.model.set_attn_implementation("eager")
    assert eager.attention_path == f"{COPIES} (attention implementation 'eager', not sdpa)"
    monkeypatch.setattr(TransformersSampler, "_check_shared", lambda self: 0.5)
    failed = TransformersSampler(str(SMALL))
    assert failed.attention_path == f"{COPIES} (its check differs from uncached logits by 0.5)"
    assert failed.model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    sp = SamplingParams(n=40, seed=2, stop=("\n",), max_tokens=10)
    texts = [_texts(s.generate(["12+5="], [sp])[0]) for s in (eager, failed, TransformersSampler(str(SMALL)))]
    assert sum(a == b == c for a, b, c in zip(*texts)) >= 39


def test_no_attention_mask_warning(llama, caplog):
    with caplog.at_level(logging.WARNING):
        llama.generate(["12+5="], [SamplingParams(n=4, seed=1, max_tokens=4)])
        llama.score(["12+5="], ["17"])
    assert "attention mask" not in caplog.text.lower()


def test_first_token_frequencies_follow_the_models_softmax(gpt2):
    """GPT-2 (random weights): the first token's sampled frequency agrees with the model's own
    sampling probability (binomial, |z| < 4) for its three likeliest tokens, plain and with
    temperature 0.7 + top-k 5."""
    prompt, n = "the cat sat", 3000
    ids = torch.tensor([gpt2._ids(prompt)])
    with torch.no_grad():
        logits = gpt2.model(ids, attention_mask=torch.ones_like(ids)).logits[0, -1:]
    for temperature, top_k in ((1.0, 0), (0.7, 5)):
        p = sampling_distribution(logits, torch.tensor([temperature]), torch.tensor([top_k]), torch.ones(1))[0]
        comps = gpt2.generate([prompt], [SamplingParams(n=n, seed=2, temperature=temperature, top_k=top_k,
                                                        max_tokens=1)])[0]
        first = torch.tensor([c.token_ids[0] if c.token_ids else gpt2.eos[0] for c in comps])
        for tok in p.argsort(descending=True)[:3].tolist():
            q = float(p[tok])
            assert q > 0.02
            assert abs(int((first == tok).sum()) - n * q) <= 4 * (n * q * (1 - q)) ** 0.5, (temperature, tok)


def test_score_splits_prompt_and_continuation_as_lm_eval_does(gpt2):
    """A trailing space of the prompt moves to the continuation ("the cat " + "sat" is scored
    as "the cat" + " sat", one BPE token "Ġsat", not "Ġ" + "sat"), and the scores are the
    model's log-probs of those tokens in one forward pass over the whole text."""
    ctx, cont = gpt2.encode_pair("the cat ", "sat")
    assert ctx == gpt2._ids("the cat") and cont == gpt2._ids(" sat") and len(cont) == 1
    assert gpt2._ids("the cat ") + gpt2._ids("sat") != ctx + cont  # the naive split differs
    whole = gpt2._ids("the cat sat on")
    ctx2, cont2 = gpt2.encode_pair("the cat", " sat on")
    assert ctx2 + cont2 == whole
    (s,) = gpt2.score(["the cat "], ["sat"])
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = gpt2.model(ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
    assert s.token_logprobs == pytest.approx([float(logp[len(ctx) - 1, cont[0]])], abs=1e-5)
    assert gpt2.encode_pair("", "the")[0] == [gpt2.bos]


@pytest.mark.slow
def test_pass_rate_agrees_with_the_exact_pass_probability_on_a_bundled_task():
    """On `arith` with tiny-7: the transformers backend's pass frequency on each of three
    instances agrees with the built-in sampler's exact pass probability (|z| < 4)."""
    from passuntil.tasks import get_task

    task = get_task("arith")
    builtin = TorchSampler.from_folder(BUNDLED / "tiny-7")
    hf = TransformersSampler(str(BUNDLED / "tiny-7"))
    params = SamplingParams(stop=task.stop, max_tokens=task.max_new_tokens)
    exact = {x.id: builtin.exact_pass_probability(task.prompt(x), x.references, params) for x in task.instances[:40]}
    chosen = [x for x in task.instances[:40] if exact[x.id] > 0.04][:3]
    assert len(chosen) == 3
    n = 2000
    sp = SamplingParams(n=n, seed=7, stop=task.stop, max_tokens=task.max_new_tokens)
    for inst, comps in zip(chosen, hf.generate([task.prompt(x) for x in chosen], [sp] * 3)):
        p = exact[inst.id]
        passes = sum(c.text in inst.references for c in comps)
        assert abs(passes - n * p) <= 4 * (n * p * (1 - p)) ** 0.5, (inst.id, passes / n, p)


@pytest.mark.gpu
def test_cuda_draws_what_the_cpu_draws():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu, gpu = TransformersSampler(str(SMALL)), TransformersSampler(str(SMALL), device="cuda")
    sp = SamplingParams(n=200, seed=4, stop=("\n",), max_tokens=30)
    a, b = (_texts(s.generate(["reverse: hqt -> "], [sp])[0]) for s in (cpu, gpu))
    assert sum(x == y for x, y in zip(a, b)) >= 0.95 * 200


def test_registry_opens_it_from_a_series_entry(tmp_path):
    from passuntil.series import ModelSpec, open_sampler

    folder = tmp_path / "m"
    shutil.copytree(SMALL, folder)
    sampler = open_sampler(ModelSpec("m", 8e4, "transformers", str(folder), None, {"chunk": 16}), [])
    assert isinstance(sampler, TransformersSampler) and sampler.chunk == 16


def test_without_a_compiler_the_transformers_sampler_says_so_once_and_records_the_path(tmp_path):
    """PATH without cc: `passuntil eval` on the transformers backend decodes with the PyTorch
    attention, prints one line naming why, and records it in the sampler note and fingerprint."""
    import json
    import os
    import sqlite3
    import subprocess
    import sys

    from passuntil.series import BUNDLED

    (tmp_path / "s.toml").write_text(f'name = "hf"\n[[models]]\nname = "m"\nbackend = "transformers"\n'
                                     f'path = "{BUNDLED / "tiny" / "tiny-2"}"\nn_params = 24000\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "PASSUNTIL_NO_KERNEL")}
    env.update(PATH=str(tmp_path), PASSUNTIL_DATA=str(tmp_path / "data"))
    store = tmp_path / "k.sqlite"
    done = subprocess.run([str(Path(sys.executable).with_name("passuntil")), "eval", "--task", "arith", "--series",
                           str(tmp_path / "s.toml"), "--store", str(store), "--max-samples", "4", "--limit", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [ln for ln in done.stderr.splitlines() if "attention runs in" in ln]
    why = "no C compiler (cc or $CC)"
    assert said == [f"passuntil: the transformers sampler's attention runs in PyTorch ({why}), not its compiled kernel"]
    config = json.loads(sqlite3.connect(store).execute("SELECT config_json FROM runs").fetchone()[0])
    assert config["samplers"]["m"]["attention_kernel"] == f"pytorch ({why})"
    notes = [n["note"] for n in config.get("notes", []) if n["note"].startswith("attention:")]
    assert notes == [f"attention: shared prompt cache; kernel: pytorch ({why})"], config.get("notes")
