"""The qemu driver: domains defined by xl.cfg files, run as QEMU processes the
agent launches (daemonized, so they outlive it) and drives through QMP.

Each domain has a folder `<state_dir>/qemu/<name>/` holding its config,
`runtime.json` (domid, pinned machine type), the QMP socket and the pid file.
Its serial console goes to `<state_dir>/qemu/console/<name>.log` unless its
config says otherwise: outside the folder, so that it outlives the domain
(as xl's consoles do under /var/log/xen/console) and spans reverts. A UEFI
domain's firmware variables live in `<state_dir>/qemu/nvram/<name>.fd`
(a copy of OVMF's template on its first start), outside the folder too: they
are the domain's, as libvirt keeps them, across destroy and create.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .. import runner
from ..config import QemuConfig
from ..domain import Domain, DomainConfig, RunState
from ..errors import AlreadyExists, CommandError, FailedPrecondition, InvalidArgument, NotFound
from ..fsutil import copy_atomic, write_atomic
from ..progress import StepProgress, ignore_progress
from ..runner import Runner
from . import kvm_probe, qemu_argv, qemu_migration, qemu_spec
from .base import BeforePause, BeforeResume, CheckpointResult, Hypervisor, InPause, Step, no_step
from .qemu_block import QmpBlockOps
from .qga import GuestAgent
from .qmp import QmpSession

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 60.0
CONSOLE_DIR = "console"
# In a domain's folder while a paused domain is relaunched from its memory image.
RELAUNCH = "relaunch.json"
NVRAM_DIR = "nvram"
# A snapshot's copy of the NVRAM, beside its memory image.
NVRAM_SUFFIX = ".nvram"
QUIT_TIMEOUT = 10.0
QGA_SOCKET = "qga.sock"
# What a live create tells its watcher about how memory is written.
_MODE_WORDS = {
    qemu_migration.LiveMode.PRECOPY: "pre-copy (the guest pauses for the last pages and the disks)",
    qemu_migration.LiveMode.BACKGROUND: "background snapshot (the guest pauses for the disks and devices, "
                                        "then runs while its memory is written copy-on-write)",
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STATES = {
    "running": RunState.RUNNING,
    "paused": RunState.PAUSED,
    "prelaunch": RunState.PAUSED,
    "postmigrate": RunState.PAUSED,
    "finish-migrate": RunState.PAUSED,
    "inmigrate": RunState.PAUSED,
    "suspended": RunState.PAUSED,
    "shutdown": RunState.SHUTDOWN,
    "guest-panicked": RunState.CRASHED,
    "internal-error": RunState.CRASHED,
}


@dataclass
class _Instance:
    domid: int
    machine: str
    config: DomainConfig
    folder: Path
    qmp: QmpSession
    # Read from the pid file once: a QEMU keeps its pid for life.
    _pid: int | None = None
    # Its QEMU's version and accelerator ("QEMU 7.2.19", "tcg"), asked once
    # (fixed for its life) by the first live save that needs them.
    emulator: tuple[str, str] | None = None

    @property
    def paths(self) -> qemu_argv.LaunchPaths:
        console = self.folder.parent / CONSOLE_DIR / f"{self.config.name}.log"
        return qemu_argv.LaunchPaths(self.folder / "qmp.sock", self.folder / "qemu.pid", console,
                                     _nvram(self.folder.parent, self.config.name), self.folder / QGA_SOCKET)

    def pid(self) -> int | None:
        return self.process()[0]

    def process(self) -> tuple[int | None, list[bytes]]:
        """The QEMU's pid and its /proc stat fields; (None, []) once it has exited."""
        if self._pid is None:
            try:
                self._pid = int((self.folder / "qemu.pid").read_text().strip())
            except (OSError, ValueError):
                return None, []
        fields = _proc_stat(self._pid)
        return (self._pid, fields) if fields else (None, [])


def _nvram(root: Path, name: str) -> Path:
    return root / NVRAM_DIR / f"{name}.fd"


def _nvram_copy(memory: Path) -> Path:
    return memory.with_name(memory.name + NVRAM_SUFFIX)


