"""`lctrun bench`: throughput and memory of bp and of the local methods, measured side by side.

Every configuration runs in fresh worker processes (so each has its own memory baseline) on fake
data: warm-up steps first, then timed steps, in `repeats` rounds over every row (a slow spell of a shared
machine lands on one round of every row, not on all of a few rows); the table gives the median throughput and
its spread ((max - min) / median), and marks a configuration noisy when the spread passes NOISY. Each
method on K workers runs on its own cut: the one given, or the one model.balance=time chooses for it,
its critic or auxiliary net included (measured by its first row), since a practitioner would balance
the workers of the method they run. Model-parallel bp is also measured on every local method's cut, so
that each local method has a layer-serial reference on the same cut.
Rows: bp on 1 worker with 1 thread; bp on 1 worker with every core; model-parallel bp on K workers;
pipelined bp on K workers (GPipe and 1F1B over M micro-batches, torch.distributed.pipelining), and
torch.distributed.pipelining's GPipe on its own, without lctrun's runtime, as a check of the wiring;
lct/dgl/dni on K workers, pipelined; penalty/al on K workers in a parallel phase (after its refresh
pass, which is not timed). Every row's speed is also given against the best bp row: the baseline a
practitioner would pick, which the local methods have to beat.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console

from lctrun.bench_rows import TORCH_ALONE, BenchRow, bench_rows, layer_serial_row
from lctrun.config import load_experiment
from lctrun.data import TensorLoader
from lctrun.precision import autocast
from lctrun.prepared import begin_epoch
from lctrun.reporting.rundir import git_commit, hardware_tag
from lctrun.reporting.tables import rich_table, slug, write_table
from lctrun.runtime.distributed import spawn_workers

NOISY = 0.10  # spread above which a row is flagged: the machine was busy, its ratios are not to be trusted


@dataclass
class BenchJob:
    warmup: int
    steps: int

    def __call__(self, p, runtime, console):
        d, batch = p.data, p.cfg.data.batch_size
        device = p.devices[runtime.rank] if p.devices else "cpu"

        def loader(start: int, count: int) -> TensorLoader:
            part = slice(start * batch, (start + count) * batch)
            x, y = d.train_x[part], d.train_y[part]
            fmt = p.cfg.memory_format
            return TensorLoader(
                x, y, batch, shuffle=True, device=device, load_x=runtime.needs_inputs, memory_format=fmt
            )

        warmup = loader(0, self.warmup)
        begin_epoch(p, runtime, 1, warmup)  # penalty / al: their first parallel epoch, refreshed (not timed)
        runtime.train_epoch(warmup)
        start = time.perf_counter()
        runtime.train_epoch(loader(self.warmup, self.steps))  # ends when every worker has finished
        seconds = time.perf_counter() - start
        cut = ",".join(names[-1] for names in p.block_names[:-1]) or "-"
        return {"seconds": seconds, "samples": self.steps * batch, "workers": runtime.worker_stats, "cut": cut}


@dataclass
class TorchPipelineJob:
    """GPipe from torch.distributed.pipelining driven directly (no lctrun runtime, metrics or checks) on the
    same cut, data and optimiser: the throughput lctrun's GPipe row should match, since it builds on it."""

    warmup: int
    steps: int
    microbatches: int

    def __call__(self, p, runtime, console):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        from lctrun.runtime.pipelined import AsSent, mean_loss

        rank, world, stage = runtime.rank, runtime.world, runtime.stage
        batch, part = p.cfg.data.batch_size, p.cfg.data.batch_size // self.microbatches
        (in_shape, out_shape), first, last = p.shapes[rank], rank == 0, rank == world - 1
        dtype = stage.wire.dtype  # activations and gradients in the compute dtype, as lctrun's rows send them
        inputs = torch.empty((part, *in_shape), dtype=dtype, device="meta", requires_grad=not first)
        outputs = torch.empty((part, *out_shape), dtype=dtype, device="meta", requires_grad=True)
        module = AsSent(stage.group, dtype)
        pipe = PipelineStage(module, rank, world, stage.device, input_args=inputs, output_args=outputs)
        schedule = ScheduleGPipe(pipe, self.microbatches, loss_fn=mean_loss)
        x, y = p.data.train_x.to(stage.device), p.data.train_y.to(stage.device)

        def run(start: int, count: int) -> None:
            for i in range(start, start + count):
                part_of = slice(i * batch, (i + 1) * batch)
                stage.opt.zero_grad(set_to_none=True)
                with autocast(p.cfg.precision, [stage.device]):
                    schedule.step(*([x[part_of]] if first else []), target=y[part_of] if last else None)
                stage.opt.step()

        run(0, self.warmup)
        dist.barrier()
        start = time.perf_counter()
        run(self.warmup, self.steps)
        dist.barrier()
        seconds = time.perf_counter() - start
        moved = (
            batch
            * dtype.itemsize
            * (math.prod(out_shape) * (not last) + math.prod(in_shape) * (not first))
            * self.steps
        )
        unknown = dict.fromkeys(["compute_s", "wait_s", "peak_mem_mb", *ACCOUNT], math.nan)
        stats = [None] * world
        dist.all_gather_object(stats, {**unknown, "bytes_sent": moved})
        cut = ",".join(names[-1] for names in p.block_names[:-1]) or "-"
        return {"seconds": seconds, "samples": self.steps * batch, "workers": stats, "cut": cut}


