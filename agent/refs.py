"""What a request names: a domain by name, uid or domid, a snapshot by name,
directory or uid (the oneofs `domain` and `snapshot` of domsnap.proto), as
the one string the service resolves: a domain's name or domid, a snapshot's
name or absolute path (a uid's is its directory, which the service then
checks is one of the request's domain's snapshots, as for a path)."""

from __future__ import annotations

import os
from collections.abc import Callable

from google.protobuf.message import Message

from .errors import InvalidArgument, NotFound, field_required
from .names import check_domain_name, check_name
from .uids import DomainUids


def domain(request: Message, uids: DomainUids, *, required: bool = True) -> str:
    """The domain's name or domid ("" when unset and not `required`)."""
    which = request.WhichOneof("domain")
    if which is None:
        if required:
            raise field_required("domain", "set domain_name, domain_uid or domid")
        return ""
    value = getattr(request, which)
    if which == "domid":
        return str(value)
    if which == "domain_uid":
        name = uids.name(value)
        if name is None:
            raise NotFound(f"no domain has uid {value!r}", reason="DOMAIN_NOT_FOUND", domain_uid=value)
        return name
    return check_domain_name(value)


def snapshot(request: Message, path_of_uid: Callable[[str], str | None], *, required: bool = True) -> str:
    """The snapshot's name or absolute directory ("" when unset and not `required`); `path_of_uid` finds
    a registered snapshot's directory by its uid."""
    which = request.WhichOneof("snapshot")
    if which is None:
        if required:
            raise field_required("snapshot", "set snapshot_name, snapshot_path or snapshot_uid")
        return ""
    value: str = getattr(request, which)
    if which == "snapshot_uid":
        if (path := path_of_uid(value)) is None:
            raise NotFound(f"no snapshot has uid {value!r}", reason="SNAPSHOT_NOT_FOUND", snapshot_uid=value)
        return path
    if which == "snapshot_path":
        if not os.path.isabs(value):
            raise InvalidArgument(f"snapshot_path {value!r}: not an absolute path", path=value)
        return value
    return check_name("snapshot", value)
