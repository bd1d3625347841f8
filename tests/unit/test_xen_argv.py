"""xl command lines, exactly, and the parsers against recorded Xen 4.17 output."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from domsnap.agent.domain import RunState
from domsnap.agent.drivers import xl_argv
from domsnap.agent.drivers.xl_argv import XlDisk, XlNic
from domsnap.agent.errors import InvalidArgument
from tests.unit.xen_fakes import recorded

MEM = "/srv/domsnap/snapshots/pvguest/s1/memory.save"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (xl_argv.info(), ["xl", "info"]),
        (xl_argv.list_(), ["xl", "list"]),
        (xl_argv.list_("pvguest"), ["xl", "list", "pvguest"]),
        (xl_argv.list_long(), ["xl", "list", "-l"]),
        (xl_argv.list_long(3), ["xl", "list", "-l", "3"]),
        (xl_argv.save(3, MEM), ["xl", "save", "-p", "3", MEM]),
        (xl_argv.save("pvguest", Path(MEM), paused=False), ["xl", "save", "-c", "pvguest", MEM]),
        (xl_argv.restore(MEM, paused=True), ["xl", "-v", "restore", "-p", MEM]),
        (xl_argv.restore(MEM, paused=False, config_path="/var/lib/domsnap/xen/pvguest.cfg"),
         ["xl", "-v", "restore", "/var/lib/domsnap/xen/pvguest.cfg", MEM]),
        (xl_argv.create("/etc/xen/a.cfg", paused=True), ["xl", "create", "-p", "/etc/xen/a.cfg"]),
        (xl_argv.create("/etc/xen/a.cfg", paused=False), ["xl", "create", "/etc/xen/a.cfg"]),
        (xl_argv.pause(3), ["xl", "pause", "3"]),
        (xl_argv.unpause("pvguest"), ["xl", "unpause", "pvguest"]),
        (xl_argv.destroy(0), ["xl", "destroy", "0"]),
        (xl_argv.info(xl="/usr/sbin/xl"), ["/usr/sbin/xl", "info"]),
    ],
)
def test_argv(argv: list[str], expected: list[str]) -> None:
    assert argv == expected


def test_save_never_uses_the_form_that_destroys_the_domain() -> None:
    for paused in (True, False):
        assert xl_argv.save(3, MEM, paused=paused)[2] in ("-p", "-c")


@pytest.mark.parametrize("ref", ["-h", "--help", "two words", "", "a/b", -1])
def test_domain_refs_that_xl_could_misread_are_refused(ref: str | int) -> None:
    with pytest.raises(InvalidArgument):
        xl_argv.pause(ref)


@pytest.mark.parametrize("path", ["memory.save", "-p", "/a\nb", "/a\0b"])
def test_paths_must_be_absolute_and_plain(path: str) -> None:
    with pytest.raises(InvalidArgument):
        xl_argv.save(3, path)


SINK = ["/usr/bin/python3", "-m", "domsnap.agent.drivers.xen_sink", MEM, "/tmp/domsnap-xen-ab12/control.sock"]


def test_migrate_to_sink_argv() -> None:
    argv = xl_argv.migrate_to_sink(3, SINK)
    assert argv[:5] == ["xl", "migrate", "-s", "", "3"]
    assert len(argv) == 6
    assert argv[5] == ("exec /usr/bin/python3 -m domsnap.agent.drivers.xen_sink "
                       "/srv/domsnap/snapshots/pvguest/s1/memory.save /tmp/domsnap-xen-ab12/control.sock")


def test_the_rune_reaches_the_sink_word_for_word_through_sh() -> None:
    # xl runs the rune with `sh -c` (xl_migrate.c create_migration_child); run
    # it the same way with printf standing in for the sink.
    words = ["/usr/bin/printf", "%s%%", "/srv/a=b,c@d+f:g.h_i-j", "/tmp/x/control.sock"]
    rune = xl_argv.migrate_to_sink(3, words)[5]
    out = subprocess.run(["sh", "-c", rune], capture_output=True, text=True, check=True).stdout
    assert out.split("%")[:-1] == words[2:]


@pytest.mark.parametrize(
    "word",
    ["/srv/a b", "/srv/$(reboot)", "/srv/`reboot`", "/srv/a;reboot", "/srv/a'b", '/srv/a"b', "/srv/a\nb",
     "/srv/*", "/srv/a|b", "/srv/a>b", "/srv/a&b", "/srv/~root", "/srv/a\\b", ""],
)
def test_no_word_a_shell_could_interpret_reaches_the_rune(word: str) -> None:
    with pytest.raises(InvalidArgument):
        xl_argv.migrate_to_sink(3, [*SINK[:3], word, SINK[4]])


def test_even_a_word_that_passed_would_be_quoted() -> None:
    rune = xl_argv.migrate_to_sink(3, SINK)[5]
    assert shlex.split(rune) == ["exec", *SINK]


def test_an_empty_sink_command_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        xl_argv.migrate_to_sink(3, [])


# ------------------------------------------------------------------ xl list


def test_parse_list() -> None:
    rows = xl_argv.parse_list(recorded("xen-4.17/xl-list.txt"))
    assert [(r.name, r.domid, r.memory_mib, r.vcpus, r.state, r.cpu_seconds) for r in rows] == [
        ("Domain-0", 0, 2048, 2, RunState.RUNNING, 61.3),
        ("pvguest", 3, 128, 1, RunState.RUNNING, 4.2),  # '-b----': blocked on an event, still running
        ("pvhguest", 4, 128, 2, RunState.PAUSED, 9.8),
    ]


def test_parse_list_states_and_long_names() -> None:
    rows = xl_argv.parse_list(recorded("xen-4.17/xl-list-states.txt"))
    assert [(r.name, r.domid, r.state) for r in rows] == [
        ("Domain-0", 0, RunState.RUNNING),
        ("crashed", 5, RunState.CRASHED),
        ("poweredoff", 6, RunState.SHUTDOWN),
        ("a-domain-name-longer-than-the-forty-column-field", 8, RunState.RUNNING),
    ]
    assert rows[3].memory_mib == 256 and rows[3].vcpus == 4 and rows[3].cpu_seconds == 12.5


def test_parse_list_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(ValueError, match="unexpected row"):
        xl_argv.parse_list("Name ID Mem\nlibxl: error: something\n")


# -------------------------------------------------------------- xl list -l

PVGUEST_DISKS = (
    XlDisk("xvda", "/srv/domsnap/images/pvguest.qcow2", "qcow2", "qdisk", readwrite=True, cdrom=False),
    XlDisk("xvdb", "/dev/vg0/pvguest-data", "raw", "phy", readwrite=True, cdrom=False),
    XlDisk("xvdc", "", "empty", "qdisk", readwrite=False, cdrom=True),
)


def test_parse_list_long_xen_4_17() -> None:
    doms = xl_argv.parse_list_long(recorded("xen-4.17/xl-list-l.json"))
    assert [(d.domid, d.name, d.type) for d in doms] == [(0, "Domain-0", "pv"), (3, "pvguest", "pv"),
                                                         (4, "pvhguest", "pvh")]
    pv = doms[1]
    assert (pv.memory_mib, pv.max_memory_mib, pv.vcpus, pv.max_vcpus) == (128, 128, 1, 1)
    assert pv.uuid == "5bb1c9b2-6a4e-4f0e-9b0c-2f1d3c4e5a61"
    assert pv.disks == PVGUEST_DISKS
    assert pv.nics == (XlNic("00:16:3e:5a:01:02", "xenbr0", "", "/etc/xen/scripts/vif-bridge", "", "", "vif"),)
    assert pv.config["b_info"]["kernel"] == "/srv/domsnap/guest/vmlinuz"
    pvh = doms[2]
    assert (pvh.memory_mib, pvh.max_memory_mib, pvh.vcpus, pvh.max_vcpus) == (128, 256, 2, 2)
    assert pvh.disks == (XlDisk("xvda", "/srv/domsnap/images/pvhguest.img", "raw", "qdisk", True, False),)


def test_parse_list_long_before_xen_4_2() -> None:
    doms = xl_argv.parse_list_long(recorded("xen-4.17/xl-list-l-concatenated.json"))
    assert [(d.domid, d.name) for d in doms] == [(0, "Domain-0"), (3, "pvguest")]
    # No c_info.type: the build info's "type.pv" says it; 4.1's disk key names.
    assert doms[1].type == "pv"
    assert doms[1].disks == PVGUEST_DISKS[:1]


def test_parse_list_long_of_one_domain() -> None:
    (dom,) = xl_argv.parse_list_long(recorded("xen-4.17/xl-list-l-3.json"))
    assert dom.domid == 3 and dom.disks == PVGUEST_DISKS


def test_parse_list_long_refuses_other_json() -> None:
    with pytest.raises(ValueError, match="domid"):
        xl_argv.parse_list_long('[{"name": "x"}]')


# ------------------------------------------------------------------ xl info


def test_parse_info() -> None:
    info = xl_argv.parse_info(recorded("xen-4.17/xl-info.txt"))
    assert info["xen_version"] == "4.17.7"
    assert info["virt_caps"].split() == ["pv", "hvm", "hap", "gnttab-v1"]
    assert info["xen_pagesize"] == "4096"
    assert info["xen_changeset"] == ""
    # Values keep their own colons.
    assert info["hw_caps"].count(":") == 7
    assert info["xen_commandline"].startswith("com1=115200,8n1")
    assert "shadow" in xl_argv.parse_info(recorded("xen-4.17/xl-info-shadow.txt"))["virt_caps"].split()


# ------------------------------------------------------------ save progress


def test_progress_of_a_recorded_xl_save() -> None:
    lines = recorded("xen-4.17/xl-save-stderr.txt").splitlines()
    steps = [p for line in lines if (p := xl_argv.parse_save_progress(line)) is not None]
    assert steps == [(2048 * k, 32768) for k in range(1, 17)]
    # The other lines ("Saving to", "xc: info", "End of stream: 0/0") are no progress.
    assert len(lines) - len(steps) == 3


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("xc: progress: Frames: 2048/32768    6%", (2048, 32768)),
        ("xc: detail: Frames: 1024/32768    3%", (1024, 32768)),
        ("xc: progress: Frames iteration 2: 150/32768    0%", (150, 32768)),
        ("xc: progress: Frames verify: 32768/32768  100%", (32768, 32768)),
        ("xc: progress: Checkpointed save: 10/20   50%", (10, 20)),
        # On a terminal: no level, carriage returns between updates.
        ("\rxc: Frames: 4096/32768   12%\rxc: Frames: 6144/32768   18%", (6144, 32768)),
        # `xl -T`: date and pid first.
        ("2026-11-26 03:01:02 UTC [2871] xc: progress: Frames: 8192/32768   25%", (8192, 32768)),
        ("xc: progress: End of stream: 0/0    0%", None),
        ("xc: info: Saving domain 3, type x86 PV", None),
        ("Saving to /x new xl format (info 0x3/0x0/2233)", None),
        ("libxl: error: Frames: 1/2 50%", None),
    ],
)
def test_parse_save_progress(line: str, expected: tuple[int, int] | None) -> None:
    assert xl_argv.parse_save_progress(line) == expected
