"""Fixtures shared by the integration tests: a real domsnapd on a unix socket
and real QEMU guests (TCG) built from Debian packages by guest/build.sh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc
from tests import guestprobe

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AGENT_START_TIMEOUT = 30.0
MiB = 1 << 20


@dataclass
class Agent:
    """A domsnapd process; restartable, its state kept across restarts."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

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
        # An empty config file: the host's /etc/domsnap must not leak in.
        config = self.base / "domsnapd.toml"
        config.write_text("")
        argv = [str(BIN / "domsnapd"), "--config", str(config), "--listen", self.address,
                "--state-dir", str(self.state_dir), "--snapshot-root", str(self.snapshot_root), "--driver", "qemu"]
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


@dataclass
class Guest:
    """A running test domain and the files that show what it holds."""

    agent: Agent
    name: str
    folder: Path
    disks: dict[str, tuple[Path, str]]
    serial: Path

    def lines_since(self, offset: int) -> list[str]:
        return guestprobe.read_lines(self.serial, offset)

    def mark(self) -> int:
        return guestprobe.log_size(self.serial)

    def counter(self) -> int:
        value = guestprobe.last_counter(self.serial)
        assert value is not None, "the guest printed no counter yet"
        return value

    def domain(self) -> pb.Domain:
        return self.agent.stub().GetDomain(pb.GetDomainRequest(domain=self.name), timeout=30)

    def create_snapshot(self, **fields: object) -> list[pb.OperationEvent]:
        req = pb.CreateSnapshotRequest(domain=self.name, request_id=uuid.uuid4().hex, **fields)  # type: ignore[arg-type]
        return list(self.agent.stub().CreateSnapshot(req, timeout=300))

    def revert(self, snapshot: str, **fields: object) -> list[pb.OperationEvent]:
        req = pb.RevertSnapshotRequest(domain=self.name, snapshot=snapshot, request_id=uuid.uuid4().hex,
                                       **fields)  # type: ignore[arg-type]
        return list(self.agent.stub().RevertSnapshot(req, timeout=300))


@pytest.fixture(scope="session")
def guest_image() -> tuple[Path, Path]:
    return guestprobe.guest_paths()


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    # Short base path: unix socket paths are limited to 108 bytes.
    base = tmp_path_factory.mktemp("agent")
    a = Agent(base)
    a.start()
    yield a
    stub = a.stub()
    for d in stub.ListDomains(pb.ListDomainsRequest(), timeout=30).domains:
        stub.DestroyDomain(pb.DestroyDomainRequest(domain=d.name), timeout=60)
    if a.proc is not None:
        a.stop()


def make_disk(path: Path, fmt: str, size_mib: int = 32) -> None:
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"], check=True)
    else:
        with open(path, "wb") as f:
            f.truncate(size_mib * MiB)


def guest_config(name: str, kernel: Path, ramdisk: Path, disks: dict[str, tuple[Path, str]], serial: Path,
                 memory: int = 128, extra: str = "") -> str:
    specs = ", ".join(f"'format={fmt}, vdev={vdev}, target={path}'" for vdev, (path, fmt) in disks.items())
    return (
        f'name = "{name}"\nmemory = {memory}\nvcpus = 1\n'
        f'kernel = "{kernel}"\nramdisk = "{ramdisk}"\n'
        f'extra = "console=ttyS0 quiet panic=-1 {extra}"\n'
        f"disk = [ {specs} ]\n"
        f'serial = "file:{serial}"\n'
    )


class BootGuest(Protocol):
    def __call__(self, *formats: str, memory: int = 128, name: str | None = None, wait: bool = True) -> Guest: ...


@pytest.fixture
def boot_guest(agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> Iterator[BootGuest]:
    """Boot a fresh guest with the given disk formats; destroyed afterwards."""
    made: list[Guest] = []

    def boot(*formats: str, memory: int = 128, name: str | None = None, wait: bool = True) -> Guest:
        name = name or f"t{uuid.uuid4().hex[:8]}"
        folder = tmp_path / name
        folder.mkdir()
        disks = {}
        for i, fmt in enumerate(formats):
            vdev = "xvd" + "abcdefgh"[i]
            path = folder / f"{vdev}.{fmt}"
            make_disk(path, fmt)
            disks[vdev] = (path, fmt)
        serial = folder / "serial.log"
        cfg = folder / "guest.cfg"
        cfg.write_text(guest_config(name, *guest_image, disks, serial, memory=memory))
        agent.cli("create", str(cfg), check=True)
        g = Guest(agent, name, folder, disks, serial)
        made.append(g)
        if wait:
            guestprobe.wait_ready(serial, timeout=60)
            # One full disk check cycle, so every disk holds a counter.
            for vdev in disks:
                guestprobe.wait_disk_ok(serial, "v" + vdev[2:], timeout=30)
        return g

    yield boot
    stub = agent.stub()
    for g in made:
        try:
            stub.DestroyDomain(pb.DestroyDomainRequest(domain=g.name), timeout=60)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
