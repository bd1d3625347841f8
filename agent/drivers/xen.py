"""The xen driver: domains of the local Xen host, driven through `xl` (argv
lists through the runner, built by xl_argv; never a shell of ours).

Memory images are what `xl save` writes. Non-live: `xl save -p` leaves the
domain paused after the image is complete; the disks are snapshotted then,
and the domain resumed. Live: `xl migrate` into our sink (xen_live,
xen_sink), the disks snapshotted while the domain is suspended at the end of
the stream. Restore: `xl restore -p`, then `xl unpause` unless asked to stay
paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from .. import runner
from ..domain import Domain, DomainConfig, RunState
from ..errors import (
    AlreadyExists,
    CommandError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from ..fsutil import write_atomic
from ..progress import StepProgress
from ..runner import CommandResult, Runner
from ..xldisk import XlVersion
from . import libxl_info, xen_feed, xen_live, xen_stream, xl_argv
from .base import BeforePause, BeforeResume, CheckpointResult, Hypervisor, InPause, Step, no_step
from .libxl_info import DomainInfo
from .qga import GuestAgent
from .xen_block import XenBlockOps
from .xen_config import domain_config, with_fresh_genid
from .xl_argv import XlDomain, XlListEntry

log = logging.getLogger(__name__)

MiB: Final = 1 << 20
QUERY_TIMEOUT: Final = 30.0
CONTROL_TIMEOUT: Final = 60.0
CREATE_TIMEOUT: Final = 180.0
LIST_TTL: Final = 1.0
# How long an interrupted live save may take to resume its domain (xl waits
# up to 2 s for the sink, then resumes).
ABANDON_WAIT: Final = 10.0
RUN_DIR: Final = Path("/var/run/xen")
# libxl's XEN_LIB_DIR: its stored config of each domain (userdata_path).
LIB_DIR: Final = Path("/var/lib/xen")
SINK_COMMAND: Final = (sys.executable, "-m", "domsnap.agent.drivers.xen_sink")
# What xl and libxl print when a guest does not answer the suspend request
# (xl_saverestore.c, libxl_stream_write.c, libxl_dom_suspend.c).
PauseStep = Callable[[], Awaitable[None]]
_NO_SUSPEND: Final = (
    "domain did not respond to suspend request", "guest did not suspend, timed out",
    "guest didn't acknowledge suspend",
)


def _transfer_timeout(memory_mib: int) -> float:
    # Generous: the lab's TCG dom0 saved 512 MiB in 5 s; 8 MiB/s is the floor here.
    return 120.0 + memory_mib / 8


def _create_private(path: Path) -> None:
    """Create the image file 0600 before xl opens it (xl would make it 0644,
    readable by all, and guest memory holds secrets); xl truncates, keeping the mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError as err:
        raise AlreadyExists(f"memory image {path} already exists", reason="PATH_EXISTS", path=str(path)) from err


@dataclass(frozen=True)
class _Seen:
    """A domain's config as `xl list -l` gave it, and the stamp of libxl's
    stored copy (`userdata-d.<domid>.<uuid>.libxl-json`) taken before."""

    uuid: str
    stamp: tuple[int, int, int]
    xd: XlDomain


