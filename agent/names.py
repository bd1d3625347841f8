"""Rules for identifiers that reach file names and command lines."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from .errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(kind: str, value: str) -> str:
    """A snapshot or domain name: [A-Za-z0-9._-], 1-64 chars, not '.', '..' or a leading '-'."""
    if not _NAME.fullmatch(value) or value in (".", "..") or value.startswith("-"):
        raise InvalidArgument(
            f"invalid {kind} name {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(not starting with '-', not '.' or '..')"
        )
    return value


def check_domain_name(value: str) -> str:
    check_name("domain", value)
    if value.isdigit():
        # xl reads an all-digit <Domain> as a domid.
        raise InvalidArgument(f"invalid domain name {value!r}: it must not be all digits")
    return value


def default_snapshot_name(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
