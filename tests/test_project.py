"""`lctrun project`: the bench's rows, projected from a profile of one device (a small model, one repeat)."""

import os

from lctrun.bench_rows import bench_rows
from lctrun.projection.project import project


def test_project_plays_every_bench_row(tmp_path):
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
    assert (tmp_path / "projection.csv").exists() and (tmp_path / "projection.md").exists()
