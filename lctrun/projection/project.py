"""`lctrun project MODEL --groups 2,4,8`: what K devices like this one would reach, from one device's profile.

The rows are the bench's (bench_rows.py: the one table of which configurations exist and how each is
configured); each row's config says which schedule it runs. Each method takes the cut it would choose
(bench's model.balance=time: blocks and the auxiliary net after the cut, priced by the measured forward and
backward, balanced by models.chain.balanced_cuts), and every schedule is played as a timeline of events per
device and per link (projection/timeline.py). Memory per device is the analytic account (parameters,
gradients, optimiser state, saved activations times the batches or micro-batches in flight, auxiliary
variables). Every figure is a projection, not a measurement.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from lctrun.bench_rows import bench_rows, layer_serial_row
from lctrun.config import ConfigError, Experiment, load_experiment
from lctrun.models import build_model
from lctrun.models.chain import balanced_cuts
from lctrun.precision import check_precision, compute_dtype, memory_format, to_memory_format
from lctrun.projection.links import link_named
from lctrun.projection.profile import Profile, compute_seconds, mean_of, profile
from lctrun.projection.timeline import (
    Link,
    StageCost,
    data_parallel_bp,
    layer_parallel,
    layer_serial_bp,
    local_method,
    pipelined_bp,
    steady_seconds_per_batch,
)
from lctrun.reporting.tables import rich_table

MB = 2**20
LOCAL = ("lct", "dgl", "dni")


@dataclass
class Plan:
    """A row's schedule: how many devices, which cut, and the timeline that plays it."""

    label: str
    cfg: Experiment
    devices: int
    cut: list[int]  # index of the last block of every group but the last


def row_config(base: list[str], extra: list[str]) -> Experiment:
    return load_experiment(None, base + extra)


def groups_of(cut: list[int], n: int) -> list[range]:
    bounds = [-1, *cut, n - 1]
    return [range(bounds[i] + 1, bounds[i + 1] + 1) for i in range(len(bounds) - 1)]


def aux_split(method: str, aux) -> dict:
    """How a method spends its auxiliary net's measured forward / backward / step (methods/lct.py, dni.py):
    lct takes the gradient into h in its step (about half the backward) and the weights' at feedback; dni's
    synthesizer only runs forward in the step; dgl's head trains with the group, by the group's optimiser."""
    if aux is None:
        return {}
    if method == "lct":
        return dict(aux_forward=aux.forward, aux_backward=aux.backward / 2, aux_update=aux.backward / 2 + aux.optimizer)
    if method == "dni":
        return dict(aux_forward=aux.forward, aux_update=aux.backward + aux.optimizer)
    return dict(aux_forward=aux.forward, aux_backward=aux.backward + aux.optimizer)


def stage_costs(prof: Profile, size: int, cut: list[int], method: str = "bp") -> list[StageCost]:
    blocks = prof.blocks[size]
    stages = []
    for k, group in enumerate(groups_of(cut, len(blocks))):
        last = group[-1]
        aux = prof.aux.get((method, last)) if k < len(cut) else None
        stages.append(
            StageCost(
                forward=sum(blocks[i].forward for i in group),
                backward=sum(blocks[i].backward for i in group),
                optimizer=sum(blocks[i].optimizer for i in group),
                out_bytes=blocks[last].out_bytes,
                param_bytes=sum(blocks[i].param_bytes for i in group),
                **aux_split(method, aux),
            )
        )
    return stages


def choose_cut(prof: Profile, batch: int, k: int, method: str) -> list[int]:
    """The cut model.balance=time gives this method: each block's forward + backward, plus the auxiliary net the
    method would attach after it."""
    blocks = prof.blocks[batch]
    costs = [b.forward + b.backward for b in blocks]
    aux = [prof.aux.get((method, i)) for i in range(len(blocks))]
    end = [[(a.forward + a.backward) if a else 0.0 for a in aux]]
    return balanced_cuts(costs, k, end)


