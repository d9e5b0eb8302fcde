"""Progress for every loop that can take more than a few seconds: a rich bar with count and ETA on a
terminal, one line when the stage starts and one when it ends otherwise (logs, CI, pipes)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Stage:
    """A running stage: call ``advance(n)`` as work finishes."""

    def __init__(self, advance):
        self.advance = advance


@contextmanager
def stage(label: str, total: int, unit: str = "", stream=None, enabled: bool = True) -> Iterator[Stage]:
    """``with stage("patching chunks", 12) as s: ... s.advance()``; silent when ``enabled`` is False."""
    stream = stream or sys.stderr
    t0 = time.perf_counter()
    if not enabled or total <= 0:
        yield Stage(lambda n=1: None)
        return
    if stream.isatty():
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=Console(file=stream),
                      transient=False) as bar:
            task = bar.add_task(label, total=total)
            yield Stage(lambda n=1: bar.advance(task, n))
        return
    print(f"{label}: {total} {unit}".rstrip() + " ...", file=stream, flush=True)
    done = [0]
    yield Stage(lambda n=1: done.__setitem__(0, done[0] + n))
    print(f"{label}: {done[0]}/{total} done in {time.perf_counter() - t0:.1f} s", file=stream, flush=True)