def _disks_of(saved: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {str(d.get("vdev")): (str(d.get("pdev_path", "")), str(d.get("format", "raw")))
            for d in saved.get("disks", [])}


class XenDriver(Hypervisor):
    name = "xen"

    def __init__(
        self, state_dir: Path, run: Runner = runner.run, *, xl: str = xl_argv.XL, run_dir: Path = RUN_DIR,
        sink_command: Sequence[str] = SINK_COMMAND, lib_dir: Path = LIB_DIR,
        domain_info: Callable[[str], DomainInfo | None] | None = libxl_info.open_domain_info,
    ) -> None:
        self._dir = state_dir / "xen"
        self._run: Runner = self._forgetting(run)
        self._xl_bin = xl
        self._run_dir = run_dir
        self._sink = tuple(sink_command)
        self._lib_dir = lib_dir
        self._info: dict[str, str] = {}
        # Who and how each domain is, asked of libxl in-process once probe
        # has opened it (libxl_info); None: xl is asked.
        self._open_domain_info = domain_info
        self._domain_info: DomainInfo | None = None
        # A domain's config changes only with libxl's stored copy of it,
        # which libxl rewrites (a new file) on every change (a device added,
        # a memory target set) and removes with the domain: while its stamp
        # holds, `xl list -l` would answer the same (_config).
        self._seen: dict[int, _Seen] = {}
        # The libxl config last seen per domain name: block_ops and facts are
        # synchronous and need a domain's domid, type and disk backends.
        self._known: dict[str, XlDomain] = {}
        # xl gives no events: the domain list, and each domain looked up, is
        # cached for LIST_TTL (one `xl list` pair at a time for the list) and
        # forgotten by any other xl command. A domain looked up by a request
        # stays known to that request and the operation it starts (their
        # command tally) until such a command: they ask xl once, however
        # slowly the host answers (a loaded lab took 1.3 s per xl query).
        self._listed: tuple[float, list[Domain]] | None = None
        self._looked: dict[str, tuple[float, runner.CommandTally | None, Domain]] = {}
        self._listing = asyncio.Lock()
        self._changes = 0

    def _forgetting(self, run: Runner) -> Runner:
        async def forgetting(argv: Sequence[str], *, timeout: float, check: bool = True,
                             on_stderr_line: Callable[[str], None] | None = None) -> CommandResult:
            try:
                return await run(argv, timeout=timeout, check=check, on_stderr_line=on_stderr_line)
            finally:
                if (argv[1] if len(argv) > 1 else "") not in ("list", "info"):
                    self._listed = None
                    self._looked.clear()
                    self._changes += 1

        return forgetting

    async def _xl(self, argv: list[str], *, timeout: float = CONTROL_TIMEOUT) -> CommandResult:
        return await self._run(argv, timeout=timeout)

    # ------------------------------------------------------------ agent side

    async def probe(self) -> str:
        # Asked once: the hypervisor's version and capabilities cannot change
        # under a running dom0 (and so under its agent).
        if not self._info:
            out = await self._xl(xl_argv.info(xl=self._xl_bin), timeout=QUERY_TIMEOUT)
            self._info = xl_argv.parse_info(out.stdout)
            if self._open_domain_info is not None and (version := self._info.get("xen_version")):
                self._domain_info = self._open_domain_info(version)
        return f"Xen {self._info.get('xen_version', 'unknown')}"

    @property
    def xl_version(self) -> XlVersion:
        # xl comes with the hypervisor `xl info` names (probe reads it first).
        version = self._info.get("xen_version")
        return XlVersion.parse(version) if version else super().xl_version

    async def start(self) -> None:
        # Domains live in Xen, not in the agent: nothing to re-attach. A sink
        # orphaned by a dead agent saw its control socket close and exited,
        # and xl resumed the domain.
        self._dir.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        """No connection outlives a call (QMP sessions are per operation)."""

    def _virt_caps(self) -> set[str]:
        return set(self._info.get("virt_caps", "").split())

    def guest_agent(self, name: str) -> GuestAgent:
        raise FailedPrecondition(f"domain {name}: --quiesce needs the QEMU guest agent's channel, and xl gives "
                                 "a domain none (its channel= devices are PV consoles the agent cannot reach "
                                 "as QEMU's virtio-serial port): snapshot without --quiesce",
                                 reason="QUIESCE_UNSUPPORTED", domain=name)

    def capabilities(self) -> list[str]:
        caps = self._virt_caps()
        live = [f"live:{t}" for t in ("pv", "pvh", "hvm") if self._live_refusal(t, caps) is None]
        # External snapshots here are copies (raw files, LVs): xen_block explains why
        # qcow2 and vhd disks cannot move onto overlays under a running domain.
        return (["live", *live] if live else []) + ["internal", "external:copy", "format:qcow2", "format:raw"]

    # --------------------------------------------------------------- domains

    async def _table(self, ref: str | int | None) -> list[XlListEntry]:
        try:
            out = await self._xl(xl_argv.list_(ref, xl=self._xl_bin), timeout=QUERY_TIMEOUT)
        except CommandError as err:
            if ref is not None and ("invalid domain identifier" in err.stderr or "does not exist" in err.stderr):
                raise NotFound(f"domain {ref!r} does not exist", reason="DOMAIN_NOT_FOUND", domain=str(ref)) from err
            raise
        return xl_argv.parse_list(out.stdout)

    async def _configs(self, ref: str | int | None) -> dict[int, XlDomain]:
        out = await self._xl(xl_argv.list_long(ref, xl=self._xl_bin), timeout=QUERY_TIMEOUT)
        return {d.domid: d for d in xl_argv.parse_list_long(out.stdout)}

    def _domain(self, row: XlListEntry, xd: XlDomain) -> Domain:
        config = domain_config(xd)
        self._known[config.name] = xd
        return Domain(row.domid, config, row.state, row.cpu_seconds)

    async def list_domains(self) -> list[Domain]:
        async with self._listing:
            if self._listed is not None and time.monotonic() - self._listed[0] <= LIST_TTL:
                return list(self._listed[1])
            changes, asked = self._changes, time.monotonic()
            domains = await self._list_domains()
            # A command that ran meanwhile may have changed what xl answered.
            if changes == self._changes:
                self._listed = (asked, domains)
            return list(domains)

    async def _list_domains(self) -> list[Domain]:
        rows = await self._table(None)
        configs = await self._configs(None)
        domains = []
        for row in rows:
            xd = configs.get(row.domid)
            # dom0 is the host, not a guest; a dying domain has no config left.
            if row.domid == 0 or xd is None:
                continue
            try:
                domains.append(self._domain(row, xd))
            except (InvalidArgument, ValueError) as err:
                log.warning("skipping domain %s (id %d): %s", row.name, row.domid, err)
        return domains

    async def lookup(self, ref: str) -> Domain:
        looked = self._looked.get(ref)
        tally = runner.current_tally()
        if looked is not None and (time.monotonic() - looked[0] <= LIST_TTL or
                                   (tally is not None and looked[1] is tally)):
            return looked[2]
        changes, asked = self._changes, time.monotonic()
        row, uuid = await self._row(ref)
        xd = await self._config(row, uuid)
        if uuid is not None and self._domain_info is None:
            # libxl was turned off by this very lookup: its row is not trusted either.
            row, _ = await self._row(ref)
        domain = self._domain(row, xd)
        # A command that ran meanwhile may have changed what xl answered.
        if changes == self._changes:
            self._looked[ref] = (asked, tally, domain)
        return domain

    async def _row(self, ref: str) -> tuple[XlListEntry, str | None]:
        """The guest domain `ref` names as `xl list` shows it, and its UUID
        when libxl told it (in-process: no xl is started)."""
        known = self._known.get(ref)
        found = (self._domain_info.find(ref, known.domid if known is not None else None)
                 if self._domain_info is not None else None)
        if found is not None:
            row = XlListEntry(found.name, found.domid, found.memory_mib, found.vcpus,
                              xl_argv.run_state(found.flags), found.cpu_seconds, found.flags)
        else:
            rows = await self._table(ref)
            if not rows:
                raise NotFound(f"domain {ref!r} does not exist", reason="DOMAIN_NOT_FOUND", domain=ref)
            row = rows[0]
        if row.domid == 0:
            raise NotFound(f"domain {ref!r} is not a guest domain", reason="DOMAIN_NOT_FOUND", domain=ref)
        return row, found.uuid if found is not None else None

    async def _config(self, row: XlListEntry, uuid: str | None) -> XlDomain:
        """The domain's libxl config: asked of xl (`xl list -l`) unless
        libxl's stored copy is the one it was asked with last time."""
        stored = self._stored(row.domid, uuid)
        seen = self._seen.get(row.domid)
        if seen is not None and stored == (seen.uuid, seen.stamp) and seen.xd.name == row.name:
            return seen.xd
        xd = (await self._configs(row.domid)).get(row.domid)
        if xd is None:
            raise NotFound(f"domain {row.name!r} (id {row.domid}) has no configuration left (it is being "
                           "destroyed)", reason="DOMAIN_NOT_FOUND", domain=row.name)
        if uuid is not None and uuid != xd.uuid:
            # libxl's answer is not read as this Xen lays it out: xl only, from now on.
            log.warning("libxl_domain_info gave domain %d the UUID %s where xl list -l says %s: "
                        "domains are looked up through xl from now on", row.domid, uuid, xd.uuid)
            self._domain_info = None
        if stored is not None and stored[0] == xd.uuid:
            self._seen[row.domid] = _Seen(stored[0], stored[1], xd)
        return xd

    def _stored(self, domid: int, uuid: str | None) -> tuple[str, tuple[int, int, int]] | None:
        """The UUID and stamp (inode, mtime, size) of libxl's stored config
        of the domain `domid`; None where there is none to be read."""
        if uuid is None:
            # Without libxl's answer the UUID is the one the stored config's name holds.
            prefix, suffix = f"userdata-d.{domid}.", ".libxl-json"
            try:
                names = [n for n in os.listdir(self._lib_dir) if n.startswith(prefix) and n.endswith(suffix)]
            except OSError:
                return None
            if len(names) != 1:
                return None
            uuid = names[0][len(prefix):-len(suffix)]
        try:
            st = os.stat(self._lib_dir / f"userdata-d.{domid}.{uuid}.libxl-json")
        except OSError:
            return None
        return uuid, (st.st_ino, st.st_mtime_ns, st.st_size)

    async def _restored(self, name: str, stderr: str, config: Mapping[str, Any] | None) -> Domain:
        """The domain `xl -v restore -p` just made, paused: its domid as xl
        said it and, unless xl read a config file of ours, the config the
        image gave it; else one `xl list -l` of it."""
        domid = xl_argv.parse_restored_domid(stderr)
        if domid is not None and config is not None:
            xd = xl_argv.domain_of(domid, config)
            # libxl stored that config for the new domain: known as if xl had been asked.
            if (stored := self._stored(domid, xd.uuid)) is not None:
                self._seen[domid] = _Seen(stored[0], stored[1], xd)
        else:
            found = [xd for xd in (await self._configs(name)).values() if xd.name == name]
            if not found:
                raise InternalError(f"domain {name} is not there after xl restore", domain=name)
            xd = found[0]
        return self._domain(XlListEntry(name, xd.domid, xd.memory_mib, xd.vcpus, RunState.PAUSED, 0.0, "--p---"), xd)

    def _config_path(self, name: str) -> Path:
        return self._dir / f"{name}.cfg"

    async def create(self, config: DomainConfig, *, paused: bool) -> Domain:
        try:
            await self._table(config.name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"domain {config.name!r} already exists", reason="DOMAIN_EXISTS", domain=config.name)
        path = self._config_path(config.name)
        self._dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, config.to_text(), mode=0o600)
        await self._xl(xl_argv.create(path, paused=paused, xl=self._xl_bin), timeout=CREATE_TIMEOUT)
        return await self.lookup(config.name)

    async def destroy(self, name: str) -> None:
        domain = await self.lookup(name)
        await self._xl(xl_argv.destroy(domain.domid, xl=self._xl_bin))
        self._known.pop(domain.name, None)
        self._seen.pop(domain.domid, None)

    async def pause(self, name: str) -> Domain:
        domain = await self.lookup(name)
        await self._xl(xl_argv.pause(domain.domid, xl=self._xl_bin))
        return await self.lookup(str(domain.domid))

    async def unpause(self, name: str) -> Domain:
        domain = await self.lookup(name)
        await self._xl(xl_argv.unpause(domain.domid, xl=self._xl_bin))
        return await self.lookup(str(domain.domid))

    def _xl_domain(self, name: str) -> XlDomain:
        try:
            return self._known[name]
        except KeyError:
            raise NotFound(f"domain {name!r} is unknown to the xen driver (look it up first)",
                           reason="DOMAIN_NOT_FOUND", domain=name) from None

    def block_ops(self, name: str, *, released: bool = False) -> XenBlockOps:
        """`released`: for the pause of an HVM domain's live save, by which
        its QEMU has released the images (xen_block)."""
        xd = self._xl_domain(name)
        return XenBlockOps(name, xd.domid, {d.vdev: d for d in xd.disks}, self._run_dir,
                           released=self._run if released else None)

    def facts(self, domain: Domain) -> dict[str, str]:
        xd = self._xl_domain(domain.name)
        return {"type": xd.type, "xen_version": self._info.get("xen_version", "")}

    async def check_facts(self, facts: Mapping[str, str]) -> None:
        """Nothing: xl restore takes no fact to its command line (the image carries its own config)."""

    # ------------------------------------------------------------- snapshots

    def _live_refusal(self, domain_type: str, caps: set[str]) -> str | None:
        """Why Xen cannot track this guest's dirty pages (log-dirty mode), or None."""
        if domain_type == "pv" and "shadow" not in caps:
            return "a PV guest's dirty pages can only be tracked with shadow paging, which this Xen lacks"
        if domain_type != "pv" and not caps & {"hap", "shadow"}:
            return f"a {domain_type.upper()} guest needs hardware-assisted or shadow paging, which this host lacks"
        return None

    async def checkpoint(
        self, domain: Domain, memory: Path, *, live: bool, in_pause: InPause, progress: StepProgress,
        step: Step = no_step, before_pause: BeforePause | None = None, before_resume: BeforeResume | None = None,
    ) -> CheckpointResult:
        if domain.state not in (RunState.RUNNING, RunState.PAUSED):
            raise FailedPrecondition(f"domain {domain.name} is {domain.state}; only a running or paused one "
                                     "can be snapshotted")
        xd = self._xl_domain(domain.name)
        if xd.domid != domain.domid:
            raise FailedPrecondition(f"domain {domain.name} was restarted (id {domain.domid} is now {xd.domid}) "
                                     "since it was looked up; try again")
        block = self.block_ops(domain.name)

        async def pause_step() -> None:
            # Both image and disks are taken when xl has the domain
            # suspended: whatever waits before it resumes waits now.
            await in_pause(block)
            if before_resume is not None:
                await before_resume()

        if before_pause is not None:
            # xl pre-copies and pauses in one command: a group's member waits
            # before either, so the members that paused first wait for its
            # whole live save.
            await before_pause()
        # A paused guest makes no progress to pre-copy against: save it as is.
        if live and domain.state is RunState.RUNNING:
            if not self._info:
                await self.probe()
            why = self._live_refusal(xd.type, self._virt_caps())
            if why is not None:
                raise FailedPrecondition(
                    f"domain {domain.name}: no live snapshot: {why} (xl info virt_caps: "
                    f"{self._info.get('virt_caps', '?')}). Take a non-live snapshot instead."
                )
            if xd.type == "hvm":
                block = self.block_ops(domain.name, released=True)
            return await self._live(domain, memory, pause_step, progress)
        return await self._save(domain, memory, pause_step, progress)

    async def _live(
        self, domain: Domain, memory: Path, in_pause: PauseStep, progress: StepProgress
    ) -> CheckpointResult:
        def argv_for(control: Path) -> list[str]:
            return xl_argv.migrate_to_sink(domain.domid, [*self._sink, str(memory), str(control)],
                                           xl=self._xl_bin)

        try:
            saved = await xen_live.live_save(
                self._run, argv_for, domain=domain.name, in_pause=in_pause, progress=progress,
                expected_bytes=domain.config.memory_mib * MiB,
                timeout=_transfer_timeout(domain.config.memory_mib),
            )
        except BaseException:
            memory.unlink(missing_ok=True)
            raise
        # xl prints that it resumes the domain, not whether it did: its run
        # state is all that is asked (the config is the one looked up).
        try:
            state: RunState | str = (await self._row(str(domain.domid)))[0].state
        except NotFound:
            state = "gone"
        if state is not RunState.RUNNING:
            raise InternalError(f"domain {domain.name} is {state} after its live snapshot; xl did not resume it")
        return CheckpointResult(saved.memory_bytes, saved.downtime)

    def _save_progress(self, progress: StepProgress) -> Callable[[str], None]:
        page = int(self._info.get("xen_pagesize", "4096"))
        t0 = time.monotonic()

        def on_line(line: str) -> None:
            pages = xl_argv.parse_save_progress(line)
            if pages is not None:
                done, total = pages[0] * page, pages[1] * page
                rate = done / max(time.monotonic() - t0, 1e-6)
                progress(min(done / total, 0.99), done=done, total=total, rate=rate, message="memory: saving")

        return on_line

    async def _save(
        self, domain: Domain, memory: Path, in_pause: PauseStep, progress: StepProgress
    ) -> CheckpointResult:
        domid = domain.domid
        was_running = domain.state is RunState.RUNNING
        _create_private(memory)
        t0 = time.monotonic()
        try:
            if not was_running:
                # Suspending is cooperative (the guest's kernel answers the
                # request), so a paused guest runs for that moment; -p pauses
                # it again as soon as the image is complete.
                await self._xl(xl_argv.unpause(domid, xl=self._xl_bin))
            try:
                await self._run(xl_argv.save(domid, memory, paused=True, xl=self._xl_bin),
                                timeout=_transfer_timeout(domain.config.memory_mib),
                                on_stderr_line=self._save_progress(progress))
            except CommandError as err:
                # xl resumed the domain; a paused one goes back to pause.
                if not was_running:
                    with contextlib.suppress(CommandError):
                        await self._xl(xl_argv.pause(domid, xl=self._xl_bin))
                raise self._save_failure(domain.name, err) from err
            try:
                await in_pause()
            finally:
                if was_running:
                    await self._xl(xl_argv.unpause(domid, xl=self._xl_bin))
            downtime = time.monotonic() - t0
        except BaseException:
            memory.unlink(missing_ok=True)
            raise
        size = memory.stat().st_size
        progress(1.0, done=size, total=size, message="memory image written")
        return CheckpointResult(size, downtime)

    async def abandon_transfers(self, name: str) -> None:
        """A live save of a dead agent ends by itself: its sink sees the
        control socket close and exits, and xl (which ignores SIGPIPE while
        migrating) resumes the domain. A non-live `xl save` that lost its
        stderr dies of SIGPIPE at its next progress line; if it had suspended
        the domain, no xl command resumes it, and that is said plainly."""
        deadline = time.monotonic() + ABANDON_WAIT
        while (await self._row(name))[0].suspended:
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    f"domain {name} was left suspended by an interrupted save and xl has no command to resume "
                    "it; restore it from a memory image, or destroy it"
                )
            await asyncio.sleep(0.5)

    def _save_failure(self, name: str, err: CommandError) -> Exception:
        if any(text in err.stderr for text in _NO_SUSPEND):
            return FailedPrecondition(
                f"domain {name}: the guest did not answer Xen's suspend request, so no memory image could be "
                "taken (its kernel must support Xen suspend; a PVH guest needs tsc_mode=\"native\")"
            )
        if "No space left on device" in err.stderr:
            return ResourceExhausted(f"domain {name}: the disk holding the memory image is full")
        return err

    async def restore(
        self, config: DomainConfig, memory: Path, *, facts: Mapping[str, str], paused: bool,
        progress: StepProgress, reset_nvram: bool = False,
    ) -> Domain:
        try:
            header = xen_stream.read_header(memory)
            saved = header.config()
        except (OSError, ValueError) as err:
            raise FailedPrecondition(f"{memory} is not a restorable xl save image: {err}") from err
        size = memory.stat().st_size
        # The image carries libxl's complete config; a config file of ours
        # carries less (xen_config), so it is written only when disks moved.
        config_path = None
        given: dict[str, Any] | None = saved
        source: contextlib.AbstractAsyncContextManager[Path] = contextlib.nullcontext(memory)
        if _disks_of(saved) != {d.vdev: (d.target, d.format) for d in config.disks}:
            config_path, given = self._config_path(config.name), None
            self._dir.mkdir(parents=True, exist_ok=True)
            write_atomic(config_path, config.to_text(), mode=0o600)
        elif (fresh := with_fresh_genid(saved)) is not None:
            given = fresh
            source = xen_feed.fifo_source(memory, header.with_config(fresh), header.stream_offset, self._dir)
        async with source as path:
            restored = await self._run(xl_argv.restore(path, paused=True, config_path=config_path, xl=self._xl_bin),
                                       timeout=_transfer_timeout(config.memory_mib))
        try:
            # `xl restore -p` left it paused, and `xl unpause` that succeeded
            # left it running.
            domain = await self._restored(config.name, restored.stderr, given)
            if not paused:
                await self._xl(xl_argv.unpause(domain.domid, xl=self._xl_bin))
                domain = replace(domain, state=RunState.RUNNING)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.destroy(config.name)
            raise
        progress(1.0, done=size, total=size, message="memory image loaded")
        return domain
