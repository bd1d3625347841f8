"""What the agent does, in its own terms (dataclasses in, dataclasses out);
the gRPC servicer only translates."""

from __future__ import annotations

import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from domsnap import __version__
from domsnap.agent.catalogue import Catalogue, Entry, Page, Render
from domsnap.agent.config import AgentConfig
from domsnap.agent.domain import Domain, DomainConfig
from domsnap.agent.drivers.base import Hypervisor
from domsnap.agent.errors import InvalidArgument, NotFound
from domsnap.agent.journal import Entry as JournalEntry
from domsnap.agent.journal import Journal
from domsnap.agent.operations import Observer, Operation, Operations, OpKind
from domsnap.agent.snapshot_create import CreateRequest, SnapshotCreate
from domsnap.agent.snapshot_delete import SnapshotDelete
from domsnap.agent.snapshot_revert import RevertRequest, SnapshotRevert
from domsnap.agent.storage import Backends

API_VERSION = "domsnap.v1"
REMEMBERED_ANSWERS = 1000
# ListSnapshots pages: at most this many snapshots, and about this many bytes
# (well under gRPC's 4 MiB default message limit whatever the descriptions).
PAGE_SIZE = 1000
PAGE_BYTES = 2 << 20

log = logging.getLogger(__name__)


class _Recoverable(Protocol):
    async def recover(self, journal: JournalEntry) -> str: ...


@dataclass(frozen=True)
class AgentInfo:
    agent_version: str
    driver: str
    hypervisor_version: str
    hostname: str
    snapshot_root: Path
    capabilities: list[str]
    api_version: str = API_VERSION


