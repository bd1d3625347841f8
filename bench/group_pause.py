"""A group snapshot's pause per member against a single snapshot's pause: four
live guests on one domsnapd, each snapshotted alone and then all four as one
group, interleaved, in the same run.

    .venv/bin/python -m bench.group_pause [--size 128] [--members 4] [--repeat 3] [--live-mode auto]
        [--against DIR]

The pause of each guest is QEMU's own (STOP to RESUME event stamps, as the
manifest's paused_at and resumed_at record it). A group member's pause holds
the wait for every other member to pause and the coordinator's round trip,
besides its own state (taken while it waits); the goal is at most twice a
single live snapshot's pause. The time from the group's instant (the last
member's stop) to each member's resume is the protocol's share and the
resumes': what is left once every member is paused.

`--against DIR` compares this tree's agent with the one in DIR, a domsnap
source tree (e.g. `mkdir DIR && git archive main | tar -x -C DIR`): every
round runs twice on the same guests, once under each agent (swapped between
them, the first alternating from round to round), so that both see the same
load; the coordinator is this tree's client library for both.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass
class Pauses:
    """One agent's figures, in seconds."""

    single: list[float] = field(default_factory=list)
    parallel: list[float] = field(default_factory=list)
    member: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    after_instant: list[float] = field(default_factory=list)

    def round(self, agent: Agent, names: list[str]) -> None:
        """Every guest alone, all at once without a barrier, all as one group; then their snapshots go."""
        tag = uuid.uuid4().hex[:6]
        members = [group.Member(name, agent.address) for name in names]
        with Client(agent.address) as client:
            for name in names:
                self.single.append(_pause(client.create_snapshot(name, name=f"one-{tag}", live=True)))
            # The same guests snapshotted at once without a barrier: what running them together costs.
            self.parallel.extend(_pause(s) for s in _all_at_once(client, names, f"par-{tag}"))
            snaps = group.create(f"all-{tag}", members, live=True)
            paused = [s.paused_at.ToNanoseconds() / 1e9 for s in snaps.values()]
            resumed = [s.resumed_at.ToNanoseconds() / 1e9 for s in snaps.values()]
            assert max(paused) < min(resumed), "the members' pauses do not overlap"
            pauses = [b - a for a, b in zip(paused, resumed, strict=True)]
            self.member.extend(pauses)
            self.worst.append(max(pauses))
            self.spread.append(max(paused) - min(paused))
            self.after_instant.extend(r - max(paused) for r in resumed)
            for name in names:
                client.delete_snapshot(name, f"one-{tag}")
                client.delete_snapshot(name, f"par-{tag}")
        group.delete(f"all-{tag}", members)

    def rows(self, members: int) -> list[tuple[str, str]]:
        return [
            (f"single live snapshot, per guest ({len(self.single)})", _ms(self.single)),
            (f"{members} single live snapshots at once, no barrier, per guest ({len(self.parallel)})",
             _ms(self.parallel)),
            (f"group of {members}, per member ({len(self.member)})", _ms(self.member)),
            (f"group of {members}, the longest member's pause per group ({len(self.worst)})", _ms(self.worst)),
            (f"group of {members}, first to last member paused", _ms(self.spread)),
            (f"group of {members}, last member's stop to each member's resume ({len(self.after_instant)})",
             _ms(self.after_instant)),
        ]

    def ratios(self) -> str:
        single = statistics.median(self.single)
        return (f"group member / single: **{statistics.median(self.member) / single:.2f}x** (longest member: "
                f"{statistics.median(self.worst) / single:.2f}x); group member / the same snapshots at once "
                f"without a barrier: {statistics.median(self.member) / statistics.median(self.parallel):.2f}x")


