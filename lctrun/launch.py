"""Choose how a run executes: in this process (serial runtime) or one process per group (distributed)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lctrun.checkpoints import holds_a_run, resume_hint
from lctrun.config import ConfigError, Experiment, load_experiment, to_dict
from lctrun.train import RunResult, train

RESUMABLE = {"epochs", "eval_every"}  # may change on resume: train longer, evaluate more often


def run_training(
    cfg: Experiment,
    run_dir: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    isolated: bool = False,
) -> RunResult:
    """`isolated`: run a serial run in a fresh process, so that its peak memory is its own. The run directory
    is locked while the run goes (by rank 0 only, under torchrun)."""
    if resume and run_dir is not None:
        check_same_config(cfg, Path(run_dir))
    if run_dir is not None:
        from lctrun.reporting.rundir import check_run_dir_writable

        check_run_dir_writable(Path(run_dir))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.runtime == "serial" and "RANK" in os.environ and world > 1:
        raise ConfigError(
            f"torchrun started {world} processes but runtime=serial trains the whole model in each of them: "
            f"add runtime=distributed (one process per group), or run without torchrun"
        )
    from lctrun.reporting.rundir import default_run_dir
    from lctrun.runlock import run_lock

    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    locks = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 holds the lock for every rank
    with run_lock(run_dir, "--resume" if resume else "--out", console) if locks else contextlib.nullcontext():
        if not resume and locks:
            check_new_run_dir(run_dir)  # again, under the lock: a run that started and ended meanwhile
        if resume and locks:
            check_trained_config(cfg, run_dir)
        if cfg.runtime == "distributed":
            return launch_distributed(cfg, run_dir=run_dir, resume=resume, console=console)
        if isolated:
            from lctrun.runtime.processes import run_processes

            return run_processes(IsolatedRun(cfg, run_dir, resume), 1, "run", lambda: resume_hint(run_dir), console)
        return train(cfg, run_dir=run_dir, resume=resume, console=console)


@dataclass
class TrainJob:
    """What each distributed worker runs once its stage is built: the training loop, on its runtime."""

    run_dir: Path | None
    resume: bool

    def __call__(self, p, runtime, console):
        return train(p.cfg, self.run_dir, self.resume, console, runtime=runtime, prepared=p)


def launch_distributed(cfg: Experiment, run_dir: Path | None = None, resume: bool = False, console=None):
    """The distributed runtime: this process is one worker under torchrun, else one local process per group."""
    from lctrun.reporting.rundir import default_run_dir
    from lctrun.runtime.distributed import run_worker, spawn_workers

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return run_worker(cfg, rank, world, local_rank, "env://", TrainJob(run_dir, resume))
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    return spawn_workers(cfg, TrainJob(run_dir, resume), where=lambda: resume_hint(run_dir), console=console)


@dataclass
class IsolatedRun:
    cfg: Experiment
    run_dir: Path
    resume: bool

    def __call__(self, rank: int) -> RunResult:
        return train(self.cfg, run_dir=self.run_dir, resume=self.resume, console=Console())


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def differences(before: dict, now: dict) -> list[str]:
    """The keys of two resolved configs that differ, besides the run's length (RESUMABLE)."""
    before, now = flatten(before), flatten(now)
    return [k for k in now if k not in RESUMABLE and before.get(k) != now[k]]


def config_differences(cfg: Experiment, run_dir: Path) -> str:
    """What differs between `cfg` and the run's config.yaml, besides its length ("" if nothing, or no run)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return ""  # nothing ran there yet: a resume starts it
    saved, now = to_dict(load_experiment(saved_path)), to_dict(cfg)
    changed = differences(saved, now)
    saved, now = flatten(saved), flatten(now)
    return ", ".join(f"{k}={saved.get(k)!r} in the run but {now[k]!r} now" for k in changed[:3])


def check_same_config(cfg: Experiment, run_dir: Path) -> None:
    """A resumed run continues the config it was started with (only its length may change)."""
    what = config_differences(cfg, run_dir)
    if what:
        raise ConfigError(
            f"--resume {run_dir}: the config differs from the run's ({what}); resume with the run's own config "
            f"(lctrun train --resume {run_dir}) or start a new run"
        )


def check_trained_config(cfg: Experiment, run_dir: Path) -> None:
    """A resume continues the experiment its checkpoint was trained with: config.yaml and the overrides may
    change its length (epochs, eval_every) and nothing else."""
    from lctrun.checkpoints import trained_config

    trained = trained_config(run_dir)
    if trained is None:
        return
    now = to_dict(cfg)
    changed = differences(trained, now)
    if changed:
        trained, now = flatten(trained), flatten(now)
        what = ", ".join(f"{k}={trained.get(k)!r} in its checkpoint but {now[k]!r} now" for k in changed)
        raise ConfigError(
            f"--resume {run_dir}: the config differs from the one the run was trained with ({what}); was "
            f"config.yaml edited after the run started? Restore it (only epochs and eval_every may change), "
            f"or start a new run"
        )


def resumed_config(run_dir: Path, overrides: list[str]) -> Experiment:
    """The config of the run in `run_dir`, with overrides (e.g. epochs=10 to train longer)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml there)")
    return load_experiment(run_dir / "config.yaml", overrides)


def check_new_run_dir(run_dir: Path) -> None:
    """Never train over a run by accident: a directory with checkpoints is continued with --resume."""
    if (run_dir / "metrics.csv").exists() or holds_a_run(run_dir):
        raise ConfigError(
            f"--out {run_dir} already holds a run; continue it with: lctrun train --resume {run_dir} "
            f"(or give another --out)"
        )
