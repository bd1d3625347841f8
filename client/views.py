"""Text and JSON renderings of the agent's messages.

Pure functions from messages to lines, so the CLI's output can be tested
without a terminal or an agent.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor, duration_pb2, json_format, message, timestamp_pb2

from domsnap.v1 import domsnap_pb2 as pb

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

# xl's six state flags: r(unning) b(locked) p(aused) s(hutdown) c(rashed) d(ying).
_STATE_FLAGS = {
    pb.DOMAIN_STATE_RUNNING: "r-----",
    pb.DOMAIN_STATE_PAUSED: "--p---",
    pb.DOMAIN_STATE_SHUTDOWN: "---s--",
    pb.DOMAIN_STATE_CRASHED: "----c-",
}


def human_bytes(count: float) -> str:
    """Binary units, as `ls -h` and xl's memory figures use."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """Milliseconds below one second, seconds above: `62 ms`, `21.6 s`, `3 min 5 s`."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def to_dict(msg: message.Message) -> dict[str, Any]:
    """A message for --json: the tables' words for enums (`running`, not
    `DOMAIN_STATE_RUNNING`), so text and JSON share one vocabulary."""
    # An operation's error holds a google.rpc.ErrorInfo packed in an Any: it
    # renders only once its type is in the descriptor pool.
    from google.rpc import error_details_pb2  # noqa: F401

    # Fields at their default are printed too, so scripts see a stable set of
    # keys (a domid 0 or a false `live` does not vanish).
    data = json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    _enum_words(msg.DESCRIPTOR, data)
    return data


def _enum_prefix(enum: descriptor.EnumDescriptor) -> str:
    """`DomainState` -> `DOMAIN_STATE_`: what every value's name starts with."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _enum_words(desc: descriptor.Descriptor | Any, data: dict[str, Any]) -> None:
    # (upb's descriptors are another class with the same interface.)
    for f in desc.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        values = value if isinstance(value, list) else [value]
        if f.enum_type is not None:
            words = [enum_word(v, _enum_prefix(f.enum_type)) if isinstance(v, str) else v for v in values]
            data[f.name] = words if isinstance(value, list) else words[0]
        elif f.message_type is not None and f.message_type.full_name.startswith("domsnap."):
            for item in values:
                if isinstance(item, dict):
                    _enum_words(f.message_type, item)


def json_text(value: object, *, pretty: bool = True) -> str:
    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def enum_word(name: str, prefix: str) -> str:
    """`DOMAIN_STATE_RUNNING` -> `running`."""
    return name.removeprefix(prefix).lower().replace("_", "-")


@functools.cache
def domain_state_word(state: pb.DomainState.ValueType) -> str:
    return enum_word(pb.DomainState.Name(state), "DOMAIN_STATE_")


def phase_word(phase: pb.Phase.ValueType) -> str:
    """`PHASE_VALIDATE` -> `validate`; "" for none (and for a phase newer than this client)."""
    name = pb.Phase.Name(phase) if phase in pb.Phase.values() else "PHASE_UNSPECIFIED"
    return "" if name == "PHASE_UNSPECIFIED" else enum_word(name, "PHASE_")


def seconds(d: duration_pb2.Duration) -> float:
    return d.ToNanoseconds() / 1e9


def local_time(ts: timestamp_pb2.Timestamp, *, utc: bool = False) -> str:
    """The local time (TZ is honoured) with its zone, or UTC with `utc`."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    # time's C functions: a 10,000-row listing formats in a few ms, not the ~50 of datetime's.
    if utc:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts.seconds))
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts.seconds))


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, right: frozenset[int] = frozenset()) -> list[str]:
    """Columns as wide as their widest cell; `right` holds right-aligned columns."""
    cells = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    # One format string for every row: per-cell calls made 10,000 rows take ~60 ms.
    fmt = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*row).rstrip() for row in cells]


# ------------------------------------------------------------- domains ----


