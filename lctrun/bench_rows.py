"""The one table of configurations that `lctrun bench` measures and `lctrun project` projects.

A row is a label, the overrides that configure it on top of the bench's base config, and where it runs:
one worker (every block in one process, at some thread count), replicas (data-parallel bp, K copies of the
model), a chain (K workers, one group each, on a cut) or torch-alone (torch.distributed.pipelining driven
without lctrun, a check of the wiring). Each method on a chain runs on its own cut; model-parallel bp is added
on every local method's cut that differs from bp's, so each has a layer-serial reference on the same cut.
"""

from __future__ import annotations

from dataclasses import dataclass

TORCH_ALONE = "torch.distributed.pipelining alone"


@dataclass(frozen=True)
class BenchRow:
    label: str  # as the bench prints it
    overrides: tuple[str, ...]
    placement: str  # "one worker" | "replicas" | "chain" | "torch alone"
    threads: int = 0  # one worker: its thread count

    @property
    def method(self) -> str:
        return next(o.split("=", 1)[1] for o in self.overrides if o.startswith("method="))

    @property
    def on_cut(self) -> bool:
        """Whether the row's workers hold groups on a cut (so it needs the method's cut)."""
        return self.placement in ("chain", "torch alone")

    def projected_label(self, threads: int) -> str | None:
        """Its label in a projection of K devices profiled at `threads` threads each, or None where the
        projection has no row of its own for it (one worker at other thread counts: one device is the profiled
        one; torch-alone: the same schedule as lctrun's row)."""
        if self.placement == "one worker":
            return "bp 1 device" if self.threads == threads else None
        if self.placement == "torch alone":
            return None
        return self.label.replace("workers", "devices")


def bench_rows(
    methods: list[str], groups: int, cores: int, schedules=(), microbatches=(), batch: int = 128, depths=(2,)
) -> list[BenchRow]:
    one = ("method=bp", "model.groups=1", "model.split=[]")
    rows = [
        BenchRow("bp 1 worker, 1 thread", (*one, "threads_per_worker=1"), "one worker", 1),
        BenchRow(f"bp 1 worker, {cores} threads", (*one, f"threads_per_worker={cores}"), "one worker", cores),
    ]
    for method in methods:
        if method == "bp":
            rows.append(BenchRow(f"bp model-parallel, {groups} workers", ("method=bp",), "chain"))
            replicas = (*one, "data_parallel=true", f"workers={groups}")
            rows.append(BenchRow(f"bp data-parallel, {groups} workers", replicas, "replicas"))
            for schedule in schedules:
                for m in microbatches:
                    if batch % m == 0 and (schedule != "1f1b" or m >= groups):
                        pipe = ("method=bp", f"pipeline.schedule={schedule}", f"pipeline.microbatches={m}")
                        rows.append(BenchRow(f"bp {schedule} M={m}, {groups} workers", pipe, "chain"))
            if "gpipe" in schedules and any(batch % m == 0 for m in microbatches):
                m = max((m for m in microbatches if batch % m == 0), key=lambda m: (m == 4, -abs(m - 4)))
                pipe = ("method=bp", "pipeline.schedule=gpipe", f"pipeline.microbatches={m}")
                rows.append(BenchRow(f"bp gpipe M={m}, {groups} workers, {TORCH_ALONE}", pipe, "torch alone"))
        elif method in ("penalty", "al"):
            rows.append(BenchRow(f"{method} {groups} workers, parallel phase", (f"method={method}",), "chain"))
        else:
            for d in depths:
                label = f"{method} {groups} workers, depth {d}"
                rows.append(BenchRow(label, (f"method={method}", f"pipeline_depth={d}"), "chain"))
    return rows


def layer_serial_row(method: str, groups: int) -> BenchRow:
    """Model-parallel bp on `method`'s cut: the layer-serial reference of a method whose cut is not bp's."""
    return BenchRow(f"bp model-parallel, {groups} workers, {method}'s cut", ("method=bp",), "chain")
