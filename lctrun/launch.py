"""Choose how a run executes: in this process (serial runtime) or one process per group (distributed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lctrun.config import Experiment
from lctrun.train import RunResult, train


def run_training(
    cfg: Experiment,
    run_dir: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    isolated: bool = False,
) -> RunResult:
    """`isolated`: run a serial run in a fresh process, so that its peak memory is its own."""
    if cfg.runtime == "distributed":
        from lctrun.runtime.distributed import launch

        return launch(cfg, run_dir=run_dir, resume=resume, console=console)
    if isolated:
        from lctrun.reporting.rundir import default_run_dir
        from lctrun.runtime.processes import run_processes

        run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
        return run_processes(IsolatedRun(cfg, run_dir, resume), 1, "run", f"; outputs so far: {run_dir}", console)
    return train(cfg, run_dir=run_dir, resume=resume, console=console)


@dataclass
class IsolatedRun:
    cfg: Experiment
    run_dir: Path
    resume: bool

    def __call__(self, rank: int) -> RunResult:
        return train(self.cfg, run_dir=self.run_dir, resume=self.resume, console=Console())
