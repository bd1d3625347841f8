"""Where domsnapd's time goes, for the rows where it does not lead
(bench/vs_libvirt.py): the agent's own CPU per operation, a py-spy profile of
it, and the restore path's alternatives measured on the same memory image.

    .venv/bin/python -m bench.agent_profile [--size 1024] [--repeat 5]

1. A guest (`domsnap.fill` = 70 % of RAM) under a domsnapd; non-live creates
   and a revert, each with the agent's CPU seconds (/proc/PID/stat) against
   the wall time, under `py-spy record` when py-spy is installed
   (`.venv/bin/pip install py-spy`): its top stacks by sample count.
2. The memory image of one snapshot loaded into a fresh QEMU started with
   domsnap's own command line plus `-S -incoming defer`, the page cache dropped
   before each load, three ways, interleaved: waiting as the agent does
   (query-migrate every 100 ms), on QEMU's MIGRATION events, and on events
   with posix_fadvise(SEQUENTIAL + WILLNEED) on the image first; against dd
   reading the same file cold.
Prints a Markdown report and writes it to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener, QMPClient

from bench.snapshot_pause import machine
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import BIN, Agent, guest_config, make_disk

RESULTS = Path(__file__).resolve().parent / "results"
PY_SPY = BIN / "py-spy"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def load(argv: list[str], sock: Path, image: Path, how: str, pidf: Path) -> tuple[float, float]:
    """Start QEMU incoming, load `image`; (seconds to start QEMU, seconds from migrate-incoming to completed)."""
    t0 = time.monotonic()
    prealloc = ["-mem-prealloc"] if how == "prealloc" else []
    subprocess.run([*argv, *prealloc, "-S", "-incoming", "defer"], check=True)
    started = time.monotonic() - t0
    client = QMPClient("bench-load")
    await client.connect(str(sock))
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if how in ("fadvise", "prealloc"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            events = EventListener(("MIGRATION",))
            client.register_listener(events)
            if how != "poll":
                await client.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})  # fmt: skip
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": "img"})
            t1 = time.monotonic()
            await client.execute("migrate-incoming", {"uri": "fd:img"})
            if how == "poll":
                while True:
                    info: Any = await client.execute("query-migrate")
                    if info.get("status") == "completed":
                        break
                    if info.get("status") == "failed":
                        raise RuntimeError(str(info))
                    await asyncio.sleep(0.1)
            else:
                async for event in events:
                    status = cast(dict[str, Any], event["data"])["status"]
                    if status == "completed":
                        break
                    if status == "failed":
                        raise RuntimeError("load failed")
            loaded = time.monotonic() - t1
        finally:
            os.close(fd)
        qpid = int(pidf.read_text())
        await client.execute("quit")
    finally:
        # After quit QEMU closes the socket: the library reports that as EOFError.
        with contextlib.suppress(Exception):
            await client.disconnect()
    while Path(f"/proc/{qpid}").exists():
        await asyncio.sleep(0.02)
    return started, loaded


def top_stacks(raw: Path, n: int = 8) -> list[tuple[int, str]]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        leaf = ";".join(f.split(" (")[0] for f in frames[-3:])
        counts[leaf] += int(count)
    return [(c, s) for s, c in counts.most_common(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    lines = [f"# domsnapd profile and restore paths ({started:%Y-%m-%d %H:%M} UTC)\n", f"Machine: {machine()}\n"]
    with tempfile.TemporaryDirectory(prefix="dsprof-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        agent = Agent(base / "agent")
        agent.base.mkdir()
        agent.start()
        try:
            disk = base / "g.qcow2"
            make_disk(disk, "qcow2", 64)
            serial = base / "g.serial"
            cfg = base / "g.cfg"
            cfg.write_text(
                guest_config(
                    "prof",
                    kernel,
                    ramdisk,
                    {"xvda": (disk, "qcow2")},
                    serial,
                    memory=args.size,
                    extra=f"domsnap.fill={args.size * 7 // 10}",
                )
            )
            agent.cli("create", str(cfg), check=True)
            guestprobe.wait_ready(serial, timeout=600)
            assert agent.proc is not None
            pid = agent.proc.pid
            stub = agent.stub()
            spy = None
            raw = base / "pyspy.txt"
            if PY_SPY.exists():
                spy = subprocess.Popen(
                    [str(PY_SPY), "record", "-r", "200", "-f", "raw", "-o", str(raw), "-p", str(pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            rows = []
            for i in range(args.repeat):
                c0, t0 = cpu_seconds(pid), time.monotonic()
                events = list(
                    stub.CreateSnapshot(
                        pb.CreateSnapshotRequest(domain_name="prof", name=f"p{i}",
                                                 request_id=uuid.uuid4().hex), timeout=600
                    )
                )
                rows.append(("non-live create", time.monotonic() - t0, cpu_seconds(pid) - c0))
                image = Path(events[-1].finished.result.memory.path)
            c0, t0 = cpu_seconds(pid), time.monotonic()
            list(
                stub.RevertSnapshot(
                    pb.RevertSnapshotRequest(
                        domain_name="prof", snapshot_name=f"p{args.repeat - 1}", request_id=uuid.uuid4().hex
                    ),
                    timeout=600,
                )
            )
            rows.append(("revert", time.monotonic() - t0, cpu_seconds(pid) - c0))
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait(timeout=60)
            lines += [
                f"## domsnapd CPU per operation ({args.size} MiB guest)\n",
                "| operation | wall | agent CPU (user+sys) | CPU / wall |",
                "|---|---|---|---|",
            ]
            for op in ("non-live create", "revert"):
                w = [r[1] for r in rows if r[0] == op]
                c = [r[2] for r in rows if r[0] == op]
                wm, cm = statistics.median(w), statistics.median(c)
                lines.append(f"| {op} (n={len(w)}) | {wm * 1000:.0f} ms | {cm * 1000:.0f} ms | {cm / wm:.1%} |")
            if spy is not None and raw.exists():
                lines += [
                    "",
                    "py-spy (200 Hz, active samples only), top leaf stacks:",
                    "",
                    "| samples | stack |",
                    "|---|---|",
                ]
                lines += [f"| {c} | `{s}` |" for c, s in top_stacks(raw)]
            qpid = int((agent.state_dir / "qemu" / "prof" / "qemu.pid").read_text())
            argv = Path(f"/proc/{qpid}/cmdline").read_text().split("\0")[:-1]
            keep = base / "image.save"
            shutil.copy(image, keep)
            stub.DestroyDomain(pb.DestroyDomainRequest(domain_name="prof", request_id=uuid.uuid4().hex), timeout=60)
        finally:
            agent.stop()
        # The domain's command line with our own QMP socket and pid file (the
        # revert launched it incoming: those options are added per load).
        if "-incoming" in argv:
            del argv[argv.index("-incoming") : argv.index("-incoming") + 2]
        if "-S" in argv:
            argv.remove("-S")
        sock, pidf = base / "load.sock", base / "load.pid"
        i_qmp = argv.index("-qmp")
        argv[i_qmp + 1] = f"unix:{sock},server=on,wait=off"
        argv[argv.index("-pidfile") + 1] = str(pidf)
        res: dict[str, list[tuple[float, float]]] = {}
        dd: list[float] = []
        for i in range(args.repeat):
            hows = ["poll", "events", "fadvise", "prealloc"]
            for how in hows if i % 2 == 0 else reversed(hows):
                drop_caches()
                res.setdefault(how, []).append(asyncio.run(load(argv, sock, keep, how, pidf)))
            drop_caches()
            t0 = time.monotonic()
            subprocess.run(["dd", f"if={keep}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
            dd.append(time.monotonic() - t0)
        size = keep.stat().st_size
        lines += [
            "",
            f"## Loading one {size / 2**20:.0f} MiB memory image into a fresh QEMU (cold cache, "
            f"n={args.repeat}, interleaved)\n",
            "| way | QEMU start | migrate-incoming to completed | MB/s | vs dd |",
            "|---|---|---|---|---|",
        ]
        dd_med = statistics.median(dd)
        for how, label in (
            ("poll", "as the agent: query-migrate every 100 ms"),
            ("events", "MIGRATION events"),
            ("fadvise", "events + posix_fadvise SEQUENTIAL, WILLNEED"),
            ("prealloc", "events + fadvise + QEMU -mem-prealloc"),
        ):
            s = statistics.median(x[0] for x in res[how])
            ld = [x[1] for x in res[how]]
            lines.append(
                f"| {label} | {s * 1000:.0f} ms | {statistics.median(ld) * 1000:.0f} ms "
                f"({min(ld) * 1000:.0f}-{max(ld) * 1000:.0f}) | {size / statistics.median(ld) / 1e6:.0f} | "
                f"{dd_med / statistics.median(ld):.2f}x |"
            )
        lines.append(
            f"| dd if=image of=/dev/null bs=4M | | {dd_med * 1000:.0f} ms ({min(dd) * 1000:.0f}-"
            f"{max(dd) * 1000:.0f}) | {size / dd_med / 1e6:.0f} | 1.00x |"
        )
        lines += ["", "| way | QEMU start + load, median (min-max) |", "|---|---|"]
        for how in res:
            tot = [(x[0] + x[1]) * 1000 for x in res[how]]
            lines.append(f"| {how} | {statistics.median(tot):.0f} ms ({min(tot):.0f}-{max(tot):.0f}) |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"agent-profile-{started:%Y%m%dT%H%M}.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
