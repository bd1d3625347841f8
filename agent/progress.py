"""Progress as operations report it, independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from time import time
from typing import Protocol


class Phase(StrEnum):
    """Where an operation is (domsnap.proto's Phase, which documents each)."""

    PENDING = "pending"
    VALIDATE = "validate"
    MEMORY = "memory"
    DISKS = "disks"
    MANIFEST = "manifest"
    DESTROY = "destroy"
    RESTORE = "restore"
    RETRY = "retry"
    DELETE = "delete"
    DONE = "done"
    RECOVERED = "recovered"


@dataclass(frozen=True)
class Progress:
    phase: Phase
    percent: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_second: float = 0.0
    message: str = ""
    time: float = field(default_factory=time)


class StepProgress(Protocol):
    """A step reports how far *it* got (0..1) and, where it moves bytes, how
    many of how many at what rate; the operation maps that into its overall
    percentage."""

    def __call__(self, fraction: float, /, *, done: int = 0, total: int = 0, rate: float = 0.0,
                 message: str = "") -> None: ...


def ignore_progress(fraction: float, *, done: int = 0, total: int = 0, rate: float = 0.0, message: str = "") -> None:
    """For steps run where nobody is watching (recovery, rollback)."""


def share(progress: StepProgress, index: int, count: int) -> StepProgress:
    """The progress sink of item `index` of `count` equal parts of one step."""

    def report(fraction: float, *, done: int = 0, total: int = 0, rate: float = 0.0, message: str = "") -> None:
        progress((index + fraction) / count, done=done, total=total, rate=rate, message=message)

    return report
