"""The core's failure paths in seconds, without a guest: the agent's service
over a fake hypervisor (tests/unit/fake_hypervisor.py) and the real storage
backends on tiny qcow2 and raw files, failing or killed at every journaled
step of create, revert and delete, then recovered. The same matrix as the guest-based
tests/integration/test_recovery.py, whose guests prove what this cannot (a
real QEMU's memory and disks at one instant); here a kill is a real SIGKILL
of a forked agent, and what it left is recovered by a fresh one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import config as agent_config
from domsnap.agent import convert, runner, snapshot_create
from domsnap.agent.errors import Busy, CommandError, FailedPrecondition
from domsnap.agent.journal import FAIL_ENV, KILL_ENV
from domsnap.agent.operations import Operation, OpState
from domsnap.agent.progress import Phase
from domsnap.agent.runner import CommandResult, Runner
from domsnap.agent.service import AgentService
from domsnap.agent.snapshot_create import CreateRequest, parse_request
from domsnap.agent.snapshot_revert import RevertRequest, RunAfter
from domsnap.agent.storage import Backends
from domsnap.agent.storage.base import Method
from domsnap.v1 import domsnap_pb2 as pb
from tests.unit.fake_hypervisor import FakeHypervisor

CREATE_STEPS = ["mkdir", "checkpoint", "disk:xvda", "disk:xvdb", "copy:xvda", "copy:xvdb", "manifest", "register"]
REVERT_STEPS = ["destroy", "disk:xvda", "disk:xvdb", "restore", "restored"]
DELETE_STEPS = ["unregister", "disks", "merge", "files"]
DOMAIN = "core"
# Two modes, as in test_recovery.py: qcow2 internal (a tag) and, live, external (an overlay); raw is a copy.
MODES = [(False, None), (True, Method.EXTERNAL)]
# One operation, as a test runs it on an agent.
Call = Callable[[AgentService], Coroutine[Any, Any, Operation]]


def qemu_io(image: Path, fmt: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(image)], capture_output=True, text=True,
                          check=True, timeout=30)


def tags(image: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, text=True,
                         check=True, timeout=30)
    return [s["name"] for s in json.loads(out.stdout).get("snapshots", [])]


@dataclass
class Host:
    """One machine: a hypervisor's domains, the agent's state, the disks."""

    base: Path

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    def service(self, *, fault_injection: bool = False, fail: frozenset[str] = frozenset(),
                driver: FakeHypervisor | None = None, run: Runner = runner.run) -> AgentService:
        config = agent_config.AgentConfig(state_dir=self.state_dir, snapshot_root=self.base / "snapshots",
                                          testing=agent_config.TestingConfig(fault_injection=fault_injection))
        return AgentService(config, driver or FakeHypervisor(self.base / "hypervisor.json", set(fail)),
                            Backends(run=run), convert.snapshot_listing)

    def snapdir(self, name: str) -> Path:
        return self.base / "snapshots" / DOMAIN / name

    def disk(self, vdev: str) -> Path:
        return self.base / {"xvda": "xvda.qcow2", "xvdb": "xvdb.raw"}[vdev]

    def journal(self) -> list[Path]:
        return sorted((self.state_dir / "journal").glob("*.json"))

    def write(self, pattern: int) -> None:
        """The guest writes: the same byte over the start of both disks, through
        whatever image each is on now."""
        for d in self.domain()["disks"]:
            qemu_io(Path(d["target"]), d["format"], f"write -q -P {pattern} 0 64k")

    def holds(self, pattern: int) -> bool:
        try:
            for d in self.domain()["disks"]:
                qemu_io(Path(d["target"]), d["format"], f"read -q -P {pattern} 0 64k")
        except subprocess.CalledProcessError:
            return False
        return True

    def domain(self) -> dict[str, Any]:
        d = asyncio.run(self.service().get_domain(DOMAIN))
        return {"state": str(d.state), "disks": [{"target": x.target, "format": x.format} for x in d.config.disks]}


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(h.disk("xvda")), "1M"], check=True)
    with open(h.disk("xvdb"), "wb") as f:
        f.truncate(1 << 20)
    cfg = (f'name = "{DOMAIN}"\nmemory = 64\n'
           f"disk = [ 'format=qcow2, vdev=xvda, target={h.disk('xvda')}', "
           f"'format=raw, vdev=xvdb, target={h.disk('xvdb')}' ]\n")
    asyncio.run(h.service().create_domain(cfg, (), paused=False))
    h.write(1)
    return h


async def finished(op: Operation) -> Operation:
    async for _ in op.watch():
        pass
    await op.ended()
    return op


def create_request(name: str, live: bool = False, method: Method | None = None) -> CreateRequest:
    return parse_request(DOMAIN, name=name, live=live, method=method, path="", description="", cfg_text="",
                         overrides=())


def create(name: str, live: bool = False, method: Method | None = None) -> Call:
    async def call(service: AgentService) -> Operation:
        return await finished(await service.create_snapshot(create_request(name, live, method), ""))

    return call


def revert(name: str, *, force: bool = False) -> Call:
    async def call(service: AgentService) -> Operation:
        req = RevertRequest(DOMAIN, name, RunAfter.SNAPSHOT, force)
        return await finished(await service.revert_snapshot(req, ""))

    return call


def delete(name: str, *, children: bool = False) -> Call:
    async def call(service: AgentService) -> Operation:
        return await finished(await service.delete_snapshot(DOMAIN, name, children, ""))

    return call


def succeeds(host: Host, call: Call, service: AgentService | None = None) -> None:
    op = asyncio.run(call(service or host.service()))
    assert op.state is OpState.SUCCEEDED, op.error


def killed_at(host: Host, step: str, call: Call) -> None:
    """Run `call` in a forked agent that SIGKILLs itself right after journaling
    `step`; then a fresh agent recovers what it left."""
    pid = os.fork()
    if pid == 0:  # the agent that dies: nothing of pytest's runs in it
        try:
            os.environ[KILL_ENV] = step
            asyncio.run(call(host.service(fault_injection=True)))
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the agent did not die at {step}"
    assert host.journal(), f"{step}: the dead agent left no journal entry"
    assert asyncio.run(host.service().recover()) == 1


def failing_at(host: Host, step: str, times: int, monkeypatch: pytest.MonkeyPatch) -> AgentService:
    """An agent whose journal fails `step` (right after journaling it) the first `times` times."""
    monkeypatch.setenv(FAIL_ENV, f"{step}:{times}")
    return host.service(fault_injection=True)


def failed(op: Operation, because: str = "injected") -> bool:
    return op.state is OpState.FAILED and op.error is not None and because in op.error.message


def snapshots(service: AgentService) -> list[pb.Snapshot]:
    page = asyncio.run(service.list_snapshots(DOMAIN))
    return [pb.Snapshot.FromString(s.listing) for s in page.snapshots]


def listed(host: Host) -> list[str]:
    return [s.name for s in snapshots(host.service())]


def assert_no_trace(host: Host, name: str, disks_before: list[dict[str, str]]) -> None:
    assert name not in listed(host)
    assert not host.snapdir(name).exists(), f"{sorted(os.listdir(host.snapdir(name)))} left behind"
    assert name not in tags(host.disk("xvda")), "qcow2 tag left behind"
    assert host.domain()["disks"] == disks_before, "the domain did not go back to its own disks"


# ------------------------------------------------------------------ create


@pytest.mark.parametrize(("live", "method"), MODES)
@pytest.mark.parametrize("step", CREATE_STEPS)
def test_create_killed_at_every_step(host: Host, step: str, live: bool, method: Method | None) -> None:
    before = host.domain()
    killed_at(host, f"create:{step}", create("k", live, method))
    if step == "register":  # the manifest was written: the snapshot is complete and kept
        assert listed(host) == ["k"]
        assert (host.snapdir("k") / "snapshot.json").is_file()
        entry = asyncio.run(host.service().get_snapshot(DOMAIN, "k"))
        assert entry.current and Path(entry.manifest.memory_file).is_file()
    else:  # rolled back: no trace anywhere
        assert_no_trace(host, "k", before["disks"])
    assert host.domain()["state"] == "running"
    assert not host.journal(), "journal entry left behind"
    assert host.holds(1), "the disks' content changed"


def test_create_killed_after_it_answered_is_kept(host: Host) -> None:
    """The registration is made durable after the answer (step "registered"):
    killed there, the dead agent's journal entry has the next one register
    the snapshot again, as the dead one had told."""
    killed_at(host, "create:registered", create("k"))
    assert listed(host) == ["k"]
    assert asyncio.run(host.service().get_snapshot(DOMAIN, "k")).current
    assert host.domain()["state"] == "running"
    assert not host.journal(), "journal entry left behind"


def test_the_next_operation_starts_once_the_last_one_is_registered_durably(host: Host,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete asked for as soon as a create answered starts its first step
    only once the create's registration is durable and its journal entry
    gone: an entry left behind would have the next agent register again a
    snapshot deleted since."""
    durable = threading.Event()
    monkeypatch.setattr(snapshot_create, "make_durable", lambda paths: durable.wait(30))

    async def scenario() -> Operation:
        service = host.service()
        made = await service.create_snapshot(create_request("quick"), "")
        async for _ in made.watch():
            pass
        assert made.state is OpState.SUCCEEDED and len(host.journal()) == 1
        gone = await service.delete_snapshot(DOMAIN, "quick", False, "")
        await asyncio.sleep(0.2)
        assert gone.progress.phase is Phase.PENDING and len(host.journal()) == 1, "the delete did not wait"
        durable.set()
        return await finished(gone)

    assert asyncio.run(scenario()).state is OpState.SUCCEEDED
    assert listed(host) == [] and not host.journal()


