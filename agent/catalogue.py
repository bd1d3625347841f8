"""Which snapshots each domain has and where they live.

The snapshot directories (with their manifests) are the truth; the catalogue
is an index under the state directory: `catalogue/<domain>/<name>` holds the
directory's path, `catalogue/<domain>/.current` the name of the snapshot the
domain's present state descends from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from domsnap.agent import manifest
from domsnap.agent.errors import DomsnapError, NotFound
from domsnap.agent.fsutil import write_atomic
from domsnap.agent.manifest import Manifest
from domsnap.agent.names import check_domain_name, check_name

log = logging.getLogger(__name__)

CURRENT = ".current"


@dataclass(frozen=True)
class Entry:
    path: Path
    manifest: Manifest
    current: bool


class Catalogue:
    def __init__(self, state_dir: Path) -> None:
        self._root = state_dir / "catalogue"

    def _dir(self, domain: str) -> Path:
        return self._root / check_domain_name(domain)

    def path_of(self, domain: str, name: str) -> Path | None:
        try:
            return Path((self._dir(domain) / check_name("snapshot", name)).read_text().strip())
        except FileNotFoundError:
            return None

    def register(self, domain: str, name: str, path: Path) -> None:
        d = self._dir(domain)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / check_name("snapshot", name), f"{path}\n")

    def unregister(self, domain: str, name: str) -> None:
        (self._dir(domain) / check_name("snapshot", name)).unlink(missing_ok=True)

    def current(self, domain: str) -> str:
        try:
            return (self._dir(domain) / CURRENT).read_text().strip()
        except FileNotFoundError:
            return ""

    def set_current(self, domain: str, name: str) -> None:
        d = self._dir(domain)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / CURRENT, f"{name}\n")

    def resolve(self, domain: str, ref: str) -> tuple[Path, Manifest]:
        """A snapshot by name (in the domain's index) or by its directory."""
        if "/" in ref:
            path = Path(ref)
        elif (found := self.path_of(domain, ref)) is not None:
            path = found
        else:
            raise NotFound(f"domain {domain} has no snapshot named {ref!r}")
        m = manifest.read(path)
        if m.domain != domain:
            raise NotFound(f"{path} is a snapshot of domain {m.domain}, not of {domain}")
        return path, m

    def domains(self) -> list[str]:
        if not self._root.is_dir():
            return []
        return sorted(p.name for p in self._root.iterdir() if p.is_dir())

    def entries(self, domain: str) -> list[Entry]:
        d = self._dir(domain)
        if not d.is_dir():
            return []
        current = self.current(domain)
        out = []
        for f in sorted(d.iterdir()):
            if f.name.startswith("."):
                continue
            path = Path(f.read_text().strip())
            try:
                out.append(Entry(path, manifest.read(path), f.name == current))
            except DomsnapError as err:
                log.warning("catalogue: %s/%s points at %s: %s", domain, f.name, path, err.message)
        return sorted(out, key=lambda e: e.manifest.created_at)
