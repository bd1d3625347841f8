"""A real agent over a catalogue bigger than one page, whose index file is
corrupt when it starts: it rebuilds the index from the manifests, answers
ListSnapshots page by page (AIP-158), and the CLI pages through. No guest
needed: the snapshots are real directories with real manifests."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from domsnap.agent import manifest
from domsnap.agent.catalogue_index import FILE
from domsnap.agent.manifest import Manifest
from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import Agent

COUNT = 2500


def fill(agent: Agent, domain: str, count: int) -> list[str]:
    pointers = agent.state_dir / "catalogue" / domain
    pointers.mkdir(parents=True)
    names = []
    for i in range(count):
        name = f"s{i:05d}"
        d = agent.snapshot_root / domain / name
        d.mkdir(parents=True)
        (d / manifest.MANIFEST).write_text(Manifest(
            name=name, domain=domain, description="", created_at=1e9 + i, finished_at=1e9 + i,
            state="running", live=False, domain_config=f'name = "{domain}"\n',
            disks=(DiskRecord("xvda", "qcow2", "qcow2", Method.INTERNAL, "/img/x.qcow2", tag=name),),
            memory_file=str(d / manifest.MEMORY), memory_bytes=0, driver="qemu", hypervisor_version="QEMU 7.2.22",
        ).to_json())
        (pointers / name).write_text(f"{d}\n")
        names.append(name)
    return names


def test_a_corrupt_index_is_rebuilt_and_listings_page(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    names = fill(agent, "big", COUNT)
    fill(agent, "small", 3)
    (agent.state_dir / FILE).write_bytes(b"not a database at all" * 64)
    agent.start()
    try:
        stub = agent.stub()
        pages, token = [], ""
        while True:
            resp = stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name="big", page_size=1000, page_token=token),
                                      timeout=30)
            pages.append([s.name for s in resp.snapshots])
            if not (token := resp.next_page_token):
                break
        assert [len(p) for p in pages] == [1000, 1000, 500]
        assert [n for p in pages for n in p] == names
        every = stub.ListSnapshots(pb.ListSnapshotsRequest(page_size=5000), timeout=30)
        assert len(every.snapshots) == 1000 and every.next_page_token, "page_size over the cap is not 1000"
        with pytest.raises(grpc.RpcError) as err:
            # A token of the all-domains listing, offered to one domain's.
            stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name="small", page_token=every.next_page_token),
                               timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.ListSnapshots(pb.ListSnapshotsRequest(page_size=-1), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        out = agent.cli("snapshot-list", "big", check=True).stdout.splitlines()
        assert len(out) == COUNT + 1 and out[-1].split()[1] == names[-1]
        assert "unusable" in agent.log.read_text()
    finally:
        agent.stop()
