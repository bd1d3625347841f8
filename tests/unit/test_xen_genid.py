"""VM generation IDs across a revert on Xen, and the FIFO that feeds `xl
restore` an image under a new header (agent/drivers/xen_feed.py).

No HVM guest runs in the Xen lab (an HVM domU needs hvmloader and a device
model inside TCG-emulated SVM), so the HVM configs here are the recorded PV
config with the `type.hvm` part libxl's IDL gives it: `ms_vm_genid` is
written by libxl_ms_vm_genid_gen_json as 16 integers. The FIFO itself is
proved on real Xen by the lab (selftest capture-pv restores through it).
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent.domain import RunState
from domsnap.agent.drivers import xen_feed, xen_stream
from domsnap.agent.drivers.xen_config import domain_config, vm_genid, with_fresh_genid
from domsnap.agent.drivers.xl_argv import XlDomain, parse_list_long
from domsnap.agent.progress import ignore_progress
from tests.unit.test_xen_driver import RESTORED, RESTORED_DOMID, X, driver, pvguest_config, run_async
from tests.unit.xen_fakes import CONFIG, FakeRunner, Reply, recorded, save_stream

GENID = list(range(1, 17))


def hvm(config: dict[str, Any], genid: list[int] | None = GENID) -> dict[str, Any]:
    out = copy.deepcopy(config)
    out.setdefault("c_info", {})["type"] = "hvm"
    out.setdefault("b_info", {})["type.hvm"] = {"ms_vm_genid": genid} if genid is not None else {}
    return out


def test_genid_read_only_from_hvm_configs_that_set_one() -> None:
    assert vm_genid(hvm(CONFIG)) == bytes(GENID)
    assert vm_genid(CONFIG) is None
    assert vm_genid(hvm(CONFIG, None)) is None
    assert vm_genid(hvm(CONFIG, [0] * 16)) is None  # libxl's "none"
    assert vm_genid(hvm(CONFIG, [1, 2])) is None


def test_fresh_genid_is_new_and_leaves_the_rest() -> None:
    config = hvm(CONFIG)
    fresh = with_fresh_genid(config)
    assert fresh is not None
    assert vm_genid(fresh) not in (None, bytes(GENID))
    assert config["b_info"]["type.hvm"]["ms_vm_genid"] == GENID  # the original untouched
    fresh["b_info"]["type.hvm"]["ms_vm_genid"] = GENID
    assert fresh == config
    assert with_fresh_genid(CONFIG) is None


def test_xl_cfg_of_a_genid_domain_asks_xl_to_generate() -> None:
    dom = parse_list_long(recorded(X + "xl-list-l-3.json"))[0]
    assert "ms_vm_genid" not in domain_config(dom).to_text()
    with_id = XlDomain(**{**dom.__dict__, "config": hvm(dict(dom.config))})
    assert 'ms_vm_genid = "generate"' in domain_config(with_id).to_text()


def test_header_rewrite_keeps_the_stream(tmp_path: Path) -> None:
    image = tmp_path / "memory.save"
    image.write_bytes(save_stream(hvm(CONFIG)))
    header = xen_stream.read_header(image)
    assert header.config() == hvm(CONFIG)
    raw = image.read_bytes()
    fresh = with_fresh_genid(header.config())
    assert fresh is not None
    rewritten = tmp_path / "rewritten.save"
    rewritten.write_bytes(header.with_config(fresh) + raw[header.stream_offset:])
    again = xen_stream.read_header(rewritten)
    assert again.config() == fresh
    assert (again.mandatory, again.optional_flags, again.trailer) == (header.mandatory, header.optional_flags,
                                                                      header.trailer)
    assert rewritten.read_bytes()[again.stream_offset:] == raw[header.stream_offset:]
    # The whole rewritten image still parses as a complete save stream.
    parser = xen_stream.StreamParser()
    parser.feed(rewritten.read_bytes())
    assert parser.done


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_fifo_yields_header_then_the_stream(tmp_path: Path) -> None:
    image = tmp_path / "memory.save"
    image.write_bytes(os.urandom(3 * xen_feed.CHUNK + 12345))

    async def main() -> None:
        async with xen_feed.fifo_source(image, b"HEADER", 1000, tmp_path / "w") as fifo:
            assert fifo.stat().st_mode & 0o777 == 0o600
            got = await asyncio.to_thread(read_all, fifo)
        assert got == b"HEADER" + image.read_bytes()[1000:]
        assert not fifo.exists()

    run_async(main)


def test_fifo_never_opened_ends_at_once(tmp_path: Path) -> None:
    """xl failing before it opens its input must not hang the agent."""
    image = tmp_path / "memory.save"
    image.write_bytes(b"x" * 100)

    async def main() -> None:
        t = time.monotonic()
        async with xen_feed.fifo_source(image, b"H", 0, tmp_path) as fifo:
            pass
        assert time.monotonic() - t < 2
        assert not fifo.exists()

    run_async(main)


def test_fifo_reader_stopping_early_is_not_an_error(tmp_path: Path) -> None:
    image = tmp_path / "memory.save"
    image.write_bytes(os.urandom(4 * xen_feed.CHUNK))

    def read_some(path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read(10)

    async def main() -> None:
        async with xen_feed.fifo_source(image, b"H", 0, tmp_path) as fifo:
            assert await asyncio.to_thread(read_some, fifo) == b"H" + image.read_bytes()[:9]

    run_async(main)
    assert threading.active_count() < 50


def test_fifo_reports_a_missing_image(tmp_path: Path) -> None:
    async def main() -> None:
        async with xen_feed.fifo_source(tmp_path / "gone.save", b"H", 0, tmp_path) as fifo:
            await asyncio.to_thread(read_all, fifo)

    with pytest.raises(FileNotFoundError):
        run_async(main)


def test_revert_of_a_genid_domain_restores_it_with_a_new_id(tmp_path: Path) -> None:
    saved = hvm(dict(parse_list_long(recorded(X + "xl-list-l-3.json"))[0].config))
    memory = tmp_path / "memory.save"
    memory.write_bytes(save_stream(saved))
    original = memory.read_bytes()
    seen: dict[str, Any] = {}

    async def xl_restore(argv: Any) -> None:
        # What xl does with its input: open it, read the header, then the stream.
        data = await asyncio.to_thread(read_all, Path(argv[-1]))
        copy_of = tmp_path / "as-xl-read-it.save"
        copy_of.write_bytes(data)
        header = xen_stream.read_header(copy_of)
        seen["config"] = header.config()
        seen["stream"] = data[header.stream_offset:]

    async def main() -> None:
        run = FakeRunner([]).expect(
            ["xl", "-v", "restore", "-p", lambda p: p.endswith(".fifo") and p != str(memory)],
            Reply(stderr=RESTORED, action=xl_restore))
        run.expect(["xl", "unpause", str(RESTORED_DOMID)])
        d = driver(tmp_path, run)
        dom = await d.restore(pvguest_config(), memory, facts={}, paused=False, progress=ignore_progress)
        assert dom.state is RunState.RUNNING
        run.finished()

    run_async(main)
    assert vm_genid(seen["config"]) not in (None, bytes(GENID))
    seen["config"]["b_info"]["type.hvm"]["ms_vm_genid"] = GENID
    assert seen["config"] == saved
    assert seen["stream"] == original[xen_stream.read_header(memory).stream_offset:]
    assert memory.read_bytes() == original  # the snapshot's image is never changed
    assert not list((tmp_path / "state" / "xen").glob("*.fifo"))
