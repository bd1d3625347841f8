"""Every `xl` command line the agent runs, and the parsers of what xl prints.

Shapes follow the Xen 4.17 sources: tools/xl/xl_info.c (`xl list`, `xl list -l`,
`xl info`), xl_saverestore.c, xl_migrate.c, and the xentoollog stdio logger
(tools/libs/toollog/xtl_logger_stdio.c) for the progress lines of `xl save`.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..domain import RunState
from ..errors import InvalidArgument
from ..names import check_domain_name

XL: Final = "xl"
# What a word of the migration rune may contain (see migrate_to_sink).
_RUNE_WORD: Final = re.compile(r"[A-Za-z0-9_./+=:,@%-]+")


def _dom(ref: str | int) -> str:
    """A <Domain> as xl takes it: a domid, or a name that cannot pass for an option."""
    if isinstance(ref, int):
        if ref < 0:
            raise InvalidArgument(f"invalid domid {ref}")
        return str(ref)
    return ref if ref.isdigit() else check_domain_name(ref)


def _path(path: Path | str) -> str:
    text = str(path)
    if not text.startswith("/") or "\0" in text or "\n" in text:
        raise InvalidArgument(f"{text!r}: xl is given absolute paths only")
    return text


# ------------------------------------------------------------------- argv


def list_(dom: str | int | None = None, *, xl: str = XL) -> list[str]:
    return [xl, "list"] + ([] if dom is None else [_dom(dom)])


def list_long(dom: str | int | None = None, *, xl: str = XL) -> list[str]:
    return [xl, "list", "-l"] + ([] if dom is None else [_dom(dom)])


def info(*, xl: str = XL) -> list[str]:
    return [xl, "info"]


def save(dom: str | int, path: Path | str, *, paused: bool = True, xl: str = XL) -> list[str]:
    """`xl save -p` (left paused) or `-c` (left running); never the plain form,
    which destroys the domain once it is saved."""
    return [xl, "save", "-p" if paused else "-c", _dom(dom), _path(path)]


def restore(path: Path | str, *, paused: bool, config_path: Path | str | None = None, xl: str = XL) -> list[str]:
    """Without a config file xl uses the (complete) libxl config saved in the image.
    `-v`: libxc then names the new domain's id (parse_restored_domid)."""
    argv = [xl, "-v", "restore"] + (["-p"] if paused else [])
    if config_path is not None:
        argv.append(_path(config_path))
    return [*argv, _path(path)]


def create(cfg_path: Path | str, *, paused: bool, xl: str = XL) -> list[str]:
    return [xl, "create"] + (["-p"] if paused else []) + [_path(cfg_path)]


def pause(dom: str | int, *, xl: str = XL) -> list[str]:
    return [xl, "pause", _dom(dom)]


def unpause(dom: str | int, *, xl: str = XL) -> list[str]:
    return [xl, "unpause", _dom(dom)]


def destroy(dom: str | int, *, xl: str = XL) -> list[str]:
    return [xl, "destroy", _dom(dom)]


def migrate_to_sink(dom: str | int, sink_argv: Sequence[str], *, xl: str = XL) -> list[str]:
    """`xl migrate -s "" DOM RUNE`: with an empty ssh command, xl runs the "host"
    argument itself through `sh -c` as the migration transport
    (xl_migrate.c: main_migrate, create_migration_child).

    This is the one place a shell sees a string of ours, so the rune is built
    to leave it nothing to interpret: every word comes from the agent (its own
    interpreter, the sink module, a memory path and a control socket path it
    chose and checked), each must consist of plain characters (`_RUNE_WORD`,
    which has no quote, space, `$`, backquote, glob or redirection
    character), and each is still passed through shlex.quote, whose single
    quotes make sh take it literally. `exec` leaves no shell behind between
    xl and the sink.
    """
    if not sink_argv:
        raise InvalidArgument("the migration sink needs a command")
    for word in sink_argv:
        if not _RUNE_WORD.fullmatch(word):
            raise InvalidArgument(f"refusing to hand {word!r} to a shell: only letters, digits and "
                                  "_ . / + = : , @ % - are allowed in the migration sink's command")
    rune = "exec " + " ".join(shlex.quote(word) for word in sink_argv)
    return [xl, "migrate", "-s", "", _dom(dom), rune]


