"""How much disk a snapshot holds: what its folder's files and the files it
keeps elsewhere occupy. Read in a thread by the servicer (it walks a folder),
and forgiving: a snapshot deleted since it was made holds nothing."""

from __future__ import annotations

import os
from pathlib import Path

from .catalogue import Entry


def size_on_disk(entry: Entry) -> int:
    m = entry.manifest
    outside = [f for f in [m.memory_file, *(r.file for r in m.disks)] if f and Path(f).parent != entry.path]
    try:
        with os.scandir(entry.path) as it:
            inside = [e.path for e in it if e.is_file(follow_symlinks=False)]
    except OSError:
        inside = []
    total = 0
    for f in [*inside, *outside]:
        try:
            total += os.lstat(f).st_blocks * 512
        except OSError:
            continue
    return total
