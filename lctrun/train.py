"""One training run: build data, model, groups and method stages; train epoch by epoch; write outputs.

The loop is the same for every runtime: the runtime decides where the stages run, and only the
main process (rank 0) writes the run directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lctrun import checkpoints
from lctrun.config import Experiment, to_dict
from lctrun.errors import LctrunError
from lctrun.evaluation import test_metrics
from lctrun.prepared import Prepared, begin_epoch, make_loaders, make_serial_runtime, prepare
from lctrun.reporting import rundir
from lctrun.reporting.progress import EpochProgressView
from lctrun.runtime.base import Runtime
from lctrun.runtime.stop import EpochInterrupted, StopRequest


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
    start_epoch, resumed = checkpoints.resume(run_dir, runtime, console) if resume else (0, None)
    files = rundir.RunFiles(run_dir, start_epoch)
    config = to_dict(cfg)  # saved with every checkpoint: a resume continues this experiment only
    if main:
        files.begin(cfg, {"groups": p.block_names})
    runtime.barrier()

    train_loader, test_loader = make_loaders(p, p.devices[0] if p.devices else "cpu", load_x=runtime.needs_inputs)
    steps_per_epoch = len(train_loader)
    with EpochProgressView(console, main, cfg.epochs, steps_per_epoch) as view:
        epoch = start_epoch
        try:
            with StopRequest(runtime.stop_signals) as stop:
                for epoch in range(start_epoch + 1, cfg.epochs + 1):
                    partial, resumed = resumed, None  # only the first epoch continues a stopped one
                    advance = view.begin(epoch, partial["step"] if partial else 0)
                    train_loader.data_seconds = 0.0
                    start = time.perf_counter()
                    plan = begin_epoch(p, runtime, epoch, train_loader, refresh=partial is None)
                    metrics = runtime.train_epoch(train_loader, on_batch=advance, stop=stop, partial=partial)
                    seconds = time.perf_counter() - start + (partial["seconds"] if partial else 0.0)
                    lr = runtime.lr
                    evaluate = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
                    result = runtime.evaluate(test_loader) if evaluate else None
                    if main:
                        row = metrics_row(epoch, plan, train_loader, metrics, result, lr, seconds, runtime)
                        check_finite(row, cfg, epoch)
                        # rows first, then the checkpoint: a resume drops rows after its epoch, so none is
                        # lost or written twice whichever write an interruption falls between
                        files.add_epoch(row, runtime.worker_stats)
                        view.end(epoch, row, seconds)
                    runtime.barrier()  # every worker's checkpoint after the main one's rows (a full disk)
                    checkpoints.save(run_dir, epoch, runtime, config)
                    if runtime.agree(bool(stop)) and epoch < cfg.epochs:  # asked during evaluation or saving
                        raise LctrunError(f"interrupted after epoch {epoch}{checkpoints.resume_hint(run_dir)}")
        except EpochInterrupted as stopped:
            checkpoints.save_partial(run_dir, epoch, runtime, stopped.partial, config)
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
    return RunResult(run_dir, files.rows, tables)
