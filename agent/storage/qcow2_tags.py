"""The internal snapshot tags of a qcow2 image, read from its header and
snapshot table (QEMU's docs/interop/qcow2.txt) rather than asked of
`qemu-img info`: every internal create checks its tag is free before the
guest pauses, and the process costs that create ~5 ms where this read costs
a few microseconds.

Read-only, as `qemu-img info -U` reads, so safe while a QEMU holds the
image: QEMU writes a new table before the header points to it. A file this
reader does not expect (not qcow2, a table out of bounds) gives None: the
caller asks qemu-img, whose answer and errors stay the reference."""

from __future__ import annotations

import os
import struct
from pathlib import Path

MAGIC = b"QFI\xfb"
# magic, version, then at byte 60: nb_snapshots, snapshots_offset.
_HEADER = struct.Struct(">4sI52xIQ")
# l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size.
_ENTRY = struct.Struct(">QIHHIIQII")
# QEMU's own limits (block/qcow2.h): it opens no image past them.
MAX_SNAPSHOTS = 65536
MAX_EXTRA = 1024


def read_tags(image: Path | str) -> list[str] | None:
    """The tags (snapshot names) in the table, in its order; None when the
    file is not a qcow2 image this reader can follow."""
    with open(image, "rb") as f:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        magic, version, count, offset = _HEADER.unpack(header)
        if magic != MAGIC or version not in (2, 3) or count > MAX_SNAPSHOTS or offset % 8:
            return None
        f.seek(offset)
        tags = []
        for _ in range(count):
            fixed = f.read(_ENTRY.size)
            if len(fixed) < _ENTRY.size:
                return None
            *_, id_size, name_size, _, _, _, _, extra_size = _ENTRY.unpack(fixed)
            if extra_size > MAX_EXTRA:
                return None
            rest = f.read(extra_size + id_size + name_size)
            if len(rest) < extra_size + id_size + name_size:
                return None
            tags.append(rest[extra_size + id_size:].decode("utf-8", "replace"))
            # Each entry starts on a multiple of 8 bytes.
            f.seek(-(_ENTRY.size + len(rest)) % 8, os.SEEK_CUR)
        return tags
