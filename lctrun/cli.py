"""The `lctrun` command line: thin wrappers over the library; errors are one line, never a traceback."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer
from rich.console import Console

from lctrun import __version__
from lctrun.errors import LctrunError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train deep networks without backprop locking.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True)
# experiment files: the working directory's experiments/ first (your own), then the ones installed with lctrun
EXPERIMENT_DIRS = (Path("experiments"), Path(__file__).resolve().parent / "experiments")


def _version(value: bool) -> None:
    if value:
        console.print(f"lctrun {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def find_experiment(name: str) -> Path:
    """An experiment file by path, or by name under experiments/."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in EXPERIMENT_DIRS:
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    from lctrun.errors import ConfigError

    known = ", ".join(sorted(experiment_files())) or "none found"
    raise ConfigError(f"experiment file not found: {name} (known experiments: {known})")


def experiment_files() -> dict[str, Path]:
    """name -> file, over EXPERIMENT_DIRS (the working directory's own shadow the installed ones)."""
    found: dict[str, Path] = {}
    for folder in EXPERIMENT_DIRS:
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


@app.command()
def train(
    experiment: str = typer.Argument(None, help="Experiment YAML (path, or a name: see `lctrun list`)."),
    overrides: list[str] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. optim.lr=0.05 epochs=2."),
    out: Path = typer.Option(None, "--out", help="Run directory (default results/runs/<time>-<name>-<method>)."),
    resume: Path = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last checkpoint (its own config)."
    ),
) -> None:
    """Train one experiment, or continue one: lctrun train --resume RUN_DIR \\[epochs=N]."""
    from lctrun.config import ConfigError, load_experiment  # config errors before torch is imported (seconds)

    if resume is not None:
        from lctrun.launch import resumed_config

        if out is not None:
            raise ConfigError("give --resume RUN_DIR or --out RUN_DIR, not both (a resumed run stays where it is)")
        if experiment is not None and "=" in experiment:  # `train --resume RUN epochs=5`: only overrides
            overrides, experiment = [experiment, *(overrides or [])], None
        cfg = (
            resumed_config(resume, overrides or [])
            if experiment is None
            else load_experiment(find_experiment(experiment), overrides or [])
        )
    elif experiment is None:
        raise ConfigError("give an experiment (see `lctrun list`), or --resume RUN_DIR to continue a run")
    else:
        cfg = load_experiment(find_experiment(experiment), overrides or [])
    ignored = [o.split("=")[0] for o in overrides or [] if o.startswith("layerpar.")]
    if ignored and cfg.method not in ("penalty", "al"):
        raise ConfigError(
            f"{', '.join(ignored)} only apply to method=penalty or method=al (this run is method={cfg.method}): "
            f"drop them or set method=penalty|al"
        )
    import pandas as pd

    from lctrun.launch import check_new_run_dir, run_training
    from lctrun.reporting.tables import rich_table, run_summary

    if out is not None:
        check_new_run_dir(out)
    result = run_training(cfg, run_dir=resume or out, resume=resume is not None, console=console)
    if result is not None and result.rows:
        console.print(run_summary(result.rows, result.run_dir))
        for name, rows in result.tables.items():
            console.print(rich_table(pd.DataFrame(rows), title=name))
        files = ", ".join(sorted(f.name for f in result.run_dir.iterdir() if not f.name.startswith(".")))
        console.print(f"outputs: [bold]{result.run_dir}[/] ({files})")


@app.command()
def compare(
    experiment: str = typer.Argument(..., help="Experiment YAML (path, or a name: see `lctrun list`)."),
    overrides: list[str] = typer.Argument(None, help="Dotted KEY=VALUE overrides, applied to every run."),
    methods: str = typer.Option("bp,lct,dgl", "--methods", help="Comma-separated methods, e.g. bp,lct,dgl."),
    seeds: int = typer.Option(1, "--seeds", help="Runs per method, with seeds seed, seed+1, ..."),
    out: Path = typer.Option(None, "--out", help="Output directory (default results/compare/<time>-<name>)."),
) -> None:
    """Compare methods side by side: same data and cut, one run per method and seed, one table and plot."""
    from lctrun.compare import compare as run_compare

    run_compare(find_experiment(experiment), methods, overrides or [], seeds=seeds, out_dir=out, console=console)


