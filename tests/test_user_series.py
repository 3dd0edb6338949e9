"""A user's own series file through the CLI: every backend of the registry is reachable, options
are checked against the backend that takes them, URLs stay URLs, and a new backend is one
registration. (The `openai` model of examples/my-series.toml needs a server: tested elsewhere
against a real `transformers serve`.)"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from passuntil.backends import registry
from passuntil.backends.base import ScoringUnavailable
from passuntil.backends.simulated import SimulatedSampler
from passuntil.series import load_series
from tests.conftest import run_cli

EXAMPLES = Path(__file__).parents[1] / "examples"
BUNDLED = Path(__file__).parents[1] / "src/passuntil/bundled/tiny"


def _config(store: Path, run: str = "main") -> dict:
    con = sqlite3.connect(store)
    config = json.loads(con.execute("SELECT config_json FROM runs WHERE run_id=?", (run,)).fetchone()[0])
    con.close()
    return config


def test_example_series_file_parses_with_every_backend_it_names():
    series = load_series(str(EXAMPLES / "my-series.toml"))
    by_name = {m.name: m for m in series.models}
    assert [m.backend for m in series.models] == ["torch", "transformers", "openai"]
    assert by_name["small"].path == str((BUNDLED / "tiny-4").resolve())
    assert by_name["served"].path == "http://127.0.0.1:8000/v1"  # a URL stays a URL
    assert set(registry.names()) >= {"simulated", "torch", "transformers", "vllm", "openai"}


def test_registered_options_are_what_the_backends_take():
    """The registry's option lists stay in step with the samplers' constructors."""
    import inspect

    from passuntil.backends.hf import TransformersSampler
    from passuntil.backends.openai_compat import OpenAICompatSampler
    from passuntil.backends.torch_backend import TorchSampler

    def keywords(*fns):
        return {p for f in fns for p in inspect.signature(f).parameters} - {"self", "name", "kw"}

    takes = {"simulated": keywords(SimulatedSampler.__init__),
             "torch": keywords(TorchSampler.__init__, TorchSampler.from_folder) - {"model", "folder"},
             "transformers": keywords(TransformersSampler.__init__) - {"path"},
             "openai": keywords(OpenAICompatSampler.__init__) - {"base_url"}}
    for backend, params in takes.items():
        assert set(registry.get_backend(backend).options) <= params, backend


@pytest.mark.slow
def test_my_series_torch_and_transformers_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    store = tmp_path / "mine.sqlite"
    code, out, err = run_cli(capsys, "eval", "--series", str(EXAMPLES / "my-series.toml"), "--model", "small",
                             "--model", "medium", "--task", "arith", "--k", "1", "--max-samples", "4",
                             "--limit", "2", "--store", str(store))
    assert code == 0, err
    assert "4 instance results" in out
    con = sqlite3.connect(store)
    rows = con.execute("SELECT model, COUNT(*), SUM(samples) FROM results GROUP BY model ORDER BY model").fetchall()
    scored = con.execute("SELECT model, COUNT(*) FROM reference_scores GROUP BY model ORDER BY model").fetchall()
    con.close()
    assert [r[:2] for r in rows] == [("medium", 2), ("small", 2)]
    assert all(1 <= r[2] <= 8 for r in rows)  # at most the budget of 4 per instance
    assert scored == [("medium", 2), ("small", 2)]
    samplers = _config(store)["samplers"]
    assert samplers["small"]["backend"] == "torch" and samplers["small"]["dtype"] == "float32"
    assert samplers["medium"]["backend"] == "transformers" and samplers["medium"]["transformers"]
    code, out, err = run_cli(capsys, "show", str(store))
    assert code == 0 and "medium" in out and "small" in out, err


def _series(tmp_path, options: str, backend: str = "simulated") -> Path:
    path = tmp_path / "series.toml"
    path.write_text(f'[[models]]\nname = "a"\nn_params = 1e8\nbackend = "{backend}"\noptions = {options}\n')
    return path


@pytest.mark.parametrize("options, message", [
    ("{ latncy_s = 0 }", "unknown option(s) ['latncy_s']"),
    ("{ latency_s = -1 }", "option 'latency_s' must be >= 0"),
    ("{ latency_s = nan }", "option 'latency_s' must be a finite"),
    ('{ n_wrong = "8" }', "option 'n_wrong' must be a finite int"),
])
def test_bad_backend_options_are_refused_before_the_run_is_recorded(tmp_path, capsys, options, message):
    store = tmp_path / "s.sqlite"
    args = ["eval", "--task", "sim-scaling", "--store", str(store), "--max-samples", "20", "--limit", "2"]
    code, _, err = run_cli(capsys, *args, "--series", str(_series(tmp_path, options)))
    assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, *args, "--series", str(_series(tmp_path, "{ latency_s = 0 }")))
    assert code == 0, err  # the same run name is free


@pytest.mark.parametrize("model, message", [
    ('backend = "torch"\npath = "nowhere"', "no checkpoint folder at"),
    ('backend = "torch"', "needs 'path' = a checkpoint folder"),
    ('backend = "openai"\npath = "127.0.0.1:8000/v1"', "'path' must be an http(s) URL"),
    ('backend = "gguf"', "unknown backend 'gguf' (available: simulated, torch, transformers, vllm, openai"),
    ("n_params = inf", "n_params must be > 0 and finite"),
])
def test_bad_models_in_a_series_file_are_one_line(tmp_path, capsys, model, message):
    series = tmp_path / "s.toml"
    n = "" if "n_params" in model else "n_params = 1e6\n"
    series.write_text(f'[[models]]\nname = "m"\n{n}{model}\n')
    code, _, err = run_cli(capsys, "eval", "--task", "arith", "--series", str(series),
                           "--store", str(tmp_path / "s.sqlite"))
    assert code == 2 and message in err and err.count("\n") == 1, err


class NoScores(SimulatedSampler):
    def score(self, prompts, continuations):
        raise ScoringUnavailable("this server returns no prompt log-probs")


def test_a_new_backend_is_one_registration_and_may_be_unable_to_score(tmp_path, capsys, monkeypatch):
    """A backend registered once is usable from a series file with its own options; when it
    cannot score references the run goes on and says so (stored, shown by `show`), and a resume
    does not ask it again."""
    opened = []

    def factory(spec, tasks):
        opened.append(spec.name)
        base = registry.get_backend("simulated").factory(replace(spec, options={}), tasks)
        return NoScores(spec.name, base._truth)

    monkeypatch.setitem(registry._REGISTRY, "noscore", registry.Backend(
        "noscore", factory, options={"flavour": registry.Option(str)}))
    series = _series(tmp_path, '{ flavour = "plain" }', backend="noscore")
    store = tmp_path / "n.sqlite"
    args = ("eval", "--task", "sim-scaling", "--series", str(series), "--store", str(store),
            "--max-samples", "50", "--limit", "3")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "note: a: no reference scores: this server returns no prompt log-probs" in out
    code, out, _ = run_cli(capsys, "show", str(store))
    assert code == 0 and "note (a, reference scores): no reference scores" in out
    assert sqlite3.connect(store).execute("SELECT COUNT(*) FROM reference_scores").fetchone()[0] == 0
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume")
    assert code == 0, err
    assert opened == ["a"]  # finished, and its missing scores are a recorded fact: nothing reopened
