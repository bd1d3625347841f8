"""live_mode "auto" (the default): where a pre-copy loses guest writes (TCG
before QEMU 9.0: agent/drivers/qemu_migration.py, precopy_loses_writes) a
live snapshot is a background snapshot, which write-protects guest memory
with userfaultfd(2): the QEMU that calls it is the agent's child and runs in
the agent's sandbox.

systemd is not PID 1 here, so systemd/domsnapd.service cannot run as a unit;
what it does to userfaultfd(2) is emulated: its CapabilityBoundingSet= and
NoNewPrivileges= applied by setpriv(1) to the agent (and so to its QEMUs).
The unit's other settings do not reach userfaultfd: no SystemCallFilter=
(tests/unit/test_systemd_unit.py keeps it so), and /dev is whole (no
PrivateDevices=), which QEMU 7.2 does not open anyway (it asks the syscall).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domsnap.agent.drivers import qemu_migration
from domsnap.agent.drivers.qmp import QmpSession
from domsnap.agent.errors import FailedPrecondition
from domsnap.agent.progress import ignore_progress
from domsnap.client import group
from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from tests.integration.conftest import Agent, Guest, destroy_all, own_agent, start_guest
from tests.integration.test_snapshots import Taken, revert_and_check, run_on, take, wait_tick
from tests.unit.test_systemd_unit import _settings

UNPRIVILEGED_USERFAULTFD = Path("/proc/sys/vm/unprivileged_userfaultfd")


def unit_sandbox(*, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """setpriv's argv for the unit's capability bounding set (less `without`) and its NoNewPrivileges=."""
    s = _settings()
    caps = [c for c in " ".join(s["CapabilityBoundingSet"]).split() if c not in without]
    argv = ["setpriv", "--bounding-set=-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps),
            "--inh-caps=-all"]
    if s["NoNewPrivileges"] == ["yes"]:
        argv.append("--no-new-privs")
    return (*argv, "--")


def manifest_live_mode(snap: pb.Snapshot) -> str | None:
    """How the snapshot's memory was written while the guest ran, as its manifest records it."""
    facts: dict[str, str] = json.loads((Path(snap.path) / "snapshot.json").read_text())["facts"]
    return facts.get("live_mode")


def auto_live_mode(agent: Agent, accel: str) -> str:
    """The mode live_mode "auto" takes for this agent's guests (under `accel`)."""
    version = agent.stub().GetAgentInfo(pb.GetAgentInfoRequest(), timeout=30).hypervisor_version
    return qemu_migration.live_mode_for("auto", version, accel).value


# ------------------------------------------- one QEMU, no guest OS: seconds


