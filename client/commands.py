"""What each `domsnap` verb does: build the request, call the agent, print.

The verb table in `cli.py` names these handlers; every handler takes the
session and the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import sys
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from domsnap.v1 import domsnap_pb2 as pb

from . import calls, connection, views
from .connection import Address
from .exits import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, CliError, UsageError

# The label a schedule's snapshots carry (the agent's names.SCHEDULE_LABEL; the client speaks only the API).
SCHEDULE_LABEL = "domsnap.dev/schedule"

if TYPE_CHECKING:
    from .api import Client

@dataclass
class Session:
    """Everything a handler needs besides its own arguments."""

    address: Address
    json: bool
    # Times in UTC instead of the local zone.
    utc: bool = False
    # Deadline of unary calls; streams run as long as their operation.
    timeout: float = calls.DEFAULT_TIMEOUT
    # Set by --request-id so that a script can retry a mutation safely.
    request_id: str | None = None
    # Used on TCP only: a unix socket needs no certificate.
    tls: connection.TlsFiles = field(default_factory=connection.TlsFiles)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    _client: Client | None = field(default=None, init=False, repr=False)

    @property
    def client(self) -> Client:
        """The client library's connection to the agent, opened on first use:
        `help` must work without an agent, and without loading gRPC."""
        if self._client is None:
            from .api import Client

            self._client = Client(self.address.text, ca=self.tls.ca, cert=self.tls.cert, key=self.tls.key,
                                  timeout=self.timeout)
        return self._client

    def attach(self, client: Client) -> None:
        """Talk through a client opened elsewhere (a fan-out's)."""
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def new_request_id(self) -> str:
        return calls.new_request_id(self.request_id)

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


Handler = Callable[[Session, argparse.Namespace], int]


def cfg_name(name: str) -> str:
    """How the agent names the cfg text in its messages: the file as given."""
    return "<stdin>" if name == "-" else name


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


@dataclass
class _Seen:
    """What a follower saw of its operation."""

    id: str
    started: bool = False
    finished: bool = False


def follow(session: Session, events: Generator[pb.OperationEvent, None, None], *, operation_id: str = "",
           request_id: str = "") -> int:
    """Render an operation's events to the end; the path of every long command.

    The client library follows the stream; this passes it the renderer and
    words what the library raises for a person: a stream that broke says how
    to find the operation again, Ctrl-C how to watch or cancel it.
    """
    # Here, not at the top: the commands that only read never load the renderer.
    from . import progress
    from .errors import DomsnapError

    renderer = progress.make_renderer(json=session.json, out=session.out, err=session.err)
    seen = _Seen(operation_id)

    def on_event(event: pb.OperationEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            seen.id, seen.started = event.started.id, True
        elif kind == "finished":
            seen.finished = True
        renderer.event(event)

    try:
        try:
            finished = session.client.follow(events, on_event=on_event)
        finally:
            renderer.close()
    except KeyboardInterrupt:
        # The library cancelled our stream only; the agent keeps running the
        # operation, which is what a user detaching wants.
        op = seen.id
        session.err.write(detach_message(session, op, request_id) + "\n")
        if session.json:
            # The last event a program reading the stream gets.
            detached = {"operation_id": op, "request_id": request_id, "watch": f"{session.command()} watch {op}",
                        "cancel": f"{session.command()} cancel {op}"} if op else {"request_id": request_id}
            session.out.write(views.json_text({"detached": detached}, pretty=False) + "\n")
        return EXIT_INTERRUPTED
    except DomsnapError as err:
        if seen.started and not seen.finished:
            # The stream broke, not the operation: say how to find it again.
            # (Before `started`, the agent refused: nothing goes on.)
            op = seen.id
            raise CliError(f"{err.message} (operation {op} may go on; watch it: {session.command()} watch {op})"
                           ) from err
        raise
    if not session.json:
        now = None
        if finished.kind == pb.OPERATION_KIND_REVERT_SNAPSHOT:
            # A revert makes a new domain: say what state it came back in
            # (unless it is gone again already: the revert itself succeeded).
            with contextlib.suppress(DomsnapError):
                now = session.client.get_domain(finished.domain)
        session.out.write(progress.result_line(finished, now, session.command()) + "\n")
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
    # The agent resolves names and domids the way xl does.
    domains = ([s.client.get_domain(d) for d in ns.domains] if ns.domains
               else s.client.list_domains(full=ns.long or s.json))
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
    return _show_domain(s, s.client.create_domain(read_cfg(ns.cfgfile), overrides=overrides, paused=ns.paused,
                                                  force=ns.force, config_name=cfg_name(ns.cfgfile),
                                                  request_id=s.new_request_id()))


def cmd_destroy(s: Session, ns: argparse.Namespace) -> int:
    return _show_domain(s, s.client.destroy_domain(ns.domain, request_id=s.new_request_id()))


def cmd_pause(s: Session, ns: argparse.Namespace) -> int:
    return _show_domain(s, s.client.pause_domain(ns.domain, request_id=s.new_request_id()))


def cmd_unpause(s: Session, ns: argparse.Namespace) -> int:
    return _show_domain(s, s.client.unpause_domain(ns.domain, request_id=s.new_request_id()))


def cmd_cd_insert(s: Session, ns: argparse.Namespace) -> int:
    # xl's target may carry its format ("raw:/x.iso"); a CD-ROM image is raw.
    path = ns.path.removeprefix("raw:")
    return _show_domain(s, s.client.change_medium(ns.domain, ns.vdev, path, request_id=s.new_request_id()))


def cmd_cd_eject(s: Session, ns: argparse.Namespace) -> int:
    return _show_domain(s, s.client.change_medium(ns.domain, ns.vdev, request_id=s.new_request_id()))


def cmd_info(s: Session, ns: argparse.Namespace) -> int:
    info = s.client.info()
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


def split_snapshot_args(args: Sequence[str], exists: Callable[[str], bool] = os.path.lexists,
                        is_file: Callable[[str], bool] = os.path.isfile) -> SnapshotArgs:
    """Sort `snapshot-create`'s free arguments into cfgfile, path and settings.

    One meaning per spelling: KEY=VALUE is a setting; `-` or an existing
    file is the <cfgfile>; a word with a `/` that does not exist yet is the
    <path>. A bare word that is none of these is refused, with the two
    spellings that say what was meant (`--name NAME`, `./NAME`), and so is
    a `*.cfg` that does not exist: it is a cfgfile mistyped, not a path.
    """
    cfgfiles: list[str] = []
    paths: list[str] = []
    overrides: list[str] = []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif arg == "-" or is_file(arg):
            cfgfiles.append(arg)
        elif arg.endswith(".cfg") and not exists(arg):
            raise CliError(f"{arg}: no such file (a <cfgfile> must exist)")
        elif "/" in arg:
            paths.append(arg)
        else:
            what = "not a file" if exists(arg) else "no such file"
            raise UsageError(f"{arg!r}: {what}. For a snapshot named {arg} say --name {arg}; for a new "
                             f"directory {arg} say ./{arg}")
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
    events = s.client.create_snapshot_events(
        ns.domain, name=ns.name or "", live=ns.live, method=ns.method, path=s.agent_path(path) if path else "",
        config=read_cfg(parts.cfgfile) if parts.cfgfile else "", overrides=parts.overrides,
        config_name=cfg_name(parts.cfgfile) if parts.cfgfile else "", description=ns.description or "",
        dry_run=ns.dry_run, request_id=request_id, quiesce=_quiesce(ns), labels=_labels(ns.labels))
    return show_plan(s, events) if ns.dry_run else follow(s, events, request_id=request_id)


def _quiesce(ns: argparse.Namespace) -> calls.Quiesce | None:
    if not (ns.quiesce or ns.quiesce_best_effort):
        if ns.freeze_timeout:
            raise UsageError("--freeze-timeout needs --quiesce")
        return None
    return calls.Quiesce(best_effort=ns.quiesce_best_effort, freeze_timeout=ns.freeze_timeout)


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def prunable(snapshots: Iterable[pb.Snapshot], keep: int, *, schedule: str | None = None,
             prefix: str = "") -> list[pb.Snapshot]:
    """The snapshots snapshot-prune deletes, oldest first: of those a
    schedule marked (that schedule's, with `schedule`) whose names begin
    with `prefix`, all but the newest `keep`."""
    marked = [snap for snap in snapshots
              if SCHEDULE_LABEL in snap.labels and schedule in (None, snap.labels[SCHEDULE_LABEL])
              and snap.name.startswith(prefix)]
    marked.sort(key=lambda snap: (snap.created_at.seconds, snap.created_at.nanos, snap.name))
    return marked[:max(len(marked) - keep, 0)]


def cmd_snapshot_prune(s: Session, ns: argparse.Namespace) -> int:
    if ns.keep < 0:
        raise UsageError(f"--keep {ns.keep}: expected 0 or more")
    doomed = prunable(s.client.list_snapshots(ns.domain), ns.keep, schedule=ns.schedule, prefix=ns.prefix)
    if ns.dry_run:
        if s.json:
            s.print_json([snap.name for snap in doomed])
        else:
            s.print_lines([f"would delete {snap.name}" for snap in doomed])
        return EXIT_OK
    for snap in doomed:
        # Each a request of its own: a retry of the prune deletes what is still there.
        events = s.client.delete_snapshot_events(ns.domain, snap.name, request_id=calls.new_request_id(None))
        if (status := follow(s, events)) != EXIT_OK:
            return status
    return EXIT_OK


def show_plan(s: Session, events: Generator[pb.OperationEvent, None, None]) -> int:
    plan = s.client.plan(events)
    if s.json:
        s.print_json(views.to_dict(plan))
    else:
        s.print_lines(views.plan_lines(plan))
    return EXIT_OK


def _current(s: Session, domain: str) -> pb.Snapshot:
    for snap in s.client.list_snapshots(domain):
        if snap.current:
            return snap
    raise CliError(f"domain {domain} has no current snapshot (none taken, or it was deleted): "
                   f"{s.command()} snapshot-list {domain} shows what there is")


def cmd_snapshot_revert(s: Session, ns: argparse.Namespace) -> int:
    if (ns.snapshot is None) == (not ns.current):
        raise UsageError("name the snapshot to revert to, or give --current (one of them)")
    request_id = s.new_request_id()
    snapshot, config, name = "", "", ""
    if ns.current:
        snapshot = _current(s, ns.domain).name
    elif ns.snapshot == "-" or os.path.isfile(ns.snapshot):
        config, name = read_cfg(ns.snapshot), cfg_name(ns.snapshot)
    else:
        snapshot = s.snapshot_ref(ns.snapshot)
    events = s.client.revert_snapshot_events(ns.domain, snapshot, config=config, config_name=name,
                                             run_state=ns.run_state, force=ns.force, reset_nvram=ns.reset_nvram,
                                             dry_run=ns.dry_run, request_id=request_id)
    return show_plan(s, events) if ns.dry_run else follow(s, events, request_id=request_id)


def cmd_snapshot_delete(s: Session, ns: argparse.Namespace) -> int:
    request_id = s.new_request_id()
    events = s.client.delete_snapshot_events(ns.domain, s.snapshot_ref(ns.snapshot), children=ns.children,
                                             dry_run=ns.dry_run, request_id=request_id)
    return show_plan(s, events) if ns.dry_run else follow(s, events, request_id=request_id)


def select_snapshots(snapshots: Sequence[pb.Snapshot], ns: argparse.Namespace) -> list[pb.Snapshot]:
    """snapshot-list's filters: --parent, --roots, --leaves (per domain), --name."""
    parents = {(snap.domain, snap.parent) for snap in snapshots}
    names = {(snap.domain, snap.name) for snap in snapshots}
    out = []
    for snap in snapshots:
        if ns.parent is not None and snap.parent != ns.parent:
            continue
        if ns.roots and (snap.domain, snap.parent) in names:
            continue
        if ns.leaves and (snap.domain, snap.name) in parents:
            continue
        if ns.name is not None and not fnmatch.fnmatchcase(snap.name, ns.name):
            continue
        out.append(snap)
    return out


def cmd_snapshot_list(s: Session, ns: argparse.Namespace) -> int:
    snapshots = select_snapshots(s.client.list_snapshots(ns.domain or "", full=s.json), ns)
    if s.json:
        s.print_json([views.to_dict(snap) for snap in snapshots])
    elif ns.tree:
        s.print_lines(views.snapshot_tree(snapshots, utc=s.utc))
    else:
        s.print_lines(views.snapshot_table(snapshots, utc=s.utc))
    return EXIT_OK


def _show_snapshot(s: Session, snapshot: pb.Snapshot) -> int:
    if s.json:
        s.print_json(views.to_dict(snapshot))
    else:
        s.print_lines(views.snapshot_details(snapshot, utc=s.utc))
    return EXIT_OK


def cmd_snapshot_info(s: Session, ns: argparse.Namespace) -> int:
    return _show_snapshot(s, s.client.get_snapshot(ns.domain, s.snapshot_ref(ns.snapshot)))


def cmd_snapshot_current(s: Session, ns: argparse.Namespace) -> int:
    return _show_snapshot(s, _current(s, ns.domain))


def cmd_snapshot_edit(s: Session, ns: argparse.Namespace) -> int:
    if ns.description is None and ns.rename is None:
        raise UsageError("nothing to change: give --description TEXT and/or --rename NAME")
    snapshot = s.client.edit_snapshot(ns.domain, s.snapshot_ref(ns.snapshot), description=ns.description,
                                      new_name=ns.rename or "", request_id=s.new_request_id())
    return _show_snapshot(s, snapshot)


def cmd_snapshot_dumpmanifest(s: Session, ns: argparse.Namespace) -> int:
    s.out.write(s.client.get_snapshot(ns.domain, s.snapshot_ref(ns.snapshot), manifest=True).manifest)
    return EXIT_OK


# ---------------------------------------------------------- operations ----


def cmd_watch(s: Session, ns: argparse.Namespace) -> int:
    return follow(s, s.client.watch(ns.operation_id), operation_id=ns.operation_id)


def cmd_cancel(s: Session, ns: argparse.Namespace) -> int:
    op = s.client.cancel(ns.operation_id)
    if s.json:
        s.print_json(views.to_dict(op))
    else:
        s.print_lines([f"Operation {op.id} ({views.operation_kind_word(op.kind)} {op.domain}): "
                       f"{views.operation_state_word(op.state)}"])
    return EXIT_OK


def cmd_operations(s: Session, ns: argparse.Namespace) -> int:
    operations = s.client.list_operations(ns.domain or "")
    if s.json:
        s.print_json([views.to_dict(op) for op in operations])
    else:
        s.print_lines(views.operation_table(operations, utc=s.utc))
    return EXIT_OK


def cmd_events(s: Session, ns: argparse.Namespace) -> int:
    """The change feed, one line (or JSON object) per event as it comes; each
    line ends with the token to resume from (--since)."""
    for seen, event in enumerate(s.client.watch_events(ns.since, domain=ns.domain or "", timeout=None), 1):
        if s.json:
            s.out.write(views.json_text(views.to_dict(event), pretty=False) + "\n")
        else:
            s.print_lines([views.event_line(event, utc=s.utc)])
        s.out.flush()
        if seen == ns.count:
            break
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
        host.attach(client)
        handler(host, ns)
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


# The group verbs live in their own module; the verb table finds every handler here.
from .group_commands import cmd_group_snapshot_create as cmd_group_snapshot_create  # noqa: E402
from .group_commands import cmd_group_snapshot_delete as cmd_group_snapshot_delete  # noqa: E402
from .group_commands import cmd_group_snapshot_list as cmd_group_snapshot_list  # noqa: E402
from .group_commands import cmd_group_snapshot_revert as cmd_group_snapshot_revert  # noqa: E402
