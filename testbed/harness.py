"""A real domsnapd (started, restarted, stopped) and the disks and configs of test guests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent
AGENT_START_TIMEOUT = 30.0
MiB = 1 << 20


@dataclass
class Agent:
    """A domsnapd process; restartable, its state kept across restarts."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # TOML for the agent's config file; empty, the host's /etc/domsnap must not leak in.
    config_toml: str = ""
    # More --listen addresses besides the unix socket (which the harness uses).
    extra_listen: tuple[str, ...] = ()
    # A command the agent runs under (it execs domsnapd's argv): a sandbox, e.g. setpriv.
    wrapper: tuple[str, ...] = ()

    @property
    def sock(self) -> Path:
        return self.base / "domsnapd.sock"

    @property
    def address(self) -> str:
        return f"unix:{self.sock}"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def snapshot_root(self) -> Path:
        return self.base / "snapshots"

    @property
    def log(self) -> Path:
        return self.base / "domsnapd.log"

    def start(self) -> None:
        config = self.base / "domsnapd.toml"
        config.write_text(self.config_toml)
        argv = [*self.wrapper, str(BIN / "domsnapd"), "--config", str(config), "--listen", self.address,
                "--state-dir", str(self.state_dir), "--snapshot-root", str(self.snapshot_root), "--driver", "qemu"]
        for addr in self.extra_listen:
            argv += ["--listen", addr]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        self.wait_serving()

    def wait_serving(self) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"domsnapd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(self.address) as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"domsnapd did not serve within {AGENT_START_TIMEOUT} s")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.proc = None
        return rc

    def restart(self) -> None:
        self.stop()
        self.start()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> pb_grpc.SnapshotAgentStub:
        return pb_grpc.SnapshotAgentStub(self.channel())

    def cli(self, *args: str, check: bool = False, timeout: float = 300, stdin: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "domsnap"), "-H", self.address, *args], capture_output=True, text=True,
                              timeout=timeout, input=stdin)
        if check and proc.returncode != 0:
            raise AssertionError(f"domsnap {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc


def make_disk(path: Path, fmt: str, size_mib: int = 32) -> None:
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"], check=True)
    else:
        with open(path, "wb") as f:
            f.truncate(size_mib * MiB)


def guest_config(name: str, kernel: Path, ramdisk: Path, disks: dict[str, tuple[Path, str]], serial: Path,
                 memory: int = 128, extra: str = "", vcpus: int = 1) -> str:
    specs = ", ".join(f"'format={fmt}, vdev={vdev}, target={path}'" for vdev, (path, fmt) in disks.items())
    return (
        f'name = "{name}"\nmemory = {memory}\nvcpus = {vcpus}\n'
        f'kernel = "{kernel}"\nramdisk = "{ramdisk}"\n'
        f'extra = "console=ttyS0 quiet panic=-1 {extra}"\n'
        f"disk = [ {specs} ]\n"
        f'serial = "file:{serial}"\n'
    )


def kvm_boots(kernel: Path, ramdisk: Path, workdir: Path, timeout: float = 8.0) -> bool:
    """Whether the test guest reaches READY under KVM within `timeout`.

    /dev/kvm can exist where KVM guests stall and die (a nested module that
    cannot run them); only a real boot tells.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    serial = workdir / "kvm-probe.log"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "128", "-nodefaults", "-display", "none",
         "-kernel", str(kernel), "-initrd", str(ramdisk), "-append", "console=ttyS0 quiet panic=-1",
         "-serial", f"file:{serial}", "-no-reboot"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if serial.exists() and b"READY" in serial.read_bytes():
                return True
            time.sleep(0.1)
        return False
    finally:
        proc.kill()
        proc.wait()
