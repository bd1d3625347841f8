"""One xl disk specification (xl-disk-configuration(5)), read as libxlu reads it.

A spec is comma-separated parameters: `key=value` pairs, flags, and
positional ones filling target, format, vdev, access in that order
(`/srv/a.qcow2,qcow2,xvda,w`). `target=` swallows the rest of the spec,
commas included, so it comes last. The deprecated xend forms (`phy:/dev/x`,
`,hdc:cdrom,r`) are read too, because real configs still use them.

The grammar is that of the xl the agent faces (XlVersion; Debian 12's 4.17
unless told otherwise): parameters a later xl added are refused there with
the version that has them, rather than read as 4.17's lexer would (as a
positional value: `vdev=hdc,cdrom,trusted` is a cdrom backed by a file
named `trusted` in 4.17).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple

from .errors import InvalidArgument

FORMATS: Final = frozenset({"raw", "qcow", "qcow2", "vhd", "qed", "empty"})
ACCESS_MODES: Final = frozenset({"ro", "rw"})
DEVTYPES: Final = frozenset({"cdrom", "disk"})
BACKEND_TYPES: Final = frozenset({"phy", "qdisk", "tap", "standalone"})
MAX_SPEC: Final = 8192


class XlVersion(NamedTuple):
    """The version of xl (libxlu) whose disk-spec grammar applies."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str) -> XlVersion:
        """From a version string such as "4.17.5" (`xl info`'s xen_version)."""
        match = re.match(r"(\d+)\.(\d+)", text)
        if match is None:
            raise InvalidArgument(f"cannot read a Xen version from {text!r}")
        return cls(int(match[1]), int(match[2]))


# Debian 12's xl, and the grammar of the qemu driver's configs.
DEFAULT_XL: Final = XlVersion(4, 17)
# Parameters libxlu reads only from a later Xen on: its 4.17 and 4.18 lexers
# were never regenerated from the rules that name `trusted`.
SINCE: Final[Mapping[str, XlVersion]] = MappingProxyType(
    {"trusted": XlVersion(4, 19), "untrusted": XlVersion(4, 19), "grant_usage": XlVersion(4, 19)}
)

# Parameters a DiskSpec keeps in `extra`, with the values xl allows (None: any
# string, except that colo-port must be a port number).
EXTRA_PARAMETERS: Final[Mapping[str, frozenset[str] | None]] = MappingProxyType(
    {
        "backend": None,
        "specification": frozenset({"xen", "virtio"}),
        "grant_usage": frozenset({"0", "1"}),
        "colo-host": None,
        "colo-port": None,
        "colo-export": None,
        "active-disk": None,
        "hidden-disk": None,
    }
)
# Parameters libxlu sets once: a second one is "respecified" even when equal,
# unless the first was empty. `specification` may be repeated, not changed;
# for colo-port and grant_usage the last one wins.
_SET_ONCE: Final = frozenset({"backend", "colo-host", "colo-export", "active-disk", "hidden-disk"})
# Each flag with the one that undoes it: the later of the two wins.
FLAGS: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "direct-io-safe": None,
        "discard": "no-discard",
        "no-discard": "discard",
        "colo": "no-colo",
        "no-colo": "colo",
        "trusted": "untrusted",
        "untrusted": "trusted",
    }
)

_ACCESS: Final = {"": "rw", "w": "rw", "rw": "rw", "r": "ro", "ro": "ro"}
_FORMAT_PREFIXES: Final = {"raw": "raw", "qcow": "qcow", "qcow2": "qcow2", "vhd": "vhd"}
_SCRIPT_PREFIXES: Final = frozenset({"iscsi", "nbd", "enbd", "drbd"})
_IGNORED_PREFIXES: Final = frozenset({"tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy"})
# libxlu reports `name:` as an unknown prefix only when no letter or digit
# follows, so `hdc:cdrom` stays a vdev with its devtype.
_PREFIX: Final = re.compile(r"([a-z][a-z0-9]*):(?![a-z0-9])")
_KNOWN_PREFIX: Final = re.compile(r"(raw|qcow2?|vhd|iscsi|e?nbd|drbd|tapdisk|tap2?|aio|ioemu|file|phy):")
_KEYED: Final = re.compile(r"([a-z][-a-z0-9_]*)=")
_COLO_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")

