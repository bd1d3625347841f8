"""The `group-snapshot-*` verbs: DOMAIN@ADDR arguments in, the group calls
of the client library (group.py), each member's progress and result out."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import views
from .exits import EXIT_OK, UsageError

if TYPE_CHECKING:
    from . import group
    from .commands import Session
    from .progress import MemberLines


def _members(ns: argparse.Namespace) -> tuple[group.Member, ...]:
    from . import group

    try:
        return group.parse_members(ns.members)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _lines(s: Session) -> MemberLines:
    # Loaded here: `domsnap list` and the other reads start without the renderers.
    from .progress import MemberLines

    return MemberLines(json=s.json, out=s.out, err=s.err)


def cmd_group_snapshot_create(s: Session, ns: argparse.Namespace) -> int:
    from . import group

    members = _members(ns)
    from .calls import Quiesce

    snaps = group.create(ns.name, members, live=ns.live, lease=ns.lease,
                         quiesce=Quiesce() if ns.quiesce else None, on_progress=_lines(s),
                         ca=s.tls.ca, cert=s.tls.cert, key=s.tls.key)
    if s.json:
        s.print_json({str(m): views.to_dict(snap) for m, snap in snaps.items()})
        return EXIT_OK
    for m, snap in snaps.items():
        s.out.write(f"{m}: snapshot {snap.name} in {snap.path}, guest paused "
                    f"{views.human_duration(snap.downtime.ToNanoseconds() / 1e9)}\n")
    return EXIT_OK


def cmd_group_snapshot_revert(s: Session, ns: argparse.Namespace) -> int:
    from . import group

    members = _members(ns)
    group.revert(ns.name, members, paused=ns.paused, on_progress=_lines(s), ca=s.tls.ca, cert=s.tls.cert,
                 key=s.tls.key)
    state = "paused" if ns.paused else "running"
    if s.json:
        s.print_json({str(m): state for m in members})
        return EXIT_OK
    for m in members:
        s.out.write(f"{m}: back at {ns.name}, {state}\n")
    return EXIT_OK


def cmd_group_snapshot_list(s: Session, ns: argparse.Namespace) -> int:
    from . import group

    listings = group.list_groups(_members(ns), deadline=s.timeout, ca=s.tls.ca, cert=s.tls.cert, key=s.tls.key)
    if s.json:
        s.print_json({"groups": [{"name": g.name, "id": g.id, "members": list(g.members), "complete": g.complete,
                                  "found": sorted(str(m) for m in g.found)} for g in listings]})
        return EXIT_OK
    rows = []
    for g in listings:
        created = min((snap.created_at for snap in g.found.values()), key=lambda t: t.ToNanoseconds())
        status = "complete" if g.complete else f"incomplete: {len(g.found)} of {len(g.members)} members"
        rows.append([g.name, views.local_time(created, utc=s.utc), status, " ".join(g.members)])
    for line in views.table(["Name", "Created", "Status", "Members"], rows):
        s.out.write(line + "\n")
    return EXIT_OK


def cmd_group_snapshot_delete(s: Session, ns: argparse.Namespace) -> int:
    from . import group

    deleted = group.delete(ns.name, _members(ns), on_progress=_lines(s), ca=s.tls.ca, cert=s.tls.cert,
                           key=s.tls.key)
    if s.json:
        s.print_json({"deleted": [str(m) for m in deleted]})
        return EXIT_OK
    s.out.write(f"group snapshot {ns.name} deleted on {', '.join(map(str, deleted)) or 'no member'}\n")
    return EXIT_OK