class AgentService:
    def __init__(self, config: AgentConfig, driver: Hypervisor, backends: Backends, render: Render,
                 observer: Observer | None = None) -> None:
        self.config = config
        self.driver = driver
        self.operations = Operations(observer)
        self.catalogue = Catalogue(config.state_dir, render)
        self.journal = Journal(config.state_dir, fault_injection=config.testing.fault_injection)
        self._create = SnapshotCreate(driver, backends, self.catalogue, self.journal, config.snapshot_root,
                                      config.roots, config.state_dir)
        self._revert = SnapshotRevert(driver, backends, self.catalogue, self.journal)
        self._delete = SnapshotDelete(driver, backends, self.catalogue, self.journal)
        self._answers: OrderedDict[str, Domain] = OrderedDict()
        self._procedures: dict[str, _Recoverable] = {
            "create": self._create, "revert": self._revert, "delete": self._delete}

    async def info(self) -> AgentInfo:
        return AgentInfo(__version__, self.driver.name, await self.driver.probe(), socket.gethostname(),
                         self.config.snapshot_root, self.driver.capabilities())

    async def recover(self) -> int:
        """Bring the catalogue's index in line with the manifests, then finish
        or roll back what a dead agent left in the journal; returns how many
        operations."""
        self.catalogue.check()
        entries = self.journal.pending()
        for entry in entries:
            procedure = self._procedures[entry.kind]
            try:
                outcome = await procedure.recover(entry)
            except Exception:
                log.exception("recovery of %s %s on %s failed; its journal entry is kept", entry.kind,
                              entry.snapshot, entry.domain)
                continue
            await self.journal.finish(entry)
            log.info("recovered %s of snapshot %s on domain %s (operation %s): %s", entry.kind, entry.snapshot,
                     entry.domain, entry.op_id, outcome)
        return len(entries)

    # --------------------------------------------------------------- domains

    async def list_domains(self) -> list[Domain]:
        return await self.driver.list_domains()

    async def get_domain(self, ref: str) -> Domain:
        return await self.driver.lookup(ref)

    async def _once(self, request_id: str, call: Callable[[], Awaitable[Domain]]) -> Domain:
        """A retried request (same request_id) gets the first one's answer
        instead of being done twice."""
        if not request_id:
            return await call()
        if (seen := self._answers.get(request_id)) is not None:
            return seen
        result = await call()
        self._answers[request_id] = result
        while len(self._answers) > REMEMBERED_ANSWERS:
            self._answers.popitem(last=False)
        return result

    async def create_domain(self, text: str, overrides: tuple[str, ...], *, paused: bool, request_id: str = "",
                            ) -> Domain:
        async def create() -> Domain:
            config = DomainConfig.parse(text, overrides)
            self.operations.check_idle(config.name)
            return await self.driver.create(config, paused=paused)

        return await self._once(request_id, create)

    async def _domain_call(self, ref: str, request_id: str,
                           action: Callable[[str], Awaitable[Domain | None]]) -> Domain:
        """A lifecycle call on an idle domain; answers the domain as it is after
        (or, when the action returns nothing, as it was before)."""

        async def call() -> Domain:
            domain = await self.driver.lookup(ref)
            self.operations.check_idle(domain.name)
            return await action(domain.name) or domain

        return await self._once(request_id, call)

    async def destroy_domain(self, ref: str, request_id: str = "") -> Domain:
        return await self._domain_call(ref, request_id, self.driver.destroy)

    async def pause_domain(self, ref: str, request_id: str = "") -> Domain:
        return await self._domain_call(ref, request_id, self.driver.pause)

    async def unpause_domain(self, ref: str, request_id: str = "") -> Domain:
        return await self._domain_call(ref, request_id, self.driver.unpause)

    # ------------------------------------------------------------- snapshots

    async def create_snapshot(self, req: CreateRequest, request_id: str) -> Operation:
        domain = await self.driver.lookup(req.domain)
        if (seen := self.operations.replay(request_id, OpKind.CREATE, domain.name)) is not None:
            return seen
        # Validated before the operation exists: a refusal is one plain error.
        self.operations.check_idle(domain.name)
        plan = await self._create.prepare(domain, req)
        return self.operations.start(OpKind.CREATE, domain.name, req.name, request_id,
                                     lambda op: self._create.run(op, req, plan))

    async def revert_snapshot(self, req: RevertRequest, request_id: str) -> Operation:
        name = await self._domain_name(req.domain)
        if (seen := self.operations.replay(request_id, OpKind.REVERT, name)) is not None:
            return seen
        self.operations.check_idle(name)
        plan = await self._revert.prepare(RevertRequest(name, req.snapshot, req.run_after, req.force))
        return self.operations.start(OpKind.REVERT, name, plan.manifest.name, request_id,
                                     lambda op: self._revert.run(op, plan))

    async def _domain_name(self, ref: str) -> str:
        """A running domain's name, or a name the catalogue knows (a gone domain can be reverted)."""
        try:
            return (await self.driver.lookup(ref)).name
        except NotFound:
            if ref in self.catalogue.domains():
                return ref
            raise

    async def list_snapshots(self, domain: str, page_size: int = 0, page_token: str = "") -> Page:
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative")
        name = await self._domain_name(domain) if domain else ""
        return self.catalogue.page(name, min(page_size or PAGE_SIZE, PAGE_SIZE), page_token, PAGE_BYTES)

    async def list_operations(self, domain: str) -> list[Operation]:
        return self.operations.list(await self._domain_name(domain) if domain else "")

    async def get_snapshot(self, domain: str, ref: str) -> Entry:
        name = await self._domain_name(domain)
        path, m = self.catalogue.resolve(name, ref)
        return Entry(path, m, self.catalogue.current(name) == m.name)

    async def delete_snapshot(self, domain: str, ref: str, children: bool, request_id: str) -> Operation:
        name = await self._domain_name(domain)
        if (seen := self.operations.replay(request_id, OpKind.DELETE, name)) is not None:
            return seen
        self.operations.check_idle(name)
        plan = await self._delete.prepare(name, ref, children)
        return self.operations.start(OpKind.DELETE, name, plan.doomed[-1].manifest.name, request_id,
                                     lambda op: self._delete.run(op, plan))
