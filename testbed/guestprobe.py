"""Observe the domsnap test guest (guest/init) from the host.

The guest prints, on its serial console (QEMU ``-serial file:PATH``):

* ``C <n>``: a counter held only in its RAM, every ~100 ms, from 0;
* ``DISK <dev> init`` / ``DISK <dev> ok <m>`` /
  ``DISK <dev> MISMATCH disk=<m> ram=<last>`` / ``DISK <dev> ERROR read|write``:
  once a second per disk, after comparing sector 0 (``CNT <m>``) with the
  value its RAM says it wrote there last; it then writes ``CNT <n>``;
* ``READY`` once its disks are up and the loop starts, ``NODISK`` if
  /dev/vda never appeared.

Only complete lines (ending in a newline) are considered, so a line that the
guest is still writing is never misread.  Every reader takes an ``offset``
(bytes into the log) so that a test can look only at what came after a
point, e.g. ``offset=log_size(path)`` taken before a restore.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = [
    "KERNEL_CMDLINE",
    "DiskEvent",
    "GuestTimeout",
    "debian_disk",
    "disk_counter",
    "disk_events",
    "disk_lines",
    "guest_paths",
    "is_ready",
    "last_counter",
    "log_size",
    "mismatches",
    "parse_cnt",
    "parse_disk_line",
    "read_lines",
    "read_sector0",
    "serial_counters",
    "wait_counter_above",
    "wait_disk_ok",
    "wait_for",
    "wait_ready",
]

#: The kernel command line the guest expects (append ``domsnap.busy=<MiB>``
#: for a guest that keeps rewriting that much RAM).
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "guest" / "build.sh"

SECTOR = 512
_T = TypeVar("_T")

_COUNTER_RE = re.compile(r"C (\d+)")
_DISK_RE = re.compile(
    r"DISK (?P<dev>vd[a-z]+) (?:"
    r"(?P<init>init)"
    r"|ok (?P<ok>\d+)"
    r"|MISMATCH disk=(?P<disk>\d+|none|unknown) ram=(?P<ram>\d+|unknown)"
    r"|ERROR (?P<error>read|write)"
    r")"
)
_CNT_RE = re.compile(rb"CNT (\d+)")
_HEXDUMP_RE = re.compile(r"^([0-9a-fA-F]{8}):\s+((?:[0-9a-fA-F]{2}\s+){1,16})")


class GuestTimeout(TimeoutError):
    """A wait on the guest's serial log ran out of time."""


@dataclass(frozen=True)
class DiskEvent:
    """One parsed ``DISK`` line."""

    dev: str
    #: "init", "ok", "MISMATCH" or "ERROR"
    status: str
    #: the CNT value found on the disk (ok, MISMATCH), None if none / n.a.
    disk: int | None = None
    #: the value RAM said it wrote last (ok, MISMATCH), None if n.a.
    ram: int | None = None
    #: "read" or "write" for ERROR
    error: str | None = None
    line: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------- serial log


