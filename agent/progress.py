"""Progress as operations report it, independent of the wire format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from time import time


@dataclass(frozen=True)
class Progress:
    phase: str
    percent: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_second: float = 0.0
    message: str = ""
    time: float = field(default_factory=time)


# A step reports how far *it* got (0..1) and the bytes it moved; the
# operation maps that into its overall percentage.
StepProgress = Callable[[float, int, int, float, str], None]


def ignore_progress(_fraction: float, _done: int, _total: int, _rate: float, _message: str) -> None:
    """For steps run where nobody is watching (recovery, rollback)."""


def share(progress: StepProgress, index: int, count: int) -> StepProgress:
    """The progress sink of item `index` of `count` equal parts of one step."""

    def report(fraction: float, done: int, total: int, rate: float, message: str) -> None:
        progress((index + fraction) / count, done, total, rate, message)

    return report
