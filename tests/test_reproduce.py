"""`lctrun reproduce`: table definitions, smoke-scale tables end to end, and the run cache."""

import pandas as pd
import pytest

from lctrun.config import load_experiment
from lctrun.errors import ConfigError, LctrunError
from lctrun.reproduce import check_table, load_table, reproduce, run_cached, table_names

TINY = [
    "data.name=fake",
    "data.shape=[1,28,28]",
    "data.train_size=64",
    "data.test_size=32",
    "data.batch_size=32",
    "model.name=cnn-small",
    "submodels=false",
]


def test_the_issue_tables_exist():
    names = table_names()
    for name in ["lct-iclr-table1", "lct-iclr-table2", "lct-iclr-table3", "lct-iclr-table4", "lct-iclr-table4"]:
        assert name in names
    assert "lct-speed-memory" in names and "layer-parallel" in names


@pytest.mark.parametrize("name", table_names())
def test_every_table_loads_and_refers_to_existing_models_methods_datasets(name):
    table = load_table(name)
    check_table(table)  # raises on an unknown method, model or dataset at any scale
    assert table.title and table.source and table.runs
    for scale in ("smoke", "small", "paper"):
        assert table.scales[scale].get("note")


def test_unknown_tables_and_scales_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown table 'lct-iclr-table9': known tables are"):
        load_table("lct-iclr-table9")
    with pytest.raises(ConfigError, match="--scale 'huge' is not one of: smoke, small, paper"):
        reproduce("lct-iclr-table4", "huge", tmp_path)


def test_the_cache_reuses_a_finished_run_and_reruns_a_changed_config(tmp_path, monkeypatch):
    from lctrun.reproduce import Console

    console = Console(quiet=True)
    first, reused = run_cached(load_experiment(None, TINY), "bp", tmp_path, "abc", console)
    assert not reused and (first / "done.json").exists() and (first / "metrics.csv").exists()

    import lctrun.launch

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(lctrun.launch, "run_training", no_training)
    again, reused = run_cached(load_experiment(None, TINY), "bp", tmp_path, "abc", console)
    assert reused and again == first

    monkeypatch.undo()
    changed, reused = run_cached(load_experiment(None, TINY + ["optim.lr=0.01"]), "bp", tmp_path, "abc", console)
    assert not reused and changed != first
    other_code, reused = run_cached(load_experiment(None, TINY), "bp", tmp_path, "def", console)
    assert not reused and other_code not in (first, changed)


def test_the_code_version_ignores_presentation_modules_and_the_commit(tmp_path, monkeypatch):
    """Committing results/ (a new commit, or -dirty) must not retrain a table's runs; editing training code must."""
    from lctrun.reporting import rundir

    before = rundir.code_version()
    monkeypatch.setattr(rundir, "git_commit", lambda: "0000000-dirty")
    assert rundir.code_version() == before
    package = tmp_path / "lctrun"
    (package / "reporting").mkdir(parents=True)
    (package / "train.py").write_text("x = 1\n")
    (package / "reporting" / "tables.py").write_text("y = 1\n")
    monkeypatch.setattr(rundir, "PACKAGE", package)
    base = rundir.code_version()
    (package / "reporting" / "tables.py").write_text("y = 2\n")
    assert rundir.code_version() == base
    (package / "train.py").write_text("x = 2\n")
    assert rundir.code_version() != base


@pytest.mark.slow
def test_smoke_tables_run_end_to_end(tmp_path):
    sub = reproduce("lct-iclr-table4", "smoke", tmp_path)
    assert list(sub["item"]) == ["sub1", "sub2", "sub3", "main"] * 2
    assert sub.loc[0, "test_acc (paper)"] == 85.24
    assert sub.loc[0, "test_acc gap"] == pytest.approx(sub.loc[0, "test_acc"] - 85.24)
    out = tmp_path / "lct-iclr-table4-smoke"
    assert {"table.csv", "table.md", "accuracy.png"} <= {p.name for p in out.iterdir()}
    text = (out / "table.md").read_text()
    assert "scale: **smoke**" in text and "commit" in text and "not a reproduction of that setting" in text

    speed = reproduce("lct-speed-memory", "smoke", tmp_path)
    assert list(speed["workers"]) == [1, 2, 2, 2, 2, 4, 4, 4, 4]
    assert (speed["speedup"] > 0).all()
    bp = speed[speed["run"].str.startswith("bp")]
    assert len(bp) == 7 and bp["speedup_vs_best_bp"].max() == pytest.approx(1)  # the fastest bp is the baseline
    assert (speed["speedup_vs_best_bp"] <= speed["speedup"] + 1e-9).all()  # never easier than against bp 1 worker
    assert (speed["mb_sent_per_epoch"][1:] > 0).all() and speed.loc[0, "mb_sent_per_epoch"] == 0
    assert {"speedup.png", "memory.png"} <= {p.name for p in (tmp_path / "lct-speed-memory-smoke").iterdir()}
    csv = pd.read_csv(tmp_path / "lct-speed-memory-smoke" / "table.csv")
    assert len(csv) == 9


def test_an_interrupted_reproduction_retrains_only_what_had_not_finished(tmp_path, monkeypatch):
    """Stopped during its second run, `reproduce` run again reuses the finished run and trains only the other."""
    import lctrun.launch

    real = lctrun.launch.run_training
    trained, stop = [], {"at": 2}

    def counted(cfg, run_dir=None, **kwargs):
        trained.append(run_dir)
        if len(trained) == stop["at"]:
            raise LctrunError(f"interrupted: the second run ({run_dir})")
        return real(cfg, run_dir=run_dir, **kwargs)

    monkeypatch.setattr(lctrun.launch, "run_training", counted)
    with pytest.raises(LctrunError, match="interrupted"):
        reproduce("lct-iclr-table4", "smoke", tmp_path)
    finished = trained[:1]
    trained.clear()
    stop["at"] = None
    reproduce("lct-iclr-table4", "smoke", tmp_path)
    assert len(trained) == 1 and not set(trained) & set(finished)

    # a new commit (say, of the table just written) reuses every run
    from lctrun.reporting import rundir

    trained.clear()
    monkeypatch.setattr(rundir, "git_commit", lambda: "fffffff-dirty")
    reproduce("lct-iclr-table4", "smoke", tmp_path)
    assert trained == []
