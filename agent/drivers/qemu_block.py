"""Disk operations on images a running QEMU holds, through its QMP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ..errors import InternalError, NotFound
from . import qemu_argv
from .qmp import QmpSession

# Told when a device moved to another image, so the domain's config follows.
OnMove = Callable[[str, str, str], None]


class QmpBlockOps:
    def __init__(self, qmp: QmpSession, on_move: OnMove) -> None:
        self._qmp = qmp
        self._on_move = on_move

    async def internal_snapshot(self, vdev: str, tag: str) -> None:
        await self._qmp.execute("blockdev-snapshot-internal-sync", {"device": vdev, "name": tag})

    async def delete_internal_snapshot(self, vdev: str, tag: str) -> None:
        await self._qmp.execute("blockdev-snapshot-delete-internal-sync", {"device": vdev, "name": tag})

    async def external_snapshot(self, vdev: str, overlay: Path, fmt: str) -> None:
        # mode absolute-paths: QEMU creates the overlay itself with the right
        # backing file and format, and switches the device onto it atomically.
        await self._qmp.execute(
            "blockdev-snapshot-sync",
            {"device": vdev, "snapshot-file": str(overlay), "format": qemu_argv.FORMATS.get(fmt, fmt),
             "mode": "absolute-paths"},
        )
        self._on_move(vdev, str(overlay), fmt)

    def can_overlay(self, vdev: str) -> bool:
        return True

    async def _top(self, vdev: str) -> str:
        """The image `vdev` reads and writes now."""
        for dev in await self._qmp.execute("query-block"):
            if dev.get("device") == vdev:
                return str(dev.get("inserted", {}).get("file", ""))
        raise NotFound(f"QEMU has no disk {vdev}")

    async def drop_overlay(self, vdev: str, backing: Path, fmt: str) -> None:
        if await self._top(vdev) == str(backing):
            # Merged already (by an agent that died before it noted so).
            self._on_move(vdev, str(backing), fmt)
            return
        # `base` named: by default QEMU commits down to the bottom of the chain,
        # into images other snapshots froze.
        await self._commit(vdev, {"device": vdev, "base": str(backing)}, f"merging the overlay of {vdev} back")
        self._on_move(vdev, str(backing), fmt)

    async def commit(self, vdev: str, top: Path, base: Path) -> None:
        # QEMU points the layer above `top` at `base` itself once the data is in.
        await self._commit(vdev, {"device": vdev, "top": str(top), "base": str(base)},
                           f"merging {top} of {vdev} into {base}")

    async def _commit(self, vdev: str, args: dict[str, object], what: str) -> None:
        """Run a block-commit job to its end; an active one (the top layer) is
        completed when READY, which moves the device onto the base."""
        job = f"domsnap-commit-{vdev}"
        async with self._qmp.listen("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR") as events:
            # One an agent that died left running is followed to its end, not started again.
            running = [j for j in await self._qmp.execute("query-block-jobs") if j.get("device") == job]
            if not running:
                await self._qmp.execute("block-commit", {**args, "job-id": job, "auto-dismiss": True})
            elif running[0].get("ready"):
                await self._qmp.execute("block-job-complete", {"device": job})
            async for event in events:
                data = cast(dict[str, Any], event.get("data", {}))
                if data.get("device") != job:
                    continue
                if event["event"] == "BLOCK_JOB_READY":
                    await self._qmp.execute("block-job-complete", {"device": job})
                elif event["event"] == "BLOCK_JOB_COMPLETED":
                    if "error" in data:
                        raise InternalError(f"{what} failed: {data['error']}")
                    return
                else:
                    raise InternalError(f"{what} failed: {data}")
