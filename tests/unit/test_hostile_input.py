"""The small parts that keep hostile input harmless, in-process: the manifest
reader, the manifest's checks, the ledger, request ids, the connection limit
and the directory-ownership rule of `confine`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from domsnap.agent import dirfd, manifest
from domsnap.agent.conn_limit import ConnectionLimit
from domsnap.agent.errors import FailedPrecondition, InvalidArgument
from domsnap.agent.fsutil import NotRegularFile, read_regular
from domsnap.agent.ledger import Ledger
from domsnap.agent.manifest import Manifest
from domsnap.agent.op_history import History
from domsnap.agent.operations import Operation, OpKind, OpState
from domsnap.agent.paths import confine
from domsnap.agent.request_ids import RequestIds
from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.v1 import domsnap_pb2 as pb


def a_manifest(snapdir: Path, **changes: object) -> Manifest:
    fields: dict[str, object] = dict(
        name="s1", domain="web", description="", created_at=1.0, finished_at=2.0, state="running", live=False,
        domain_config='name = "web"\n', disks=(DiskRecord("xvda", "qcow2", "qcow2", Method.INTERNAL,
                                                          "/images/web.qcow2", "s1"),),
        memory_file=str(snapdir / "memory.save"), memory_bytes=10, driver="qemu", hypervisor_version="QEMU 7.2",
        facts={"machine": "pc-i440fx-7.2"})
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------- read_regular ----

def test_read_regular_reads_a_small_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert read_regular(tmp_path / "f", 3) == b"abc"


def test_read_regular_refuses_fifo_link_device_and_size_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "big").write_bytes(b"x" * 11)
    for name, why in (("fifo", "not a regular file"), ("zero", "is a symlink"), ("big", "larger than 10 bytes")):
        with pytest.raises(NotRegularFile, match=why):
            read_regular(tmp_path / name, 10)
    with pytest.raises(NotRegularFile, match="not a regular file"):
        read_regular(Path("/dev/zero"), 10)


# -------------------------------------------------------------- manifest ----

def test_a_manifest_round_trips(tmp_path: Path) -> None:
    m = a_manifest(tmp_path)
    manifest.write(tmp_path, m)
    assert manifest.read(tmp_path) == m
    assert oct((tmp_path / manifest.MANIFEST).stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(("change", "why"), [
    ({"name": "../x"}, "invalid snapshot name"),
    ({"domain": 7}, "domain: int, not str"),
    ({"live": "yes"}, "live: str, not bool"),
    ({"memory_bytes": True}, "memory_bytes: bool, not int"),
    ({"facts": {"machine": 1}}, "facts: not a map of strings"),
    ({"memory_file": "relative/memory.save"}, "not an absolute, normalized path"),
    ({"memory_file": "/a/../etc/shadow"}, "not an absolute, normalized path"),
    ({"disks": "all"}, "disks: not a list"),
    ({"disks": [{"vdev": "xvda", "image": ["x"]}]}, "each entry must be a map of strings"),
    ({"parent": "a b"}, "invalid snapshot name"),
    ({"disks": [{"vdev": "xvda;x", "format": "qcow2", "backend": "qcow2", "method": "internal", "image": "/i"}]},
     "not a virtual device name"),
    ({"disks": [{"vdev": "xvda", "format": "qcow2", "backend": "qcow2", "method": "internal", "image": "/i",
                 "tag": "-d"}]}, "is not one the agent makes"),
    # Found by test_hostile's fuzzing: past year 9999 the listing failed with INTERNAL.
    ({"created_at": 253402300800}, "not a time of years 1 to 9999"),
    ({"finished_at": -1e300}, "not a time of years 1 to 9999"),
])
def test_a_manifest_of_the_wrong_shape_is_refused(tmp_path: Path, change: dict[str, object], why: str) -> None:
    data = json.loads(a_manifest(tmp_path).to_json())
    data.update(change)
    with pytest.raises(FailedPrecondition, match="not a valid snapshot manifest") as info:
        Manifest.from_json(json.dumps(data), "x")
    assert why in info.value.message


# ---------------------------------------------------------------- ledger ----

def test_the_ledger_allows_only_files_inside_the_folder_or_recorded(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state")
    snapdir = tmp_path / "snaps" / "s1"
    m = a_manifest(snapdir)
    with pytest.raises(FailedPrecondition, match=r"names /images/web\.qcow2, outside the snapshot.s folder"):
        ledger.check(snapdir, m, "delete")
    ledger.record("web", "s1", snapdir, [m.memory_file, "/images/web.qcow2"])
    ledger.check(snapdir, m, "delete")
    # The same name in another folder is another snapshot: nothing recorded for it.
    elsewhere = tmp_path / "planted"
    with pytest.raises(FailedPrecondition, match=r"/images/web\.qcow2"):
        ledger.check(elsewhere, a_manifest(elsewhere), "delete")
    # A merge repointed it at the image below: the agent extends what it recorded.
    below = replace(m, disks=(replace(m.disks[0], image="/images/base.qcow2"),))
    with pytest.raises(FailedPrecondition, match=r"/images/base\.qcow2"):
        ledger.check(snapdir, below, "delete")
    ledger.extend("web", "s1", snapdir, ["/images/base.qcow2"])
    ledger.check(snapdir, below, "delete")
    ledger.forget("web", "s1")
    with pytest.raises(FailedPrecondition):
        ledger.check(snapdir, m, "delete")


# ----------------------------------------------------------- request ids ----

def test_a_request_id_means_one_request() -> None:
    async def main() -> None:
        ids = RequestIds()
        calls: list[str] = []

        async def pause(name: str) -> str:
            calls.append(name)
            await asyncio.sleep(0.01)
            return f"paused {name}"

        first = pb.PauseDomainRequest(domain_name="a", request_id="r1")
        # A retry while the first still runs waits for its answer.
        both = await asyncio.gather(ids.once("uid=0", "PauseDomain", first, lambda: pause("a")),
                                    ids.once("uid=0", "PauseDomain", first, lambda: pause("a")))
        assert list(both) == ["paused a", "paused a"] and calls == ["a"]
        with pytest.raises(InvalidArgument,
                           match=r"already used for a different request, PauseDomain\(domain_name='a'\)") as err:
            await ids.once("uid=0", "PauseDomain", pb.PauseDomainRequest(domain_name="b", request_id="r1"),
                           lambda: pause("b"))
        assert (err.value.reason, err.value.metadata) == ("REQUEST_ID_REUSED", {"request_id": "r1"})
        # Another RPC, another caller: other requests.
        await ids.once("uid=0", "UnpauseDomain", pb.UnpauseDomainRequest(domain_name="a", request_id="r1"),
                       lambda: pause("u"))
        await ids.once("CN=ops", "PauseDomain", first, lambda: pause("other caller"))
        assert calls == ["a", "u", "other caller"]

        async def fail() -> str:
            raise FailedPrecondition("no")

        with pytest.raises(FailedPrecondition):
            await ids.once("uid=0", "PauseDomain", pb.PauseDomainRequest(domain_name="c", request_id="r2"), fail)
        # A failure is forgotten: the retry runs.
        assert await ids.once("uid=0", "PauseDomain", pb.PauseDomainRequest(domain_name="c", request_id="r2"),
                              lambda: pause("c")) == "paused c"

    asyncio.run(main())


def test_a_unary_answer_is_kept_on_disk(tmp_path: Path) -> None:
    """A domain call's answer outlives the agent (a new RequestIds on the same state directory); a failed
    one is not kept."""
    request = pb.PauseDomainRequest(domain_name="a", request_id="r1")
    calls: list[str] = []

    async def pause(name: str) -> pb.Domain:
        calls.append(name)
        return pb.Domain(name=name, state=pb.DOMAIN_STATE_PAUSED)

    async def fail() -> pb.Domain:
        raise FailedPrecondition("no")

    def once(request: pb.PauseDomainRequest, call: Callable[[], Awaitable[pb.Domain]]) -> pb.Domain:
        return asyncio.run(RequestIds(tmp_path, keep=3600).once_answer("uid=0", "PauseDomain", request, call,
                                                                         pb.Domain.FromString))

    assert once(request, lambda: pause("a")) == once(request, lambda: pause("again")) == pb.Domain(
        name="a", state=pb.DOMAIN_STATE_PAUSED)
    assert calls == ["a"]
    with pytest.raises(InvalidArgument, match=r"PauseDomain\(domain_name='a'\)"):
        once(pb.PauseDomainRequest(domain_name="b", request_id="r1"), lambda: pause("b"))
    failed = pb.PauseDomainRequest(domain_name="c", request_id="r2")
    with pytest.raises(FailedPrecondition):
        once(failed, fail)
    assert once(failed, lambda: pause("c")).name == "c" and calls == ["a", "c"]


# ------------------------------------------------------ connection limit ----

def test_connections_are_limited_per_user_and_in_all_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    limit = ConnectionLimit(per_user=2, fd_limit=256 + 3 * 5)
    assert limit.total == 5
    with caplog.at_level(logging.WARNING):
        assert [limit.admit(1000) for _ in range(4)] == [True, True, False, False]
        assert [limit.admit(0) for _ in range(4)] == [True, True, True, False]
        for _ in range(100):
            limit.admit(1000)
    # 103 refusals, one line: the next waits a minute.
    assert [r.getMessage()[:40] for r in caplog.records] == ["unix socket: 1 connection(s) refused sin"]
    limit.release(1000)
    assert limit.admit(1001)


# ------------------------------------------------------------ confine ----

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a directory to another user")
def test_confine_refuses_a_directory_another_user_owns_or_another_group_may_write(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "alice").mkdir(parents=True)
    os.chown(root / "alice", 65534, 65534)
    with pytest.raises(InvalidArgument, match="alice is owned by uid 65534"):
        confine(str(root / "alice" / "snap"), [root])
    (root / "team").mkdir(mode=0o775)
    os.chmod(root / "team", 0o775)
    os.chown(root / "team", 0, 65534)
    with pytest.raises(InvalidArgument, match="team is writable by group 65534"):
        confine(str(root / "team" / "snap"), [root])
    assert confine(str(root / "snap"), [root]) == root / "snap"


# ------------------------------------------------------------- history ----

def test_finished_operations_are_kept_for_a_while_and_read_back(tmp_path: Path) -> None:
    history = History(tmp_path, keep=100.0)
    done = Operation("a1", OpKind.CREATE, "web", "s1", "r1", state=OpState.SUCCEEDED, finished_at=time.time())
    failed = Operation("a2", OpKind.REVERT, "web", "s1", "", state=OpState.FAILED, finished_at=time.time(),
                       error=FailedPrecondition("no"))
    old = Operation("a3", OpKind.DELETE, "web", "s0", "", state=OpState.SUCCEEDED, finished_at=time.time() - 200)
    for op in (done, failed, old):
        history.record(op)
    (tmp_path / "operations" / "junk.json").write_text("{")
    loaded = {op.id: op for op in history.load()}
    assert sorted(loaded) == ["a1", "a2"]
    assert (loaded["a1"].kind, loaded["a1"].state, loaded["a1"].request_id) == (OpKind.CREATE, OpState.SUCCEEDED, "r1")
    assert isinstance(loaded["a2"].error, FailedPrecondition) and loaded["a2"].error.message == "no"
    assert sorted(p.name for p in (tmp_path / "operations").iterdir()) == ["a1.json", "a2.json"]


# ---------------------------------------------------------------- dirfd ----

def test_a_snapshot_folder_swapped_for_a_symlink_loses_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "snapshot.json").write_text("theirs")
    (outside / "memory.save").write_text("theirs")
    folder = tmp_path / "snap"
    folder.symlink_to(outside)
    dirfd.unlink(folder / "snapshot.json", folder)
    dirfd.remove_files(folder, lambda _p: False)
    assert sorted(p.name for p in outside.iterdir()) == ["memory.save", "snapshot.json"]


def test_remove_files_keeps_what_is_used_and_any_directory(tmp_path: Path) -> None:
    folder = tmp_path / "snap"
    (folder / "sub").mkdir(parents=True)
    for name in ("memory.save", "xvda.qcow2", "snapshot.json"):
        (folder / name).write_text("x")
    dirfd.unlink(folder / "snapshot.json", folder)
    dirfd.remove_files(folder, lambda p: p.name == "xvda.qcow2")
    assert sorted(p.name for p in folder.iterdir()) == ["sub", "xvda.qcow2"]
    (folder / "sub").rmdir()
    dirfd.remove_files(folder, lambda _p: False)
    assert not folder.exists()
