"""What a run saves to continue later, and where a resume starts.

After every epoch each worker writes ckpt-e<epoch><tag>.pt: its stages' state (model, optimisers,
critics, auxiliary variables) and the RNG state. At a stop inside an epoch (Ctrl-C, SIGTERM) it
writes ckpt-partial<tag>.pt instead, with the epoch's running sums and the loader's position too.
A resume starts from the latest epoch every worker holds, or from the stop inside the next epoch
when every worker saved the same step. Every checkpoint file name is made and read here.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import torch

from lctrun.errors import ConfigError, LctrunError
from lctrun.reporting.rundir import atomic_write_bytes


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# Checkpoints are per epoch and per worker (tag "" for one process, ".rank<r>" for distributed workers):
# ckpt-e<epoch><tag>.pt. A worker drops its older ones only once every worker has written the newer
# one, so some epoch is always held by all, and a run killed mid-save resumes from that epoch.


def checkpoint_path(run_dir: Path, epoch: int, tag: str = "") -> Path:
    return Path(run_dir) / f"ckpt-e{epoch}{tag}.pt"


def partial_checkpoint_path(run_dir: Path, tag: str = "") -> Path:
    """The state at a stop inside an epoch (Ctrl-C, SIGTERM), until that epoch ends."""
    return Path(run_dir) / f"ckpt-partial{tag}.pt"


def has_partial_checkpoint(run_dir: Path) -> bool:
    return any(Path(run_dir).glob("ckpt-partial*.pt"))


def checkpoint_epochs(run_dir: Path, tag: str = "") -> set[int]:
    pattern = re.compile(rf"ckpt-e(\d+){re.escape(tag)}\.pt")
    return {int(m.group(1)) for f in Path(run_dir).glob("ckpt-e*.pt") if (m := pattern.fullmatch(f.name))}


def drop_checkpoints_before(run_dir: Path, epoch: int, tag: str = "") -> None:
    for e in checkpoint_epochs(run_dir, tag):
        if e < epoch:
            checkpoint_path(run_dir, e, tag).unlink(missing_ok=True)


def resumable_epoch(run_dir: Path) -> int:
    """The epoch a resume of this run directory would continue after, read from its files."""
    per_tag: dict[str, set[int]] = {}
    for f in Path(run_dir).glob("ckpt-e*.pt"):
        if m := re.fullmatch(r"ckpt-e(\d+)(.*)\.pt", f.name):
            per_tag.setdefault(m.group(2), set()).add(int(m.group(1)))
    return common_epoch(list(per_tag.values()))


def common_epoch(epochs_per_worker: list[set[int]]) -> int:
    """The latest epoch every worker holds a checkpoint of (0: none, start from scratch)."""
    shared = set.intersection(*map(set, epochs_per_worker)) if epochs_per_worker else set()
    return max(shared, default=0)


def holds_a_run(run_dir: Path) -> bool:
    """Whether the directory holds a run's checkpoints (a new run there would train over them)."""
    return any(Path(run_dir).glob("ckpt-*.pt"))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(run_dir: Path, epoch: int, runtime, config: dict) -> None:
    """This worker's state after `epoch`, with the resolved config it was trained with (a resume checks it);
    older checkpoints go once every worker has this one."""
    state = {"epoch": epoch, "config": config, "runtime": runtime.state_dict(), "rng": rng_state()}
    save_checkpoint(checkpoint_path(run_dir, epoch, runtime.checkpoint_tag), state)
    runtime.barrier()
    drop_checkpoints_before(run_dir, epoch, runtime.checkpoint_tag)
    partial_checkpoint_path(run_dir, runtime.checkpoint_tag).unlink(missing_ok=True)


def save_partial(run_dir: Path, epoch: int, runtime, partial: dict, config: dict) -> None:
    """This worker's state at a stop inside `epoch`: what it takes to finish the epoch from there."""
    state = {"epoch": epoch, "config": config, "partial": partial, "runtime": runtime.state_dict(), "rng": rng_state()}
    save_checkpoint(partial_checkpoint_path(run_dir, runtime.checkpoint_tag), state)