def domain_table(domains: Iterable[pb.Domain]) -> list[str]:
    """The columns and widths of `xl list`, and Busy: the operation running on the domain."""
    lines = [f"{'Name':<40} {'ID':>5} {'Mem':>5} {'VCPUs':>5}     {'State':<6}  {'Time(s)':>8}  Busy"]
    domains = list(domains)
    troubled = [d for d in domains if d.problem]
    for d in domains:
        flags = _STATE_FLAGS.get(d.state, "------")
        busy = d.busy_with_operation or "-"
        lines.append(f"{d.name:<40} {d.domid:>5} {d.memory_mib:>5} {d.vcpus:>5}     {flags:<6}  "
                     f"{seconds(d.cpu_time):>8.1f}  {busy}")
    # Below the table, so that the rows stay as xl prints them.
    lines += [f"{d.name}: {d.problem}" for d in troubled]
    return lines


def domain_configs(domains: Iterable[pb.Domain]) -> list[str]:
    lines: list[str] = []
    for d in domains:
        lines.append(f"# {d.name} (id {d.domid}, {domain_state_word(d.state)})")
        lines.extend(d.config.rstrip("\n").splitlines())
        lines.append("")
    return lines


def key_values(pairs: Sequence[tuple[str, str]], *, width: int = 0) -> list[str]:
    """`key : value` lines, keys padded like `xl info`."""
    pad = max([width, *(len(k) for k, _ in pairs)])
    return [f"{k:<{pad}} : {v}" for k, v in pairs]


def agent_info(info: pb.AgentInfo) -> list[str]:
    return key_values(
        [
            ("host", info.hostname),
            ("agent_version", info.agent_version),
            ("api_version", info.api_version),
            ("driver", info.driver),
            ("hypervisor_version", info.hypervisor_version),
            ("snapshot_root", info.snapshot_root),
            ("capabilities", " ".join(info.capabilities)),
        ],
        width=22,
    )


# ----------------------------------------------------------- snapshots ----


def snapshot_table(snapshots: Iterable[pb.Snapshot], *, utc: bool = False) -> list[str]:
    rows = [
        (
            s.domain,
            s.name,
            local_time(s.created_at, utc=utc),
            domain_state_word(s.state),
            human_bytes(s.size_bytes),
            s.parent or "-",
            "*" if s.current else "",
        )
        for s in snapshots
    ]
    return table(("Domain", "Name", "Created", "State", "Size", "Parent", "Current"), rows, right=frozenset({4}))


def snapshot_tree(snapshots: Iterable[pb.Snapshot], *, utc: bool = False) -> list[str]:
    """Each domain's snapshots as parent/child trees, children in list order."""
    by_domain: dict[str, list[pb.Snapshot]] = {}
    for s in snapshots:
        by_domain.setdefault(s.domain, []).append(s)
    lines: list[str] = []
    for domain, snaps in by_domain.items():
        names = {s.name for s in snaps}
        children: dict[str, list[pb.Snapshot]] = {}
        # A parent that was deleted (or lies outside the listing) makes its
        # children roots rather than hiding them.
        roots = [s for s in snaps if not s.parent or s.parent not in names]
        for s in snaps:
            if s.parent and s.parent in names:
                children.setdefault(s.parent, []).append(s)
        lines.append(domain)
        _tree_lines(roots, children, "", lines, set(), utc)
    return lines


def _tree_lines(
    level: list[pb.Snapshot],
    children: Mapping[str, list[pb.Snapshot]],
    indent: str,
    out: list[str],
    seen: set[str],
    utc: bool,
) -> None:
    for i, snap in enumerate(level):
        last = i == len(level) - 1
        label = f"{snap.name}  {local_time(snap.created_at, utc=utc)}  {domain_state_word(snap.state)}"
        out.append(f"{indent}{'└─' if last else '├─'} {label}{'  *' if snap.current else ''}")
        # A corrupt catalogue could name a cycle; print each snapshot once.
        if snap.name in seen:
            continue
        seen.add(snap.name)
        _tree_lines(children.get(snap.name, []), children, indent + ("   " if last else "│  "), out, seen, utc)


def _method_word(method: pb.SnapshotMethod.ValueType) -> str:
    return enum_word(pb.SnapshotMethod.Name(method), "SNAPSHOT_METHOD_")


