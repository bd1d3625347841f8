"""What each `domsnap` verb does: build the request, call the agent, print.

The verb table in `cli.py` names these handlers; every handler takes the
session and the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

import grpc

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

from . import calls, connection, progress, views
from .connection import Address

if TYPE_CHECKING:
    from .api import Client

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """Fails the command with one line on stderr and exit status 1."""


class UsageError(Exception):
    """The arguments parse but do not make sense together (exit status 2)."""


@dataclass
class Session:
    """Everything a handler needs besides its own arguments."""

    address: Address
    json: bool
    # Deadline of unary calls; streams run as long as their operation.
    timeout: float
    # Set by --request-id so that a script can retry a mutation safely.
    request_id: str | None = None
    # Used on TCP only: a unix socket needs no certificate.
    tls: connection.TlsFiles = field(default_factory=connection.TlsFiles)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _channel: grpc.Channel | None = field(default=None, init=False, repr=False)
    _stub: pb_grpc.SnapshotAgentStub | None = field(default=None, init=False, repr=False)

    @property
    def agent(self) -> pb_grpc.SnapshotAgentStub:
        # Opened on first use: `help` must work without an agent.
        if self._stub is None:
            credentials = None
            if self.uses_tls:
                try:
                    credentials = connection.channel_credentials(self.tls)
                except connection.TlsError as err:
                    raise CliError(f"TLS: {err}") from err
            self._channel = connection.open_channel(self.address, credentials)
            self._stub = connection.stub(self._channel)
        return self._stub

    @property
    def uses_tls(self) -> bool:
        return connection.uses_tls(self.address, self.tls)

    def attach(self, channel: grpc.Channel) -> None:
        """Talk over a channel opened elsewhere (the client library's, in a fan-out)."""
        self._channel = channel
        self._stub = connection.stub(channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def new_request_id(self) -> str:
        return self.request_id or str(uuid.uuid4())

    def agent_path(self, path: str) -> str:
        """A path as the agent must see it.

        A local agent shares our filesystem but not our cwd; a remote one
        shares neither, so its paths are passed through untouched.
        """
        return os.path.abspath(path) if self.address.local else path

    def snapshot_ref(self, ref: str) -> str:
        # A bare word is a snapshot name ([A-Za-z0-9._-]); only something with
        # a slash is a directory. `./dir` names a directory in the cwd.
        return self.agent_path(ref) if "/" in ref else ref

    def print_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.out.write(line + "\n")

    def print_json(self, value: object) -> None:
        self.out.write(views.json_text(value) + "\n")

    def command(self) -> str:
        """How to invoke domsnap again against the same agent, for hints."""
        if self.address.text == connection.DEFAULT_ADDRESS:
            return "domsnap"
        return f"domsnap -H {self.address.text}"

    def rpc_error_message(self, err: grpc.RpcError) -> str:
        code = err.code()
        details = " ".join((err.details() or "").split()) or code.name.lower().replace("_", " ")
        # Probed only on UNAVAILABLE: a connect failure and a hypervisor
        # that does not answer share that code (see is_reachable).
        if (
            code == grpc.StatusCode.UNAVAILABLE
            and self._channel is not None
            and not connection.is_reachable(self._channel)
        ):
            if self.uses_tls and (tls := connection.tls_failure(details, self.address, self.tls)) is not None:
                return f"TLS: {tls}"
            reason = connection.connect_failure_reason(details)
            if not self.address.local and not self.uses_tls and "refused" not in reason:
                reason += " (an agent on TCP speaks TLS: give --ca, --cert and --key)"
            return f"cannot reach the agent at {self.address.text}: {reason}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"the agent did not answer within {self.timeout:g} s ({details})"
        return details


Handler = Callable[[Session, argparse.Namespace], int]


def read_cfg(name: str) -> str:
    """The text of a cfgfile; `-` is stdin. The agent never sees our paths."""
    try:
        if name == "-":
            return sys.stdin.read()
        with open(name, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise CliError(f"cannot read {name}: {reason}") from err


def check_overrides(args: Sequence[str]) -> list[str]:
    for arg in args:
        if "=" not in arg:
            raise UsageError(f"{arg!r} is not a KEY=VALUE setting")
    return list(args)


# ------------------------------------------------------------- streams ----


_UNSUCCESSFUL = frozenset({pb.OPERATION_STATE_FAILED, pb.OPERATION_STATE_CANCELLED})


class EventStream(Protocol):
    """A server-streaming call: its events, and a way to stop reading them."""

    def __iter__(self) -> Iterator[pb.OperationEvent]: ...

    def cancel(self) -> bool: ...


def follow(session: Session, stream: EventStream, *, operation_id: str = "", request_id: str = "") -> int:
    """Render an operation's events to the end; the path of every long command."""
    renderer = progress.make_renderer(json=session.json, out=session.out, err=session.err)
    finished: pb.Operation | None = None
    try:
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "started":
                    operation_id = event.started.id
                elif kind == "finished":
                    finished = event.finished
                renderer.event(event)
        finally:
            renderer.close()
    except KeyboardInterrupt:
        # Cancelling the call only drops our stream; the agent keeps running
        # the operation, which is what a user detaching wants.
        stream.cancel()
        session.err.write(detach_message(session, operation_id, request_id) + "\n")
        return EXIT_INTERRUPTED
    except grpc.RpcError as err:
        if operation_id and finished is None:
            # The stream broke, not the operation: say how to find it again.
            hint = f"operation {operation_id} may go on; watch it: {session.command()} watch {operation_id}"
            raise CliError(f"{session.rpc_error_message(err)} ({hint})") from err
        raise
    if finished is None:
        raise CliError(f"the agent ended the stream of operation {operation_id or '?'} before it finished")
    if finished.HasField("error") or finished.state in _UNSUCCESSFUL:
        state = views.enum_word(pb.OperationState.Name(finished.state), "OPERATION_STATE_")
        raise CliError(" ".join(finished.error.message.split()) or f"operation {finished.id} {state}")
    if not session.json:
        session.out.write(progress.result_line(finished) + "\n")
    return EXIT_OK


def detach_message(session: Session, operation_id: str, request_id: str) -> str:
    cmd = session.command()
    if operation_id:
        return (
            f"domsnap: detached; operation {operation_id} goes on. "
            f"Watch it: {cmd} watch {operation_id}; cancel it: {cmd} cancel {operation_id}"
        )
    # Interrupted before the agent named the operation: it may or may not
    # have started, but repeating the request with the same id re-attaches.
    return (
        "domsnap: detached before the agent named the operation; it may go on. "
        f"Re-attach: repeat the same command with --request-id {request_id} after {cmd}; "
        f"list operations: {cmd} operations"
    )


# ------------------------------------------------------------- domains ----


def cmd_list(s: Session, ns: argparse.Namespace) -> int:
    if ns.domains:
        # The agent resolves names and domids the way xl does.
        domains = [s.agent.GetDomain(pb.GetDomainRequest(domain=d), timeout=s.timeout) for d in ns.domains]
    else:
        domains = list(s.agent.ListDomains(pb.ListDomainsRequest(), timeout=s.timeout).domains)
    if s.json:
        s.print_json([views.to_dict(d) for d in domains])
    elif ns.long:
        s.print_lines(views.domain_configs(domains))
    else:
        s.print_lines(views.domain_table(domains))
    return EXIT_OK


def _show_domain(s: Session, domain: pb.Domain) -> int:
    # Like xl, success is silent; --json callers get the domain as it is now.
    if s.json:
        s.print_json(views.to_dict(domain))
    return EXIT_OK


def cmd_create(s: Session, ns: argparse.Namespace) -> int:
    overrides = check_overrides(ns.overrides)
    request = pb.CreateDomainRequest(
        request_id=s.new_request_id(), config=read_cfg(ns.cfgfile), overrides=overrides, paused=ns.paused
    )
    return _show_domain(s, s.agent.CreateDomain(request, timeout=s.timeout))


def cmd_destroy(s: Session, ns: argparse.Namespace) -> int:
    request = pb.DestroyDomainRequest(request_id=s.new_request_id(), domain=ns.domain)
    return _show_domain(s, s.agent.DestroyDomain(request, timeout=s.timeout))


def cmd_pause(s: Session, ns: argparse.Namespace) -> int:
    request = pb.PauseDomainRequest(request_id=s.new_request_id(), domain=ns.domain)
    return _show_domain(s, s.agent.PauseDomain(request, timeout=s.timeout))


def cmd_unpause(s: Session, ns: argparse.Namespace) -> int:
    request = pb.UnpauseDomainRequest(request_id=s.new_request_id(), domain=ns.domain)
    return _show_domain(s, s.agent.UnpauseDomain(request, timeout=s.timeout))


def cmd_cd_insert(s: Session, ns: argparse.Namespace) -> int:
    # xl's target may carry its format ("raw:/x.iso"); a CD-ROM image is raw.
    path = ns.path.removeprefix("raw:")
    request = pb.ChangeMediumRequest(request_id=s.new_request_id(), domain=ns.domain, vdev=ns.vdev, path=path)
    return _show_domain(s, s.agent.ChangeMedium(request, timeout=s.timeout))


def cmd_cd_eject(s: Session, ns: argparse.Namespace) -> int:
    request = pb.ChangeMediumRequest(request_id=s.new_request_id(), domain=ns.domain, vdev=ns.vdev)
    return _show_domain(s, s.agent.ChangeMedium(request, timeout=s.timeout))


def cmd_info(s: Session, ns: argparse.Namespace) -> int:
    info = s.agent.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=s.timeout)
    if s.json:
        s.print_json(views.to_dict(info))
    else:
        s.print_lines(views.agent_info(info))
    return EXIT_OK


# ----------------------------------------------------------- snapshots ----


@dataclass(frozen=True)
class SnapshotArgs:
    cfgfile: str | None
    path: str | None
    overrides: list[str]


def split_snapshot_args(args: Sequence[str], is_file: Callable[[str], bool] = os.path.isfile) -> SnapshotArgs:
    """Sort `snapshot-create`'s free arguments into cfgfile, path and settings.

    The synopsis `[<cfgfile>] [<path>] [KEY=VALUE ...]` has two optional
    positionals; they differ in that a cfgfile exists and a path must not.
    """
    cfgfiles: list[str] = []
    paths: list[str] = []
    overrides: list[str] = []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif arg == "-" or is_file(arg):
            cfgfiles.append(arg)
        else:
            paths.append(arg)
    if len(cfgfiles) > 1:
        raise UsageError(f"more than one <cfgfile>: {', '.join(cfgfiles)}")
    if len(paths) > 1:
        raise UsageError(
            f"more than one <path>: {', '.join(paths)} (a <cfgfile> must be an existing file, a <path> must not exist)"
        )
    return SnapshotArgs(
        cfgfile=cfgfiles[0] if cfgfiles else None, path=paths[0] if paths else None, overrides=overrides
    )


def cmd_snapshot_create(s: Session, ns: argparse.Namespace) -> int:
    parts = split_snapshot_args(ns.args)
    if parts.path is not None and ns.path is not None:
        raise UsageError(f"two snapshot paths: {parts.path} and --path {ns.path}")
    path = ns.path if ns.path is not None else parts.path
    request_id = s.new_request_id()
    request = pb.CreateSnapshotRequest(
        request_id=request_id,
        domain=ns.domain,
        name=ns.name or "",
        live=ns.live,
        method=ns.method,
        path=s.agent_path(path) if path else "",
        config=read_cfg(parts.cfgfile) if parts.cfgfile else "",
        overrides=parts.overrides,
        description=ns.description or "",
    )
    return follow(s, s.agent.CreateSnapshot(request), request_id=request_id)


def cmd_snapshot_revert(s: Session, ns: argparse.Namespace) -> int:
    request_id = s.new_request_id()
    request = pb.RevertSnapshotRequest(request_id=request_id, domain=ns.domain, run_state=ns.run_state, force=ns.force,
                                       reset_nvram=ns.reset_nvram)
    if ns.snapshot == "-" or os.path.isfile(ns.snapshot):
        request.config = read_cfg(ns.snapshot)
    else:
        request.snapshot = s.snapshot_ref(ns.snapshot)
    return follow(s, s.agent.RevertSnapshot(request), request_id=request_id)


def cmd_snapshot_delete(s: Session, ns: argparse.Namespace) -> int:
    request_id = s.new_request_id()
    request = pb.DeleteSnapshotRequest(
        request_id=request_id, domain=ns.domain, snapshot=s.snapshot_ref(ns.snapshot), children=ns.children
    )
    return follow(s, s.agent.DeleteSnapshot(request), request_id=request_id)


def cmd_snapshot_list(s: Session, ns: argparse.Namespace) -> int:
    snapshots: list[pb.Snapshot] = []
    page = None
    while (request := calls.next_snapshots_page(ns.domain or "", page)) is not None:
        page = s.agent.ListSnapshots(request, timeout=s.timeout)
        snapshots.extend(page.snapshots)
    if s.json:
        s.print_json([views.to_dict(snap) for snap in snapshots])
    elif ns.tree:
        s.print_lines(views.snapshot_tree(snapshots))
    else:
        s.print_lines(views.snapshot_table(snapshots))
    return EXIT_OK


def cmd_snapshot_info(s: Session, ns: argparse.Namespace) -> int:
    request = pb.GetSnapshotRequest(domain=ns.domain, snapshot=s.snapshot_ref(ns.snapshot))
    snapshot = s.agent.GetSnapshot(request, timeout=s.timeout)
    if s.json:
        s.print_json(views.to_dict(snapshot))
    else:
        s.print_lines(views.snapshot_details(snapshot))
    return EXIT_OK


# ---------------------------------------------------------- operations ----


def cmd_watch(s: Session, ns: argparse.Namespace) -> int:
    stream = s.agent.WatchOperation(pb.WatchOperationRequest(operation_id=ns.operation_id))
    return follow(s, stream, operation_id=ns.operation_id)


def cmd_cancel(s: Session, ns: argparse.Namespace) -> int:
    op = s.agent.CancelOperation(pb.CancelOperationRequest(operation_id=ns.operation_id), timeout=s.timeout)
    if s.json:
        s.print_json(views.to_dict(op))
    else:
        state = views.enum_word(pb.OperationState.Name(op.state), "OPERATION_STATE_")
        s.print_lines([f"Operation {op.id} ({views.operation_kind_word(op.kind)} {op.domain}): {state}"])
    return EXIT_OK


def cmd_operations(s: Session, ns: argparse.Namespace) -> int:
    response = s.agent.ListOperations(pb.ListOperationsRequest(domain=ns.domain or ""), timeout=s.timeout)
    if s.json:
        s.print_json([views.to_dict(op) for op in response.operations])
    else:
        s.print_lines(views.operation_table(response.operations))
    return EXIT_OK


# ------------------------------------------------------- several agents ----

# Agents asked at once by `-H a,b,...`; each gets --timeout seconds.
FAN_OUT_LIMIT = 16


def run_on_hosts(handler: Handler, addresses: Sequence[Address], s: Session, ns: argparse.Namespace) -> int:
    """One read-only command on several agents (the client library's fan_out).

    Text: each agent's output under an `ADDR:` line, in the order given;
    JSON: one object, {ADDR: {"result": ...} or {"error": {"code", "message"}}}.
    An agent that fails, cannot be reached or does not answer within
    --timeout gets one line on stderr and never holds up the others; the
    exit status is 1 if any failed.
    """
    # The client library, loaded only for the commands that need it.
    from . import errors
    from .fanout import fan_out

    def call(client: Client) -> str:
        out = io.StringIO()
        host = Session(address=client.address, json=s.json, timeout=s.timeout, request_id=s.request_id,
                       tls=s.tls, out=out, err=io.StringIO())
        host.attach(client.channel)
        try:
            handler(host, ns)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            raise errors.error_class(code)(host.rpc_error_message(err), code=code,
                                           address=client.address.text) from err
        return out.getvalue()

    results = fan_out([a.text for a in addresses], call, limit=FAN_OUT_LIMIT, deadline=s.timeout,
                      ca=s.tls.ca, cert=s.tls.cert, key=s.tls.key)
    document: dict[str, object] = {}
    first = True
    for address, result in results.items():
        if result.error is not None:
            message = result.error.message if isinstance(result.error, errors.DomsnapError) else str(result.error)
            code = result.error.code.name if isinstance(result.error, errors.DomsnapError) else "UNKNOWN"
            document[address] = {"error": {"code": code, "message": message}}
            s.err.write(f"domsnap: {address}: {message}\n")
        elif s.json:
            document[address] = {"result": json.loads(result.value or "null")}
        else:
            s.out.write(("" if first else "\n") + f"{address}:\n{result.value}")
            first = False
    if s.json:
        s.print_json(document)
    return EXIT_ERROR if any(not r.ok for r in results.values()) else EXIT_OK