@app.command()
def bench(
    model: str = typer.Argument("resnet20", help="Model to measure (see `lctrun list`)."),
    groups: int = typer.Option(2, "--groups", "-k", help="K: workers / layer groups."),
    batch: int = typer.Option(128, help="Batch size."),
    shape: str = typer.Option("3,32,32", help="Input shape per sample, C,H,W."),
    methods: str = typer.Option("bp,lct,dgl", help="Methods on K workers (bp = model-parallel bp)."),
    split: str = typer.Option("", help="Cut points, comma separated (default: balanced by measured time)."),
    steps: int = typer.Option(20, help="Timed steps per configuration."),
    warmup: int = typer.Option(3, help="Warm-up steps, not timed."),
    repeats: int = typer.Option(3, help="Runs per row (fresh processes), in rounds over all rows; median shown."),
    depths: str = typer.Option("1,2", help="pipeline_depth of the local methods: one row per depth."),
    schedules: str = typer.Option("gpipe,1f1b", help="Pipelined bp rows (with bp in --methods); '' for none."),
    microbatches: str = typer.Option("2,4,8", help="Micro-batches M of the pipelined bp rows."),
    device: str = typer.Option("cpu", help="cpu or cuda (all workers share it)."),
    overrides: list[str] = typer.Argument(None, help="Extra KEY=VALUE overrides, e.g. critic.channels=64."),
    out: Path = typer.Option(Path("results/bench"), "--out", help="Where the CSV and Markdown go."),
) -> None:
    """Measure throughput, speedup and memory per worker: bp baselines vs local methods on K workers."""
    from lctrun.bench import bench as run_bench
    from lctrun.config import ConfigError

    try:
        dims = tuple(int(v) for v in shape.split(","))
    except ValueError:
        raise ConfigError(f"--shape {shape!r} is not C,H,W integers (e.g. 3,32,32)") from None
    try:
        counts = [int(v) for v in microbatches.split(",") if v]
        depth_list = [int(v) for v in depths.split(",") if v]
    except ValueError:
        raise ConfigError("--microbatches and --depths are comma-separated integers (e.g. 2,4,8)") from None
    run_bench(
        model,
        groups,
        batch,
        dims,
        [m for m in methods.split(",") if m],
        [s for s in split.split(",") if s],
        steps,
        warmup,
        repeats,
        depth_list,
        [v for v in schedules.split(",") if v],
        counts,
        device,
        overrides or [],
        out,
        console,
    )


@app.command()
def project(
    model: str = typer.Argument("resnet20", help="Model to project (see `lctrun list`)."),
    groups: str = typer.Option("2,4,8", "--groups", "-k", help="K devices, comma separated."),
    batch: int = typer.Option(128, help="Batch size."),
    shape: str = typer.Option("3,32,32", help="Input shape per sample, C,H,W."),
    methods: str = typer.Option("bp,lct,dgl,dni", help="Methods (bp = every bp configuration)."),
    depths: str = typer.Option("1,2", help="pipeline_depth of the local methods."),
    schedules: str = typer.Option("gpipe,1f1b", help="Pipelined bp rows; '' for none."),
    microbatches: str = typer.Option("2,4,8", help="Micro-batches M of the pipelined bp rows."),
    links: str = typer.Option("gloo", help="gloo (measured here, two local processes), pcie4, nvlink."),
    threads: int = typer.Option(0, help="Threads of the profiled device (0: torch's default)."),
    device: str = typer.Option("cpu", help="Device to profile: cpu or cuda."),
    samples: int = typer.Option(50000, help="Training samples (penalty/al auxiliary variables)."),
    repeats: int = typer.Option(
        2, help="Rounds of block timings (each block's best kept); with --measure also the bench's runs per row."
    ),
    overrides: list[str] = typer.Argument(None, help="Extra KEY=VALUE overrides, e.g. critic.pool=4."),
    out: Path = typer.Option(None, "--out", help="Also write the table here (OUT.csv, OUT.md)."),
    measure: bool = typer.Option(
        False,
        "--measure",
        help="Also run lctrun bench for each K (tables to OUT-bench/): measured beside projected, and their ratio.",
    ),
) -> None:
    """Project speed and memory per device of every bench configuration on K devices like this one."""
    from lctrun.config import ConfigError
    from lctrun.projection.project import project as run_project

    try:
        dims = tuple(int(v) for v in shape.split(","))
        ks = [int(v) for v in groups.split(",") if v]
        counts = [int(v) for v in microbatches.split(",") if v]
        depth_list = [int(v) for v in depths.split(",") if v]
    except ValueError:
        raise ConfigError("--shape, --groups, --microbatches and --depths are comma-separated integers") from None
    if not ks or min(ks) < 2:
        raise ConfigError(f"--groups {groups}: give K >= 2 devices, e.g. --groups 2,4,8")
    run_project(
        model,
        ks,
        batch,
        dims,
        [m for m in methods.split(",") if m],
        depth_list,
        [v for v in schedules.split(",") if v],
        counts,
        [v for v in links.split(",") if v],
        device,
        threads or None,
        samples,
        repeats,
        overrides or [],
        out,
        measure,
        console,
    )