# libxl__device_disk_dev_number's names: (letters, partition) limits per prefix.
_VDEV_NAMED: Final = re.compile(r"(xvd|hd|sd)([a-z]{1,5})([1-9][0-9]{0,2})?")
_VDEV_LIMITS: Final = {"xvd": ((1 << 20) - 1, 255), "hd": (3, 63), "sd": (15, 15)}
_VDEV_INDEXED: Final = re.compile(r"d(0|[1-9][0-9]{0,6})p(0|[1-9][0-9]{0,2})")
_VDEV_NUMBER: Final = re.compile(r"0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,9}")
_INT_MAX: Final = (1 << 31) - 1


@dataclass(frozen=True, kw_only=True)
class DiskSpec:
    """A parsed disk spec, with xl's defaults applied.

    `target` is "" for an empty cdrom drive (and, in snapshot cfgfiles, for a
    disk snapshotted internally). A cdrom is always read-only, as in xl.
    `extra` holds the other key=value parameters (EXTRA_PARAMETERS), `flags`
    the bare flags (FLAGS).
    """

    target: str
    vdev: str
    format: str = "raw"
    access: str = "rw"
    devtype: str | None = None
    backendtype: str | None = None
    script: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)
    flags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        _check_choice("format", self.format, FORMATS)
        _check_choice("access", self.access, ACCESS_MODES)
        _check_vdev(self.vdev)
        if self.devtype is not None:
            _check_choice("devtype", self.devtype, DEVTYPES)
        if self.backendtype is not None:
            _check_choice("backendtype", self.backendtype, BACKEND_TYPES)
        if self.script is not None:
            _check_keyed("script", self.script)
        self._check_cdrom()
        self._check_target()
        for name, value in self.extra.items():
            _check_extra(name, value)
        for flag in self.flags:
            _check_flag(flag, self.flags)

    def _check_cdrom(self) -> None:
        if self.devtype != "cdrom":
            return
        if self.access != "ro":
            raise InvalidArgument("a cdrom is read-only: access must be 'ro'")
        if not self.target and self.format != "empty":
            raise InvalidArgument("an empty cdrom drive has format 'empty'")

    def _check_target(self) -> None:
        if "\n" in self.target or "\0" in self.target:
            raise InvalidArgument("the target must not contain a newline or NUL character")

    def to_spec(self) -> str:
        """The keyed spec string; parse_disk() of it gives back an equal DiskSpec."""
        parts = [f"format={self.format}", f"vdev={self.vdev}", f"access={self.access}"]
        if self.devtype is not None:
            parts.append(f"devtype={self.devtype}")
        if self.backendtype is not None:
            parts.append(f"backendtype={self.backendtype}")
        if self.script is not None:
            parts.append(f"script={self.script}")
        parts.extend(f"{name}={value}" for name, value in self.extra.items())
        parts.extend(sorted(self.flags))
        # `target=` drops one trailing comma, so a target ending in one needs another.
        parts.append(f"target={self.target}" + ("," if self.target.endswith(",") else ""))
        return ",".join(parts)


def _check_choice(name: str, value: str, allowed: frozenset[str]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"unknown {name} {value!r} (expected one of {', '.join(sorted(allowed))})")


def _check_keyed(name: str, value: str) -> None:
    if "," in value or "\n" in value or "\0" in value:
        raise InvalidArgument(f"{name} {value!r} must not contain a comma, newline or NUL character")


def _check_extra(name: str, value: str) -> None:
    if name not in EXTRA_PARAMETERS:
        raise InvalidArgument(f"unknown parameter {name!r}")
    allowed = EXTRA_PARAMETERS[name]
    if allowed is not None:
        _check_choice(name, value, allowed)
    elif name == "colo-port" and not _COLO_PORT.fullmatch(value):
        raise InvalidArgument(f"colo-port {value!r} is not a port number")
    _check_keyed(name, value)


def _check_flag(flag: str, flags: frozenset[str]) -> None:
    if flag not in FLAGS:
        raise InvalidArgument(f"unknown flag {flag!r}")
    if FLAGS[flag] in flags:
        raise InvalidArgument(f"flags {flag!r} and {FLAGS[flag]!r} contradict each other")


