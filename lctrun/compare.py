"""Side-by-side comparison of methods on one experiment: the same data and cut, one run per method and seed.

Layout of the output directory (default results/compare/<time>-<name>/):

    <method>-s<seed>/   one ordinary run directory per run (config.yaml, env.json, metrics.csv, ckpt-eN.pt);
                        done.json once it finished: run again with the same --out, a comparison reuses
                        finished runs and resumes an interrupted one from its checkpoint
    runs.csv            one row per run: its final/best test accuracy, sub-model accuracies, time, memory
    summary.csv         one row per method: the runs.csv numbers, mean (and std) over seeds
    summary.md          the same table, under a header saying what was run, where and when
    accuracy.png        test accuracy per epoch per method (mean over seeds, std shaded)

A method may name its runtime, `lct@distributed`: one worker process per group, while `bp` stays one
process. That is how `make demo` sets wall-clock per epoch of bp on one process beside lct/dgl on K workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console

from lctrun.config import Experiment, apply_overrides, from_dict, load_experiment, to_dict, validate
from lctrun.errors import ConfigError, LctrunError
from lctrun.methods import get_method
from lctrun.reporting import rundir
from lctrun.reporting.plots import Curve, accuracy_per_epoch
from lctrun.reporting.tables import fmt, rich_table, to_markdown
from lctrun.runlock import run_lock

# dataset sizes when data.train_size / data.test_size are not set (for the summary header only)
FULL_SIZES = {
    "mnist": (60_000, 10_000),
    "fashion-mnist": (60_000, 10_000),
    "seqmnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "shapes": (10_000, 2_000),
    "fake": (2048, 512),
}
SUBMODEL = re.compile(r"g(\d+)_test_acc")


RUNTIMES = ("serial", "distributed")


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """`bp,lct,dgl` or a list of names, each optionally `name@runtime`; every name is checked against the
    registry, duplicates dropped."""
    items = methods.split(",") if isinstance(methods, str) else [p for m in methods for p in str(m).split(",")]
    names = list(dict.fromkeys(m.strip() for m in items if m.strip()))
    if not names:
        raise ConfigError("no methods to compare: give --methods as a comma list, e.g. --methods bp,lct,dgl")
    for name in names:
        method, _, runtime = name.partition("@")
        get_method(method)  # unknown names fail here, before any training
        if "@" in name and runtime not in RUNTIMES:
            raise ConfigError(f"--methods {name}: runtime '{runtime}' is not one of {', '.join(RUNTIMES)}")
    return names


def method_config(base: Experiment, name: str) -> Experiment:
    """The experiment for one --methods entry: `lct` or `lct@distributed`."""
    method, _, runtime = name.partition("@")
    cfg = from_dict(Experiment, to_dict(dataclasses.replace(base, method=method, runtime=runtime or base.runtime)))
    validate(cfg)
    return cfg


def finished_rows(run_dir: Path, cfg: Experiment) -> list[dict] | None:
    """The metrics of a run this comparison finished before (same config), else None."""
    if not (run_dir / "config.yaml").exists():
        return None
    from lctrun.launch import config_differences

    what = config_differences(cfg, run_dir)
    if what:  # another comparison's run: refused, nothing overwritten
        raise ConfigError(
            f"--out {run_dir.parent} holds another comparison's run {run_dir.name} ({what}); give a new --out directory"
        )
    rows = rundir.read_rows(run_dir / "metrics.csv") if (run_dir / "done.json").exists() else []
    return rows if len(rows) >= cfg.epochs else None


def resolve(experiment: str | Path | Experiment, overrides: Sequence[str] = ()) -> Experiment:
    """An experiment file (or a config object) with the overrides applied, checked."""
    if isinstance(experiment, Experiment):
        cfg = from_dict(Experiment, apply_overrides(to_dict(experiment), list(overrides)))
        validate(cfg)
        return cfg
    return load_experiment(experiment, list(overrides))


def run_summary_row(rows: list[dict]) -> dict:
    """What one run contributes to the comparison, from its per-epoch metrics rows."""
    accs = [r["test_acc"] for r in rows if _present(r.get("test_acc"))]
    final = rows[-1]
    out = {
        "final_test_acc": float(final["test_acc"]) if _present(final.get("test_acc")) else math.nan,
        "best_test_acc": float(max(accs)) if accs else math.nan,
    }
    for key in submodel_keys([final]):
        out[key] = float(final[key])
    out["s_per_epoch"] = sum(float(r["seconds"]) for r in rows) / len(rows)
    out["peak_mem_mb"] = max(float(r["peak_mem_mb"]) for r in rows)
    return out


def submodel_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k, v in r.items() if SUBMODEL.fullmatch(k) and _present(v)}
    return sorted(keys, key=lambda k: int(SUBMODEL.fullmatch(k)[1]))


def summarize(runs: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """One row per method: mean over seeds of every run metric (peak memory: the max), plus the std of
    final/best test accuracy (sample std, ddof=1) when there is more than one seed."""
    seeds = int(runs.groupby("method")["seed"].count().max()) if len(runs) else 0
    metrics = [c for c in runs.columns if c not in ("method", "seed", "run_dir")]
    out = []
    for method in methods:
        sub = runs[runs["method"] == method]
        row: dict = {"method": method, "seeds": len(sub)}
        for col in metrics:
            row[col] = sub[col].max() if col == "peak_mem_mb" else sub[col].mean()
            if seeds > 1 and col in ("final_test_acc", "best_test_acc"):
                row[f"{col}_std"] = sub[col].std(ddof=1)
        out.append(row)
    order = ["method", "seeds", "final_test_acc", "final_test_acc_std", "best_test_acc", "best_test_acc_std"]
    frame = pd.DataFrame(out)
    sub_cols = submodel_keys([{c: 1.0 for c in frame.columns}])
    rest = [c for c in frame.columns if c not in order and c not in sub_cols]
    return frame[[c for c in order if c in frame.columns] + sub_cols + rest]


def display_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary for people: `mean ± std` in one cell, short column names, blanks for what a method lacks."""

    def pm(mean: float, std: float | None) -> str:
        if _missing(mean):
            return ""
        return f"{mean:.2f}" if std is None or _missing(std) else f"{mean:.2f} ± {std:.2f}"

    rows = []
    for _, r in summary.iterrows():
        row = {"method": r["method"], "seeds": int(r["seeds"])}
        row["final test acc (%)"] = pm(r["final_test_acc"], r.get("final_test_acc_std"))
        row["best test acc (%)"] = pm(r["best_test_acc"], r.get("best_test_acc_std"))
        for key in submodel_keys([{c: 1.0 for c in summary.columns}]):
            row[f"{key.split('_')[0]} acc (%)"] = pm(r[key], None)
        row["s/epoch"] = fmt(float(r["s_per_epoch"]))
        row["peak mem (MB)"] = fmt(float(r["peak_mem_mb"]))
        rows.append(row)
    return pd.DataFrame(rows).astype(object)


