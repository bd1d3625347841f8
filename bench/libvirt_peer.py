"""libvirt as the peer: the daemons for one run, domains defined like domsnap's,
snapshots through virsh, and QEMU's own STOP/RESUME events through
`virsh qemu-monitor-event`.

Used by bench/vs_libvirt.py. Everything goes through the `virsh` and
`virt-admin` clients on libvirtd's unix socket (qemu:///system).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

URI = "qemu:///system"
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))
UNLIMITED_MIB_S = 8796093022207  # virsh migrate-setspeed's largest value (MiB/s)
_EVENT = re.compile(r"event (\w+) at (\d+)\.(\d+) for domain")


def _pid_alive(pidfile: Path, comm: str) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
            return pid
    except (OSError, ValueError):
        pass
    return None


def ensure_installed() -> bool:
    """Install Debian's libvirt if virsh or libvirtd is missing; True if it installed."""
    if shutil.which("virsh") and shutil.which("libvirtd") and shutil.which("virtlogd"):
        return False
    subprocess.run(
        ["apt-get", "install", "-y", "libvirt-daemon-system", "libvirt-clients"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return True


def virsh(*args: str, check: bool = True, timeout: float = 600) -> tuple[float, str]:
    """Run virsh; (wall seconds, stdout)."""
    t0 = time.monotonic()
    proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
    return wall, proc.stdout if proc.returncode == 0 else proc.stderr


@dataclass
class Daemons:
    """virtlogd and libvirtd, started for this run unless already running."""

    log_file: Path
    started: list[tuple[str, int]] = field(default_factory=list)
    old_filters: str = ""
    old_outputs: str = ""

    def start(self) -> None:
        for name, pidfile in DAEMONS:
            if _pid_alive(pidfile, name) is not None:
                continue
            subprocess.run([name, "-d"], check=True)
            deadline = time.monotonic() + 30
            while (pid := _pid_alive(pidfile, name)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.05)
            self.started.append((name, pid))
        deadline = time.monotonic() + 60
        while subprocess.run(["virt-admin", "srv-list"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd does not answer virt-admin")
            time.sleep(0.1)
        # qemu_process at debug level: the start-up steps with timestamps, from
        # which the capability re-probe's cost is read (a few lines per start).
        self.old_filters = self._admin_get("daemon-log-filters")
        self.old_outputs = self._admin_get("daemon-log-outputs")
        subprocess.run(["virt-admin", "daemon-log-filters", "1:qemu.qemu_process 3:*"], check=True, capture_output=True)
        subprocess.run(["virt-admin", "daemon-log-outputs", f"1:file:{self.log_file}"], check=True, capture_output=True)

    @staticmethod
    def _admin_get(what: str) -> str:
        out = subprocess.run(["virt-admin", what], capture_output=True, text=True).stdout
        return out.split(":", 1)[1].strip() if ":" in out else ""

    def stop(self) -> None:
        if not self.started:
            with contextlib.suppress(Exception):
                subprocess.run(["virt-admin", "daemon-log-filters", self.old_filters], capture_output=True)
                subprocess.run(
                    ["virt-admin", "daemon-log-outputs", self.old_outputs or "3:stderr"], capture_output=True
                )
        for _name, pid in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.started.clear()


def domain_xml(
    name: str, *, memory_mib: int, kernel: Path, initrd: Path, cmdline: str, disk: Path, serial: Path
) -> str:
    """The domsnap guest as libvirt XML: TCG, pinned machine type, direct kernel
    boot, one virtio qcow2 disk with QEMU's default (writeback) cache, a serial
    port to a file, ACPI on (as QEMU's default), and none of libvirt's default
    extra devices (USB controller, balloon)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class Domain:
    """One libvirt domain and a `virsh qemu-monitor-event` reader of its QEMU events."""

    name: str
    workdir: Path
    monitor: subprocess.Popen[bytes] | None = None

    @property
    def events_file(self) -> Path:
        return self.workdir / f"{self.name}.events"

    def define(self, xml: str) -> float:
        path = self.workdir / f"{self.name}.xml"
        path.write_text(xml)
        return virsh("define", str(path))[0]

    def start(self) -> float:
        wall = virsh("start", self.name)[0]
        if self.monitor is None:
            out = open(self.events_file, "ab")  # noqa: SIM115 - owned by the child
            self.monitor = subprocess.Popen(
                ["virsh", "-c", URI, "qemu-monitor-event", "--domain", self.name, "--loop"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            out.close()
            time.sleep(0.5)
        virsh("migrate-setspeed", self.name, str(UNLIMITED_MIB_S))
        return wall

    def pid(self) -> int | None:
        try:
            return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def events_offset(self) -> int:
        return self.events_file.stat().st_size if self.events_file.exists() else 0

    def pause_since(self, offset: int, timeout: float = 10.0) -> tuple[float, float]:
        """QEMU's STOP and RESUME timestamps of the first pause after `offset`."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.events_file, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            stop = resume = None
            for m in _EVENT.finditer(text):
                t = int(m.group(2)) + int(m.group(3)) / 1e6
                if m.group(1) == "STOP" and stop is None:
                    stop = t
                elif m.group(1) == "RESUME" and stop is not None:
                    resume = t
                    break
            if stop is not None and resume is not None:
                return stop, resume
            if time.monotonic() > deadline:
                raise RuntimeError(f"no STOP/RESUME pair for {self.name} in its QEMU events")
            time.sleep(0.05)

    def qmp(self, command: str) -> str:
        return virsh("qemu-monitor-command", self.name, f'{{"execute":"{command}"}}')[1]

    def command_line(self) -> list[str]:
        """libvirt's last QEMU command line for this domain, from its log."""
        text = Path(f"/var/log/libvirt/qemu/{self.name}.log").read_text(errors="replace")
        block = text[text.rfind("starting up") :]
        lines = block.splitlines()[1:]
        cmd: list[str] = []
        for line in lines:
            cmd.append(line.rstrip("\\").strip())
            if not line.endswith("\\"):
                break
        argv = shlex.split(" ".join(cmd))
        start = next(i for i, a in enumerate(argv) if "qemu-system" in a)
        return argv[start:]

    def destroy(self) -> None:
        if self.monitor is not None:
            self.monitor.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.monitor.wait(timeout=10)
            if self.monitor.poll() is None:
                self.monitor.kill()
                self.monitor.wait()
            self.monitor = None
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, "--snapshots-metadata", check=False)


def probe_seconds(log_file: Path, since: str) -> list[float]:
    """libvirtd's QEMU capability re-probes in its qemu_process debug log after
    the timestamp `since` (HH:MM:SS.mmm, UTC): seconds from "Determining
    emulator version" to "Building mount namespace" of each domain start."""
    out = []
    begin = None
    stamp = re.compile(r"^\S+ (\d\d:\d\d:\d\d\.\d+)\+0000")
    for line in log_file.read_text(errors="replace").splitlines():
        m = stamp.match(line)
        if not m or m.group(1) < since:
            continue
        h, mi, s = m.group(1).split(":")
        t = int(h) * 3600 + int(mi) * 60 + float(s)
        if "Determining emulator version" in line:
            begin = t
        elif "Building mount namespace" in line and begin is not None:
            out.append(t - begin)
            begin = None
    return out


def argv_options(argv: list[str]) -> dict[str, list[str]]:
    """A QEMU argv as {option: [values]} (flags get an empty value)."""
    opts: dict[str, list[str]] = {}
    i = 1
    while i < len(argv):
        opt = argv[i]
        val = ""
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            val = argv[i + 1]
            i += 1
        opts.setdefault(opt, []).append(val)
        i += 1
    return opts
