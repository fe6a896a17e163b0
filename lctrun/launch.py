"""Choose how a run executes: in this process (serial runtime) or one process per group (distributed)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lctrun.config import Experiment
from lctrun.train import RunResult, train


def run_training(
    cfg: Experiment, run_dir: Path | None = None, resume: bool = False, console: Console | None = None
) -> RunResult | None:
    if cfg.runtime == "distributed":
        from lctrun.runtime.distributed import launch

        return launch(cfg, run_dir=run_dir, resume=resume, console=console)
    return train(cfg, run_dir=run_dir, resume=resume, console=console)
