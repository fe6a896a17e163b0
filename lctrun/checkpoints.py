"""What a run saves to continue later, and where a resume starts.

After every epoch each worker writes ckpt-e<epoch><tag>.pt: its stages' state (model, optimisers,
critics, auxiliary variables) and the RNG state. At a stop inside an epoch (Ctrl-C, SIGTERM) it
writes ckpt-partial<tag>.pt instead, with the epoch's running sums and the loader's position too.
A resume starts from the latest epoch every worker holds, or from the stop inside the next epoch
when every worker saved the same step. File names and atomic writes are reporting/rundir.py's.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lctrun.errors import LctrunError
from lctrun.reporting import rundir


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(run_dir: Path, epoch: int, runtime) -> None:
    """This worker's state after `epoch`; older checkpoints go once every worker has this one."""
    state = {"epoch": epoch, "runtime": runtime.state_dict(), "rng": rng_state()}
    rundir.save_checkpoint(rundir.checkpoint_path(run_dir, epoch, runtime.checkpoint_tag), state)
    runtime.barrier()
    rundir.drop_checkpoints_before(run_dir, epoch, runtime.checkpoint_tag)
    rundir.partial_checkpoint_path(run_dir, runtime.checkpoint_tag).unlink(missing_ok=True)


def save_partial(run_dir: Path, epoch: int, runtime, partial: dict) -> None:
    """This worker's state at a stop inside `epoch`: what it takes to finish the epoch from there."""
    state = {"epoch": epoch, "partial": partial, "runtime": runtime.state_dict(), "rng": rng_state()}
    rundir.save_checkpoint(rundir.partial_checkpoint_path(run_dir, runtime.checkpoint_tag), state)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint is data, never code
    except Exception as e:  # a file damaged outside lctrun (its own writes are atomic)
        problem = " ".join(str(e).split())[:120]
        raise LctrunError(
            f"cannot resume from {path}: the checkpoint is unreadable ({type(e).__name__}: {problem}); "
            f"start a new run with another --out"
        ) from None


def resume_point(run_dir: Path, runtime) -> tuple[int, dict | None, dict | None]:
    """(epochs done, the state to load or None, the stopped epoch's partial sums or None); every worker
    agrees on it (a collective call)."""
    tag = runtime.checkpoint_tag
    held = runtime.gather(rundir.checkpoint_epochs(run_dir, tag))
    epoch = rundir.common_epoch(held)
    newest = max((max(h) for h in held if h), default=0)
    if newest > epoch + 1:  # a worker drops a checkpoint only once all hold the next: one is missing
        missing = [k for k, h in enumerate(held) if not h & {newest - 1, newest}]
        raise LctrunError(
            f"cannot resume {run_dir}: worker(s) {', '.join(map(str, missing))} hold no checkpoint of epoch "
            f"{newest - 1} or {newest} (ckpt-e*.rankK.pt), which the others reached; put the missing files back, "
            f"or start a new run with another --out"
        )
    path = rundir.partial_checkpoint_path(run_dir, tag)
    state = load(path) if path.exists() else None
    if state is not None and state["epoch"] != epoch + 1:
        state = None  # left from an epoch that was later finished or never reached
    if len(set(runtime.gather(state and state["partial"]["step"]))) > 1:
        state = None  # not every worker saved the same step: continue from the whole epoch
    if state is not None:
        return epoch, state, state["partial"]
    return epoch, load(rundir.checkpoint_path(run_dir, epoch, tag)) if epoch else None, None


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run ("" when nothing was saved: there is nothing to continue)."""
    epoch, partial = rundir.resumable_epoch(run_dir), rundir.has_partial_checkpoint(run_dir)
    if not epoch and not partial:
        return ""
    epochs = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
    kept = " and ".join([epochs] * bool(epoch) + ["a mid-epoch checkpoint"] * partial)
    return f"; {run_dir} keeps {kept}; continue with: lctrun train --resume {run_dir}"


def interrupted_message(run_dir: Path, epoch: int, step: int | None = None, steps: int = 0) -> str:
    where = f"after step {step}/{steps} of epoch {epoch} (saved)" if step else f"in epoch {epoch}"
    return f"interrupted {where}{resume_hint(run_dir) or '; no epoch had finished'}"
