"""Where a revert's restore time goes: QEMU's loader reading the memory image
from disk with a cold page cache, from the page cache, and from tmpfs (no
disk at all: the loader's own bound), beside dd reading the same image cold.

    .venv/bin/python -m bench.restore_bound [--size 1024] [--repeat 3]

One guest (70 % of its RAM filled with non-zero data), two non-live
snapshots of it: one on the disk's filesystem, one in /dev/shm. Each
repetition reverts to each of them (the restore phase timed by the agent's
own progress stamps; caches dropped first where the row says cold), and dd
reads the on-disk image cold. Writes bench/results/restore-bound-<time>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.scale import cell, drop_caches
from bench.snapshot_pause import machine, publish, restore_seconds, timed_stream
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

SHM = Path("/dev/shm")


def dd_cold_read(path: Path) -> float:
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    return path.stat().st_size / (time.monotonic() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    r: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="domsnap-restore-", dir="/var/tmp") as tmp, \
            tempfile.TemporaryDirectory(prefix="domsnap-restore-", dir=SHM) as shm:
        base = Path(tmp)
        agent = Agent(base / "agent", config_toml=f'snapshot_roots = ["{base}", "{shm}"]\n')
        agent.base.mkdir()
        agent.start()
        try:
            disk = base / "disk.qcow2"
            make_disk(disk, "qcow2", 64)
            serial = base / "serial.log"
            cfg = base / "g.cfg"
            cfg.write_text(guest_config("rb", kernel, ramdisk, {"xvda": (disk, "qcow2")}, serial, memory=args.size,
                                        extra=f"domsnap.fill={args.size * 7 // 10}"))
            agent.cli("create", str(cfg), check=True)
            guestprobe.wait_ready(serial, timeout=600)
            stub = agent.stub()
            places = {"disk": str(base / "snap-disk"), "tmpfs": str(Path(shm) / "snap-shm")}
            for name, path in places.items():
                list(stub.CreateSnapshot(pb.CreateSnapshotRequest(domain_name="rb", name=name, path=path,
                                                                  request_id=uuid.uuid4().hex), timeout=600))
            image = Path(places["disk"]) / "memory.save"
            size = image.stat().st_size
            for _ in range(args.repeat):
                for label, name, cold in (("disk, cold cache", "disk", True), ("disk, page cache", "disk", False),
                                          ("tmpfs", "tmpfs", False)):
                    if cold:
                        drop_caches()
                    else:
                        subprocess.run(["cat", str(Path(places[name]) / "memory.save")], check=True,
                                       stdout=subprocess.DEVNULL)
                    _, events = timed_stream(stub.RevertSnapshot(pb.RevertSnapshotRequest(
                        domain_name="rb", snapshot_name=name, request_id=uuid.uuid4().hex), timeout=600))
                    r.setdefault(label, []).append(size / restore_seconds(events) / 1e6)
                r.setdefault("dd read, cold cache", []).append(dd_cold_read(image) / 1e6)
            stub.DestroyDomain(pb.DestroyDomainRequest(domain_name="rb"), timeout=60)
        finally:
            agent.stop()
    rows = "\n".join(f"| {label} | {cell(v, 1, ' MB/s')} |" for label, v in r.items())
    text = (f"# Restore: where the time goes ({started:%Y-%m-%d %H:%M} UTC)\n\nMachine: {machine()}\n\n"
            f"{args.size} MiB guest, memory image {size / 2**20:.0f} MiB; median (min-max) of {args.repeat} runs. "
            "QEMU's loader rows are the revert's restore phase (migrate-incoming to completed).\n\n"
            f"| memory image read by | throughput |\n|---|---|\n{rows}\n")
    publish(f"restore-bound-{started:%Y%m%dT%H%M}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
