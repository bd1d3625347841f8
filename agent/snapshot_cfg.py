"""Snapshot cfgfiles (the seed thread's syntax, in xl.cfg grammar): `name`,
`description`, `memory_path` and `disks`, plus KEY=VALUE settings after them."""

from __future__ import annotations

from collections.abc import Sequence

from . import xlcfg
from .errors import InvalidArgument

KEYS = ("name", "description", "memory_path", "disks")
SOURCE = "<snapshot cfgfile>"


def read(text: str, overrides: Sequence[str], source: str = "") -> dict[str, xlcfg.Value]:
    """`source`: the cfgfile's name, for messages (default SOURCE)."""
    if not text and not overrides:
        return {}
    cfg = xlcfg.parse(text, overrides, source=source or SOURCE)
    if unknown := set(cfg) - set(KEYS):
        raise InvalidArgument(f"snapshot cfgfile: unknown setting(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(KEYS)})", reason="INVALID_CONFIG")
    if (memory := xlcfg.get_str(cfg, "memory_path", "")) and not memory.startswith("/"):
        raise InvalidArgument(f"snapshot cfgfile: memory_path {memory!r} must be absolute", reason="INVALID_CONFIG")
    return cfg