@contextlib.contextmanager
def bare_qemu(folder: Path, sandbox: tuple[str, ...] = ()) -> Iterator[Path]:
    """A QEMU running firmware only (nothing to boot), under `sandbox`; its QMP socket."""
    sock = folder / f"qmp-{uuid.uuid4().hex[:8]}.sock"
    proc = subprocess.Popen([*sandbox, "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "64",
                             "-display", "none", "-nodefaults", "-no-user-config",
                             "-qmp", f"unix:{sock},server=on,wait=off"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "QEMU made no QMP socket within 30 s"
            time.sleep(0.02)
        yield sock
    finally:
        proc.kill()
        proc.wait(timeout=30)


async def _held_save(sock: Path, memory: Path, *, live: bool, mode: qemu_migration.LiveMode,
                     ) -> tuple[list[str], qemu_migration.SaveResult, float]:
    """A group member's save of a running guest: each hook's run state (and, before the resume, how far
    the save got), then the run state after."""
    qmp = QmpSession(sock, "bare")
    seen: list[str] = []
    released = 0.0

    async def status() -> str:
        return str((await qmp.execute("query-status"))["status"])

    async def before_pause() -> None:
        nonlocal released
        seen.append(f"before_pause:{await status()}")
        released = time.time()

    async def in_pause() -> None:
        seen.append(f"in_pause:{await status()}")

    async def before_resume() -> None:
        saving = (await qmp.execute("query-migrate")).get("status", "none")
        seen.append(f"before_resume:{await status()}, save {saving}")

    try:
        saved = await qemu_migration.save(qmp, memory, live=live, was_running=True, in_pause=in_pause,
                                          progress=ignore_progress, mode=mode, before_pause=before_pause,
                                          before_resume=before_resume)
        for _ in range(100):
            if await status() == "running":
                break
            await asyncio.sleep(0.05)
        seen.append(f"after:{await status()}")
    finally:
        await qmp.close()
    return seen, saved, released


def test_a_held_background_save_pauses_when_its_group_says(tmp_path: Path) -> None:
    """A group's member under auto takes a background snapshot: held running
    until the group's FREEZE (before_pause), then stopped by the agent for the
    instant, held stopped until COMMIT (before_resume; the save that resumes
    it not begun), then running again on its own while memory is written."""
    with bare_qemu(tmp_path) as sock:
        seen, saved, released = asyncio.run(_held_save(sock, tmp_path / "memory.save", live=True,
                                                       mode=qemu_migration.LiveMode.BACKGROUND))
    assert seen == ["before_pause:running", "in_pause:paused", "before_resume:paused, save none", "after:running"]
    assert saved.mode is qemu_migration.LiveMode.BACKGROUND
    assert saved.stopped_at is not None and saved.resumed_at is not None
    assert released <= saved.stopped_at < saved.resumed_at
    assert saved.memory_bytes == (tmp_path / "memory.save").stat().st_size > 0


def test_a_members_precopy_image_is_complete_before_it_resumes(tmp_path: Path) -> None:
    """Pre-copy (here non-live): the image is completed in the pause, before COMMIT (before_resume), and
    the guest resumes after it."""
    with bare_qemu(tmp_path) as sock:
        seen, saved, _ = asyncio.run(_held_save(sock, tmp_path / "memory.save", live=False,
                                                mode=qemu_migration.LiveMode.PRECOPY))
    assert seen == ["before_pause:running", "in_pause:finish-migrate", "before_resume:postmigrate, save completed",
                    "after:running"]
    assert saved.memory_bytes == (tmp_path / "memory.save").stat().st_size > 0


async def _background_refused(sock: Path, memory: Path) -> FailedPrecondition:
    qmp = QmpSession(sock, "bare")

    async def in_pause() -> None:
        raise AssertionError("the guest was paused for a snapshot that cannot be taken")

    try:
        with pytest.raises(FailedPrecondition) as refused:
            await qemu_migration.save(qmp, memory, live=True, was_running=True, in_pause=in_pause,
                                      progress=ignore_progress, mode=qemu_migration.LiveMode.BACKGROUND)
        assert (await qmp.execute("query-status"))["status"] == "running"
    finally:
        await qmp.close()
    return refused.value


def test_background_snapshots_need_the_units_cap_sys_ptrace(tmp_path: Path) -> None:
    """Under the unit's capabilities QEMU 7.2 may write-protect guest memory;
    without CAP_SYS_PTRACE (the unit before live_mode auto) it may not, and a
    live create says why and how out, and leaves nothing."""
    with bare_qemu(tmp_path, unit_sandbox()) as sock:
        out = asyncio.run(_held_save(sock, tmp_path / "allowed.save", live=True,
                                     mode=qemu_migration.LiveMode.BACKGROUND))
        assert out[1].mode is qemu_migration.LiveMode.BACKGROUND
    if UNPRIVILEGED_USERFAULTFD.read_text().strip() != "0":
        pytest.skip("vm.unprivileged_userfaultfd is not 0 on this host: userfaultfd needs no capability here, "
                    "so its refusal cannot be shown")
    with bare_qemu(tmp_path, unit_sandbox(without=("CAP_SYS_PTRACE",))) as sock:
        err = asyncio.run(_background_refused(sock, tmp_path / "refused.save"))
    assert "Background-snapshot is not supported by host kernel" in err.message
    assert "CAP_SYS_PTRACE" in err.message and "without --live" in err.message
    assert err.metadata == {"domain": "bare"}
    assert not (tmp_path / "refused.save").exists()


# ------------------------------- the agent under the unit's sandbox, real guests


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory, accel: str,
              guest_image: tuple[Path, Path]) -> Iterator[tuple[Agent, Guest, Guest]]:
    """An agent with the default live_mode under the unit's capabilities, and
    two 2-vCPU guests (pre-copy's lost writes broke 2-vCPU guests)."""
    if accel != "tcg":
        pytest.skip(f"under {accel} pre-copy tracks every write: auto takes pre-copy, which other tests cover")
    with own_agent(tmp_path_factory.mktemp("sandboxed"), accel, wrapper=unit_sandbox()) as a:
        version = a.stub().GetAgentInfo(pb.GetAgentInfoRequest(), timeout=30).hypervisor_version
        if not qemu_migration.precopy_loses_writes(version, accel):
            pytest.skip(f"{version}'s pre-copy under TCG tracks every write: auto takes pre-copy there")
        folder = tmp_path_factory.mktemp("live-mode-guests")
        guests = [start_guest(a, guest_image, folder, "qcow2", vcpus=2, wait=False) for _ in range(2)]
        for g in guests:
            guestprobe.wait_ready(g.serial, timeout=120)
            guestprobe.wait_disk_ok(g.serial, "vda", timeout=60)
        yield a, guests[0], guests[1]
        destroy_all(a, guests)


def _sandbox_of(agent: Agent, g: Guest) -> dict[str, str]:
    """The capability bounding set and no_new_privs of the domain's QEMU."""
    pid = (agent.state_dir / "qemu" / g.name / "qemu.pid").read_text().strip()
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return {k: status[k].strip() for k in ("CapBnd", "NoNewPrivs")}


def test_auto_takes_a_background_snapshot_under_the_unit_and_reverts_to_it(
    sandboxed: tuple[Agent, Guest, Guest],
) -> None:
    agent, g, _ = sandboxed
    # The QEMU runs in the emulated unit: CAP_SYS_PTRACE (19) and CAP_SYS_ADMIN (21) kept, CAP_SYS_MODULE (16) not.
    sandbox = _sandbox_of(agent, g)
    caps = int(sandbox["CapBnd"], 16)
    assert (caps >> 19 & 1, caps >> 21 & 1, caps >> 16 & 1, sandbox["NoNewPrivs"]) == (1, 1, 0, "1"), sandbox
    name = f"auto-{uuid.uuid4().hex[:6]}"
    t = take(g, name, live=True)
    assert manifest_live_mode(t.snap) == "background"
    run_on(g)
    revert_and_check(g, t)


def test_a_live_group_under_auto_is_background_snapshots_at_one_instant(
    sandboxed: tuple[Agent, Guest, Guest],
) -> None:
    """Held saves need no pre-copy: each member stops at the group's FREEZE
    and resumes after its COMMIT, so the pauses overlap."""
    agent, first, second = sandboxed
    members = tuple(group.Member(g.name, agent.address) for g in (first, second))
    name = f"g-auto-{uuid.uuid4().hex[:4]}"
    wait_tick(first)
    before = first.counter()
    messages: list[str] = []
    snaps = group.create(name, members, live=True, on_progress=lambda m, word, p: messages.append(p.message))
    after = first.counter()
    assert {manifest_live_mode(s) for s in snaps.values()} == {"background"}
    # The operation says how, and why.
    said = [m for m in messages if m.startswith("memory: live, background snapshot")]
    assert len(said) == 2 and all("live_mode auto: a pre-copy by QEMU" in m for m in said), messages
    manifests = [json.loads((Path(s.path) / "snapshot.json").read_text()) for s in snaps.values()]
    paused, resumed = [m["paused_at"] for m in manifests], [m["resumed_at"] for m in manifests]
    assert 0 < max(paused) < min(resumed), f"pause intervals do not overlap: paused {paused}, resumed {resumed}"
    mine = next(s for m, s in snaps.items() if m.domain == first.name)
    run_on(first)
    revert_and_check(first, Taken(mine, before, after), do=lambda: group.revert(name, members))
