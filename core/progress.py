"""Progress of a long phase: a live bar on a terminal, a line every tenth otherwise.

Every phase that can take more than a few seconds (calibration images, layers factorized,
sensitivity terms, baseline evaluations, fine-tuning steps) reports through `progress`, so
a user always sees counts and the time left, and a log file gets a few lines, not a bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[..., None]


def _noop(n: int = 1, description: str | None = None) -> None:
    return None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def progress(
    description: str, total: int | None, enabled: bool | None = True, *, stream: Any = None
) -> Iterator[Advance]:
    """Yield `advance(n=1, description=None)`; `enabled=False` shows nothing.

    On a terminal a rich bar with the count, the elapsed time and the time left; elsewhere
    (logs, CI) a line at every tenth of `total` and at the end.
    """
    if enabled is False:
        yield _noop
        return
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(file=stream), transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1, description: str | None = None) -> None:
                bar.update(task, advance=n, description=description)

            yield advance
        return
    start, done = time.monotonic(), [0]
    last = [start, 0]  # when the last line was written, and at which tenth
    label = [description]

    def advance_line(n: int = 1, description: str | None = None) -> None:
        done[0] += n
        label[0] = description or label[0]
        finished = total is not None and done[0] >= total
        tenth = done[0] * 10 // total if total else done[0] // 10
        # a line per tenth, at most one every 2 s, and always the last one
        if not finished and (tenth == last[1] or time.monotonic() - last[0] < 2.0):
            return
        last[0], last[1] = time.monotonic(), tenth
        elapsed = time.monotonic() - start
        count = f"{done[0]}/{total}" if total else f"{done[0]}"
        left = ""
        if total and 0 < done[0] < total:
            left = f", ~{_duration(elapsed * (total - done[0]) / done[0])} left"
        print(f"{label[0]}: {count} ({_duration(elapsed)}{left})", file=stream, flush=True)

    yield advance_line
