"""A snapshot's frozen layers stay frozen, through the `domsnap` CLI and a
real agent and guest: a domain re-created on the image an external snapshot
froze is refused (or, with --force, started on a fresh overlay), and a revert
onto a layer written behind the agent's back is refused as a named risk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed import guestprobe
from tests.integration.conftest import Agent, BootGuest
from tests.integration.test_snapshots import EXTERNAL, _cli_refused, revert_and_check, take

pytestmark = [pytest.mark.guest]


def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@pytest.mark.slow
def test_recreated_domain_never_writes_a_frozen_layer(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    base = g.disks["xvda"][0]
    cfg = g.folder / "guest.cfg"
    taken = take(g, "ext1", method=EXTERNAL)
    overlay = Path(taken.snap.path) / "xvda.qcow2"
    frozen = _fingerprint(base)

    # Case 1 of the issue: destroy, then create from the original file.
    agent.cli("destroy", g.name, check=True)
    line = _cli_refused(agent, "create", str(cfg))
    assert f"{base} is the frozen layer of snapshot ext1 of domain {g.name}" in line, line
    assert str(overlay) in line and f"domsnap snapshot-revert {g.name} ext1" in line and "--force" in line, line
    assert agent.cli("list", g.name).returncode == 1, "a refused create left a domain behind"
    assert _fingerprint(base) == frozen

    # --force: the domain starts afresh on a new overlay; the layer is not written.
    offset = g.mark()
    agent.cli("create", str(cfg), "--force", check=True)
    fresh = Path(taken.snap.path) / "xvda.r1.qcow2"
    assert agent.cli("list", "-l", g.name, check=True).stdout.count(str(fresh)) == 1
    guestprobe.wait_disk_ok(g.serial, "vda", timeout=60, offset=offset)
    # Past the snapshot's counter, so that the revert shows as a step back.
    guestprobe.wait_counter_above(g.serial, taken.c_after + 20, timeout=60)
    assert _fingerprint(base) == frozen

    # The snapshot is intact: the revert is exact, RAM and disk of one instant.
    revert_and_check(g, taken, do=lambda: agent.cli("snapshot-revert", g.name, "ext1", check=True))
    assert _fingerprint(base) == frozen

    # A write the agent could not see (a hand-run tool, a plain `xl create`):
    # the revert names the changed layer and touches nothing without --force.
    agent.cli("destroy", g.name, check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512", str(base)], check=True,
                   capture_output=True, timeout=60)
    line = _cli_refused(agent, "snapshot-revert", g.name, "ext1")
    assert f"disk xvda's frozen layer {base} was written since the snapshot" in line, line
    assert "--force" in line, line
    assert agent.cli("list", g.name).returncode == 1
    assert os.path.exists(overlay)