# ---------------------------------------------------------------- parsers


@dataclass(frozen=True)
class XlListEntry:
    """One row of `xl list`: what the domain does now (the JSON config says
    nothing of run state)."""

    name: str
    domid: int
    memory_mib: int
    vcpus: int
    state: RunState
    cpu_seconds: float
    # The six state letters as printed ("-b----", "---ss-").
    flags: str = "------"

    @property
    def suspended(self) -> bool:
        """Shut down for a suspend: a save stopped it and nothing resumed it yet."""
        return self.flags[3] == "s" and self.flags[4] == "s"


# printf("%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f", ...): the name may be
# longer than 40 characters or hold spaces, so the row is read from the right.
_LIST_ROW: Final = re.compile(
    r"(?P<name>.+?)\s+(?P<domid>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+"
    r"(?P<state>[-r][-b][-p][-s][-rscwS?][-d])\s+(?P<time>\d+\.\d)\b.*"
)


def run_state(flags: str) -> RunState:
    """The run state xl list's six letters say."""
    paused, shutdown, reason, dying = flags[2], flags[3], flags[4], flags[5]
    if shutdown == "s" or dying == "d":
        return RunState.CRASHED if reason == "c" else RunState.SHUTDOWN
    if paused == "p":
        return RunState.PAUSED
    # 'r' (on a CPU now) and 'b' (blocked, waiting for an event) both run.
    return RunState.RUNNING


def parse_list(text: str) -> list[XlListEntry]:
    entries = []
    for line in text.splitlines()[1:]:
        m = _LIST_ROW.fullmatch(line.rstrip())
        if m is None:
            raise ValueError(f"xl list: unexpected row {line!r}")
        entries.append(XlListEntry(m["name"], int(m["domid"]), int(m["mem"]), int(m["vcpus"]),
                                   run_state(m["state"]), float(m["time"]), m["state"]))
    return entries


@dataclass(frozen=True)
class XlDisk:
    vdev: str
    target: str
    format: str
    # libxl's backend: "phy" (blkback), "qdisk" (QEMU), "standalone", or
    # "unknown" when libxl left the choice open.
    backend: str
    readwrite: bool
    cdrom: bool


@dataclass(frozen=True)
class XlNic:
    mac: str
    bridge: str
    ip: str
    script: str
    model: str
    vifname: str
    nictype: str


@dataclass(frozen=True)
class XlDomain:
    """A domain's libxl config as `xl list -l` prints it."""

    domid: int
    name: str
    type: str  # "pv", "pvh" or "hvm"
    uuid: str
    memory_mib: int
    max_memory_mib: int
    vcpus: int
    max_vcpus: int
    disks: tuple[XlDisk, ...]
    nics: tuple[XlNic, ...]
    config: Mapping[str, Any]


