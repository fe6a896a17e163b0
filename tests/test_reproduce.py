"""`lctrun reproduce`: table definitions, smoke-scale tables end to end, and the run cache."""

import math

import pandas as pd
import pytest

from lctrun.config import load_experiment
from lctrun.errors import ConfigError, LctrunError
from lctrun.reporting.claims import last3_move
from lctrun.reproduce import check_table, convergence_curve, load_table, reproduce, run_cached, table_names

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


SCALES = {s: {"note": s, "overrides": ["data.name=fake", "model.name=cnn-small"]} for s in ("smoke", "small", "paper")}
# the last 3 epochs' test accuracy of each (run, seed): bp's seeds each move 0.4 but their mean only 0.1 (converged);
# LC's seeds move together, 1.0 (still moving); `short` has 2 epochs (not measured)
CURVES = {
    ("bp", 0): [90.0, 90.4, 90.2],
    ("bp", 1): [90.4, 90.0, 90.4],
    ("LC", 0): [85.0, 85.5, 86.0],
    ("LC", 1): [85.0, 85.5, 86.0],
    ("short", 0): [70.0, 71.0],
    ("short", 1): [70.0, 71.0],
}


def fake_run(tmp_path):
    """run_cached without training: a run directory with the metrics of CURVES, a workers.csv and, for runs
    with sub-models, a submodels.csv."""
    import json

    def run_cached(cfg, label, cache, code, console):
        run_dir = cache / f"{label}-{cfg.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        accs = CURVES[(label, cfg.seed)]
        pd.DataFrame(
            [{"epoch": e, "test_acc": a, "seconds": 1.0, "samples_per_s": 64.0} for e, a in enumerate(accs, 1)]
        ).to_csv(run_dir / "metrics.csv", index=False)
        pd.DataFrame(
            [{"epoch": e, "worker": 0, "compute_s": 1.0, "peak_mem_mb": 10.0, "bytes_sent": 0} for e in (1,)]
        ).to_csv(run_dir / "workers.csv", index=False)
        sub = {"model": ["sub1", "main"], "test_acc": [80.0, accs[-1]], "params": [1, 2], "flops": [1, 2]}
        pd.DataFrame({**sub, "flops_frac": [0.5, 1.0]}).to_csv(run_dir / "submodels.csv", index=False)
        (run_dir / "done.json").write_text(json.dumps({"commit": "abc1234"}))
        return run_dir, True

    return run_cached


def write_table_file(folder, name, body):
    (folder / f"{name}.yaml").write_text(f"title: {name}\nscales: {SCALES}\nseeds: {{smoke: 2}}\n" + body)


def test_every_row_says_whether_its_run_converged_and_claims_on_moving_runs_are_provisional(tmp_path, monkeypatch):
    import lctrun.reproduce as reproduce_module
    from lctrun.reproduce import Console

    tables = tmp_path / "tables"
    tables.mkdir()
    monkeypatch.setattr(reproduce_module, "TABLES_DIR", tables)
    monkeypatch.setattr(reproduce_module, "run_cached", fake_run(tmp_path))
    write_table_file(
        tables,
        "moving",
        "claims:\n"
        "  - {claim: LC above bp's sub1, check: '{LC} > {bp|sub1}'}\n"
        "  - {claim: bp's sub1 below 85, check: '{bp|sub1} < 85'}\n"
        "  - {claim: short below bp, check: '{short} < {bp|main}'}\n"
        "runs:\n"
        "  - {label: bp, overrides: [method=bp], rows: submodels}\n"
        "  - {label: LC, overrides: [method=lct, 'model.split=[conv1]']}\n"
        "  - {label: short, overrides: [method=bp]}\n",
    )
    console = Console(record=True, width=200)
    reproduce("moving", "smoke", tmp_path / "out", console)
    out = tmp_path / "out" / "moving-smoke"

    table = pd.read_csv(out / "table.csv", keep_default_na=False)
    by_row = {(r["run"], r["item"]): (r["last3_move"], r["converged"]) for _, r in table.iterrows()}
    assert by_row[("bp", "sub1")] == by_row[("bp", "main")]  # a sub-model row has its run's main-model curve
    assert float(by_row[("bp", "sub1")][0]) == pytest.approx(0.1) and by_row[("bp", "sub1")][1] == "yes"
    assert float(by_row[("LC", "")][0]) == pytest.approx(1.0) and by_row[("LC", "")][1] == "no"
    assert by_row[("short", "")][1] == "not measured"

    claims = pd.read_csv(out / "claims.csv", keep_default_na=False)
    assert list(claims["ours"]) == [
        "provisional (would hold; LC moved 1.00)",
        "holds",  # bp's seeds each moved 0.4, their mean 0.1: converged
        "provisional (would hold; short not measured)",
    ]
    assert list(claims["provisional_rows"]) == ["LC=1.00", "", "short=not measured"]

    md = (out / "table.md").read_text()
    assert "averaged over the seeds epoch by epoch, moves by less than 0.3 points" in md
    assert "take their run's main-model curve" in md
    assert "1 of 3 runs converged; still moving: LC 1.00; not measured: short" in md
    assert "| last3_move | converged |" in md and "provisional (would hold; LC moved 1.00)" in md
    text = console.export_text()
    assert "provisional (would hold; LC moved 1.00) LC above bp's sub1" in text
    assert "holds bp's sub1 below 85" in text


