"""`lctrun reproduce TABLE --scale smoke|small|paper`: a published table re-run here, ours beside theirs.

A table is data, `lctrun/experiments/tables/<name>.yaml` (installed with the package; `experiments/` in a
checkout links there):

    title, source            what the table is and where its published values come from
    published_setting        the setting of those values (dataset, model, schedule)
    experiment               the base experiment file every run starts from
    scales: {paper: {note, overrides}, small: ..., smoke: ...}
                             how each scale shrinks (or not) the paper's setting
    scales_from              or: the scales of another table (tables of one paper share them)
    columns                  the measured columns to show (see `measure`)
    reference                label of the run that speedups and memory ratios are relative to
    layer_serial             label of the model-parallel bp run on the same cut: speedup_vs_layer_serial and
                             g1_update_vs_bp (how much group 1 learns per epoch) are relative to it
    best_bp                  labels of the bp runs (one worker, model-parallel, pipelined): speedup_vs_best_bp is
                             relative to the fastest of them, the baseline a practitioner would pick
    gap_to                   label of the run (bp) that "vs <label>" columns subtract, ours and the paper's
    seeds: {scale: N}        this table's seeds at a scale, over the (shared) scale's own
    claims: - claim, check   the paper's qualitative claims, checked on our values and on the published ones
                             (see claims.py); a scale's `seeds: N` runs every run N times (mean ± std)
    no_claims                or, for a table without claims: why (printed in table.md and on the console)
    runs: - label, overrides, rows (final | submodels | ensembles | progressive), published, notes

Each run's config is experiment + scale overrides + run overrides. Runs are cached in
<out>/runs/<method>-<key>/, key = hash(resolved config, code version): a finished run (done.json) is
reused, an interrupted one resumes from its checkpoint, a changed config or changed training code runs anew.
The code version hashes the package minus the modules that only present results (rundir.code_version), so
committing results/ or editing a table's rendering reuses every run. done.json records the commit that made it.
Outputs: <out>/<table>-<scale>/table.csv, table.md, and PNG plots, with a header naming the scale,
datasets, hardware and the commits of the runs.

Convergence (docs/methods.md section 10): every row gets `last3_move`, the movement over the last 3 epochs of
its run's test accuracy averaged over the seeds epoch by epoch (sub-model, ensemble and threshold rows take
their run's main-model curve), and `converged` (yes: under 0.3 points; no; not measured: fewer than 3
epochs). The header states the rule; a claim that uses a run that has not converged is provisional.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console

from lctrun.config import Experiment, load_experiment, to_dict
from lctrun.errors import ConfigError
from lctrun.reporting import rundir
from lctrun.reporting.claims import CONVERGED_BELOW, check_claim_spec, converged, evaluate_claims, last3_move
from lctrun.reporting.plots import Curve, bar_plot, line_plot
from lctrun.reporting.tables import rich_table, slug, with_spread, write_table

TABLES_DIR = Path(__file__).resolve().parent / "experiments" / "tables"  # package data: works installed too
SCALES = ("smoke", "small", "paper")
ROW_KINDS = ("final", "submodels", "ensembles", "progressive")
TABLE_KEYS = {"title", "source", "published_setting", "experiment", "scales", "scales_from", "columns", "reference"}
TABLE_KEYS |= {"runs", "notes", "layer_serial", "claims", "gap_to", "seeds", "best_bp", "no_claims"}
SCALE_KEYS = {"note", "overrides", "seeds"}
RUN_KEYS = {"label", "overrides", "rows", "published", "notes", "scale_overrides"}


@dataclass
class TableRun:
    label: str
    overrides: list[str]
    rows: str = "final"
    published: dict = field(default_factory=dict)  # column -> value, or (rows != final) item -> {column: value}
    notes: str = ""
    scale_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass(kw_only=True)
class Table:
    name: str
    title: str
    source: str
    published_setting: str
    experiment: str | None
    scales: dict[str, dict]
    columns: list[str]
    runs: list[TableRun]
    reference: str | None = None
    notes: list[str] = field(default_factory=list)
    layer_serial: str | None = None
    claims: list[dict] = field(default_factory=list)
    gap_to: str | None = None
    own_seeds: dict[str, int] = field(default_factory=dict)  # `seeds: {small: 1}`: this table's, over its scale's
    best_bp: list[str] = field(default_factory=list)
    no_claims: str = ""  # why a table without claims has none

    def seeds(self, scale: str) -> int:
        return int(self.own_seeds.get(scale, self.scales[scale].get("seeds", 1)))

    def config(self, run: TableRun, scale: str, extra: list[str] | None = None) -> Experiment:
        """The resolved config of one run at one scale, with `extra` overrides last (its errors name the table
        and the run)."""
        overrides = self.scales[scale].get("overrides", []) + run.overrides + run.scale_overrides.get(scale, [])
        overrides += extra or []
        try:
            cfg = load_experiment(self.experiment and TABLES_DIR.parents[1] / self.experiment, overrides)
        except ConfigError as e:
            raise ConfigError(f"table {self.name}, run '{run.label}' at scale {scale}: {e}") from None
        return cfg


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLES_DIR.glob("*.yaml"))


def _require(mapping: dict, keys: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (valid: {', '.join(sorted(keys))})")


def load_table(name: str) -> Table:
    path = TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown table '{name}': known tables are {', '.join(table_names())} (lctrun reproduce --list)"
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "title" not in data:
        raise ConfigError(f"{path}: a table must be a YAML mapping with a title and runs")
    _require(data, TABLE_KEYS, str(path))
    runs = []
    for i, raw in enumerate(data.get("runs") or []):
        _require(raw, RUN_KEYS, f"{path}: runs[{i}]")
        run = TableRun(**{"overrides": [], **raw})
        if run.rows not in ROW_KINDS:
            raise ConfigError(f"{path}: run '{run.label}': rows={run.rows!r} is not one of {', '.join(ROW_KINDS)}")
        runs.append(run)
    if not runs:
        raise ConfigError(f"{path}: a table needs at least one run")
    scales = load_table(data["scales_from"]).scales if "scales_from" in data else data.get("scales") or {}
    missing = [s for s in SCALES if s not in scales]
    if missing:
        raise ConfigError(
            f"{path}: scales {', '.join(missing)} are not defined (each table defines {', '.join(SCALES)})"
        )
    for scale, settings in scales.items():
        _require(settings or {}, SCALE_KEYS, f"{path}: scales.{scale}")
        if not isinstance((settings or {}).get("seeds", 1), int) or (settings or {}).get("seeds", 1) < 1:
            raise ConfigError(f"{path}: scales.{scale}.seeds must be an integer >= 1")
    labels = [r.label for r in runs]
    for key in ("reference", "layer_serial", "gap_to"):
        if data.get(key) is not None and data[key] not in labels:
            raise ConfigError(f"{path}: {key} '{data[key]}' is not a run label ({', '.join(labels)})")
    for label in data.get("best_bp") or []:
        if label not in labels:
            raise ConfigError(f"{path}: best_bp '{label}' is not a run label ({', '.join(labels)})")
    reference = data.get("reference")
    no_claims = data.get("no_claims") or ""
    if not data.get("claims") and not (isinstance(no_claims, str) and no_claims.strip()):
        raise ConfigError(f"{path}: a table without claims says why in no_claims (a sentence)")
    if data.get("claims") and no_claims:
        raise ConfigError(f"{path}: a table with claims has no no_claims")
    return Table(
        name=name,
        title=data["title"],
        source=data.get("source", ""),
        published_setting=data.get("published_setting", ""),
        experiment=data.get("experiment"),
        scales=scales,
        columns=list(data.get("columns") or ["test_acc"]),
        runs=runs,
        reference=reference,
        notes=list(data.get("notes") or []),
        layer_serial=data.get("layer_serial"),
        claims=[check_claim_spec(c, labels, f"{path}: claims[{i}]") for i, c in enumerate(data.get("claims") or [])],
        gap_to=data.get("gap_to"),
        own_seeds=dict(data.get("seeds") or {}),
        best_bp=list(data.get("best_bp") or []),
        no_claims=no_claims.strip(),
    )


def check_table(table: Table) -> None:
    """Every run at every scale resolves to a config whose method, model and dataset exist."""
    from lctrun.data import DATASETS
    from lctrun.methods import get_method
    from lctrun.models import find_model

    for scale in SCALES:
        for run in table.runs:
            cfg = table.config(run, scale)
            get_method(cfg.method)
            where = f"table {table.name}, run '{run.label}' at scale {scale}"
            if find_model(cfg.model.name) is None:
                raise ConfigError(f"{where}: unknown model '{cfg.model.name}'")
            if cfg.data.name not in DATASETS:
                raise ConfigError(f"{where}: unknown dataset '{cfg.data.name}'")


# -- running --------------------------------------------------------------------------------------
def cache_key(cfg: Experiment, code: str) -> str:
    text = yaml.safe_dump({"config": to_dict(cfg), "code": code}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_cached(cfg: Experiment, label: str, cache: Path, code: str, console: Console) -> tuple[Path, bool]:
    """(run directory, whether it was reused). Unfinished directories resume from their checkpoint."""
    from lctrun.launch import run_training

    key = cache_key(cfg, code)
    run_dir = cache / f"{cfg.method}-{key}"  # the same config in two tables is one run
    done = run_dir / "done.json"
    if done.exists():
        return run_dir, True
    run_training(cfg, run_dir=run_dir, resume=True, console=console, isolated=cfg.runtime == "serial")
    rundir.write_json(done, {"key": key, "code": code, "commit": rundir.git_commit(), "label": label})
    return run_dir, False


# -- measuring ------------------------------------------------------------------------------------
def is_sph(rows: list[dict]) -> bool:
    """Whether a run's epochs alternate parallel and serial phases (layerpar.sph)."""
    return {"parallel", "serial"} <= {r.get("phase") for r in rows}


