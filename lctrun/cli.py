"""The `lctrun` command line: thin wrappers over the library; errors are one line, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from lctrun import __version__
from lctrun.errors import LctrunError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train deep networks without backprop locking.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True)
EXPERIMENTS = Path("experiments")


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
    for candidate in (EXPERIMENTS / name, EXPERIMENTS / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    from lctrun.errors import ConfigError

    known = ", ".join(p.stem for p in sorted(EXPERIMENTS.glob("*.yaml"))) or "none found in ./experiments"
    raise ConfigError(f"experiment file not found: {name} (known experiments: {known})")


@app.command()
def train(
    experiment: str = typer.Argument(..., help="Experiment YAML (path, or name under experiments/)."),
    overrides: list[str] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. optim.lr=0.05 epochs=2."),
    out: Path = typer.Option(None, "--out", help="Run directory (default results/runs/<time>-<name>-<method>)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this directory from its checkpoint."),
) -> None:
    """Train one experiment."""
    from lctrun.config import load_experiment
    from lctrun.launch import run_training
    from lctrun.reporting.tables import run_summary

    cfg = load_experiment(find_experiment(experiment), overrides or [])
    result = run_training(cfg, run_dir=resume or out, resume=resume is not None, console=console)
    if result is not None and result.rows:
        console.print(run_summary(result.rows, result.run_dir))
        console.print(f"outputs: [bold]{result.run_dir}[/] (config.yaml, env.json, metrics.csv, last.pt)")


@app.command("list")
def list_things() -> None:
    """The experiments, datasets, models and methods that exist."""
    from lctrun.config import load_experiment
    from lctrun.data import DATASETS
    from lctrun.methods import METHODS, _load_all
    from lctrun.models import MODELS

    _load_all()
    console.print("[bold]experiments[/] (experiments/*.yaml)")
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        try:
            cfg = load_experiment(path)
            what = f"{cfg.method} on {cfg.data.name}, {cfg.model.name}, {cfg.epochs} epochs"
        except LctrunError as e:
            what = f"[red]invalid: {e}[/]"
        console.print(f"  {path.stem:28} {what}")
    console.print("[bold]datasets[/]")
    for name, what in DATASETS.items():
        console.print(f"  {name:28} {what}")
    console.print("[bold]models[/]")
    for name, what in {
        **{n: s.description for n, s in MODELS.items()},
        "wrn-D-K": "Wide ResNet, depth D, width k",
    }.items():
        console.print(f"  {name:28} {what}")
    console.print("[bold]methods[/]")
    for name, method in METHODS.items():
        console.print(f"  {name:28} {method.description}")


def main() -> None:
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
