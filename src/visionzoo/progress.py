"""The one progress bar: rich, on stderr (stdout stays for results), or nothing at all."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Bar:
    """`bar.advance(n, **fields)`; fields appear in the `extra` column template (e.g. the loss)."""

    def __init__(self, progress: Any = None, task: Any = None):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: float | None, *, completed: int = 0, bytes_: bool = False,
                 extra: str | None = None, transient: bool = True, terminal_only: bool = False,
                 **fields: Any) -> Iterator[Bar]:
    """A progress bar on stderr while the block runs, or a no-op `Bar` when not `enabled`.

    Args:
        bytes_: the counts are bytes (size and transfer speed shown).
        extra: a rich text template of further fields, e.g. "loss {task.fields[loss]:.4f}",
            whose initial values are the keyword `fields`.
        terminal_only: no bar when stderr is not a terminal (a log file gets none).
    """
    if not enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if terminal_only and not console.is_terminal:
        yield Bar()
        return
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if bytes_ else [MofNCompleteColumn()]
    if extra:
        columns.append(TextColumn(extra))
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=transient) as progress:
        task = progress.add_task(label, total=total, completed=completed, **fields)
        yield Bar(progress, task)


def stderr_echo(enabled: bool = True) -> Callable[[str], None]:
    """A function that prints a message line on stderr (or does nothing)."""
    if not enabled:
        return lambda message: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda message: console.print(message, highlight=False, soft_wrap=True)
