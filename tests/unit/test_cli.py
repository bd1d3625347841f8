"""The `domsnap` CLI against a fake agent over real gRPC on a unix socket.

The fake only records requests and replays canned answers; the real agent
is tested elsewhere. What is checked here is what the CLI sends and prints.
"""

from __future__ import annotations

import _thread
import io
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, message, timestamp_pb2

from domsnap.client import cli, commands, connection, progress, views
from domsnap.client.commands import Session, split_snapshot_args
from domsnap.client.exits import EXIT_BROKEN_PIPE, CliError, UsageError
from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

T0 = 1_795_000_000  # 2026-11-18, whole seconds so local times are exact


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def local(seconds: int) -> str:
    return datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


DOMAINS = [
    pb.Domain(name="Domain-0", domid=0, memory_mib=2048, vcpus=2, state=pb.DOMAIN_STATE_RUNNING,
              cpu_time=duration(12.34)),
    pb.Domain(
        name="web",
        domid=7,
        memory_mib=512,
        vcpus=1,
        state=pb.DOMAIN_STATE_PAUSED,
        cpu_time=duration(3.0),
        config='name = "web"\nmemory = 512\n',
    ),
]

SNAPSHOTS = [
    pb.Snapshot(
        name="base",
        domain="web",
        path="/snaps/web/base",
        created_at=ts(T0),
        state=pb.DOMAIN_STATE_RUNNING,
        size_bytes=512 * 1024 * 1024,
        disks=[
            pb.DiskSnapshot(
                vdev="xvda",
                format="qcow2",
                backend="qcow2",
                method=pb.SNAPSHOT_METHOD_INTERNAL,
                image="/img/web.qcow2",
                tag="base",
            )
        ],
        memory=pb.MemoryImage(path="/snaps/web/base/memory.save", size_bytes=512 * 1024 * 1024),
        driver="qemu",
        hypervisor_version="QEMU 7.2.22",
        downtime=duration(0.062),
    ),
    pb.Snapshot(name="a", domain="web", created_at=ts(T0 + 60), parent="base", state=pb.DOMAIN_STATE_PAUSED),
    pb.Snapshot(name="b", domain="web", created_at=ts(T0 + 120), parent="base", current=True),
    pb.Snapshot(name="c", domain="web", created_at=ts(T0 + 180), parent="a"),
    pb.Snapshot(name="x", domain="db", created_at=ts(T0 + 240), size_bytes=1536),
]

CREATED = pb.Snapshot(name="s1", domain="web", path="/snaps/web/s1", downtime=duration(0.062))


def operation(state: int = pb.OPERATION_STATE_RUNNING, **fields: object) -> pb.Operation:
    op = pb.Operation(
        id="op-1",
        kind=pb.OPERATION_KIND_CREATE_SNAPSHOT,
        domain="web",
        snapshot="s1",
        state=state,  # type: ignore[arg-type]
        started_at=ts(T0),
    )
    for name, value in fields.items():
        if isinstance(value, message.Message):
            getattr(op, name).CopyFrom(value)
        else:
            setattr(op, name, value)
    return op


def progress_event(phase: str, percent: float, msg: str = "", done: int = 0, total: int = 0) -> pb.OperationEvent:
    return pb.OperationEvent(
        progress=pb.Progress(
            phase=pb.Phase.Value(f"PHASE_{phase.upper()}"),
            percent=percent,
            message=msg,
            bytes_done=done,
            bytes_total=total,
            bytes_per_second=100 * 1024 * 1024 if total else 0,
        )
    )


def create_events() -> list[pb.OperationEvent]:
    return [
        pb.OperationEvent(started=operation()),
        progress_event("validate", 0, "checking disks"),
        progress_event("memory", 10.2, "saving memory", 64 << 20, 512 << 20),
        progress_event("memory", 10.4, "saving memory", 65 << 20, 512 << 20),
        progress_event("disks", 90, "xvda"),
        pb.OperationEvent(finished=operation(pb.OPERATION_STATE_SUCCEEDED, finished_at=ts(T0 + 2.5), result=CREATED)),
    ]


