"""The xl parsers and the xen driver's readings of xl against output captured
on real Xen 4.17.7 in the Xen lab (tests/data/xen-4.17/captured/README.md)."""

from __future__ import annotations

import json

from domsnap.agent.domain import RunState
from domsnap.agent.drivers import xen_live, xl_argv
from domsnap.agent.drivers.xen_block import node_name
from domsnap.agent.drivers.xen_config import domain_config
from tests.unit.xen_fakes import recorded


def captured(name: str) -> str:
    return recorded(f"xen-4.17/captured/{name}")


def test_info_of_stock_debian_xen() -> None:
    info = xl_argv.parse_info(captured("xl-info.txt"))
    assert info["xen_version"] == "4.17.7"
    assert info["virt_caps"].split() == ["pv", "hvm", "hap", "gnttab-v1", "gnttab-v2"]
    assert "shadow" not in info["virt_caps"].split()


def test_list() -> None:
    rows = xl_argv.parse_list(captured("xl-list.txt"))
    assert [(r.name, r.domid) for r in rows] == [("Domain-0", 0), ("cap", 1)]
    assert rows[1].state is RunState.RUNNING


def test_a_domain_left_by_save_p_is_paused_not_suspended() -> None:
    for name in ("xl-list-pv-paused.txt", "xl-list-pv-after-save-p.txt", "xl-list-pv-restored-paused.txt"):
        (row,) = xl_argv.parse_list(captured(name))
        assert row.state is RunState.PAUSED, name
        assert not row.suspended, name


def test_verbose_restore_names_the_domain_it_made() -> None:
    # The lab's restore of `cap` made domain 2, which `xl list` then showed paused.
    assert xl_argv.parse_restored_domid(captured("xl-v-restore-pv-stderr.txt")) == 2
    (row,) = xl_argv.parse_list(captured("xl-list-pv-restored-paused.txt"))
    assert (row.name, row.domid) == ("cap", 2)
    # Without -v libxc's detail lines are not printed: the driver asks xl instead.
    assert xl_argv.parse_restored_domid(captured("xl-restore-pv-stderr.txt")) is None


def test_list_long_has_no_backend_and_qcow2_means_qdisk() -> None:
    for name, kind in (("xl-list-l-pv.json", "pv"), ("xl-list-l-pvh.json", "pvh")):
        text = captured(name)
        assert '"backend"' not in text
        (dom,) = xl_argv.parse_list_long(text)
        assert dom.type == kind
        (disk,) = dom.disks
        assert (disk.vdev, disk.format, disk.backend) == ("xvda", "qcow2", "qdisk")
        # The node qdisk's QEMU really has (qmp-query-named-block-nodes-pv.json).
        assert node_name(disk) == "xvda-qcow2"


def test_qdisk_node_name_as_qemu_reports_it() -> None:
    (answer,) = json.loads(captured("qmp-query-named-block-nodes-pv.json"))
    names = {n["node-name"] for n in answer["return"]}
    assert "xvda-qcow2" in names


def test_pvh_config_keeps_tsc_mode() -> None:
    (dom,) = xl_argv.parse_list_long(captured("xl-list-l-pvh.json"))
    config = domain_config(dom)
    assert config.get_str("tsc_mode") == "native"
    assert config.get_str("type") == "pvh"


def test_list_long_of_all_skips_nothing() -> None:
    doms = xl_argv.parse_list_long(captured("xl-list-l-all.json"))
    assert [(d.domid, d.name) for d in doms] == [(0, "Domain-0"), (1, "cap")]


def test_not_found_messages_are_the_ones_the_driver_looks_for() -> None:
    # XenDriver._table maps these to NOT_FOUND.
    assert "invalid domain identifier" in captured("xl-list-notfound-stderr.txt")
    assert "does not exist" in captured("xl-list-notfound-domid-stderr.txt")


def test_save_progress_pv() -> None:
    lines = captured("xl-save-pv-stderr.txt").splitlines()
    steps = [p for line in lines if (p := xl_argv.parse_save_progress(line)) is not None]
    assert steps == [(2048 * k, 32768) for k in range(1, 17)]


def test_save_progress_pvh_counts_the_p2m() -> None:
    lines = captured("xl-save-pvh-stderr.txt").splitlines()
    steps = [p for line in lines if (p := xl_argv.parse_save_progress(line)) is not None]
    assert steps and all(total == 1044480 for _done, total in steps)
    assert [d for d, _t in steps] == sorted(d for d, _t in steps)


def test_a_live_save_into_the_sink_ends_resuming_at_sender() -> None:
    assert xen_live.RESUMED in captured("xl-migrate-live-pvh-stderr.txt")
