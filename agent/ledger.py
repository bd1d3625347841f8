"""What a snapshot's manifest may make the agent touch.

A manifest lies in a folder and may have been written by anyone: it is data,
never authority. A revert or delete touches only the files inside the
snapshot's own folder, and outside it only the files the agent itself
recorded when it made the snapshot: `ledger/<domain>/<name>.json` in the
state dir, written when the snapshot is registered, holds its folder and
every file outside it that its manifest names (the disk images its tags live
in or its overlays freeze, a memory image or overlay placed elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import FailedPrecondition
from .fsutil import read_regular, write_atomic
from .manifest import Manifest
from .names import check_domain_name, check_name

MAX_BYTES = 1 << 20


def outside(snapdir: Path, files: Iterable[str]) -> list[str]:
    """The files that do not lie directly inside `snapdir`."""
    return sorted({f for f in files if f and Path(f).parent != snapdir})


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self._root = state_dir / "ledger"

    def _path(self, domain: str, name: str) -> Path:
        return self._root / check_domain_name(domain) / f"{check_name('snapshot', name)}.json"

    def record(self, domain: str, name: str, snapdir: Path, files: Iterable[str], *, durable: bool = True) -> Path:
        """Returns the file written (see fsutil.write_atomic for `durable`)."""
        path = self._path(domain, name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, json.dumps({"snapdir": str(snapdir), "files": outside(snapdir, files)}), durable=durable)
        return path

    def extend(self, domain: str, name: str, snapdir: Path, files: Iterable[str]) -> None:
        """More files outside its folder the agent made a snapshot's manifest name (a merge repointed it)."""
        self.record(domain, name, snapdir, [*self._recorded(domain, name, snapdir), *files])

    def forget(self, domain: str, name: str) -> None:
        self._path(domain, name).unlink(missing_ok=True)

    def _recorded(self, domain: str, name: str, snapdir: Path) -> set[str]:
        try:
            data = json.loads(read_regular(self._path(domain, name), MAX_BYTES))
        except FileNotFoundError:
            return set()
        if data.get("snapdir") != str(snapdir):
            return set()
        return set(data.get("files", []))

    def check(self, snapdir: Path, m: Manifest, doing: str) -> None:
        """Refuse, naming them, the files outside `snapdir` that the agent did not record for this snapshot."""
        foreign = [f for f in outside(snapdir, m.files()) if f not in self._recorded(m.domain, m.name, snapdir)]
        if foreign:
            raise FailedPrecondition(
                f"refusing to {doing} snapshot {m.name} in {snapdir}: its manifest names "
                f"{', '.join(foreign)}, outside the snapshot's folder and not made by this agent for it")
