"""`lctrun compare`: runs per method and seed, the summary table (recomputed here from the run dirs), the plot,
and one-line errors before any run starts."""

import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lctrun.compare import compare
from lctrun.errors import ConfigError
from lctrun.reporting.rundir import git_commit

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo-fashion.yaml"
# the demo experiment cut into 3 groups, shrunk to a few batches of small random images
TINY = [
    "data.name=fake",
    "data.shape=[3,16,16]",
    "data.train_size=96",
    "data.test_size=64",
    "data.batch_size=32",
    "epochs=2",
    "critic.channels=8",
    "model.split=[conv1,conv2]",
]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    frame = compare(DEMO, "bp,lct", TINY, seeds=2, out_dir=out)
    return out, frame


def test_writes_summary_table_and_plot(two_seeds):
    out, frame = two_seeds
    for name in ["summary.csv", "summary.md", "accuracy.png", "runs.csv"]:
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in ["bp-s0", "bp-s1", "lct-s0", "lct-s1"]:
        assert (out / run / "metrics.csv").is_file(), run

    rows = read_csv(out / "summary.csv")
    assert [r["method"] for r in rows] == ["bp", "lct"]
    expected = ["method", "seeds", "final_test_acc", "final_test_acc_std", "best_test_acc", "best_test_acc_std"]
    expected += ["g1_test_acc", "g2_test_acc", "s_per_epoch", "peak_mem_mb"]
    assert list(rows[0]) == expected
    assert list(frame.columns) == expected
    assert rows[0]["g1_test_acc"] == "" and rows[1]["g2_test_acc"] != ""  # bp has no sub-models


def test_summary_is_mean_and_std_of_the_runs(two_seeds):
    out, _ = two_seeds
    summary = {r["method"]: r for r in read_csv(out / "summary.csv")}
    for method in ["bp", "lct"]:
        runs = [read_csv(out / f"{method}-s{seed}" / "metrics.csv") for seed in (0, 1)]
        assert all(len(r) == 2 for r in runs)
        final = [float(r[-1]["test_acc"]) for r in runs]
        best = [max(float(row["test_acc"]) for row in r) for r in runs]
        seconds = [statistics.mean(float(row["seconds"]) for row in r) for r in runs]
        got = summary[method]
        assert int(got["seeds"]) == 2
        assert float(got["final_test_acc"]) == pytest.approx(statistics.mean(final))
        assert float(got["final_test_acc_std"]) == pytest.approx(statistics.stdev(final))
        assert float(got["best_test_acc"]) == pytest.approx(statistics.mean(best))
        assert float(got["best_test_acc_std"]) == pytest.approx(statistics.stdev(best))
        assert float(got["s_per_epoch"]) == pytest.approx(statistics.mean(seconds))
        peak = max(float(row["peak_mem_mb"]) for r in runs for row in r)
        assert float(got["peak_mem_mb"]) == pytest.approx(peak)
        if method == "lct":
            for k in (1, 2):
                sub = [float(r[-1][f"g{k}_test_acc"]) for r in runs]
                assert float(got[f"g{k}_test_acc"]) == pytest.approx(statistics.mean(sub))
    # the seeds really differ: seed i of a compare is cfg.seed + i
    configs = [(out / f"bp-s{s}" / "config.yaml").read_text() for s in (0, 1)]
    assert "seed: 0" in configs[0] and "seed: 1" in configs[1]
    assert "method: lct" in (out / "lct-s1" / "config.yaml").read_text()


def test_markdown_header(two_seeds):
    out, _ = two_seeds
    text = (out / "summary.md").read_text()
    head = text.split("| method")[0]
    assert head.startswith("# Method comparison: demo-fashion")
    assert "dataset: fake, train 96 / test 64" in head
    assert f"commit: {git_commit()}" in head
    for word in ["epochs: 2", "seeds: 2", "hardware: ", "date: "]:
        assert word in head, word
    assert "| bp | 2 |" in text and " ± " in text


