"""A run's directory: resolved config, environment, per-epoch metrics, checkpoint. Written atomically."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lctrun.config import Experiment, to_dict
from lctrun.errors import WriteError

RESULTS = Path("results")


def default_run_dir(cfg: Experiment) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RESULTS / "runs" / f"{stamp}-{cfg.name}-{cfg.method}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file, then rename it over `path`: a crash or a failed write (a full disk) leaves
    the previous file as it was, and no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(
            f"cannot write {path} ({e.strerror or e}): free some space or give another --out; what was written "
            f"before stays, and lctrun train --resume {path.parent} continues from the last checkpoint"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory, or say in one line why it cannot be (a file, /proc, read-only, full)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"--out {run_dir}: cannot create the run directory there ({e.strerror or e})") from None


def check_run_dir_writable(run_dir: Path) -> None:
    """Before anything is loaded or trained: can a run directory be made at `run_dir`? Leaves nothing behind."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise WriteError(f"--out {run_dir} is a file, not a directory: give a directory path")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise WriteError(f"--out {run_dir}: {parent} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".lctrun-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise WriteError(
            f"--out {run_dir}: cannot write in {parent} ({e.strerror or e}); give a writable directory"
        ) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class RunFiles:
    """The files the training loop writes into a run directory: config.yaml and env.json at the start, then
    after every epoch metrics.csv and workers.csv, each rewritten whole and atomically. A resumed run keeps
    the rows up to its resume point and drops any written after it."""

    def __init__(self, run_dir: Path, start_epoch: int = 0):
        self.run_dir = Path(run_dir)
        self.metrics_path, self.workers_path = self.run_dir / "metrics.csv", self.run_dir / "workers.csv"
        self.rows = [r for r in read_rows(self.metrics_path) if r["epoch"] <= start_epoch]
        self.worker_rows = [r for r in read_rows(self.workers_path) if r["epoch"] <= start_epoch]

    def begin(self, cfg: Experiment, extra_env: dict) -> None:
        make_run_dir(self.run_dir)
        write_config(self.run_dir, cfg)
        write_json(self.run_dir / "env.json", environment(cfg, extra_env))

    def add_epoch(self, row: dict, worker_stats: list[dict]) -> None:
        self.rows.append(row)
        write_rows(self.metrics_path, self.rows)
        self.worker_rows += [{"epoch": row["epoch"], **s} for s in worker_stats]
        write_rows(self.workers_path, self.worker_rows)


PACKAGE = Path(__file__).resolve().parents[1]
# modules that only present finished runs; editing them cannot change a run's result
PRESENTATION = {
    "reproduce.py",
    "compare.py",
    "bench.py",
    "bench_rows.py",
    "cli.py",
    "projection/",  # every module under it
    "reporting/tables.py",
    "reporting/plots.py",
    "reporting/claims.py",
    "reporting/progress.py",
}


def code_version() -> str:
    """A hash of the package code that determines a run's result (everything but the presentation modules).
    The run cache keys on it rather than on the git commit, which changes with every commit of results/."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name not in PRESENTATION and name.split("/")[0] + "/" not in PRESENTATION:
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def git_commit() -> str:
    """HEAD's short hash, "-dirty" when the package code (not results/ or docs) has uncommitted changes."""
    try:
        here = PACKAGE
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def hardware_tag() -> str:
    """What a measurement ran on: GPU name, else CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def environment(cfg: Experiment, extra: dict | None = None) -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hardware": hardware_tag(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "devices": cfg.devices,
        "runtime": cfg.runtime,
        "precision": cfg.precision,  # the compute precision (autocast); parameters stay fp32
        "memory_format": cfg.memory_format,
        "git_commit": git_commit(),
        "host": platform.node(),
        "pid": os.getpid(),  # the process that wrote this run's files
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }


def write_config(run_dir: Path, cfg: Experiment) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_rows(path: Path, rows: list[dict]) -> None:
    """The whole CSV, rewritten atomically: a crash never leaves a half-written row."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return text