def epoch_curves(histories: dict[str, list[list[dict]]]) -> dict[str, Curve]:
    """Per method: test accuracy per epoch, mean over seeds, std over seeds as the band (when > 1 seed)."""
    curves = {}
    for method, runs in histories.items():
        long = pd.DataFrame(
            [
                {"seed": i, "epoch": int(r["epoch"]), "acc": float(r["test_acc"])}
                for i, rows in enumerate(runs)
                for r in rows
                if _present(r.get("test_acc"))
            ]
        )
        if long.empty:
            continue
        stats = long.groupby("epoch")["acc"].agg(["mean", "std"]).fillna(0.0)
        band = stats["std"].tolist() if len(runs) > 1 else None
        curves[method] = Curve(stats.index.tolist(), stats["mean"].tolist(), band)
    return curves


def header(cfg: Experiment, experiment: str, methods: list[str], seeds: list[int], overrides: Sequence[str]) -> str:
    full_train, full_test = FULL_SIZES.get(cfg.data.name, (None, None))
    train_size = cfg.data.train_size or full_train or "full"
    test_size = cfg.data.test_size or full_test or "full"
    cut = f"split after {', '.join(cfg.model.split)}" if cfg.model.split else f"{cfg.model.groups} groups (automatic)"
    lines = [
        f"# Method comparison: {cfg.name}",
        "",
        f"- experiment: {experiment}" + (f" ({' '.join(overrides)})" if overrides else ""),
        f"- methods: {', '.join(methods)}",
        f"- dataset: {cfg.data.name}, train {train_size} / test {test_size} samples",
        f"- model: {cfg.model.name}, {cut}",
        f"- epochs: {cfg.epochs}, batch size {cfg.data.batch_size}, {cfg.optim.name} lr {cfg.optim.lr}",
        f"- seeds: {len(seeds)} ({', '.join(map(str, seeds))})"
        + ("; accuracies are mean ± std (sample std) over seeds" if len(seeds) > 1 else ""),
        f"- runtime: {cfg.runtime}, devices {', '.join(cfg.devices)}",
        f"- precision: {cfg.precision} (autocast; parameters fp32), memory format: {cfg.memory_format}",
        f"- hardware: {rundir.hardware_tag()}",
        f"- commit: {rundir.git_commit()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        "Test accuracy of the whole model (final epoch and best epoch); gK: sub-model made of groups 1..K with its "
        "auxiliary classifier, final epoch, mean over seeds; s/epoch: training time per epoch; peak memory per run.",
    ]
    return "\n".join(lines)


def default_out_dir(cfg: Experiment) -> Path:
    return rundir.RESULTS / "compare" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}"


