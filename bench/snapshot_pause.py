"""Guest pause and memory-image throughput of domsnap's snapshots, against the
disk's own bandwidth measured by dd in the same run.

    .venv/bin/python -m bench.snapshot_pause [--sizes 256,1024] [--repeat 5]

For each guest size (RAM in MiB; the guest fills 70 % of it with non-zero data
and then idles) it measures, interleaved and repeated:
  non-live create, live create (background-snapshot, the default) and live
  create (precopy), each: wall time as the client sees it and guest pause as
  QEMU saw it (STOP to RESUME events, recorded in the manifest); revert wall
  time; then dd writing and reading the same number of bytes on the same
  filesystem (fdatasync; page cache dropped before the read).
Writes a Markdown table to bench/results/ and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) // 1024
    fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True,
                        check=True).stdout.splitlines()[1].split()[1]
    load = os.getloadavg()[0]
    return f"{cpu}, {os.cpu_count()} cores, {mem} MiB RAM, {fs} filesystem, QEMU TCG (no usable KVM), load {load:.2f}"


def publish(stem: str, text: str) -> Path:
    """Write a result table to bench/results/<stem>.md and print it."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{stem}.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return out


def dd_write_read(path: Path, nbytes: int) -> tuple[float, float]:
    count = max(nbytes // (4 << 20), 1)
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "conv=fdatasync"],
                   check=True, capture_output=True)
    write = time.monotonic() - t0
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    read = time.monotonic() - t0
    path.unlink()
    return count * (4 << 20) / write, count * (4 << 20) / read


def timed_stream(stream: Iterator[pb.OperationEvent]) -> tuple[float, list[pb.OperationEvent]]:
    """Wall time of a streamed operation, from the call to its last event."""
    t0 = time.monotonic()
    events = list(stream)
    return time.monotonic() - t0, events


def restore_seconds(events: list[pb.OperationEvent]) -> float:
    """Time of the revert's restore phase, from the agent's own progress stamps."""
    stamps = [e.progress.time.ToNanoseconds() / 1e9 for e in events
              if e.WhichOneof("event") == "progress" and e.progress.phase == pb.PHASE_RESTORE]
    return stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")


def fmt(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    return f"{statistics.median(v):.0f}{unit} ({min(v):.0f}-{max(v):.0f})"


def bench_size(base: Path, kernel: Path, ramdisk: Path, mib: int, repeat: int) -> dict[str, list[float]]:
    agent = Agent(base / f"agent{mib}")
    agent.base.mkdir()
    agent.start()
    r: dict[str, list[float]] = {}
    try:
        disk = base / f"disk{mib}.qcow2"
        make_disk(disk, "qcow2", 64)
        serial = base / f"serial{mib}.log"
        cfg = base / f"g{mib}.cfg"
        cfg.write_text(guest_config("bench", kernel, ramdisk, {"xvda": (disk, "qcow2")}, serial, memory=mib,
                                    extra=f"domsnap.fill={mib * 7 // 10}"))
        agent.cli("create", str(cfg), check=True)
        guestprobe.wait_ready(serial, timeout=300)
        guestprobe.wait_disk_ok(serial, "vda", timeout=60)
        stub = agent.stub()
        modes = [("nonlive", False, "background"), ("live-background", True, "background"),
                 ("live-precopy", True, "precopy")]
        for i in range(repeat):
            for label, live, live_mode in modes:
                if agent.config_toml != f'[qemu]\nlive_mode = "{live_mode}"\n':
                    agent.config_toml = f'[qemu]\nlive_mode = "{live_mode}"\n'
                    agent.restart()
                    stub = agent.stub()
                name = f"{label}-{i}"
                wall, events = timed_stream(stub.CreateSnapshot(pb.CreateSnapshotRequest(
                    domain_name="bench", name=name, live=live, request_id=uuid.uuid4().hex), timeout=600))
                snap = events[-1].finished.result
                r.setdefault(f"{label} wall", []).append(wall)
                r.setdefault(f"{label} pause", []).append(snap.downtime.ToNanoseconds() / 1e9)
                if label == "nonlive":
                    r.setdefault("image bytes", []).append(snap.memory.size_bytes)
                    r.setdefault("save MB/s",
                                 []).append(snap.memory.size_bytes / snap.downtime.ToNanoseconds() / 1e9 / 1e6)
            wall, events = timed_stream(stub.RevertSnapshot(pb.RevertSnapshotRequest(
                domain_name="bench", snapshot_name=f"nonlive-{i}", request_id=uuid.uuid4().hex), timeout=600))
            r.setdefault("revert wall", []).append(wall)
            size = r["image bytes"][-1]
            r.setdefault("restore MB/s", []).append(size / restore_seconds(events) / 1e6)
            w, rd = dd_write_read(base / "dd.bin", int(size))
            r.setdefault("dd write MB/s", []).append(w / 1e6)
            r.setdefault("dd read MB/s", []).append(rd / 1e6)
        stub.DestroyDomain(pb.DestroyDomainRequest(domain_name="bench"), timeout=60)
    finally:
        agent.stop()
    return r


def table(results: dict[int, dict[str, list[float]]]) -> str:
    sizes = sorted(results)
    rows = [
        ("non-live create: wall", "nonlive wall", 1000, " ms"),
        ("non-live create: guest pause", "nonlive pause", 1000, " ms"),
        ("live create (background-snapshot): wall", "live-background wall", 1000, " ms"),
        ("live create (background-snapshot): guest pause", "live-background pause", 1000, " ms"),
        ("live create (precopy): wall", "live-precopy wall", 1000, " ms"),
        ("live create (precopy): guest pause", "live-precopy pause", 1000, " ms"),
        ("revert: wall", "revert wall", 1000, " ms"),
        ("memory image size", "image bytes", 1 / 2**20, " MiB"),
        ("memory image save (non-live)", "save MB/s", 1, " MB/s"),
        ("dd write + fdatasync, same bytes", "dd write MB/s", 1, " MB/s"),
        ("memory image restore", "restore MB/s", 1, " MB/s"),
        ("dd read (cold cache), same bytes", "dd read MB/s", 1, " MB/s"),
    ]
    out = ["| | " + " | ".join(f"{s} MiB guest" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, key, scale, unit in rows:
        out.append(f"| {label} | " + " | ".join(fmt(results[s].get(key, []), scale, unit) for s in sizes) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="domsnap-bench-") as tmp:
        results = {int(s): bench_size(Path(tmp), kernel, ramdisk, int(s), args.repeat)
                   for s in args.sizes.split(",")}
    text = (f"# Snapshot pause and memory-image throughput ({started:%Y-%m-%d %H:%M} UTC)\n\n"
            f"Machine: {machine()}\n\nMedian (min-max) of {args.repeat} interleaved runs.\n\n{table(results)}\n")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"snapshot-pause-{started:%Y%m%dT%H%M}.md"
    out.write_text(text)
    (RESULTS / "raw").mkdir(exist_ok=True)
    (RESULTS / "raw" / f"{out.stem}.json").write_text(json.dumps(results, indent=1))
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