def load(path: Path, mmap: bool = False) -> dict:
    """`mmap`: map the file instead of reading it (tensors are read only when touched)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # data, never code
    except Exception as e:  # a file damaged outside lctrun (its own writes are atomic)
        problem = " ".join(str(e).split())[:120]
        raise LctrunError(
            f"cannot resume from {path}: the checkpoint is unreadable ({type(e).__name__}: {problem}); "
            f"start a new run with another --out"
        ) from None


def trained_config(run_dir: Path) -> dict | None:
    """The resolved config the run's newest checkpoint was trained with (None: no checkpoint yet, or one
    written before checkpoints carried their config)."""
    files = sorted(Path(run_dir).glob("ckpt-*.pt"), key=lambda f: f.stat().st_mtime_ns)
    return load(files[-1], mmap=True).get("config") if files else None


def resume_point(run_dir: Path, runtime) -> tuple[int, dict | None, dict | None]:
    """(epochs done, the state to load or None, the stopped epoch's partial sums or None); every worker
    agrees on it (a collective call)."""
    tag = runtime.checkpoint_tag
    held = runtime.gather(checkpoint_epochs(run_dir, tag))
    epoch = common_epoch(held)
    newest = max((max(h) for h in held if h), default=0)
    if newest > epoch + 1:  # a worker drops a checkpoint only once all hold the next: one is missing
        missing = [k for k, h in enumerate(held) if not h & {newest - 1, newest}]
        raise LctrunError(
            f"cannot resume {run_dir}: worker(s) {', '.join(map(str, missing))} hold no checkpoint of epoch "
            f"{newest - 1} or {newest} (ckpt-e*.rankK.pt), which the others reached; put the missing files back, "
            f"or start a new run with another --out"
        )
    path = partial_checkpoint_path(run_dir, tag)
    state = load(path) if path.exists() else None
    if state is not None and state["epoch"] != epoch + 1:
        state = None  # left from an epoch that was later finished or never reached
    if len(set(runtime.gather(state and state["partial"]["step"]))) > 1:
        state = None  # not every worker saved the same step: continue from the whole epoch
    if state is not None:
        return epoch, state, state["partial"]
    return epoch, load(checkpoint_path(run_dir, epoch, tag)) if epoch else None, None


def resume(run_dir: Path, runtime, console) -> tuple[int, dict | None]:
    """Load the state a resume starts from into `runtime` (every worker: a collective call); returns (epochs
    done, the stopped epoch's partial sums or None)."""
    epoch, state, partial = resume_point(run_dir, runtime)
    if state is None:
        return epoch, None
    try:
        runtime.load_state_dict(state["runtime"])
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
        problem = " ".join(str(e).split())[:150]
        raise ConfigError(
            f"--resume {run_dir}: its checkpoint does not fit the run's config.yaml ({problem}); "
            "was config.yaml edited after the run started (model, split, method)? Restore it, or start a new run"
        ) from None
    restore_rng(state["rng"])
    if runtime.is_main:
        where = f"after epoch {epoch}" if epoch else ""
        if partial:
            where += f"{', ' if epoch else ''}at step {partial['step']} of epoch {epoch + 1}"
        console.print(f"resuming {run_dir} {where}")
    return epoch, partial


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run ("" when nothing was saved: there is nothing to continue)."""
    epoch, partial = resumable_epoch(run_dir), has_partial_checkpoint(run_dir)
    if not epoch and not partial:
        return ""
    epochs = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
    kept = " and ".join([epochs] * bool(epoch) + ["a mid-epoch checkpoint"] * partial)
    return f"; {run_dir} keeps {kept}; continue with: lctrun train --resume {run_dir}"


def interrupted_message(run_dir: Path, epoch: int, step: int | None = None, steps: int = 0) -> str:
    where = f"after step {step}/{steps} of epoch {epoch} (saved)" if step else f"in epoch {epoch}"
    return f"interrupted {where}{resume_hint(run_dir) or '; no epoch had finished'}"
