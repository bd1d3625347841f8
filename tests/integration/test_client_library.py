"""The client library (domsnap.client) against real agents: the sync and
asyncio clients on a real guest (create with progress, revert, delete,
watch, cancel, errors with the agent's message), mutual TLS over TCP, and
fan-out across several agents, one of them stopped (SIGSTOP: connects but
never answers) and one not there at all, through the library and through
`domsnap -H a,b,... list|info|snapshot-list`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from domsnap.client import (
    AlreadyExists,
    AsyncClient,
    Busy,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TlsError,
    Unavailable,
    fan_out,
    fan_out_async,
)
from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import BIN, Agent
from tests.integration.conftest import BootGuest
from tests.tlscerts import CA

# Per-host deadline of the fan-out tests: the stopped agent must cost this, not more.
DEADLINE = 2.0
# What a run may take beyond it on a loaded 2-core machine (CLI start, connects).
SLACK = 6.0


# ------------------------------------------------------------- one agent ----


@pytest.mark.guest
def test_sync_client_on_a_real_guest(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    progress: list[pb.Progress] = []
    with Client(agent.address) as c:
        assert g.name in [d.name for d in c.list_domains()]
        assert c.get_domain(g.name).state == pb.DOMAIN_STATE_RUNNING
        assert c.info().driver == "qemu"

        snap = c.create_snapshot(g.name, name="lib1", description="from the library", on_progress=progress.append)
        assert (snap.name, snap.domain, snap.description) == ("lib1", g.name, "from the library")
        assert Path(snap.path, "snapshot.json").is_file()
        assert progress and progress[-1].percent == 100
        assert {pb.PHASE_MEMORY, pb.PHASE_DISKS} <= {p.phase for p in progress}
        assert [s.name for s in c.list_snapshots(g.name)] == ["lib1"]
        assert c.get_snapshot(g.name, "lib1").current

        # The agent's own words, as the right class.
        with pytest.raises(AlreadyExists, match="already has a snapshot named 'lib1'") as exists:
            c.create_snapshot(g.name, name="lib1")
        assert exists.value.reason == "SNAPSHOT_EXISTS" and exists.value.address == agent.address
        with pytest.raises(NotFound, match="nosuch"):
            c.create_snapshot("nosuch")
        with pytest.raises(InvalidArgument):
            c.create_snapshot(g.name, name="bad name")
        with pytest.raises(InvalidArgument, match="method"):
            c.create_snapshot(g.name, method="sideways")  # type: ignore[arg-type]

        # A second operation on a busy domain is refused at once.
        events = c.create_snapshot_events(g.name, name="lib2", method="internal")
        started = next(events)
        assert started.HasField("started")
        with pytest.raises(Busy, match=started.started.id):
            c.create_snapshot(g.name, name="lib3")
        rest = list(events)
        assert rest[-1].finished.state == pb.OPERATION_STATE_SUCCEEDED

        # Re-attach to it after the fact; a finished operation cannot be cancelled.
        watched = list(c.watch(started.started.id))
        assert watched[0].HasField("started") and watched[-1].finished.result.name == "lib2"
        assert c.wait(started.started.id).result.name == "lib2"
        with pytest.raises(FailedPrecondition, match="already succeeded"):
            c.cancel(started.started.id)
        with pytest.raises(NotFound):
            c.cancel("0000000000000000")
        assert started.started.id in [op.id for op in c.list_operations(g.name)]

        reverted = c.revert_snapshot(g.name, "lib1", run_state="running")
        assert reverted.name == "lib1" and c.get_domain(g.name).state == pb.DOMAIN_STATE_RUNNING
        done = c.delete_snapshot(g.name, "lib2")
        assert done.state == pb.OPERATION_STATE_SUCCEEDED
        assert [s.name for s in c.list_snapshots(g.name)] == ["lib1"]


@pytest.mark.guest
def test_async_client_on_a_real_guest(agent: Agent, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")

    async def run() -> tuple[list[str], pb.Snapshot, list[str]]:
        async with AsyncClient(agent.address) as c:
            names = [d.name for d in await c.list_domains()]
            kinds: list[str] = []
            async for event in c.create_snapshot_events(g.name, name="a1"):
                kinds.append(str(event.WhichOneof("event")))
            seen: list[str] = []
            snap = await c.create_snapshot(g.name, name="a2", on_progress=lambda p: seen.append(pb.Phase.Name(p.phase)))
            with pytest.raises(NotFound):
                await c.get_snapshot(g.name, "nosuch")
            with pytest.raises(AlreadyExists):
                await c.create_snapshot(g.name, name="a1")
            assert [s.name for s in await c.list_snapshots(g.name)] == ["a1", "a2"]
            assert (await c.revert_snapshot(g.name, "a1")).name == "a1"
            return names, snap, kinds + seen

    names, snap, kinds = asyncio.run(run())
    assert g.name in names and snap.name == "a2"
    assert kinds[0] == "started" and "finished" in kinds and "progress" in kinds and "PHASE_DONE" in kinds


def test_unreachable_agent(tmp_path: Path) -> None:
    with Client(f"unix:{tmp_path}/none.sock", timeout=5) as c, pytest.raises(Unavailable) as err:
        c.list_domains()
    assert err.value.message == (f"cannot reach the agent at unix:{tmp_path}/none.sock: No such file or directory. "
                                 "Is domsnapd running there (systemctl start domsnapd)? Another agent: -H ADDR or "
                                 "$DOMSNAP_HOST")
    with pytest.raises(InvalidArgument, match="is not"):
        Client("no-port")


# --------------------------------------------------- TLS and several agents ----


def _tcp_port(agent: Agent) -> int:
    found = re.findall(r"listening on .*?127\.0\.0\.1:(\d+) \(", agent.log.read_text())
    assert found
    return int(found[-1])


class Pki:
    def __init__(self, folder: Path) -> None:
        ca = CA("domsnap library test CA")
        self.ca = ca.write(folder / "ca.crt")
        self.server = ca.server(folder)
        self.admin = ca.issue(folder, "admin", "ops")
        self.reader = ca.issue(folder, "reader", "monitor")
        self.foreign = CA("other CA").issue(folder, "foreign", "ops")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("libpki"))


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Agent]:
    toml = (f'[tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
            '[roles]\nadmin = ["CN=ops"]\nread_only = ["CN=monitor"]\n')
    a = Agent(tmp_path_factory.mktemp("libtls"), config_toml=toml, extra_listen=("127.0.0.1:0",))
    a.start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def stopped_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent that accepts connections (the kernel does) but never answers: SIGSTOP."""
    a = Agent(tmp_path_factory.mktemp("libstop"))
    a.start()
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    yield a
    a.proc.send_signal(signal.SIGCONT)
    a.stop()


