"""Domains' uids: a UUID per domain name, given the first time the agent sees
the domain and kept in `state_dir/domain-uids.json`, so that it survives
reverts (which destroy and restore the domain under its name) and agent
restarts. A domain destroyed through the agent loses its uid; created anew,
it gets a new one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path

from .fsutil import read_regular, write_atomic

FILE = "domain-uids.json"
MAX_BYTES = 4 << 20


class DomainUids:
    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / FILE
        try:
            data = json.loads(read_regular(self._path, MAX_BYTES))
        except FileNotFoundError:
            data = {}
        self._by_name: dict[str, str] = {str(k): str(v) for k, v in dict(data).items()}

    def _save(self) -> None:
        write_atomic(self._path, json.dumps(self._by_name, sort_keys=True))

    def uid(self, name: str) -> str:
        """The domain's uid, given now if it has none."""
        return self.of([name])[0]

    def of(self, names: Iterable[str]) -> list[str]:
        """Each domain's uid, those it has none given now (saved once for all)."""
        names = list(names)
        new = {n: str(uuid.uuid4()) for n in names if n not in self._by_name}
        if new:
            self._by_name.update(new)
            self._save()
        return [self._by_name[n] for n in names]

    def known(self, name: str) -> str:
        """The domain's uid, or "" if it has none (a domain only snapshots remember)."""
        return self._by_name.get(name, "")

    def name(self, uid: str) -> str | None:
        return next((n for n, u in self._by_name.items() if u == uid), None)

    def adopt(self, name: str, uid: str) -> None:
        """A domain brought back by a revert takes the uid its snapshot recorded, unless it has one."""
        if uid and name not in self._by_name:
            self._by_name[name] = uid
            self._save()

    def forget(self, name: str) -> None:
        if self._by_name.pop(name, None) is not None:
            self._save()
