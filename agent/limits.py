"""Size limits of every request field, checked before a request reaches the servicer.

One table, by field name, covers every string field of every domsnap.v1
request (a unit test fails when a new one is missing); the messages of other
services (health, reflection) get `DEFAULT_STRING`. `check_request` also
refuses NUL characters, which no name, path or cfg text may hold, and enum
numbers the proto does not define. The server's maximum message size follows
from the same numbers.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import InvalidArgument

KiB = 1 << 10
MiB = 1 << 20

NAME = 64  # domain and snapshot names ([A-Za-z0-9._-]{1,64}), domids
ID = 128  # request and operation ids, chosen by clients
PATH = 4096  # PATH_MAX
TEXT = 4096  # free text: a description
CFG = 1 * MiB  # a cfg file's text
OVERRIDE = PATH  # one KEY=VALUE setting
MAX_OVERRIDES = 256
DEFAULT_STRING = 4096

# Bytes (UTF-8) per string, by field name.
STRING_LIMITS: dict[str, int] = {
    "domain": NAME,
    "domain_name": NAME,
    "domain_uid": ID,
    "snapshot_uid": ID,
    "name": NAME,
    "new_name": NAME,
    "vdev": NAME,
    "request_id": ID,
    "operation_id": ID,
    "snapshot_name": NAME,
    "snapshot_path": PATH,
    "path": PATH,
    "description": TEXT,
    "config": CFG,
    "config_name": PATH,
    "overrides": OVERRIDE,
    # An opaque listing position the agent made (a name and a domain at most).
    "page_token": 2 * PATH,
    # A change feed token (an epoch and a number).
    "since": ID,
    # A group snapshot's id (the coordinator's choice), and its members:
    # DOMAIN@ADDR, ADDR a socket path (108 bytes at most) or HOST:PORT (a DNS
    # name is 253 at most). Every member is in every member's manifest.
    "id": ID,
    "members": NAME + 1 + 253 + 1 + 5 + 2,
}
# Items per repeated field, by field name.
REPEATED_LIMITS: dict[str, int] = {"overrides": MAX_OVERRIDES}
DEFAULT_REPEATED = 256

# The largest valid request (CreateSnapshotRequest: cfg text, every override,
# a path, the cfgfile's name, names, ids, a description) with room for protobuf's framing.
MAX_REQUEST_BYTES = CFG + MAX_OVERRIDES * (OVERRIDE + 8) + 2 * PATH + TEXT + 3 * NAME + 2 * ID + 64 * KiB


def check_request(msg: Message) -> None:
    """InvalidArgument naming the first field over its limit, holding a NUL, or an unknown enum value."""
    for field, value in msg.ListFields():
        name = field.name
        kind = field.type
        values = list(value) if field.is_repeated else [value]
        if kind == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None \
                and field.message_type.GetOptions().map_entry:
            # A map<string, string> (labels): its keys and values, as strings.
            values, kind = [text for pair in value.items() for text in pair], FieldDescriptor.TYPE_STRING
        if field.is_repeated:
            most = REPEATED_LIMITS.get(name, DEFAULT_REPEATED)
            if len(values) > most:
                raise InvalidArgument(f"{name}: {len(values)} items, at most {most}", reason="FIELD_TOO_LONG",
                                      field=name)
        for item in values:
            if kind == FieldDescriptor.TYPE_STRING:
                _check_string(name, item)
            elif kind == FieldDescriptor.TYPE_BYTES and len(item) > STRING_LIMITS.get(name, DEFAULT_STRING):
                raise InvalidArgument(f"{name}: {len(item)} bytes, at most {STRING_LIMITS.get(name, DEFAULT_STRING)}",
                                      reason="FIELD_TOO_LONG", field=name)
            elif kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None \
                    and field.enum_type.values_by_number.get(item) is None:
                raise InvalidArgument(f"{name}: {item} is not a {field.enum_type.name} value", field=name)
            elif kind == FieldDescriptor.TYPE_MESSAGE:
                check_request(item)


def _check_string(name: str, text: str) -> None:
    limit = STRING_LIMITS.get(name, DEFAULT_STRING)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgument(f"{name}: {size} bytes, at most {limit}", reason="FIELD_TOO_LONG", field=name)
    if "\0" in text:
        raise InvalidArgument(f"{name}: contains a NUL character", field=name)
