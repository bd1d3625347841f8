"""Rules for identifiers that reach file names and command lines."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from .errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")
MAX_LABELS = 16
# The label a schedule's snapshots carry (its value: the schedule's name).
SCHEDULE_LABEL = "domsnap.dev/schedule"


def check_name(kind: str, value: str) -> str:
    """A snapshot or domain name: [A-Za-z0-9._-], 1-64 chars, not '.', '..' or a leading '-'."""
    if not _NAME.fullmatch(value) or value in (".", "..") or value.startswith("-"):
        raise InvalidArgument(
            f"invalid {kind} name {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(not starting with '-', not '.' or '..')", reason="INVALID_NAME", field=kind,
        )
    return value


def check_domain_name(value: str) -> str:
    check_name("domain", value)
    if value.isdigit():
        # xl reads an all-digit <Domain> as a domid.
        raise InvalidArgument(f"invalid domain name {value!r}: it must not be all digits", reason="INVALID_NAME",
                              field="domain")
    return value


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A snapshot's labels: keys [A-Za-z0-9._/-]{1,63}, values [A-Za-z0-9._-]{0,63}, at most 16."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels: at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"label key {key!r}: use 1-63 characters from A-Z a-z 0-9 . _ / -")
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise InvalidArgument(f"label {key}: value {value!r}: use at most 63 characters from A-Z a-z 0-9 . _ -")
    return dict(labels)


def default_snapshot_name(now: datetime | None = None) -> str:
    """The UTC time to the millisecond: two nameless creates a second apart
    differ (the service adds "-2", "-3"... to one taken, see unique_name)."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z"


def unique_name(name: str, taken: Callable[[str], bool]) -> str:
    """`name`, or the first of name-2, name-3... that is not `taken`."""
    n, candidate = 1, name
    while taken(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate
