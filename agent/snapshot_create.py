"""snapshot-create: validate everything, then memory and every disk at one
instant, then (the guest running again) what the disks copy, then the
manifest, last. Any failure before the manifest is written
rolls back whatever was made: the snapshot is complete or absent."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from domsnap import __version__

from . import layers, manifest, quiesce, snapshot_cfg, xlcfg
from .catalogue import Catalogue, Entry
from .domain import Domain, RunState
from .drivers.base import Hypervisor
from .drivers.qga import GuestAgent
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .fsutil import make_durable, put_staged, sync_data
from .group_gate import Gate
from .journal import Journal, JournalEntry
from .ledger import Ledger
from .manifest import Manifest
from .names import check_labels, check_name, default_snapshot_name
from .operations import Operation
from .paths import confine
from .progress import Phase, share
from .quiesce import NO_QUIESCE, QuiesceRequest
from .storage import Backends
from .storage.base import BlockOps, DiskRecord, Method

log = logging.getLogger(__name__)

MiB = 1 << 20
# Seconds between the progress notes streamed while the guest is paused
# (none in a short pause; a long one, such as a disk copied in a Xen pause, still shows it).
PAUSE_NOTES_EVERY = 1.0


@dataclass(frozen=True)
class DiskChoice:
    method: Method
    # The external snapshot's file ("" for the default place) and its format
    # ("" for whatever the backend makes).
    file: str = ""
    format: str = ""


@dataclass(frozen=True)
class CreateRequest:
    domain: str
    name: str
    live: bool
    method: Method | None
    path: str
    description: str
    # Per-disk choices from a snapshot cfgfile, by vdev.
    disk_choices: Mapping[str, DiskChoice]
    memory_path: str
    # The name is the default one (the time): the service makes it unique.
    default_name: bool = False
    # Recorded in the manifest (uids.py); set by the service.
    domain_uid: str = ""
    quiesce: QuiesceRequest = NO_QUIESCE
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_request(
    domain: str, *, name: str, live: bool, method: Method | None, path: str, description: str,
    cfg_text: str, overrides: tuple[str, ...], cfg_name: str = "", quiesce: QuiesceRequest = NO_QUIESCE,
    labels: Mapping[str, str] | None = None,
) -> CreateRequest:
    """Merge the request's fields over the snapshot cfgfile (the fields win)."""
    cfg = snapshot_cfg.read(cfg_text, overrides, cfg_name)
    name = name or xlcfg.get_str(cfg, "name", "")
    default_name = not name
    name = name or default_snapshot_name()
    choices: dict[str, DiskChoice] = {}
    for spec in xlcfg.get_list(cfg, "disks", []):
        # The thread's syntax: '/path/file,format,vdev' is external to that
        # file, ',,vdev' (empty path) is internal.
        parts = [p.strip() for p in str(spec).split(",")]
        if len(parts) != 3 or not parts[2]:
            raise InvalidArgument(f"snapshot cfgfile: disks entry {spec!r}: expected 'PATH,FORMAT,VDEV' "
                                  "(empty PATH for an internal snapshot)")
        file, fmt, vdev = parts
        if file and not file.startswith("/"):
            raise InvalidArgument(f"snapshot cfgfile: disks entry {spec!r}: the path must be absolute")
        choices[vdev] = DiskChoice(Method.EXTERNAL if file else Method.INTERNAL, file, fmt)
    memory_path = xlcfg.get_str(cfg, "memory_path", "")
    return CreateRequest(
        domain=domain, name=check_name("snapshot", name), live=live, method=method,
        path=path, description=description or xlcfg.get_str(cfg, "description", ""),
        disk_choices=choices, memory_path=memory_path, default_name=default_name, quiesce=quiesce,
        labels=check_labels(labels or {}),
    )


@dataclass(frozen=True)
class Plan:
    domain: Domain
    snapdir: Path
    memory: Path
    records: tuple[DiskRecord, ...]
    # The guest agent that freezes the guest (quiesce), None for no freeze.
    guest_agent: GuestAgent | None = None


