"""snapshot.json: the versioned manifest that makes a snapshot directory a
snapshot. Written last, atomically (write, fsync, rename, fsync the dir):
a directory without a valid manifest is no snapshot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from domsnap.agent.errors import FailedPrecondition, NotFound
from domsnap.agent.fsutil import write_atomic
from domsnap.agent.storage.base import DiskRecord

MANIFEST = "snapshot.json"
MEMORY = "memory.save"
FORMAT = "domsnap.snapshot"
VERSION = 1


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
            data["disks"] = tuple(DiskRecord.from_dict(d) for d in data["disks"])
            return cls(**data)
        except (ValueError, KeyError, TypeError) as err:
            raise FailedPrecondition(f"{where}: not a valid snapshot manifest ({err})") from err


def write(directory: Path, manifest: Manifest) -> None:
    write_atomic(directory / MANIFEST, manifest.to_json())


def exists(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def read(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"{directory} holds no snapshot (no {MANIFEST})") from None
    return Manifest.from_json(text, str(path))
