"""Every vhd-util command line the agent runs, and the parser of `vhd-util query`.

From blktap's vhd-util (xen tools/blktap2/vhd/lib/vhd-util-*.c up to Xen
4.12, and blktap3): options are getopt letters; errors are printed on
stdout, not stderr, and the exit status is the errno.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

VHD_UTIL: Final = "vhd-util"


def snapshot(binary: str, child: Path | str, parent: Path | str) -> list[str]:
    """A new differencing VHD `child` whose parent is `parent` (which must not change afterwards)."""
    return [binary, "snapshot", "-n", str(child), "-p", str(parent)]


def query(binary: str, image: Path | str) -> list[str]:
    """Virtual size (MiB), parent and chain depth, one per line, in that order."""
    return [binary, "query", "-n", str(image), "-v", "-p", "-d"]


def create(binary: str, image: Path | str, size_mib: int) -> list[str]:
    """A new dynamic (sparse) VHD of `size_mib` MiB."""
    return [binary, "create", "-n", str(image), "-s", str(size_mib)]


@dataclass(frozen=True)
class VhdInfo:
    size_mib: int
    parent: str | None
    depth: int


_DEPTH: Final = re.compile(r"chain depth: (\d+)")


def parse_query(text: str, image: Path | str) -> VhdInfo:
    """The output of `query` for `image` (vhd_util_query prints "<image> has no parent" for a base image)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 3 or not lines[0].isdigit():
        raise ValueError(f"vhd-util query: unexpected output {text!r}")
    depth = _DEPTH.fullmatch(lines[2])
    if depth is None:
        raise ValueError(f"vhd-util query: unexpected chain depth line {lines[2]!r}")
    parent = None if lines[1] == f"{image} has no parent" else lines[1]
    return VhdInfo(int(lines[0]), parent, int(depth[1]))