def seconds_per_batch(plan: Plan, prof: Profile, link: Link, slowdown: float = 1.0) -> float:
    """Steady seconds per batch of the plan's schedule; `slowdown`: devices that are cores of one machine compute
    that many times slower while another computes (timeline.colocated)."""
    cfg, batch = plan.cfg, plan.cfg.data.batch_size
    method = cfg.method

    def steady(build) -> float:
        return steady_seconds_per_batch(build, link, slowdown=slowdown)

    if plan.devices == 1:
        return steady(lambda n: layer_serial_bp(stage_costs(prof, batch, []), n))
    if cfg.data_parallel:
        blocks = stage_costs(prof, -(-batch // plan.devices), list(range(len(prof.names) - 1)))
        return steady(lambda n: data_parallel_bp(blocks, plan.devices, n))
    if method == "bp" and cfg.pipeline.schedule != "none":
        m = cfg.pipeline.microbatches
        stages = stage_costs(prof, batch // m, plan.cut)
        optim = stage_costs(prof, batch, plan.cut)  # the step is per batch, whatever the micro-batch
        stages = [replace(s, optimizer=o.optimizer) for s, o in zip(stages, optim, strict=True)]
        return steady(lambda n: pipelined_bp(stages, m, n, cfg.pipeline.schedule))
    stages = stage_costs(prof, batch, plan.cut, method)
    if method in LOCAL:
        loss_bytes = 4 * batch
        return steady(lambda n: local_method(stages, method, cfg.pipeline_depth, n, loss_bytes))
    if method in ("penalty", "al"):
        depth = max(cfg.pipeline_depth, 4)
        down = cfg.layerpar.downsample
        shapes = [prof.out_shapes[i] for i in plan.cut]
        width = compute_dtype(cfg.precision).itemsize  # activations cross in the compute dtype (transport.Wire)
        sent = [batch * width * math.prod(s) / (down**2 if len(s) == 3 else 1) for s in shapes]
        return steady(lambda n: layer_parallel(stages, depth, n, sent))
    return steady(lambda n: layer_serial_bp(stages, n))


def memory_mb(plan: Plan, prof: Profile, samples: int) -> list[float]:
    """Per device: parameters, gradients and optimiser state (SGD momentum: one copy; the aux net's own
    optimiser), saved activations times what is in flight, auxiliary variables (penalty / al)."""
    cfg, batch = plan.cfg, plan.cfg.data.batch_size
    method = cfg.method
    blocks = prof.blocks[batch]
    if plan.devices == 1 or cfg.data_parallel:
        share = 1 if plan.devices == 1 else plan.devices
        params = sum(b.param_bytes for b in blocks)
        saved = sum(b.saved_bytes for b in blocks) / share
        return [(3 * params + saved) / MB] * plan.devices
    out = []
    groups = groups_of(plan.cut, len(blocks))
    for k, group in enumerate(groups):
        params = sum(blocks[i].param_bytes for i in group)
        saved = sum(blocks[i].saved_bytes for i in group)
        total = 3 * params  # parameters, gradients, momentum
        if method == "bp" and cfg.pipeline.schedule == "1f1b":
            m = cfg.pipeline.microbatches
            saved *= min(len(groups) - k, m) / m  # at most K - k micro-batches in flight on stage k
        total += saved
        aux = prof.aux.get((method, group[-1])) if k < len(groups) - 1 else None
        if aux is not None:
            stashed = cfg.pipeline_depth if method in ("lct", "dni") else 1  # its graph kept until feedback
            total += 2 * aux.param_bytes + aux.optim_state_bytes + aux.saved_bytes * stashed
        if method in ("penalty", "al") and k:
            shape = prof.out_shapes[plan.cut[k - 1]]
            down = cfg.layerpar.downsample if len(shape) == 3 else 1
            per_sample = math.prod(shape) / down**2 * {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.layerpar.storage]
            total += samples * per_sample * (3 if method == "al" else 2)
        out.append(total / MB)
    return out


def plans(groups: int, threads: int, methods, schedules, microbatches, batch, depths, base, prof) -> list[Plan]:
    """The bench's rows (bench_rows) for K = groups that a projection has: one device (the profiled one, at
    `threads` threads), the replicas, and every chain, each method on the cut it would choose, with
    model-parallel bp on every local method's cut that differs from bp's (as the bench adds it)."""
    out, cuts = [], {}
    cores = os.cpu_count() or 1
    for row in bench_rows(methods, groups, cores, schedules, microbatches, batch, depths):
        label = row.projected_label(threads)
        if label is None:
            continue
        cfg = row_config(base, list(row.overrides))
        if not row.on_cut:
            out.append(Plan(label, cfg, 1 if row.placement == "one worker" else groups, []))
            continue
        cut = cuts.setdefault(row.method, choose_cut(prof, batch, groups, row.method))
        out.append(Plan(label, cfg, groups, cut))
    for method, cut in cuts.items():
        if method != "bp" and "bp" in methods and cut != cuts.get("bp"):
            row = layer_serial_row(method, groups)
            out.append(Plan(row.projected_label(threads), row_config(base, list(row.overrides)), groups, cut))
    return out


def project(
    model: str,
    groups: list[int],
    batch: int = 128,
    shape: tuple[int, ...] = (3, 32, 32),
    methods: list[str] | None = None,
    depths=(1, 2),
    schedules=("gpipe", "1f1b"),
    microbatches=(2, 4, 8),
    links=("gloo",),
    device: str = "cpu",
    threads: int | None = None,
    samples: int = 50000,
    repeats: int = 2,
    overrides: list[str] | None = None,
    out: Path | None = None,
    measure: bool = False,
    console: Console | None = None,
) -> pd.DataFrame:
    console = console or Console()
    methods = methods or ["bp", "lct", "dgl", "dni"]
    base = [
        f"model.name={model}",
        "data.name=fake",
        f"data.shape=[{','.join(map(str, shape))}]",
        f"data.batch_size={batch}",
        "runtime=distributed",
        *(overrides or []),
    ]
    cfg0 = row_config(base, ["method=bp"])
    link_list = [link_named(name) for name in links]  # the measured one first: before the profile loads the CPU
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    check_precision(cfg0.precision, cfg0.memory_format, [device], len(shape))
    torch.manual_seed(0)
    net = to_memory_format(build_model(model, cfg0.data.num_classes, tuple(shape)).to(device), cfg0.memory_format)
    blocks = len(net.named_blocks())
    if max(groups) > blocks:
        raise ConfigError(
            f"--groups {max(groups)}: {model} has {blocks} blocks, so at most {blocks} devices (give --groups up "
            f"to {blocks})"
        )
    sample = torch.randn(batch, *shape, device=device).contiguous(memory_format=memory_format(cfg0.memory_format))
    sizes = [batch] + [batch // m for m in microbatches if batch % m == 0] + [-(-batch // k) for k in groups]
    console.print(
        f"profiling {model} on {device} with {torch.get_num_threads()} threads, batch sizes {sorted(set(sizes))}, "
        f"precision {cfg0.precision}, memory format {cfg0.memory_format}"
    )
    aux_methods = [m for m in methods if m != "bp"]

    def profiled() -> Profile:
        return profile(
            net, sample, sizes, aux_methods, cfg0.critic, cfg0.data.num_classes, repeats, cfg0.precision,
            cfg0.memory_format,
        )  # fmt: skip

    prof = profiled()
    slowdowns: dict[int, float] = {}  # K -> how much K workers sharing this machine's cores slow each other
    drift = None  # the profile after the bench against the one before
    if measure:
        bench_dir = Path(f"{out}-bench") if out is not None else Path("results/bench/projection-check-bench")
        before = colocation_slowdowns(cfg0, groups, threads, device, console)
        measured = measured_rows(
            model,
            groups,
            batch,
            shape,
            methods,
            depths,
            schedules,
            microbatches,
            overrides,
            threads,
            repeats,
            bench_dir,
        ).set_index(["K", "config"])
        after = colocation_slowdowns(cfg0, groups, threads, device, console)
        slowdowns = {k: (before[k] + after[k]) / 2 for k in before}  # the bench ran between the two
        # a shared machine's speed drifts over the minutes a bench takes: price the rows at the mean of a
        # profile before and one after it, so that the check compares the timeline, not two moments
        again = profiled()
        drift = compute_seconds(again, batch) / compute_seconds(prof, batch)
        console.print(f"profile after the bench: {drift:.3f}x the one before; the rows use the mean of the two")
        prof = mean_of(prof, again)
    rows = []
    for link in link_list:
        for k in groups:
            row_plans = plans(k, threads, methods, schedules, microbatches, batch, depths, base, prof)
            for plan in row_plans:
                if measure and (k, plan.label) in measured.index and plan.devices > 1 and not plan.cfg.data_parallel:
                    plan = on_cut(plan, measured.loc[(k, plan.label), "measured_cut"], prof.names)
                seconds = seconds_per_batch(plan, prof, link)
                mem = memory_mb(plan, prof, samples)
                row = {
                    "link": link.name.split()[0],
                    "K": k,
                    "config": plan.label,
                    "cut": ",".join(prof.names[i] for i in plan.cut) or "-",
                    "projected_samples_per_s": batch / seconds,
                    "projected_mem_mb_per_device": "/".join(f"{m:.0f}" for m in mem),
                    "projected_max_mem_mb": max(mem),
                }
                if k in slowdowns:
                    shared = seconds_per_batch(plan, prof, link, slowdowns[k])  # one device: nothing beside it
                    row["projected_on_shared_cores_samples_per_s"] = batch / shared
                rows.append(row)
    frame = pd.DataFrame(rows)
    bp = frame[frame["config"].str.startswith("bp ")]
    best = bp.groupby(["link", "K"])["projected_samples_per_s"].max()
    frame.insert(
        5,
        "projected_x_best_bp",
        frame["projected_samples_per_s"] / [best[key] for key in zip(frame["link"], frame["K"], strict=True)],
    )
    if measure:
        frame = frame.merge(measured.reset_index(), on=["K", "config"], how="left")
        frame["ratio"] = frame["projected_samples_per_s"] / frame["measured_samples_per_s"]
        if slowdowns:
            shared = frame["projected_on_shared_cores_samples_per_s"]
            frame["ratio_on_shared_cores"] = shared / frame["measured_samples_per_s"]
    frame = frame.round(3)
    agreement = [within(frame, c) for c in ("ratio", "ratio_on_shared_cores") if c in frame] if measure else []
    title = (
        f"PROJECTION of K devices like this one ({device}, {torch.get_num_threads()} threads each): {model}, "
        f"batch {batch}"
        + (" — projected beside measured (lctrun bench on this machine)" if measure else " — not measured")
    )
    shown = frame[["link", "K", "config", "cut", "projected_samples_per_s", "projected_x_best_bp"]].copy()
    shown["projected MB/device"] = frame["projected_mem_mb_per_device"]
    shown.columns = ["link", "K", "config", "cut", "projected samples/s", "projected x best bp", "projected MB/device"]
    if measure:
        shown["measured samples/s (bench)"], shown["projected / measured"] = (
            frame["measured_samples_per_s"],
            frame["ratio"],
        )
        if slowdowns:
            shown["on shared cores / measured"] = frame["ratio_on_shared_cores"]
    console.print(rich_table(shown, title=title))
    for line in agreement:
        console.print(line)
    if out is not None:
        from lctrun.reporting.rundir import git_commit, hardware_tag
        from lctrun.reporting.tables import write_table

        links_text = "; ".join(link.describe() for link in link_list)
        # a copy without .git (a lent GPU machine gets the working tree alone) is told its commit
        commit = os.environ.get("LCTRUN_COMMIT") or git_commit()
        text = (
            f"# {title}\n\nprofiled on {hardware_tag()} ({device}, {threads} threads), commit {commit}, "
            f"{pd.Timestamp.now().strftime('%Y-%m-%d')}; precision {cfg0.precision}, memory format "
            f"{cfg0.memory_format}; overrides: {' '.join(overrides or []) or 'none'}; links: {links_text}."
        )
        if measure:
            text += (
                " Measured: `lctrun bench` on this machine in the same command, K workers sharing its cores (one "
                "device = the threads each worker gets); each row projected on the cut the bench ran it on; "
                "ratio = projected / measured samples/s. A row without a measurement is one the bench did not run "
                "(a layer-serial reference on a cut no method measured). The profile was taken before and after "
                f"the bench and the rows priced at the mean of the two (after / before: {drift:.3f}x, one batch "
                "through every block)."
            )
            if slowdowns:
                factors = ", ".join(f"K={k}: {f:.3f}x" for k, f in slowdowns.items())
                text += (
                    " projected_on_shared_cores: the same timeline with the K devices as cores of this machine, "
                    "each computing slower while another computes, by the factor measured before and after the "
                    f"bench (lctrun/projection/colocation.py; mean of the two): {factors}; ratio_on_shared_cores "
                    "= it / measured. The projection of separate devices is projected_samples_per_s."
                )
            text += " " + " ".join(f"{line}." for line in agreement)
        paths = write_table(frame, Path(out), text)
        console.print(f"written: {', '.join(map(str, paths))}")
    for link in link_list:
        console.print(f"link {link.describe()}")
    console.print(
        "projected from one device's profile of one batch, every schedule played as a timeline of events per "
        "device and per link; memory: the analytic account per device (parameters, gradients, optimiser state, "
        "saved activations x in flight, auxiliary variables). x best bp: against the fastest projected bp row."
    )
    return frame


def colocation_slowdowns(cfg: Experiment, groups, threads, device, console) -> dict[int, float]:
    """K -> how many times slower K one-thread workers on this machine step at once than one alone (cfg's model,
    a batch of batch / K each, as the data-parallel replicas run, in its precision and memory format), for the K
    that fit its cores one thread each; none when the profiled device is not a CPU core or has more than one
    thread."""
    from lctrun.projection.colocation import slowdown

    cores = os.cpu_count() or 1
    if device != "cpu" or threads != 1:
        return {}
    model, shape, batch = cfg.model.name, tuple(cfg.data.shape), cfg.data.batch_size
    factors = {
        k: slowdown(model, shape, -(-batch // k), k, precision=cfg.precision, layout=cfg.memory_format)
        for k in groups
        if k <= cores
    }
    for k, factor in factors.items():
        console.print(f"K={k} one-thread workers stepping at once: {factor:.3f}x as slow as one alone")
    return factors


def measured_rows(
    model, groups, batch, shape, methods, depths, schedules, microbatches, overrides, threads, repeats, bench_dir: Path
):
    """The projection check's other half: `lctrun bench` on this machine (K workers sharing its cores) for each K,
    its rows named as the projection names them (bench_rows: the same row, its label in each): K, config, the
    cut it ran on, measured samples/s and the spread of its repeats. The bench tables go to `bench_dir` (not
    results/bench, whose full tables a check's subset of rows would overwrite)."""
    from lctrun.bench import bench

    cores = os.cpu_count() or 1
    measured = []
    for k in groups:
        table = bench(
            model,
            k,
            batch,
            tuple(shape),
            methods,
            None,
            depths=depths,
            schedules=schedules,
            microbatches=microbatches,
            repeats=repeats,
            overrides=overrides,
            out_dir=bench_dir,
        )
        rows = bench_rows(methods, k, cores, schedules, microbatches, batch, depths)
        rows += [layer_serial_row(m, k) for m in methods]
        names = {row.label: row.projected_label(threads) for row in rows}
        table["config"] = table["config"].map(names)
        table = table.dropna(subset=["config"]).assign(K=k)[["K", "config", "cut", "samples_per_s", "spread"]]
        columns = {"cut": "measured_cut", "samples_per_s": "measured_samples_per_s", "spread": "measured_spread"}
        measured.append(table.rename(columns=columns))
    return pd.concat(measured)


def within(frame: pd.DataFrame, column: str, tolerance: float = 0.15) -> str:
    """How many measured rows the projection meets within `tolerance`, and how many of those the bench measured
    steadily (spread of its repeats at most bench.NOISY): a row whose own repeats differ by 20% cannot test a
    projection to 15%, so the count among steady rows says what the projection does, the other what the machine
    did."""
    from lctrun.bench import NOISY

    rows = frame.dropna(subset=[column])
    ok = (rows[column] - 1).abs() <= tolerance + 1e-9
    steady = rows["measured_spread"] <= NOISY
    return (
        f"{column}: {int(ok.sum())} of {len(rows)} measured rows within {tolerance:.0%}; of the {int(steady.sum())} "
        f"the bench measured steadily (spread <= {NOISY:.0%}), {int((ok & steady).sum())}"
    )


def on_cut(plan: Plan, cut: str, names: list[str]) -> Plan:
    """The plan on a cut given by block names ("-": none): the check projects each row on the cut the bench
    measured it on, since a time-balanced cut can flip between near-ties from run to run."""
    return replace(plan, cut=[] if cut == "-" else [names.index(n) for n in cut.split(",")])