def test_unknown_method_fails_before_any_run(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(ConfigError, match="unknown method 'lcx'"):
        compare(DEMO, ["bp", "lcx"], TINY, out_dir=out)
    assert not out.exists()
    with pytest.raises(ConfigError, match="--seeds"):
        compare(DEMO, "bp", TINY, seeds=0, out_dir=out)
    assert not out.exists()


def lctrun(*args):
    return subprocess.run(
        [sys.executable, "-m", "lctrun", *args], capture_output=True, text=True, cwd=ROOT, env=os.environ, timeout=300
    )


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    res = lctrun("compare", "demo-fashion", "--methods", "bp,dgl", "--out", str(out), *TINY, "epochs=1")
    assert res.returncode == 0, res.stderr
    assert "run 1/2: bp seed 0" in res.stdout and "run 2/2: dgl seed 0" in res.stdout
    assert str(out) in res.stdout.replace("\n", "")
    rows = read_csv(out / "summary.csv")
    assert [r["method"] for r in rows] == ["bp", "dgl"]
    assert "final_test_acc_std" not in rows[0]  # one seed: no std columns
    assert (out / "accuracy.png").is_file() and (out / "summary.md").is_file()


def test_cli_unknown_method_is_one_line(tmp_path):
    out = tmp_path / "cmp"
    res = lctrun("compare", str(DEMO), "--methods", "bp,lct,dgx", "--out", str(out), *TINY)
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'dgx'"), res.stderr
    assert "run 1/" not in res.stdout and not out.exists()


def test_an_interrupted_comparison_reuses_finished_runs_and_says_how_to_continue(tmp_path, monkeypatch):
    """Stopped in its second run, `compare` run again with the same --out trains only that run (resumed);
    run a third time, it trains nothing. The interrupt names the compare command, not one run's resume."""
    import lctrun.launch
    from lctrun.errors import LctrunError

    real, trained, stop = lctrun.launch.run_training, [], {"at": 2}

    def counted(cfg, run_dir=None, **kwargs):
        trained.append((Path(run_dir).name, kwargs.get("resume")))
        if len(trained) == stop["at"]:
            raise LctrunError(f"interrupted: the run stopped; continue with: lctrun train --resume {run_dir}")
        return real(cfg, run_dir=run_dir, **kwargs)

    monkeypatch.setattr(lctrun.launch, "run_training", counted)
    out = tmp_path / "cmp"
    with pytest.raises(LctrunError, match=r"interrupted in run 2/2 \(lct seed 0\); 1 finished runs are kept") as e:
        compare(DEMO, "bp,lct", TINY, out_dir=out)
    assert f"lctrun compare {DEMO}" in str(e.value) and f"--out {out}" in str(e.value)
    first = (out / "bp-s0" / "metrics.csv").read_text()

    trained.clear()
    stop["at"] = None
    compare(DEMO, "bp,lct", TINY, out_dir=out)
    assert [name for name, _ in trained] == ["lct-s0"]
    assert (out / "bp-s0" / "metrics.csv").read_text() == first  # not retrained, not overwritten
    trained.clear()
    summary = compare(DEMO, "bp,lct", TINY, out_dir=out)
    assert trained == [] and list(summary["method"]) == ["bp", "lct"]

    with pytest.raises(ConfigError, match="holds another comparison's run bp-s0 .*give a new --out"):
        compare(DEMO, "bp,lct", TINY + ["optim.lr=0.5"], out_dir=out)


def test_a_method_can_run_on_distributed_workers_beside_bp_on_one_process(tmp_path):
    out = tmp_path / "cmp"
    summary = compare(DEMO, "bp,dgl@distributed", TINY + ["epochs=1"], out_dir=out)
    assert list(summary["method"]) == ["bp", "dgl@distributed"]
    assert (out / "dgl-distributed-s0" / "workers.csv").is_file()
    workers = read_csv(out / "dgl-distributed-s0" / "workers.csv")
    assert {w["worker"] for w in workers} == {"0", "1", "2"}  # three groups, three processes
    with pytest.raises(ConfigError, match="runtime 'gpu' is not one of serial, distributed"):
        compare(DEMO, "bp,lct@gpu", TINY, out_dir=tmp_path / "other")