class SnapshotCreate:
    def __init__(self, driver: Hypervisor, backends: Backends, catalogue: Catalogue, journal: Journal,
                 ledger: Ledger, snapshot_root: Path, roots: Sequence[Path], state_dir: Path) -> None:
        self._driver = driver
        self._backends = backends
        self._catalogue = catalogue
        self._journal = journal
        self._ledger = ledger
        self._root = snapshot_root
        self._roots = tuple(roots)
        # The agent's own state is never a place for snapshot files.
        self._forbidden = (state_dir,)
        # Where each create syncs its memory image (a future a thread can wait on).
        self._syncs = ThreadPoolExecutor(thread_name_prefix="image-sync")

    async def prepare(self, domain: Domain, req: CreateRequest) -> Plan:
        """Validate everything; touches nothing, so a refusal leaves no trace."""
        return await self._plan(domain, req)

    async def run(self, op: Operation, req: CreateRequest, plan: Plan, gate: Gate | None = None) -> Entry:
        """The create; a group's member (`gate`) waits there for the other members before and in the pause."""
        domain = plan.domain
        op.phase(Phase.VALIDATE, 5)(1.0, message=f"{len(plan.records)} disk(s), memory {domain.config.memory_mib} MiB")
        op.check_cancel()
        created = time.time()
        journal = JournalEntry(op.id, "create", domain.name, req.name, op.request_id, data={
            "snapdir": str(plan.snapdir), "memory": str(plan.memory),
            "records": [r.to_dict() for r in plan.records],
            "was_running": domain.state is RunState.RUNNING,
        })
        # No entry written before the first step: until "mkdir" nothing exists to undo.
        synced: Future[None] | None = None
        publish: asyncio.Future[list[Path]] | None = None
        try:
            copies = sum(self._backends.for_record(r).copy_bytes(r) for r in plan.records)
            # Phases in the order they happen, each once: the memory save (the
            # pause, and each disk's snapshot in it, are events within it),
            # then the disks' copies; the range up to 95 % split by bytes.
            # Entered before the journal write: told while that write waits
            # on the disk, not while QEMU is being set up.
            ram = domain.config.memory_mib * MiB
            mem_progress = op.phase(Phase.MEMORY, 5 + 90 * ram / (ram + copies + MiB))
            # The one durable write before the pause: a rollback from "mkdir"
            # on undoes every disk too (taken or not), so the checkpoint needs
            # no write of its own. Made durable before `stop`, never in the
            # pause: an fsync waits behind whatever the disk is writing back
            # (at 2 GiB, seconds once), and the guest would wait with it.
            op.check_cancel()
            await self._journal.step(journal, "mkdir")
            plan.snapdir.parent.mkdir(parents=True, exist_ok=True)
            plan.snapdir.mkdir(mode=0o700)

            async def in_pause(block: BlockOps) -> None:
                if gate is not None:
                    # First: the coordinator waits for every member's FROZEN,
                    # and this member's disks are taken meanwhile.
                    gate.frozen()
                # Held back while the guest is paused (told after, unless
                # superseded): a send there takes CPU the hypervisor needs.
                in_pause_progress = op.note(hold=PAUSE_NOTES_EVERY)
                in_pause_progress(0.0, message="guest paused")
                for rec in plan.records:
                    # Not written: a rollback from the durable "mkdir" step
                    # already undoes every disk, taken or not.
                    op.check_cancel()
                    self._journal.mark(journal, f"disk:{rec.vdev}")
                    backend = self._backends.for_record(rec)
                    await backend.take(rec, block, in_pause_progress)

            async with quiesce.frozen(plan.guest_agent, req.quiesce, partial(self._journal.step, journal)) as freeze:
                if freeze.frozen:
                    mem_progress(0.0, message="guest filesystems frozen")
                elif req.quiesce.enabled:
                    mem_progress(0.0, message=f"not quiesced (best effort): {freeze.skipped}")
                op.check_cancel()
                self._journal.mark(journal, "checkpoint")
                result = await self._driver.checkpoint(domain, plan.memory, live=req.live, in_pause=in_pause,
                                                       progress=mem_progress,
                                                       # Past the memory save: journaled, no longer cancellable.
                                                       step=partial(self._journal.step, journal),
                                                       before_pause=gate.prepared if gate is not None else None,
                                                       before_resume=gate.committed if gate is not None else None)
            # The image (and what the checkpoint wrote beside it) synced in a
            # thread of its own, started as the guest resumes, while the create
            # goes on (the copies, the manifest built and staged): _publish
            # puts the manifest in place only once that is done.
            synced = self._syncs.submit(sync_data, [plan.memory, *self._driver.snapshot_files(plan.memory)])
            op.tell()
            # The guest runs again: the bulk of each disk's copy is made now.
            block = self._driver.block_ops(domain.name)
            disk_progress = op.phase(Phase.DISKS, 95)
            for i, rec in enumerate(plan.records):
                op.check_cancel()
                # Not written: a rollback undoes every disk from "mkdir" on, copied or not.
                self._journal.mark(journal, f"copy:{rec.vdev}")
                await self._backends.for_record(rec).complete(rec, block, share(disk_progress, i, len(plan.records)))
            op.phase(Phase.MANIFEST, 99)
            m = Manifest(
                name=req.name, domain=domain.name, description=req.description,
                created_at=created, finished_at=time.time(),
                state="paused" if domain.state is RunState.PAUSED else "running", live=req.live,
                domain_config=domain.config.to_text(), disks=plan.records,
                memory_file=str(plan.memory), memory_bytes=result.memory_bytes,
                driver=self._driver.name, hypervisor_version=await self._driver.probe(),
                facts={**self._driver.facts(domain), **result.facts}, parent=self._catalogue.current(domain.name),
                downtime=result.downtime, agent_version=__version__,
                layers=layers.fingerprints(self._backends, plan.records),
                uid=str(uuid.uuid4()), domain_uid=req.domain_uid,
                group=gate.group.to_dict() if gate is not None else {},
                paused_at=result.paused_at, resumed_at=result.resumed_at,
                quiesced=freeze.frozen, labels=dict(req.labels),
            )
            op.check_cancel()
            # Not written: the manifest, written atomically into the folder
            # this create made, is itself the proof of a complete snapshot.
            self._journal.mark(journal, "manifest")
            op.commit()
            publish = asyncio.ensure_future(asyncio.to_thread(self._publish, journal, m, synced))
            written = await asyncio.shield(publish)
        except BaseException:
            if synced is not None:
                # One under way runs on in its thread (the rollback removes its files meanwhile).
                synced.cancel()
            if publish is not None:
                # Its thread goes on whatever this task is told (the agent
                # stopping): where it got to decides what follows.
                await asyncio.wait({publish})
            if journal.reached("register"):
                raise  # the snapshot is complete: the next agent registers it
            await self.rollback(journal)
            await self._journal.finish(journal)
            raise
        # Made durable after the answer, the journal entry dropped only then:
        # an agent started after a crash in between registers it again.
        op.after_finish(partial(self._settle, journal, written))
        return Entry(plan.snapdir, m, current=True)

    def _publish(self, journal: JournalEntry, m: Manifest, synced: Future[None]) -> list[Path]:
        """In one thread: the manifest staged while the image syncs, put in
        place once it has; then (not written: recovery registers whatever has
        its manifest) the registration. Returns the files the registration wrote."""
        staged = manifest.stage(Path(journal.data["snapdir"]), m)
        # The ledger too, not waiting for the image (a rollback forgets it).
        ledger = self._record_files(journal, durable=False)
        synced.result()
        put_staged(staged)
        self._journal.mark(journal, "register")
        return [ledger, *self._register(journal, durable=False, written=m)]

    def _record_files(self, journal: JournalEntry, *, durable: bool = True) -> Path:
        """The snapshot's files in its ledger; returns the file written (see fsutil.write_atomic for `durable`)."""
        data = journal.data
        records = [DiskRecord.from_dict(r) for r in data["records"]]
        return self._ledger.record(journal.domain, journal.snapshot, Path(data["snapdir"]),
                                   [data["memory"], *(f for r in records for f in (r.image, r.file))], durable=durable)

    def _register(self, journal: JournalEntry, *, durable: bool = True, written: Manifest | None = None,
                  ) -> list[Path]:
        """The snapshot in the catalogue, the domain's current one; returns the files written (see
        fsutil.write_atomic for `durable`). `written`: the manifest just written, not read back."""
        snapdir = Path(journal.data["snapdir"])
        return [
            self._catalogue.register(journal.domain, journal.snapshot, snapdir, durable=durable, written=written),
            self._catalogue.set_current(journal.domain, journal.snapshot, durable=durable),
        ]

    async def _settle(self, journal: JournalEntry, written: list[Path]) -> None:
        self._journal.mark(journal, "registered")
        await asyncio.to_thread(make_durable, written)
        await self._journal.finish(journal)

    async def recover(self, journal: JournalEntry) -> str:
        """Finish (manifest written) or roll back a create a dead agent left;
        first thaw a guest it froze."""
        if journal.reached(quiesce.FREEZE_STEP) and not journal.reached(quiesce.THAWED_STEP):
            await quiesce.thaw(self._driver, journal.domain, "the freeze a dead agent left")
        # Only this create writes a manifest into the folder it made, after the checkpoint.
        if journal.reached("mkdir") and manifest.exists(Path(journal.data["snapdir"])):
            self._record_files(journal)
            self._register(journal)
            return "completed"
        await self.rollback(journal)
        return "rolled back"

    async def rollback(self, journal: JournalEntry) -> None:
        """Leave no trace of the create: no tag, overlay, copy, image or
        directory, and the domain in the run state it had."""
        data = journal.data
        try:
            domain: Domain | None = await self._driver.lookup(journal.domain)
        except NotFound:
            domain = None
        block = None
        if domain is not None:
            # A save a dead agent left may still hold the guest stopped.
            await self._driver.abandon_transfers(domain.name)
            block = self._driver.block_ops(domain.name)
        # From "mkdir" on any disk may have been taken (the checkpoint and the
        # steps in the pause are not written down): each is undone, which does
        # nothing to one that was not.
        records = [DiskRecord.from_dict(r) for r in data["records"]] if journal.reached("mkdir") else []
        for rec in reversed(records):
            try:
                await self._backends.for_record(rec).undo(rec, block)
            except Exception:
                log.exception("rollback: could not undo the snapshot of disk %s", rec.vdev)
        if domain is not None and data["was_running"]:
            now = await self._driver.lookup(domain.name)
            if now.state is RunState.PAUSED:
                await self._driver.unpause(domain.name)
        for file in (Path(data["memory"]), *self._driver.snapshot_files(Path(data["memory"]))):
            await asyncio.to_thread(file.unlink, missing_ok=True)
        if journal.reached("mkdir"):
            await asyncio.to_thread(shutil.rmtree, data["snapdir"], ignore_errors=True)
            # Recorded while the image synced (_publish), perhaps.
            await asyncio.to_thread(self._ledger.forget, journal.domain, journal.snapshot)

    async def _plan(self, domain: Domain, req: CreateRequest) -> Plan:
        if domain.state not in (RunState.RUNNING, RunState.PAUSED):
            raise FailedPrecondition(f"domain {domain.name} is {domain.state}: only a running or paused domain "
                                     "can be snapshotted", reason="DOMAIN_NOT_RUNNING", domain=domain.name)
        if self._catalogue.path_of(domain.name, req.name) is not None:
            raise AlreadyExists(f"domain {domain.name} already has a snapshot named {req.name!r}: choose another "
                                "--name, or delete that one first", reason="SNAPSHOT_EXISTS", domain=domain.name,
                                snapshot=req.name)
        snapdir = confine(req.path or str(self._root / domain.name / req.name), self._roots, self._forbidden,
                          what="snapshot path")
        if os.path.lexists(snapdir):
            raise AlreadyExists(f"snapshot path {snapdir} already exists", reason="PATH_EXISTS", path=str(snapdir))
        if req.path and not snapdir.parent.is_dir():
            raise NotFound(f"snapshot path {snapdir}: its parent directory does not exist", path=str(snapdir))
        if hits := layers.on_frozen(domain.config.disks, layers.frozen(self._catalogue, self._backends)):
            raise layers.refusal(*hits[0], way_out=f"destroy domain {domain.name} and start it again with "
                                 "'domsnap create --force' (a fresh overlay first)")
        unknown = set(req.disk_choices) - {d.vdev for d in domain.config.disks}
        if unknown:
            raise InvalidArgument(f"snapshot cfgfile names disk(s) {', '.join(sorted(unknown))} that domain "
                                  f"{domain.name} does not have")
        records = []
        for disk in domain.config.disks:
            choice = req.disk_choices.get(disk.vdev)
            if disk.access == "ro":
                if choice is not None:
                    raise InvalidArgument(f"snapshot cfgfile: disk {disk.vdev} is read-only; it has no snapshot")
                continue  # nothing a guest can change
            backend = self._backends.for_disk(disk)
            method = choice.method if choice is not None else req.method
            rec = await backend.plan(disk, backend.choose(disk, method), snapdir, req.name)
            if choice is not None and choice.format and choice.format != (made := Path(rec.file).suffix[1:]):
                raise InvalidArgument(f"snapshot cfgfile: disk {disk.vdev}: its {rec.method} snapshot is a "
                                      f"{made or 'tag'}, not {choice.format}")
            if choice is not None and choice.file:
                file = confine(choice.file, self._roots, self._forbidden, what=f"disk {disk.vdev}'s snapshot file")
                if os.path.lexists(file):
                    raise AlreadyExists(f"disk {disk.vdev}: {file} already exists", reason="PATH_EXISTS",
                                        path=str(file), vdev=disk.vdev)
                rec = replace(rec, file=str(file))
            records.append(rec)
        memory = (confine(req.memory_path, self._roots, self._forbidden, what="memory_path") if req.memory_path
                  else snapdir / manifest.MEMORY)
        if os.path.lexists(memory):
            raise AlreadyExists(f"memory image {memory} already exists", reason="PATH_EXISTS", path=str(memory))
        self._check_space(domain, memory, records)
        return Plan(domain, snapdir, memory, tuple(records), quiesce.check(self._driver, domain, req.quiesce))

    def _check_space(self, domain: Domain, memory: Path, records: list[DiskRecord]) -> None:
        """Enough room on each filesystem a new file goes to (the memory image
        may need up to the guest's RAM; a copy, the image's allocated bytes)."""
        needs = [(memory, domain.config.memory_mib * MiB)]
        copies = [(Path(r.file), self._backends.for_record(r).copy_bytes(r)) for r in records]
        needs += [(path, size) for path, size in copies if size]
        need: Counter[int] = Counter()
        place: dict[int, Path] = {}
        for path, size in needs:
            where = next(p for p in path.parents if p.exists())
            dev = where.stat().st_dev
            place.setdefault(dev, where)
            need[dev] += size
        for dev, size in need.items():
            st = os.statvfs(place[dev])
            if size > (free := st.f_bavail * st.f_frsize):
                raise ResourceExhausted(f"{place[dev]} has {free // MiB} MiB free; this snapshot needs about "
                                        f"{size // MiB} MiB there", path=str(place[dev]))