def convergence_curve(rows: list[dict]) -> dict[int, float]:
    """The test accuracy the convergence rule judges: per epoch, or for a serial-parallel hybrid run (epochs of
    both phases) per cycle, at the end of each cycle's serial phase. An SPH run's model is what a serial phase
    delivers; its parallel epochs dip and recover by design, so only cycle ends are comparable points
    (docs/methods.md section 10)."""

    def scored(r: dict) -> bool:
        return isinstance(r.get("test_acc"), (int, float))

    if is_sph(rows):
        nxt = [r.get("phase") for r in rows[1:]] + [None]
        ends = [r for r, after in zip(rows, nxt, strict=True) if r.get("phase") == "serial" and after != "serial"]
        return {cycle: r["test_acc"] for cycle, r in enumerate(ends, 1) if scored(r)}
    return {r["epoch"]: r["test_acc"] for r in rows if scored(r)}


def measure(run_dir: Path) -> dict:
    """The measured columns of a finished run, from its metrics.csv and workers.csv."""
    rows = rundir.read_rows(run_dir / "metrics.csv")
    workers = rundir.read_rows(run_dir / "workers.csv")
    final = rows[-1]
    out = {k: v for k, v in final.items() if k.endswith("test_acc")}
    out["best_test_acc"] = max(r["test_acc"] for r in rows if "test_acc" in r)
    # the main model's test accuracy per evaluated epoch; over seeds, it gives the run's last3_move (claims.py)
    out["test_acc_curve"], out["sph"] = convergence_curve(rows), is_sph(rows)
    out["epochs"] = len(rows)
    out["train_s"] = sum(r["seconds"] for r in rows)
    out["s_per_epoch"] = out["train_s"] / len(rows)
    out["samples_per_s"] = sum(r["samples_per_s"] * r["seconds"] for r in rows) / out["train_s"]
    epochs = sorted({w["epoch"] for w in workers})
    per_epoch = [[w for w in workers if w["epoch"] == e] for e in epochs]
    out["workers"] = len(per_epoch[-1])
    out["critical_s"] = sum(max(w["compute_s"] for w in ws) for ws in per_epoch)
    peaks = [max(w["peak_mem_mb"] for w in workers if w["worker"] == k) for k in range(out["workers"])]
    out["peak_mem_mb"] = max(peaks)
    out["peak_mem_mb_per_worker"] = "/".join(f"{p:.0f}" for p in peaks)
    out["mb_sent_per_epoch"] = sum(sum(w["bytes_sent"] for w in ws) for ws in per_epoch) / len(per_epoch) / 2**20
    out["aux_vars_mb"] = max(sum(w.get("aux_vars_mb", 0.0) or 0.0 for w in ws) for ws in per_epoch)
    # group 1's parameter change per epoch, in the epochs where it learns from its own sub-problem
    out["g1_updates"] = {r["epoch"]: r["g1_update_norm"] for r in rows if r.get("g1_update_norm") not in (None, "")}
    out["g1_updates"] = {e: v for e, v in out["g1_updates"].items() if rows[e - 1].get("phase") != "serial"}
    return out


