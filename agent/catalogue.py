"""Which snapshots each domain has and where they live.

The snapshot directories (with their manifests) are the truth; the catalogue
is an index under the state directory: `catalogue/<domain>/<name>` holds the
directory's path, `catalogue/<domain>/.current` the name of the snapshot the
domain's present state descends from. Listings come from a second index,
`catalogue.sqlite` (catalogue_index.py), kept in step with every register,
unregister and manifest rewrite, and checked against the manifests on start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from . import manifest
from .catalogue_index import CatalogueIndex, Key, Row, decode_token, encode_token
from .errors import DomsnapError, NotFound
from .fsutil import write_atomic
from .manifest import Manifest
from .names import check_domain_name, check_name

log = logging.getLogger(__name__)

CURRENT = ".current"


@dataclass(frozen=True)
class Entry:
    path: Path
    manifest: Manifest
    current: bool


# A snapshot as the API lists it, serialized (the index stores it as is).
Render = Callable[[Path, Manifest], bytes]


class Listed(NamedTuple):
    listing: bytes
    current: bool


@dataclass(frozen=True)
class Page:
    snapshots: list[Listed]
    # "" on the last page.
    next_token: str


def _stamp(mpath: Path) -> tuple[int, int, int] | None:
    try:
        # lstat: a manifest is never followed through a link (see manifest.read).
        st = os.lstat(mpath)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Catalogue:
    def __init__(self, state_dir: Path, render: Render) -> None:
        self._root = state_dir / "catalogue"
        self._manifests: dict[Path, tuple[tuple[int, int, int], Manifest]] = {}
        self._paths: dict[Path, Path] = {}
        self._current: dict[str, str] = {}
        self._render = render
        self._index = CatalogueIndex(state_dir)

    def close(self) -> None:
        """Let go of the index file (its last writes are checkpointed into it)."""
        self._index.close()

    def _dir(self, domain: str) -> Path:
        return self._root / check_domain_name(domain)

    def path_of(self, domain: str, name: str) -> Path | None:
        try:
            return Path((self._dir(domain) / check_name("snapshot", name)).read_text().strip())
        except FileNotFoundError:
            return None

    def register(self, domain: str, name: str, path: Path, *, durable: bool = True,
                 written: Manifest | None = None) -> Path:
        """Returns the file written (see fsutil.write_atomic for `durable`).
        `written`: the manifest the caller has just written there, which
        then need not be read back."""
        d = self._dir(domain)
        d.mkdir(parents=True, exist_ok=True)
        index = d / check_name("snapshot", name)
        self._paths.pop(index, None)
        write_atomic(index, f"{path}\n", durable=durable)
        mpath = path / manifest.MANIFEST
        if written is not None and (stamp := _stamp(mpath)) is not None:
            self._manifests[mpath] = (stamp, written)
        self.reindex(domain, name, path)
        return index

    def reindex(self, domain: str, name: str, path: Path) -> None:
        """Bring the snapshot's row in the index up to its manifest (after it was written)."""
        self._index.update(put=[self._row(domain, name, path)])

    def unregister(self, domain: str, name: str) -> None:
        index = self._dir(domain) / check_name("snapshot", name)
        self._paths.pop(index, None)
        index.unlink(missing_ok=True)
        self._index.update(remove=[(domain, name)])

    def path_of_uid(self, uid: str) -> str | None:
        """The directory of the registered snapshot with this uid (any domain's)."""
        return self._index.path_of_uid(uid)

    def current(self, domain: str) -> str:
        # The agent is the file's only writer: read once, then remembered.
        if (name := self._current.get(domain)) is None:
            try:
                name = (self._dir(domain) / CURRENT).read_text().strip()
            except FileNotFoundError:
                name = ""
            self._current[domain] = name
        return name

    def set_current(self, domain: str, name: str, *, durable: bool = True) -> Path:
        """Returns the file written (see fsutil.write_atomic for `durable`)."""
        d = self._dir(domain)
        d.mkdir(parents=True, exist_ok=True)
        self._current.pop(domain, None)
        write_atomic(d / CURRENT, f"{name}\n", durable=durable)
        self._current[domain] = name
        return d / CURRENT

    def resolve(self, domain: str, ref: str) -> tuple[Path, Manifest]:
        """A snapshot by name (in the domain's index) or by its directory."""
        if "/" in ref:
            path = Path(ref)
        elif (found := self.path_of(domain, ref)) is not None:
            path = found
        else:
            raise NotFound(f"domain {domain} has no snapshot named {ref!r}", reason="SNAPSHOT_NOT_FOUND", domain=domain,
                           snapshot=ref)
        m = self._manifest(path)
        if m.domain != domain:
            raise NotFound(f"{path} is a snapshot of domain {m.domain}, not of {domain}", reason="SNAPSHOT_NOT_FOUND",
                           domain=domain, path=str(path))
        return path, m

    def domains(self) -> list[str]:
        if not self._root.is_dir():
            return []
        return sorted(p.name for p in self._root.iterdir() if p.is_dir())

    def _manifest(self, path: Path) -> Manifest:
        """A snapshot's manifest, parsed once per version of the file: a listing
        of thousands of snapshots then costs a stat each, not a parse."""
        mpath = path / manifest.MANIFEST
        if (key := _stamp(mpath)) is None:
            raise NotFound(f"{path} holds no snapshot (no {manifest.MANIFEST})", reason="SNAPSHOT_NOT_FOUND",
                           path=str(path))
        cached = self._manifests.get(mpath)
        if cached is not None and cached[0] == key:
            return cached[1]
        m = manifest.read(path)
        self._manifests[mpath] = (key, m)
        return m

    def _registered(self, domain: str) -> Iterator[tuple[str, Path]]:
        """(name, directory) of every snapshot registered for the domain, by name."""
        d = self._dir(domain)
        if not d.is_dir():
            return
        with os.scandir(d) as it:
            names = sorted(e.name for e in it if not e.name.startswith(".") and not e.name.endswith(".tmp"))
        for name in names:
            yield name, self._index_path(d / name)

    def entries(self, domain: str) -> list[Entry]:
        current = self.current(domain)
        out = []
        for name, path in self._registered(domain):
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

    def _row(self, domain: str, name: str, path: Path) -> Row:
        m = self._manifest(path)
        stamp = _stamp(path / manifest.MANIFEST)
        return Row(domain, name, str(path), m.created_at, repr(stamp), self._render(path, m), m.snapshot_uid())

    def check(self) -> int:
        """Bring the index in line with the registered snapshots' manifests
        (run on start): rows missing, stale (their manifest changed) or
        orphaned (no longer registered) are redone. Returns how many."""
        indexed = self._index.stamps()
        put: list[Row] = []
        seen: set[tuple[str, str]] = set()
        for domain in self.domains():
            for name, path in self._registered(domain):
                key = (domain, name)
                if indexed.get(key) == (str(path), repr(_stamp(path / manifest.MANIFEST))):
                    seen.add(key)
                    continue
                try:
                    put.append(self._row(domain, name, path))
                    seen.add(key)
                except DomsnapError as err:
                    log.warning("catalogue: %s/%s points at %s: %s", domain, name, path, err.message)
        remove = set(indexed) - seen
        self._index.update(put=put, remove=remove)
        if put or remove:
            log.info("catalogue index: %d row(s) redone, %d removed, %d checked", len(put), len(remove), len(seen))
        return len(put) + len(remove)

    def page(self, domain: str, size: int, token: str, max_bytes: int) -> Page:
        """One page of the listing (AIP-158): one domain's snapshots, or every
        domain's with domain "", by domain then creation time."""
        after: Key | None = decode_token(token, domain) if token else None
        rows, more = self._index.page(domain, after, size, max_bytes)
        listed = [Listed(r.listing, self.current(r.domain) == r.name) for r in rows]
        return Page(listed, encode_token(domain, rows[-1].key) if more and rows else "")
