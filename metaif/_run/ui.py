"""Terminal output of a run: progress bars for long steps (rich), one line per finished step, and
the final summary table."""

from __future__ import annotations

import contextlib
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class UI:
    """Progress and messages on stderr (bars) and stdout (results)."""

    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.bars = Console(stderr=True)
        self.quiet = quiet

    def print(self, text: str = "") -> None:
        if not self.quiet:
            self.console.print(text, markup=False)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None, done: int = 0):
        """A progress bar (total known) or spinner (None); yields advance(k=1)."""
        start = time.perf_counter()
        if self.quiet or not self.bars.is_terminal:
            yield lambda k=1: None
        else:
            columns = [
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            ]
            if total is None:
                columns = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
            with Progress(*columns, console=self.bars, transient=True) as bar:
                task = bar.add_task(description, total=total, completed=done)
                yield lambda k=1: bar.advance(task, k)
        self.print(f"  {description:<58} {time.perf_counter() - start:7.1f} s")

    def reused(self, description: str) -> None:
        self.print(f"  {description:<58}  (saved, reused)")

    def table(self, title: str, rows: list[tuple[str, str, str]]) -> None:
        if self.quiet:
            return
        table = Table(title=title, title_justify="left", show_lines=False)
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_column("note")
        for row in rows:
            if row is None:
                table.add_section()
            else:
                table.add_row(*(Text(cell) for cell in row))  # plain text: "[edit] damping" is not markup
        self.console.print(table)


def error(text: str) -> None:
    """One paragraph on stderr."""
    _say("error", "bold red", text)


def warning(text: str) -> None:
    """One paragraph on stderr, shown also with --quiet."""
    _say("warning", "bold yellow", text)


def _say(label: str, style: str, text: str) -> None:
    if sys.stderr.isatty():
        from rich.markup import escape

        Console(stderr=True, highlight=False).print(f"[{style}]{label}:[/] {escape(text)}")
    else:
        print(f"{label}: {text}", file=sys.stderr, flush=True)