def _objects(text: str) -> Iterator[Any]:
    """The JSON values in `text`: one array since Xen 4.2; before, xl printed
    the domains' objects one after another (Xen commit ac963eb789)."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return
        value, pos = decoder.raw_decode(text, pos)
        yield value


def _str(obj: Mapping[str, Any], *keys: str) -> str:
    """The first of `keys` present (libxl omits fields left at their default)."""
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return str(value)
    return ""


def _implied_backend(fmt: str) -> str:
    """The backend libxl must have chosen when the config names none.

    Real Xen 4.17 keeps the user's config: `xl list -l` shows no "backend"
    unless the xl.cfg set backendtype= (captured in the Xen lab). libxl
    (libxl_device.c: disk_try_backend) gives `phy` only raw images and has no
    blktap any more, so a qcow2, qcow, qed or vhd image is always served by
    qdisk; a raw one may be either (phy for block devices and, through a
    loop device, for files)."""
    return "qdisk" if fmt != "raw" else "unknown"


def _disk(d: Mapping[str, Any]) -> XlDisk:
    # Xen 4.1's libxl called these physpath/virtpath.
    return XlDisk(
        vdev=_str(d, "vdev", "virtpath"),
        target=_str(d, "pdev_path", "physpath"),
        format=_str(d, "format") or "raw",
        backend=_str(d, "backend") or _implied_backend(_str(d, "format") or "raw"),
        readwrite=bool(d.get("readwrite", 0)),
        cdrom=bool(d.get("is_cdrom", 0)),
    )


def _nic(n: Mapping[str, Any]) -> XlNic:
    return XlNic(mac=_str(n, "mac"), bridge=_str(n, "bridge"), ip=_str(n, "ip"), script=_str(n, "script"),
                 model=_str(n, "model"), vifname=_str(n, "ifname"), nictype=_str(n, "nictype"))


def _type(c_info: Mapping[str, Any], b_info: Mapping[str, Any]) -> str:
    if "type" in c_info:
        return str(c_info["type"])
    # The build info is keyed by type ("type.pv": {...}) even when c_info lost it.
    for key in b_info:
        if key.startswith("type."):
            return key.removeprefix("type.")
    return "pv"


def _domain(entry: Mapping[str, Any]) -> XlDomain:
    config = entry.get("config")
    if not isinstance(config, dict) or entry.get("domid") is None:
        raise ValueError("xl list -l: expected objects with 'domid' and 'config'")
    c_info = config.get("c_info", {})
    b_info = config.get("b_info", {})
    max_kb = int(b_info.get("max_memkb", 0))
    target_kb = int(b_info.get("target_memkb", max_kb))
    max_vcpus = int(b_info.get("max_vcpus", 1))
    return XlDomain(
        domid=int(entry["domid"]),
        name=_str(c_info, "name"),
        type=_type(c_info, b_info),
        uuid=_str(c_info, "uuid"),
        memory_mib=target_kb // 1024,
        max_memory_mib=max_kb // 1024,
        # avail_vcpus is a bitmap printed as the list of online vcpu numbers.
        vcpus=len(b_info["avail_vcpus"]) if b_info.get("avail_vcpus") else max_vcpus,
        max_vcpus=max_vcpus,
        disks=tuple(_disk(d) for d in config.get("disks", [])),
        nics=tuple(_nic(n) for n in config.get("nics", [])),
        config=config,
    )


def domain_of(domid: int, config: Mapping[str, Any]) -> XlDomain:
    """A domain as `xl list -l` would show it, from a libxl config known otherwise (a save image's)."""
    return _domain({"domid": domid, "config": config})


def parse_list_long(json_text: str) -> list[XlDomain]:
    domains = []
    for value in _objects(json_text):
        for entry in value if isinstance(value, list) else [value]:
            domains.append(_domain(entry))
    return domains


def parse_info(text: str) -> dict[str, str]:
    """`xl info`: "key<padding>: value" lines; the tables of `xl info -n` are skipped."""
    result = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.startswith(" ") and key.strip() and " " not in key.strip():
            result[key.strip()] = value.strip()
    return result


# libxc's restore at detail level, which `xl -v` shows (xc_sr_restore.c:
# xc_domain_restore): "xc: detail: fd 4, dom 7, hvm 0, stream_type 0".
_RESTORED: Final = re.compile(r"^xc: detail: fd \d+, dom (\d+), hvm \d+, stream_type \d+$", re.M)


def parse_restored_domid(stderr: str) -> int | None:
    """The id of the domain `xl -v restore` made, or None if xl did not say."""
    found = _RESTORED.findall(stderr)
    return int(found[-1]) if len(found) == 1 else None


# xtl_logger_stdio.c prints progress as "xc: progress: Frames: 2048/32768    6%"
# ("detail" for steps under 5 %, which xl hides by default; no level and a
# carriage return on a terminal; a date and pid with `xl -T`). The "what" is
# one of libxc's prefixes: "Frames", "Frames iteration N", "Frames verify",
# "Checkpointed save".
_PROGRESS: Final = re.compile(
    r"xc: (?:(?:progress|detail): )?(?P<what>Frames[^:]*|Checkpointed save): "
    r"(?P<done>\d+)/(?P<total>\d+) +\d+%"
)


def parse_save_progress(line: str) -> tuple[int, int] | None:
    """Pages done and total from one stderr line of `xl save`, or None."""
    m = _PROGRESS.search(line.rsplit("\r", 1)[-1])
    if m is None or int(m["total"]) == 0:
        return None
    return int(m["done"]), int(m["total"])
