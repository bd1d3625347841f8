"""snapshot.json: the versioned manifest that makes a snapshot directory a
snapshot. Written last, atomically (write, fsync, rename, fsync the dir):
a directory without a valid manifest is no snapshot."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DomsnapError, FailedPrecondition, NotFound
from .fsutil import Staged, read_regular, write_atomic
from .fsutil import stage as stage_file
from .group_gate import Group
from .names import check_domain_name, check_labels, check_name
from .storage.base import DiskRecord
from .xldisk import valid_vdev

MANIFEST = "snapshot.json"
MEMORY = "memory.save"
FORMAT = "domsnap.snapshot"
VERSION = 1
# A manifest is a few KiB (the domain's config is at most 1 MiB, as the API
# takes it); anything larger is not one of ours.
MAX_BYTES = 2 << 20
# A qcow2 tag is a snapshot name; an LVM one, "<lv>.<name>" (LVM's characters, 127 at most).
_TAG = re.compile(r"[A-Za-z0-9._+][A-Za-z0-9._+-]{0,126}")
_UID_NAMESPACE = uuid.UUID("4c1d5f0e-9a57-4f0b-8d0e-6d6f6d736e61")

_FIRST_SECOND, _LAST_SECOND = -62135596800, 253402300799

@dataclass(frozen=True)
class Manifest:
    name: str
    domain: str
    description: str
    created_at: float
    finished_at: float
    # Run state at the snapshot instant: "running" or "paused".
    state: str
    live: bool
    domain_config: str
    disks: tuple[DiskRecord, ...]
    memory_file: str
    memory_bytes: int
    driver: str
    hypervisor_version: str
    facts: dict[str, str] = field(default_factory=dict)
    parent: str = ""
    downtime: float = 0.0
    agent_version: str = ""
    # Each frozen layer's {"size", "mtime_ns"} when the snapshot was taken:
    # a revert checks them (see layers.py). Older manifests have none.
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    # The snapshot's and its domain's uids (UUIDs); older manifests have none.
    uid: str = ""
    domain_uid: str = ""
    # The group snapshot this one is a member of ({} for none): its id, name
    # and members (see group_gate.Group).
    group: dict[str, Any] = field(default_factory=dict)
    # Wall-clock seconds when the guest paused for the instant and resumed (0: not recorded).
    paused_at: float = 0.0
    resumed_at: float = 0.0

    # The guest's filesystems were frozen at the instant (quiesce.py).
    quiesced: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    def snapshot_uid(self) -> str:
        """The uid, or for a manifest older than uids one derived from what never changes: the domain and
        the creation time."""
        return self.uid or str(uuid.uuid5(_UID_NAMESPACE, f"{self.domain}/{self.created_at!r}"))

    def to_json(self) -> str:
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION, **asdict(self)}
        data["disks"] = [d.to_dict() for d in self.disks]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.pop("format") != FORMAT:
                raise ValueError("not a domsnap manifest")
            if (version := data.pop("version")) != VERSION:
                raise ValueError(f"manifest version {version}, this agent reads {VERSION}")
            if not isinstance(data.get("disks"), list):
                raise TypeError("disks: not a list")
            data["disks"] = tuple(_disk(d) for d in data["disks"])
            m = cls(**data)
            m._check()
            return m
        except (ValueError, KeyError, TypeError, DomsnapError) as err:
            why = err.message if isinstance(err, DomsnapError) else err
            raise FailedPrecondition(f"{where}: not a valid snapshot manifest ({why})", reason="MANIFEST_INVALID",
                                     path=where) from err

    def _check(self) -> None:
        """Every field of the type it is declared with, names and paths of the
        form the agent writes: a manifest on disk is anyone's input."""
        kinds: dict[str, type | tuple[type, ...]] = {"str": str, "float": (int, float), "bool": bool, "int": int}
        for f in fields(self):
            value = getattr(self, f.name)
            kind = kinds.get(str(f.type))
            if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise TypeError(f"{f.name}: {type(value).__name__}, not {f.type}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(self.facts).items()):
            raise TypeError("facts: not a map of strings")
        for when in (self.created_at, self.finished_at, self.paused_at, self.resumed_at):
            # What a protobuf Timestamp can carry (years 1 to 9999): the listing sends them.
            if not _FIRST_SECOND <= when <= _LAST_SECOND:
                raise ValueError(f"time {when!r}: not a time of years 1 to 9999")
        if self.group:
            Group.from_dict(self.group)
        if not isinstance(self.labels, dict):
            raise TypeError("labels: not a map")
        check_labels(self.labels)
        check_name("snapshot", self.name)
        check_domain_name(self.domain)
        if self.parent:
            check_name("snapshot", self.parent)
        for r in self.disks:
            # They reach command lines (qemu-img, lvremove) and QMP.
            if not valid_vdev(r.vdev):
                raise ValueError(f"disk {r.vdev!r}: not a virtual device name")
            if r.tag and not _TAG.fullmatch(r.tag):
                raise ValueError(f"disk {r.vdev}: tag {r.tag!r} is not one the agent makes")
        for path in self.files():
            if not os.path.isabs(path) or "\0" in path or os.path.normpath(path) != path:
                raise ValueError(f"path {path!r}: not an absolute, normalized path")

    def files(self) -> list[str]:
        """Every file the manifest names: memory image, disk images, external snapshot files."""
        return [self.memory_file, *(f for r in self.disks for f in (r.image, r.file) if f)]


def _disk(data: Any) -> DiskRecord:
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise TypeError("disks: each entry must be a map of strings")
    return DiskRecord.from_dict(data)


def write(directory: Path, manifest: Manifest) -> None:
    write_atomic(directory / MANIFEST, manifest.to_json())


def stage(directory: Path, manifest: Manifest) -> Staged:
    """`write`'s first half (fsutil.stage): the manifest durable beside its
    place, where it makes no snapshot yet; fsutil.put_staged puts it there."""
    return stage_file(directory / MANIFEST, manifest.to_json())


def exists(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def read(directory: Path) -> Manifest:
    """The manifest of `directory`: a regular file, not a link, at most MAX_BYTES (fsutil.read_regular)."""
    path = directory / MANIFEST
    try:
        data = read_regular(path, MAX_BYTES)
    except FileNotFoundError:
        raise NotFound(f"{directory} holds no snapshot (no {MANIFEST})", reason="SNAPSHOT_NOT_FOUND",
                       path=str(directory)) from None
    except OSError as err:
        raise FailedPrecondition(f"{path}: not a snapshot manifest ({err.strerror or err})", reason="MANIFEST_INVALID",
                                 path=str(path)) from err
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise FailedPrecondition(f"{path}: not a snapshot manifest (not UTF-8)", reason="MANIFEST_INVALID",
                                 path=str(path)) from err
    return Manifest.from_json(text, str(path))