@app.command()
def reproduce(
    table: str = typer.Argument(None, help="Table name (see --list), e.g. lct-iclr-table1."),
    scale: str = typer.Option(
        "small", "--scale", help="smoke (seconds) | small (CPU, <= 30 min) | paper (GPUs, CIFAR)."
    ),
    list_tables: bool = typer.Option(False, "--list", help="Show the tables and exit."),
    out: Path = typer.Option(
        Path("results/tables"), "--out", help="Tables go to OUT/<table>-<scale>/, runs to OUT/runs/."
    ),
    every: bool = typer.Option(False, "--all", help="Every table, one after the other (runs shared and cached)."),
    seeds: int = typer.Option(
        None, "--seeds", help="Seeds per run instead of the table's (e.g. 1 for a pilot; the folder says so)."
    ),
    overrides: list[str] = typer.Argument(
        None,
        help="KEY=VALUE on every run, e.g. precision=bf16 memory_format=channels_last (tables: OUT/<table>-"
        "<scale>-<overrides>/).",
    ),
) -> None:
    """Re-run a published table at a scale and show our numbers beside the paper's (runs are cached)."""
    import pandas as pd

    from lctrun.reporting.tables import rich_table
    from lctrun.reproduce import load_table, table_names
    from lctrun.reproduce import reproduce as run_reproduce

    if every:
        if table is not None:
            from lctrun.errors import ConfigError

            raise ConfigError(f"give a table name or --all, not both (got '{table}' and --all)")
        for name in table_names():
            console.rule(name)
            run_reproduce(name, scale, out, console, overrides, seeds)
        return
    if list_tables or table is None:
        rows = [(n, (t := load_table(n)).title, len(t.runs)) for n in table_names()]
        console.print(rich_table(pd.DataFrame(rows, columns=["table", "title", "runs"]), title="tables"))
        if table is None and not list_tables:
            console.print("give a table name: lctrun reproduce TABLE --scale smoke|small|paper")
        return
    run_reproduce(table, scale, out, console, overrides, seeds)


@app.command("list")
def list_things() -> None:
    """The experiments, datasets, models and methods that exist."""
    from lctrun.config import load_experiment
    from lctrun.data import DATASETS
    from lctrun.methods import METHODS, _load_all
    from lctrun.models import model_names

    _load_all()
    console.print("[bold]experiments[/] (experiments/*.yaml)")
    for path in experiment_files().values():
        try:
            cfg = load_experiment(path)
            what = f"{cfg.method} on {cfg.data.name}, {cfg.model.name}, {cfg.epochs} epochs"
        except LctrunError as e:
            what = f"[red]invalid: {e}[/]"
        console.print(f"  {path.stem:28} {what}")
    console.print("[bold]datasets[/]")
    for name, spec in DATASETS.items():
        console.print(f"  {name:28} {spec.description}")
    console.print("[bold]models[/]")
    for name, what in model_names():
        console.print(f"  {name:28} {what}")
    console.print("[bold]methods[/]")
    for name, method in METHODS.items():
        console.print(f"  {name:28} {method.description}")


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # a scheduler's stop is handled like Ctrl-C: keep what is written, say how to resume


def main() -> None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        app()
    except LctrunError as e:
        from rich.text import Text

        err_console.print(Text("error: ", style="red") + Text(str(e)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