def expand(run: TableRun, run_dir: Path, measured: dict) -> list[dict]:
    """The table rows of one run (`measured` = measure(run_dir)): its final result, or one row per
    sub-model / ensemble / threshold."""
    if run.rows == "final":
        return [{"run": run.label, "item": "", **measured}]
    frame = pd.read_csv(run_dir / f"{run.rows}.csv")
    key = frame.columns[0]  # model, or threshold
    rows = [{"run": run.label, "item": str(r[key]), **r.drop(key).to_dict()} for _, r in frame.iterrows()]
    if run.rows in ("ensembles", "progressive"):  # what they are measured against
        rows.append({"run": run.label, "item": "main", "test_acc": measured["test_acc"], "flops_frac": 1.0})
    return rows


def over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """One row per table row: numbers averaged over the seeds, with "<column> std" (sample std) when there
    is more than one seed; anything else (per-worker strings, per-epoch dicts) from the first seed."""
    out = []
    for same in zip(*per_seed, strict=True):
        row = dict(same[0], seeds=len(same))
        for key in same[0]:
            values = [r.get(key) for r in same]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[key] = sum(values) / len(values)
                if len(values) > 1:
                    mean = row[key]
                    row[f"{key} std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append(row)
    return out


def reference_row(rows: list[dict], label: str | None) -> dict | None:
    return next((r for r in rows if r["run"] == label and r["item"] == ""), None)


def fastest(rows: list[dict], labels: list[str]) -> dict | None:
    """The quickest (least training wall-clock) of the runs with these labels."""
    found = [r for r in (reference_row(rows, label) for label in labels) if r is not None and "train_s" in r]
    return min(found, key=lambda r: r["train_s"]) if found else None


def relative(
    rows: list[dict], reference: str | None, layer_serial: str | None = None, best_bp: list[str] | None = None
) -> None:
    """Speedup (wall clock and the critical-path bound) and memory relative to the reference run; against the
    fastest of the best_bp runs, speedup_vs_best_bp; against the layer-serial (model-parallel bp) run,
    speedup_vs_layer_serial and g1_update_vs_bp: the smallest, over a run's epochs (parallel ones for
    penalty/al), of group 1's parameter change over that run's in the same epoch."""
    ref, serial = reference_row(rows, reference), reference_row(rows, layer_serial)
    best = fastest(rows, best_bp or [])
    for r in (r for r in rows if "train_s" in r):
        if best is not None:
            r["speedup_vs_best_bp"] = best["train_s"] / r["train_s"]
        if ref is not None:
            r["speedup"] = ref["train_s"] / r["train_s"]
            r["ideal_speedup"] = ref["train_s"] / r["critical_s"]
            r["mem_vs_ref"] = r["peak_mem_mb"] / ref["peak_mem_mb"]
        if serial is not None:
            r["speedup_vs_layer_serial"] = serial["train_s"] / r["train_s"]
            base = serial["g1_updates"]
            ratios = [v / base[e] for e, v in r["g1_updates"].items() if base.get(e)]
            if ratios:
                r["g1_update_vs_bp"] = min(ratios)


def published_value(run: TableRun, item: str, column: str):
    values = run.published.get(item, {}) if run.rows != "final" else run.published
    return values.get(column) if isinstance(values, dict) else None


def assemble(table: Table, rows: list[dict]) -> pd.DataFrame:
    """run, item, then per column: ours, and where the paper has one: paper and gap (ours - paper)."""
    runs = {r.label: r for r in table.runs}
    out = []
    for row in rows:
        run = runs[row["run"]]
        line = {"run": row["run"], "item": row["item"]}
        for col in table.columns:
            line[col] = row.get(col, math.nan)
            if f"{col} std" in row:
                line[f"{col} std"] = row[f"{col} std"]
            if col == "test_acc" and table.gap_to:
                line.update(gap_to_reference(table, rows, row))
            if any(published_value(r, it, col) is not None for r in table.runs for it in _items(r)):
                paper = published_value(run, row["item"], col)
                line[f"{col} (paper)"] = "n/a" if paper is None else paper
                ours = line[col]
                numeric = isinstance(paper, (int, float)) and isinstance(ours, (int, float))
                line[f"{col} gap"] = ours - paper if numeric and not math.isnan(ours) else ""
        line["last3_move"] = row.get("last3_move", math.nan)  # the run's main-model curve, mean over seeds
        line["converged"] = row.get("converged", "not measured")
        out.append(line)
    frame = pd.DataFrame(out)
    if (frame["item"] == "").all():
        frame = frame.drop(columns="item")
    return frame


def gap_to_reference(table: Table, rows: list[dict], row: dict) -> dict:
    """test_acc minus the gap_to run's (the same item, e.g. sub-model 1 against bp's sub-model 1, else its
    final result), ours and the paper's: absolute numbers on another dataset cannot match, gaps can."""
    runs = {r.label: r for r in table.runs}
    ref_run = runs[table.gap_to]
    ref = next((r for r in rows if r["run"] == table.gap_to and r["item"] == row["item"]), None)
    ref = ref or next((r for r in rows if r["run"] == table.gap_to and r["item"] in ("", "main")), None)
    ours = row.get("test_acc", math.nan) - ref["test_acc"] if ref and "test_acc" in ref else math.nan
    paper_ref = published_value(ref_run, ref["item"], "test_acc") if ref else None
    paper = published_value(runs[row["run"]], row["item"], "test_acc")
    numeric = isinstance(paper, (int, float)) and isinstance(paper_ref, (int, float))
    return {f"vs {table.gap_to}": ours, f"vs {table.gap_to} (paper)": paper - paper_ref if numeric else "n/a"}


def _items(run: TableRun) -> list[str]:
    return list(run.published) if run.rows != "final" else [""]


def convergence_lines(table: Table, moves: dict[str, float], by_cycle: set[str] = frozenset()) -> list[str]:
    """The header's convergence rule, and which runs met it (moves: each run label's last3_move; by_cycle: the
    serial-parallel hybrid runs, judged at their cycle ends)."""
    per_run = " (sub-model, ensemble and threshold rows take their run's main-model curve)"
    cycles = (
        f" (the serial-parallel hybrid runs {', '.join(sorted(by_cycle))}: over their last 3 cycles, at the end of "
        "each cycle's serial phase, since their parallel epochs dip and recover by design)"
        if by_cycle
        else ""
    )
    lines = [
        f"- convergence rule (docs/methods.md section 10): a row has converged when its run's test accuracy, averaged "
        f"over the seeds epoch by epoch, moves by less than {CONVERGED_BELOW} points (max - min) over the run's "
        f"last 3 epochs{cycles}{per_run if any(r.rows != 'final' for r in table.runs) else ''}. Columns "
        "last3_move (that movement) and converged (yes, no, or not measured: fewer than 3 epochs, or a seed "
        "without a test accuracy in one of them). A claim that uses a run that has not converged is provisional: "
        "ours gives the verdict it would have and the runs still moving",
    ]
    status = {label: converged(m) for label, m in moves.items()}
    done = [k for k, v in status.items() if v == "yes"]
    moving = {k: moves[k] for k, v in status.items() if v == "no"}
    unmeasured = [k for k, v in status.items() if v == "not measured"]
    parts = [f"{len(done)} of {len(moves)} runs converged"]
    if moving:
        parts.append("still moving: " + ", ".join(f"{k} {v:.2f}" for k, v in moving.items()))
    if unmeasured:
        parts.append("not measured: " + ", ".join(unmeasured))
    if done and not moving and not unmeasured:
        parts.append(f"largest movement {max(moves.values()):.2f}")
    lines.append("- convergence here: " + "; ".join(parts))
    return lines


def write_claims(claims: pd.DataFrame | None, target: Path, no_claims: str = "") -> list[Path]:
    """claims.csv, and the claims appended to table.md; without claims, the reason appended instead."""
    from lctrun.reporting.tables import to_markdown

    md = target / "table.md"
    if claims is None:
        md.write_text(md.read_text() + f"\n## The paper's claims, checked\n\nNo claims are checked: {no_claims}\n")
        return []
    claims.to_csv(target / "claims.csv", index=False)
    md.write_text(md.read_text() + "\n## The paper's claims, checked\n\n" + to_markdown(claims) + "\n")
    return [target / "claims.csv"]


def header(
    table: Table, scale: str, configs: list[Experiment], commits: list[str], seeds: int = 1, extra: list[str] = ()
) -> str:
    datasets = sorted(
        {f"{c.data.name} ({c.data.train_size or 'all'} train / {c.data.test_size or 'all'} test)" for c in configs}
    )
    models = sorted({c.model.name for c in configs})
    epochs = sorted({c.epochs for c in configs})
    devices = sorted({",".join(c.devices) for c in configs})
    lines = [
        f"# {table.title}",
        "",
        f"- scale: **{scale}**: {table.scales[scale].get('note', '')}",
        f"- source: {table.source}",
        f"- the papers' setting: {table.published_setting}",
        f"- measured here: dataset {', '.join(datasets)}; model {', '.join(models)}; "
        f"epochs {', '.join(map(str, epochs))}; "
        + (
            f"{seeds} seeds per run (seed {configs[0].seed}..{configs[0].seed + seeds - 1}), mean ± sample std"
            if seeds > 1
            else "one seed"
        ),
        f"- precision {', '.join(sorted({c.precision for c in configs}))} (autocast; parameters fp32), memory format "
        f"{', '.join(sorted({c.memory_format for c in configs}))}"
        + (f"; overrides on every run: {' '.join(extra)}" if extra else ""),
        f"- hardware: {rundir.hardware_tag()}, devices {'; '.join(devices)}; runs made by commit "
        f"{', '.join(commits)} (each run's done.json); rendered "
        f"{pd.Timestamp.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    if scale != "paper" and any(r.published for r in table.runs):
        lines.append(
            f"- the published column is the paper's own setting; ours is the {scale}-scale run above, not a "
            "reproduction of that setting"
        )
    if table.reference:
        lines.append(f"- speedup and mem_vs_ref are relative to the run '{table.reference}' (same scale, same machine)")
    if table.best_bp:
        lines.append(
            f"- speedup_vs_best_bp is relative to the fastest of the bp runs {', '.join(table.best_bp)} (best_bp): "
            "the baseline a practitioner would pick on this machine; a local method is faster only above 1"
        )
    if table.layer_serial:
        lines.append(
            f"- speedup_vs_layer_serial is relative to '{table.layer_serial}'; g1_update_vs_bp: group 1's parameter "
            f"change in an epoch (parallel epochs only, for penalty/al) over that of '{table.layer_serial}' in the "
            f"same epoch, the smallest over the run's epochs"
        )
    lines += [f"- {n}" for n in table.notes]
    lines += [f"- {r.label}: {r.notes}" for r in table.runs if r.notes]
    return "\n".join(lines)


def plots(table: Table, frame: pd.DataFrame, rows: list[dict], configs: dict[str, Experiment], out: Path) -> list[Path]:
    paths = []
    names = [f"{r['run']} {r['item']}".strip() for r in rows]
    if "test_acc" in frame.columns:
        series = {"ours": [float(v) for v in frame["test_acc"]]}
        if "test_acc (paper)" in frame.columns:
            series["paper"] = [v if isinstance(v, (int, float)) else math.nan for v in frame["test_acc (paper)"]]
        paths.append(bar_plot(names, series, out / "accuracy.png", "test accuracy (%)", table.title))
    if "speedup" in frame.columns:
        curves: dict[str, Curve] = {}
        for method in dict.fromkeys(c.method for c in configs.values()):
            pts = sorted(
                (r["workers"], r["speedup"], r["ideal_speedup"])
                for r in rows
                if configs[r["run"]].method == method and "speedup" in r
            )
            if pts:
                curves[method] = Curve([p[0] for p in pts], [p[1] for p in pts])
                curves[f"{method} (critical-path bound)"] = Curve([p[0] for p in pts], [p[2] for p in pts])
        paths.append(line_plot(curves, out / "speedup.png", "workers (K)", "speedup vs reference", table.title, True))
    if "peak_mem_mb_per_worker" in frame.columns:
        per_worker = [[float(x) for x in str(r["peak_mem_mb_per_worker"]).split("/")] for r in rows]
        most = max(len(p) for p in per_worker)
        series = {f"worker {k}": [p[k] if k < len(p) else math.nan for p in per_worker] for k in range(most)}
        paths.append(bar_plot(names, series, out / "memory.png", "peak memory per worker (MB)", table.title))
    return paths


def reproduce(
    name: str,
    scale: str = "small",
    out: Path = Path("results/tables"),
    console: Console | None = None,
    overrides: list[str] | None = None,
    seeds: int | None = None,
):
    """The table at `scale`; `overrides` go on every run (e.g. precision=bf16) and into the folder's name, as
    does `seeds` when it replaces the table's number of seeds (a pilot: one seed, longer runs)."""
    console = console or Console()
    overrides = list(overrides or [])
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale!r} is not one of: {', '.join(SCALES)}")
    table = load_table(name)
    check_table(table)
    code = rundir.code_version()
    configs = {run.label: table.config(run, scale, overrides) for run in table.runs}
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    suffix = [f"seeds-{seeds}"] if seeds and seeds != table.seeds(scale) else []
    seeds = seeds or table.seeds(scale)
    rows, commits, curves, by_cycle = [], [], {}, set()
    for i, run in enumerate(table.runs, 1):
        per_seed = []
        for seed in range(configs[run.label].seed, configs[run.label].seed + seeds):
            console.print(f"[bold]\\[{i}/{len(table.runs)}] {run.label}[/]" + (f" seed {seed}" if seeds > 1 else ""))
            cfg = dataclasses.replace(configs[run.label], seed=seed)
            run_dir, reused = run_cached(cfg, run.label, Path(out) / "runs", code, console)
            commits.append(json.loads((run_dir / "done.json").read_text()).get("commit", "unknown"))
            if reused:
                console.print(f"  reused {run_dir}")
            measured = measure(run_dir)
            per_seed.append(expand(run, run_dir, measured))
            curves.setdefault(run.label, []).append(measured["test_acc_curve"])
            by_cycle |= {run.label} if measured["sph"] else set()
        rows += over_seeds(per_seed)
    moves = {label: last3_move(c) for label, c in curves.items()}
    for row in rows:  # every row of a run (sub-models, ensembles, thresholds too) has its run's figure
        row["last3_move"], row["converged"] = moves[row["run"]], converged(moves[row["run"]])
    relative(rows, table.reference, table.layer_serial, table.best_bp)
    frame = assemble(table, rows)
    claims = evaluate_claims(table, rows, published_value, moves)
    target = Path(out) / "-".join([name, scale, *(slug(o) for o in overrides), *suffix])
    text = header(table, scale, list(configs.values()), list(dict.fromkeys(commits)), seeds, overrides)
    text += "\n" + "\n".join(convergence_lines(table, moves, by_cycle))
    written = write_table(frame, target / "table", text, shown=with_spread(frame))
    written += write_claims(claims, target, table.no_claims)
    written += plots(table, frame, rows, configs, target)
    console.print(rich_table(with_spread(frame), title=f"{table.title} [{scale} scale]"))
    for claim in [] if claims is None else claims.to_dict("records"):  # one line each: readable in 80 columns
        style = {"holds": "green", "fails": "red"}.get(claim["ours"], "")
        style = "yellow" if claim["ours"].startswith("provisional") else style
        console.print(
            f"[{style or 'default'}]{claim['ours']:5}[/] {claim['claim']} (paper: {claim['paper']}; "
            f"ours: {claim['our values']})",
            highlight=False,
        )
    if claims is None:
        console.print(f"no claims checked: {table.no_claims}", highlight=False)
    console.print(f"outputs: {target} ({', '.join(p.name for p in written)})")
    return frame