def test_a_table_without_claims_says_why_in_table_md_and_on_the_console(tmp_path, monkeypatch):
    import lctrun.reproduce as reproduce_module
    from lctrun.reproduce import Console

    tables = tmp_path / "tables"
    tables.mkdir()
    monkeypatch.setattr(reproduce_module, "TABLES_DIR", tables)
    monkeypatch.setattr(reproduce_module, "run_cached", fake_run(tmp_path))
    runs = "runs:\n  - {label: bp, overrides: [method=bp]}\n"
    write_table_file(tables, "silent", runs)
    with pytest.raises(ConfigError, match="a table without claims says why in no_claims"):
        load_table("silent")
    write_table_file(tables, "quiet", "no_claims: the paper's values are not available offline\n" + runs)
    console = Console(record=True, width=200)
    reproduce("quiet", "smoke", tmp_path / "out", console)
    md = (tmp_path / "out" / "quiet-smoke" / "table.md").read_text()
    assert "No claims are checked: the paper's values are not available offline" in md
    assert not (tmp_path / "out" / "quiet-smoke" / "claims.csv").exists()
    assert "no claims checked: the paper's values are not available offline" in console.export_text()


@pytest.mark.parametrize("name", table_names())
def test_every_shipped_table_has_claims_or_says_why_not(name):
    table = load_table(name)
    assert bool(table.claims) != bool(table.no_claims)


def test_a_pilot_with_fewer_seeds_runs_those_and_says_so_in_its_folder(tmp_path, monkeypatch):
    import lctrun.reproduce as reproduce_module

    tables = tmp_path / "tables"
    tables.mkdir()
    monkeypatch.setattr(reproduce_module, "TABLES_DIR", tables)
    ran = []
    fake = fake_run(tmp_path)
    monkeypatch.setattr(reproduce_module, "run_cached", lambda cfg, *args: ran.append(cfg.seed) or fake(cfg, *args))
    write_table_file(tables, "pilot", "no_claims: a test\nruns:\n  - {label: bp, overrides: [method=bp]}\n")
    reproduce("pilot", "smoke", tmp_path / "out", seeds=1)
    assert ran == [0]  # the table's 2 seeds replaced by 1
    assert "one seed" in (tmp_path / "out" / "pilot-smoke-seeds-1" / "table.md").read_text()
    with pytest.raises(ConfigError, match="--seeds 0: give at least 1"):
        reproduce("pilot", "smoke", tmp_path / "out", seeds=0)


def test_a_serial_parallel_hybrid_run_converges_over_its_cycle_ends():
    # four cycles of one parallel and one serial epoch: the parallel epochs dip by 0.5, the cycle ends stay flat
    accs = [80.0, 97.0, 97.9, 98.4, 97.9, 98.45, 97.95, 98.4]
    sph = [
        {"epoch": e, "phase": p, "test_acc": a}
        for e, (p, a) in enumerate(zip(["parallel", "serial"] * 4, accs, strict=True), 1)
    ]
    assert convergence_curve(sph) == {1: 97.0, 2: 98.4, 3: 98.45, 4: 98.4}
    assert last3_move([convergence_curve(sph)]) == pytest.approx(0.05)
    # the same accuracies without the phases: every epoch counts, and the dips are movement
    plain = [{"epoch": r["epoch"], "test_acc": r["test_acc"]} for r in sph]
    assert convergence_curve(plain) == {e: a for e, a in enumerate(accs, 1)}
    assert last3_move([convergence_curve(plain)]) == pytest.approx(0.5)
    # penalty without SPH runs only parallel epochs: judged per epoch; a cycle end without a test accuracy is a gap
    assert convergence_curve([{**r, "phase": "parallel"} for r in plain]) == convergence_curve(plain)
    gap = [dict(r) for r in sph]
    del gap[5]["test_acc"]
    assert math.isnan(last3_move([convergence_curve(gap)]))
