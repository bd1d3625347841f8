"""How the xen driver finds a domain for an operation, and what it asks xl
for it: `xl list -l` once per domain (while libxl's stored config of it
stays the same file), the run state in-process from libxl where it can be
opened (libxl_info), else one `xl list`. A domain destroyed, recreated,
renamed or reconfigured behind the agent's back is asked again. Against
the recorded xl outputs in tests/data/xen-4.17."""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import runner
from domsnap.agent.domain import Domain, RunState
from domsnap.agent.drivers import libxl_info, xen
from domsnap.agent.drivers.libxl_info import DomInfo
from domsnap.agent.drivers.xen import XenDriver
from domsnap.agent.drivers.xen_config import domain_config
from domsnap.agent.drivers.xl_argv import parse_list_long
from domsnap.agent.drivers.xl_argv import run_state as xen_argv_state
from domsnap.agent.errors import NotFound
from tests.unit.xen_fakes import FakeRunner, Reply, recorded, save_stream

X = "xen-4.17/"
UUID3 = parse_list_long(recorded(X + "xl-list-l-3.json"))[0].uuid
OTHER_UUID = "11111111-2222-4333-8444-555555555555"


@pytest.fixture(autouse=True)
def no_list_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request here comes long after the one before (as the lab's do): past LIST_TTL."""
    monkeypatch.setattr(xen, "LIST_TTL", -1.0)


class FakeDomainInfo:
    """libxl's answers: the domains it knows, by domid; every question recorded."""

    def __init__(self, *domains: DomInfo) -> None:
        self.domains = {d.domid: d for d in domains}
        self.asked: list[str] = []
        self.hints: list[int | None] = []

    def find(self, ref: str, hint: int | None = None) -> DomInfo | None:
        self.asked.append(ref)
        self.hints.append(hint)
        if ref.isdigit():
            return self.domains.get(int(ref))
        return next((d for d in self.domains.values() if d.name == ref), None)


def pvguest(flags: str = "-b----", *, domid: int = 3, uuid: str = UUID3, name: str = "pvguest") -> DomInfo:
    return DomInfo(domid, name, uuid, flags, 128, 1, 4.2)


def xen_driver(tmp_path: Path, run: FakeRunner, info: FakeDomainInfo | None = None) -> XenDriver:
    d = XenDriver(tmp_path / "state", run, run_dir=tmp_path / "run", lib_dir=tmp_path / "lib",
                  domain_info=(lambda _version: info) if info is not None else None)
    return d


def store(tmp_path: Path, domid: int = 3, uuid: str = UUID3, text: str = "{}") -> Path:
    """libxl's stored config of a domain, written as libxl writes it: a new file renamed into place."""
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    path = lib / f"userdata-d.{domid}.{uuid}.libxl-json"
    new = lib / f"userdata-n.{domid}.{uuid}.libxl-json"
    new.write_text(text)
    os.rename(new, path)
    return path


def probed(run: FakeRunner) -> None:
    run.expect(["xl", "info"], Reply(recorded(X + "xl-info.txt")))


def expect_table(run: FakeRunner, ref: str, table: str = "xl-list-3.txt") -> None:
    run.expect(["xl", "list", ref], Reply(recorded(X + table)))


def expect_config(run: FakeRunner, domid: int = 3, text: str | None = None) -> None:
    run.expect(["xl", "list", "-l", str(domid)], Reply(text if text is not None else recorded(X + "xl-list-l-3.json")))


async def libxl_driver(tmp_path: Path, info: FakeDomainInfo) -> tuple[FakeRunner, XenDriver]:
    """A driver that found libxl at its probe (the probe's `xl info` answered)."""
    run = FakeRunner([])
    d = xen_driver(tmp_path, run, info)
    probed(run)
    await d.probe()
    return run, d


async def in_request(d: XenDriver, ref: str) -> Domain:
    """A lookup as a new request makes it (its own command tally)."""
    async def one() -> Domain:
        runner.start_tally()
        return await d.lookup(ref)
    return await asyncio.create_task(one())


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# ------------------------------------------------------------ through xl only


def test_a_domains_config_is_asked_once_while_libxls_stored_copy_stays(tmp_path: Path) -> None:
    async def main() -> None:
        store(tmp_path)
        run = FakeRunner([])
        d = xen_driver(tmp_path, run)
        expect_table(run, "pvguest")
        expect_config(run)
        first = await in_request(d, "pvguest")
        # A later request: the run state is asked again, the config is not.
        expect_table(run, "pvguest", "xl-list-3-paused.txt")
        later = await in_request(d, "pvguest")
        assert later.config == first.config and later.state is RunState.PAUSED
        run.finished()
        assert [c[:3] for c in run.calls].count(["xl", "list", "-l"]) == 1

    run_async(main)


@pytest.mark.parametrize("change", ["reconfigured", "recreated with the same domid", "stored config gone"])
def test_a_domain_changed_behind_the_agents_back_is_asked_again(tmp_path: Path, change: str) -> None:
    async def main() -> None:
        path = store(tmp_path)
        run = FakeRunner([])
        d = xen_driver(tmp_path, run)
        expect_table(run, "pvguest")
        expect_config(run)
        await in_request(d, "pvguest")
        if change == "reconfigured":
            # `xl block-attach`, `xl cd-insert`, `xl mem-set`: libxl rewrites its copy.
            store(tmp_path, text='{"changed": 1}')
        elif change == "recreated with the same domid":
            # `xl destroy` removes the copy; `xl create` stores another, under the new UUID.
            path.unlink()
            store(tmp_path, uuid=OTHER_UUID)
        else:
            path.unlink()
        expect_table(run, "pvguest")
        expect_config(run)
        await in_request(d, "pvguest")
        run.finished()

    run_async(main)


def test_a_domain_renamed_behind_the_agents_back_is_asked_again(tmp_path: Path) -> None:
    async def main() -> None:
        store(tmp_path)
        run = FakeRunner([])
        d = xen_driver(tmp_path, run)
        expect_table(run, "pvguest")
        expect_config(run)
        await in_request(d, "pvguest")
        # `xl rename` changes xenstore only: the stored copy stays, the name xl lists does not.
        renamed = recorded(X + "xl-list-3.txt").replace("pvguest", "renamed")
        run.expect(["xl", "list", "3"], Reply(renamed))
        expect_config(run, text=recorded(X + "xl-list-l-3.json").replace('"pvguest"', '"renamed"'))
        dom = await in_request(d, "3")
        assert dom.name == "renamed"
        run.finished()

    run_async(main)


def test_without_a_stored_copy_every_lookup_asks_both(tmp_path: Path) -> None:
    async def main() -> None:
        run = FakeRunner([])
        d = xen_driver(tmp_path, run)
        for _ in range(2):
            expect_table(run, "pvguest")
            expect_config(run)
            await in_request(d, "pvguest")
        run.finished()

    run_async(main)


# ------------------------------------------------------- libxl in-process


def test_with_libxl_an_operation_starts_no_xl_at_all(tmp_path: Path) -> None:
    async def main() -> None:
        store(tmp_path)
        info = FakeDomainInfo(pvguest())
        run, d = await libxl_driver(tmp_path, info)
        expect_config(run)
        first = await in_request(d, "pvguest")
        assert (first.domid, first.state) == (3, RunState.RUNNING)
        # The operator paused it with xl: libxl says so, xl is not started.
        info.domains[3] = pvguest("--p---")
        later = await in_request(d, "pvguest")
        assert later.state is RunState.PAUSED and later.config == first.config
        run.finished()
        # The second time with the domid the name had: libxl need not walk every domain's name.
        assert (info.asked, info.hints) == (["pvguest", "pvguest"], [None, 3])

    run_async(main)


def test_with_libxl_a_domid_reused_by_another_domain_is_asked_again(tmp_path: Path) -> None:
    async def main() -> None:
        store(tmp_path)
        info = FakeDomainInfo(pvguest())
        run, d = await libxl_driver(tmp_path, info)
        expect_config(run)
        await in_request(d, "pvguest")
        # Destroyed and created again by hand, with the same name and domid: another UUID.
        info.domains[3] = pvguest(uuid=OTHER_UUID)
        store(tmp_path, uuid=OTHER_UUID)
        expect_config(run, text=recorded(X + "xl-list-l-3.json").replace(UUID3, OTHER_UUID))
        await in_request(d, "pvguest")
        run.finished()

    run_async(main)


def test_a_domain_libxl_does_not_find_is_asked_of_xl(tmp_path: Path) -> None:
    async def main() -> None:
        run, d = await libxl_driver(tmp_path, FakeDomainInfo())
        run.expect(["xl", "list", "nosuch"], Reply(rc=1, stderr=recorded(X + "xl-notfound-stderr.txt")))
        with pytest.raises(NotFound):
            await in_request(d, "nosuch")
        run.finished()

    run_async(main)


def test_libxl_laid_out_otherwise_than_xl_says_is_not_used_again(tmp_path: Path) -> None:
    async def main() -> None:
        store(tmp_path, uuid=OTHER_UUID)
        info = FakeDomainInfo(pvguest(uuid=OTHER_UUID))
        run, d = await libxl_driver(tmp_path, info)
        # xl list -l names another UUID than libxl_domain_info gave: its layout is not this Xen's,
        # and the run state it gave is asked of xl too.
        expect_config(run)
        expect_table(run, "pvguest", "xl-list-3-paused.txt")
        assert (await in_request(d, "pvguest")).state is RunState.PAUSED
        expect_table(run, "pvguest")
        expect_config(run)
        await in_request(d, "pvguest")
        run.finished()
        assert info.asked == ["pvguest"]

    run_async(main)


def test_dom0_is_not_a_guest_through_libxl_either(tmp_path: Path) -> None:
    async def main() -> None:
        dom0 = DomInfo(0, "Domain-0", OTHER_UUID, "r-----", 2048, 1, 9.0)
        run, d = await libxl_driver(tmp_path, FakeDomainInfo(dom0))
        with pytest.raises(NotFound, match="not a guest"):
            await in_request(d, "Domain-0")
        run.finished()

    run_async(main)


def test_a_lookup_within_a_request_is_not_repeated(tmp_path: Path) -> None:
    async def main() -> None:
        store(tmp_path)
        info = FakeDomainInfo(pvguest())
        run, d = await libxl_driver(tmp_path, info)
        expect_config(run)
        runner.start_tally()
        first = await d.lookup("pvguest")
        assert await d.lookup("pvguest") is first
        run.finished()
        assert info.asked == ["pvguest"]

    run_async(main)


def test_a_restored_domain_is_known_by_the_config_its_image_gave(tmp_path: Path) -> None:
    """A revert's domain is the next operation's: its config is the image's,
    which libxl stored for it, so that operation asks xl nothing either."""
    restored = recorded(X + "captured/xl-v-restore-pv-stderr.txt")
    domid = int(restored.split(", dom ")[1].split(",")[0])
    saved = parse_list_long(recorded(X + "xl-list-l-3.json"))[0]

    async def main() -> None:
        memory = tmp_path / "memory.save"
        memory.write_bytes(save_stream(dict(saved.config)))

        async def libxl_stores_it(_argv: object) -> None:
            store(tmp_path, domid=domid)
        info = FakeDomainInfo(pvguest("-b----", domid=domid))
        run, d = await libxl_driver(tmp_path, info)
        run.expect(["xl", "-v", "restore", "-p", str(memory)], Reply(stderr=restored, action=libxl_stores_it))
        run.expect(["xl", "unpause", str(domid)])
        dom = await d.restore(domain_config(saved), memory, facts={}, paused=False,
                              progress=lambda *_a, **_k: None)
        later = await in_request(d, "pvguest")
        assert (later.domid, later.config, later.state) == (dom.domid, dom.config, RunState.RUNNING)
        run.finished()

    run_async(main)


def test_libxls_library_is_the_one_of_the_hosts_xen() -> None:
    assert libxl_info.library_name("4.17.7") == "libxenlight.so.4.17"
    assert libxl_info.library_name("4.19.1-pre") == "libxenlight.so.4.19"


def test_where_libxl_cannot_be_loaded_xl_is_asked(tmp_path: Path) -> None:
    # This machine has no Xen: the default opener says so and the driver keeps to xl.
    assert libxl_info.open_domain_info("999.1") is None


class FakeLibxl:
    """libxl's C calls as LibxlDomainInfo makes them through ctypes: it fills
    the libxl_dominfo it is handed; every call is recorded."""

    def __init__(self, **domains: dict[str, Any]) -> None:
        self.domains = {int(d["domid"]): {"name": name, **d} for name, d in domains.items()}
        self.calls: list[str] = []
        self.names: list[ctypes.Array[ctypes.c_char]] = []

    def libxl_dominfo_init(self, _info: object) -> None:
        self.calls.append("init")

    def libxl_dominfo_dispose(self, _info: object) -> None:
        self.calls.append("dispose")

    def libxl_name_to_domid(self, _ctx: object, name: bytes, out: Any) -> int:
        self.calls.append("name_to_domid")
        for domid, d in self.domains.items():
            if d["name"] == name.decode():
                out._obj.value = domid
                return 0
        return -6  # ERROR_INVAL

    def libxl_domain_info(self, _ctx: object, info: Any, domid: int) -> int:
        self.calls.append(f"domain_info {domid}")
        d = self.domains.get(domid)
        if d is None:
            return -21  # ERROR_DOMAIN_NOTFOUND
        raw = info._obj
        raw.domid = domid
        raw.uuid[:] = list(bytes.fromhex(UUID3.replace("-", "")))
        for key in ("running", "blocked", "paused", "shutdown", "dying"):
            setattr(raw, key, bool(d.get(key)))
        raw.shutdown_reason = d.get("reason", -1)
        raw.current_memkb, raw.vcpu_online, raw.cpu_time = 131072, 1, 4_200_000_000
        return 0

    def libxl_domid_to_name(self, _ctx: object, domid: int) -> int:
        d = self.domains.get(domid)
        if d is None:
            return 0
        self.names.append(buf := ctypes.create_string_buffer(d["name"].encode()))
        return ctypes.addressof(buf)


class FakeLibc:
    def __init__(self) -> None:
        self.freed: list[int] = []

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)


