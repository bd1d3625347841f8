"""The real Debian guest (guest/debian/build.sh) beside the tiny test guest:
boot to its self-check, snapshot pause and total (non-live, live), revert
total, under SeaBIOS and OVMF, in one invocation.

    .venv/bin/python -m bench.real_guest [--repeat 2]

Guests: the tiny test guest (direct kernel boot, 128 MiB, 1 vCPU); the
Debian guest under SeaBIOS with the config of the issue that asked for it
(2048 MiB, 2 vCPUs, user-mode networking, VNC); the Debian guest under OVMF
(256 MiB, 1 vCPU, as its tests run it). Boot: from `domsnap create` to the
self-check's first line. Pause: the snapshot's own downtime; totals: the
call's wall time. Each repetition takes a non-live and a live snapshot and
reverts to the non-live one. The agent's defaults (live_mode = "auto").
Writes bench/results/real-guest-<time>.md.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.scale import cell
from bench.snapshot_pause import machine, publish, timed_stream
from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

BOOT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Case:
    label: str
    config: str  # the cfg's text, {disk}/{data}/{serial} filled in per run
    debian: bool


TINY = Case("tiny test guest (direct kernel, 128 MiB, 1 vCPU)", "", debian=False)
SEABIOS = Case("Debian, SeaBIOS (2048 MiB, 2 vCPUs)", """type = "hvm"
memory = 2048
vcpus = 2
disk = ['{disk},qcow2,xvda,w', '{data},qcow2,xvdb,w']
boot = "c"
vif = ['']
vnc = 1
serial = "file:{serial}"
""", debian=True)
OVMF = Case("Debian, OVMF (256 MiB, 1 vCPU)", """type = "hvm"
memory = 256
bios = "ovmf"
boot = "c"
disk = ['{disk},qcow2,xvda,w', '{data},qcow2,xvdb,w']
serial = "file:{serial}"
""", debian=True)

Results = dict[str, list[float]]


def boot(agent: Agent, case: Case, folder: Path, name: str) -> tuple[Path, float]:
    """Create the domain; returns its serial log and the seconds to its self-check."""
    folder.mkdir()
    serial, data = folder / "serial.log", folder / "data.qcow2"
    make_disk(data, "qcow2")
    cfg = folder / "guest.cfg"
    if case.debian:
        disk = folder / "root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(guestprobe.debian_disk()), "-F",
                        "qcow2", str(disk)], check=True, timeout=60)
        cfg.write_text(f'name = "{name}"\n' + case.config.format(disk=disk, data=data, serial=serial))
    else:
        cfg.write_text(guest_config(name, *guestprobe.guest_paths(), {"xvda": (data, "qcow2")}, serial))
    t0 = time.monotonic()
    agent.cli("create", str(cfg), check=True)
    guestprobe.wait_ready(serial, timeout=BOOT_TIMEOUT)
    return serial, time.monotonic() - t0


def snapshot(stub: pb_grpc.SnapshotAgentStub, name: str, snap: str, live: bool, r: Results) -> None:
    kind = "live" if live else "non-live"
    took, events = timed_stream(stub.CreateSnapshot(pb.CreateSnapshotRequest(
        domain_name=name, name=snap, live=live, request_id=uuid.uuid4().hex), timeout=900))
    finished = events[-1].finished
    assert finished.state == pb.OPERATION_STATE_SUCCEEDED, finished.error.message
    r.setdefault(f"{kind} snapshot: pause", []).append(finished.result.downtime.ToTimedelta().total_seconds())
    r.setdefault(f"{kind} snapshot: total", []).append(took)


def bench_case(agent: Agent, case: Case, base: Path, repeat: int) -> Results:
    name = f"rg{uuid.uuid4().hex[:6]}"
    serial, booted = boot(agent, case, base / name, name)
    r: Results = {"boot to self-check": [booted]}
    stub = agent.stub()
    try:
        for i in range(repeat):
            guestprobe.wait_counter_above(serial, (guestprobe.last_counter(serial) or 0) + 20, timeout=120)
            snapshot(stub, name, f"n{i}", False, r)
            snapshot(stub, name, f"l{i}", True, r)
            took, events = timed_stream(stub.RevertSnapshot(pb.RevertSnapshotRequest(
                domain_name=name, snapshot_name=f"n{i}", request_id=uuid.uuid4().hex), timeout=900))
            assert events[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED, events[-1].finished.error.message
            r.setdefault("revert (non-live snapshot): total", []).append(took)
    finally:
        stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=name), timeout=120)
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    started = datetime.now(UTC)
    before = machine()
    results: dict[str, Results] = {}
    with tempfile.TemporaryDirectory(prefix="domsnap-real-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        agent = Agent(base / "agent")
        agent.base.mkdir()
        agent.start()
        try:
            for case in (TINY, SEABIOS, OVMF):
                results[case.label] = bench_case(agent, case, base, args.repeat)
        finally:
            agent.stop()
    rows = list(next(iter(results.values())))
    head = "| | " + " | ".join(results) + " |\n|---|" + "---|" * len(results) + "\n"
    body = "\n".join(f"| {row} | " + " | ".join(
        cell(r.get(row, []), 1000, " ms") if "pause" in row else cell(r.get(row, []), 1, " s")
        for r in results.values()) + " |" for row in rows)
    text = (f"# The real guest beside the tiny one ({started:%Y-%m-%d %H:%M} UTC)\n\n"
            f"Machine at the start: {before}\nat the end: {machine()}\n\n"
            f"Median (min-max) of {args.repeat} runs; boot once per guest. The agent's defaults "
            "(live_mode = \"auto\").\n\n" + head + body + "\n")
    publish(f"real-guest-{started:%Y%m%dT%H%M}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