def _package(tree: Path, into: Path) -> Path:
    """A `domsnap` package put together from a source tree as pyproject.toml maps it; its parent, for PYTHONPATH."""
    package = into / "domsnap"
    package.mkdir(parents=True)
    (package / "__init__.py").symlink_to(tree / "proto" / "domsnap" / "__init__.py")
    (package / "v1").symlink_to(tree / "proto" / "domsnap" / "v1")
    (package / "agent").symlink_to(tree / "agent")
    (package / "client").symlink_to(tree / "client")
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="each guest's RAM, MiB")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    # auto takes background snapshots under TCG before QEMU 9.0; precopy is what a group holds ready.
    parser.add_argument("--live-mode", choices=("auto", "precopy", "background"), default="auto")
    parser.add_argument("--against", type=Path, help="a domsnap source tree whose agent to compare, round by round")
    args = parser.parse_args()
    kernel, ramdisk = guestprobe.guest_paths()
    started = datetime.now(UTC)
    load_before = machine()
    with tempfile.TemporaryDirectory(prefix="dsgroup-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        config = f'[qemu]\naccel = "tcg"\nlive_mode = "{args.live_mode}"\n'
        # Both agents share one state: the guests outlive an agent, and the next one re-attaches.
        agents = {"this tree": Agent(base / "agent", config_toml=config)}
        if args.against is not None:
            path = _package(args.against.resolve(), base / "against")
            agents[str(args.against)] = Agent(base / "agent", config_toml=config, wrapper=("env", f"PYTHONPATH={path}"))
        figures = {side: Pauses() for side in agents}
        first = agents["this tree"]
        first.base.mkdir()
        first.start()
        names = [f"g{i}" for i in range(args.members)]
        running = first
        try:
            for name in names:
                disk = base / f"{name}.qcow2"
                make_disk(disk, "qcow2", 32)
                cfg = base / f"{name}.cfg"
                cfg.write_text(guest_config(name, kernel, ramdisk, {"xvda": (disk, "qcow2")},
                                            base / f"{name}.serial", memory=args.size))
                first.cli("create", str(cfg), check=True)
            for name in names:
                guestprobe.wait_ready(base / f"{name}.serial", timeout=300)
            for r in range(args.repeat):
                order = list(agents) if r % 2 == 0 else list(reversed(agents))
                for side in order:
                    if agents[side] is not running:
                        running.stop()
                        running = agents[side]
                        running.start()
                    figures[side].round(running, names)
        finally:
            # Domains outlive their agent: none is left running.
            for name in names:
                running.cli("destroy", name)
            running.stop()
    sides = list(agents)
    header = "| | " + " | ".join(sides) + " |\n|---|" + "---|" * len(sides)
    rows = zip(*(figures[side].rows(args.members) for side in sides), strict=True)
    table = "\n".join(f"| {cells[0][0]} | " + " | ".join(value for _, value in cells) + " |" for cells in rows)
    ratios = "\n".join(f"- {side}: {figures[side].ratios()}" for side in sides)
    how = (f"; each round run by each agent in turn ({', '.join(sides)}; the first alternating), on the same "
           "guests" if len(sides) > 1 else "")
    text = f"""# Group snapshot pause against a single live snapshot ({started:%Y-%m-%d %H:%M} UTC)

Command: `.venv/bin/python -m bench.group_pause {shlex.join(sys.argv[1:])}`
Machine: {load_before} (at the start); {machine().rsplit(", ", 1)[-1]} at the end.
This machine is shared with other work while it runs (other engineers' tests
and guests): figures are noisy, compare only within this table.

{args.members} guests of {args.size} MiB (the test guest, idle but for its counter), one domsnapd,
live snapshots (live_mode {args.live_mode}), {args.repeat} rounds; in each round every guest is snapshotted alone,
then all at once as {args.members} independent snapshots, then all {args.members} as one group{how}.
Pause: QEMU's STOP to RESUME (the manifests' paused_at, resumed_at). Median (min-max).

{header}
{table}

Ratios of medians (goal: a group member at most 2x a single snapshot):
{ratios}
"""
    publish(f"group-pause-{started:%Y%m%dT%H%M}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
