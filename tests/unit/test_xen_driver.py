"""XenDriver against a fake runner that checks every xl argv and replays the
recorded Xen 4.17 output in tests/data/xen-4.17 (see its README): the files
there were reconstructed from the Xen sources; real captures from the Xen lab
are in tests/data/xen-4.17/captured/, which test_xen_captured.py reads."""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import convert, runner
from domsnap.agent.config import load
from domsnap.agent.domain import Domain, DomainConfig, RunState
from domsnap.agent.drivers import xen
from domsnap.agent.drivers.xen import XenDriver
from domsnap.agent.drivers.xen_block import XenBlockOps, dies_with_agent
from domsnap.agent.drivers.xen_config import domain_config
from domsnap.agent.drivers.xl_argv import parse_list_long
from domsnap.agent.errors import AlreadyExists, FailedPrecondition, InternalError, InvalidArgument, NotFound
from domsnap.agent.service import AgentService
from domsnap.agent.storage import Backends
from domsnap.agent.storage.base import BlockOps
from domsnap.agent.xldisk import DEFAULT_XL, XlVersion
from tests.unit.xen_fakes import FakeQmp, FakeRunner, Reply, recorded, save_stream

X = "xen-4.17/"
SINK = ("/usr/bin/python3", "-m", "domsnap.agent.drivers.xen_sink")
STREAM = save_stream()
NOT_FOUND = Reply(rc=1, stderr=recorded(X + "xl-notfound-stderr.txt"))


def driver(tmp_path: Path, run: FakeRunner) -> XenDriver:
    """A driver that asks xl everything: no libxl in-process, no stored configs (test_xen_lookup has those)."""
    return XenDriver(tmp_path / "state", run, run_dir=tmp_path / "run", sink_command=SINK,
                     lib_dir=tmp_path / "lib", domain_info=None)


def expect_lookup(run: FakeRunner, ref: str, table: str, domid: int, config: str | None = None) -> None:
    run.expect(["xl", "list", ref], Reply(recorded(X + table)))
    run.expect(["xl", "list", "-l", str(domid)], Reply(config if config is not None else
                                                       recorded(X + f"xl-list-l-{domid}.json")))


class Progress:
    def __init__(self) -> None:
        self.events: list[tuple[float, int, int, str]] = []

    def __call__(self, fraction: float, *, done: int = 0, total: int = 0, rate: float = 0.0,
                 message: str = "") -> None:
        assert rate >= 0
        self.events.append((fraction, done, total, message))


class InPause:
    """Records the order it ran in, once; optionally fails."""

    def __init__(self, run: FakeRunner, error: Exception | None = None) -> None:
        self.run = run
        self.calls: list[BlockOps] = []
        self.error = error

    async def __call__(self, block: BlockOps) -> None:
        self.calls.append(block)
        self.run.events.append("in_pause")
        if self.error is not None:
            raise self.error


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# ----------------------------------------------------------------- domains


def test_probe_and_capabilities(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "info"], Reply(recorded(X + "xl-info.txt")))
        d = driver(tmp_path, run)
        assert d.xl_version == DEFAULT_XL  # before xl info answers
        assert await d.probe() == "Xen 4.17.7"
        assert d.xl_version == XlVersion(4, 17)  # the disk-spec grammar of the host's xl
        caps = d.capabilities()
        # Stock Debian Xen has no shadow paging: no live snapshots of PV guests.
        assert "live:pv" not in caps and "live:pvh" in caps and "live:hvm" in caps and "live" in caps
        # Asked once: every create and revert names the version, and a
        # running dom0's hypervisor cannot change.
        assert await d.probe() == "Xen 4.17.7"
        run.finished()
        newer = recorded(X + "xl-info-shadow.txt").replace("xen_version            : 4.17.7", "xen_version : 4.19.1")
        assert "4.19.1" in newer
        run = FakeRunner([]).expect(["xl", "info"], Reply(newer))
        d = driver(tmp_path, run)
        await d.probe()
        assert "live:pv" in d.capabilities()
        assert d.xl_version == XlVersion(4, 19)
        run.finished()

    run_async(main)


