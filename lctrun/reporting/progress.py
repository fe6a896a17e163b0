"""What a run shows while it trains: a rich bar per epoch on a terminal, one flushed line per epoch in a
log file (a bar there would only be drawn at the end), and nothing on workers other than the main one."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class EpochProgressView:
    def __init__(self, console: Console, show: bool, epochs: int, steps: int):
        self.console, self.show, self.epochs, self.steps = console, show, epochs, steps
        self.plain = not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not show or self.plain,
            transient=False,
        )
        self.task = None

    def __enter__(self) -> EpochProgressView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def begin(self, epoch: int, done: int = 0) -> Callable[[], None]:
        """A bar for `epoch` (continued from step `done`); returns what advances it by one step."""
        task = self.task = self.progress.add_task(f"epoch {epoch}/{self.epochs}", total=self.steps, info="")
        self.progress.update(task, completed=done)
        return lambda: self.progress.advance(task)

    def end(self, epoch: int, row: dict, seconds: float) -> None:
        """The finished epoch's loss and test accuracy, on its bar or as a line."""
        info = f"loss {row['train_loss']:.3f}"
        info += f" test {row['test_acc']:.2f}%" if "test_acc" in row else ""
        self.progress.update(self.task, info=info)
        if self.plain and self.show:
            self.console.print(f"epoch {epoch}/{self.epochs}: {info} ({seconds:.1f} s)", highlight=False)
            self.console.file.flush()
