"""Live progress of a search: trials done / total, best feasible so far, front size, time left."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class SearchProgress:
    """A rich progress bar fed by the engines after every finished trial."""

    def __init__(self, total: int, done: int = 0, *, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.total = total
        self.started = time.monotonic()
        self._bar = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self._task = self._bar.add_task("search", total=total, completed=done, status="")
        self._last_logged = done

    def __enter__(self) -> SearchProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, done: int, best: float | None, front_size: int) -> None:
        best_text = "-" if best is None else f"{best:.4g}"
        status = f"best feasible proxy {best_text} | front {front_size}"
        self._bar.update(self._task, completed=min(done, self.total), status=status)
        # Without a terminal (logs, CI) a line every tenth of the trials instead of a bar.
        if not self.console.is_terminal and (
            done - self._last_logged >= max(1, self.total // 10) or done >= self.total
        ):
            self._last_logged = done
            elapsed = time.monotonic() - self.started
            self.console.print(f"search: {done}/{self.total} trials | {status} | {elapsed:.0f} s")

    def log(self, message: str) -> None:
        self.console.print(message)