@dataclass
class FakeAgent(pb_grpc.SnapshotAgentServicer):
    """Records every request; answers from the fields below."""

    requests: list[tuple[str, message.Message]] = field(default_factory=list)
    # method name -> the status it fails with
    fail: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    events: list[pb.OperationEvent] = field(default_factory=create_events)
    # The change feed's events (WatchEvents).
    feed: list[pb.Event] = field(default_factory=list)
    # After the events of a stream: end it with this status (a failed operation).
    stream_status: tuple[grpc.StatusCode, str] | None = None
    # After the events of a stream: run this (e.g. hang until the client leaves).
    after_events: Callable[[grpc.ServicerContext], None] | None = None
    delay: float = 0.0

    def _answer(self, method: str, request: message.Message, context: grpc.ServicerContext) -> None:
        self.requests.append((method, request))
        time.sleep(self.delay)
        if method in self.fail:
            context.abort(*self.fail[method])

    def _stream(
        self, method: str, request: message.Message, context: grpc.ServicerContext
    ) -> Iterator[pb.OperationEvent]:
        self._answer(method, request, context)
        yield from self.events
        if self.after_events is not None:
            self.after_events(context)
        if self.stream_status is not None:
            context.abort(*self.stream_status)

    def last(self, method: str) -> message.Message:
        return [r for m, r in self.requests if m == method][-1]

    def EditSnapshot(self, request: pb.EditSnapshotRequest, context: grpc.ServicerContext) -> pb.Snapshot:
        self._answer("EditSnapshot", request, context)
        return pb.Snapshot(name=request.snapshot_name, domain=request.domain_name, description=request.description)

    def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: grpc.ServicerContext) -> pb.AgentInfo:
        self._answer("GetAgentInfo", request, context)
        return pb.AgentInfo(
            agent_version="0.1.0",
            driver="qemu",
            hypervisor_version="QEMU 7.2.22",
            hostname="host1",
            snapshot_root="/var/lib/domsnap",
            capabilities=["live", "internal"],
            api_version="v1",
        )

    def ListDomains(self, request: pb.ListDomainsRequest, context: grpc.ServicerContext) -> pb.ListDomainsResponse:
        self._answer("ListDomains", request, context)
        return pb.ListDomainsResponse(domains=DOMAINS)

    def GetDomain(self, request: pb.GetDomainRequest, context: grpc.ServicerContext) -> pb.Domain:
        self._answer("GetDomain", request, context)
        for d in DOMAINS:
            if (request.domain_name, request.domid) in ((d.name, 0), ("", d.domid)):
                return d
        context.abort(grpc.StatusCode.NOT_FOUND, f"no domain {request.domain_name or request.domid}")

    def CreateDomain(self, request: pb.CreateDomainRequest, context: grpc.ServicerContext) -> pb.Domain:
        self._answer("CreateDomain", request, context)
        return DOMAINS[1]

    def DestroyDomain(self, request: pb.DestroyDomainRequest, context: grpc.ServicerContext) -> pb.Domain:
        self._answer("DestroyDomain", request, context)
        return DOMAINS[1]

    def PauseDomain(self, request: pb.PauseDomainRequest, context: grpc.ServicerContext) -> pb.Domain:
        self._answer("PauseDomain", request, context)
        return DOMAINS[1]

    def UnpauseDomain(self, request: pb.UnpauseDomainRequest, context: grpc.ServicerContext) -> pb.Domain:
        self._answer("UnpauseDomain", request, context)
        return DOMAINS[1]

    def ChangeMedium(self, request: pb.ChangeMediumRequest, context: grpc.ServicerContext) -> pb.Domain:
        self._answer("ChangeMedium", request, context)
        return DOMAINS[1]

    def CreateSnapshot(
        self, request: pb.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.OperationEvent]:
        return self._stream("CreateSnapshot", request, context)

    def RevertSnapshot(
        self, request: pb.RevertSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.OperationEvent]:
        return self._stream("RevertSnapshot", request, context)

    def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.OperationEvent]:
        return self._stream("DeleteSnapshot", request, context)

    def WatchOperation(
        self, request: pb.WatchOperationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.OperationEvent]:
        return self._stream("WatchOperation", request, context)

    def GroupSnapshot(
        self, requests: Iterator[pb.GroupSnapshotRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.GroupSnapshotEvent]:
        # The CLI's group verbs run against real agents (tests/integration/test_group.py).
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")

    def CancelOperation(self, request: pb.CancelOperationRequest, context: grpc.ServicerContext) -> pb.Operation:
        self._answer("CancelOperation", request, context)
        return operation(pb.OPERATION_STATE_CANCELLING, id=request.operation_id)

    def ListOperations(
        self, request: pb.ListOperationsRequest, context: grpc.ServicerContext
    ) -> pb.ListOperationsResponse:
        self._answer("ListOperations", request, context)
        running = operation(progress=pb.Progress(phase=pb.PHASE_MEMORY, percent=42))
        done = operation(pb.OPERATION_STATE_SUCCEEDED, id="op-0", kind=pb.OPERATION_KIND_DELETE_SNAPSHOT)
        return pb.ListOperationsResponse(operations=[running, done])

    def GetOperation(self, request: pb.GetOperationRequest, context: grpc.ServicerContext) -> pb.Operation:
        self._answer("GetOperation", request, context)
        return operation(pb.OPERATION_STATE_SUCCEEDED, id=request.operation_id)

    def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        self._answer("WatchEvents", request, context)
        yield from self.feed

    def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> pb.ListSnapshotsResponse:
        self._answer("ListSnapshots", request, context)
        return pb.ListSnapshotsResponse(snapshots=[s for s in SNAPSHOTS if request.domain_name in ("", s.domain)])

    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.Snapshot:
        self._answer("GetSnapshot", request, context)
        return SNAPSHOTS[0]


@dataclass
class Agent:
    fake: FakeAgent
    address: str

    def run(self, *args: str) -> int:
        return cli.main(["-H", self.address, *args])


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    fake = FakeAgent()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SnapshotAgentServicer_to_server(fake, server)
    address = f"unix:{tmp_path / 'agent.sock'}"
    server.add_insecure_port(address)
    server.start()
    yield Agent(fake, address)
    server.stop(grace=None)


@pytest.fixture
def cfgfile(tmp_path: Path) -> Path:
    path = tmp_path / "snap.cfg"
    path.write_text("description = 'before the upgrade'\ndisks = ['/x/y.qcow2,qcow2,xvda']\n")
    return path


def assert_one_error_line(err: str, text: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("domsnap: ")
    assert text in err
    assert "Traceback" not in err


# -------------------------------------------------------------- parsing ----


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in cli.VERB_LIST:
        assert f" {verb.name} " in out
        assert verb.help in out
    for name in (
        "list",
        "create",
        "destroy",
        "pause",
        "unpause",
        "info",
        "snapshot-create",
        "snapshot-revert",
        "snapshot-list",
        "snapshot-info",
        "snapshot-delete",
        "watch",
        "cancel",
        "operations",
    ):
        assert name in cli.VERBS


@pytest.mark.parametrize("argv", [["help", "snapshot-create"], ["snapshot-create", "--help"]])
def test_help_for_one_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert cli.VERBS["snapshot-create"].synopsis in out
    assert "--internal" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("domsnap ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frob"],
        ["help", "frob"],
        ["list", "--bogus"],
        ["destroy"],
        ["destroy", "a", "b"],
        ["snapshot-create"],
        ["snapshot-create", "web", "--internal", "--external"],
        ["snapshot-create", "web", "/a", "/b"],
        ["snapshot-create", "web", "/a", "--path", "/b"],
        ["snapshot-revert", "web", "s", "--running", "--paused"],
        ["snapshot-delete", "web"],
        ["create", "CFG", "not-a-setting"],
        ["-H", "no-port-here", "list"],
        ["-H", "host:99999", "list"],
        ["-t", "0", "list"],
        ["-t", "soon", "list"],
        ["--int", "list"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], cfgfile: Path, agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(cfgfile) if a == "CFG" else a for a in argv]
    assert cli.main(["-H", agent.address, *argv] if "-H" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert err and "Traceback" not in err
    assert not any(m.startswith(("Create", "Revert", "Delete")) for m, _ in agent.fake.requests)


@pytest.mark.parametrize(
    ("text", "target", "local"),
    [
        ("unix:/run/domsnap/domsnapd.sock", "unix:/run/domsnap/domsnapd.sock", True),
        ("unix:///run/d.sock", "unix:/run/d.sock", True),
        ("unix:rel.sock", "unix:rel.sock", True),
        ("agent.example:7600", "agent.example:7600", False),
        ("10.0.0.1:7600", "10.0.0.1:7600", False),
        ("[fd00::1]:7600", "[fd00::1]:7600", False),
        # A path is a socket: what people type after `ls /run/domsnap`.
        ("/run/d.sock", "unix:/run/d.sock", True),
    ],
)
def test_address_syntax(text: str, target: str, local: bool) -> None:
    address = connection.parse_address(text)
    assert (address.text, address.target, address.local) == (text, target, local)


@pytest.mark.parametrize("text", ["unix:", "host", "fd00::1:7600", "host:0", "host:port", ":7600"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        connection.parse_address(text)


def test_default_address_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOMSNAP_HOST", raising=False)
    assert connection.default_address() == "unix:/run/domsnap/domsnapd.sock"
    monkeypatch.setenv("DOMSNAP_HOST", "h:1")
    assert connection.default_address() == "h:1"


def test_split_snapshot_args(tmp_path: Path) -> None:
    cfg = tmp_path / "a.cfg"
    cfg.write_text("")
    parts = split_snapshot_args(["K=V", str(cfg), "./out", "X=1"])
    assert (parts.cfgfile, parts.path, parts.overrides) == (str(cfg), "./out", ["K=V", "X=1"])
    assert split_snapshot_args(["-"]).cfgfile == "-"
    assert split_snapshot_args([]) == commands.SnapshotArgs(None, None, [])
    with pytest.raises(UsageError, match="more than one <cfgfile>"):
        split_snapshot_args([str(cfg), str(cfg)])
    with pytest.raises(UsageError, match="more than one <path>"):
        split_snapshot_args(["./p1", "/p2"])
    # One meaning per spelling: a bare word is no path, a missing *.cfg no path either.
    with pytest.raises(UsageError, match=r"'foo': no such file\. For a snapshot named foo say --name foo; for a "
                                         r"new directory foo say \./foo"):
        split_snapshot_args(["foo"])
    with pytest.raises(CliError, match=r"^missing\.cfg: no such file"):
        split_snapshot_args(["missing.cfg"])
    with pytest.raises(CliError, match=r"^/etc/x/missing\.cfg: no such file"):
        split_snapshot_args(["/etc/x/missing.cfg"])
    # A directory is no cfgfile: it is taken as the (refused later) path.
    assert split_snapshot_args([str(tmp_path)]).path == str(tmp_path)


def test_paths_absolute_only_for_a_local_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local_session = Session(address=connection.parse_address("unix:/x.sock"), json=False, timeout=1)
    remote = Session(address=connection.parse_address("far:7600"), json=False, timeout=1)
    assert local_session.agent_path("snaps/s1") == str(tmp_path / "snaps/s1")
    assert remote.agent_path("snaps/s1") == "snaps/s1"
    assert local_session.snapshot_ref("s1") == "s1"
    assert local_session.snapshot_ref("./s1") == str(tmp_path / "s1")


# ------------------------------------------------------------- requests ----


def test_snapshot_create_request(agent: Agent, cfgfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["snapshot-create", "web", str(cfgfile), "--name", "s1", "--live", "--external", "out/s1"]
    assert agent.run(*argv, "memory_path=/m", "--description", "pre-upgrade") == 0
    request = agent.fake.last("CreateSnapshot")
    assert isinstance(request, pb.CreateSnapshotRequest)
    assert request.domain_name == "web"
    assert request.config == cfgfile.read_text()  # the TEXT, not the path
    assert list(request.overrides) == ["memory_path=/m"]
    assert request.path == str(tmp_path / "out/s1")
    assert (request.name, request.live, request.method) == ("s1", True, pb.SNAPSHOT_METHOD_EXTERNAL)
    assert request.description == "pre-upgrade"
    uuid.UUID(request.request_id)


def test_snapshot_create_defaults_and_overrides_alone(agent: Agent) -> None:
    assert agent.run("snapshot-create", "web", "name=s2", "--internal") == 0
    request = agent.fake.last("CreateSnapshot")
    assert isinstance(request, pb.CreateSnapshotRequest)
    assert (request.config, list(request.overrides), request.path) == ("", ["name=s2"], "")
    assert (request.name, request.live, request.method) == ("", False, pb.SNAPSHOT_METHOD_INTERNAL)
    assert agent.run("snapshot-create", "web", "--path", "/abs/p") == 0
    request = agent.fake.last("CreateSnapshot")
    assert isinstance(request, pb.CreateSnapshotRequest)
    assert (request.path, request.method) == ("/abs/p", pb.SNAPSHOT_METHOD_UNSPECIFIED)


def test_request_ids_fresh_or_given(agent: Agent) -> None:
    for verb in ("pause", "unpause", "destroy", "pause"):
        assert agent.run(verb, "web") == 0
    ids = [r.request_id for _, r in agent.fake.requests]  # type: ignore[attr-defined]
    assert len(set(ids)) == 4
    assert agent.run("--request-id", "retry-7", "snapshot-delete", "web", "s1") == 0
    # after the subcommand too
    assert agent.run("snapshot-revert", "web", "s1", "--request-id", "retry-8") == 0
    assert agent.fake.last("DeleteSnapshot").request_id == "retry-7"  # type: ignore[attr-defined]
    assert agent.fake.last("RevertSnapshot").request_id == "retry-8"  # type: ignore[attr-defined]


def test_lifecycle_requests(agent: Agent) -> None:
    for verb, method in [("destroy", "DestroyDomain"), ("pause", "PauseDomain"), ("unpause", "UnpauseDomain")]:
        assert agent.run(verb, "7") == 0
        assert agent.fake.last(method).domid == 7  # type: ignore[attr-defined]


def test_cd_insert_and_eject_change_the_medium(agent: Agent) -> None:
    assert agent.run("cd-insert", "web", "hdc", "raw:/srv/debian.iso") == 0
    request = agent.fake.last("ChangeMedium")
    assert isinstance(request, pb.ChangeMediumRequest)
    assert (request.domain_name, request.vdev, request.path) == ("web", "hdc", "/srv/debian.iso")
    assert agent.run("cd-eject", "web", "hdc") == 0
    request = agent.fake.last("ChangeMedium")
    assert (request.vdev, request.path) == ("hdc", "")  # type: ignore[attr-defined]


def test_revert_reset_nvram(agent: Agent) -> None:
    assert agent.run("snapshot-revert", "web", "s1") == 0
    assert agent.fake.last("RevertSnapshot").reset_nvram is False  # type: ignore[attr-defined]
    assert agent.run("snapshot-revert", "web", "s1", "--reset-nvram") == 0
    assert agent.fake.last("RevertSnapshot").reset_nvram is True  # type: ignore[attr-defined]


def test_create_domain_sends_text(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text('name = "web"\n')
    assert agent.run("create", str(cfg), "memory=1024", "-p") == 0
    request = agent.fake.last("CreateDomain")
    assert isinstance(request, pb.CreateDomainRequest)
    assert (request.config, list(request.overrides), request.paused) == ('name = "web"\n', ["memory=1024"], True)
    monkeypatch.setattr("sys.stdin", io.StringIO("name = 'piped'\n"))
    assert agent.run("--json", "create", "-") == 0
    assert agent.fake.last("CreateDomain").config == "name = 'piped'\n"  # type: ignore[attr-defined]
    assert json.loads(capsys.readouterr().out)["name"] == "web"


def test_create_domain_missing_file(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("create", "/nonexistent.cfg") == 1
    assert_one_error_line(capsys.readouterr().err, "cannot read /nonexistent.cfg: No such file or directory")


def test_revert_request(agent: Agent, cfgfile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    agent.fake.events[-1].finished.kind = pb.OPERATION_KIND_REVERT_SNAPSHOT
    assert agent.run("snapshot-revert", "web", "base", "--paused") == 0
    request = agent.fake.last("RevertSnapshot")
    assert isinstance(request, pb.RevertSnapshotRequest)
    assert (request.snapshot_name, request.config, request.run_state, request.force) == (
        "base",
        "",
        pb.RUN_STATE_AFTER_REVERT_PAUSED,
        False,
    )
    assert agent.run("snapshot-revert", "web", str(cfgfile), "--force") == 0
    request = agent.fake.last("RevertSnapshot")
    assert isinstance(request, pb.RevertSnapshotRequest)
    assert (request.WhichOneof("snapshot"), request.config, request.run_state, request.force) == (
        None,
        cfgfile.read_text(),
        pb.RUN_STATE_AFTER_REVERT_UNSPECIFIED,
        True,
    )
    assert agent.run("snapshot-revert", "web", "./snaps/base", "--running") == 0
    request = agent.fake.last("RevertSnapshot")
    assert isinstance(request, pb.RevertSnapshotRequest)
    assert (request.snapshot_path, request.run_state) == (str(tmp_path / "snaps/base"),
                                                          pb.RUN_STATE_AFTER_REVERT_RUNNING)


def test_delete_request(agent: Agent) -> None:
    assert agent.run("snapshot-delete", "web", "base", "--children") == 0
    request = agent.fake.last("DeleteSnapshot")
    assert isinstance(request, pb.DeleteSnapshotRequest)
    assert (request.domain_name, request.snapshot_name, request.children) == ("web", "base", True)


# --------------------------------------------------------------- output ----


def test_list_table(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Busy"]
    assert lines[1].split() == ["Domain-0", "0", "2048", "2", "r-----", "12.3", "-"]
    assert lines[2].split() == ["web", "7", "512", "1", "--p---", "3.0", "-"]
    # columns line up under their headings, as in xl
    assert lines[0].index("State") == lines[1].index("r-----")
    assert lines[0].index("Time(s)") + len("Time(s)") == lines[1].index("12.3") + len("12.3")
    assert lines[0].index("Busy") == lines[1].index("-", lines[1].index("12.3"))


def test_list_named_long_and_json(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("list", "-l", "7") == 0
    assert agent.fake.last("GetDomain").domid == 7  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert out.startswith("# web (id 7, paused)\n") and 'name = "web"\nmemory = 512\n' in out
    assert agent.run("list", "--json") == 0
    domains = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in domains] == ["Domain-0", "web"]
    # One vocabulary: the tables' words, not the enums' names.
    assert domains[0]["domid"] == 0 and domains[0]["state"] == "running"
    assert domains[1]["memory_mib"] == 512


def test_info(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("info") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "host                   : host1" in lines
    assert "capabilities           : live internal" in lines


def test_snapshot_list_table(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("snapshot-list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Domain", "Name", "Created", "State", "Size", "Parent", "Current"]
    assert lines[1].split() == ["web", "base", *local(T0).split(), "running", "512.0", "MiB", "-"]
    assert lines[1].split()[4] == time.strftime("%Z", time.localtime(T0))
    assert lines[3].split()[-2:] == ["base", "*"]
    assert lines[5].split()[-3:] == ["1.5", "KiB", "-"]
    assert agent.run("snapshot-list", "db") == 0
    assert agent.fake.last("ListSnapshots").domain_name == "db"  # type: ignore[attr-defined]
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_snapshot_list_tree(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("snapshot-list", "--tree") == 0
    shape = [re.sub(r"  \d{4}-.*", "", line) for line in capsys.readouterr().out.splitlines()]
    assert shape == ["web", "└─ base", "   ├─ a", "   │  └─ c", "   └─ b", "db", "└─ x"]


def test_snapshot_list_json(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("--json", "snapshot-list") == 0
    snaps = json.loads(capsys.readouterr().out)
    assert snaps[0]["name"] == "base" and snaps[0]["size_bytes"] == 512 * 1024 * 1024
    assert snaps[0]["created_at"].startswith("2026-")


def test_snapshot_info(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("snapshot-info", "web", "base") == 0
    out = capsys.readouterr().out
    assert "Name         : base\n" in out
    assert "Guest paused : 62 ms\n" in out
    assert "Memory       : /snaps/web/base/memory.save (512.0 MiB)\n" in out
    disk = out.split("Disks:\n")[1].splitlines()[1].split()
    assert disk == ["xvda", "qcow2", "qcow2", "internal", "/img/web.qcow2", "base"]


def test_operations_watch_cancel(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("operations", "web") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "Kind", "Domain", "Snapshot", "State", "Progress", "Started"]
    assert lines[1].split()[:7] == ["op-1", "create-snapshot", "web", "s1", "running", "42%", "memory"]
    assert lines[2].split()[:5] == ["op-0", "delete-snapshot", "web", "s1", "succeeded"]
    assert agent.run("cancel", "op-1") == 0
    assert capsys.readouterr().out == "Operation op-1 (create-snapshot web): cancelling\n"
    assert agent.run("watch", "op-1") == 0
    assert agent.fake.last("WatchOperation").operation_id == "op-1"  # type: ignore[attr-defined]
    assert capsys.readouterr().out.startswith("Snapshot s1 of web created")


def test_events_follow_the_feed_from_a_token(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.feed = [
        pb.Event(token="e-8", time=ts(T0), kind=pb.EVENT_KIND_OPERATION, domain="web", snapshot="s1",
                 operation_id="op-1", operation_state=pb.OPERATION_STATE_SUCCEEDED),
        pb.Event(token="e-9", time=ts(T0 + 1), kind=pb.EVENT_KIND_SNAPSHOT_CREATED, domain="web", snapshot="s1"),
        pb.Event(token="e-10", time=ts(T0 + 2), kind=pb.EVENT_KIND_DOMAIN_PAUSED, domain="web"),
    ]
    assert agent.run("--utc", "events", "web", "--since", "e-7", "--count", "2") == 0
    request = agent.fake.last("WatchEvents")
    assert (request.since, request.domain_name) == ("e-7", "web")  # type: ignore[attr-defined]
    assert capsys.readouterr().out.splitlines() == [
        "2026-11-18 11:06:40 UTC operation web snapshot=s1 operation=op-1 succeeded token=e-8",
        "2026-11-18 11:06:41 UTC snapshot-created web snapshot=s1 token=e-9"]
    assert agent.run("--json", "events", "--count", "1") == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "operation"


def test_events_from_a_token_the_agent_no_longer_holds(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.fail["WatchEvents"] = (grpc.StatusCode.OUT_OF_RANGE, "event token 'e-1' is older than the events "
                                      "this agent keeps: list again")
    assert agent.run("events", "--since", "e-1") != 0
    assert_one_error_line(capsys.readouterr().err, "list again")


# ------------------------------------------------------------- progress ----


def test_stream_plain_lines(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("snapshot-create", "web") == 0
    captured = capsys.readouterr()
    # Each line has its time; a phase prints once unless it lasts LINE_INTERVAL.
    lines = captured.err.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines
    assert [line[9:] for line in lines] == [
        "operation op-1: create-snapshot web s1",
        "validate 0% checking disks",
        "memory 10% saving memory",
        "disks 90% xvda",
    ]
    assert captured.out == "Snapshot s1 of web created at /snaps/web/s1 (2.5 s, guest paused 62 ms)\n"


def test_piped_progress_one_line_per_phase_or_interval() -> None:
    err = io.StringIO()
    now = [1000.0]
    lines = progress.LineRenderer(err, clock=lambda: now[0])
    for _ in range(30):  # a long phase: a line at its start, then one per LINE_INTERVAL
        lines.event(progress_event("memory", 50, "saving memory"))
        now[0] += 0.5
    lines.event(progress_event("disks", 90, "xvda"))
    shown = [line[9:] for line in err.getvalue().splitlines()]
    assert shown == ["memory 50% saving memory"] * 3 + ["disks 90% xvda"]


def test_stream_json_lines(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run("--json", "snapshot-create", "web") == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert [next(iter(e)) for e in events] == ["started", "progress", "progress", "progress", "progress", "finished"]
    assert events[0]["started"]["id"] == "op-1"
    assert events[2]["progress"]["bytes_total"] == 512 << 20
    assert events[-1]["finished"]["result"]["path"] == "/snaps/web/s1"
    assert captured.err == ""


def test_revert_and_delete_results(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    finished = agent.fake.events[-1].finished
    finished.kind = pb.OPERATION_KIND_REVERT_SNAPSHOT
    assert agent.run("snapshot-revert", "web", "s1") == 0
    # What the revert left: the state and the new domid, with the way to run it.
    assert capsys.readouterr().out == (f"Domain web reverted to snapshot s1 at /snaps/web/s1 (2.5 s); it is paused, "
                                       f"domid 7 (run it: domsnap -H {agent.address} unpause web)\n")
    finished.kind = pb.OPERATION_KIND_DELETE_SNAPSHOT
    finished.ClearField("result")
    assert agent.run("snapshot-delete", "web", "s1") == 0
    assert capsys.readouterr().out == "Snapshot s1 of web deleted (2.5 s)\n"
    finished.deleted[:] = ["c2", "c1"]
    finished.snapshot = "c1"
    assert agent.run("snapshot-delete", "web", "c1", "--children") == 0
    assert capsys.readouterr().out == "Snapshot c1 of web deleted, and its descendants c2 (2.5 s)\n"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = FakeTty()
    monkeypatch.setenv("TERM", "xterm")
    assert isinstance(progress.make_renderer(json=False, out=io.StringIO(), err=err), progress.BarRenderer)
    # No escape codes for a terminal that cannot take them.
    for term in ("dumb", ""):
        monkeypatch.setenv("TERM", term)
        assert isinstance(progress.make_renderer(json=False, out=io.StringIO(), err=err), progress.LineRenderer)
    now = [100.0]
    bar = progress.BarRenderer(err, clock=lambda: now[0], width=lambda: 200)
    events = create_events()
    bar.event(events[0])  # started: the operation's id, on its own line, above the bar
    assert err.getvalue() == "operation op-1: create-snapshot web s1\n"
    err.seek(0)
    err.truncate()
    bar.event(events[2])
    first = err.getvalue()
    # 448 MiB to go at 100 MiB/s
    assert first.startswith("\rmemory     [##------------------]   10%  64.0 MiB / 512.0 MiB  100.0 MiB/s  ETA 4.5 s  "
                            "saving")
    assert first.endswith("\x1b[K")
    now[0] += 0.05  # too soon to redraw
    bar.event(events[3])
    assert err.getvalue() == first
    now[0] += 0.06
    bar.event(events[4])
    assert err.getvalue().count("\r") == 2 and "disks" in err.getvalue()
    bar.event(events[2])
    bar.close()  # shows the throttled last state, ends the line
    assert err.getvalue().count("\r") == 3
    assert err.getvalue().endswith("\x1b[K\n")


def test_bar_fits_the_terminal() -> None:
    err = FakeTty()
    bar = progress.BarRenderer(err, width=lambda: 30)
    bar.event(progress_event("memory", 50, "a long message " * 10, 1 << 30, 2 << 30))
    assert len(err.getvalue().strip("\r").removesuffix("\x1b[K")) == 29


def test_human_bytes() -> None:
    assert [views.human_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 GiB",
    ]


# --------------------------------------------------------------- errors ----


def test_agent_error_one_line(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.fail["GetSnapshot"] = (grpc.StatusCode.NOT_FOUND, "no snapshot nope of domain web")
    assert agent.run("snapshot-info", "web", "nope") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "domsnap: no snapshot nope of domain web\n"


def test_multi_line_message_on_one_line(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.fail["RevertSnapshot"] = (grpc.StatusCode.FAILED_PRECONDITION, "risky revert:\n- config changed")
    assert agent.run("snapshot-revert", "web", "s1") == 1
    assert capsys.readouterr().err == "domsnap: risky revert: - config changed\n"


def test_unreachable_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"unix:{tmp_path / 'none.sock'}"
    assert cli.main(["-H", address, "list"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, f"domsnap: cannot reach the agent at {address}: ")
    assert err.rstrip().endswith("No such file or directory. Is domsnapd running there (systemctl start domsnapd)? "
                                 "Another agent: -H ADDR or $DOMSNAP_HOST")
    assert cli.main(["-H", address, "snapshot-create", "web"]) == 1
    assert_one_error_line(capsys.readouterr().err, f"domsnap: cannot reach the agent at {address}: ")


def test_unavailable_hypervisor_is_not_unreachable(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.fail["ListDomains"] = (grpc.StatusCode.UNAVAILABLE, "xl info does not answer")
    assert agent.run("list") == 1
    assert capsys.readouterr().err == "domsnap: xl info does not answer\n"


def test_deadline(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.delay = 0.5
    assert agent.run("-t", "0.1", "info") == 1
    assert_one_error_line(capsys.readouterr().err, "the agent did not answer within 0.1 s")


def test_failed_operation_prints_its_error_once(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    failed = operation(pb.OPERATION_STATE_FAILED, finished_at=ts(T0 + 1))
    failed.error.code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failed.error.message = "disk full; nothing was left behind"
    agent.fake.events[-1] = pb.OperationEvent(finished=failed)
    agent.fake.stream_status = (grpc.StatusCode.RESOURCE_EXHAUSTED, "disk full; nothing was left behind")
    assert agent.run("snapshot-create", "web") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("disk full") == 1
    assert captured.err.splitlines()[-1] == "domsnap: disk full; nothing was left behind"
    # an agent that ends the stream normally after a failed `finished`
    agent.fake.stream_status = None
    assert agent.run("watch", "op-1") == 1
    assert capsys.readouterr().err.splitlines()[-1] == "domsnap: disk full; nothing was left behind"


def test_broken_stream_names_the_operation(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.fake.events = create_events()[:3]
    agent.fake.stream_status = (grpc.StatusCode.INTERNAL, "agent shutting down")
    assert agent.run("snapshot-create", "web") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"domsnap: agent shutting down (operation op-1 may go on; watch it: domsnap -H {agent.address} watch op-1)"
    )


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_ctrl_c_detaches(agent: Agent, capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    left = threading.Event()

    def interrupt_then_wait(context: grpc.ServicerContext) -> None:
        context.add_callback(left.set)
        # By now the client has read the events and blocks on the next one.
        time.sleep(0.2)
        _thread.interrupt_main()
        left.wait(30)

    agent.fake.events = create_events()[:3]
    agent.fake.after_events = interrupt_then_wait
    # Ctrl-C as a terminal delivers it: a suite started in the background by
    # a non-interactive shell inherits SIGINT ignored, and interrupt_main()
    # then does nothing (every fresh-clone run started that way failed here).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert agent.run(*(["--json"] if as_json else []), "snapshot-create", "web") == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    captured = capsys.readouterr()
    if as_json:
        # A program reading the events gets a last one that says what happened.
        assert json.loads(captured.out.splitlines()[-1]) == {"detached": {
            "operation_id": "op-1", "request_id": agent.fake.last("CreateSnapshot").request_id,  # type: ignore[attr-defined]
            "watch": f"domsnap -H {agent.address} watch op-1", "cancel": f"domsnap -H {agent.address} cancel op-1"}}
    err = captured.err.splitlines()[-1]
    assert err == (
        "domsnap: detached; operation op-1 goes on. "
        f"Watch it: domsnap -H {agent.address} watch op-1; cancel it: domsnap -H {agent.address} cancel op-1"
    )
    assert left.wait(5), "the client did not drop the stream"


def test_no_output_on_broken_stdout_is_not_a_traceback(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    monkeypatch.setattr("sys.stdout", Closed())
    assert agent.run("list") == EXIT_BROKEN_PIPE


def test_global_options_after_the_subcommand(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--json", "-H", agent.address]) == 0
    assert json.loads(capsys.readouterr().out)[1]["name"] == "web"


def test_env_address(agent: Agent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DOMSNAP_HOST", agent.address)
    assert cli.main(["info"]) == 0
    assert "driver                 : qemu" in capsys.readouterr().out


def test_no_unix_socket_leak(tmp_path: Path) -> None:
    # Help must not need an agent: nothing is opened for it.
    assert cli.main(["-H", f"unix:{tmp_path / 'x'}", "help"]) == 0
    assert os.listdir(tmp_path) == []


def test_missing_arguments_name_only_the_required_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["snapshot-create"]) == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: <Domain>\n")
    assert cli.main(["create"]) == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: <cfgfile>\n")
