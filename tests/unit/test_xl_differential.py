"""domsnap's xl.cfg and disk-spec parsers against Xen 4.17's own (libxlutil,
through tests/xlprobe): on Xen's documented examples (tests/data/xl-4.17),
edge cases, and thousands of hypothesis-generated inputs (a fixed seed and a
random one, printed on failure; DOMSNAP_XL_SEED=N replays one), configs
among them with KEY=VALUE overrides, which libxlu reads as xl create gives
them (appended to the file's text).

For every input: domsnap must not accept what libxlu rejects; where both
accept, every reading xl makes (string, long, list items, the whole value;
every libxl_device_disk field) must be equal; and libxlu must read what
`dump()` / `to_spec()` write back exactly as it read the input. Where
domsnap refuses what libxlu accepts, the refusal must be one of the
deliberate differences of tests/data/xl-4.17/deliberate.toml, each with its
reason and its examples, which are asserted too.
"""

from __future__ import annotations

import collections
import os
import random
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from domsnap.agent import xlcfg, xldisk
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.xldisk import DiskSpec
from tests import xlprobe

DATA: Final = Path(__file__).parent.parent / "data" / "xl-4.17"
FIXED_SEED: Final = 20261202
RANDOM_SEED: Final = int(os.environ.get("DOMSNAP_XL_SEED") or random.SystemRandom().randrange(1 << 32))
# Inputs per parser and seed: 2 x 2 x 1250 generated, besides the corpus and
# edge cases, and 2 x 250 configs with KEY=VALUE overrides.
GENERATED: Final = 1250
WITH_OVERRIDES: Final = 250
ESRCH: Final = 3
_WORD: Final = re.compile(r"[a-z][._0-9a-z]*")


@pytest.fixture(scope="module")
def probe() -> Iterator[xlprobe.Probe]:
    try:
        binary = xlprobe.build()
    except xlprobe.Unavailable as err:
        pytest.skip(str(err))
    p = xlprobe.Probe(binary)
    yield p
    p.close()


# -- the deliberate differences --------------------------------------------


@dataclass(frozen=True)
class Deliberate:
    id: str
    parser: str
    message: re.Pattern[str]
    reason: str
    # Each: the text, and the KEY=VALUE overrides that follow it.
    examples: tuple[tuple[str, tuple[str, ...]], ...]
    last_character: bool


def _repeated(example: Mapping[str, Any]) -> str:
    head: str = example["head"]
    tail: str = example["tail"]
    return head + "".join(example["piece"].format(i=i) for i in range(example["count"])) + tail