def log_size(path: str | os.PathLike[str]) -> int:
    """Current size of the serial log in bytes (0 if it does not exist yet)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def read_lines(path: str | os.PathLike[str], offset: int = 0) -> list[str]:
    """The complete lines of the log from byte ``offset`` on, without line ends.

    A trailing partial line (still being written) is left out; a missing file
    reads as no lines.  An ``offset`` inside a line (taken while the guest
    was writing it) counts from the start of that line.
    """
    try:
        with open(path, "rb") as f:
            if offset > 0:
                back = max(0, offset - 256)
                f.seek(back)
                data = f.read()
                cut = data.rfind(b"\n", 0, offset - back)
                data = data[cut + 1 :] if cut >= 0 or back == 0 else data[offset - back :]
            else:
                data = f.read()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n")
    if end < 0:
        return []
    text = data[: end + 1].decode("ascii", errors="replace")
    return [line.rstrip("\r") for line in text.split("\n")[:-1]]


def _counters(lines: list[str]) -> list[int]:
    out: list[int] = []
    for line in lines:
        m = _COUNTER_RE.fullmatch(line)
        if m:
            out.append(int(m.group(1)))
    return out


def serial_counters(path: str | os.PathLike[str], offset: int = 0) -> list[int]:
    """All ``C n`` values, in the order printed."""
    return _counters(read_lines(path, offset))


def last_counter(path: str | os.PathLike[str], offset: int = 0) -> int | None:
    """The last ``C n`` value printed, None if none yet."""
    counters = serial_counters(path, offset)
    return counters[-1] if counters else None


def disk_lines(path: str | os.PathLike[str], offset: int = 0) -> list[str]:
    """The ``DISK ...`` lines, in order."""
    return [line for line in read_lines(path, offset) if line.startswith("DISK ")]


def _int_or_none(s: str | None) -> int | None:
    return int(s) if s is not None and s.isdigit() else None


def parse_disk_line(line: str) -> DiskEvent | None:
    """Parse one ``DISK`` line; None if it is not one."""
    m = _DISK_RE.fullmatch(line)
    if not m:
        return None
    dev = m.group("dev")
    if m.group("init"):
        return DiskEvent(dev, "init", line=line)
    if m.group("ok") is not None:
        value = int(m.group("ok"))
        return DiskEvent(dev, "ok", disk=value, ram=value, line=line)
    if m.group("error"):
        return DiskEvent(dev, "ERROR", error=m.group("error"), line=line)
    return DiskEvent(
        dev,
        "MISMATCH",
        disk=_int_or_none(m.group("disk")),
        ram=_int_or_none(m.group("ram")),
        line=line,
    )


def _disk_events(lines: list[str], dev: str | None = None) -> list[DiskEvent]:
    events: list[DiskEvent] = []
    for line in lines:
        event = parse_disk_line(line)
        if event is not None and (dev is None or event.dev == dev):
            events.append(event)
    return events


def disk_events(path: str | os.PathLike[str], offset: int = 0, dev: str | None = None) -> list[DiskEvent]:
    """The parsed ``DISK`` lines (of one device if ``dev`` is given)."""
    return _disk_events(read_lines(path, offset), dev)


def mismatches(path: str | os.PathLike[str], offset: int = 0, dev: str | None = None) -> list[DiskEvent]:
    """The ``DISK ... MISMATCH`` and ``DISK ... ERROR`` events."""
    return [e for e in disk_events(path, offset, dev) if e.status in ("MISMATCH", "ERROR")]


def is_ready(path: str | os.PathLike[str], offset: int = 0) -> bool:
    return "READY" in read_lines(path, offset)


# ---------------------------------------------------------------- waiting


def _tail(path: str | os.PathLike[str], offset: int, n: int = 8) -> str:
    lines = read_lines(path, offset)
    return " | ".join(lines[-n:]) if lines else "(nothing)"


def wait_for(
    path: str | os.PathLike[str],
    predicate: Callable[[list[str]], _T | None],
    timeout: float,
    *,
    offset: int = 0,
    interval: float = 0.05,
    what: str = "condition",
    alive: Callable[[], bool] | None = None,
) -> _T:
    """Poll the log until ``predicate(lines)`` returns something other than
    None or False, and return that.

    ``lines`` are the complete lines from ``offset`` on.  Raises GuestTimeout
    after ``timeout`` seconds, or at once if ``alive`` (e.g. a check that
    QEMU still runs) returns False; the message ends with the log's last
    lines.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate(read_lines(path, offset))
        if result is not None and result is not False:
            return result
        if alive is not None and not alive():
            # One last look: the line may have landed just before the exit.
            result = predicate(read_lines(path, offset))
            if result is not None and result is not False:
                return result
            raise GuestTimeout(f"{what}: the VM is gone; serial log: {_tail(path, offset)}")
        if time.monotonic() >= deadline:
            raise GuestTimeout(f"{what}: not seen within {timeout:.1f} s; serial log: {_tail(path, offset)}")
        time.sleep(interval)


def wait_ready(
    path: str | os.PathLike[str],
    timeout: float = 20.0,
    *,
    offset: int = 0,
    alive: Callable[[], bool] | None = None,
) -> float:
    """Wait for ``READY``; returns the seconds waited."""
    start = time.monotonic()
    wait_for(
        path,
        lambda lines: "READY" in lines,
        timeout,
        offset=offset,
        what="guest READY",
        alive=alive,
    )
    return time.monotonic() - start


def wait_counter_above(
    path: str | os.PathLike[str],
    value: int,
    timeout: float = 10.0,
    *,
    offset: int = 0,
    alive: Callable[[], bool] | None = None,
) -> int:
    """Wait until the guest prints a counter greater than ``value``; returns
    the last counter printed by then."""

    def check(lines: list[str]) -> int | None:
        counters = _counters(lines)
        if counters and counters[-1] > value:
            return counters[-1]
        return None

    return wait_for(path, check, timeout, offset=offset, what=f"counter above {value}", alive=alive)