def test_create_whose_image_cannot_be_synced_rolls_back_its_ledger_too(host: Host,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger is recorded while the image syncs: a create failing there forgets it."""
    before = host.domain()

    def no_sync(paths: object) -> None:
        time.sleep(0.2)  # the ledger recorded meanwhile
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(snapshot_create, "sync_data", no_sync)
    op = asyncio.run(create("k")(host.service()))
    assert op.state is OpState.FAILED
    assert_no_trace(host, "k", before["disks"])
    assert not (host.state_dir / "ledger" / DOMAIN / "k.json").exists(), "ledger record left behind"
    assert not host.journal()


@pytest.mark.parametrize(("live", "method"), MODES)
@pytest.mark.parametrize("step", CREATE_STEPS[:-1])
def test_create_failing_at_every_step_rolls_back(host: Host, step: str, live: bool, method: Method | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = host.domain()
    op = asyncio.run(create("f", live, method)(failing_at(host, f"create:{step}", 1, monkeypatch)))
    assert failed(op, "fault injection")
    assert_no_trace(host, "f", before["disks"])
    assert host.domain()["state"] == "running" and not host.journal()
    # Nothing of it is in the way of the same snapshot, taken again.
    succeeds(host, create("f", live, method))
    assert listed(host) == ["f"]


@pytest.mark.parametrize("fail", ["checkpoint", "block:internal_snapshot", "block:external_snapshot"])
def test_create_with_a_failing_hypervisor_rolls_back(host: Host, fail: str) -> None:
    before = host.domain()
    method = Method.EXTERNAL if fail == "block:external_snapshot" else None
    op = asyncio.run(create("h", method=method)(host.service(fail=frozenset({fail}))))
    assert failed(op)
    assert_no_trace(host, "h", before["disks"])
    assert host.domain()["state"] == "running" and not host.journal()


def failing(*words: str) -> Runner:
    """The real runner, except that a command with all of `words` in its argv fails as the tool would."""

    async def run(argv: Sequence[str], *, timeout: float, check: bool = True,
                  on_stderr_line: Callable[[str], None] | None = None) -> CommandResult:
        if all(w in argv for w in words):
            raise CommandError(argv, 1, "", "injected failure")
        return await runner.run(argv, timeout=timeout, check=check, on_stderr_line=on_stderr_line)

    return run


def test_create_whose_storage_fails_in_planning_touches_nothing(host: Host) -> None:
    before = host.domain()
    with pytest.raises(CommandError):
        # An external snapshot plans on the backing chain qemu-img reads (an internal one reads its table itself).
        asyncio.run(create("p", method=Method.EXTERNAL)(host.service(run=failing("qemu-img", "info"))))
    assert_no_trace(host, "p", before["disks"])
    assert host.domain()["state"] == "running" and not host.journal()


# ------------------------------------------------------------------ revert


@pytest.mark.parametrize(("live", "method"), MODES)
@pytest.mark.parametrize("step", REVERT_STEPS)
def test_revert_killed_at_every_step(host: Host, step: str, live: bool, method: Method | None) -> None:
    """Past its point of no return a revert is finished by the next agent."""
    succeeds(host, create("base", live, method))
    host.write(2)
    killed_at(host, f"revert:{step}", revert("base"))
    assert host.domain()["state"] == "running"
    assert host.holds(1), f"{step}: the disks did not go back to the snapshot's content"
    assert asyncio.run(host.service().get_snapshot(DOMAIN, "base")).current
    assert not host.journal()


@pytest.mark.parametrize("step", REVERT_STEPS)
def test_revert_failing_once_at_a_step_is_done_again_at_once(host: Host, step: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    succeeds(host, create("base"))
    host.write(2)
    succeeds(host, revert("base"), failing_at(host, f"revert:{step}", 1, monkeypatch))
    assert host.domain()["state"] == "running" and host.holds(1) and not host.journal()


def test_revert_failing_twice_strands_the_domain_until_it_is_reverted_again(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    succeeds(host, create("base"))
    succeeds(host, create("other"))
    host.write(2)
    service = failing_at(host, "revert:restore", 2, monkeypatch)

    async def scenario() -> None:
        assert failed(await revert("base")(service), "it was tried twice")
        assert host.journal(), "a stranded revert keeps its journal entry"
        (gone,) = await service.list_domains()
        assert gone.state.value == "shutdown" and "the revert to base failed" in service.problem(DOMAIN)
        with pytest.raises(FailedPrecondition, match="finishes that first") as stranded:
            await revert("other")(service)
        assert (stranded.value.reason, stranded.value.metadata) == (
            "DOMAIN_STRANDED", {"domain": DOMAIN, "snapshot": "base"})
        # The same revert, asked again, finishes it (the journal's injected failures are used up).
        assert (await revert("base")(service)).state is OpState.SUCCEEDED

    asyncio.run(scenario())
    assert host.domain()["state"] == "running" and host.holds(1) and not host.journal()


def recovered_after_failing_twice(host: Host, failing_service: AgentService) -> None:
    """A revert that failed twice, stranded, then finished by the next agent's recovery."""
    assert failed(asyncio.run(revert("base")(failing_service)), "it was tried twice")
    assert host.journal()
    assert asyncio.run(host.service().recover()) == 1
    assert host.domain()["state"] == "running" and host.holds(1) and not host.journal()


@pytest.mark.parametrize(("method", "words"), [(None, ("snapshot", "-a")), (Method.EXTERNAL, ("create", "-b"))])
def test_revert_whose_storage_fails_is_finished_by_the_next_agent(host: Host, method: Method | None,
                                                                  words: tuple[str, ...]) -> None:
    succeeds(host, create("base", method=method))
    host.write(2)
    recovered_after_failing_twice(host, host.service(run=failing("qemu-img", *words)))


def test_revert_whose_restore_fails_is_finished_by_the_next_agent(host: Host) -> None:
    succeeds(host, create("base"))
    host.write(2)
    recovered_after_failing_twice(host, host.service(fail=frozenset({"restore"})))


# ------------------------------------------------------------------ delete


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_delete_killed_at_every_step(host: Host, step: str) -> None:
    """Finished by the next agent; the snapshot it did not delete stays intact and revertable."""
    succeeds(host, create("keep"))
    succeeds(host, create("gone"))
    host.write(2)
    killed_at(host, f"delete:{step}", delete("gone"))
    assert listed(host) == ["keep"]
    assert tags(host.disk("xvda")) == ["keep"]
    assert not host.snapdir("gone").exists()
    assert not host.journal()
    succeeds(host, revert("keep"))
    assert host.holds(1)


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_delete_failing_once_at_a_step_is_done_again_at_once(host: Host, step: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    succeeds(host, create("keep"))
    succeeds(host, create("gone"))
    succeeds(host, delete("gone"), failing_at(host, f"delete:{step}", 1, monkeypatch))
    assert listed(host) == ["keep"] and tags(host.disk("xvda")) == ["keep"]
    assert not host.snapdir("gone").exists() and not host.journal()


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_delete_failing_twice_is_finished_by_the_next_agent(host: Host, step: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    succeeds(host, create("keep"))
    succeeds(host, create("gone"))
    op = asyncio.run(delete("gone")(failing_at(host, f"delete:{step}", 2, monkeypatch)))
    assert failed(op, "failed half-way, twice")
    assert host.journal(), "a delete past its point of no return is left for recovery to finish"
    assert asyncio.run(host.service().recover()) == 1
    assert listed(host) == ["keep"] and tags(host.disk("xvda")) == ["keep"]
    assert not host.snapdir("gone").exists() and not host.journal()


# -------------------------------------------------------------- operations


def test_one_operation_per_domain_and_a_cancel_rolls_back(host: Host) -> None:
    before = host.domain()
    fake = FakeHypervisor(host.base / "hypervisor.json", gate=asyncio.Event())

    async def scenario() -> Operation:
        service = host.service(driver=fake)
        op = await service.create_snapshot(create_request("held"), "")
        await fake.at_gate.wait()
        with pytest.raises(Busy, match="busy with operation") as busy:
            await service.create_snapshot(create_request("other"), "")
        assert (busy.value.reason, busy.value.metadata) == ("DOMAIN_BUSY", {"domain": DOMAIN, "operation_id": op.id})
        with pytest.raises(Busy):
            await service.delete_snapshot(DOMAIN, "held", False, "")
        service.operations.cancel(op.id)
        return await finished(op)

    op = asyncio.run(scenario())
    assert op.state is OpState.CANCELLED
    assert_no_trace(host, "held", before["disks"])
    assert host.domain()["state"] == "running" and not host.journal()


# --------------------------------------------------------------- catalogue


def test_the_tree_follows_creates_reverts_and_deletes(host: Host) -> None:
    """Each snapshot's parent is the one the domain's state descended from;
    a deleted snapshot's children get its parent; --children takes descendants."""
    service = host.service()

    def parents() -> dict[str, str]:
        return {s.name: s.parent for s in snapshots(service)}

    for step in (create("a"), create("b"), revert("a"), create("c"), create("d")):
        succeeds(host, step)
    assert parents() == {"a": "", "b": "a", "c": "a", "d": "c"}
    assert asyncio.run(service.get_snapshot(DOMAIN, "d")).current
    succeeds(host, delete("a"))
    assert parents() == {"b": "", "c": "", "d": "c"}
    succeeds(host, delete("c", children=True))
    assert parents() == {"b": ""}
    assert tags(host.disk("xvda")) == ["b"], "the deleted snapshots' tags went with them"
    assert sorted(p.name for p in (host.base / "snapshots" / DOMAIN).iterdir()) == ["b"]
    succeeds(host, revert("b"))
    assert host.holds(1) and host.domain()["state"] == "running" and not host.journal()