def snapshot_details(s: pb.Snapshot, *, utc: bool = False) -> list[str]:
    downtime = human_duration(seconds(s.downtime)) if s.HasField("downtime") else "-"
    memory = f"{s.memory.path} ({human_bytes(s.memory.size_bytes)})" if s.memory.path else "-"
    lines = key_values(
        [
            ("Name", s.name),
            ("Domain", s.domain),
            ("Path", s.path),
            ("Description", s.description or "-"),
            ("Created", local_time(s.created_at, utc=utc)),
            ("State", domain_state_word(s.state)),
            ("Live", "yes" if s.live else "no"),
            ("Quiesced", "yes" if s.quiesced else "no"),
            ("Labels", " ".join(f"{k}={v}" for k, v in sorted(s.labels.items())) or "-"),
            ("Parent", s.parent or "-"),
            ("Current", "yes" if s.current else "no"),
            ("Size", human_bytes(s.size_bytes)),
            ("Driver", f"{s.driver} ({s.hypervisor_version})" if s.hypervisor_version else s.driver),
            ("Guest paused", downtime),
            ("Memory", memory),
        ]
    )
    lines.append("Disks:")
    rows = [(d.vdev, d.format, d.backend, _method_word(d.method), d.image, d.tag or d.file or "-") for d in s.disks]
    lines.extend("  " + line for line in table(("Vdev", "Format", "Backend", "Method", "Image", "Tag/File"), rows))
    return lines


# ---------------------------------------------------------- operations ----


def operation_kind_word(kind: pb.OperationKind.ValueType) -> str:
    return enum_word(pb.OperationKind.Name(kind), "OPERATION_KIND_")


def operation_state_word(state: pb.OperationState.ValueType) -> str:
    return enum_word(pb.OperationState.Name(state), "OPERATION_STATE_")


def operation_table(operations: Iterable[pb.Operation], *, utc: bool = False) -> list[str]:
    rows = [
        (
            op.id,
            operation_kind_word(op.kind),
            op.domain,
            op.snapshot or "-",
            operation_state_word(op.state),
            f"{op.progress.percent:.0f}% {phase_word(op.progress.phase)}".rstrip(),
            local_time(op.started_at, utc=utc),
        )
        for op in operations
    ]
    return table(("ID", "Kind", "Domain", "Snapshot", "State", "Progress", "Started"), rows)


def event_line(ev: pb.Event, *, utc: bool = False) -> str:
    """`<time> <what> <domain> [snapshot=..] [operation=.. <state>] token=..`"""
    words = [local_time(ev.time, utc=utc), enum_word(pb.EventKind.Name(ev.kind), "EVENT_KIND_"), ev.domain]
    if ev.snapshot:
        words.append(f"snapshot={ev.snapshot}")
    if ev.previous_name:
        words.append(f"was={ev.previous_name}")
    if ev.operation_id:
        words.append(f"operation={ev.operation_id}")
    if ev.operation_state:
        words.append(operation_state_word(ev.operation_state))
    return " ".join([*words, f"token={ev.token}"])


# ------------------------------------------------------------- dry runs ----


def plan_lines(p: pb.Plan) -> list[str]:
    """What a --dry-run would have done; it touched nothing."""
    kind = operation_kind_word(p.kind)
    lines = [f"Dry run, nothing touched: {kind} {p.domain} {p.snapshot}"]
    pairs = [("Path", p.path or "-"), ("Memory", p.memory_path or "-")]
    if p.kind == pb.OPERATION_KIND_DELETE_SNAPSHOT:
        pairs.append(("Deletes", ", ".join(p.deletes)))
    if p.kind == pb.OPERATION_KIND_REVERT_SNAPSHOT:
        pairs.append(("Leaves the domain", "paused" if p.paused else "running"))
        risks = "; ".join(r.description for r in p.risks)
        pairs.append(("Risks", risks + " (refused without --force)" if p.risks else "none"))
    lines += key_values(pairs)
    lines.append("Disks:")
    rows = [(d.vdev, _method_word(d.method), d.backend, d.image, d.target or "-") for d in p.disks]
    lines.extend("  " + line for line in table(("Vdev", "Method", "Backend", "Image", "Tag/File"), rows))
    return lines
