"""What the agent does, in its own terms (dataclasses in, dataclasses out);
the gRPC servicer only translates."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from time import time
from typing import Protocol

from domsnap import __version__

from . import layers, paging, runner
from .catalogue import Catalogue, Entry, Page, Render
from .config import AgentConfig
from .domain import Domain, DomainConfig, RunState
from .drivers.base import Hypervisor
from .errors import DomsnapError, FailedPrecondition, InternalError, InvalidArgument, NotFound
from .feed import Change, ChangeKind, Feed
from .group_gate import Gate, Group, OnReached, lease_of
from .journal import Journal, JournalEntry
from .ledger import Ledger
from .names import unique_name
from .op_history import DAY, History
from .operations import FINAL, Body, Observer, Operation, Operations, OpKind, OpState
from .paths import confine
from .progress import Phase, Progress, ignore_progress
from .snapshot_create import CreateRequest, SnapshotCreate
from .snapshot_create import Plan as CreatePlan
from .snapshot_delete import DeletePlan, SnapshotDelete
from .snapshot_edit import SnapshotEdit
from .snapshot_revert import RevertPlan, RevertRequest, SnapshotRevert, Stranded
from .storage import Backends
from .uids import DomainUids

API_VERSION = "domsnap.v1"
# ListSnapshots pages: at most this many snapshots, and about this many bytes
# (well under gRPC's 4 MiB default message limit whatever the descriptions).
PAGE_SIZE = 1000
PAGE_BYTES = 2 << 20
OPERATIONS_PAGE_SIZE = 500
# What a succeeded operation did, in the change feed's terms.
_DONE = {OpKind.CREATE: ChangeKind.SNAPSHOT_CREATED, OpKind.REVERT: ChangeKind.DOMAIN_REVERTED,
         OpKind.DELETE: ChangeKind.SNAPSHOT_DELETED}

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
    event_token: str
    api_version: str = API_VERSION


@dataclass(frozen=True)
class OperationFilter:
    """ListOperations' filters; an empty field matches anything."""

    domain: str = ""
    state: OpState | None = None
    kind: OpKind | None = None
    request_id: str = ""

    def __call__(self, op: Operation) -> bool:
        return ((not self.domain or op.domain == self.domain) and (self.state is None or op.state == self.state)
                and (self.kind is None or op.kind == self.kind)
                and (not self.request_id or op.request_id == self.request_id))


@dataclass(frozen=True)
class OperationPage:
    operations: list[Operation]
    next_token: str
    event_token: str