def wait_disk_ok(
    path: str | os.PathLike[str],
    dev: str = "vda",
    timeout: float = 10.0,
    *,
    count: int = 1,
    offset: int = 0,
    alive: Callable[[], bool] | None = None,
) -> list[DiskEvent]:
    """Wait until ``count`` ``DISK <dev> ok`` lines were printed; returns all
    of that device's events up to then (check them for MISMATCH yourself)."""

    def check(lines: list[str]) -> list[DiskEvent] | None:
        events = _disk_events(lines, dev)
        return events if sum(1 for e in events if e.ok) >= count else None

    return wait_for(path, check, timeout, offset=offset, what=f"{count} x 'DISK {dev} ok'", alive=alive)


# ---------------------------------------------------------------- disk images


def parse_cnt(sector: bytes) -> int | None:
    """The m of a ``CNT m`` first line in a sector, None if there is none."""
    first = sector.split(b"\n", 1)[0].rstrip(b"\0")
    m = _CNT_RE.fullmatch(first)
    return int(m.group(1)) if m else None


def _parse_hexdump(text: str, length: int) -> bytes:
    out = bytearray(length)
    seen = 0
    for line in text.splitlines():
        m = _HEXDUMP_RE.match(line)
        if not m:
            continue
        base = int(m.group(1), 16)
        for i, tok in enumerate(m.group(2).split()):
            if base + i < length:
                out[base + i] = int(tok, 16)
                seen = max(seen, base + i + 1)
    if seen < length:
        raise ValueError(f"qemu-io dumped {seen} of {length} bytes")
    return bytes(out)


def read_sector0(image: str | os.PathLike[str], fmt: str, timeout: float = 10.0) -> bytes:
    """The first 512 bytes of the guest-visible disk in an image, also while
    QEMU holds the image (raw: read directly; other formats: ``qemu-io -U``,
    which follows backing chains)."""
    if fmt == "raw":
        with open(image, "rb") as f:
            data = f.read(SECTOR)
        return data.ljust(SECTOR, b"\0")
    proc = subprocess.run(
        ["qemu-io", "-U", "-r", "-f", fmt, "-c", f"read -v 0 {SECTOR}", os.fspath(image)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-io on {image} failed ({proc.returncode}): {proc.stderr.strip()}")
    return _parse_hexdump(proc.stdout, SECTOR)


def disk_counter(image: str | os.PathLike[str], fmt: str, timeout: float = 10.0) -> int | None:
    """The ``CNT m`` value in sector 0 of a qcow2 (or other qemu format) or
    raw image; None if the sector holds none."""
    return parse_cnt(read_sector0(image, fmt, timeout))


# ---------------------------------------------------------------- the guest


_guest_cache: tuple[Path, Path] | None = None


def guest_paths(timeout: float = 900.0, *, rebuild_check: bool = False) -> tuple[Path, Path]:
    """Build (or find built) the test guest with guest/build.sh; returns
    (kernel, ramdisk).

    The script's own up-to-date check is cheap, but within one process its
    answer is cached unless ``rebuild_check`` is set.
    """
    global _guest_cache
    if _guest_cache is not None and not rebuild_check:
        return _guest_cache
    proc = subprocess.run(
        ["bash", os.fspath(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{tail}")
    found: dict[str, Path] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("kernel", "ramdisk"):
            found[key] = Path(value)
    try:
        kernel, ramdisk = found["kernel"], found["ramdisk"]
    except KeyError:
        raise RuntimeError(f"{BUILD_SCRIPT} printed no kernel=/ramdisk= lines") from None
    for p in (kernel, ramdisk):
        if not p.is_file():
            raise RuntimeError(f"{BUILD_SCRIPT} reported {p}, which does not exist")
    _guest_cache = (kernel, ramdisk)
    return _guest_cache


DEBIAN_BUILD_SCRIPT = REPO_ROOT / "guest" / "debian" / "build.sh"


def debian_disk(timeout: float = 900.0) -> Path:
    """Build (or find built) the Debian test guest with guest/debian/build.sh;
    returns its qcow2 disk (tests run on overlays of it, never on it)."""
    proc = subprocess.run(["bash", os.fspath(DEBIAN_BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"{DEBIAN_BUILD_SCRIPT} failed ({proc.returncode}):\n{tail}")
    for line in proc.stdout.splitlines():
        if line.startswith("disk="):
            return Path(line.removeprefix("disk="))
    raise RuntimeError(f"{DEBIAN_BUILD_SCRIPT} printed no disk= line")
