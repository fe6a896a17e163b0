"""`lctrun bench`: its summary of repeats, and every configuration measured in fresh worker processes."""

import math
import os

import pytest

from lctrun.bench import bench, critical_path_s, median_and_spread


@pytest.mark.parametrize(
    "speeds, median, spread",
    [
        ([100.0], 100.0, 0.0),
        ([90.0, 110.0, 100.0], 100.0, 0.2),
        ([100.0, 110.04], 105.02, 0.096),
        ([100.0, 110.04, 95.0], 100.0, 0.15),
        ([95.0, 105.0, 100.0, 100.0], 100.0, 0.1),  # 0.1 exactly: printed as 0.1, and not above NOISY
    ],
)
def test_median_and_spread_are_what_the_table_prints(speeds, median, spread):
    got_median, got_spread = median_and_spread(speeds)
    assert math.isclose(got_median, median) and got_spread == spread


def test_bench_measures_every_configuration(tmp_path):
    frame = bench(
        "cnn-small",
        groups=2,
        batch=16,
        shape=(1, 28, 28),
        methods=["bp", "lct"],
        steps=3,
        warmup=1,
        repeats=1,  # the rounds and the median: test_a_slow_spell_lands_on_one_round_of_every_row, without workers
        schedules=["gpipe"],
        microbatches=[2],
        depths=[1],
        # deterministic cuts: by FLOPs bp cuts after conv2, lct with a wide critic after fc1
        overrides=["model.balance=flops", "critic.channels=256"],
        out_dir=tmp_path,
    )
    assert list(frame["config"]) == [
        "bp 1 worker, 1 thread",
        f"bp 1 worker, {os.cpu_count()} threads",
        "bp model-parallel, 2 workers",
        "bp data-parallel, 2 workers",  # DDP: two replicas of the whole model, each on half of every batch
        "bp gpipe M=2, 2 workers",
        "bp gpipe M=2, 2 workers, torch.distributed.pipelining alone",
        "lct 2 workers, depth 1",
        "bp model-parallel, 2 workers, lct's cut",  # the layer-serial reference on lct's own cut
    ]
    best = frame[frame["config"].str.startswith("bp ")]["samples_per_s"].max()
    assert (frame["speedup_vs_best_bp"] == (frame["samples_per_s"] / best).round(3)).all()
    assert (frame["samples_per_s"] > 0).all() and (frame["spread"] >= 0).all()
    assert set(frame["noisy"]) <= {"", "noisy"} and ((frame["spread"] > 0.1) == (frame["noisy"] == "noisy")).all()
    assert list(frame["cut"]) == ["-", "-", "conv2", "-", "conv2", "conv2", "fc1", "fc1"]  # each method its own
    serial = frame.set_index("config")["samples_per_s"]
    on_conv2, on_fc1 = serial["bp model-parallel, 2 workers"], serial["bp model-parallel, 2 workers, lct's cut"]
    nan = float("nan")
    expected = frame["samples_per_s"] / ([nan] * 2 + [on_conv2, nan] + [on_conv2] * 2 + [on_fc1] * 2)
    got = frame["speedup_vs_mp_bp_same_cut"]
    assert list(got.isna()) == [True] * 2 + [False, True] + [False] * 4
    assert ((got - expected).abs().dropna() < 2e-3).all()
    per_sample = {"conv1": 32 * 14 * 14 * 4, "conv2": 64 * 7 * 7 * 4, "conv3": 128 * 3 * 3 * 4, "fc1": 256 * 4}
    sent = list(frame["bytes_per_sample"])  # bp: activations forward, gradients back (micro-batched or not)
    assert sent[2] == sent[4] == sent[5] == 2 * per_sample["conv2"]
    assert sent[6] == per_sample["fc1"] + 4 and sent[7] == 2 * per_sample["fc1"]  # lct: one loss back
    assert frame["workers"][3] == 2 and sent[3] > 0  # the replicas' all-reduce
    assert list(tmp_path.glob("*cnn-small-k2-*.csv")) and list(tmp_path.glob("*cnn-small-k2-*.md"))
    timed = frame.dropna(subset=["ideal_samples_per_s"])  # the ideal: samples over the busiest worker's compute
    for compute, ideal in zip(timed["compute_s_per_worker"], timed["ideal_samples_per_s"], strict=True):
        busiest = max(float(c) for c in str(compute).split("/"))
        assert abs(3 * 16 / ideal - busiest) <= 0.0051  # 3 steps of 16; compute is printed to 2 places


def test_the_ideal_is_set_by_the_busiest_worker():
    """Workers overlap at best: the critical path is the largest compute time, not their sum."""
    assert critical_path_s([{"compute_s": 2.0}, {"compute_s": 3.0}]) == 3.0


def test_a_slow_spell_lands_on_one_round_of_every_row(tmp_path, monkeypatch):
    """The repeats go in rounds over every row: three slow runs in a row (a busy spell of a shared machine)
    cost three rows one repeat each, which their medians drop, instead of most repeats of one row."""
    import lctrun.bench as bench_module

    calls = []

    def fake_run(row, cfg, warmup, steps, console):
        calls.append(row.label)
        slow = 2 <= len(calls) - 1 <= 4  # the 3rd to 5th runs of the command
        worker = {"compute_s": 1.0, "wait_s": 0.0, "peak_mem_mb": 1.0, "bytes_sent": 0}
        worker |= dict.fromkeys(bench_module.ACCOUNT, 0.0)
        cut = ",".join(cfg.model.split) if row.on_cut else "-"
        return {"seconds": 2.0 if slow else 1.0, "samples": 100, "workers": [worker], "cut": cut or "conv2"}

    monkeypatch.setattr(bench_module, "measure_once", fake_run)
    frame = bench(
        "cnn-small", groups=2, batch=16, shape=(1, 28, 28), methods=["bp"], steps=1, warmup=0, repeats=3,
        schedules=[], microbatches=[], depths=[], out_dir=tmp_path,
    )  # fmt: skip
    rows = list(frame["config"])
    assert calls == rows * 3  # round after round, in the table's order
    assert (frame["samples_per_s"] == 100).all()  # every median is a fast repeat
    assert list(frame["spread"] > 0) == [True, False, True, True]  # runs 3-5: rows 3 and 4, then row 1 again