ACCOUNT = ("activations_mb", "params_mb", "grads_mb", "optim_mb", "aux_vars_mb")


def critical_path_s(workers: list[dict]) -> float:
    """The busiest worker's compute seconds: with perfect overlap the workers run side by side, so the step
    can go no faster than that (the ideal throughput is samples over it, not over the workers' sum)."""
    return max(w["compute_s"] for w in workers)


def account_mb(w: dict) -> float:
    return sum(w[k] for k in ACCOUNT)


def check_bench_input(
    model: str,
    groups: int,
    steps: int,
    warmup: int,
    methods: list[str],
    split,
    shape,
    repeats: int = 1,
    schedules=(),
    microbatches=(),
    depths=(),
) -> None:
    """What would otherwise fail minutes in, after the first configurations ran: one line now."""
    from lctrun.errors import ConfigError
    from lctrun.methods import get_method
    from lctrun.models import build_model, find_model

    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    if groups < 1:
        raise ConfigError(f"--groups must be >= 1, got {groups}")
    if any(schedule not in ("gpipe", "1f1b") for schedule in schedules):
        raise ConfigError(f"--schedules {','.join(schedules)}: each must be gpipe or 1f1b")
    if any(m < 1 for m in microbatches):
        raise ConfigError(f"--microbatches must be >= 1, got {','.join(map(str, microbatches))}")
    if any(d < 1 for d in depths):
        raise ConfigError(f"--depths must be >= 1, got {','.join(map(str, depths))}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    for method in methods:
        get_method(method)  # an unknown method: a one-line error naming the known ones
    spec = find_model(model)
    if spec is not None and not split:
        blocks = len(build_model(model, 10, tuple(shape)).block_names())
        if groups > blocks:
            raise ConfigError(
                f"--groups {groups}: {model} has {blocks} blocks to cut between; use --groups <= {blocks}"
            )


def median_and_spread(speeds: list[float]) -> tuple[float, float]:
    """The median of the repeats' speeds, and their spread (max - min) / median rounded as the table prints
    it, so that the noisy flag agrees with the printed figure (a spread of 0.1004 shows as 0.1: not noisy)."""
    median = statistics.median(speeds)
    return median, round((max(speeds) - min(speeds)) / median, 3)


def bench(
    model: str,
    groups: int = 2,
    batch: int = 128,
    shape: tuple[int, ...] = (3, 32, 32),
    methods: list[str] | None = None,
    split: list[str] | None = None,
    steps: int = 20,
    warmup: int = 3,
    repeats: int = 3,
    depths: list[int] | tuple = (1, 2),
    schedules: list[str] | tuple = ("gpipe", "1f1b"),
    microbatches: list[int] | tuple = (2, 4, 8),
    device: str = "cpu",
    overrides: list[str] | None = None,
    out_dir: Path = Path("results/bench"),
    console: Console | None = None,
) -> pd.DataFrame:
    console = console or Console()
    methods = methods or ["bp", "lct", "dgl"]
    cores = os.cpu_count() or 1
    check_bench_input(model, groups, steps, warmup, methods, split, shape, repeats, schedules, microbatches, depths)
    base = bench_base(model, groups, batch, shape, warmup + steps, device, overrides, split)
    queue = [(row, None) for row in bench_rows(methods, groups, cores, schedules, microbatches, batch, depths)]
    measured, cuts = [], {}  # [row, its config, its repeats' results]; method -> its cut, from its first row
    while queue:  # round 1: every row once; the layer-serial references join as their cuts become known
        row, cut = queue.pop(0)
        cut = (cut or split or cuts.get(row.method)) if row.on_cut else None  # one worker or replicas: no cut
        console.print(f"[bold]{row.label}[/]" + (f" (round 1 of {repeats})" if repeats > 1 else "") + " ...")
        cfg = row_config(row, base, cut)
        result = measure_once(row, cfg, warmup, steps, console)
        if row.on_cut and not cut:  # the first run chose the cut (timed); the other rounds run on it
            cuts[row.method] = result["cut"].split(",")
            cfg = row_config(row, base, cuts[row.method])
        measured.append((row, cfg, [result]))
        serial_cuts = {runs[0]["cut"] for done, _, runs in measured if done.label.startswith("bp model-parallel")}
        last_of_method = not queue or queue[0][0].method != row.method
        if "bp" in methods and last_of_method and result["cut"] not in serial_cuts | {"-"}:
            reference = layer_serial_row(row.method, groups)  # model-parallel bp on this method's cut
            queue.insert(0, (reference, result["cut"].split(",")))
    # the other rounds run every row again, in the same order: a slow spell of a shared machine then falls on
    # one round of every row (which the median drops), not on every repeat of a few neighbouring rows
    for round_ in range(2, repeats + 1):
        for row, cfg, results in measured:
            console.print(f"[bold]{row.label}[/] (round {round_} of {repeats}) ...")
            results.append(measure_once(row, cfg, warmup, steps, console))
    records = [record(row.label, at_median(results), cfg, cores) for row, cfg, results in measured]
    frame = with_ratios(pd.DataFrame(records), cores)
    cut_text = ", ".join(f"{m} {','.join(c)}" for m, c in cuts.items()) or ",".join(split or []) or "-"
    setting = dict(model=model, groups=groups, batch=batch, shape=shape, device=device, steps=steps, warmup=warmup)
    header = bench_header(setting, repeats, depths, cut_text, cfg, overrides, best_bp(frame)["config"])
    name = "-".join([slug(hardware_tag()), model, f"k{groups}", *(slug(o) for o in overrides or [])])
    paths = write_table(frame, Path(out_dir) / name, header)
    show(frame, header, cores, console)
    console.print(f"written: {', '.join(map(str, paths))}")
    return frame


def bench_base(model, groups, batch, shape, steps, device, overrides, split) -> list[str]:
    """The overrides every row starts from: fake data for `steps` batches, the distributed runtime, a cut
    balanced by measured time."""
    base = [
        "name=bench",
        f"model.name={model}",
        "data.name=fake",
        f"data.shape=[{','.join(map(str, shape))}]",
        f"data.batch_size={batch}",
        f"data.train_size={steps * batch}",
        "data.test_size=1",
        "runtime=distributed",
        f"devices=[{device}]",
        "submodels=false",
        f"model.groups={groups}",
        "model.balance=time",
        *(overrides or []),
    ]
    return base + ([f"model.split=[{','.join(split)}]"] if split else [])


def row_config(row: BenchRow, base: list[str], cut: list[str] | None):
    return load_experiment(None, base + list(row.overrides) + ([f"model.split=[{','.join(cut)}]"] if cut else []))


def measure_once(row: BenchRow, cfg, warmup: int, steps: int, console) -> dict:
    """One run of a row in fresh worker processes: seconds and samples of its timed steps, its workers' stats
    and the cut it ran on (without one in `cfg`, the cut model.balance=time chose)."""
    job = TorchPipelineJob(warmup, steps, cfg.pipeline.microbatches) if row.placement == "torch alone" else None
    return spawn_workers(cfg, job or BenchJob(warmup, steps), console=console)


def at_median(results: list[dict]) -> dict:
    """The repeat at the median speed, with the median and the spread of the repeats."""
    median, spread = median_and_spread([r["samples"] / r["seconds"] for r in results])
    result = min(results, key=lambda r: abs(r["samples"] / r["seconds"] - median))
    return {**result, "median": median, "spread": spread}


def record(label: str, result: dict, cfg, cores: int) -> dict:
    """One row of the table, from a measured repeat."""
    workers, median = result["workers"], result["median"]
    critical = critical_path_s(workers)
    return {
        "config": label,
        "cut": result["cut"],
        "workers": len(workers),
        "threads_per_worker": cfg.threads_per_worker or cores // len(workers),
        "samples_per_s": median,
        "spread": result["spread"],
        "noisy": "noisy" if result["spread"] > NOISY else "",
        "ideal_samples_per_s": result["samples"] / critical,
        "of_ideal": median * critical / result["samples"],
        "peak_mem_mb_per_worker": "/".join(f"{w['peak_mem_mb']:.0f}" for w in workers),
        "max_peak_mem_mb": max(w["peak_mem_mb"] for w in workers),
        # analytic, allocator-independent: saved activations + parameters + gradients + optimiser state
        # + auxiliary variables (penalty / al, for the bench's few samples only)
        "account_mb_per_worker": "/".join(f"{account_mb(w):.0f}" for w in workers),
        "bytes_per_sample": sum(w["bytes_sent"] for w in workers) / result["samples"],
        "compute_s_per_worker": "/".join(f"{w['compute_s']:.2f}" for w in workers),
        "wait_s_per_worker": "/".join(f"{w['wait_s']:.2f}" for w in workers),
    }


def with_ratios(frame: pd.DataFrame, cores: int) -> pd.DataFrame:
    """Every row against the best bp, model-parallel bp on its cut, and bp on one worker (1 thread, all)."""
    bp1, bpall = frame["samples_per_s"].iloc[0], frame["samples_per_s"].iloc[1]
    best = frame[frame["config"].str.startswith("bp ")]["samples_per_s"].max()
    layer_serial = frame[frame["config"].str.startswith("bp model-parallel")].set_index("cut")["samples_per_s"]
    frame.insert(4, "speedup_vs_best_bp", frame["samples_per_s"] / best)
    frame.insert(5, "speedup_vs_mp_bp_same_cut", frame["samples_per_s"] / frame["cut"].map(layer_serial))
    frame.insert(6, "speedup_vs_bp_1t", frame["samples_per_s"] / bp1)
    frame.insert(7, f"speedup_vs_bp_{cores}t", frame["samples_per_s"] / bpall)
    frame.insert(11, "ideal_speedup_vs_bp_1t", frame["ideal_samples_per_s"] / bp1)
    frame["mem_vs_bp_1t"] = frame["max_peak_mem_mb"] / frame["max_peak_mem_mb"].iloc[0]
    return frame.round(3)


def best_bp(frame: pd.DataFrame) -> pd.Series:
    return frame[frame["config"].str.startswith("bp ")].sort_values("samples_per_s").iloc[-1]


def bench_header(setting: dict, repeats, depths, cut_text: str, cfg, overrides, best: str) -> str:
    model, groups, batch, shape = setting["model"], setting["groups"], setting["batch"], setting["shape"]
    device, steps, warmup = setting["device"], setting["steps"], setting["warmup"]
    return (
        f"# lctrun bench: {model}, K={groups}, batch {batch}, input {'x'.join(map(str, shape))} (fake data)\n\n"
        f"hardware: {hardware_tag()}; device: {device}; {steps} timed steps after {warmup} warm-up, median of "
        f"{repeats} repeats in fresh processes (spread = (max - min) / median; 'noisy' above {NOISY:.0%}: do not "
        f"trust its ratios); cuts: {cut_text}; local methods at "
        f"pipeline_depth {', '.join(map(str, depths))} (depth 1: no batch in flight, overlap within a step only); "
        f"commit {git_commit()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}; "
        f"{time.strftime('%Y-%m-%d')}. Peak memory: per worker, above its own baseline after start-up. "
        f"A method's cut, unless given, balances measured time per block and critic for its first row; "
        f"speedup_vs_mp_bp_same_cut is against model-parallel bp (layer-serial) on the row's own cut. "
        f"Precision: {cfg.precision} (autocast; parameters and optimiser state fp32), memory format: "
        f"{cfg.memory_format}. Critic: {cfg.critic.convs[0]} x conv3x3({cfg.critic.channels}) + linear; "
        f"extra overrides: {' '.join(overrides or []) or 'none'}. "
        f"Best bp (speedup_vs_best_bp = 1): {best}. Pipelined bp: pipeline.schedule over M micro-batches "
        f"(torch.distributed.pipelining); the row '{TORCH_ALONE}' drives that library without lctrun (its compute, "
        f"wait and memory are not measured)."
    )


SHOWN = {
    "config": "config",
    "samples_per_s": "samples/s",
    "noisy": "noisy",
    "speedup_vs_best_bp": "x best bp",
    "speedup_vs_mp_bp_same_cut": "x mp bp, cut",
    "speedup_vs_bp_1t": "x bp 1t",
    "speedup_vs_bp_{cores}t": "x bp {cores}t",
    "ideal_speedup_vs_bp_1t": "ideal x bp 1t",
    "of_ideal": "of ideal",
    "peak_mem_mb_per_worker": "peak MB/worker",
    "mem_vs_bp_1t": "mem/bp",
    "bytes_per_sample": "B/sample",
}


def show(frame: pd.DataFrame, header: str, cores: int, console: Console) -> None:
    columns = {k.format(cores=cores): v.format(cores=cores) for k, v in SHOWN.items()}
    shown = frame[list(columns)].rename(columns=columns)
    best = best_bp(frame)
    console.print(rich_table(shown, title=header.splitlines()[0][2:]))
    console.print(f"x best bp: against {best['config']} ({best['samples_per_s']:.0f} samples/s), the fastest bp here")
    console.print(
        "ideal = samples / max per-worker compute time (the critical path with perfect overlap); "
        "of ideal = measured / ideal"
    )