@pytest.mark.parametrize(("state", "flags", "run_state"), [
    ({"blocked": True}, "-b----", RunState.RUNNING),
    ({"paused": True}, "--p---", RunState.PAUSED),
    ({"shutdown": True, "reason": 2}, "---ss-", RunState.SHUTDOWN),
    ({"shutdown": True, "reason": 3}, "---sc-", RunState.CRASHED),
    ({"dying": True, "reason": 3}, "-----d", RunState.SHUTDOWN),
])
def test_libxls_answer_reads_as_xl_list_prints_it(state: dict[str, Any], flags: str, run_state: RunState) -> None:
    lib, libc = FakeLibxl(pvguest={"domid": 3, **state}), FakeLibc()
    found = libxl_info.LibxlDomainInfo(lib, libc, ctypes.c_void_p(1)).find("pvguest")  # type: ignore[arg-type]
    assert found == DomInfo(3, "pvguest", UUID3, flags, 128, 1, 4.2)
    assert xen_argv_state(found.flags) is run_state
    # The name xenstore gave is freed; the struct is disposed as libxl wants.
    assert libc.freed == [ctypes.addressof(lib.names[0])] and lib.calls[-1] == "dispose"


def test_libxl_is_asked_the_names_domid_of_last_time_first() -> None:
    lib = FakeLibxl(pvguest={"domid": 3, "blocked": True}, other={"domid": 5})
    info = libxl_info.LibxlDomainInfo(lib, FakeLibc(), ctypes.c_void_p(1))  # type: ignore[arg-type]
    assert info.find("pvguest", 3) is not None and "name_to_domid" not in lib.calls
    # Domid 5 is another domain now: the name is looked for among all.
    lib.calls.clear()
    assert info.find("pvguest", 5).domid == 3  # type: ignore[union-attr]
    assert "name_to_domid" in lib.calls
    assert info.find("7") is None and info.find("nosuch") is None