def _check_vdev(vdev: str) -> None:
    if not valid_vdev(vdev):
        raise InvalidArgument(
            f"invalid vdev {vdev!r} (expected a name like xvda, xvdb1, hdc, sda or d0p1, "
            "or a device number; see xen-vbd-interface(7))"
        )


def valid_vdev(vdev: str) -> bool:
    """Whether libxl can number this virtual device (libxl__device_disk_dev_number)."""
    named = _VDEV_NAMED.fullmatch(vdev)
    if named:
        prefix, letters, partition = named.groups()
        max_disk, max_partition = _VDEV_LIMITS[prefix]
        return _disk_index(letters) <= max_disk and int(partition or 0) <= max_partition
    indexed = _VDEV_INDEXED.fullmatch(vdev)
    if indexed:
        return int(indexed[1]) < (1 << 20) and int(indexed[2]) < 256
    if _VDEV_NUMBER.fullmatch(vdev):
        return _c_unsigned(vdev) <= _INT_MAX
    return False


def _disk_index(letters: str) -> int:
    """xvda is disk 0, xvdz 25, xvdaa 26: letters count in bijective base 26."""
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - ord("a") + 1
    return index - 1


def _c_unsigned(digits: str) -> int:
    if digits[:2] in ("0x", "0X"):
        return int(digits, 16)
    return int(digits, 8) if digits.startswith("0") else int(digits)


@dataclass
class _Draft:
    """What the parameters seen so far have set; None is 'not given'."""

    target: str | None = None
    format: str | None = None
    vdev: str | None = None
    access: str = "rw"
    access_positional: bool = False
    devtype: str | None = None
    backendtype: str | None = None
    script: str | None = None
    had_prefix: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)

    def set_string(self, name: str, value: str) -> None:
        # libxlu refuses to set a string twice, but lets a value replace an empty one.
        if getattr(self, name):
            raise InvalidArgument(f"{name} respecified")
        setattr(self, name, value)

    def set_choice(self, name: str, value: str) -> None:
        # libxlu refuses to change an enumerated value once set, not to repeat it.
        current = getattr(self, name)
        if current is not None and current != value:
            raise InvalidArgument(f"{name} respecified")
        setattr(self, name, value)

    def set_format(self, value: str) -> None:
        _check_choice("format", value or "raw", FORMATS)
        self.set_choice("format", value or "raw")

    def set_access(self, value: str) -> None:
        if value not in _ACCESS:
            raise InvalidArgument(f"unknown access {value!r} (expected ro, r, rw or w)")
        self.access = _ACCESS[value]

    def set_flag(self, flag: str) -> None:
        if flag == "cdrom":
            self.devtype = "cdrom"
            return
        opposite = FLAGS[flag]
        if opposite is not None:
            self.flags.discard(opposite)
        self.flags.add(flag)

    def set_vdev_and_devtype(self, text: str) -> None:
        """The xend form `hdc:cdrom` in the vdev position."""
        vdev, _, devtype = text.rpartition(":")
        self.set_string("vdev", vdev)
        if devtype not in DEVTYPES:
            raise InvalidArgument(f"unknown deprecated device type {devtype!r} (expected cdrom or disk)")
        self.devtype = devtype

    def finish(self) -> DiskSpec:
        cdrom = self.devtype == "cdrom"
        if self.vdev is None:
            raise InvalidArgument("no vdev specified")
        if self.target is None and not cdrom:
            raise InvalidArgument("no target specified (and the device is not a removable cdrom)")
        target = self.target or ""
        return DiskSpec(
            target=target,
            vdev=self.vdev,
            format="empty" if cdrom and not target else self.format or "raw",
            access="ro" if cdrom else self.access,
            devtype=self.devtype,
            backendtype=self.backendtype,
            script=self.script,
            extra=self.extra,
            flags=frozenset(self.flags),
        )


def parse_disk(spec: str, xl: XlVersion = DEFAULT_XL) -> DiskSpec:
    """Parses one disk spec as that xl would, e.g. '/srv/a.qcow2,qcow2,xvda,w' or 'vdev=xvdb, target=/dev/vg/b'."""
    try:
        return _parse(spec, xl)
    except InvalidArgument as err:
        raise InvalidArgument(f"invalid disk spec {_shorten(spec)!r}: {err.message}") from err


