"""Which snapshots each domain has and where they live.

The snapshot directories (with their manifests) are the truth; the catalogue
is an index under the state directory: `catalogue/<domain>/<name>` holds the
directory's path, `catalogue/<domain>/.current` the name of the snapshot the
domain's present state descends from.
"""

from __future__ import annotations

import logging
import os
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
        self._manifests: dict[Path, tuple[tuple[int, int, int], Manifest]] = {}
        self._paths: dict[Path, Path] = {}

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
        index = d / check_name("snapshot", name)
        self._paths.pop(index, None)
        write_atomic(index, f"{path}\n")

    def unregister(self, domain: str, name: str) -> None:
        index = self._dir(domain) / check_name("snapshot", name)
        self._paths.pop(index, None)
        index.unlink(missing_ok=True)

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
        m = self._manifest(path)
        if m.domain != domain:
            raise NotFound(f"{path} is a snapshot of domain {m.domain}, not of {domain}")
        return path, m

    def domains(self) -> list[str]:
        if not self._root.is_dir():
            return []
        return sorted(p.name for p in self._root.iterdir() if p.is_dir())

    def _manifest(self, path: Path) -> Manifest:
        """A snapshot's manifest, parsed once per version of the file: a listing
        of thousands of snapshots then costs a stat each, not a parse."""
        mpath = path / manifest.MANIFEST
        try:
            st = os.lstat(mpath)
        except FileNotFoundError:
            raise NotFound(f"{path} holds no snapshot (no {manifest.MANIFEST})") from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._manifests.get(mpath)
        if cached is not None and cached[0] == key:
            return cached[1]
        m = manifest.read(path)
        self._manifests[mpath] = (key, m)
        return m

    def entries(self, domain: str) -> list[Entry]:
        d = self._dir(domain)
        if not d.is_dir():
            return []
        current = self.current(domain)
        out = []
        with os.scandir(d) as it:
            names = sorted(e.name for e in it if not e.name.startswith("."))
        for name in names:
            path = self._index_path(d / name)
            try:
                out.append(Entry(path, self._manifest(path), name == current))
            except DomsnapError as err:
                log.warning("catalogue: %s/%s points at %s: %s", domain, name, path, err.message)
        return sorted(out, key=lambda e: e.manifest.created_at)

    def _index_path(self, index: Path) -> Path:
        # Index files never change once written (a name is registered once),
        # so their content is remembered.
        if (path := self._paths.get(index)) is None:
            path = self._paths[index] = Path(index.read_text().strip())
        return path
