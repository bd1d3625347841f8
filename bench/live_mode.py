"""What live_mode "auto" costs where it takes background snapshots (TCG before
QEMU 9.0) against the pre-copy it replaces: two agents in one run, one with
the default ("auto"), one with live_mode = "precopy", each with two guests,
interleaved rounds.

    .venv/bin/python -m bench.live_mode [--size 256] [--vcpus 2] [--repeat 3]

Each round, on each agent: a live snapshot of one guest (wall time as the
client sees it, and the guest's pause: QEMU's STOP to RESUME, as the manifest
records it), then both guests as one live group (each member's pause, the
group's wall time). The mode each snapshot was taken in is read from its
manifest (facts.live_mode). Writes bench/results/live-mode-<time>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.group_pause import _ms, _pause
from bench.snapshot_pause import machine, publish
from domsnap.client import Client, group
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk

MODES = {"auto": "", "precopy": 'live_mode = "precopy"\n'}


def _mode(snap: pb.Snapshot) -> str:
    facts: dict[str, str] = json.loads((Path(snap.path) / "snapshot.json").read_text())["facts"]
    return facts.get("live_mode", "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="each guest's RAM, MiB")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    load_before = machine()
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    taken: dict[str, set[str]] = {m: set() for m in MODES}
    with tempfile.TemporaryDirectory(prefix="dsmode-", dir="/var/tmp") as tmp:
        agents = {m: Agent(Path(tmp) / m, config_toml=f'[qemu]\naccel = "tcg"\n{extra}') for m, extra in MODES.items()}
        names = {m: [f"{m[0]}{i}" for i in range(2)] for m in MODES}
        try:
            for m, agent in agents.items():
                agent.base.mkdir()
                agent.start()
                for name in names[m]:
                    disk = agent.base / f"{name}.qcow2"
                    make_disk(disk, "qcow2", 32)
                    cfg = agent.base / f"{name}.cfg"
                    cfg.write_text(guest_config(name, kernel, ramdisk, {"xvda": (disk, "qcow2")},
                                                agent.base / f"{name}.serial", memory=args.size, vcpus=args.vcpus))
                    agent.cli("create", str(cfg), check=True)
            for m, agent in agents.items():
                for name in names[m]:
                    guestprobe.wait_ready(agent.base / f"{name}.serial", timeout=300)
            for r in range(args.repeat):
                for m, agent in agents.items():
                    tag = f"r{r}-{uuid.uuid4().hex[:4]}"
                    members = [group.Member(name, agent.address) for name in names[m]]
                    with Client(agent.address) as client:
                        t0 = time.monotonic()
                        one = client.create_snapshot(names[m][0], name=f"one-{tag}", live=True)
                        rows[m].setdefault("single live snapshot: wall", []).append(time.monotonic() - t0)
                        rows[m].setdefault("single live snapshot: pause", []).append(_pause(one))
                        t0 = time.monotonic()
                        snaps = group.create(f"all-{tag}", members, live=True)
                        rows[m].setdefault("live group of 2: wall", []).append(time.monotonic() - t0)
                        rows[m].setdefault("live group of 2: pause per member", []).extend(
                            _pause(s) for s in snaps.values())
                        taken[m] |= {_mode(one), *(_mode(s) for s in snaps.values())}
                        client.delete_snapshot(names[m][0], f"one-{tag}")
                        group.delete(f"all-{tag}", members)
        finally:
            # Domains outlive their agent: none is left running.
            for m, agent in agents.items():
                if agent.proc is not None:
                    for name in names[m]:
                        agent.cli("destroy", name)
                    agent.stop()
    head = ("| median (min-max) | " + " | ".join(f"live_mode {m} (took: {', '.join(sorted(taken[m]))})"
                                                  for m in MODES) + " | auto / precopy |\n|---|---|---|---|\n")
    body = "\n".join(
        f"| {row} | " + " | ".join(_ms(rows[m][row]) for m in MODES)
        + f" | {statistics.median(rows['auto'][row]) / statistics.median(rows['precopy'][row]):.2f}x |"
        for row in rows["auto"])
    text = f"""# live_mode auto against pre-copy ({started:%Y-%m-%d %H:%M} UTC)

Machine: {load_before} (at the start); {machine().rsplit(", ", 1)[-1]} at the end.
Shared with other work while it runs: compare only within this table.

Two agents in one run, each with 2 guests of {args.size} MiB and {args.vcpus} vCPUs (the test guest,
idle but for its counter), TCG; {args.repeat} interleaved rounds. Pause: QEMU's STOP to RESUME.

{head}{body}
"""
    publish(f"live-mode-{started:%Y%m%dT%H%M}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