def test_list_domains_skips_dom0(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        run.expect(["xl", "list"], Reply(recorded(X + "xl-list.txt")))
        run.expect(["xl", "list", "-l"], Reply(recorded(X + "xl-list-l.json")))
        doms = await driver(tmp_path, run).list_domains()
        assert [(d.domid, d.name, d.state, d.cpu_seconds) for d in doms] == [
            (3, "pvguest", RunState.RUNNING, 4.2), (4, "pvhguest", RunState.PAUSED, 9.8)]
        assert doms[0].config.memory_mib == 128 and [x.vdev for x in doms[0].config.disks] == ["xvda", "xvdb", "xvdc"]
        run.finished()

    run_async(main)


def test_list_domains_is_cached_briefly_and_forgotten_by_any_change(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """xl gives no events: a second ListDomains within the TTL runs no xl; one
    after another xl command, or after the TTL, asks xl again."""
    async def main() -> None:
        run = FakeRunner([])
        def listing() -> None:
            run.expect(["xl", "list"], Reply(recorded(X + "xl-list.txt")))
            run.expect(["xl", "list", "-l"], Reply(recorded(X + "xl-list-l.json")))

        listing()
        d = driver(tmp_path, run)
        first = await d.list_domains()
        assert await d.list_domains() == first
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        run.expect(["xl", "pause", "3"], Reply())
        expect_lookup(run, "3", "xl-list-3-paused.txt", 3)
        await d.pause("pvguest")
        listing()
        assert await d.list_domains() == first
        now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: now + xen.LIST_TTL + 1)
        listing()
        assert await d.list_domains() == first
        run.finished()

    run_async(main)


def test_lookup(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        dom = await driver(tmp_path, run).lookup("pvguest")
        assert (dom.domid, dom.name, dom.state) == (3, "pvguest", RunState.RUNNING)
        assert dom.config.disk("xvda").target == "/srv/domsnap/images/pvguest.qcow2"
        run.finished()

    run_async(main)


def test_a_domain_is_asked_once_until_a_command_may_change_it(tmp_path: Path) -> None:
    """A revert looks its domain up in the RPC, in the plan and before
    destroying it: xl is asked once; any other xl command forgets the answer."""
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        first = await d.lookup("pvguest")
        assert await d.lookup("pvguest") is first
        run.expect(["xl", "destroy", "3"])
        await d.destroy("pvguest")
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        assert await d.lookup("pvguest") == first
        run.finished()

    run_async(main)


def test_a_request_asks_xl_about_its_domain_once_however_slow_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        runner.start_tally()  # the request's
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        first = await d.lookup("pvguest")
        later = time.monotonic() + 30  # past LIST_TTL: xl answered slowly
        monkeypatch.setattr(time, "monotonic", lambda: later)
        assert await d.lookup("pvguest") is first
        runner.start_tally()  # another request asks again
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        await d.lookup("pvguest")
        run.finished()

    run_async(main)


@pytest.mark.parametrize(
    ("ref", "reply"),
    [("nosuch", NOT_FOUND), ("42", Reply(rc=1, stderr=recorded(X + "xl-list-notfound-domid-stderr.txt")))],
)
def test_lookup_of_a_missing_domain(tmp_path: Path, ref: str, reply: Reply) -> None:
    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "list", ref], reply)
        with pytest.raises(NotFound, match=ref):
            await driver(tmp_path, run).lookup(ref)
        run.finished()

    run_async(main)


def test_dom0_is_not_a_guest(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "list", "Domain-0"], Reply(recorded(X + "xl-list.txt")))
        with pytest.raises(NotFound, match="not a guest"):
            await driver(tmp_path, run).lookup("Domain-0")
        run.finished()

    run_async(main)


def pvguest_config() -> DomainConfig:
    return domain_config(parse_list_long(recorded(X + "xl-list-l-3.json"))[0])


def test_create_writes_a_private_config_and_runs_xl_create(tmp_path: Path) -> None:
    config = pvguest_config()
    cfg = tmp_path / "state" / "xen" / "pvguest.cfg"

    async def xl_reads_the_config(_argv: Sequence[str]) -> None:
        assert DomainConfig.parse(cfg.read_text()) == config
        assert stat.S_IMODE(cfg.stat().st_mode) == 0o600

    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "list", "pvguest"], NOT_FOUND)
        run.expect(["xl", "create", "-p", str(cfg)], Reply(action=xl_reads_the_config))
        expect_lookup(run, "pvguest", "xl-list-3-paused.txt", 3)
        dom = await driver(tmp_path, run).create(config, paused=True)
        assert dom.state is RunState.PAUSED
        run.finished()

    run_async(main)


