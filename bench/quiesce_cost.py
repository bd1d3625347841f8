"""What --quiesce costs a snapshot: creates with and without it, interleaved,
on one guest that runs qemu-ga (the test guest's initrd-qga.img), non-live and
live.

    .venv/bin/python -m bench.quiesce_cost [--repeat 5]

Per kind: the create's wall time as the client sees it and the guest pause
QEMU saw (the manifest's downtime), medians, and the ratio quiesced / plain
from the same run. The freeze's own span is the difference of wall times:
the guest agent's freeze and thaw round trips (its fsfreeze hook included).
Writes a Markdown table to bench/results/ and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.snapshot_pause import machine, publish
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

CHANNEL = 'channel = [ "name=org.qemu.guest_agent.0" ]\n'


def create(agent: Agent, domain: str, *, live: bool, quiesce: bool) -> tuple[float, float]:
    """(wall seconds, guest pause seconds) of one create."""
    req = pb.CreateSnapshotRequest(domain_name=domain, request_id=uuid.uuid4().hex, name=uuid.uuid4().hex[:12],
                                   live=live, quiesce=quiesce)
    t0 = time.monotonic()
    events = list(agent.stub().CreateSnapshot(req, timeout=300))
    wall = time.monotonic() - t0
    result = events[-1].finished.result
    assert result.quiesced == quiesce, "the create did not quiesce as asked"
    return wall, result.downtime.ToNanoseconds() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    with tempfile.TemporaryDirectory(prefix="domsnap-quiesce-") as tmp:
        base = Path(tmp)
        (base / "agent").mkdir()
        agent = Agent(base / "agent", config_toml='[qemu]\naccel = "tcg"\n')
        agent.start()
        try:
            disk, serial = base / "g.qcow2", base / "g.log"
            make_disk(disk, "qcow2")
            cfg = base / "g.cfg"
            cfg.write_text(guest_config("qbench", kernel, ramdisk.with_name("initrd-qga.img"),
                                        {"xvda": (disk, "qcow2")}, serial) + CHANNEL)
            agent.cli("create", str(cfg), check=True)
            guestprobe.wait_ready(serial, timeout=120)
            rows = []
            for live in (False, True):
                runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                for _ in range(args.repeat):
                    for quiesce in (False, True):
                        runs[quiesce].append(create(agent, "qbench", live=live, quiesce=quiesce))
                plain, frozen = ([statistics.median(x[i] for x in runs[q]) for i in (0, 1)] for q in (False, True))
                rows.append(f"| {'live' if live else 'non-live'} | {plain[0] * 1000:.0f} | {frozen[0] * 1000:.0f} "
                            f"| {frozen[0] / plain[0]:.2f}x | {plain[1] * 1000:.0f} | {frozen[1] * 1000:.0f} |")
        finally:
            # Domains outlive their agent: this one goes with the run.
            for d in agent.stub().ListDomains(pb.ListDomainsRequest(), timeout=30).domains:
                agent.stub().DestroyDomain(pb.DestroyDomainRequest(domain_name=d.name), timeout=60)
            agent.stop()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
    text = (f"# --quiesce cost ({stamp})\n\n{machine()}; 128 MiB guest, one qcow2 disk (internal), "
            f"qemu-ga 7.2 freezing one ext4; medians of {args.repeat}, interleaved.\n\n"
            "| create | wall plain (ms) | wall quiesced (ms) | ratio | pause plain (ms) | pause quiesced (ms) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    publish(f"quiesce-cost-{stamp}", text)


if __name__ == "__main__":
    main()
