"""`lctrun project`: the bench's rows, projected from a profile of one device (a small model, one repeat)."""

import os

from lctrun.bench_rows import bench_rows
from lctrun.projection.project import project


def test_project_plays_every_bench_row(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTRUN_COMMIT", "c0ffee1")  # as on a lent GPU machine, which gets no .git
    frame = project(
        "cnn-small",
        [2],
        batch=16,
        shape=(1, 28, 28),
        methods=["bp", "lct", "dni", "al"],
        microbatches=[2, 4],
        links=["pcie4", "nvlink"],
        repeats=1,
        out=tmp_path / "projection",
    )
    expected = {
        row.label.replace("workers", "devices")
        for row in bench_rows(["bp", "lct", "dni", "al"], 2, os.cpu_count(), ["gpipe", "1f1b"], [2, 4], 16)
        if row.placement in ("chain", "replicas")  # one worker: the profiled device; torch alone: gpipe's schedule
    }
    for link in ("pcie4", "nvlink"):
        rows = frame[frame["link"] == link]
        assert expected | {"bp 1 device"} <= set(rows["config"])  # no row of its own, none left out
        assert (rows["projected_samples_per_s"] > 0).all()
        bp = rows[rows["config"].str.startswith("bp ")]
        assert bp["projected_x_best_bp"].max() == 1.0
        # more micro-batches fill the pipeline better, with the same bytes per micro-batch link
        speed = rows.set_index("config")["projected_samples_per_s"]
        assert speed["bp gpipe M=4, 2 devices"] > 0 and speed["bp 1 device"] > 0
        mem = rows.set_index("config")["projected_mem_mb_per_device"]
        assert len(mem["bp model-parallel, 2 devices"].split("/")) == 2
        (al,) = rows[rows["config"].str.startswith("al ")]["projected_max_mem_mb"]
        assert al > rows[rows["config"] == "bp model-parallel, 2 devices"]["projected_max_mem_mb"].item()
    assert (tmp_path / "projection.csv").exists() and "commit c0ffee1," in (tmp_path / "projection.md").read_text()


def test_a_micro_batch_is_profiled_within_its_batch_and_counted_per_micro_batch():
    """Every micro-batch of the batch runs, forward then backward, as a pipeline runs them; sizes and saved
    bytes are per micro-batch (a quarter of the batch's here), and BN statistics are left as they were."""
    import torch

    from lctrun.config import CriticConfig
    from lctrun.models import build_model
    from lctrun.projection.profile import profile

    net = build_model("cnn-small", 10, (1, 28, 28))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prof = profile(net, torch.randn(16, 1, 28, 28), [16, 4], [], CriticConfig(), 10, repeats=1)
    whole, quarter = prof.blocks[16], prof.blocks[4]
    assert len(whole) == len(quarter) == len(prof.names)
    for w, q in zip(whole, quarter, strict=True):
        assert q.out_bytes * 4 == w.out_bytes and q.param_bytes == w.param_bytes
        assert w.saved_bytes / 4 <= q.saved_bytes < w.saved_bytes  # activations shrink, saved weights do not
        assert q.forward > 0 and q.backward > 0
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_the_check_projects_a_row_on_the_cut_the_bench_measured():
    from lctrun.projection.project import Plan, on_cut

    plan = Plan("lct 2 devices, depth 1", None, 2, [3])
    assert on_cut(plan, "layer2.0", ["stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0"]).cut == [4]
    assert on_cut(plan, "-", ["stem"]).cut == []


def test_the_check_sets_each_bench_row_beside_its_projection_on_the_cut_it_measured(tmp_path, monkeypatch):
    """`project --measure` without the minutes of a real bench: a stand-in bench returns every row it would run,
    lct on a cut of its own (conv1, where the profile would not put it); the check projects lct there, matches
    every row by name and writes the bench's tables to OUT-bench/."""
    from dataclasses import replace

    import pandas as pd
    import pytest
    import torch

    import lctrun.bench
    import lctrun.projection.colocation
    import lctrun.projection.project
    from lctrun.bench_rows import layer_serial_row
    from lctrun.projection.profile import combined, compute_seconds

    calls = []

    def bench(model, k, batch, shape, methods, split, out_dir=None, **kwargs):
        calls.append((out_dir, kwargs["repeats"]))
        rows = bench_rows(
            methods, k, os.cpu_count(), kwargs["schedules"], kwargs["microbatches"], batch, kwargs["depths"]
        )
        rows.append(layer_serial_row("lct", k))
        cuts = ["conv1" if r.method == "lct" or "lct's" in r.label else ("conv2" if r.on_cut else "-") for r in rows]
        return pd.DataFrame({"config": [r.label for r in rows], "cut": cuts, "samples_per_s": 100.0, "spread": 0.05})

    monkeypatch.setattr(lctrun.bench, "bench", bench)
    real_profile, taken = lctrun.projection.project.profile, []

    def profile(*args, **kwargs):  # the one after the bench: as if the machine had become three times slower
        prof = real_profile(*args, **kwargs)
        if taken:
            slower = lambda a: combined(a, a, lambda u, _: 3 * u)  # noqa: E731
            blocks = {size: [slower(b) for b in timed] for size, timed in prof.blocks.items()}
            prof = replace(prof, blocks=blocks, aux={key: slower(a) for key, a in prof.aux.items()})
        taken.append(prof)
        return prof

    monkeypatch.setattr(lctrun.projection.project, "profile", profile)
    factors = iter([1.4, 1.6])  # before and after the bench: the timeline takes their mean
    monkeypatch.setattr(lctrun.projection.colocation, "slowdown", lambda *args, **kwargs: next(factors))
    out = tmp_path / "check"
    threads = torch.get_num_threads()
    try:
        frame = project(
            "cnn-small",
            [2],
            batch=16,
            shape=(1, 28, 28),
            methods=["bp", "lct"],
            depths=[1],
            schedules=["gpipe"],
            microbatches=[2],
            links=["pcie4"],
            threads=1,  # one thread per device: the two cores as two devices, which may slow each other
            repeats=1,
            out=out,
            measure=True,
        )
    finally:
        torch.set_num_threads(threads)
    assert calls == [(tmp_path / "check-bench", 1)]  # the bench runs each row as many times as the profile
    rows = frame.set_index("config")
    assert rows.loc["lct 2 devices, depth 1", "cut"] == "conv1" == rows.loc["lct 2 devices, depth 1", "measured_cut"]
    assert rows.loc["bp gpipe M=2, 2 devices", "cut"] == "conv2"
    measured = rows.dropna(subset=["measured_samples_per_s"])
    assert {"bp 1 device", "bp data-parallel, 2 devices", "lct 2 devices, depth 1"} <= set(measured.index)
    assert (measured["ratio"] == (measured["projected_samples_per_s"] / 100.0).round(3)).all()
    assert "projected beside measured" in (tmp_path / "check.md").read_text()
    assert f"of the {len(measured)} the bench measured steadily" in (tmp_path / "check.md").read_text()
    # on shared cores: the replicas compute in lockstep and feel all of the 1.5x, model-parallel bp none of it
    shared = rows["projected_on_shared_cores_samples_per_s"] / rows["projected_samples_per_s"]
    assert shared["bp 1 device"] == 1.0 and abs(shared["bp model-parallel, 2 devices"] - 1.0) < 1e-3
    assert abs(shared["bp data-parallel, 2 devices"] - 1 / 1.5) < 0.01
    assert 1 / 1.5 - 0.01 < shared["bp gpipe M=2, 2 devices"] < 1.0  # its stages overlap part of the time
    assert "K=2: 1.500x" in (tmp_path / "check.md").read_text()
    # the rows are priced at the mean of the profiles before and after the bench: one device computes the batch
    before, after = (compute_seconds(prof, 16) for prof in taken)  # about 1 : 3
    assert f"(after / before: {after / before:.3f}x" in (tmp_path / "check.md").read_text()
    mean_seconds = (before + after) / 2
    assert rows.loc["bp 1 device", "projected_samples_per_s"] == pytest.approx(16 / mean_seconds, rel=2e-3)


def test_the_profile_keeps_each_blocks_fastest_round():
    """Rounds over the sizes: each block keeps its fastest forward, backward and step, whichever round gave it."""
    from lctrun.projection.profile import BlockProfile, fastest

    slow_spell = [BlockProfile(2.0, 4.0, 1.0, 8, 16, 32), BlockProfile(1.0, 2.0, 0.5, 8, 16, 32)]
    quiet = [BlockProfile(1.0, 3.0, 2.0, 8, 16, 32), BlockProfile(1.5, 1.0, 0.5, 8, 16, 32)]
    assert fastest(slow_spell, quiet) == [
        BlockProfile(1.0, 3.0, 1.0, 8, 16, 32),
        BlockProfile(1.0, 1.0, 0.5, 8, 16, 32),
    ]


def test_the_check_counts_rows_within_15_percent_overall_and_among_steady_measurements():
    """A miss on a row whose repeats spread by 20% is the machine's; the count among steady rows is the
    projection's. 1.15 is within (|ratio - 1| <= 0.15), 0.849 is not; a row the bench did not run counts in neither."""
    import pandas as pd

    from lctrun.projection.project import within

    frame = pd.DataFrame(
        {
            "ratio": [1.0, 1.15, 0.849, 1.3, float("nan")],
            "measured_spread": [0.02, 0.05, 0.04, 0.2, float("nan")],
        }
    )
    assert within(frame, "ratio") == (
        "ratio: 2 of 4 measured rows within 15%; of the 3 the bench measured steadily (spread <= 10%), 2"
    )


def test_more_devices_than_blocks_is_a_clear_error():
    import pytest

    from lctrun.config import ConfigError

    with pytest.raises(ConfigError, match="cnn-small has 5 blocks, so at most 5 devices"):
        project("cnn-small", [2, 8], batch=16, shape=(1, 28, 28), links=["pcie4"], repeats=1)


def test_the_profile_takes_no_gradient_of_the_data():
    """Training stops its backward at the first block's weights; every later block sends a gradient back."""
    import torch
    from torch import nn

    from lctrun.projection.profile import profile_blocks

    class Recorder(nn.Linear):
        def forward(self, x):
            self.seen.add(x.requires_grad)
            return super().forward(x)

    blocks = [(name, Recorder(4, 4)) for name in ("first", "second")]
    for _, block in blocks:
        block.seen = set()
    profile_blocks(blocks, [torch.randn(8, 4)], repeats=1)
    assert blocks[0][1].seen == {False} and blocks[1][1].seen == {True}


def test_a_blocks_backward_starts_from_a_gradient_like_the_next_stage_sends():
    """In a bf16 channels-last profile, the gradient reaching a block's output is bf16 and channels-last, as a
    pipeline stage receives it; a loss like o.float().sum() would hand back a plain NCHW one through a cast."""
    import torch
    from torch import nn

    from lctrun.projection.profile import profile_blocks

    seen = []

    class Recorder(nn.Conv2d):
        def forward(self, x):
            out = super().forward(x)
            if out.requires_grad:
                out.register_hook(lambda g: seen.append((g.dtype, g.is_contiguous(memory_format=torch.channels_last))))
            return out

    blocks = [(name, Recorder(4, 4, 3, padding=1).to(memory_format=torch.channels_last)) for name in ("a", "b")]
    x = torch.randn(8, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    profile_blocks(blocks, [x], repeats=1, precision="bf16")
    assert seen and set(seen) == {(torch.bfloat16, True)}


def test_colocated_workers_are_timed_alone_and_together():
    """The factor's two halves run for real (spawned workers on a tiny model): every worker reports a step time."""
    from lctrun.projection.colocation import step_ms, together_ms

    assert step_ms("cnn-small", (1, 28, 28), 8, steps=2) > 0
    assert step_ms("cnn-small", (1, 28, 28), 8, steps=2, precision="bf16", layout="channels_last") > 0
    assert all(ms > 0 for ms in together_ms("cnn-small", (1, 28, 28), 8, 2, steps=2))  # a failed worker raises


def test_a_bf16_channels_last_profile_runs_as_training_runs():
    """Under precision=bf16 the blocks compute in bf16, so every activation crossing a cut is half fp32's bytes;
    under channels_last the blocks see (and pass on) channels-last batches; the critic is profiled the same way."""
    import torch

    from lctrun.config import CriticConfig
    from lctrun.models import build_model
    from lctrun.precision import memory_format
    from lctrun.projection.profile import profile

    def profiled(precision, layout):
        torch.manual_seed(0)
        net = build_model("cnn-small", 10, (1, 28, 28)).to(memory_format=memory_format(layout))
        sample = torch.randn(16, 1, 28, 28).contiguous(memory_format=memory_format(layout))
        seen = []
        net.named_blocks()[1][1].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        prof = profile(net, sample, [16], ["lct"], CriticConfig(), 10, 1, precision, layout)
        return prof, seen[0]

    fp32, x32 = profiled("fp32", "contiguous")
    bf16, x16 = profiled("bf16", "channels_last")
    assert x32.dtype == torch.float32 and x16.dtype == torch.bfloat16
    assert x16.is_contiguous(memory_format=torch.channels_last) and not x32.is_contiguous(
        memory_format=torch.channels_last
    )
    for a, b in zip(fp32.blocks[16], bf16.blocks[16], strict=True):
        assert b.out_bytes == a.out_bytes / 2 and b.param_bytes == a.param_bytes  # parameters stay fp32
    assert bf16.aux.keys() == fp32.aux.keys() and all(a.forward > 0 for a in bf16.aux.values())


def test_project_refuses_fp16_on_a_cpu_without_it():
    import pytest

    from lctrun.config import ConfigError
    from lctrun.precision import cpu_has_native_fp16

    if cpu_has_native_fp16():
        pytest.skip("this CPU computes fp16 natively")
    with pytest.raises(ConfigError, match="precision=fp16 on this CPU"):
        project("cnn-small", [2], batch=16, shape=(1, 28, 28), links=["pcie4"], repeats=1, overrides=["precision=fp16"])