def _example(example: str | Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    if isinstance(example, str):
        return example, ()
    return example["text"], tuple(example["overrides"])


def _deliberate() -> list[Deliberate]:
    data = tomllib.loads((DATA / "deliberate.toml").read_text())
    return [
        Deliberate(
            d["id"],
            d["parser"],
            re.compile(d["message"]),
            d["reason"],
            tuple(_example(e) for e in (*d["examples"], *map(_repeated, d.get("repeated", ())))),
            d.get("where") == "last-character",
        )
        for d in data["refused"]
    ]


DELIBERATE: Final = _deliberate()


def _offset(text: str, line: int, column: int) -> int:
    lines = text.split("\n")
    return sum(len(x) + 1 for x in lines[: line - 1]) + column - 1


def classify(parser: str, text: str, err: InvalidArgument) -> str | None:
    """The id of the deliberate difference this refusal is, or None."""
    at_last = (
        isinstance(err, xlcfg.XlCfgError)
        and err.override is None
        and _offset(text, err.line, err.column) == len(text) - 1
    )
    for d in DELIBERATE:
        if d.parser == parser and d.message.search(err.message) and (at_last or not d.last_character):
            return d.id
    return None


# -- what each side reads ---------------------------------------------------


def _rc(rc: int) -> int:
    return rc if rc in (0, ESRCH) else -1  # EINVAL or ERANGE: both "not readable so"


@dataclass(frozen=True)
class Readings:
    string: tuple[int, str | None]
    long: tuple[int, int]
    items: tuple[int, tuple[str | None, ...]]
    tree: Any


def theirs(reading: xlprobe.Reading) -> Readings:
    return Readings(
        (_rc(reading.string[0]), reading.string[1]),
        (_rc(reading.long[0]), reading.long[1]),
        (_rc(reading.items[0]), reading.items[1]),
        reading.tree,
    )


def _tree(value: xlcfg.Value) -> Any:
    return [_tree(v) for v in value] if isinstance(value, list) else str(value)


def _attempt(read: Callable[[], Any], failed: Any) -> tuple[int, Any]:
    try:
        return 0, read()
    except InvalidArgument:
        return -1, failed


def ours(settings: Mapping[str, xlcfg.Value], key: str) -> Readings:
    if key not in settings:
        return Readings((ESRCH, None), (ESRCH, 0), (ESRCH, ()), None)
    value = settings[key]
    items: tuple[int, tuple[str | None, ...]] = (-1, ())
    if isinstance(value, list):
        # xlu_cfg_get_listitem gives NULL for a nested list; get_list refuses one.
        nested = any(isinstance(v, list) for v in value)
        got = _attempt(lambda: xlcfg.get_list(settings, key), None)
        assert (got[0] != 0) == nested, f"get_list({key!r}) of {value!r}: {got}"
        items = (0, tuple(None if isinstance(v, list) else str(v) for v in value))
    return Readings(
        _attempt(lambda: xlcfg.get_str(settings, key), None),
        _attempt(lambda: xlcfg.get_int(settings, key), 0),
        items,
        _tree(value),
    )


def _c_atoi(text: str) -> int:
    match = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    return int(match[1]) if match else 0


def _defbool(flags: frozenset[str], yes: str, no: str) -> str:
    return "True" if yes in flags else "False" if no in flags else "<default>"


def disk_fields(d: DiskSpec) -> dict[str, Any]:
    """What libxl_device_disk holds for a DiskSpec: every field of it (those
    libxlu never sets keep libxl_device_disk_init's values)."""
    cdrom = int(d.devtype == "cdrom")
    return {
        "pdev_path": d.target, "vdev": d.vdev, "format": d.format, "readwrite": int(d.access == "rw"),
        "is_cdrom": cdrom, "removable": cdrom, "backend": d.backendtype or "unknown", "script": d.script,
        "backend_domname": d.extra.get("backend"), "specification": d.extra.get("specification", "unknown"),
        "colo_host": d.extra.get("colo-host"), "colo_port": _c_atoi(d.extra.get("colo-port", "")),
        "colo_export": d.extra.get("colo-export"), "active_disk": d.extra.get("active-disk"),
        "hidden_disk": d.extra.get("hidden-disk"), "direct_io_safe": int("direct-io-safe" in d.flags),
        "discard_enable": _defbool(d.flags, "discard", "no-discard"),
        "colo_enable": _defbool(d.flags, "colo", "no-colo"), "trusted": _defbool(d.flags, "trusted", "untrusted"),
        "transport": "unknown", "backend_domid": 0, "irq": 0, "base": 0, "colo_restore_enable": "<default>",
    }  # fmt: skip


def _libxl_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    # An empty cdrom drive has no target in libxlu (NULL), "" in domsnap and in to_spec()'s `target=`.
    return {key: "" if key == "pdev_path" and value is None else value for key, value in fields.items()}


# -- the comparison ---------------------------------------------------------


class Tally:
    """Counts of every outcome, and the first failures."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.failed = 0
        self.last = ""

    def fail(self, what: str, text: str, detail: str) -> None:
        self.counts[f"FAIL {what}"] += 1
        self.failed += 1
        self.last = f"{what}: {text!r}: {detail}"
        if len(self.failures) < 20:
            self.failures.append(self.last)

    def check(self) -> None:
        assert not self.failures, "\n".join(self.failures) + f"\n{self.summary()}"

    def summary(self) -> str:
        return ", ".join(f"{key}: {n}" for key, n in sorted(self.counts.items()))


def _keys(text: str) -> list[str]:
    return sorted({w for w in _WORD.findall(text) if len(w) < 1000})


def as_xl_reads(text: str, overrides: Sequence[str]) -> str:
    """The one text `xl create` gives libxlu: the file, then a new line, then
    each KEY=VALUE argument followed by one (xl_vmcontrol.c)."""
    return text + "\n" + "".join(f"{override}\n" for override in overrides) if overrides else text


def compare_cfg(probe: xlprobe.Probe, tally: Tally, text: str, overrides: Sequence[str] = ()) -> None:
    tally.counts["cfg inputs"] += 1
    read = as_xl_reads(text, overrides)
    keys = _keys(read)
    reference = probe.cfg(read, keys)
    try:
        settings = xlcfg.parse(text, overrides)
    except InvalidArgument as err:
        if not reference.accepted:
            tally.counts["cfg both refuse"] += 1
            return
        if (which := classify("cfg", read, err)) is None:
            tally.fail("cfg refused, not a listed difference", read, err.message)
        else:
            tally.counts[f"cfg deliberate {which}"] += 1
        return
    if not reference.accepted:
        tally.fail("cfg accepted by domsnap, rejected by libxlu", read, reference.report)
        return
    tally.counts["cfg both accept"] += 1
    expected = {key: theirs(reference.readings[key]) for key in keys}
    if (got := {key: ours(settings, key) for key in keys}) != expected:
        diff = {k: (got[k], expected[k]) for k in keys if got[k] != expected[k]}
        tally.fail("cfg read differently (domsnap, libxlu)", read, repr(diff))
        return
    written = xlcfg.dump(settings)
    again = probe.cfg(written, keys)
    if not again.accepted or {key: theirs(again.readings[key]) for key in keys} != expected:
        tally.fail("cfg dump() read differently by libxlu", read, f"{written!r}: {again.report}")
        return
    tally.counts["cfg dump() read the same"] += 1


def compare_disk(probe: xlprobe.Probe, tally: Tally, spec: str) -> None:
    tally.counts["disk inputs"] += 1
    reference = probe.disk(spec)
    try:
        disk = xldisk.parse_disk(spec)
    except InvalidArgument as err:
        if not reference.accepted:
            tally.counts["disk both refuse"] += 1
            return
        if (which := classify("disk", spec, err)) is None:
            tally.fail("disk refused, not a listed difference", spec, err.message)
        else:
            tally.counts[f"disk deliberate {which}"] += 1
        return
    if not reference.accepted:
        tally.fail("disk accepted by domsnap, rejected by libxlu", spec, reference.report)
        return
    tally.counts["disk both accept"] += 1
    expected = _libxl_fields(reference.fields)
    got = disk_fields(disk)
    keys = got.keys() | expected.keys()
    if diff := {k: (got.get(k), expected.get(k)) for k in keys if got.get(k) != expected.get(k)}:
        tally.fail("disk read differently (domsnap, libxlu)", spec, repr(diff))
        return
    written = disk.to_spec()
    again = probe.disk(written)
    if not again.accepted or _libxl_fields(again.fields) != expected:
        tally.fail("disk to_spec() read differently by libxlu", spec, f"{written!r}: {again.report}")
        return
    tally.counts["disk to_spec() read the same"] += 1


# -- the inputs -------------------------------------------------------------


def corpus_cfg() -> list[str]:
    entries: list[list[str]] = []
    for line in (DATA / "corpus.cfg.txt").read_text().splitlines(keepends=True):
        if line.startswith("%%%% "):
            entries.append([])
        elif not line.startswith("%% "):
            entries[-1].append(line)
    return ["".join(e) for e in entries]


def corpus_disk() -> list[str]:
    lines = (DATA / "corpus.disk.txt").read_text().split("\n")
    return [line for line in lines if line and not line.startswith("%% ")]


EDGE_CFG: Final = [
    "name = 007", "memory = 0x200", "cpus = [0x10, 010]", "a = 0", "a = 00", "a = 0x0", "x += '5'",
    "x = 5\nx += 6", "x = '5'\nx += ''", "x += 5\nx = 5", "x = [1]\nx += [2]", "x += [1]", "x = [[1, 2], '3']",
    "vnuma = [ [ 'pnode=0', 'size=512' ], [ 'pnode=1' ] ]", "x = [[]]", "x = [[[1]], [], 2,]",
    "a = 1 # c", "a = 1\n# c", "a = 1\n#", "a = 1 $", "a = 1 '", "a = 1\n$", "a = 1 ", "a = 1;", "a = 1\n\n",
    "a = 'x'\n#\n", "#", "# only", "a = 9223372036854775807", "a = 0777777777777777777777",
    "a = 0x7fffffffffffffff", "a = 18446744073709551615", "a = 09", "a = 1x", "a = 0x", "s = 'a\\12b'",
    "s = 'a\\x41'", "s = '\\''", 's = "\\""', "s = 'é'", "a.b = 1", "a_b.c9 = 'x'", "a = [1,\n# c\n2,\n]",
    "a = [\n]", "a = []", "a = [,]", "a = [1,,2]", "a = 'x' # c\nb = 2", "a = 1;;b = 2", "a=1\tb=2",
]  # fmt: skip

# Each generator mixes well-formed inputs (most of them: they reach the
# readings and the write-back) with hostile ones (libxlu's corners).

_GOOD_NUMBERS: Final = st.one_of(
    st.sampled_from(["0", "7", "007", "010", "00", "0x200", "0xff", "9223372036854775807", "0x7fffffffffffffff"]),
    st.integers(0, (1 << 63) - 1).map(str),
    st.integers(0, (1 << 63) - 1).map(hex),
    st.integers(0, (1 << 63) - 1).map(lambda n: "0" + format(n, "o")),
)
_NUMBERS: Final = st.one_of(
    _GOOD_NUMBERS,
    st.sampled_from(["09", "0x", "0X1F", "0xFF", "1x", "12abc", "1.5", "-1", "9223372036854775808",
                     "0x8000000000000000"]),
    st.integers(0, 1 << 64).map(str),
)  # fmt: skip
_GOOD_PIECES: Final = st.sampled_from(
    [*"ab #,;[]=+'\"é\x01\t/:", "\\n", "\\t", "\\\\", '\\"', "\\a", "\\r", "\\v", "xvda", "pnode=0"]
)
_STRING_PIECES: Final = st.one_of(
    _GOOD_PIECES,
    st.sampled_from(["\\x41", "\\101", "\\12", "\\1", "\\q", "\\", "\n", "\r", "\\\n", "\\'"]),
)


def _mix(
    good: st.SearchStrategy[str], hostile: st.SearchStrategy[str], noise: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """Half well-formed inputs, the rest hostile ones and random text."""
    return st.sampled_from([good, good, good, hostile, hostile, noise]).flatmap(lambda strategy: strategy)


def _quoted(pieces: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def render(quote: str, parts: list[str]) -> str:
        return quote + "".join(parts) + quote

    return st.builds(render, st.sampled_from("'\""), st.lists(pieces, max_size=8))


def _good_string(quote: str, parts: list[str]) -> str:
    # A quote of the other kind needs no escape; of the same kind, one.
    return quote + "".join(f"\\{p}" if p == quote else p for p in parts) + quote


_GOOD_STRINGS: Final = st.builds(_good_string, st.sampled_from("'\""), st.lists(_GOOD_PIECES, max_size=8))
_IN_LIST: Final = st.sampled_from([", ", ",", " ,\n", ",\n# c\n", ",\n\n", " , "])


def _render_list(items: list[str], sep: str, trailing: bool) -> str:
    return "[" + sep.join(items) + ("," if trailing and items else "") + "]"


def _values(scalars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.recursive(
        scalars,
        lambda inner: st.builds(_render_list, st.lists(inner, max_size=4), _IN_LIST, st.booleans()),
        max_leaves=8,
    )


_GOOD_KEYS: Final = st.one_of(
    st.sampled_from(["name", "memory", "vcpus", "disk", "cpus", "vnuma", "x", "a.b", "k_1"]),
    st.from_regex(r"[a-z][a-z0-9_.]{0,3}", fullmatch=True),
)
_KEYS: Final = st.one_of(_GOOD_KEYS, st.sampled_from(["Name", "_x", "9a", "a-b"]))
_GOOD_OPS: Final = st.sampled_from([" = ", "=", " += ", "+=", "\t=\t", " =  "])
_OPS: Final = st.one_of(_GOOD_OPS, st.sampled_from([" + = ", " == ", " : "]))
_GOOD_ENDS: Final = st.sampled_from(["\n", ";", " # comment\n", ";;", "\n\n", "\n# c\n", "; ", " ;\n"])
_ENDS: Final = st.one_of(_GOOD_ENDS, st.sampled_from([" ", "\r\n"]))
_GOOD_LAST: Final = st.sampled_from(["", "\n", ";", " # end\n", "\n\n"])
_LAST: Final = st.one_of(_GOOD_LAST, st.sampled_from([" # end", "#", " $", " '", "\r\n", "\n#", " ]", "\n%", "\r"]))


def _statements(
    keys: st.SearchStrategy[str],
    ops: st.SearchStrategy[str],
    values: st.SearchStrategy[str],
    ends: st.SearchStrategy[str],
    last: st.SearchStrategy[str],
) -> st.SearchStrategy[str]:
    statement = st.builds(lambda k, o, v: k + o + v, keys, ops, values)
    return st.builds(
        lambda body, tail: "".join(s + e for s, e in body[:-1]) + body[-1][0] + tail,
        st.lists(st.tuples(statement, ends), min_size=1, max_size=5),
        last,
    )  # fmt: skip


_GOOD_CFG: Final = _statements(
    _GOOD_KEYS, _GOOD_OPS, _values(st.one_of(_GOOD_NUMBERS, _GOOD_STRINGS)), _GOOD_ENDS, _GOOD_LAST
)
_ANY_CFG: Final = _statements(_KEYS, _OPS, _values(st.one_of(_NUMBERS, _quoted(_STRING_PIECES))), _ENDS, _LAST)


def cfg_texts() -> st.SearchStrategy[str]:
    return _mix(_GOOD_CFG, _ANY_CFG, st.text(alphabet="ab=1 '\"[],;#\n+x0\\é", max_size=30))


_GOOD_VALUES: Final[dict[str, list[str]]] = {
    "format": ["raw", "qcow2", "vhd", "qcow", "qed", "empty"],
    "vdev": ["xvda", "xvdb", "hda", "hdc", "sda", "xvdb1", "d0p1", "51712", "xvdaa"],
    "access": ["r", "ro", "w", "rw"], "devtype": ["cdrom", "disk"],
    "backendtype": ["phy", "qdisk", "tap", "standalone"], "backend": ["a", "dom0", "driver-dom"],
    "specification": ["xen", "virtio"], "script": ["block-x", "s"], "colo-host": ["h", "192.168.1.2"],
    "colo-port": ["9000", "1", "65535"], "colo-export": ["e"], "active-disk": ["/a"], "hidden-disk": ["/h"],
}  # fmt: skip
_BAD_VALUES: Final[dict[str, list[str]]] = {
    "format": ["", "bogus", "QCOW2"], "vdev": ["", "xvdb ", "sdq", "xvd", "hde"], "access": ["", "x"],
    "devtype": ["floppy"], "backendtype": ["", "x"], "backend": [""], "specification": ["", "x"],
    "script": [""], "colo-host": [""], "colo-port": ["80x", "", "0", "08"], "colo-export": [""], "active-disk": [""],
    "hidden-disk": [""], "grant_usage": ["0", "1", "2"], "foo": ["1", "bar"],
}  # fmt: skip


def _keyed(values: Mapping[str, list[str]]) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(values)).flatmap(lambda key: st.sampled_from(values[key]).map(f"{key}={{}}".format))


_GOOD_FLAGS: Final = st.sampled_from(["cdrom", "discard", "no-discard", "direct-io-safe", "colo", "no-colo"])
_GOOD_TARGETS: Final = st.sampled_from(["/x", "/srv/a.qcow2", "/dev/vg/a", "a b", "/x:y", "iqn.2001-05.com.e:d"])
_GOOD_SEPARATORS: Final = st.sampled_from([",", ", ", " ,", " , "])


def _slot(name: str) -> st.SearchStrategy[str]:
    if name == "target":
        return _GOOD_TARGETS
    # An empty format or access is xl's default.
    return st.sampled_from(_GOOD_VALUES[name] + ([""] if name in ("format", "access") else []))


@st.composite
def _good_disk(draw: st.DrawFn) -> str:
    """A spec in one of xl's forms: positional values in their order (a prefix
    such as `raw:` takes the format's place), keyed ones anywhere among them."""
    prefix = draw(st.sampled_from(["", "", "", "phy:", "raw:", "qcow2:", "vhd:", "tap:aio:", "file:"]))
    slots = ["target", "format", "vdev", "access"]
    if prefix:
        slots.remove("format")
    used = slots[: draw(st.integers(0, len(slots)))]
    positional = [draw(_slot(slot)) for slot in used]
    free = {key: values for key, values in _GOOD_VALUES.items() if key not in used and key not in ("vdev", "format")}
    keyed = draw(st.lists(st.one_of(_keyed(free), _GOOD_FLAGS), max_size=4, unique_by=lambda p: p.split("=")[0]))
    if "vdev" not in used:
        keyed.append(f"vdev={draw(st.sampled_from(_GOOD_VALUES['vdev']))}")
    order = draw(st.permutations(range(len(positional) + len(keyed))))
    slots_in_order = iter(positional)
    params = [next(slots_in_order) if i < len(positional) else keyed[i - len(positional)] for i in order]
    if "target" not in used:
        params.append(f"target={draw(_GOOD_TARGETS)}{draw(st.sampled_from(['', ',', ',x']))}")
    return prefix + draw(st.sampled_from([",", ", "])).join(params)


_POSITIONAL: Final = st.sampled_from(
    ["/x", "/srv/a.qcow2", "", "a b", "trusted", "untrusted", "cdrom", "raw", "qcow2", "vhd", "empty", "QCOW2",
     "bogus", "xvda", "hdc", "hdc:cdrom", "hdc:disk", "hdc:floppy", "sda", "xvdb1", "51712", "0xca00", "xvd",
     "xvda ", "hde", "r", "ro", "w", "rw", "x", " xvdb"]
)  # fmt: skip
_FLAGS: Final = st.one_of(_GOOD_FLAGS, st.sampled_from(["trusted", "untrusted"]))
_PREFIXES: Final = st.sampled_from(
    ["", "", "", "phy:", "raw:", "qcow2:", "vhd:", "tap:", "tap:aio:", "file:", "iscsi:", "nbd:", "foo:", "aio:"]
)
_TARGETS: Final = st.sampled_from(["", "", "target=/x", "target=/a,b", "target=/a,", "target=", "target=/x,,"])


@st.composite
def _any_disk(draw: st.DrawFn) -> str:
    params = draw(st.lists(st.one_of(_POSITIONAL, _keyed(_GOOD_VALUES), _keyed(_BAD_VALUES), _FLAGS), max_size=6))
    target = draw(_TARGETS)
    spec = draw(st.sampled_from([",", ", ", " ,"])).join(params + ([target] if target else []))
    return draw(_PREFIXES) + spec


def disk_specs() -> st.SearchStrategy[str]:
    return _mix(_good_disk(), _any_disk(), st.text(alphabet=",=:/ xvdarwcom-t\t", max_size=20))


# -- the tests --------------------------------------------------------------


def test_deliberate_differences_hold(probe: xlprobe.Probe) -> None:
    """Each listed difference is real: libxlu accepts its examples, domsnap
    refuses them with the listed message."""
    for d in DELIBERATE:
        assert d.reason.strip() and d.examples, d.id
        for text, overrides in d.examples:
            with pytest.raises(InvalidArgument) as caught:
                if d.parser == "cfg":
                    read = as_xl_reads(text, overrides)
                    accepted = probe.cfg(read, _keys(read)).accepted
                    xlcfg.parse(text, overrides)
                else:
                    assert not overrides, d.id
                    read = text
                    accepted = probe.disk(text).accepted
                    xldisk.parse_disk(text)
            assert accepted, f"{d.id}: libxlu refuses {read!r} too"
            assert classify(d.parser, read, caught.value) == d.id, (read, caught.value.message)


def test_documented_examples_and_edge_cases(probe: xlprobe.Probe) -> None:
    tally = Tally()
    cfgs = corpus_cfg() + EDGE_CFG
    for text in cfgs:
        compare_cfg(probe, tally, text)
    disk_lists = [xlcfg.get_list(xlcfg.parse(t), "disk") for t in cfgs if _disk_list(t)]
    for spec in corpus_disk() + [spec for specs in disk_lists for spec in specs]:
        compare_disk(probe, tally, spec)
    print(tally.summary())
    tally.check()
    assert tally.counts["cfg inputs"] >= 300 and tally.counts["disk inputs"] >= 100


def _disk_list(text: str) -> bool:
    try:
        settings = xlcfg.parse(text)
        return bool(xlcfg.get_list(settings, "disk", []))
    except InvalidArgument:
        return False


_Input = TypeVar("_Input")


def _run(strategy: st.SearchStrategy[_Input], check: Callable[[_Input], None], which_seed: int, count: int) -> None:
    @seed(which_seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(strategy)
    def run(case: _Input) -> None:
        check(case)

    try:
        run()
    except BaseException as err:
        err.add_note(f"hypothesis seed {which_seed} (DOMSNAP_XL_SEED={which_seed} replays the random one)")
        raise


@pytest.mark.parametrize("which_seed", [FIXED_SEED, RANDOM_SEED], ids=["fixed-seed", "random-seed"])
def test_generated_inputs(probe: xlprobe.Probe, which_seed: int) -> None:
    tally = Tally()

    def check(compare: Callable[[xlprobe.Probe, Tally, _Input], None]) -> Callable[[_Input], None]:
        def one(case: _Input) -> None:
            # Only this input's failure: hypothesis then shrinks to the input that fails.
            before = tally.failed
            compare(probe, tally, case)
            assert tally.failed == before, f"{tally.last}\n{tally.summary()}"

        return one

    def with_overrides(p: xlprobe.Probe, t: Tally, case: tuple[str, list[str]]) -> None:
        compare_cfg(p, t, *case)

    _run(cfg_texts(), check(compare_cfg), which_seed, GENERATED)
    _run(disk_specs(), check(compare_disk), which_seed, GENERATED)
    configs = tally.counts["cfg inputs"]
    overridden = st.tuples(cfg_texts(), st.lists(cfg_texts(), min_size=1, max_size=3))
    _run(overridden, check(with_overrides), which_seed, WITH_OVERRIDES)
    print(f"seed {which_seed}: {tally.summary()}")
    assert configs >= GENERATED and tally.counts["disk inputs"] >= GENERATED
    assert tally.counts["cfg inputs"] - configs >= WITH_OVERRIDES