class AgentService:
    def __init__(self, config: AgentConfig, driver: Hypervisor, backends: Backends, render: Render,
                 observer: Observer | None = None) -> None:
        self.config = config
        self.driver = driver
        self._history = History(config.state_dir, keep=config.operation_history_days * DAY)
        self.feed = Feed(config.state_dir, keep=config.operation_history_days * DAY)
        self.operations = Operations(observer, self._history, on_change=self._operation_changed)
        self.catalogue = Catalogue(config.state_dir, render)
        self.journal = Journal(config.state_dir, fault_injection=config.testing.fault_injection)
        ledger = Ledger(config.state_dir)
        self._backends = backends
        self._create = SnapshotCreate(driver, backends, self.catalogue, self.journal, ledger, config.snapshot_root,
                                      config.roots, config.state_dir)
        self._revert = SnapshotRevert(driver, backends, self.catalogue, self.journal, ledger)
        self._delete = SnapshotDelete(driver, backends, self.catalogue, self.journal, ledger)
        self._edit = SnapshotEdit(self.catalogue, self.journal, ledger)
        self.uids = DomainUids(config.state_dir)
        self._procedures: dict[str, _Recoverable] = {
            "create": self._create, "revert": self._revert, "delete": self._delete, "rename": self._edit}

    async def info(self) -> AgentInfo:
        token = self.feed.token()
        return AgentInfo(__version__, self.driver.name, await self.driver.probe(), socket.gethostname(),
                         self.config.snapshot_root, self.driver.capabilities(), token)

    def _tell(self, change: Change, *, uid: str = "") -> None:
        """A change into the feed, with its domain's uid (if it has one: a
        gone domain gets none here, so that a revert can give it its own back)."""
        self.feed.append(replace(change, domain_uid=uid or self.uids.known(change.domain)))

    def _operation_changed(self, op: Operation) -> None:
        """An operation's new state in the feed; once it succeeded, what it did."""
        self._tell(Change(ChangeKind.OPERATION, op.domain, op.snapshot, op.id, str(op.state), str(op.kind)))
        if op.state != OpState.SUCCEEDED:
            return
        doomed = op.result.doomed if isinstance(op.result, DeletePlan) else ()
        for name in [e.manifest.name for e in doomed] or [op.snapshot]:
            self._tell(Change(_DONE[op.kind], op.domain, name, op.id))

    async def recover(self) -> int:
        """Bring the catalogue's index in line with the manifests, then finish
        or roll back what a dead agent left in the journal; returns how many
        operations."""
        self.catalogue.check()
        recorded = self._history.load()
        self.operations.add_finished([op for op in recorded if op.state in FINAL])
        entries = self.journal.pending()
        started = {op.id: op.started_at for op in recorded}
        journaled = {entry.op_id for entry in entries}
        for op in recorded:
            if op.state not in FINAL and op.id not in journaled:
                self._unjournaled(op)
        for entry in entries:
            procedure = self._procedures[entry.kind]
            op = Operation(entry.op_id, OpKind(entry.kind), entry.domain, entry.snapshot, entry.request_id)
            op.started_at = started.get(op.id, op.started_at)
            try:
                outcome = await procedure.recover(entry)
            except Exception as err:
                log.exception("recovery of %s %s on %s failed; its journal entry is kept", entry.kind,
                              entry.snapshot, entry.domain)
                self._recovered(op, InternalError(f"the agent stopped during this operation, and the next one "
                                                  f"could not finish or roll it back: {err}"))
                continue
            await self.journal.finish(entry)
            log.info("recovered %s of snapshot %s on domain %s (operation %s): %s", entry.kind, entry.snapshot,
                     entry.domain, entry.op_id, outcome)
            self._recovered(op, None if outcome == "completed" else InternalError(
                f"the agent stopped during this operation; the agent started after it: {outcome}"))
        return len(entries)

    def _unjournaled(self, op: Operation) -> None:
        """An operation a dead agent ran that left no journal entry: it died
        before the first step, or after the last (the feed then has the
        outcome, told before the final record is written, unless it died
        within the few statements between)."""
        told = self.feed.operation_state(op.id)
        if told not in {str(s) for s in FINAL}:
            self._recovered(op, InternalError(
                "the agent stopped while this operation ran, before its first journaled step (nothing was done) "
                "or just after its last (it was done): see the snapshot list"))
            return
        op.state, op.finished_at = OpState(told), time()
        if op.state != OpState.SUCCEEDED:
            op.error = InternalError("the agent stopped before it recorded why this operation ended "
                                     f"{op.state}")
        self.operations.add_finished([op])
        self._history.record(op)

    async def operation(self, op_id: str) -> Operation:
        """An operation by id; one a previous agent ran answers its snapshot
        again (a history keeps no result) while that snapshot exists."""
        op = self.operations.get(op_id)
        if op.state == OpState.SUCCEEDED and op.result is None and op.kind != OpKind.DELETE:
            try:
                path, m = await asyncio.to_thread(self.catalogue.resolve, op.domain, op.snapshot)
            except NotFound:
                return op
            op.result = Entry(path, m, self.catalogue.current(op.domain) == m.name)
        return op

    def _recovered(self, op: Operation, error: DomsnapError | None) -> None:
        """An operation a dead agent ran, with the outcome of its recovery, listed, recorded and told."""
        op.state, op.error, op.finished_at = (OpState.SUCCEEDED if error is None else OpState.FAILED), error, time()
        op.progress = Progress(Phase.RECOVERED, 100.0, message="finished by the agent started after it")
        self.operations.add_finished([op])
        self._history.record(op)
        # Told once: the feed may have told this outcome before its agent died.
        if self.feed.operation_state(op.id) != str(op.state):
            self._operation_changed(op)

    # --------------------------------------------------------------- domains

    async def list_domains_page(self, page_size: int, page_token: str, state: RunState | None) -> tuple[
            list[Domain], str]:
        """One page of the domains in `state` (None: all), by name (AIP-158), and the next page's token."""
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative", field="page_size")
        after = str(paging.decode(page_token, f"domains:{state or ''}", 1)[0]) if page_token else ""
        domains = sorted((d for d in await self.list_domains()
                          if (state is None or d.state is state) and d.name > after), key=lambda d: d.name)
        size = min(page_size or PAGE_SIZE, PAGE_SIZE)
        more = len(domains) > size
        page = domains[:size]
        return page, paging.encode(f"domains:{state or ''}", [page[-1].name]) if more else ""

    async def list_domains(self) -> list[Domain]:
        """The hypervisor's domains, and those a failed revert left destroyed (see `problem`)."""
        domains = await self.driver.list_domains()
        running = {d.name for d in domains}
        return domains + [Domain(0, s.config, RunState.SHUTDOWN) for s in self._revert.all_stranded()
                          if s.journal.domain not in running]

    async def get_domain(self, ref: str) -> Domain:
        try:
            return await self.driver.lookup(ref)
        except NotFound:
            if (stranded := self._revert.stranded(ref)) is None:
                raise
            return Domain(0, stranded.config, RunState.SHUTDOWN)

    def problem(self, domain: str) -> str:
        """What is wrong with a domain that the agent could not set right by itself ("" when nothing)."""
        stranded = self._revert.stranded(domain)
        return stranded.reason if stranded is not None else ""

    async def create_domain(self, text: str, overrides: tuple[str, ...], *, paused: bool, force: bool = False,
                            source: str = "") -> Domain:
        config = DomainConfig.parse(text, overrides, source=source or "<config>", xl=self.driver.xl_version)
        self.operations.check_idle(config.name)
        config, made = await self._off_frozen_layers(config, force)
        try:
            domain = await self.driver.create(config, paused=paused)
        except BaseException:
            for path in made:
                Path(path).unlink(missing_ok=True)
            raise
        self._tell(Change(ChangeKind.DOMAIN_CREATED, domain.name), uid=self.uids.uid(domain.name))
        return domain

    async def _off_frozen_layers(self, config: DomainConfig, force: bool) -> tuple[DomainConfig, list[str]]:
        """A config that writes no snapshot's frozen layer: refused if it would,
        unless `force`, which puts a fresh overlay over each such layer (as a
        revert does) and starts the domain on those; returns the files made."""
        hits = layers.on_frozen(config.disks, layers.frozen(self.catalogue, self._backends))
        for disk, layer in hits:
            if not force or not layer.overlay:
                raise layers.refusal(disk, layer, way_out="start it with --force, on a fresh overlay over that layer")
        disks = {d.vdev: d for d in config.disks}
        made: list[str] = []
        for disk, layer in hits:
            fresh = await self._backends.for_record(layer.record).revert(layer.record, disk, ignore_progress)
            log.info("create %s: disk %s starts on %s, a fresh overlay over %s (frozen by snapshot %s)",
                     config.name, disk.vdev, fresh.target, disk.target, layer.snapshot)
            made.append(fresh.target)
            disks[disk.vdev] = fresh
        return config.with_disks([disks[d.vdev] for d in config.disks]), made

    async def _domain_call(self, ref: str, action: Callable[[str], Awaitable[Domain | None]],
                           change: ChangeKind) -> Domain:
        """A lifecycle call on an idle domain, told to the feed; answers the
        domain as it is after (or, when the action returns nothing, as it was before)."""
        domain = await self.driver.lookup(ref)
        self.operations.check_idle(domain.name)
        after = await action(domain.name) or domain
        self._tell(Change(change, domain.name))
        return after

    async def destroy_domain(self, ref: str) -> Domain:
        """The domain as it was, shut down; it loses its uid."""
        domain = await self._domain_call(ref, self.driver.destroy, ChangeKind.DOMAIN_DESTROYED)
        self.uids.forget(domain.name)
        return replace(domain, domid=0, state=RunState.SHUTDOWN)

    async def pause_domain(self, ref: str) -> Domain:
        return await self._domain_call(ref, self.driver.pause, ChangeKind.DOMAIN_PAUSED)

    async def unpause_domain(self, ref: str) -> Domain:
        return await self._domain_call(ref, self.driver.unpause, ChangeKind.DOMAIN_UNPAUSED)

    async def change_medium(self, ref: str, vdev: str, path: str) -> Domain:
        return await self._domain_call(ref, lambda name: self.driver.change_medium(name, vdev, path),
                                       ChangeKind.DOMAIN_MEDIUM_CHANGED)

    # ------------------------------------------------------------- snapshots

    def _named(self, domain: str, req: CreateRequest) -> CreateRequest:
        """A request with its default name made unique (a second nameless create within a millisecond), and
        with the domain's uid to record."""
        def taken(name: str) -> bool:
            return self.catalogue.path_of(domain, name) is not None or (
                not req.path and os.path.lexists(self.config.snapshot_root / domain / name))

        name = unique_name(req.name, taken) if req.default_name else req.name
        return replace(req, name=name, domain_uid=self.uids.uid(domain))

    async def plan_create(self, req: CreateRequest) -> tuple[CreatePlan, str]:
        """What create_snapshot would do, and the snapshot's name; touches nothing."""
        domain = await self.driver.lookup(req.domain)
        req = self._named(domain.name, req)
        return await self._create.prepare(domain, req), req.name

    async def plan_revert(self, req: RevertRequest) -> RevertPlan:
        """What revert_snapshot would do, its risks listed even without `force`; touches nothing."""
        name = await self._domain_name(req.domain)
        return await self._revert.prepare(RevertRequest(name, req.snapshot, req.run_after, True))

    async def plan_delete(self, domain: str, ref: str, children: bool) -> DeletePlan:
        return await self._delete.prepare(await self._domain_name(domain), ref, children)

    async def create_snapshot(self, req: CreateRequest, request_id: str, gate: Gate | None = None) -> Operation:
        """A create; with `gate`, a group snapshot's member, which waits for its coordinator there."""
        tally = runner.start_tally()
        domain = await self.driver.lookup(req.domain)
        runner.tally_mark("looked up")
        # Validated before the operation exists: a refusal is one plain error.
        self.operations.check_idle(domain.name)
        req = self._named(domain.name, req)
        plan = await self._create.prepare(domain, req)
        runner.tally_mark("planned")
        return self.operations.start(OpKind.CREATE, domain.name, req.name, request_id,
                                     _costed(tally, lambda op: self._create.run(op, req, plan, gate)))

    def group_gate(self, group: Group, lease_seconds: float, on_reached: OnReached) -> Gate:
        """The gate of a group snapshot's member, under the lease asked for (within the agent's bound)."""
        return Gate(group, lease_of(lease_seconds, self.config.group_lease_max_seconds), on_reached)

    async def revert_snapshot(self, req: RevertRequest, request_id: str) -> Operation:
        tally = runner.start_tally()
        name = await self._domain_name(req.domain)
        runner.tally_mark("looked up")
        self.operations.check_idle(name)
        if (stranded := self._revert.stranded(name)) is not None:
            return self._resume_revert(name, req.snapshot, request_id, stranded)
        ref = self._confined(req.snapshot)
        plan = await self._revert.prepare(replace(req, domain=name, snapshot=ref))
        runner.tally_mark("planned")
        self.uids.adopt(name, plan.manifest.domain_uid)
        return self.operations.start(OpKind.REVERT, name, plan.manifest.name, request_id,
                                     _costed(tally, lambda op: self._revert.run(op, plan)))

    def _resume_revert(self, name: str, ref: str, request_id: str, stranded: Stranded) -> Operation:
        """A revert of a domain a failed revert left destroyed: only to that snapshot, which it finishes."""
        snapshot, snapdir = stranded.journal.snapshot, stranded.journal.data["snapdir"]
        if ref not in (snapshot, snapdir) and ("/" not in ref or self._confined(ref) != snapdir):
            raise FailedPrecondition(f"domain {name}: {stranded.reason}; snapshot-revert {name} {snapshot} "
                                     "finishes that first", reason="DOMAIN_STRANDED", domain=name, snapshot=snapshot)
        return self.operations.start(OpKind.REVERT, name, snapshot, request_id,
                                     lambda op: self._revert.resume(op, stranded))

    async def _domain_name(self, ref: str) -> str:
        """A running domain's name, or a name the catalogue knows (a gone domain can be reverted)."""
        try:
            return (await self.driver.lookup(ref)).name
        except NotFound:
            if ref in self.catalogue.domains() or self._revert.stranded(ref) is not None:
                return ref
            raise

    def _confined(self, ref: str) -> str:
        """A snapshot named by its folder: confined to the snapshot roots, as a create's path is."""
        if "/" not in ref:
            return ref
        return str(confine(ref, self.config.roots, (self.config.state_dir,), what="snapshot path"))

    async def list_snapshots(self, domain: str, page_size: int = 0, page_token: str = "") -> Page:
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative")
        name = await self._domain_name(domain) if domain else ""
        return self.catalogue.page(name, min(page_size or PAGE_SIZE, PAGE_SIZE), page_token, PAGE_BYTES)

    async def list_operations(self, which: OperationFilter, page_size: int = 0, page_token: str = "",
                              ) -> OperationPage:
        """Newest first, paged (AIP-158); the feed's token is read first, so
        that watching from it misses no change made while this page was made."""
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative")
        event_token = self.feed.token()
        if which.domain:
            which = replace(which, domain=await self._domain_name(which.domain))
        ops, token = self.operations.page(which, min(page_size or OPERATIONS_PAGE_SIZE, OPERATIONS_PAGE_SIZE),
                                          page_token)
        return OperationPage(ops, token, event_token)

    async def get_snapshot(self, domain: str, ref: str) -> Entry:
        name = await self._domain_name(domain)
        path, m = await asyncio.to_thread(self.catalogue.resolve, name, self._confined(ref))
        return Entry(path, m, self.catalogue.current(name) == m.name)

    async def edit_snapshot(self, domain: str, ref: str, *, description: str | None, new_name: str = "",
                            request_id: str = "") -> Entry:
        """Change a snapshot's description or name (see snapshot_edit.py)."""
        name = await self._domain_name(domain)
        self.operations.check_idle(name)
        # After what the last operation left to do once finished (a create's
        # registration made durable); none may have begun meanwhile.
        await self.operations.settled(name)
        self.operations.check_idle(name)
        previous = (await self.get_snapshot(name, ref)).manifest.name if new_name else ""
        entry = await self._edit.edit(name, ref, description=description, new_name=new_name, request_id=request_id)
        self._tell(Change(ChangeKind.SNAPSHOT_EDITED, name, entry.manifest.name, previous_name=previous))
        return entry

    async def delete_snapshot(self, domain: str, ref: str, children: bool, request_id: str) -> Operation:
        name = await self._domain_name(domain)
        self.operations.check_idle(name)
        plan = await self._delete.prepare(name, self._confined(ref), children)
        return self.operations.start(OpKind.DELETE, name, plan.doomed[-1].manifest.name, request_id,
                                     lambda op: self._delete.run(op, plan))


def _costed(tally: runner.CommandTally, body: Body) -> Body:
    """The operation's body, logging when it ends (ok or failed) what the
    agent spent since the request came in against what the commands it ran took."""

    async def costed(op: Operation) -> object:
        outcome = "failed"
        try:
            result = await body(op)
            outcome = "ok"
            return result
        finally:
            log.info("cost of operation %s: %s %s %s %s", op.id, op.kind, op.domain, outcome, tally.summary())
            log.info("own time of operation %s: %s", op.id, tally.own())

    return costed
