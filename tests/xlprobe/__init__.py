"""Xen 4.17's own xl.cfg and disk-spec parser (libxlutil, what `xl create`
links against), driven through probe.c: the reference the differential test
holds domsnap's parsers to.

The probe is compiled on first use, cached by the hash of its source and of
the library it links, and then reads any number of inputs in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, TypeAlias

SOURCE: Final = Path(__file__).with_name("probe.c")
HEADER: Final = Path("/usr/include/libxlutil.h")
LIBRARY: Final = Path("/usr/lib/x86_64-linux-gnu/libxlutil.so.4.17")
EINVAL: Final = 22

Tree: TypeAlias = str | list["Tree"]


class Unavailable(Exception):
    """libxlutil 4.17, its headers or a C compiler is missing: the reason to skip."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "domsnap" / "xlprobe"


def build() -> Path:
    """The probe binary, compiled unless a build of the same source and library is cached."""
    missing = [str(p) for p in (HEADER, LIBRARY) if not p.exists()]
    if missing or shutil.which("gcc") is None:
        what = ", ".join(missing) or "gcc"
        raise Unavailable(f"{what} not installed (scripts/setup installs libxen-dev, libxenmisc4.17 and gcc)")
    digest = hashlib.sha256(SOURCE.read_bytes() + LIBRARY.read_bytes()).hexdigest()[:16]
    binary = _cache_dir() / f"xlprobe-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".{os.getpid()}")
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(partial), str(SOURCE), "-lxlutil", "-lxenlight"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        partial.replace(binary)
    return binary


def _text(value: str | None) -> str | None:
    # probe.c writes each byte above 0x7e as \u00XX: Latin-1 gives the bytes back.
    return None if value is None else value.encode("latin-1").decode("utf-8", "surrogateescape")


def _tree(value: Any) -> Tree:
    if isinstance(value, list):
        return [_tree(item) for item in value]
    text = _text(value)
    assert text is not None
    return text


@dataclass(frozen=True)
class Reading:
    """Every way xl reads one setting: (errno, result) of xlu_cfg_get_string,
    xlu_cfg_get_long and xlu_cfg_get_list with its items (None for a nested
    list), and the whole value."""

    string: tuple[int, str | None]
    long: tuple[int, int]
    items: tuple[int, tuple[str | None, ...]]
    tree: Tree | None

    @property
    def defined(self) -> bool:
        return self.string[0] == 0 or self.items[0] == 0


@dataclass(frozen=True)
class CfgResult:
    rc: int
    report: str
    readings: dict[str, Reading]

    @property
    def accepted(self) -> bool:
        return self.rc == 0


@dataclass(frozen=True)
class DiskResult:
    rc: int
    report: str
    fields: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return self.rc == 0


class Probe:
    """One probe process; ask it any number of questions in turn."""

    def __init__(self, binary: Path) -> None:
        self._proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=10)

    def _ask(self, header: bytes, payload: bytes, tail: bytes = b"") -> dict[str, Any]:
        stdin: IO[bytes] | None = self._proc.stdin
        assert stdin is not None and self._proc.stdout is not None
        stdin.write(header + payload + tail)
        stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the probe died (status {self._proc.wait(timeout=10)}) on {payload!r}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def cfg(self, text: str, keys: list[str]) -> CfgResult:
        """libxlu's reading of config text, and of each of the keys."""
        data = text.encode("utf-8", "surrogateescape")
        names = "".join(f"{key}\n" for key in keys).encode()
        answer = self._ask(b"cfg %d %d\n" % (len(data), len(keys)), data, names)
        readings = {
            key: Reading(
                string=(value["string"][0], _text(value["string"][1])),
                long=(value["long"][0], value["long"][1]),
                items=(value["list"][0], tuple(_text(item) for item in value["list"][1])),
                tree=None if value["tree"] is None else _tree(value["tree"]),
            )
            for key, value in answer["keys"].items()
        }
        return CfgResult(answer["rc"], _text(answer["report"]) or "", readings)

    def disk(self, spec: str) -> DiskResult:
        """libxlu's reading of one disk spec: every field of libxl_device_disk."""
        data = spec.encode("utf-8", "surrogateescape")
        answer = self._ask(b"disk %d\n" % len(data), data)
        fields = {key: _text(value) if isinstance(value, str) else value for key, value in answer["disk"].items()}
        return DiskResult(answer["rc"], _text(answer["report"]) or "", fields)
