"""One training run: build data, model, groups and method stages; train epoch by epoch; write outputs.

The loop is the same for every runtime: the runtime decides where the stages run, and only the
main process (rank 0) writes the run directory.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lctrun import checkpoints
from lctrun.config import Experiment
from lctrun.data import DataBundle, TensorLoader, load_data, test_loader, train_loader
from lctrun.errors import ConfigError, LctrunError
from lctrun.evaluation import test_metrics
from lctrun.methods import EpochPlan, Method, build_stage, get_method, group_shapes
from lctrun.models import build_model, split_groups
from lctrun.models.chain import Group
from lctrun.reporting import rundir
from lctrun.runtime.base import Runtime
from lctrun.runtime.stop import EpochInterrupted, StopRequest


@dataclass
class Prepared:
    cfg: Experiment
    data: DataBundle
    groups: list[Group]
    method: Method
    shapes: list
    devices: list[torch.device] = field(default_factory=list)
    block_names: list[list[str]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def group_devices(cfg: Experiment, num_groups: int) -> list[torch.device]:
    names = cfg.devices
    if len(names) == 1:
        names = names * num_groups
    elif len(names) < num_groups:
        raise ConfigError(
            f"{num_groups} groups but only {len(names)} devices ({', '.join(cfg.devices)}): give one device per "
            f"group, or a single device for all"
        )
    devices = []
    for name in names[:num_groups]:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"devices: '{name}' is not a device (use cpu, cuda, cuda:0, ...)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"devices: '{name}' asked for, but CUDA is not available here (use devices=[cpu])")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(f"devices: '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
        devices.append(device)
    return devices


def prepare(cfg: Experiment, check_devices: bool = True) -> Prepared:
    """Everything a runtime needs, built the same way (same seed) in every process."""
    method = get_method(cfg.method)
    data = load_data(cfg.data, cfg.seed)
    seed_everything(cfg.seed)
    try:  # building and cutting run the model on a sample: inputs too small for it fail here
        model = build_model(cfg.model.name, data.num_classes, data.in_shape)
        sample = None
        if cfg.model.balance in ("time", "flops"):
            loader = TensorLoader(
                data.train_x, data.train_y, min(cfg.data.batch_size, len(data.train_y)), shuffle=False
            )
            sample = next(iter(loader)).x
        n_aux = max(cfg.model.groups - 1, 1)
        aux_for = lambda shape, j: method.aux_module(shape, cfg, data.num_classes, j, n_aux)  # noqa: E731
        groups = split_groups(model, cfg.model.split, cfg.model.groups, cfg.model.balance, sample, aux_for)
        shapes = group_shapes(groups, data.in_shape)
    except RuntimeError as e:
        problem = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"model {cfg.model.name} cannot run on {cfg.data.name} inputs of shape {list(data.in_shape)}: {problem} "
            f"(use larger inputs or a model made for them)"
        ) from None
    devices = group_devices(cfg, len(groups)) if check_devices else []
    names = [g.block_names for g in groups]
    return Prepared(cfg, data, groups, method, shapes, devices, names)


def make_loaders(p: Prepared, device: torch.device, load_x: bool = True) -> tuple[TensorLoader, TensorLoader]:
    d, cfg = p.data, p.cfg
    return (
        train_loader(d, cfg.data.batch_size, cfg.seed, device, load_x),
        test_loader(d, cfg.data.test_batch_size, device, load_x),
    )


def begin_epoch(p: Prepared, runtime, epoch: int, loader: TensorLoader, refresh: bool = True) -> EpochPlan:
    """Set up epoch `epoch` as the method plans it: augmentation, the stages' phase, a refresh pass
    (not when continuing the epoch from a mid-epoch checkpoint: its state is already past it)."""
    plan = p.method.plan(p.cfg, epoch)
    loader.set_epoch(epoch)
    loader.augment = p.data.augment if plan.augment else "none"
    runtime.begin_epoch(plan)
    if plan.refresh and refresh:
        ordered = TensorLoader(
            p.data.train_x,
            p.data.train_y,
            p.cfg.data.batch_size,
            shuffle=False,
            mean=p.data.mean,
            std=p.data.std,
            device=loader.device,
            load_x=loader.load_x,
        )
        runtime.refresh(ordered)
    return plan


def make_serial_runtime(p: Prepared):
    from lctrun.runtime.serial import SerialRuntime

    torch.set_num_threads(p.cfg.threads_per_worker or os.cpu_count() or 1)
    stages = [build_stage(p, k, p.devices[k]) for k in range(len(p.groups))]
    return SerialRuntime(p.method, stages)


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict]
    tables: dict[str, list[dict]] = field(default_factory=dict)  # sub-models, ensembles, progressive inference

    @property
    def final(self) -> dict:
        return self.rows[-1] if self.rows else {}


def check_finite(metrics: dict[str, float], cfg: Experiment, epoch: int) -> None:
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not torch.isfinite(torch.tensor(v))]
    if bad:
        raise LctrunError(
            f"training diverged: {', '.join(bad)} is NaN/Inf in epoch {epoch} of method {cfg.method} "
            f"(try a smaller optim.lr); metrics up to the previous epoch are kept"
        )


def metrics_row(epoch, plan, loader, metrics, result, lr, seconds, runtime) -> dict:
    """One line of metrics.csv."""
    row = {"epoch": epoch}
    if plan.phase != "train":
        row.update(phase=plan.phase, augment=loader.augment, beta=plan.beta)
    row.update({f"train_{k}" if not k.startswith("g") else k: v for k, v in metrics.items()})
    if result is not None:
        row.update(test_metrics(result))
    row.update(
        lr=lr,
        seconds=round(seconds, 3),
        samples_per_s=round(len(loader.y) / seconds, 1),
        data_seconds=round(loader.data_seconds, 3),
        peak_mem_mb=max(s["peak_mem_mb"] for s in runtime.worker_stats),
    )
    return row


def train(
    cfg: Experiment,
    run_dir: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    runtime=None,
    prepared: Prepared | None = None,
) -> RunResult:
    console = console or Console()
    p = prepared or prepare(cfg)
    runtime = runtime or make_serial_runtime(p)
    if not isinstance(runtime, Runtime):  # the contract the loop below relies on (runtime/base.py)
        raise TypeError(f"{type(runtime).__name__} lacks members of the Runtime protocol")
    main = runtime.is_main
    run_dir = Path(runtime.agree(str(run_dir or rundir.default_run_dir(cfg))))
    metrics_path = run_dir / "metrics.csv"

    start_epoch, state, resumed = checkpoints.resume_point(run_dir, runtime) if resume else (0, None, None)
    rows = []
    if state is not None:
        try:
            runtime.load_state_dict(state["runtime"])
        except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
            problem = " ".join(str(e).split())[:150]
            raise ConfigError(
                f"--resume {run_dir}: its checkpoint does not fit the run's config.yaml ({problem}); "
                "was config.yaml edited after the run started (model, split, method)? Restore it, or start a new run"
            ) from None
        checkpoints.restore_rng(state["rng"])
        rows = [r for r in rundir.read_rows(metrics_path) if r["epoch"] <= start_epoch]
        if main:
            where = f"after epoch {start_epoch}" if start_epoch else ""
            if resumed:
                where += f"{', ' if start_epoch else ''}at step {resumed['step']} of epoch {start_epoch + 1}"
            console.print(f"resuming {run_dir} {where}")
    if main:
        rundir.make_run_dir(run_dir)
        rundir.write_config(run_dir, cfg)
        rundir.write_json(run_dir / "env.json", rundir.environment(cfg, {"groups": p.block_names}))
    runtime.barrier()

    train_loader, test_loader = make_loaders(p, p.devices[0] if p.devices else "cpu", load_x=runtime.needs_inputs)
    worker_rows = [r for r in rundir.read_rows(run_dir / "workers.csv") if r["epoch"] <= start_epoch]
    steps_per_epoch = len(train_loader)
    plain = not console.is_terminal  # a log file: one flushed line per epoch, not a bar drawn at the end
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not main or plain,
        transient=False,
    ) as progress:
        epoch = start_epoch
        try:
            with StopRequest(runtime.stop_signals) as stop:
                for epoch in range(start_epoch + 1, cfg.epochs + 1):
                    partial, resumed = resumed, None  # only the first epoch continues a stopped one
                    task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch, info="")
                    progress.update(task, completed=partial["step"] if partial else 0)
                    train_loader.data_seconds = 0.0
                    start = time.perf_counter()
                    plan = begin_epoch(p, runtime, epoch, train_loader, refresh=partial is None)
                    metrics = runtime.train_epoch(
                        train_loader, on_batch=lambda t=task: progress.advance(t), stop=stop, partial=partial
                    )
                    seconds = time.perf_counter() - start + (partial["seconds"] if partial else 0.0)
                    lr = runtime.lr
                    evaluate = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
                    result = runtime.evaluate(test_loader) if evaluate else None
                    if main:
                        row = metrics_row(epoch, plan, train_loader, metrics, result, lr, seconds, runtime)
                        check_finite(row, cfg, epoch)
                        # rows first, then the checkpoint: a resume drops rows after its epoch, so none is
                        # lost or written twice whichever write an interruption falls between
                        rows.append(row)
                        rundir.write_rows(metrics_path, rows)
                        worker_rows += [{"epoch": epoch, **s} for s in runtime.worker_stats]
                        rundir.write_rows(run_dir / "workers.csv", worker_rows)
                        info = f"loss {row['train_loss']:.3f}"
                        info += f" test {row['test_acc']:.2f}%" if "test_acc" in row else ""
                        progress.update(task, info=info)
                        if plain:
                            console.print(f"epoch {epoch}/{cfg.epochs}: {info} ({seconds:.1f} s)", highlight=False)
                            console.file.flush()
                    checkpoints.save(run_dir, epoch, runtime)
                    if runtime.agree(bool(stop)) and epoch < cfg.epochs:  # asked during evaluation or saving
                        raise LctrunError(f"interrupted after epoch {epoch}{checkpoints.resume_hint(run_dir)}")
        except EpochInterrupted as stopped:
            checkpoints.save_partial(run_dir, epoch, runtime, stopped.partial)
            message = checkpoints.interrupted_message(run_dir, epoch, stopped.partial["step"], steps_per_epoch)
            raise LctrunError(message) from None
        except KeyboardInterrupt:
            if not main:
                raise
            raise LctrunError(checkpoints.interrupted_message(run_dir, epoch)) from None
    tables = {}
    classifier = p.data.train_y.dim() == 1  # sub-model exits make no sense per token (language models)
    if cfg.submodels and classifier and (p.method.submodels or (p.method.name == "bp" and len(p.groups) > 1)):
        from lctrun.structural import structural_report

        tables = structural_report(p, runtime, test_loader, run_dir, cfg.exit_thresholds)
    return RunResult(run_dir, rows, tables)