def test_create_refuses_an_existing_name(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "list", "pvguest"], Reply(recorded(X + "xl-list-3.txt")))
        with pytest.raises(AlreadyExists):
            await driver(tmp_path, run).create(pvguest_config(), paused=False)
        run.finished()  # and no xl create

    run_async(main)


@pytest.mark.parametrize(("verb", "after", "state"), [("pause", "xl-list-3-paused.txt", RunState.PAUSED),
                                                      ("unpause", "xl-list-3.txt", RunState.RUNNING)])
def test_pause_and_unpause(tmp_path: Path, verb: str, after: str, state: RunState) -> None:
    async def main() -> None:
        run = FakeRunner([])
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        run.expect(["xl", verb, "3"])
        expect_lookup(run, "3", after, 3)
        d = driver(tmp_path, run)
        dom = await (d.pause("pvguest") if verb == "pause" else d.unpause("pvguest"))
        assert dom.state is state
        run.finished()

    run_async(main)


def test_destroy(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
        run.expect(["xl", "destroy", "3"])
        await driver(tmp_path, run).destroy("pvguest")
        run.finished()

    run_async(main)


def test_the_xl_config_of_a_domain() -> None:
    config = pvguest_config()
    s = config.settings
    assert (s["name"], s["type"], s["memory"], s["vcpus"]) == ("pvguest", "pv", "128", "1")
    assert (s["kernel"], s["ramdisk"], s["extra"]) == ("/srv/domsnap/guest/vmlinuz", "/srv/domsnap/guest/initrd.img",
                                                       "console=hvc0 quiet")
    assert (s["on_reboot"], s["on_soft_reset"]) == ("restart", "soft-reset")
    assert s["vif"] == ["mac=00:16:3e:5a:01:02,bridge=xenbr0,script=/etc/xen/scripts/vif-bridge,type=vif"]
    xvdb = config.disk("xvdb")
    assert (xvdb.target, xvdb.format, xvdb.access, xvdb.backendtype) == ("/dev/vg0/pvguest-data", "raw", "rw", "phy")
    xvdc = config.disk("xvdc")
    assert (xvdc.devtype, xvdc.format, xvdc.access) == ("cdrom", "empty", "ro")
    assert "maxmem" not in s and "maxvcpus" not in s
    # What the agent writes for xl reads back the same.
    assert DomainConfig.parse(config.to_text()) == config

    pvh = domain_config(parse_list_long(recorded(X + "xl-list-l-4.json"))[0]).settings
    assert (pvh["type"], pvh["memory"], pvh["maxmem"], pvh["vcpus"]) == ("pvh", "128", "256", "2")
    assert (pvh["tsc_mode"], pvh["on_crash"]) == ("native", "preserve")


# --------------------------------------------------------------- non-live


async def running_pvguest(d: XenDriver, run: FakeRunner) -> Domain:
    expect_lookup(run, "pvguest", "xl-list-3.txt", 3)
    return await d.lookup("pvguest")


def xl_writes_image(run: FakeRunner, memory: Path) -> Callable[[Sequence[str]], Awaitable[None]]:
    async def write(_argv: Sequence[str]) -> None:
        # The agent created the file, private, before xl opened it (xl would make it 0644).
        assert memory.exists() and memory.stat().st_size == 0
        assert stat.S_IMODE(memory.stat().st_mode) == 0o600
        memory.write_bytes(STREAM)  # xl opens with O_TRUNC: the mode stays

    return write


def test_non_live_checkpoint_of_a_running_domain(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvguest(d, run)
        memory = tmp_path / "memory.save"
        run.expect(["xl", "save", "-p", "3", str(memory)],
                   Reply(stderr=recorded(X + "xl-save-stderr.txt"), action=xl_writes_image(run, memory)))
        run.expect(["xl", "unpause", "3"])
        in_pause, progress = InPause(run), Progress()
        result = await d.checkpoint(dom, memory, live=False, in_pause=in_pause, progress=progress)
        # The disks are snapshotted after the image is complete and before the domain runs again.
        assert run.events[2:] == ["xl save", "in_pause", "xl unpause"]
        assert len(in_pause.calls) == 1 and isinstance(in_pause.calls[0], XenBlockOps)
        assert result.memory_bytes == len(STREAM) == memory.stat().st_size
        assert result.downtime >= 0
        # Progress from the recorded stderr: pages of 4 KiB, capped below 1 until the end.
        frames = [e for e in progress.events if e[3] == "memory: saving"]
        assert [(done, total) for _f, done, total, _m in frames] == [
            (2048 * k * 4096, 32768 * 4096) for k in range(1, 17)]
        assert [f for f, *_ in frames] == [min(k / 16, 0.99) for k in range(1, 17)]
        assert progress.events[-1] == (1.0, len(STREAM), len(STREAM), "memory image written")
        run.finished()

    run_async(main)


def test_non_live_checkpoint_of_a_paused_domain(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        expect_lookup(run, "pvhguest", "xl-list-4.txt", 4)
        dom = await d.lookup("pvhguest")
        assert dom.state is RunState.PAUSED
        memory = tmp_path / "memory.save"
        # The guest must run to answer the suspend request; -p pauses it again.
        run.expect(["xl", "unpause", "4"])
        run.expect(["xl", "save", "-p", "4", str(memory)], Reply(action=xl_writes_image(run, memory)))
        in_pause = InPause(run)
        await d.checkpoint(dom, memory, live=True, in_pause=in_pause, progress=Progress())
        assert run.events[2:] == ["xl unpause", "xl save", "in_pause"]  # and left paused
        run.finished()

    run_async(main)


def test_a_guest_that_does_not_answer_the_suspend_request(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        expect_lookup(run, "pvhguest", "xl-list-4.txt", 4)
        dom = await d.lookup("pvhguest")
        memory = tmp_path / "memory.save"
        run.expect(["xl", "unpause", "4"])
        run.expect(["xl", "save", "-p", "4", str(memory)],
                   Reply(rc=1, stderr=recorded(X + "xl-save-nosuspend-stderr.txt")))
        run.expect(["xl", "pause", "4"])  # xl resumed it; it was paused before
        in_pause = InPause(run)
        with pytest.raises(FailedPrecondition, match="did not answer Xen's suspend request"):
            await d.checkpoint(dom, memory, live=False, in_pause=in_pause, progress=Progress())
        assert not in_pause.calls
        assert not memory.exists()
        run.finished()

    run_async(main)


def test_a_failing_disk_snapshot_still_resumes_the_domain(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvguest(d, run)
        memory = tmp_path / "memory.save"
        run.expect(["xl", "save", "-p", "3", str(memory)], Reply(action=xl_writes_image(run, memory)))
        run.expect(["xl", "unpause", "3"])
        with pytest.raises(RuntimeError, match="disk"):
            await d.checkpoint(dom, memory, live=False, in_pause=InPause(run, RuntimeError("disk")),
                               progress=Progress())
        assert run.events[-2:] == ["in_pause", "xl unpause"]
        assert not memory.exists()
        run.finished()

    run_async(main)


# ------------------------------------------------------------------- live


def sink_says(run: FakeRunner, *lines: str, wait_release: bool = True, write: bytes = STREAM) -> Reply:
    """Plays the sink xl would start: checks the rune, writes OUT, talks on CONTROL."""

    async def act(argv: Sequence[str]) -> None:
        words = shlex.split(argv[5])
        assert words[0] == "exec" and tuple(words[1:4]) == SINK
        out, control = Path(words[4]), Path(words[5])
        assert control.name == "control.sock" and stat.S_IMODE(control.parent.stat().st_mode) == 0o700
        out.write_bytes(write)
        reader, writer = await asyncio.open_unix_connection(control)
        for line in lines:
            writer.write(line.encode() + b"\n")
        await writer.drain()
        run.events.append("sink: " + (lines[-1].split()[0] if lines else "silent"))
        if wait_release:
            run.events.append("sink: " + (await reader.readline()).decode().strip())
        writer.close()

    return Reply(action=act)


async def running_pvhguest(d: XenDriver, run: FakeRunner, info: str = "xl-info.txt") -> Domain:
    expect_lookup(run, "pvhguest", "xl-list-4-running.txt", 4)
    dom = await d.lookup("pvhguest")
    run.expect(["xl", "info"], Reply(recorded(X + info)))
    return dom


def migrate_argv(domid: int) -> list[Any]:
    return ["xl", "migrate", "-s", "", str(domid), lambda rune: rune.startswith("exec ")]


def test_live_checkpoint_sequence(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvhguest(d, run)
        memory = tmp_path / "memory.save"
        reply = sink_says(run, "progress 67108864", f"complete {len(STREAM)}")
        reply.rc, reply.stderr = 1, recorded(X + "xl-migrate-live-stderr.txt")  # xl exits 1 on this path
        run.expect(migrate_argv(4), reply)
        # Whether xl resumed it: its run state, not its config again.
        run.expect(["xl", "list", "4"], Reply(recorded(X + "xl-list-4-running.txt")))
        in_pause, progress = InPause(run), Progress()
        result = await d.checkpoint(dom, memory, live=True, in_pause=in_pause, progress=progress)
        # in_pause runs exactly once, after the sink saw the end of the stream
        # and before it is released (after which xl resumes the domain).
        assert run.events[2:] == ["xl info", "xl migrate", "sink: complete", "in_pause", "sink: release",
                                  "xl list"]
        assert len(in_pause.calls) == 1
        assert result.memory_bytes == len(STREAM) and result.downtime >= 0
        assert progress.events[0] == (0.5, 64 << 20, 128 << 20, "memory: live pre-copy")
        assert progress.events[-1] == (1.0, len(STREAM), len(STREAM), "memory image written")
        assert memory.read_bytes() == STREAM
        run.finished()

    run_async(main)


def test_live_hvm_qcow2_is_snapshotted_by_qemu_img_on_the_released_image(tmp_path: Path) -> None:
    """The Xen lab's hvm-qcow2-live: at the end of the stream libxl has the
    domain's QEMU save its devices, and QEMU releases the images then (its
    blockdev-snapshot-internal-sync was refused there: "does not support
    internal snapshots"). In the pause qemu-img snapshots the image, under
    setpriv so that it dies with the agent; QEMU is not asked."""
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        hvm = recorded(X + "xl-list-l-4.json").replace('"type": "pvh"', '"type": "hvm"').replace(
            '"format": "raw"', '"format": "qcow2"')
        expect_lookup(run, "pvhguest", "xl-list-4-running.txt", 4, hvm)
        dom = await d.lookup("pvhguest")
        run.expect(["xl", "info"], Reply(recorded(X + "xl-info.txt")))
        reply = sink_says(run, f"complete {len(STREAM)}")
        reply.rc, reply.stderr = 1, recorded(X + "xl-migrate-live-stderr.txt")
        run.expect(migrate_argv(4), reply)
        run.expect(["setpriv", "--pdeathsig", "KILL", "--",
                    "qemu-img", "snapshot", "-c", "s1", "/srv/domsnap/images/pvhguest.img"])
        run.expect(["xl", "list", "4"], Reply(recorded(X + "xl-list-4-running.txt")))

        async def in_pause(block: BlockOps) -> None:
            run.events.append("in_pause")
            await block.internal_snapshot("xvda", "s1")

        (tmp_path / "run").mkdir()
        async with FakeQmp(tmp_path / "run" / "qmp-libxl-4") as qmp:
            await d.checkpoint(dom, tmp_path / "memory.save", live=True, in_pause=in_pause, progress=Progress())
        assert run.events[-5:] == ["sink: complete", "in_pause", "setpriv --pdeathsig", "sink: release", "xl list"]
        assert qmp.connections == 0
        # A tag removed in that pause goes the same way.
        run.expect(["setpriv", "--pdeathsig", "KILL", "--",
                    "qemu-img", "snapshot", "-d", "s1", "/srv/domsnap/images/pvhguest.img"])
        await d.block_ops("pvhguest", released=True).delete_internal_snapshot("xvda", "s1")
        run.finished()

    run_async(main)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_what_runs_on_a_released_image_dies_with_the_agent(tmp_path: Path) -> None:
    """For real: a process that starts a command as the agent starts qemu-img
    in that pause (dies_with_agent, through the runner) is killed -9; the
    command dies with it, so no orphan writes the image once QEMU takes it back."""
    pidfile = tmp_path / "pid"
    command = dies_with_agent(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 120"])
    agent = subprocess.Popen([sys.executable, "-c", (
        "import asyncio; from domsnap.agent import runner; "
        f"asyncio.run(runner.run({command!r}, timeout=300))")])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline and agent.poll() is None, "the command never started"
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        assert not _gone(pid)
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 10
        while not _gone(pid):
            assert time.monotonic() < deadline, f"pid {pid} outlived the agent"
            time.sleep(0.05)
    finally:
        if agent.poll() is None:
            agent.kill()
        if pidfile.exists() and pidfile.read_text().strip() and not _gone(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), 9)


def test_live_refused_for_pv_without_shadow_paging(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvguest(d, run)
        run.expect(["xl", "info"], Reply(recorded(X + "xl-info.txt")))
        in_pause = InPause(run)
        with pytest.raises(FailedPrecondition, match="shadow paging") as err:
            await d.checkpoint(dom, tmp_path / "memory.save", live=True, in_pause=in_pause, progress=Progress())
        assert "virt_caps: pv hvm hap gnttab-v1" in str(err.value) and "non-live" in str(err.value)
        assert not in_pause.calls and not (tmp_path / "memory.save").exists()
        run.finished()  # no xl migrate was started

    run_async(main)


def test_live_logdirty_failure_is_explained(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvguest(d, run)
        run.expect(["xl", "info"], Reply(recorded(X + "xl-info-shadow.txt")))
        reply = sink_says(run, "failed xl closed the stream after 1184 bytes, while expecting a libxc record header",
                          wait_release=False, write=STREAM[:1184])
        reply.rc, reply.stderr = 1, recorded(X + "xl-migrate-pv-noshadow-stderr.txt")
        run.expect(migrate_argv(3), reply)
        memory = tmp_path / "memory.save"
        in_pause = InPause(run)
        with pytest.raises(FailedPrecondition, match=r"dirty pages.*kept running"):
            await d.checkpoint(dom, memory, live=True, in_pause=in_pause, progress=Progress())
        assert not in_pause.calls and not memory.exists()
        run.finished()

    run_async(main)


def test_live_when_xl_ends_before_the_sink_reports(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvhguest(d, run)
        run.expect(migrate_argv(4), Reply(rc=1, stderr="migration receiver stream contained unexpected data "
                                                      "instead of banner\n"))
        in_pause = InPause(run)
        with pytest.raises(InternalError, match=r"xl ended before the stream was complete.*banner"):
            await d.checkpoint(dom, tmp_path / "memory.save", live=True, in_pause=in_pause, progress=Progress())
        assert not in_pause.calls
        run.finished()

    run_async(main)


def test_live_failing_disk_snapshot_releases_the_sink(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvhguest(d, run)
        reply = sink_says(run, f"complete {len(STREAM)}")
        reply.rc, reply.stderr = 1, recorded(X + "xl-migrate-live-stderr.txt")
        run.expect(migrate_argv(4), reply)
        memory = tmp_path / "memory.save"
        with pytest.raises(RuntimeError, match="qmp"):
            await d.checkpoint(dom, memory, live=True, in_pause=InPause(run, RuntimeError("qmp")),
                               progress=Progress())
        assert run.events[-3:] == ["sink: complete", "in_pause", "sink: release"]
        assert not memory.exists()
        run.finished()

    run_async(main)


def test_live_success_needs_xl_to_say_it_resumed_the_domain(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvhguest(d, run)
        reply = sink_says(run, f"complete {len(STREAM)}")
        reply.rc, reply.stderr = 1, "** Migration failed during final handshake **\n"
        run.expect(migrate_argv(4), reply)
        with pytest.raises(InternalError, match="did not report resuming"):
            await d.checkpoint(dom, tmp_path / "memory.save", live=True, in_pause=InPause(run),
                               progress=Progress())
        run.finished()

    run_async(main)


# ----------------------------------------------------------------- restore


def image_of(tmp_path: Path, config: dict[str, Any]) -> Path:
    memory = tmp_path / "memory.save"
    memory.write_bytes(save_stream(config))
    return memory


def domid7() -> str:
    return recorded(X + "xl-list-l-3.json").replace('"domid": 3', '"domid": 7')


def expect_restored(run: FakeRunner) -> None:
    """What the driver asks after an `xl restore -p` that did not name the
    new domain: one `xl list -l` of the name (its new domid and config)."""
    run.expect(["xl", "list", "-l", "pvguest"], Reply(domid7()))


#: `xl -v restore -p` of a PV domain, captured in the Xen lab: libxc names the new domain.
RESTORED = recorded(X + "captured/xl-v-restore-pv-stderr.txt")
RESTORED_DOMID = int(RESTORED.split(", dom ")[1].split(",")[0])


def test_restore_uses_the_config_saved_in_the_image(tmp_path: Path) -> None:
    saved = parse_list_long(recorded(X + "xl-list-l-3.json"))[0].config

    async def main() -> None:
        memory = image_of(tmp_path, dict(saved))
        # The new domid from xl's own words, the config from the image: xl is not asked.
        run = FakeRunner([]).expect(["xl", "-v", "restore", "-p", str(memory)], Reply(stderr=RESTORED))
        run.expect(["xl", "unpause", str(RESTORED_DOMID)])
        progress = Progress()
        d = driver(tmp_path, run)
        dom = await d.restore(pvguest_config(), memory, facts={}, paused=False, progress=progress)
        assert (dom.domid, dom.state, dom.name) == (RESTORED_DOMID, RunState.RUNNING, "pvguest")
        assert dom.config.disks == pvguest_config().disks
        assert d.facts(dom) == {"type": "pv", "xen_version": ""}
        assert progress.events[-1][0] == 1.0
        run.finished()

    run_async(main)


def test_restore_asks_xl_when_it_did_not_name_the_domain(tmp_path: Path) -> None:
    saved = parse_list_long(recorded(X + "xl-list-l-3.json"))[0].config

    async def main() -> None:
        memory = image_of(tmp_path, dict(saved))
        run = FakeRunner([]).expect(["xl", "-v", "restore", "-p", str(memory)],
                                    Reply(stderr=recorded(X + "xl-restore-stderr.txt")))
        expect_restored(run)
        dom = await driver(tmp_path, run).restore(pvguest_config(), memory, facts={}, paused=True,
                                                  progress=Progress())
        assert (dom.domid, dom.state) == (7, RunState.PAUSED)
        run.finished()

    run_async(main)


def test_restore_with_moved_disks_writes_a_config(tmp_path: Path) -> None:
    saved = parse_list_long(recorded(X + "xl-list-l-3.json"))[0].config
    config = pvguest_config()
    moved = config.with_disks([replace(d, target="/srv/snap/pvguest/s1/xvda.r1.qcow2") if d.vdev == "xvda" else d
                               for d in config.disks])
    cfg = tmp_path / "state" / "xen" / "pvguest.cfg"

    async def check_cfg(_argv: Sequence[str]) -> None:
        assert DomainConfig.parse(cfg.read_text()).disk("xvda").target == "/srv/snap/pvguest/s1/xvda.r1.qcow2"

    async def main() -> None:
        memory = image_of(tmp_path, dict(saved))
        # xl read our config file, not the image's: what it made of it is asked.
        run = FakeRunner([]).expect(["xl", "-v", "restore", "-p", str(cfg), str(memory)],
                                    Reply(stderr=RESTORED, action=check_cfg))
        expect_restored(run)
        dom = await driver(tmp_path, run).restore(moved, memory, facts={}, paused=True, progress=Progress())
        assert dom.state is RunState.PAUSED
        run.finished()

    run_async(main)


def test_restore_refuses_what_is_not_a_save_image(tmp_path: Path) -> None:
    async def main() -> None:
        memory = tmp_path / "memory.save"
        memory.write_bytes(b"QEVM\0\0\0\3" + bytes(100))  # a QEMU migration stream
        run = FakeRunner([])
        with pytest.raises(FailedPrecondition, match="not a restorable xl save image"):
            await driver(tmp_path, run).restore(pvguest_config(), memory, facts={}, paused=True,
                                                progress=Progress())
        run.finished()

    run_async(main)


# ------------------------------------------------------------ block ops


def test_qcow2_snapshots_go_through_the_domains_qemu(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        await running_pvguest(d, run)
        (tmp_path / "run").mkdir()
        async with FakeQmp(tmp_path / "run" / "qmp-libxl-3") as qmp:
            block = d.block_ops("pvguest")
            tally = runner.start_tally()
            await block.internal_snapshot("xvda", "s1")
            await block.delete_internal_snapshot("xvda", "s0")
            # The time QEMU took counts in the operation's cost as a tool's, like xl's.
            assert [what for what, _ in tally.commands] == [
                "qmp blockdev-snapshot-internal-sync", "qmp blockdev-snapshot-delete-internal-sync"]
            assert qmp.commands == [
                {"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "xvda-qcow2", "name": "s1"},
                 "id": qmp.commands[0]["id"]},
                {"execute": "blockdev-snapshot-delete-internal-sync",
                 "arguments": {"device": "xvda-qcow2", "name": "s0"}, "id": qmp.commands[1]["id"]},
            ]
            # One connection per operation: libxl needs the socket between them.
            assert qmp.connections == 2
            with pytest.raises(FailedPrecondition, match="phy backend"):
                await block.internal_snapshot("xvdb", "s1")
            with pytest.raises(FailedPrecondition, match="external snapshots"):
                await block.external_snapshot("xvda", tmp_path / "o.qcow2", "qcow2")
            with pytest.raises(NotFound):
                await block.internal_snapshot("xvdz", "s1")
            assert qmp.connections == 2
        # Looked up again within LIST_TTL and no xl command since: xl is not asked.
        assert d.facts(await d.lookup("pvguest")) == {"type": "pv", "xen_version": ""}
        run.finished()

    run_async(main)


def test_block_ops_of_an_unknown_domain(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        driver(tmp_path, FakeRunner([])).block_ops("pvguest")


# ------------------------------------------------------- abandoned transfers


def test_abandon_transfers_waits_for_a_live_save_to_resume_its_domain(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        run.expect(["xl", "list", "pvguest"], Reply(recorded(X + "xl-list-3-suspended.txt")))
        run.expect(["xl", "list", "pvguest"], Reply(recorded(X + "xl-list-3.txt")))
        await driver(tmp_path, run).abandon_transfers("pvguest")
        run.finished()

    run_async(main)


def test_abandon_transfers_says_when_a_domain_stays_suspended(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xen, "ABANDON_WAIT", 0.0)

    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "list", "pvguest"], Reply(recorded(X + "xl-list-3-suspended.txt")))
        with pytest.raises(FailedPrecondition, match="left suspended"):
            await driver(tmp_path, run).abandon_transfers("pvguest")
        run.finished()

    run_async(main)


def test_a_domain_restarted_since_its_lookup_is_not_saved(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvguest(d, run)
        in_pause = InPause(run)
        with pytest.raises(FailedPrecondition, match="restarted"):
            await d.checkpoint(replace(dom, domid=9), tmp_path / "memory.save", live=False, in_pause=in_pause,
                               progress=Progress())
        assert not in_pause.calls
        run.finished()  # no xl save of whatever domain has id 9

    run_async(main)


def test_a_cancel_before_the_sink_connects_still_lets_xl_finish(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = driver(tmp_path, run)
        dom = await running_pvhguest(d, run)
        cancelled = asyncio.Event()

        async def late_sink(argv: Sequence[str]) -> None:
            await cancelled.wait()  # the operation is cancelled before the sink is up
            control = Path(shlex.split(argv[5])[-1])
            reader, writer = await asyncio.open_unix_connection(control)
            run.events.append("sink: " + (await reader.readline()).decode().strip())
            writer.close()

        run.expect(migrate_argv(4), Reply(rc=1, action=late_sink,
                                          stderr="migration sender: libxl_domain_suspend failed (rc=-3)\n"
                                                 "Migration failed, resuming at sender.\n"))
        in_pause = InPause(run)
        task = asyncio.create_task(d.checkpoint(dom, tmp_path / "memory.save", live=True, in_pause=in_pause,
                                                progress=Progress()))
        while "xl migrate" not in run.events:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.05)
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The sink was told to go as soon as it connected, and xl ran to its end (never killed).
        assert run.events[-1] == "sink: release"
        assert not in_pause.calls
        run.finished()

    run_async(main)


@pytest.mark.parametrize(("xen_version", "refused"), [("4.17.7", True), ("4.19.1", False)])
def test_domain_configs_are_read_with_the_hosts_xl(tmp_path: Path, xen_version: str, refused: bool) -> None:
    """`untrusted` is a Xen 4.19 disk parameter: the agent reads a config as the host's xl does."""
    info = recorded(X + "xl-info.txt").replace("xen_version            : 4.17.7", f"xen_version : {xen_version}")
    text = "name = 'g'\ndisk = ['vdev=xvda,untrusted,target=/x']\n"

    async def main() -> None:
        run = FakeRunner([]).expect(["xl", "info"], Reply(info))
        d = driver(tmp_path, run)
        await d.probe()
        created: list[DomainConfig] = []

        async def create(config: DomainConfig, *, paused: bool) -> Domain:
            created.append(config)
            return Domain(1, config, RunState.PAUSED)

        d.create = create  # type: ignore[method-assign]
        config = load(None, state_dir=tmp_path / "state", snapshot_root=tmp_path / "snapshots")
        service = AgentService(config, d, Backends(run=run), convert.snapshot_listing)
        if refused:
            with pytest.raises(InvalidArgument, match=r"'untrusted' needs Xen 4\.19 or later \(xl here is 4\.17\)"):
                await service.create_domain(text, (), paused=True)
        else:
            await service.create_domain(text, (), paused=True)
            assert created[0].disks[0].flags == {"untrusted"}
        run.finished()

    run_async(main)
