"""The schedule's service (systemd/domsnap-snapshot@.service) run as its
timer would, several times in a row, against a real agent
and a real guest: each run snapshots and prunes, and the prune keeps exactly
the newest DOMSNAP_KEEP snapshots of that schedule, never one taken by hand
or by another schedule.

The ExecStart= lines are read from the unit and expanded as systemd does
(`%i` the instance, `${VAR}` one word, `$VAR` split at blanks, Environment=
from the unit, then a drop-in's): systemd itself does not run as PID 1 in
this container; `systemd-analyze verify` checks the units (tests/unit/test_schedule_units.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent
from tests.integration.conftest import BootGuest

pytestmark = [pytest.mark.guest]

SERVICE = Path(__file__).resolve().parents[2] / "systemd" / "domsnap-snapshot@.service"
INSTALLED = "/usr/local/bin/domsnap"
SCHEDULE = "domsnap.dev/schedule"


def unit_settings(text: str) -> list[tuple[str, str]]:
    lines = [line for line in text.splitlines() if line and not line.startswith(("#", ";", "["))]
    return [(key.strip(), value.strip()) for key, _, value in (line.partition("=") for line in lines)]


def service_commands(instance: str, drop_in: str) -> list[list[str]]:
    """The service's ExecStart= argvs, as systemd would run them with the drop-in."""
    settings = unit_settings(SERVICE.read_text()) + unit_settings(drop_in)
    env: dict[str, str] = {}
    for key, value in settings:
        if key == "Environment":
            env.update(item.partition("=")[::2] for item in shlex.split(value))
    commands = []
    for key, value in settings:
        if key != "ExecStart":
            continue
        argv: list[str] = []
        for word in shlex.split(value.replace("%i", instance)):
            if re.fullmatch(r"\$[A-Z_]+", word):
                argv += env[word[1:]].split()
            else:
                argv.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word))
        assert argv[0] == INSTALLED
        commands.append([str(Path(sys.executable).parent / "domsnap"), *argv[1:]])
    return commands


def run_service(agent: Agent, instance: str, drop_in: str) -> None:
    """One start of the oneshot service: its commands in order, the first failure ends it."""
    for argv in service_commands(instance, drop_in):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DOMSNAP_HOST": agent.address})
        assert proc.returncode == 0, f"{argv[1:]}: {proc.stderr}"


def snapshots(agent: Agent, domain: str) -> list[pb.Snapshot]:
    return list(agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=domain), timeout=30).snapshots)


def test_schedule_runs_keep_the_newest_of_their_own(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    drop_in = "[Service]\nEnvironment=DOMSNAP_SCHEDULE=hourly DOMSNAP_KEEP=2\n"
    assert [argv[1:] for argv in service_commands(g.name, drop_in)] == [
        ["snapshot-create", g.name, "--label", f"{SCHEDULE}=hourly"],
        ["snapshot-prune", g.name, "--keep", "2", "--schedule", "hourly"],
    ]
    g.create_snapshot(name="by-hand")
    g.create_snapshot(name="other-schedule", labels={SCHEDULE: "daily"})
    made: list[str] = []
    for run in range(3):
        run_service(agent, g.name, drop_in)
        snaps = snapshots(agent, g.name)
        hourly = [s for s in snaps if s.labels.get(SCHEDULE) == "hourly"]
        made += [s.name for s in hourly if s.name not in made]
        assert len(made) == run + 1
        # The newest two of the schedule's, oldest first pruned.
        assert sorted(s.name for s in hourly) == sorted(made[-2:]), f"run {run}"
        assert {"by-hand", "other-schedule"} <= {s.name for s in snaps}, f"run {run}: an unmarked snapshot went"
        if run == 0:
            g.create_snapshot(name="between")
    assert "between" in {s.name for s in snapshots(agent, g.name)}
    # A prune of everything one schedule made leaves the rest.
    agent.cli("snapshot-prune", g.name, "--keep", "0", "--schedule", "hourly", check=True)
    assert sorted(s.name for s in snapshots(agent, g.name)) == ["between", "by-hand", "other-schedule"]
