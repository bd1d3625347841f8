"""How snapshots grow with the domain: guest pause and total time against the
size of a guest's RAM and of the data on its disk, beside what the disk
itself does in the same run (dd).

    .venv/bin/python -m bench.scale [--ram 1024,4096] [--data 0,2048,20480] [--repeat 2]

Two series, each on its own guest (the guest fills 70 % of its RAM with
non-zero data, then idles, writing sector 0 of its disk once a second):
  disk data: a RAM-sized guest (the first of --ram) whose raw disk holds
    each of --data MiB (written once, random blocks, sparse beyond); per
    size: live and non-live create (guest pause as QEMU saw it, wall), the
    copy's rate after the resume against `dd` copying the same image on the
    same filesystem (caches dropped before each), revert (skipped where the
    filesystem could not hold the image three times), delete; disks with
    more than 8 GiB of data are measured once;
  guest RAM: each of --ram with a 64 MiB qcow2 disk: live and non-live
    create with an internal and with an external disk snapshot, revert,
    delete.
Writes bench/results/scale-<time>.md (and .png with the growth curves,
raw/<same>.json) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

from bench.snapshot_pause import RESULTS, machine, publish, restore_seconds, timed_stream
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

MiB = 1 << 20
# Disks holding more data than this are measured once (each pass copies it twice).
BIG_MIB = 8192
R = dict[str, list[float]]


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fill_disk(image: Path, data_mib: int) -> None:
    """`data_mib` MiB of random blocks from 1 MiB on (the guest owns sector 0)."""
    block = os.urandom(4 * MiB)
    with open(image, "r+b") as f:
        f.seek(MiB)
        for _ in range(data_mib // 4):
            f.write(block)
        os.fsync(f.fileno())


def dd_copy_rate(src: Path, dst: Path) -> float:
    """Bytes/s of dd copying `src` to `dst` (cold cache, fdatasync'd), as the baseline of a copy."""
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "conv=fdatasync,sparse"], check=True,
                   capture_output=True)
    elapsed = time.monotonic() - t0
    size = dst.stat().st_blocks * 512
    dst.unlink()
    return size / elapsed


def copy_rate(events: list[pb.OperationEvent]) -> float:
    """Bytes/s of a create's disk copy after the resume: its first "copying"
    progress to the merge that follows it (the copy's fsync included)."""
    stamps = [(e.progress.time.ToNanoseconds() / 1e9, e.progress) for e in events
              if e.WhichOneof("event") == "progress" and e.progress.phase == pb.PHASE_DISKS]
    copying = [(t, p) for t, p in stamps if "copying" in p.message]
    merging = [t for t, p in stamps if "merging" in p.message]
    if not copying or not merging:
        return float("nan")
    return copying[-1][1].bytes_total / max(merging[0] - copying[0][0], 1e-6)


