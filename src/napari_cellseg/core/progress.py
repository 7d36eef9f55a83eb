"""Progress records and cancellation shared by every long-running core operation.

Long operations in the core are generators: they ``yield`` :class:`Progress`
records and ``return`` their result (read it with :func:`run_to_completion`, or
drive the generator from a napari thread worker, whose ``quit()`` stops it at
the next yield). Nothing here knows about Qt.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One progress report.

    Parameters
    ----------
    step : int
        Work units done so far.
    total : int
        Work units in all (0 when unknown).
    message : str
        What is being done, for a status line.
    data : dict, optional
        Extra values for live displays (for example ``{"loss": 0.3}``).
    """

    step: int
    total: int
    message: str = ""
    data: dict | None = None

    @property
    def fraction(self) -> float:
        """Fraction done in [0, 1] (0 when the total is unknown)."""
        if self.total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total))


ProgressGenerator = Generator[Progress, None, T]


def run_to_completion(
    gen: Generator[Progress, Any, T], callback: Callable[[Progress], None] | None = None
) -> T:
    """Exhaust a progress generator and return its result.

    Parameters
    ----------
    gen : generator
        A core generator that yields :class:`Progress` and returns a value.
    callback : callable, optional
        Called with every progress record (for a terminal progress bar).

    Examples
    --------
    >>> def work():
    ...     yield Progress(1, 1, "done")
    ...     return 42
    >>> run_to_completion(work())
    42
    """
    while True:
        try:
            record = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(record)


def prefixed(gen: Generator[Progress, Any, T], prefix: str) -> Generator[Progress, None, T]:
    """Re-yield a progress generator's records with ``prefix`` before each message, and return its result.

    >>> def work():
    ...     yield Progress(1, 2, "crop 1/2")
    ...     return 7
    >>> seen = []
    >>> run_to_completion(prefixed(work(), "zoom 0.5 - "), seen.append), seen[0].message
    (7, 'zoom 0.5 - crop 1/2')
    """
    while True:
        try:
            record = next(gen)
        except StopIteration as stop:
            return stop.value
        yield replace(record, message=prefix + record.message) if prefix else record


class TerminalProgress:
    """A one-line progress bar for the command line (writes to stderr)."""

    def __init__(self, label: str = "", stream=None) -> None:
        import sys

        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._last = ""

    def __call__(self, record: Progress) -> None:
        width = 30
        filled = int(round(record.fraction * width))
        bar = "#" * filled + "-" * (width - filled)
        total = f"{record.step}/{record.total}" if record.total else f"{record.step}"
        line = f"\r{self.label} [{bar}] {total} {record.message}"[:120]
        if line != self._last:
            self.stream.write(line.ljust(len(self._last)))
            self.stream.flush()
            self._last = line

    def close(self) -> None:
        if self._last:
            self.stream.write("\n")
            self.stream.flush()
            self._last = ""
