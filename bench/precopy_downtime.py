"""Live pre-copy snapshots under different QEMU downtime limits, sent straight
to QMP (bench/qmp_direct.py, waiting on events) on guests domsnapd launched:
what a smaller or an adaptive downtime limit would give domsnap's precopy
live mode, on an idle and on a busy guest.

    .venv/bin/python -m bench.precopy_downtime [--size 1024] [--repeat 5]

Variants, interleaved: QEMU's default limit (300 ms, which libvirt and domsnap
both leave as it is); 20 ms doubling on every pass after the first up to
300 ms (an idle guest converges early, a busy one still finishes).
The busy guest (`domsnap.busy=64`) is paused while the idle one is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from qemu.qmp import QMPClient

from bench import qmp_direct
from bench.snapshot_pause import machine
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"default 300 ms": (300, 0), "adaptive 20 ms, x2 per pass, up to 300 ms": (20, 300)}


async def qmp(sock: Path, cmd: str) -> None:
    client = QMPClient("bench-ctl")
    await client.connect(str(sock))
    try:
        await client.execute(cmd)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    fill = args.size * 7 // 10
    res: dict[tuple[str, str], list[qmp_direct.DirectResult]] = {}
    with tempfile.TemporaryDirectory(prefix="dsdown-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        agent = Agent(base / "agent")
        agent.base.mkdir()
        agent.start()
        try:
            for dom, extra in (("idle", f"domsnap.fill={fill}"), ("busy", f"domsnap.fill={fill - 64} domsnap.busy=64")):
                disk = base / f"{dom}.qcow2"
                make_disk(disk, "qcow2", 64)
                cfg = base / f"{dom}.cfg"
                cfg.write_text(
                    guest_config(
                        dom,
                        kernel,
                        ramdisk,
                        {"xvda": (disk, "qcow2")},
                        base / f"{dom}.serial",
                        memory=args.size,
                        extra=extra,
                    )
                )
                agent.cli("create", str(cfg), check=True)
            for dom in ("idle", "busy"):
                guestprobe.wait_ready(base / f"{dom}.serial", timeout=600)
            agent.stop()
            sock = {dom: agent.state_dir / "qemu" / dom / "qmp.sock" for dom in ("idle", "busy")}
            asyncio.run(qmp(sock["busy"], "stop"))
            for i in range(args.repeat):
                for dom in ("idle", "busy"):
                    if dom == "busy":
                        asyncio.run(qmp(sock["busy"], "cont"))
                        time.sleep(2)
                    names = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
                    for name in names:
                        start, cap = VARIANTS[name]
                        mem = base / "m.save"
                        r = asyncio.run(
                            qmp_direct.create(
                                sock[dom],
                                mem,
                                vdev="xvda",
                                tag=f"d{i}{len(name)}{dom}",
                                wait="events",
                                live=True,
                                downtime_ms=start,
                                adaptive_cap_ms=cap,
                            )
                        )
                        mem.unlink()
                        res.setdefault((dom, name), []).append(r)
                        time.sleep(1)
                    if dom == "busy":
                        asyncio.run(qmp(sock["busy"], "stop"))
            asyncio.run(qmp(sock["busy"], "cont"))
        finally:
            if agent.proc is None:
                agent.start()
            stub = agent.stub()
            for dom in ("idle", "busy"):
                with contextlib.suppress(Exception):
                    stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=dom, request_id=uuid.uuid4().hex),
                                       timeout=60)
            agent.stop()

    def f(values: list[float]) -> str:
        v = [x * 1000 for x in values]
        return f"{statistics.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f})"

    lines = [
        f"# Live pre-copy under QEMU downtime limits ({started:%Y-%m-%d %H:%M} UTC)\n",
        f"Machine: {machine()}\n",
        f"{args.size} MiB guests ({fill} MiB filled; busy: 64 MiB of it rewritten continuously); direct QMP, "
        f"waiting on events; median (min-max) of {args.repeat}, interleaved.\n",
        "| guest | downtime limit | guest pause | total (to fdatasync done) | RAM passes' bytes |",
        "|---|---|---|---|---|",
    ]
    for (dom, name), rs in res.items():
        moved = statistics.median(r.migrate.get("ram", {}).get("transferred", 0) for r in rs) / 2**20
        lines.append(f"| {dom} | {name} | {f([r.pause for r in rs])} | {f([r.wall for r in rs])} | {moved:.0f} MiB |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"precopy-downtime-{started:%Y%m%dT%H%M}.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
