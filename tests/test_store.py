import sqlite3

import pytest

from passuntil import store as store_mod
from passuntil.engine import EngineConfig, new_states, run_passuntil
from passuntil.errors import UserError
from passuntil.store import Store


def _make_run(store, run_id="r1"):
    store.create_run(run_id, {"engine": {"k_target": 2}}, [{"name": "m", "n_params": 1e6}])


def test_new_store_is_versioned_and_marked(store):
    db = store.db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA application_id").fetchone()[0] == store_mod.APPLICATION_ID
    versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, len(store_mod.MIGRATIONS) + 1))


def test_reopening_runs_no_migration_twice(tmp_path):
    Store(tmp_path / "s.sqlite").close()
    s = Store(tmp_path / "s.sqlite")
    assert s.db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(store_mod.MIGRATIONS)


def test_run_records_config_version_and_commit(store):
    _make_run(store)
    info = store.run_info("r1")
    assert info["config"] == {"engine": {"k_target": 2}}
    assert info["package_version"]
    assert info["git_commit"] is None or len(info["git_commit"]) == 40
    with pytest.raises(UserError, match="already exists"):
        _make_run(store)


def test_round_commits_reload_exactly(store, toy_task, toy_sampler):
    _make_run(store)
    cfg = EngineConfig(k_target=2, max_samples=3000, batch_size=256)
    results = run_passuntil(toy_sampler, [toy_task], cfg, model="m",
                            commit=lambda u: store.commit_round("r1", "m", u))
    states = new_states([toy_task], model="m", seed=cfg.seed)
    store.load_states("r1", "m", states)
    for st, r in zip(states, results):
        assert (st.samples, st.passes, tuple(st.pass_indices), st.stopped) == \
               (r.samples, r.passes, r.pass_indices, r.stopped)
        # completion counts add up to the counted samples (nothing counted twice)
        assert sum(st.completions.values()) + st.overflow == st.samples
        assert st.verdicts[toy_task.instances[0].references[0]] if st.instance.id == "i0" else True
    df = store.results("r1")
    assert len(df) == len(toy_task.instances) and (df["n_params"] == 1e6).all()
    counts = store.counts("r1", "m")  # the same, as plain frozen counts
    assert {c.instance_id: (c.samples, c.passes, c.pass_indices, c.stopped) for c in counts.values()} == \
           {r.instance_id: (r.samples, r.passes, r.pass_indices, r.stopped) for r in results}
    assert all(sum(n for _, n, _ in c.completions) + c.overflow == c.samples for c in counts.values())


def test_failed_round_rolls_back(store, toy_task):
    _make_run(store)
    states = new_states([toy_task], model="m", seed=0)
    from passuntil.engine import RoundUpdate

    st = states[0]
    st.samples, st.passes = 10, 1
    bad = RoundUpdate(st, {"x": 10})  # "x" was never verified: the write fails half-way
    with pytest.raises(KeyError):
        store.commit_round("r1", "m", [bad])
    assert store.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    foreign = tmp_path / "other.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="not a passuntil run store"):
        Store(foreign)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="not a readable run store"):
        Store(junk)
    assert junk.read_bytes().startswith(b"this is not")  # user data untouched
    with pytest.raises(UserError, match="no run store"):
        Store(tmp_path / "missing.sqlite", create=False)


def test_newer_schema_is_refused(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.db.execute("INSERT INTO schema_migrations VALUES (999, 'future')")
    s.close()
    with pytest.raises(UserError, match="newer passuntil"):
        Store(tmp_path / "s.sqlite")