def compare(
    experiment: str | Path | Experiment,
    methods: str | Sequence[str],
    overrides: Sequence[str] = (),
    seeds: int = 1,
    out_dir: str | Path | None = None,
    console: Console | None = None,
) -> pd.DataFrame:
    """Run `experiment` once per method and seed (cfg.seed, cfg.seed + 1, ...), then write and return the
    per-method summary (one row per method; see the module docstring for the files).

    Everything that can be checked is checked before the first run starts: the config and overrides,
    every method name, the number of seeds.
    """
    console = console or Console()
    base = resolve(experiment, overrides)
    names = parse_methods(methods)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    configs = {m: method_config(base, m) for m in names}
    out = Path(out_dir) if out_dir else default_out_dir(base)
    with run_lock(out, "--out", console):  # one comparison at a time in a folder (its runs have their own locks)
        return compare_runs(experiment, overrides, base, names, configs, seeds, out, console)


def compare_runs(experiment, overrides, base, names, configs, seeds, out, console) -> pd.DataFrame:
    """compare()'s runs, summary and plot, under the lock of `out`."""
    from lctrun.launch import run_training

    seed_list = [base.seed + i for i in range(seeds)]
    plan = [(m, s) for m in names for s in seed_list]
    records, histories = [], {m: [] for m in names}
    start = time.perf_counter()
    label = experiment.name if isinstance(experiment, Experiment) else str(experiment)
    again = " ".join(
        f"lctrun compare {label} {' '.join(overrides)} --methods {','.join(names)} --seeds {seeds} --out {out}".split()
    )
    for i, (method, seed) in enumerate(plan, 1):
        cfg = dataclasses.replace(configs[method], seed=seed)
        run_dir = out / f"{method.replace('@', '-')}-s{seed}"
        rows = finished_rows(run_dir, cfg)
        if rows is not None:
            console.print(f"[bold]run {i}/{len(plan)}:[/] {method} seed {seed}: finished before, reused {run_dir}")
        else:
            console.print(f"[bold]run {i}/{len(plan)}:[/] {method} seed {seed}")
            try:
                result = run_training(
                    cfg, run_dir=run_dir, resume=(run_dir / "config.yaml").exists(), console=console, isolated=True
                )
            except LctrunError as e:
                if not str(e).startswith("interrupted"):
                    raise
                raise LctrunError(
                    f"interrupted in run {i}/{len(plan)} ({method} seed {seed}); {i - 1} finished runs are kept in "
                    f"{out}; continue the comparison (finished runs reused, this one resumed) with: {again}"
                ) from None
            rows = rundir.read_rows(run_dir / "metrics.csv") if result is None else result.rows
            if rows:
                rundir.write_json(
                    run_dir / "done.json", {"method": method, "seed": seed, "commit": rundir.git_commit()}
                )
        if not rows:
            raise ConfigError(f"run {method} seed {seed} wrote no metrics ({run_dir / 'metrics.csv'})")
        histories[method].append(rows)
        records.append({"method": method, "seed": seed, **run_summary_row(rows), "run_dir": str(run_dir)})

    runs = pd.DataFrame(records)
    runs = runs[[c for c in runs.columns if c != "run_dir"] + ["run_dir"]]
    runs.to_csv(out / "runs.csv", index=False)
    summary = summarize(runs.drop(columns="run_dir"), names)
    summary.to_csv(out / "summary.csv", index=False)
    shown = display_frame(summary)
    text = header(base, label, names, seed_list, overrides)
    speed = speed_sentence(summary, configs)
    rundir.atomic_write_text(
        out / "summary.md", text + "\n\n" + to_markdown(shown) + "\n" + (f"\n{speed}\n" if speed else "")
    )
    accuracy_per_epoch(
        epoch_curves(histories),
        out / "accuracy.png",
        title=f"{base.name}: {base.data.name}, {base.model.name}"
        + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""),
    )

    console.print(rich_table(shown, title=f"comparison: {base.name} ({seeds} seed{'s' if seeds > 1 else ''})"))
    if speed:
        console.print(speed)
    console.print(
        f"{len(plan)} runs in {time.perf_counter() - start:.0f} s; outputs: [bold]{out}[/] "
        "(summary.csv, summary.md, accuracy.png, runs.csv, one directory per run)"
    )
    summary.attrs["out_dir"] = str(out)
    return summary


def speed_sentence(summary: pd.DataFrame, configs: dict[str, Experiment]) -> str:
    """What the wall clock says when bp on one process sits beside methods on one worker process per group."""
    per_epoch = dict(zip(summary["method"], summary["s_per_epoch"], strict=True))
    spread = [m for m, c in configs.items() if c.runtime == "distributed"]
    if "bp" not in per_epoch or configs["bp"].runtime != "serial" or not spread:
        return ""
    ratios = ", ".join(f"{m} {per_epoch['bp'] / per_epoch[m]:.2f}x" for m in spread)
    cores = os.cpu_count() or 1
    return (
        f"Wall clock per epoch against bp on one process using all {cores} cores (above 1x: faster than bp): "
        f"{ratios}. The methods run one worker process per layer group on the same {cores} cores, so this is "
        "what cutting the model costs or gains on this machine; the speedup the methods are for needs a device "
        "per group that bp cannot use as well (see `lctrun bench` and the speed tables)."
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _present(value) -> bool:
    return value is not None and value != "" and not _missing(value)