class Bench:
    def __init__(self, base: Path, kernel: Path, ramdisk: Path) -> None:
        self.base, self.kernel, self.ramdisk = base, kernel, ramdisk
        self.agent = Agent(base / "agent")
        self.agent.base.mkdir()
        self.agent.start()

    def boot(self, name: str, ram_mib: int, disk: Path, fmt: str) -> None:
        serial = self.base / f"{name}.log"
        cfg = self.base / f"{name}.cfg"
        cfg.write_text(guest_config(name, self.kernel, self.ramdisk, {"xvda": (disk, fmt)}, serial, memory=ram_mib,
                                    extra=f"domsnap.fill={ram_mib * 7 // 10}"))
        self.agent.cli("create", str(cfg), check=True)
        guestprobe.wait_ready(serial, timeout=600)
        guestprobe.wait_disk_ok(serial, "vda", timeout=120)

    def create(self, r: R, key: str, domain: str, name: str, **fields: object) -> list[pb.OperationEvent]:
        wall, events = timed_stream(self.agent.stub().CreateSnapshot(pb.CreateSnapshotRequest(
            domain_name=domain, name=name, request_id=uuid.uuid4().hex, **fields), timeout=3600))  # type: ignore[arg-type]
        r.setdefault(f"{key} wall", []).append(wall)
        r.setdefault(f"{key} pause", []).append(events[-1].finished.result.downtime.ToNanoseconds() / 1e9)
        return events

    def revert(self, r: R, domain: str, name: str) -> None:
        wall, events = timed_stream(self.agent.stub().RevertSnapshot(pb.RevertSnapshotRequest(
            domain_name=domain, snapshot_name=name, request_id=uuid.uuid4().hex), timeout=3600))
        r.setdefault("revert wall", []).append(wall)
        r.setdefault("restore", []).append(restore_seconds(events))

    def delete(self, r: R, domain: str, name: str) -> None:
        wall, _ = timed_stream(self.agent.stub().DeleteSnapshot(pb.DeleteSnapshotRequest(
            domain_name=domain, snapshot_name=name, request_id=uuid.uuid4().hex), timeout=3600))
        r.setdefault("delete wall", []).append(wall)

    def destroy(self, domain: str) -> None:
        self.agent.stub().DestroyDomain(pb.DestroyDomainRequest(domain_name=domain), timeout=120)

    def disk_series(self, ram_mib: int, data_mib: int, repeat: int) -> R:
        r: R = {}
        image = self.base / f"raw{data_mib}.raw"
        make_disk(image, "raw", data_mib + 64)
        fill_disk(image, data_mib)
        domain = f"raw{data_mib}"
        self.boot(domain, ram_mib, image, "raw")
        # A revert needs room for the image, its copy and the copy back beside it.
        revert = shutil.disk_usage(self.base).free > 3 * (data_mib + 64) * MiB
        try:
            for i in range(repeat if data_mib <= BIG_MIB else 1):
                for key, live in (("live", True), ("nonlive", False)):
                    drop_caches()
                    events = self.create(r, key, domain, f"{key}-{i}", live=live)
                    if data_mib:
                        r.setdefault("copy MB/s", []).append(copy_rate(events) / 1e6)
                    if revert:
                        self.revert(r, domain, f"{key}-{i}")
                    self.delete(r, domain, f"{key}-{i}")
                    if data_mib:  # once the snapshot's copy is gone: never three copies at once
                        r.setdefault("dd copy MB/s", []).append(dd_copy_rate(image, self.base / "dd.raw") / 1e6)
        finally:
            self.destroy(domain)
            image.unlink()
        return r

    def ram_series(self, ram_mib: int, repeat: int) -> R:
        r: R = {}
        image = self.base / f"q{ram_mib}.qcow2"
        make_disk(image, "qcow2", 64)
        domain = f"q{ram_mib}"
        self.boot(domain, ram_mib, image, "qcow2")
        try:
            for i in range(repeat):
                for key, live, method in (("live internal", True, pb.SNAPSHOT_METHOD_INTERNAL),
                                          ("nonlive internal", False, pb.SNAPSHOT_METHOD_INTERNAL),
                                          ("live external", True, pb.SNAPSHOT_METHOD_EXTERNAL)):
                    name = f"{key.replace(' ', '-')}-{i}"
                    self.create(r, key, domain, name, live=live, method=method)
                    self.revert(r, domain, name)
                    self.delete(r, domain, name)
        finally:
            self.destroy(domain)
            image.unlink()
        return r

    def close(self) -> None:
        self.agent.stop()


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cell(values: list[float], scale: float, unit: str) -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    digits = 2 if unit == " s" else 0
    return f"{statistics.median(v):.{digits}f}{unit} ({min(v):.{digits}f}-{max(v):.{digits}f})"


Rows = list[tuple[str, str, float, str]]
DISK_ROWS: Rows = [
    ("live create: guest pause", "live pause", 1000, " ms"), ("live create: wall", "live wall", 1, " s"),
    ("non-live create: guest pause", "nonlive pause", 1000, " ms"), ("non-live create: wall", "nonlive wall", 1, " s"),
    ("copy after the resume", "copy MB/s", 1, " MB/s"), ("dd copy of the same image", "dd copy MB/s", 1, " MB/s"),
    ("revert: wall", "revert wall", 1, " s"), ("delete: wall", "delete wall", 1000, " ms"),
]
RAM_ROWS: Rows = [
    ("live create, internal disk: pause", "live internal pause", 1000, " ms"),
    ("live create, internal disk: wall", "live internal wall", 1, " s"),
    ("non-live create, internal disk: pause", "nonlive internal pause", 1000, " ms"),
    ("live create, external disk: pause", "live external pause", 1000, " ms"),
    ("live create, external disk: wall", "live external wall", 1, " s"),
    ("revert: wall", "revert wall", 1, " s"), ("restore (memory load)", "restore", 1, " s"),
    ("delete: wall", "delete wall", 1000, " ms"),
]


