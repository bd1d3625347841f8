"""Fixtures shared by the integration tests: a real domsnapd on a unix socket
and real QEMU guests (TCG) built from Debian packages by guest/build.sh."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from domsnap.v1 import domsnap_pb2 as pb
from testbed import guestprobe
from testbed.harness import Agent, guest_config, kvm_boots, make_disk

__all__ = ["Agent", "BootGuest", "Guest", "destroy_all", "error_info", "own_agent", "start_guest"]



def error_info(err: grpc.RpcError) -> tuple[str, str, dict[str, str]]:
    """A refusal's code, AIP-193 reason and metadata (its ErrorInfo, of domain domsnap.dev)."""
    status = rpc_status.from_call(err)
    assert status is not None, err
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.domain == "domsnap.dev", status
    return err.code().name, info.reason, dict(info.metadata)


@dataclass
class Guest:
    """A running test domain and the files that show what it holds."""

    agent: Agent
    name: str
    folder: Path
    disks: dict[str, tuple[Path, str]]
    serial: Path
    # The devices the guest's self-check reads (default: every disk, xvda -> vda).
    checks: tuple[str, ...] = ()

    def lines_since(self, offset: int) -> list[str]:
        return guestprobe.read_lines(self.serial, offset)

    def mark(self) -> int:
        return guestprobe.log_size(self.serial)

    def counter(self) -> int:
        value = guestprobe.last_counter(self.serial)
        assert value is not None, "the guest printed no counter yet"
        return value

    def domain(self) -> pb.Domain:
        return self.agent.stub().GetDomain(pb.GetDomainRequest(domain_name=self.name), timeout=30)

    def create_snapshot(self, **fields: object) -> list[pb.OperationEvent]:
        req = pb.CreateSnapshotRequest(domain_name=self.name, request_id=uuid.uuid4().hex, **fields)  # type: ignore[arg-type]
        return list(self.agent.stub().CreateSnapshot(req, timeout=300))

    def revert(self, snapshot: str, **fields: object) -> list[pb.OperationEvent]:
        req = pb.RevertSnapshotRequest(domain_name=self.name, snapshot_name=snapshot, request_id=uuid.uuid4().hex,
                                       **fields)  # type: ignore[arg-type]
        return list(self.agent.stub().RevertSnapshot(req, timeout=300))


@pytest.fixture(scope="session")
def guest_image() -> tuple[Path, Path]:
    return guestprobe.guest_paths()


@pytest.fixture(scope="session")
def accel(guest_image: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """TCG unless a short test boot under KVM succeeds (DOMSNAP_TEST_ACCEL overrides)."""
    forced = os.environ.get("DOMSNAP_TEST_ACCEL")
    if forced:
        return forced
    return "kvm" if kvm_boots(*guest_image, tmp_path_factory.mktemp("kvm")) else "tcg"


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory, accel: str) -> Iterator[Agent]:
    # Snapshot paths must lie inside a snapshot root (agent/paths.py): the
    # tests name directories under their own tmp_path, so the root is pytest's
    # whole base temp directory, which holds the agent's snapshot_root too.
    roots = f'snapshot_roots = ["{tmp_path_factory.getbasetemp()}"]\n'
    with own_agent(tmp_path_factory.mktemp("agent"), accel, top=roots) as a:
        yield a


@pytest.fixture(scope="module")
def slow_agent(tmp_path_factory: pytest.TempPathFactory, accel: str) -> Iterator[Agent]:
    """Memory images written at 8 MB/s, so that an operation can be caught mid-way."""
    with own_agent(tmp_path_factory.mktemp("slow"), accel, qemu="max_bandwidth = 8000000\n") as a:
        yield a


@contextlib.contextmanager
def own_agent(base: Path, accel: str, *, top: str = "", qemu: str = "", tables: str = "",
              wrapper: tuple[str, ...] = ()) -> Iterator[Agent]:
    """A running agent with its own config (top-level settings, [qemu] ones,
    further tables), run under `wrapper` if given; afterwards every domain it
    runs is destroyed."""
    # A short base path: unix socket paths are limited to 108 bytes.
    a = Agent(base, config_toml=f'{top}[qemu]\naccel = "{accel}"\n{qemu}{tables}', wrapper=wrapper)
    a.start()
    try:
        yield a
    finally:
        if a.proc is None:  # a test left it stopped (killed on purpose)
            a.start()
        stub = a.stub()
        for d in stub.ListDomains(pb.ListDomainsRequest(), timeout=30).domains:
            stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=d.name), timeout=60)
        a.stop()


class BootGuest(Protocol):
    def __call__(self, *formats: str, memory: int = 128, name: str | None = None, wait: bool = True,
                 disk_mib: int = 32, extra: str = "") -> Guest: ...


def start_guest(agent: Agent, image: tuple[Path, Path], folder: Path, *formats: str, memory: int = 128,
                name: str | None = None, wait: bool = True, disk_mib: int = 32, vcpus: int = 1,
                extra: str = "") -> Guest:
    """Create a domain with one fresh disk per format (xvda, xvdb, ...) and
    wait until the guest has checked every disk once."""
    name = name or f"t{uuid.uuid4().hex[:8]}"
    folder = folder / name
    folder.mkdir()
    disks = {}
    for i, fmt in enumerate(formats):
        vdev = "xvd" + "abcdefgh"[i]
        path = folder / f"{vdev}.{fmt}"
        make_disk(path, fmt, disk_mib)
        disks[vdev] = (path, fmt)
    serial = folder / "serial.log"
    cfg = folder / "guest.cfg"
    cfg.write_text(guest_config(name, *image, disks, serial, memory=memory, vcpus=vcpus, extra=extra))
    agent.cli("create", str(cfg), check=True)
    g = Guest(agent, name, folder, disks, serial)
    if wait:
        guestprobe.wait_ready(serial, timeout=60)
        for vdev in disks:
            guestprobe.wait_disk_ok(serial, "v" + vdev[2:], timeout=30)
    return g


def destroy_all(agent: Agent, guests: list[Guest]) -> None:
    stub = agent.stub()
    for g in guests:
        try:
            stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=g.name), timeout=60)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise


@pytest.fixture
def boot_guest(agent: Agent, guest_image: tuple[Path, Path], tmp_path: Path) -> Iterator[BootGuest]:
    """Boot a fresh guest with the given disk formats; destroyed afterwards."""
    made: list[Guest] = []

    def boot(*formats: str, memory: int = 128, name: str | None = None, wait: bool = True,
             disk_mib: int = 32, extra: str = "") -> Guest:
        made.append(start_guest(agent, guest_image, tmp_path, *formats, memory=memory, name=name, wait=wait,
                                disk_mib=disk_mib, extra=extra))
        return made[-1]

    yield boot
    destroy_all(agent, made)