def test_mutual_tls(tls_agent: Agent, pki: Pki) -> None:
    target = f"127.0.0.1:{_tcp_port(tls_agent)}"
    with Client(target, ca=str(pki.ca), cert=str(pki.admin.cert), key=str(pki.admin.key)) as c:
        assert c.info().driver == "qemu" and c.list_domains() == []
    with Client(target, ca=str(pki.ca), cert=str(pki.reader.cert), key=str(pki.reader.key)) as c:
        assert c.list_snapshots() == []
        with pytest.raises(PermissionDenied, match="read-only"):
            c.create_snapshot("nosuch")
    with Client(target, ca=str(pki.ca), cert=str(pki.foreign.cert), key=str(pki.foreign.key), timeout=10) as c, \
            pytest.raises(TlsError, match="refused the client certificate"):
        c.list_domains()
    with pytest.raises(TlsError, match="--cert and --key go together"):
        Client(target, ca=str(pki.ca), cert=str(pki.admin.cert))


@pytest.fixture
def hosts(agent: Agent, tls_agent: Agent, stopped_agent: Agent, tmp_path: Path) -> dict[str, str]:
    return {"local": agent.address, "tls": f"127.0.0.1:{_tcp_port(tls_agent)}", "stopped": stopped_agent.address,
            "gone": f"unix:{tmp_path}/gone.sock"}


def test_fan_out_one_slow_and_one_dead_host(hosts: dict[str, str], pki: Pki) -> None:
    start = time.monotonic()
    results = fan_out(hosts.values(), lambda c: [d.name for d in c.list_domains()], limit=2, deadline=DEADLINE,
                      ca=str(pki.ca), cert=str(pki.admin.cert), key=str(pki.admin.key))
    elapsed = time.monotonic() - start
    assert list(results) == list(hosts.values())
    assert results[hosts["local"]].ok and isinstance(results[hosts["local"]].value, list)
    assert results[hosts["tls"]].unwrap() == []
    gone = results[hosts["gone"]].error
    assert isinstance(gone, Unavailable) and "cannot reach the agent" in gone.message
    slow = results[hosts["stopped"]]
    assert isinstance(slow.error, DeadlineExceeded) and DEADLINE * 0.9 <= slow.seconds < DEADLINE + 1
    with pytest.raises(DeadlineExceeded):
        slow.unwrap()
    # The others were not held up: their answers came well before the deadline.
    assert results[hosts["local"]].seconds < DEADLINE and results[hosts["gone"]].seconds < DEADLINE
    # limit=2: the stopped host took one slot for DEADLINE, the rest went through the other.
    assert elapsed < DEADLINE + SLACK