def table(series: dict[int, R], rows: Rows, label: Callable[[int], str]) -> str:
    sizes = sorted(series)
    out = ["| | " + " | ".join(label(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name, key, scale, unit in rows:
        out.append(f"| {name} | " + " | ".join(cell(series[s].get(key, []), scale, unit) for s in sizes) + " |")
    return "\n".join(out)


def plot(disk: dict[int, R], ram: dict[int, R], out: Path) -> None:
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    xs = sorted(disk)
    ax = axes[0]
    for key, style in (("live pause", "o-"), ("nonlive pause", "s-")):
        ax.plot([x / 1024 for x in xs], [med(disk[x].get(key, [])) * 1000 for x in xs], style, label=key)
    ax.set(xlabel="data on the raw disk (GiB)", ylabel="guest pause (ms)", title="Pause against disk data")
    ax.legend()
    ax = axes[1]
    for key, style in (("live wall", "o-"), ("nonlive wall", "s-"), ("revert wall", "^-")):
        ax.plot([x / 1024 for x in xs], [med(disk[x].get(key, [])) for x in xs], style, label=key)
    ax.set(xlabel="data on the raw disk (GiB)", ylabel="seconds", title="Total time against disk data")
    ax.legend()
    ax = axes[2]
    rs = sorted(ram)
    for key, style in (("live internal pause", "o-"), ("nonlive internal pause", "s-"),
                       ("live external pause", "^-")):
        ax.plot([x / 1024 for x in rs], [med(ram[x].get(key, [])) * 1000 for x in rs], style, label=key)
    ax.set(xlabel="guest RAM (GiB, 70 % filled)", ylabel="guest pause (ms)", title="Pause against guest RAM")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ram", default="1024,4096", help="guest RAM sizes in MiB")
    parser.add_argument("--data", default="0,2048,20480", help="MiB of data on the raw disk")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rams = [int(s) for s in args.ram.split(",")]
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    stem = f"scale-{started:%Y%m%dT%H%M}"
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    # Written after each series: a run cut short keeps what it measured.
    partial = RESULTS / "raw" / f"{stem}.json"
    with tempfile.TemporaryDirectory(prefix="domsnap-scale-", dir="/var/tmp") as tmp:
        bench = Bench(Path(tmp), kernel, ramdisk)
        try:
            disk: dict[int, R] = {}
            ram: dict[int, R] = {}
            for d in args.data.split(","):
                disk[int(d)] = bench.disk_series(rams[0], int(d), args.repeat)
                partial.write_text(json.dumps({"disk": disk, "ram": ram}, indent=1))
            for m in rams:
                ram[m] = bench.ram_series(m, args.repeat)
                partial.write_text(json.dumps({"disk": disk, "ram": ram}, indent=1))
        finally:
            bench.close()
    plot(disk, ram, RESULTS / f"{stem}.png")
    text = (f"# Snapshots against the size of the domain ({started:%Y-%m-%d %H:%M} UTC)\n\n"
            f"Machine: {machine()}\n\nMedian (min-max) of {args.repeat} runs. Plot: [{stem}.png]({stem}.png)\n\n"
            f"## Data on a raw disk ({rams[0]} MiB guest)\n\n"
            f"{table(disk, DISK_ROWS, lambda d: f'{d / 1024:g} GiB data')}\n\n"
            f"## Guest RAM (64 MiB qcow2 disk)\n\n{table(ram, RAM_ROWS, lambda m: f'{m / 1024:g} GiB guest')}\n")
    publish(stem, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
