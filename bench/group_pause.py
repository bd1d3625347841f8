"""A group snapshot's pause per member against a single snapshot's pause: four
live guests on one domsnapd, each snapshotted alone and then all four as one
group, interleaved, in the same run.

    .venv/bin/python -m bench.group_pause [--size 128] [--members 4] [--repeat 3] [--live-mode auto]

The pause of each guest is QEMU's own (STOP to RESUME event stamps, as the
manifest's paused_at and resumed_at record it). A group member's pause holds
the wait for every other member to pause and the coordinator's round trip,
besides its own state (taken while it waits); the goal is at most twice a
single live snapshot's pause. The time from the group's instant (the last
member's stop) to each member's resume is the protocol's share and the
resumes': what is left once every member is paused.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench.snapshot_pause import machine, publish
from domsnap.client import Client, group
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, make_disk


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def _pause(snap: pb.Snapshot) -> float:
    return (snap.resumed_at.ToNanoseconds() - snap.paused_at.ToNanoseconds()) / 1e9


def _all_at_once(client: Client, names: list[str], snapshot: str) -> list[pb.Snapshot]:
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: client.create_snapshot(n, name=snapshot, live=True), names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="each guest's RAM, MiB")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    # auto takes background snapshots under TCG before QEMU 9.0; precopy is what a group holds ready.
    parser.add_argument("--live-mode", choices=("auto", "precopy", "background"), default="auto")
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    load_before = machine()
    single: list[float] = []
    parallel: list[float] = []
    member: list[float] = []
    worst: list[float] = []
    spread: list[float] = []
    after_instant: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dsgroup-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        agent = Agent(base / "agent", config_toml=f'[qemu]\naccel = "tcg"\nlive_mode = "{args.live_mode}"\n')
        agent.base.mkdir()
        agent.start()
        names = [f"g{i}" for i in range(args.members)]
        try:
            for name in names:
                disk = base / f"{name}.qcow2"
                make_disk(disk, "qcow2", 32)
                cfg = base / f"{name}.cfg"
                cfg.write_text(guest_config(name, kernel, ramdisk, {"xvda": (disk, "qcow2")},
                                            base / f"{name}.serial", memory=args.size))
                agent.cli("create", str(cfg), check=True)
            for name in names:
                guestprobe.wait_ready(base / f"{name}.serial", timeout=300)
            members = [group.Member(name, agent.address) for name in names]
            with Client(agent.address) as client:
                for r in range(args.repeat):
                    tag = f"r{r}-{uuid.uuid4().hex[:4]}"
                    for name in names:
                        single.append(_pause(client.create_snapshot(name, name=f"one-{tag}", live=True)))
                    # The same guests snapshotted at once without a barrier: what running them together costs.
                    parallel.extend(_pause(s) for s in _all_at_once(client, names, f"par-{tag}"))
                    snaps = group.create(f"all-{tag}", members, live=True)
                    paused = [s.paused_at.ToNanoseconds() / 1e9 for s in snaps.values()]
                    resumed = [s.resumed_at.ToNanoseconds() / 1e9 for s in snaps.values()]
                    assert max(paused) < min(resumed), "the members' pauses do not overlap"
                    pauses = [b - a for a, b in zip(paused, resumed, strict=True)]
                    member.extend(pauses)
                    worst.append(max(pauses))
                    spread.append(max(paused) - min(paused))
                    after_instant.extend(r - max(paused) for r in resumed)
                    for name in names:
                        client.delete_snapshot(name, f"one-{tag}")
                        client.delete_snapshot(name, f"par-{tag}")
                    group.delete(f"all-{tag}", members)
        finally:
            # Domains outlive their agent: none is left running.
            for name in names:
                agent.cli("destroy", name)
            agent.stop()
    ratio = statistics.median(member) / statistics.median(single)
    worst_ratio = statistics.median(worst) / statistics.median(single)
    barrier = statistics.median(member) / statistics.median(parallel)
    text = f"""# Group snapshot pause against a single live snapshot ({started:%Y-%m-%d %H:%M} UTC)

Machine: {load_before} (at the start); {machine().rsplit(", ", 1)[-1]} at the end.
This machine is shared with other work while it runs (other engineers' tests
and guests): figures are noisy, compare only within this table.

{args.members} guests of {args.size} MiB (the test guest, idle but for its counter), one domsnapd,
live snapshots (live_mode {args.live_mode}), {args.repeat} rounds; in each round every guest is snapshotted alone,
then all at once as {args.members} independent snapshots, then all {args.members} as one group.
Pause: QEMU's STOP to RESUME (the manifests' paused_at, resumed_at). Median (min-max).

| | pause |
|---|---|
| single live snapshot, per guest ({len(single)}) | {_ms(single)} |
| {args.members} single live snapshots at once, no barrier, per guest ({len(parallel)}) | {_ms(parallel)} |
| group of {args.members}, per member ({len(member)}) | {_ms(member)} |
| group of {args.members}, the longest member's pause per group ({len(worst)}) | {_ms(worst)} |
| group of {args.members}, first to last member paused | {_ms(spread)} |
| group of {args.members}, last member's stop to each member's resume ({len(after_instant)}) | {_ms(after_instant)} |

Ratio of medians, group member / single: **{ratio:.2f}x** (longest member: {worst_ratio:.2f}x); goal: at most 2x.
Group member / the same snapshots at once without a barrier: {barrier:.2f}x.
"""
    publish(f"group-pause-{started:%Y%m%dT%H%M}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
