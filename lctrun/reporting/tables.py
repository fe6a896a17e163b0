"""Rich tables for the terminal, and the same tables as CSV/Markdown files."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def slug(text: str) -> str:
    """A file-name part for a table made with an override (`precision=bf16` -> `precision-bf16`)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "" if value is None else str(value)


def rich_table(frame: pd.DataFrame, title: str | None = None, caption: str | None = None) -> FitTable:
    return FitTable(frame, title, caption)


class FitTable:
    """A table when it fits the terminal, else one block per row ("name: column value · column value ...",
    wrapped between cells): never a header cut to "…" in an 80-column terminal. Files keep every column."""

    def __init__(self, frame: pd.DataFrame, title: str | None = None, caption: str | None = None):
        self.frame, self.title, self.caption = frame, title, caption

    def table(self) -> Table:
        table = Table(title=self.title, caption=self.caption)
        for column in self.frame.columns:
            table.add_column(str(column), justify="left" if self.frame[column].dtype == object else "right")
        for _, row in self.frame.iterrows():
            table.add_row(*[fmt(v) for v in row.tolist()])
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        table = self.table()
        if Measurement.get(console, options.update_width(10_000), table).maximum <= options.max_width:
            yield table
            return
        if self.title:
            yield Text(self.title, style="bold")
        names = [str(c) for c in self.frame.columns]
        head = 2 if names[1:2] == ["item"] else 1  # a run and its item (sub-model, threshold) name the block
        for values in self.frame.itertuples(index=False):
            cells = [fmt(v) for v in values]
            yield Text(" ".join(cells[:head]), style="bold")
            pairs = zip(names[head:], cells[head:], strict=True)
            rest = [f"{name} {cell}" for name, cell in pairs if cell not in ("", "nan")]
            # wrapped here, not by the console: a soft-wrapping console (the CLI's) would crop a padded line
            for line in Text(" · ".join(rest)).wrap(console, max(options.max_width - 2, 20)):
                yield Text("  ") + line
        if self.caption:
            yield Text(self.caption, style="dim")


def run_summary(rows: list[dict], run_dir: Path) -> Table:
    final = rows[-1]
    best = max((r.get("test_acc", float("nan")) for r in rows), default=float("nan"))
    keys = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    keys += sorted(k for k in final if k.startswith("g") and k.endswith("test_acc"))
    keys += ["samples_per_s", "peak_mem_mb"]
    data = {k: final[k] for k in keys if k in final}
    data["best_test_acc"] = best
    data["total_seconds"] = sum(r["seconds"] for r in rows)
    frame = pd.DataFrame({"metric": list(data), "value": list(data.values())})
    return rich_table(frame, title=f"result: {run_dir.name}")


def write_table(frame: pd.DataFrame, base: Path, header: str = "", shown: pd.DataFrame | None = None) -> list[Path]:
    """base.csv (every number) and base.md (`shown`, by default the same frame); the Markdown starts with
    `header` (what, scale, hardware, commit)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = base.with_suffix(".csv"), base.with_suffix(".md")
    frame.to_csv(csv_path, index=False)
    md_path.write_text((header + "\n\n" if header else "") + to_markdown(frame if shown is None else shown) + "\n")
    return [csv_path, md_path]


def with_spread(frame: pd.DataFrame) -> pd.DataFrame:
    """Each "<column> std" folded into its column as "mean ± std" text, for reading (the CSV keeps both)."""
    shown = frame.copy()
    for std in [c for c in frame.columns if str(c).endswith(" std")]:
        col = std[: -len(" std")]
        shown[col] = [
            f"{fmt(m)} ± {s:.2g}" if isinstance(s, float) and not pd.isna(s) else fmt(m)
            for m, s in zip(frame[col], frame[std], strict=True)
        ]
        shown = shown.drop(columns=std)
    return shown


def to_markdown(frame: pd.DataFrame) -> str:
    """A pipe table without the optional `tabulate` dependency; a `|` inside a cell (a claim's `{run|item}`) is
    escaped, so it does not split the cell."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    head = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(fmt(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