def _proc_stat(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name; [] once the
    process has exited (a zombie too: only its parent has not reaped it)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    fields = data.rsplit(b") ", 1)[-1].split()
    return [] if not fields or fields[0] == b"Z" else fields


async def _reap(pid: int, grace: float) -> None:
    """Until process `pid` (a QEMU) has ended; killed once `grace` seconds
    have passed. One pidfd throughout, opened while the pid is still the
    process's: once it is gone its pid may name another, which a kill by pid
    would hit and a wait by pid would wait for, for ever."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not await _ended(fd, grace):
            log.warning("QEMU pid %d still runs after %g s; killing it", pid, grace)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            await _ended(fd, None)
    finally:
        os.close(fd)


async def _ended(pidfd: int, timeout: float | None) -> bool:
    """Whether the process ends within `timeout`: woken by its pidfd the
    moment it does (a revert waits on this), not by polling."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    loop.add_reader(pidfd, ended.set)
    try:
        await asyncio.wait_for(ended.wait(), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def _cpu_seconds(fields: list[bytes]) -> float:
    # utime and stime, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class QemuDriver(Hypervisor):
    name = "qemu"

    def __init__(self, config: QemuConfig, state_dir: Path, run: Runner = runner.run) -> None:
        self._cfg = config
        self._root = state_dir / "qemu"
        self._run = run
        self._instances: dict[str, _Instance] = {}
        self._version = ""
        self._probed: tuple[str, int, int] | None = None
        self._machine = config.machine
        self._machines: frozenset[str] = frozenset()
        self._accel = "" if config.accel == "auto" else config.accel
        self._create_lock = asyncio.Lock()
        self._attaching: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ agent side

    async def probe(self) -> str:
        # Asked on every create, revert and GetAgentInfo: run the binary only
        # when it changed (an upgrade), not each time.
        binary = shutil.which(self._cfg.binary) or self._cfg.binary
        try:
            st = os.stat(binary)
            stamp: tuple[str, int, int] | None = (binary, st.st_ino, st.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._probed:
            return self._version
        out = await self._run(qemu_argv.version(self._cfg.binary), timeout=10)
        self._version = qemu_argv.parse_version(out.stdout)
        self._probed = stamp
        out = await self._run(qemu_argv.machine_help(self._cfg.binary), timeout=10)
        self._machines = qemu_argv.parse_machines(out.stdout)
        if not self._machine:
            self._machine = qemu_argv.parse_machine_alias(out.stdout)
        if not self._accel:
            self._accel = "kvm" if await self._kvm_runs() else "tcg"
            log.info("accelerator: %s (accel = \"auto\": a probe guest %s under KVM)", self._accel,
                     "ran" if self._accel == "kvm" else "did not run")
        if qemu_migration.precopy_loses_writes(self._version, self._accel):
            if self._cfg.live_mode == "precopy":
                log.warning("%s under TCG: a live pre-copy snapshot can miss what the guest writes meanwhile (a "
                            "QEMU bug fixed in 9.0); set [qemu] live_mode = \"auto\" or \"background\"",
                            self._version)
            elif self._cfg.live_mode == "auto":
                log.info("%s under TCG: live snapshots are background snapshots (live_mode = \"auto\": a "
                         "pre-copy could miss what the guest writes meanwhile)", self._version)
        return self._version

    async def check_facts(self, facts: Mapping[str, str]) -> None:
        await self.probe()
        machine = facts.get("machine")
        if machine is not None and machine not in self._machines:
            shown = machine if len(machine) <= 64 else machine[:64] + "…"
            raise FailedPrecondition(f"the snapshot's machine type {shown!r} is not one that {self._cfg.binary} "
                                     "provides (qemu-system -machine help)")

    async def _kvm_runs(self) -> bool:
        """Whether a guest really runs under KVM here (kvm_probe.py)."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return False
        self._root.mkdir(parents=True, exist_ok=True)
        image = self._root / "kvm-probe.bin"
        await asyncio.to_thread(image.write_bytes, kvm_probe.IMAGE)
        try:
            await self._run(qemu_argv.kvm_probe(self._cfg.binary, image), timeout=kvm_probe.TIMEOUT)
        except CommandError as err:
            if err.rc == kvm_probe.EXIT_STATUS:
                return True
            log.info("KVM probe guest: %s", err)
        finally:
            image.unlink(missing_ok=True)
        return False

    async def start(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        (self._root / CONSOLE_DIR).mkdir(exist_ok=True)
        for folder in sorted(p for p in self._root.iterdir() if p.is_dir() and p.name not in (CONSOLE_DIR, NVRAM_DIR)):
            try:
                inst = self._load(folder)
            except (OSError, ValueError, KeyError) as err:
                log.warning("ignoring unreadable domain folder %s: %s", folder, err)
                continue
            if (folder / RELAUNCH).exists():
                try:
                    await self._finish_relaunch(inst)
                except Exception:
                    log.exception("domain %s: the relaunch from its memory image failed; its folder %s and "
                                  "the image are kept", inst.config.name, folder)
                continue
            if inst.pid() is None:
                # Its QEMU died while no agent watched: the domain is gone,
                # as a Xen domain is after its host rebooted.
                log.info("domain %s (id %d) is no longer running; forgetting it", inst.config.name, inst.domid)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._instances[inst.config.name] = inst
            log.info("re-attached to domain %s (id %d)", inst.config.name, inst.domid)
        # Each QMP session opened now, in the background: a domain's first
        # request then waits for no handshake, its run state is known
        # (events keep it so from then on), and so are its migration settings.
        for inst in self._instances.values():
            task = asyncio.get_running_loop().create_task(self._attach(inst))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    async def close(self) -> None:
        for task in self._attaching:
            task.cancel()
        for inst in self._instances.values():
            await inst.qmp.close()

    def capabilities(self) -> list[str]:
        return ["live", "internal", "external", "format:qcow2", "format:raw", "accel:" + self.accel, "uefi",
                "cdrom", "quiesce"]

    @property
    def accel(self) -> str:
        """The accelerator domains start on: the config's, or what `auto` found."""
        return self._accel or "tcg"

    def _load(self, folder: Path) -> _Instance:
        runtime = json.loads((folder / "runtime.json").read_text())
        config = DomainConfig.parse((folder / "config.cfg").read_text(), source=str(folder / "config.cfg"))
        return _Instance(int(runtime["domid"]), str(runtime["machine"]), config, folder,
                         QmpSession(folder / "qmp.sock", config.name))

    def _save(self, inst: _Instance) -> None:
        # 0600: it may hold a VNC password.
        write_atomic(inst.folder / "config.cfg", inst.config.to_text(), mode=0o600)
        write_atomic(inst.folder / "runtime.json", json.dumps({"domid": inst.domid, "machine": inst.machine}))

    def _next_domid(self) -> int:
        counter = self._root / "next-domid"
        try:
            domid = int(counter.read_text())
        except (OSError, ValueError):
            domid = 1
        write_atomic(counter, str(domid + 1))
        return domid

    # --------------------------------------------------------------- domains

    def _instance(self, ref: str) -> _Instance:
        if ref in self._instances:
            return self._instances[ref]
        if ref.isdigit():
            for inst in self._instances.values():
                if inst.domid == int(ref):
                    return inst
        raise NotFound(f"domain {ref!r} does not exist", reason="DOMAIN_NOT_FOUND", domain=ref)

    async def _attach(self, inst: _Instance) -> None:
        await self._domain(inst)
        try:
            await qemu_migration.learn_settings(inst.qmp)
        except Exception as err:  # the first save sets them all
            log.warning("domain %s: its migration settings could not be read: %s", inst.config.name, err)

    async def _domain(self, inst: _Instance) -> Domain:
        pid, stat = inst.process()
        if pid is None:
            return Domain(inst.domid, inst.config, RunState.SHUTDOWN)
        try:
            state = _STATES.get(await inst.qmp.status(), RunState.PAUSED)
        except Exception as err:  # a wedged QEMU must not break `list`
            log.warning("domain %s: query-status failed: %s", inst.config.name, err)
            state = RunState.CRASHED
        return Domain(inst.domid, inst.config, state, _cpu_seconds(stat))

    async def list_domains(self) -> list[Domain]:
        insts = sorted(self._instances.values(), key=lambda i: i.domid)
        # The QEMUs whose run state no event told yet are asked at once; the
        # answer is then made in one go (with run states known, none of
        # these awaits suspends, and no task per domain is scheduled).
        await asyncio.gather(*(self._domain(i) for i in insts if not i.qmp.knows_status))
        return [await self._domain(i) for i in insts]

    async def lookup(self, ref: str) -> Domain:
        return await self._domain(self._instance(ref))

    def _check_host(self, config: DomainConfig) -> qemu_spec.GuestSpec:
        """The config, and what it names on this host: disks, bridges, firmware."""
        spec = qemu_spec.guest_spec(config)
        # A disk without a target is an empty CD-ROM drive.
        for disk in (d for d in config.disks if d.target):
            qemu_argv.qemu_format(disk)
            if not Path(disk.target).is_file() and not Path(disk.target).is_block_device():
                raise NotFound(f"disk {disk.vdev}: {disk.target} does not exist")
        for nic in spec.nics:
            if nic.bridge is not None and not Path(f"/sys/class/net/{nic.bridge}/bridge").is_dir():
                raise NotFound(f"vif: bridge {nic.bridge} does not exist on this host (leave bridge= out for "
                               "user-mode networking)")
        if spec.uefi:
            for firmware in (qemu_argv.OVMF_CODE, qemu_argv.OVMF_VARS):
                if not firmware.is_file():
                    raise FailedPrecondition(f"bios=\"ovmf\": {firmware} is missing (Debian package ovmf)")
        return spec

    async def _launch(
        self, config: DomainConfig, *, paused: bool, incoming: bool, machine: str | None = None,
        domid: int | None = None,
    ) -> _Instance:
        async with self._create_lock:
            if config.name in self._instances:
                raise AlreadyExists(f"domain {config.name!r} already exists", reason="DOMAIN_EXISTS",
                                    domain=config.name)
            spec = self._check_host(config)
            folder = self._root / config.name
            # A re-launched domain keeps its folder.
            fresh = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            (self._root / CONSOLE_DIR).mkdir(exist_ok=True)
            for stale in ("qmp.sock", "qemu.pid", QGA_SOCKET):
                (folder / stale).unlink(missing_ok=True)
            inst = _Instance(domid or self._next_domid(), machine or self._machine, config, folder,
                             QmpSession(folder / "qmp.sock", config.name))
            try:
                await asyncio.to_thread(self._save, inst)
                nvram = inst.paths.nvram
                if spec.uefi and nvram is not None and not nvram.exists():
                    nvram.parent.mkdir(exist_ok=True)
                    await asyncio.to_thread(copy_atomic, qemu_argv.OVMF_VARS, nvram)
                argv = qemu_argv.launch(config, binary=self._cfg.binary, machine=inst.machine,
                                        accel=self.accel, paths=inst.paths, incoming=incoming)
                if paused and not incoming:
                    argv.append("-S")
                await self._run(argv, timeout=LAUNCH_TIMEOUT)
                self._instances[config.name] = inst
                if spec.vnc is not None and spec.vnc.password is not None:
                    await inst.qmp.execute("change-vnc-password", {"password": spec.vnc.password})
            except BaseException:
                if fresh:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        return inst

    async def create(self, config: DomainConfig, *, paused: bool) -> Domain:
        inst = await self._launch(config, paused=paused, incoming=False)
        return await self._domain(inst)

    async def destroy(self, name: str) -> None:
        inst = self._instance(name)
        await self._stop_instance(inst)
        await asyncio.to_thread(shutil.rmtree, inst.folder, ignore_errors=True)

    async def _stop_instance(self, inst: _Instance) -> None:
        pid = inst.pid()
        with contextlib.suppress(Exception):
            await inst.qmp.execute("quit", timeout=QUIT_TIMEOUT)
        await inst.qmp.close()
        if pid is not None:
            await _reap(pid, QUIT_TIMEOUT)
        del self._instances[inst.config.name]

    async def pause(self, name: str) -> Domain:
        inst = self._instance(name)
        await inst.qmp.execute("stop")
        return await self._domain(inst)

    async def unpause(self, name: str) -> Domain:
        inst = self._instance(name)
        await inst.qmp.execute("cont")
        return await self._domain(inst)

    def guest_agent(self, name: str) -> GuestAgent:
        inst = self._instance(name)
        if not qemu_spec.guest_spec(inst.config).guest_agent:
            raise FailedPrecondition(f"domain {name} has no guest agent channel: its config needs "
                                     f'channel=["name={qemu_spec.GUEST_AGENT_CHANNEL}"] (domsnap.cfg(5)) '
                                     "and a guest running qemu-guest-agent", reason="QUIESCE_UNSUPPORTED",
                                     domain=name)
        return GuestAgent(inst.folder / QGA_SOCKET, name)

    def block_ops(self, name: str) -> QmpBlockOps:
        return self._block_ops(self._instance(name), persist=True)

    def _block_ops(self, inst: _Instance, *, persist: bool) -> QmpBlockOps:
        """`persist`: write the config at once when a disk moves; else the caller does, later."""

        def moved(vdev: str, target: str, fmt: str) -> None:
            disks = [replace(d, target=target, format=fmt) if d.vdev == vdev else d for d in inst.config.disks]
            inst.config = inst.config.with_disks(disks)
            if persist:
                self._save(inst)

        return QmpBlockOps(inst.qmp, moved)

    async def change_medium(self, name: str, vdev: str, target: str) -> Domain:
        """xl cd-insert (a raw image at `target`) / cd-eject (`target` empty);
        the domain's config follows, so a snapshot records the medium."""
        inst = self._instance(name)
        disk = inst.config.disk(vdev)
        if disk.devtype != "cdrom":
            raise InvalidArgument(f"domain {name}: {vdev} is not a CD-ROM drive")
        if target:
            if not Path(target).is_absolute() or not Path(target).is_file():
                raise NotFound(f"cd-insert: {target} is not an existing file (an absolute path on the agent's host)")
            await inst.qmp.execute("blockdev-change-medium", {"id": f"{vdev}-dev", "filename": target,
                                                               "format": "raw", "read-only-mode": "read-only"})
            changed = replace(disk, target=target, format="raw")
        else:
            await inst.qmp.execute("eject", {"id": f"{vdev}-dev", "force": True})
            changed = replace(disk, target="", format="empty")
        inst.config = inst.config.with_disks([changed if d.vdev == vdev else d for d in inst.config.disks])
        await asyncio.to_thread(self._save, inst)
        return await self._domain(inst)

    # ------------------------------------------------------------- snapshots

    async def checkpoint(
        self, domain: Domain, memory: Path, *, live: bool, in_pause: InPause, progress: StepProgress,
        step: Step = no_step, before_pause: BeforePause | None = None, before_resume: BeforeResume | None = None,
    ) -> CheckpointResult:
        inst = self._instance(domain.name)
        if domain.state not in (RunState.RUNNING, RunState.PAUSED):
            raise FailedPrecondition(f"domain {domain.name} is {domain.state}; only a running or paused one "
                                     "can be snapshotted")
        # The disks' moves are written down after the guest resumed, not in
        # its pause: until the create's manifest exists, a crash rolls them
        # back (through QEMU, whatever the file says), so nothing depends on
        # the file being current any earlier.
        before = inst.config
        block = self._block_ops(inst, persist=False)
        nvram = inst.paths.nvram if qemu_spec.guest_spec(inst.config).uefi else None
        copy = _nvram_copy(memory)
        if nvram is not None and os.path.lexists(copy):
            raise AlreadyExists(f"{copy} already exists", reason="PATH_EXISTS", path=str(copy))

        async def pause_work() -> None:
            await in_pause(block)
            if nvram is not None:
                # The variables at the instant: the guest is stopped, so the
                # firmware writes nothing while this runs (a few hundred KiB).
                await asyncio.to_thread(shutil.copyfile, nvram, copy)

        running = domain.state is RunState.RUNNING
        mode = await self._live_mode(inst) if live and running else qemu_migration.LiveMode.PRECOPY
        if live and running:
            why = ""
            if self._cfg.live_mode == "auto" and inst.emulator and mode is qemu_migration.LiveMode.BACKGROUND:
                why = f"; live_mode auto: a pre-copy by {inst.emulator[0]} under TCG can miss guest writes"
            progress(0.0, message=f"memory: live, {_MODE_WORDS[mode]}{why}")
        try:
            saved = await qemu_migration.save(
                inst.qmp, memory, live=live, was_running=running, in_pause=pause_work, progress=progress,
                before_pause=before_pause, before_resume=before_resume, mode=mode,
                bandwidth=self._cfg.max_bandwidth,
            )
        finally:
            if inst.config is not before:
                await asyncio.to_thread(self._save, inst)
        if domain.state is RunState.PAUSED:
            await self._repark(inst, memory, progress, step)
        downtime = 0.0
        if saved.stopped_at is not None and saved.resumed_at is not None:
            downtime = max(saved.resumed_at - saved.stopped_at, 0.0)
        # Named, not pathed: the copy is always found beside the memory image
        # (a manifest is never trusted to name files).
        facts = {"nvram": copy.name} if nvram is not None else {}
        if saved.mode is not None:
            facts["live_mode"] = saved.mode.value
        return CheckpointResult(saved.memory_bytes, downtime, facts,
                                paused_at=saved.stopped_at or 0.0, resumed_at=saved.resumed_at or 0.0)

    async def _live_mode(self, inst: _Instance) -> qemu_migration.LiveMode:
        """How a live save of this running domain writes memory: under "auto",
        decided by the domain's own QEMU, which may predate an upgrade of the
        binary or run under another accelerator than the agent picks now."""
        if self._cfg.live_mode == "auto" and inst.emulator is None:
            version = (await inst.qmp.execute("query-version"))["qemu"]
            kvm = await inst.qmp.execute("query-kvm")
            inst.emulator = (f"QEMU {version['major']}.{version['minor']}.{version['micro']}",
                             "kvm" if kvm.get("enabled") else "tcg")
        return qemu_migration.live_mode_for(self._cfg.live_mode, *(inst.emulator or ("", "")))

    def snapshot_files(self, memory: Path) -> list[Path]:
        return [_nvram_copy(memory)]

    async def _repark(self, inst: _Instance, memory: Path, progress: StepProgress, step: Step) -> None:
        """Give a paused domain a fresh QEMU loaded from the image just written.

        After a completed save QEMU has handed its disks over (deactivated
        them) and refuses any further migration; a running domain gets them
        back with `cont`, but a paused one must stay paused, so it is
        restarted from its own memory image, which holds exactly its state.
        Between the stop and the end of the load the domain exists only in
        that image: the domain's folder says so (RELAUNCH), and an agent that
        dies meanwhile relaunches it at its next start.
        """
        write_atomic(inst.folder / RELAUNCH, json.dumps({"memory": str(memory)}))
        await step("repark")
        await self._stop_instance(inst)
        await step("relaunch")
        await self._relaunch(inst, memory, progress)

    async def _relaunch(self, inst: _Instance, memory: Path, progress: StepProgress) -> None:
        relaunched = await self._launch(inst.config, paused=True, incoming=True, machine=inst.machine,
                                        domid=inst.domid)
        await qemu_migration.load(relaunched.qmp, memory, progress=progress)
        (inst.folder / RELAUNCH).unlink(missing_ok=True)

    async def _finish_relaunch(self, inst: _Instance) -> None:
        """A paused domain whose relaunch a dead agent left half done: a QEMU
        still there (saved, or started but not loaded) goes, a fresh one loads the image."""
        memory = Path(json.loads((inst.folder / RELAUNCH).read_text())["memory"])
        if not memory.is_file() and inst.pid() is not None:
            # Loaded, then the image went with a rolled-back snapshot: the QEMU there is the domain.
            (inst.folder / RELAUNCH).unlink()
            self._instances[inst.config.name] = inst
            return
        log.warning("domain %s was being relaunched from %s when the agent stopped; relaunching it",
                    inst.config.name, memory)
        if (pid := inst.pid()) is not None:
            await _reap(pid, 0.0)
        await self._relaunch(inst, memory, ignore_progress)

    async def restore(
        self, config: DomainConfig, memory: Path, *, facts: Mapping[str, str], paused: bool,
        progress: StepProgress, reset_nvram: bool = False,
    ) -> Domain:
        if "nvram" in facts:
            # Before QEMU opens it: the variables as they were at the instant,
            # or the firmware's template.
            source = qemu_argv.OVMF_VARS if reset_nvram else _nvram_copy(memory)
            nvram = _nvram(self._root, config.name)
            nvram.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(copy_atomic, source, nvram)
        if reset_nvram:
            # Firmware restored from a memory image holds the variables it had
            # (QEMU even writes its flash back to the file once it runs), so
            # the template only takes under firmware that starts afresh: the
            # snapshot's disks, booted anew.
            fresh = await self._launch(config, paused=paused, incoming=False, machine=facts.get("machine"))
            return await self._domain(fresh)
        inst = await self._launch(config, paused=True, incoming=True, machine=facts.get("machine"))
        try:
            await qemu_migration.load(inst.qmp, memory, progress=progress)
            if not paused:
                await inst.qmp.execute("cont")
        except BaseException:
            with contextlib.suppress(Exception):
                await self.destroy(config.name)
            raise
        return await self._domain(inst)

    async def abandon_transfers(self, name: str) -> None:
        await qemu_migration.cancel_in_flight(self._instance(name).qmp)

    def facts(self, domain: Domain) -> dict[str, str]:
        inst = self._instance(domain.name)
        return {"machine": inst.machine, "accel": self.accel}
