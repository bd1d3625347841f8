"""Disk operations on the images of a Xen domain.

In Xen 4.17 libxl serves every image *file* (qcow2, vhd, raw) with qdisk, a
QEMU per domain: `phy` (blkback) only takes raw block devices and blktap is
gone (libxl_device.c: disk_try_backend). QEMU opens those files with locking
off (QEMU hw/block/xen-block.c), so `qemu-img` on them is not stopped, and
changes metadata under a QEMU that caches it: the lab saw `qemu-img snapshot
-c` "succeed" on a running domain's qcow2.
Snapshots of those images therefore go through that QEMU, over the QMP socket
libxl gives it, `/var/run/xen/qmp-libxl-<domid>`, naming the node QEMU's xen
block backend created: `<vdev>-<driver>` (xen_block_blockdev_add), where the
driver comes from libxl's `params` prefix (qcow2, vhd -> vpc, aio -> raw).

Block devices (LVs) bypass QEMU; their backend snapshots them through LVM,
which suspends the device-mapper table around it, so they need nothing here.

In the pause of an HVM domain's live save its device model holds no image:
at the end of the stream libxl has it save its devices
(`xen-save-devices-state` with live=true), and QEMU then drains every
request, flushes and inactivates the images for the destination to take
them (QEMU migration/savevm.c: qmp_xen_save_devices_state,
bdrv_inactivate_all), refusing any snapshot of its own ("does not support
internal snapshots", seen in the Xen lab). The guest is suspended and QEMU
stopped, so the image on disk is the instant's: `qemu-img` snapshots it
there, as it would an image no QEMU opened. When xl resumes the domain,
libxl's `cont` has QEMU take the images back and read their metadata anew
(bdrv_activate_all: qcow2_co_invalidate_cache), the new snapshot with it.
That `qemu-img` dies with the agent (setpriv's parent-death signal): an
agent killed in the pause lets the sink go and xl resume the domain, and
no orphan may still be writing the image once QEMU takes it back.

External snapshots are refused: QEMU could switch a disk onto a new overlay,
but libxl's stored config and xenstore would still name the old image, so the
next `xl list -l`, a reboot of the domain or its next save would silently go
back to the frozen image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from .. import runner
from ..errors import FailedPrecondition, NotFound
from ..runner import Runner
from ..storage import qemu_img
from .qmp import QmpSession
from .xl_argv import XlDisk

# libxl__device_disk_string_of_format, then QEMU's renaming in xen_block_drive_create.
_QEMU_DRIVERS: Final = {"qcow2": "qcow2", "qcow": "qcow", "qed": "qed", "vhd": "vpc", "raw": "raw"}
QEMU_IMG: Final = "qemu-img"
RELEASED_TIMEOUT: Final = 120.0


def qmp_socket(run_dir: Path, domid: int) -> Path:
    """libxl__qemu_qmp_path: the device model's QMP socket of a domain."""
    return run_dir / f"qmp-libxl-{domid}"


def dies_with_agent(argv: list[str]) -> list[str]:
    """`argv` run by util-linux's setpriv, which has the kernel kill it when the agent dies."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def node_name(disk: XlDisk) -> str:
    try:
        return f"{disk.vdev}-{_QEMU_DRIVERS[disk.format]}"
    except KeyError:
        raise FailedPrecondition(f"disk {disk.vdev}: QEMU serves no {disk.format!r} images") from None


class XenBlockOps:
    """BlockOps for one domain. Each call opens its own QMP connection and
    closes it: QEMU serves one QMP client at a time on that socket, and libxl
    needs it for its own work (saving and resuming the device model).

    `released`: the runner of `qemu-img`, for the pause of an HVM domain's
    live save, when its QEMU has released the images (see above)."""

    def __init__(self, name: str, domid: int, disks: Mapping[str, XlDisk], run_dir: Path, *,
                 released: Runner | None = None, img: str = QEMU_IMG) -> None:
        self._name = name
        self._domid = domid
        self._disks = disks
        self._socket = qmp_socket(run_dir, domid)
        self._released = released
        self._img = img

    def _qdisk(self, vdev: str) -> XlDisk:
        disk = self._disks.get(vdev)
        if disk is None:
            raise NotFound(f"domain {self._name} has no disk {vdev}")
        if disk.backend != "qdisk":
            raise FailedPrecondition(
                f"disk {vdev} of domain {self._name} is served by the {disk.backend} backend, not by QEMU; "
                "only images QEMU holds take qcow2 snapshots"
            )
        return disk

    async def _execute(self, command: str, args: Mapping[str, object]) -> None:
        session = QmpSession(self._socket, f"{self._name} (domid {self._domid})")
        t0 = time.monotonic()
        try:
            await session.execute(command, args)
        finally:
            await session.close()
            runner.tally_add(f"qmp {command}", time.monotonic() - t0)

    async def _tag(self, vdev: str, tag: str, qmp_command: str,
                   released_argv: Callable[[str, str, str], list[str]]) -> None:
        """An internal snapshot's tag made or removed: by the domain's QEMU,
        or by qemu-img on the image that QEMU released."""
        disk = self._qdisk(vdev)
        if self._released is None:
            await self._execute(qmp_command, {"device": node_name(disk), "name": tag})
        else:
            await self._released(dies_with_agent(released_argv(self._img, disk.target, tag)),
                                 timeout=RELEASED_TIMEOUT)

    async def internal_snapshot(self, vdev: str, tag: str) -> None:
        await self._tag(vdev, tag, "blockdev-snapshot-internal-sync", qemu_img.snapshot_create)

    async def delete_internal_snapshot(self, vdev: str, tag: str) -> None:
        await self._tag(vdev, tag, "blockdev-snapshot-delete-internal-sync", qemu_img.snapshot_delete)

    def _no_external(self, vdev: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"disk {vdev} of domain {self._name}: external snapshots of disks a running Xen domain uses "
            "are not supported (libxl would keep naming the frozen image); take an internal snapshot "
            "(qcow2) instead"
        )

    async def external_snapshot(self, vdev: str, overlay: Path, fmt: str) -> None:
        raise self._no_external(vdev)

    async def drop_overlay(self, vdev: str, backing: Path, fmt: str) -> None:
        raise self._no_external(vdev)

    async def commit(self, vdev: str, top: Path, base: Path) -> None:
        raise self._no_external(vdev)

    def can_overlay(self, vdev: str) -> bool:
        # Not even for the time a copy takes: a reboot or save of the domain
        # meanwhile would go back to the image and lose the guest's writes.
        return False