def test_fan_out_a_call_that_hangs_outside_grpc_does_not_hold_its_slot(hosts: dict[str, str]) -> None:
    def call(c: Client) -> str:
        if c.address.text == hosts["local"]:
            time.sleep(30)  # stuck in the caller's own code: only the deadline frees the slot
        return c.info().driver

    start = time.monotonic()
    results = fan_out([hosts["local"], hosts["gone"]], call, limit=1, deadline=DEADLINE)
    assert time.monotonic() - start < DEADLINE + SLACK
    assert isinstance(results[hosts["local"]].error, DeadlineExceeded)
    assert isinstance(results[hosts["gone"]].error, Unavailable)


def test_fan_out_async(hosts: dict[str, str], pki: Pki) -> None:
    async def call(c: AsyncClient) -> str:
        return (await c.info()).driver

    start = time.monotonic()
    results = asyncio.run(fan_out_async(hosts.values(), call, limit=4, deadline=DEADLINE, ca=str(pki.ca),
                                        cert=str(pki.admin.cert), key=str(pki.admin.key)))
    assert time.monotonic() - start < DEADLINE + SLACK
    assert results[hosts["local"]].value == results[hosts["tls"]].value == "qemu"
    assert isinstance(results[hosts["stopped"]].error, DeadlineExceeded)
    assert isinstance(results[hosts["gone"]].error, Unavailable)


def _cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOMSNAP_")}
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "domsnap"), *args], capture_output=True, text=True, timeout=120, env=env)
    return proc, time.monotonic() - start


@pytest.mark.guest
def test_cli_list_on_several_agents(hosts: dict[str, str], pki: Pki, boot_guest: BootGuest) -> None:
    g = boot_guest("qcow2")
    tls = ["--ca", str(pki.ca), "--cert", str(pki.admin.cert), "--key", str(pki.admin.key)]
    order = [hosts["local"], hosts["stopped"], hosts["tls"], hosts["gone"]]
    proc, elapsed = _cli("-H", ",".join(order), "-t", str(DEADLINE), *tls, "list")
    assert proc.returncode == 1 and elapsed < DEADLINE + SLACK
    # Grouped per agent, in the order given; failures one line each on stderr.
    groups = proc.stdout.split("\n\n")
    assert groups[0].startswith(f"{hosts['local']}:\nName ") and re.search(rf"^{g.name} ", groups[0], re.M)
    assert groups[1].splitlines() == [f"{hosts['tls']}:", groups[1].splitlines()[1]]  # header line, no domain
    errors = proc.stderr.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"domsnap: {hosts['stopped']}: ") and "within 2 s" in errors[0]
    assert errors[1] == (f"domsnap: {hosts['gone']}: cannot reach the agent at {hosts['gone']}: "
                         "No such file or directory. Is domsnapd running there (systemctl start domsnapd)? "
                         "Another agent: -H ADDR or $DOMSNAP_HOST")

    proc, elapsed = _cli("-H", ",".join(order), "-t", str(DEADLINE), *tls, "--json", "snapshot-list")
    assert proc.returncode == 1 and elapsed < DEADLINE + SLACK
    doc = json.loads(proc.stdout)
    assert list(doc) == order
    assert doc[hosts["tls"]] == {"result": []} and isinstance(doc[hosts["local"]]["result"], list)
    assert doc[hosts["stopped"]]["error"]["code"] == "DEADLINE_EXCEEDED"
    assert doc[hosts["gone"]]["error"]["code"] == "UNAVAILABLE"

    proc, _ = _cli("-H", f"{hosts['local']},{hosts['tls']}", *tls, "info")
    assert (proc.returncode, proc.stderr) == (0, "")
    local, tcp = proc.stdout.split("\n\n")
    assert local.startswith(f"{hosts['local']}:\n") and tcp.startswith(f"{hosts['tls']}:\n")
    assert re.search(r"^driver +: qemu$", local, re.M) and re.search(r"^driver +: qemu$", tcp, re.M)

    proc, _ = _cli("-H", f"{hosts['local']},{hosts['tls']}", "pause", g.name)
    assert proc.returncode == 2 and "only list, snapshot-list, info run on several" in proc.stderr