def _shorten(spec: str) -> str:
    return spec if len(spec) <= 200 else spec[:197] + "..."


def _parse(spec: str, xl: XlVersion) -> DiskSpec:
    if len(spec) > MAX_SPEC:
        raise InvalidArgument(f"too long ({len(spec)} characters; the limit is {MAX_SPEC})")
    if "\n" in spec or "\0" in spec:
        raise InvalidArgument("a disk spec must not contain a newline or NUL character")
    draft = _Draft()
    pos = 0
    while (pos := _skip_blanks(spec, pos)) < len(spec):
        pos = _parameter(draft, spec, pos, xl)
    return draft.finish()


def _skip_blanks(spec: str, pos: int) -> int:
    while pos < len(spec) and spec[pos] in " \t":
        pos += 1
    return pos


def _parameter(draft: _Draft, spec: str, pos: int, xl: XlVersion) -> int:
    """Applies the parameter at pos; returns where the next one starts."""
    if spec.startswith("target=", pos):
        draft.set_string("target", spec[pos + 7 :].removesuffix(","))
        return len(spec)
    prefix = _KNOWN_PREFIX.match(spec, pos) or _PREFIX.match(spec, pos)
    if prefix:
        _prefix(draft, prefix[1])
        return prefix.end()
    end = spec.find(",", pos)
    end = len(spec) if end < 0 else end
    text = spec[pos:end]
    keyed = _KEYED.match(text)
    _check_known(keyed[1] if keyed else text, xl)
    if keyed:
        _keyed(draft, keyed[1], text[keyed.end() :])
    elif "=" in text:
        raise InvalidArgument(f"bad disk syntax near {text!r}: give a path with '=' last, as target=")
    elif text in FLAGS or text == "cdrom":
        draft.set_flag(text)
    else:
        _positional(draft, text)
    return end + 1


def _check_known(name: str, xl: XlVersion) -> None:
    since = SINCE.get(name)
    if since is not None and xl < since:
        raise InvalidArgument(f"'{name}' needs Xen {since} or later (xl here is {xl})")


def _prefix(draft: _Draft, name: str) -> None:
    draft.had_prefix = True
    if name in _FORMAT_PREFIXES:
        draft.set_format(_FORMAT_PREFIXES[name])
    elif name in _SCRIPT_PREFIXES:
        draft.set_string("script", f"block-{name}")
    elif name not in _IGNORED_PREFIXES:
        raise InvalidArgument(f"unknown deprecated disk prefix '{name}:'")


def _keyed(draft: _Draft, name: str, value: str) -> None:
    if name == "format":
        draft.set_format(value)
    elif name == "access":
        draft.set_access(value)
    elif name == "vdev" or name == "script":
        draft.set_string(name, value)
    elif name == "devtype":
        _check_choice("devtype", value, DEVTYPES)
        draft.devtype = value
    elif name == "backendtype":
        _check_choice("backendtype", value, BACKEND_TYPES)
        draft.set_choice("backendtype", value)
    else:
        _extra(draft, name, value)


def _extra(draft: _Draft, name: str, value: str) -> None:
    _check_extra(name, value)
    previous = draft.extra.get(name)
    if previous and (name in _SET_ONCE or (name == "specification" and previous != value)):
        raise InvalidArgument(f"{name} respecified")
    draft.extra[name] = value


def _positional(draft: _Draft, text: str) -> None:
    # The order xl fills positions in; a deprecated prefix stands for the format.
    if draft.target is None:
        draft.target = text
    elif not draft.had_prefix and draft.format is None:
        if draft.target == "" and ":" in text:
            draft.set_vdev_and_devtype(text)
            draft.format = "empty"
        else:
            draft.set_format(text)
    elif draft.vdev is None:
        if ":" in text:
            draft.set_vdev_and_devtype(text)
        else:
            draft.vdev = text
    elif not draft.access_positional:
        draft.access_positional = True
        draft.set_access(text)
    else:
        raise InvalidArgument(f"too many positional parameters at {text!r}")
