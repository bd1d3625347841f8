"""Every LVM command line the agent runs, and the parser of `lvs` JSON reports.

From lvm2's man pages (lvs(8) lv_attr bits, lvmreport(7) JSON format,
lvcreate(8), lvconvert(8)). Sizes are asked in bytes without a suffix so
they parse as integers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

FIELDS: Final = "lv_name,vg_name,lv_attr,lv_size,segtype,pool_lv,origin,vg_free,lv_path"


def lvs(what: str) -> list[str]:
    """Report one LV (a path, or VG/LV) or every LV of a VG."""
    return ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", FIELDS, what]


def snapshot(vg: str, origin: str, name: str, *, size_bytes: int | None = None, activate: bool = False) -> list[str]:
    """A snapshot LV of `origin`: thin without a size, thick (copy-on-write) with one.

    Thin snapshots are created with LVM's activation-skip flag; `activate`
    clears it, for an LV a domain is going to use.
    """
    argv = ["lvcreate", "-s"]
    if size_bytes is not None:
        argv += ["-L", f"{size_bytes}b"]
    if activate:
        argv += ["--setactivationskip", "n"]
    return [*argv, "-n", name, f"{vg}/{origin}"]


def merge(vg: str, snapshot_lv: str) -> list[str]:
    """Merge a snapshot back into its origin; waits until done when the origin is not open."""
    return ["lvconvert", "--merge", f"{vg}/{snapshot_lv}"]


def remove(vg: str, lv: str) -> list[str]:
    return ["lvremove", "-y", f"{vg}/{lv}"]


def rename(vg: str, old: str, new: str) -> list[str]:
    return ["lvrename", vg, old, new]


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    attr: str
    size: int
    segtype: str
    pool: str
    origin: str
    vg_free: int
    path: str

    @property
    def thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def kind(self) -> str:
        """lv_attr bit 1: (o)rigin, (s)napshot, merging (S)napshot, (O)rigin with a merging snapshot,
        thin (V)olume, (-) plain, (m)irror, (r)aid, ..."""
        return self.attr[0]

    @property
    def invalid(self) -> bool:
        """A thick snapshot whose copy-on-write space ran out (lv_attr bit 5)."""
        return self.attr[4] in "IS"

    @property
    def partial(self) -> bool:
        return self.attr[8] == "p"


def parse_lvs(text: str) -> list[LogicalVolume]:
    report = json.loads(text)["report"]
    return [
        LogicalVolume(
            name=lv["lv_name"], vg=lv["vg_name"], attr=lv["lv_attr"].ljust(10, "-"), size=int(lv["lv_size"]),
            segtype=lv["segtype"], pool=lv["pool_lv"], origin=lv["origin"], vg_free=int(lv["vg_free"]),
            path=lv["lv_path"],
        )
        for part in report
        for lv in part.get("lv", [])
    ]
