"""The Xen lab's self-test, run inside dom0 by /init (lab/xen/dom0-init).

It starts domsnapd with the xen driver, creates small PV, PVH and HVM domUs
(the test guest of guest/build.sh, its disk as /dev/xvda) from xl.cfg files,
and takes and reverts domain snapshots with the domsnap CLI: non-live on
all three, live on PVH and HVM (a live PV snapshot must be refused: Debian's
Xen has no shadow paging), on qcow2 (qdisk) and LVM (blkback; thick and
thin) disks.
Revert fidelity is proved as the QEMU integration tests prove it: the guest
counts in RAM (`C n` every 100 ms on its console) and checks its disk every
10 ticks (`DISK xvda ok m`); after a revert its first counter must continue
from the snapshot's instant and every disk check must say ok.

Output on the console (hvc0, relayed by Xen to the serial line), one line each:
  LABSTEP <test> <step> <seconds> rc=<rc>          every command
  LABTIME <test> <key>=<value> ...                 measurements
  LABRESULT <test> PASS|FAIL|SKIP <detail>         one per test
  LABFILE <name> <base64 chunk>                    captured real xl output
  LABFILE-END <name> <bytes>
  LABSUMMARY passed=<n> failed=<n> skipped=<n>
Standard library only (runs under the root's /opt/domsnap/bin/python).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAB = Path("/var/lib/lab")
SOCK = "unix:/run/domsnap/lab.sock"
CONSOLE_DIR = Path("/var/log/xen/console")
DOMU_KERNEL = "/lab/domu/vmlinuz"
DOMU_RAMDISK = "/lab/domu/initrd.img"
DOMSNAP = "/opt/domsnap/bin/domsnap"
DOMSNAPD = "/opt/domsnap/bin/domsnapd"
CHECK_EVERY = 10
T0 = time.monotonic()

_COUNTER = re.compile(r"C (\d+)")
_DISK = re.compile(r"DISK (xvd[a-z]+) (init|ok (\d+)|MISMATCH .*|ERROR .*)")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    say(f"# [{time.monotonic() - T0:7.1f}] {text}")


class StepFailed(Exception):
    pass


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float


def run(test: str, step: str, argv: Sequence[str], timeout: float, *, check: bool = True,
        env: dict[str, str] | None = None) -> Result:
    t = time.monotonic()
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                           stdin=subprocess.DEVNULL, env=env)
        res = Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t)
    except subprocess.TimeoutExpired as e:
        res = Result(124, str(e.stdout or ""), str(e.stderr or ""), time.monotonic() - t)
    say(f"LABSTEP {test} {step} {res.seconds:.2f} rc={res.rc}")
    if check and res.rc != 0:
        err = " | ".join((res.err or res.out).strip().splitlines()[-6:])
        raise StepFailed(f"{step}: {' '.join(argv[:4])}... exited {res.rc}: {err}")
    return res


def emit_file(name: str, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    enc = base64.b64encode(raw).decode()
    for i in range(0, len(enc), 96):
        say(f"LABFILE {name} {enc[i:i + 96]}")
    say(f"LABFILE-END {name} {len(raw)}")


# ----------------------------------------------------------------- consoles


@dataclass
class Item:
    t: float
    line: str
    counter: int | None = None
    dev: str | None = None
    status: str | None = None
    value: int | None = None


def parse(t: float, line: str) -> Item:
    m = _COUNTER.fullmatch(line)
    if m:
        return Item(t, line, counter=int(m[1]))
    m = _DISK.fullmatch(line)
    if m:
        status = m[2].split()[0]
        return Item(t, line, dev=m[1], status=status, value=int(m[3]) if m[3] else None)
    return Item(t, line)


class Console:
    """Tails /var/log/xen/console/guest-<name>.log, stamping each complete line
    with the monotonic time it was first seen (polled every 10 ms)."""

    def __init__(self, name: str) -> None:
        self.path = CONSOLE_DIR / f"guest-{name}.log"
        self.items: list[Item] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pos = 0
        self._partial = b""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                size = self.path.stat().st_size
                if size < self._pos:  # truncated: a new log
                    self._pos, self._partial = 0, b""
                if size > self._pos:
                    with open(self.path, "rb") as f:
                        f.seek(self._pos)
                        data = f.read()
                    self._pos += len(data)
                    now = time.monotonic()
                    data = self._partial + data
                    lines = data.split(b"\n")
                    self._partial = lines.pop()
                    with self._lock:
                        for raw in lines:
                            self.items.append(parse(now, raw.decode("ascii", "replace").strip("\r\0 ")))
            except FileNotFoundError:
                pass
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def snapshot(self, start: int = 0) -> list[Item]:
        with self._lock:
            return list(self.items[start:])

    def mark(self) -> tuple[int, int]:
        with self._lock:
            counters = [it.counter for it in self.items if it.counter is not None]
            if not counters:
                raise StepFailed("the guest printed no counter yet")
            return len(self.items), counters[-1]

    def counter(self) -> int:
        return self.mark()[1]

    def wait(self, what: str, pred: Callable[[list[Item]], Any], timeout: float, start: int = 0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = pred(self.snapshot(start))
            if got is not None and got is not False:
                return got
            if time.monotonic() > deadline:
                tail = " | ".join(it.line for it in self.snapshot()[-6:]) or "(nothing)"
                raise StepFailed(f"{what}: not seen within {timeout:.0f} s; console: {tail}")
            time.sleep(0.05)

    def wait_counter_above(self, value: int, timeout: float) -> int:
        def pred(items: list[Item]) -> int | None:
            cs = [it.counter for it in items if it.counter is not None]
            return cs[-1] if cs and cs[-1] > value else None
        return int(self.wait(f"counter above {value}", pred, timeout))

    def wait_tick(self, timeout: float = 30.0) -> int:
        """Wait for a counter just after a disk check (n % 10 == 1)."""
        start = len(self.snapshot())

        def pred(items: list[Item]) -> int | None:
            for it in items:
                if it.counter is not None and it.counter % CHECK_EVERY == 1:
                    return it.counter
            return None
        return int(self.wait("a counter ending in 1", pred, timeout, start))

    def bad_lines(self, start: int = 0) -> list[str]:
        return [it.line for it in self.snapshot(start) if it.status in ("MISMATCH", "ERROR")
                or it.line == "NODISK"]


def pause_of(items: list[Item], t_from: float, t_to: float) -> float:
    """The longest gap between two consecutive counter lines seen in [t_from, t_to]
    plus one line's worth around it: the guest's pause as the console saw it."""
    cs = [it for it in items if it.counter is not None and t_from - 1 <= it.t <= t_to + 1]
    gaps = [b.t - a.t for a, b in itertools.pairwise(cs) if b.counter == (a.counter or 0) + 1]
    return max(gaps) if gaps else float("nan")


# ----------------------------------------------------------------- the lab


def domsnap(test: str, step: str, *args: str, timeout: float = 300.0, check: bool = True) -> Result:
    # The CLI gives a short call 30 s; the step's own timeout bounds it here
    # (a loaded host's TCG can take longer for an `xl create`).
    return run(test, step, [DOMSNAP, "-H", SOCK, "--timeout", f"{timeout - 5:g}", *args], timeout, check=check)


def json_find(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if key in value:
            return value[key]
        for v in value.values():
            found = json_find(v, key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for v in value:
            found = json_find(v, key)
            if found is not None:
                return found
    return None


def last_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


@dataclass
class Guest:
    name: str
    type: str
    disk: str  # target path
    fmt: str
    console: Console = field(init=False)
    test: str = field(init=False, default="")

    def cfg(self) -> Path:
        lines = [
            f'name = "{self.name}"', f'type = "{self.type}"', "memory = 128", "vcpus = 1",
            f'kernel = "{DOMU_KERNEL}"', f'ramdisk = "{DOMU_RAMDISK}"',
            'extra = "console=hvc0 loglevel=2{}"'.format(" iomem=relaxed nopat" if self.type == "hvm" else ""),
            'on_crash = "preserve"',
            f"disk = [ 'format={self.fmt},vdev=xvda,access=rw,target={self.disk}' ]",
        ]
        if self.type in ("pvh", "hvm"):
            lines.append('tsc_mode = "native"')
        if self.type == "hvm":
            # hvmloader + SeaBIOS, the kernel loaded by QEMU (direct kernel
            # boot), no display; the ID libxl draws is what lab-genid prints.
            lines += ['vga = "none"', "vnc = 0", 'serial = "none"', 'ms_vm_genid = "generate"']
        GUESTS[self.name] = self
        path = LAB / f"{self.name}.cfg"
        path.write_text("\n".join(lines) + "\n")
        return path


GUESTS: dict[str, Guest] = {}
GUEST_DIED = ("Kernel panic", "BUG: ", "Oops: ")


def boot_once(test: str, g: Guest) -> float:
    g.console = Console(g.name)
    g.test = test
    t = time.monotonic()
    domsnap(test, "create", "create", str(g.cfg()), timeout=240)

    def ready(items: list[Item]) -> bool:
        for it in items:
            if it.line == "READY":
                return True
            if any(mark in it.line for mark in GUEST_DIED):
                raise GuestDied(f"the guest's kernel died booting: {it.line}")
        return False
    # An HVM guest boots through hvmloader and SeaBIOS, then QEMU loads its
    # kernel: 176 s to READY on a loaded host (PV and PVH: under 60 s).
    g.console.wait("READY", ready, 420 if g.type == "hvm" else 180)
    boot_s = time.monotonic() - t
    g.console.wait("DISK xvda ok", lambda items: any(it.status == "ok" for it in items), 60)
    if g.console.bad_lines():
        raise StepFailed(f"the guest reports {g.console.bad_lines()[:3]} before any snapshot")
    say(f"LABTIME {test} boot_to_ready_s={boot_s:.2f}")
    return boot_s


class GuestDied(StepFailed):
    pass


def boot(test: str, g: Guest) -> float:
    """Boot the domU; once more if its kernel died on the way: a safety net
    for the emulator, not for domsnap (the boot comes before domsnap does
    anything but `xl create`; what the lab tests starts after it). While TCG
    offered AVX, a PVH domU's init died of #UD about once in 20 boots (see
    run.py's CPU). Each retry is reported (LABINFO boot_retry) with the dead
    boot's console."""
    try:
        return boot_once(test, g)
    except GuestDied as e:
        say(f"LABINFO boot_retry={test}")
        note(f"{test}: {e}; booting it again")
        emit_file(f"{test}-died-console.log", g.console.path.read_bytes()[-20000:])
        destroy(test, g)
        g.console.path.unlink(missing_ok=True)
        return boot_once(test, g)


@dataclass
class Taken:
    c_before: int
    c_after: int
    result: Any
    seconds: float
    pause: float


def take(test: str, g: Guest, snap: str, *, live: bool) -> Taken:
    g.console.wait_tick()
    c_before = g.console.counter()
    t = time.monotonic()
    args = ["snapshot-create", g.name, "--name", snap] + (["--live"] if live else [])
    res = domsnap(test, "snapshot-create" + ("-live" if live else ""), *args, timeout=420)
    t_end = time.monotonic()
    c_after = g.console.counter()
    info = domsnap(test, "snapshot-info", "--json", "snapshot-info", g.name, snap, timeout=60)
    result = last_json(info.out)
    # The guest must run on after a create.
    c_run = g.console.wait_counter_above(c_after + 5, 30)
    pause = pause_of(g.console.snapshot(), t, t_end)
    mem = json_find(result, "size_bytes") or 0
    down = json_find(result, "downtime_seconds")
    disk = f" disk_bytes={disk_bytes(g.disk)}" if g.disk.startswith("/dev/") else ""
    say(f"LABTIME {test} create_s={res.seconds:.2f} memory_bytes={mem}{disk} "
        f"save_MBps={mem / 1e6 / res.seconds:.1f} agent_downtime_s={down} console_pause_s={pause:.2f} "
        f"c_before={c_before} c_after={c_after} c_run={c_run}")
    return Taken(c_before, c_after, result, res.seconds, pause)


def disk_bytes(device: str) -> int:
    """A block device's size: a blkback (LVM) disk is snapshotted in the guest's pause, which the lab
    sets against the disk's size."""
    return int(run("probe", "blockdev-size", ["blockdev", "--getsize64", device], 30).out.strip())


def expected_disk_values(first: int) -> set[int]:
    instant = first - 1
    base = instant - instant % CHECK_EVERY
    return {base, base - CHECK_EVERY} if instant % CHECK_EVERY == 0 else {base}


def restored_from(seen: list[Item], c_pre: int) -> int | None:
    prev = c_pre
    for i, it in enumerate(seen):
        if it.counter is not None:
            if it.counter != prev + 1:
                return i
            prev = it.counter
        elif it.status is not None and not (
                prev % CHECK_EVERY == 0 and it.status == "ok" and it.value == prev - CHECK_EVERY):
            return i
        # other lines (kernel messages) are ignored
    return None


def revert(test: str, g: Guest, snap: str, taken: Taken, *, mem_bytes: int) -> str:
    # Let the guest get well past the snapshot, in RAM and on disk.
    g.console.wait_counter_above(taken.c_after + 30, 60)
    start, c_pre = g.console.mark()
    res = domsnap(test, "snapshot-revert", "snapshot-revert", g.name, snap, timeout=420)

    def pred(items: list[Item]) -> tuple[list[Item], list[Item]] | None:
        i = restored_from(items, c_pre)
        if i is None:
            return None
        after = items[i:]
        if not any(it.counter is not None for it in after):
            return None
        if sum(1 for it in after if it.dev == "xvda" and it.status == "ok") < 2 and \
                not any(it.status in ("MISMATCH", "ERROR") for it in after):
            return None
        return items[:i], after

    _, after = g.console.wait("the restored guest's counter and 2 disk checks", pred, 120, start)
    counters = [it.counter for it in after if it.counter is not None]
    first = counters[0]
    say(f"LABTIME {test} revert_s={res.seconds:.2f} restore_MBps={mem_bytes / 1e6 / res.seconds:.1f} "
        f"first_after_revert={first} snapshot_between={taken.c_before}..{taken.c_after}")
    problems = []
    if not taken.c_before + 1 <= first <= taken.c_after + 1:
        problems.append(f"first counter after revert {first} not in {taken.c_before + 1}..{taken.c_after + 1}")
    if counters != list(range(first, first + len(counters))):
        problems.append(f"counters not consecutive after revert: {counters[:12]}")
    bad = [it.line for it in after if it.status in ("MISMATCH", "ERROR")]
    if bad:
        problems.append(f"disk check after revert: {bad[:3]}")
    oks = [it.value for it in after if it.dev == "xvda" and it.status == "ok"]
    if oks and oks[0] not in expected_disk_values(first):
        problems.append(f"xvda held {oks[0]} after the revert; expected {sorted(expected_disk_values(first))}")
    if problems:
        raise StepFailed("; ".join(problems))
    return f"first={first} in {taken.c_before + 1}..{taken.c_after + 1} disk_ok={oks[0]}"


def destroy(test: str, g: Guest) -> None:
    """The check's domain gone, and its snapshots with it: dom0's root is a
    tmpfs in its 2 GiB, where each snapshot's memory image (~150 MiB) stays
    until deleted; kept, a dozen checks' images had the kernel kill domsnapd
    for memory in the last check. Deleted through the agent, as a user would."""
    listed = domsnap(test, "snapshot-list", "--json", "snapshot-list", g.name, "--roots", timeout=60, check=False)
    for snap in json.loads(listed.out) if listed.rc == 0 and listed.out.strip() else []:
        domsnap(test, "snapshot-delete", "snapshot-delete", g.name, snap["name"], "--children", timeout=120,
                check=False)
    domsnap(test, "destroy", "destroy", g.name, timeout=120, check=False)
    if hasattr(g, "console"):
        g.console.stop()


# ----------------------------------------------------------------- tests


RESULTS: dict[str, str] = {}


def result(test: str, status: str, detail: str) -> None:
    RESULTS[test] = status
    detail = " ".join(detail.split())[:600]
    say(f"LABRESULT {test} {status} {detail}")


def failed_with_evidence(test: str, g: Guest, e: Exception) -> None:
    """A check's failure, with its traceback and what the guest and Xen left to read."""
    note(traceback.format_exc().replace("\n", " / ")[-800:])
    result(test, "FAIL", str(e))
    evidence(test, g)


def evidence(test: str, g: Guest) -> None:
    """After a failure: where the guest stopped, as its console, its device
    model and Xen saw it (an HVM guest has firmware and QEMU on its way)."""
    if hasattr(g, "console") and g.console.path.exists():
        emit_file(f"{test}-console.log", g.console.path.read_bytes()[-20000:])
    dm = Path(f"/var/log/xen/qemu-dm-{g.name}.log")
    if dm.exists():
        emit_file(f"{test}-qemu-dm.log", dm.read_bytes()[-20000:])
    emit_file(f"{test}-xl-dmesg.txt", run(test, "xl-dmesg", ["xl", "dmesg"], 30, check=False).out[-20000:])


def snapshot_test(test: str, g: Guest, *, live: bool) -> None:
    try:
        boot(test, g)
        taken = take(test, g, "s1", live=live)
        mem = int(json_find(taken.result, "size_bytes") or 0)
        detail = revert(test, g, "s1", taken, mem_bytes=mem)
        # The same snapshot again: it stays revertable.
        taken2 = Taken(taken.c_before, taken.c_after, taken.result, taken.seconds, taken.pause)
        detail2 = revert(test + "-again", g, "s1", taken2, mem_bytes=mem)
        result(test, "PASS", f"{detail}; again: {detail2}; create={taken.seconds:.1f}s "
                             f"pause={taken.pause:.2f}s")
    except Exception as e:
        failed_with_evidence(test, g, e)
    finally:
        destroy(test, g)


def live_refused(test: str, g: Guest, why: str) -> None:
    """A live snapshot the driver must refuse, naming `why`, the guest running on."""
    try:
        boot(test, g)
        c = g.console.counter()
        res = domsnap(test, "snapshot-create-live", "snapshot-create", g.name, "--name", "live1", "--live",
                      timeout=120, check=False)
        g.console.wait_counter_above(c + 20, 30)
        say(f"LABTIME {test} refusal_s={res.seconds:.2f}")
        msg = " ".join(res.err.split())
        if res.rc == 0:
            result(test, "FAIL", f"a live snapshot that cannot be taken ({why}) succeeded?")
        elif why not in msg:
            result(test, "FAIL", f"refused, but without naming {why!r}: {msg}")
        else:
            result(test, "PASS", f"refused in {res.seconds:.1f}s, guest still running: {msg}")
    except Exception as e:
        result(test, "FAIL", str(e))
    finally:
        destroy(test, g)


_GENID = re.compile(r"GENID ([0-9A-Fa-f]{32}|none.*)")


def genid_after(g: Guest, t: float, timeout: float = 30) -> str:
    """The first VM generation ID the guest printed after monotonic time `t` (lab-genid: every 2 s)."""
    def pred(items: list[Item]) -> str | None:
        for it in items:
            m = _GENID.fullmatch(it.line)
            if m and it.t > t:
                return m[1].lower()
        return None
    got = str(g.console.wait(f"a GENID line after {t - T0:.1f} s", pred, timeout))
    if got.startswith("none"):
        raise StepFailed(f"the guest reads no VM generation ID: GENID {got}")
    return got


def libxl_genid(test: str, name: str) -> str:
    """The ID libxl holds for the domain (`xl list -l`: b_info, type.hvm, ms_vm_genid: 16 byte values)."""
    out = run(test, "xl-list-l-genid", ["xl", "list", "-l", name], 30).out
    value = json_find(json.loads(out), "ms_vm_genid")
    return bytes(value).hex() if isinstance(value, list) else f"none:{value!r}"


def hvm_genid(test: str, g: Guest) -> None:
    """The VM generation ID as the HVM guest reads it: the one libxl gave,
    unchanged by a snapshot and by a plain `xl save` + `xl restore`, new
    after a domsnap revert (a revert forks the VM's history)."""
    xl = "/usr/sbin/xl"
    try:
        boot(test, g)
        at_boot = genid_after(g, 0)
        given = libxl_genid(test, g.name)
        if at_boot != given:
            raise StepFailed(f"the guest reads {at_boot}, libxl gave it {given}")
        taken = take(test, g, "s1", live=False)
        at_snapshot = genid_after(g, time.monotonic())
        if at_snapshot != at_boot:
            raise StepFailed(f"the ID changed from {at_boot} to {at_snapshot} with a snapshot")
        mem = int(json_find(taken.result, "size_bytes") or 0)
        revert(test, g, "s1", taken, mem_bytes=mem)
        after_revert = genid_after(g, time.monotonic())
        if after_revert == at_snapshot:
            raise StepFailed(f"the guest still reads {after_revert} after the revert")
        if after_revert != libxl_genid(test, g.name):
            raise StepFailed(f"after the revert the guest reads {after_revert}, libxl holds "
                             f"{libxl_genid(test, g.name)}")
        img = LAB / f"{g.name}.plain.save"
        run(test, "xl-save", [xl, "save", g.name, str(img)], 300)
        run(test, "xl-restore", [xl, "restore", str(img)], 300)
        img.unlink()
        after_restore = genid_after(g, time.monotonic())
        if after_restore != after_revert:
            raise StepFailed(f"a plain xl save + xl restore changed the ID from {after_revert} to {after_restore}")
        c = g.console.wait_counter_above(g.console.counter(), 30)
        say(f"LABINFO genid_boot={at_boot} genid_reverted={after_revert}")
        result(test, "PASS", f"boot and snapshot {at_boot}; after the revert {after_revert} (libxl's); "
                             f"after xl save + xl restore still {after_restore}; counting at {c}")
    except Exception as e:
        failed_with_evidence(test, g, e)
    finally:
        destroy(test, g)


# ----------------------------------------------------------------- cost

_COST = re.compile(r"cost of operation (\S+): (\w+) (\S+) (ok|failed) wall=([\d.]+) commands=([\d.]+) n=(\d+)(.*)")
# Where the agent's own time went: before each command it waited on, and after the last.
_OWN = re.compile(r"own time of operation (\S+): (.*)")
# What the agent asks xl about domains: the overhead the cost measures (the
# rest is the tools' work: xl save/restore/destroy/unpause/migrate, LVM, QMP).
QUERIES = ("xl_list", "xl_info")
COST_TARGET = 1.1


COSTS: dict[str, list[float]] = {}
_cost_read = 0


def cost_lines() -> None:
    """One LABTIME per operation the agent logged a cost for since the last
    call (after each check, so a lab cut short keeps them): the agent's wall
    time against the tools' work it waited on."""
    global _cost_read
    with open("/var/log/domsnapd.log", encoding="utf-8", errors="replace") as f:
        f.seek(_cost_read)
        text = f.read()
        _cost_read = f.tell()
    own = {m[1]: m[2] for m in map(_OWN.search, text.splitlines()) if m is not None}
    for line in text.splitlines():
        m = _COST.search(line)
        if m is None:
            continue
        kind, domain, outcome, wall = m[2], m[3], m[4], float(m[5])
        work = queries = 0.0
        n_queries = 0
        for item in m[8].split():
            what, _, secs = item.rpartition("=")
            if what in QUERIES:
                queries += float(secs)
                n_queries += 1
            else:
                work += float(secs)
        ratio = wall / work if work else float("inf")
        # A refused or failed operation did not do the work the tools' time
        # stands for: reported, not counted in the summary.
        if outcome == "ok":
            COSTS.setdefault(kind, []).append(ratio)
        g = GUESTS.get(domain)
        say(f"LABTIME cost:{g.test if g else domain}:{kind}:{len(COSTS.get(kind, []))} wall_s={wall:.2f} "
            f"tools_s={work:.2f} xl_queries={n_queries} xl_queries_s={queries:.2f} ratio={ratio:.3f} {outcome}")
        if m[1] in own:
            say(f"LABTIME cost-own:{g.test if g else domain}:{kind}:{len(COSTS.get(kind, []))} {own[m[1]]}")


def cost_summary() -> str:
    """Per kind of operation, the median and worst ratio (LABTIME), and the worst for LABSUMMARY."""
    parts = []
    for kind, ratios in sorted(COSTS.items()):
        ratios = sorted(ratios)
        say(f"LABTIME cost-{kind} n={len(ratios)} ratio_median={ratios[len(ratios) // 2]:.3f} "
            f"ratio_max={ratios[-1]:.3f} target={COST_TARGET}")
        parts.append(f"{kind}_ratio_max={ratios[-1]:.3f}")
    return " ".join(parts)


def restore_through_fifo(test: str, img: Path) -> Result:
    """`xl restore -p` reading the agent's FIFO (xen_feed), its header
    re-written as the driver writes it for a fresh VM generation ID: proves
    real xl restores from that FIFO (the one import of the project here)."""
    import asyncio

    from domsnap.agent.drivers import xen_feed, xen_stream

    header = xen_stream.read_header(img)

    async def go() -> Result:
        async with xen_feed.fifo_source(img, header.with_config(header.config()), header.stream_offset,
                                        LAB / "fifo") as fifo:
            return await asyncio.to_thread(run, test, "xl-restore-p-fifo", ["/usr/sbin/xl", "-v", "restore", "-p",
                                                                         str(fifo)], 300)
    return asyncio.run(go())


def capture(test: str, g: Guest) -> None:
    """Real xl outputs for tests/data/xen-4.17 (the driver's unit tests)."""
    try:
        boot(test, g)
        xl = "/usr/sbin/xl"
        emit_file("xl-info.txt", run(test, "xl-info", [xl, "info"], 30).out)
        emit_file("xl-list.txt", run(test, "xl-list", [xl, "list"], 30).out)
        emit_file(f"xl-list-l-{g.type}.json", run(test, "xl-list-l", [xl, "list", "-l", g.name], 30).out)
        emit_file("xl-list-l-all.json", run(test, "xl-list-l-all", [xl, "list", "-l"], 30).out)
        probe_qemu(test, g)
        run(test, "xl-pause", [xl, "pause", g.name], 30)
        emit_file(f"xl-list-{g.type}-paused.txt", run(test, "xl-list", [xl, "list", g.name], 30).out)
        run(test, "xl-unpause", [xl, "unpause", g.name], 30)
        nf = run(test, "xl-list-notfound", [xl, "list", "nosuchdomain"], 30, check=False)
        emit_file("xl-list-notfound-stderr.txt", nf.err)
        nf = run(test, "xl-list-notfound-domid", [xl, "list", "4242"], 30, check=False)
        emit_file("xl-list-notfound-domid-stderr.txt", nf.err)
        img = LAB / f"{g.name}.save"
        sv = run(test, "xl-save-p", [xl, "save", "-p", g.name, str(img)], 300)
        emit_file(f"xl-save-{g.type}-stderr.txt", sv.err)
        emit_file(f"xl-list-{g.type}-after-save-p.txt", run(test, "xl-list", [xl, "list", g.name], 30).out)
        size = img.stat().st_size
        say(f"LABTIME {test} xl_save_s={sv.seconds:.2f} bytes={size} MBps={size / 1e6 / sv.seconds:.1f}")
        run(test, "xl-destroy", [xl, "destroy", g.name], 60)
        rs = restore_through_fifo(test, img)
        emit_file(f"xl-v-restore-{g.type}-stderr.txt", rs.err)
        say(f"LABTIME {test} xl_restore_s={rs.seconds:.2f} MBps={size / 1e6 / rs.seconds:.1f}")
        emit_file(f"xl-list-{g.type}-restored-paused.txt", run(test, "xl-list", [xl, "list", g.name], 30).out)
        behind_the_agents_back(test, g)
        run(test, "xl-unpause", [xl, "unpause", g.name], 30)
        img.unlink()
        c = g.console.wait_counter_above(g.console.counter(), 30)
        result(test, "PASS", f"captured; guest counting again at {c}")
    except Exception as e:
        result(test, "FAIL", str(e))
    finally:
        destroy(test, g)


def behind_the_agents_back(test: str, g: Guest) -> None:
    """The agent keeps what it learnt of a domain (xen.py: libxl's answers,
    the config while libxl's stored copy of it stays): this domain, which
    it created, was destroyed and restored (another domid, paused) by xl
    alone; the agent must see the new one as xl does."""
    seen = last_json(domsnap(test, "list-after-xl-restore", "--json", "list", g.name, timeout=60).out)
    domid, state = json_find(seen, "domid"), str(json_find(seen, "state"))
    if domid != domid_of(g.name) or state != "paused":
        raise StepFailed(f"after xl destroy + xl restore -p behind its back the agent sees {g.name} as id {domid}, "
                         f"{state}; xl says id {domid_of(g.name)}, paused")
    say(f"LABINFO {test}_behind_the_agents_back=seen(id {domid}, {state})")


def qmp(socket_path: str, *commands: str) -> list[Any]:
    """Run QMP commands (no arguments) on a device model's socket; their answers."""
    import socket as _socket
    answers: list[Any] = []
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as sk:
        sk.settimeout(20)
        sk.connect(socket_path)
        f = sk.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", *commands):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    break
            if cmd != "qmp_capabilities":
                answers.append(msg)
    return answers


def domid_of(name: str) -> int:
    out = run("probe", "xl-domid", ["xl", "domid", name], 30).out
    return int(out.strip())


def probe_qemu(test: str, g: Guest) -> None:
    """What qdisk's QEMU calls the disk's node, and whether qemu-img can read
    the header of an image that QEMU holds."""
    try:
        sock = f"/var/run/xen/qmp-libxl-{domid_of(g.name)}"
        nodes = qmp(sock, "query-named-block-nodes")
        emit_file(f"qmp-query-named-block-nodes-{g.type}.json", json.dumps(nodes, indent=1))
        names = [n.get("node-name") for n in nodes[0].get("return", [])]
        say(f"LABINFO qdisk_nodes={','.join(str(n) for n in names)}")
    except Exception as e:
        say(f"LABINFO qdisk_nodes=error:{' '.join(str(e).split())[:200]}")
    for i in range(3):
        r = run(test, f"qemu-img-info-U-{i}", ["qemu-img", "info", "-U", "--output=json", g.disk], 60, check=False)
        if r.rc != 0:
            say(f"LABINFO qemu_img_info_rc={r.rc} stderr={' '.join(r.err.split())[:200]}")
    r = run(test, "qemu-img-info-idle", ["qemu-img", "info", "-U", "--output=json", str(LAB / "pvhq.qcow2")], 60,
            check=False)
    say(f"LABINFO qemu_img_info_idle_rc={r.rc} stderr={' '.join(r.err.split())[:200]}")


def capture_pvh(test: str, g: Guest) -> None:
    """A PVH domain: its xl list -l, xl -v save, and a live save through
    domsnap's own migration sink driven by hand (xl's whole stderr kept)."""
    import socket as _socket
    xl = "/usr/sbin/xl"
    try:
        boot(test, g)
        emit_file(f"xl-list-l-{g.type}.json", run(test, "xl-list-l", [xl, "list", "-l", g.name], 30).out)
        ctl_path = str(LAB / "sink.ctl")
        out = LAB / f"{g.name}.live"
        with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as srv:
            srv.bind(ctl_path)
            srv.listen(1)
            rune = f"exec /opt/domsnap/bin/python -m domsnap.agent.drivers.xen_sink {out} {ctl_path}"
            t = time.monotonic()
            proc = subprocess.Popen([xl, "-v", "migrate", "-s", "", g.name, rune], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            srv.settimeout(60)
            msgs: list[str] = []
            try:
                conn, _ = srv.accept()
                conn.settimeout(300)
                buf = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        msgs.append(line.decode())
                        if line.startswith(b"complete"):
                            say(f"LABTIME {test} live_stream_s={time.monotonic() - t:.2f} {line.decode()}")
                            conn.sendall(b"release\n")
                conn.close()
            except OSError as e:
                msgs.append(f"control: {e}")
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            say(f"LABSTEP {test} xl-migrate-sink {time.monotonic() - t:.2f} rc={proc.returncode}")
        emit_file(f"xl-migrate-live-{g.type}-stderr.txt", err)
        say(f"LABINFO sink_messages={'|'.join(m for m in msgs if not m.startswith('progress'))[:300]}")
        c = g.console.wait_counter_above(g.console.counter(), 30)
        img = LAB / f"{g.name}.save"
        sv = run(test, "xl-save-p", [xl, "-v", "save", "-p", g.name, str(img)], 300, check=False)
        emit_file(f"xl-save-{g.type}-stderr.txt", sv.err)
        if sv.rc == 0:
            size = img.stat().st_size
            say(f"LABTIME {test} xl_save_s={sv.seconds:.2f} bytes={size} MBps={size / 1e6 / sv.seconds:.1f}")
            run(test, "xl-unpause", [xl, "unpause", g.name], 30)
            img.unlink()
        ok = any(m.startswith("complete") for m in msgs)
        result(test, "PASS" if ok and sv.rc == 0 else "FAIL",
               f"live via sink: {'complete' if ok else 'FAILED'} (xl rc {proc.returncode}); "
               f"xl save rc {sv.rc}; counter {c}; xl: {' '.join(err.split())[-300:]}")
    except Exception as e:
        result(test, "FAIL", str(e))
    finally:
        destroy(test, g)


def setup_lvm() -> str:
    backing = LAB / "lvm.img"
    run("setup", "truncate", ["truncate", "-s", "1024M", str(backing)], 30)
    loop = run("setup", "losetup", ["losetup", "-f", "--show", str(backing)], 30).out.strip()
    run("setup", "pvcreate", ["pvcreate", "-q", loop], 60)
    run("setup", "vgcreate", ["vgcreate", "-q", "labvg", loop], 60)
    run("setup", "lvcreate-thick", ["lvcreate", "-q", "-L", "64M", "-n", "thick", "labvg"], 60)
    run("setup", "lvcreate-pool", ["lvcreate", "-q", "-L", "192M", "-T", "labvg/pool"], 60)
    run("setup", "lvcreate-thin", ["lvcreate", "-q", "-V", "64M", "-T", "labvg/pool", "-n", "thin"], 60)
    run("setup", "lvcreate-hvm", ["lvcreate", "-q", "-L", "256M", "-n", "hvmthick", "labvg"], 60)
    return loop


def main() -> int:
    note(f"self-test starting; uptime {Path('/proc/uptime').read_text().split()[0]} s")
    LAB.mkdir(parents=True, exist_ok=True)
    Path("/run/domsnap").mkdir(parents=True, exist_ok=True)
    only = set()
    for arg in Path("/proc/cmdline").read_text().split():
        if arg.startswith("domsnap.labtests="):
            only = set(arg.split("=", 1)[1].split("+"))
    info = run("setup", "xl-info", ["xl", "info"], 60)
    caps = re.search(r"^virt_caps\s*:\s*(.*)$", info.out, re.M)
    ver = re.search(r"^xen_version\s*:\s*(.*)$", info.out, re.M)
    say(f"LABINFO xen_version={ver[1] if ver else '?'} virt_caps={caps[1].replace(' ', ',') if caps else '?'}")
    flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    say(f"LABINFO dom0_avx={'yes' if flags and ' avx' in flags[1] else 'no'}")

    log = open("/var/log/domsnapd.log", "w")  # noqa: SIM115
    agent = subprocess.Popen(
        [DOMSNAPD, "--driver", "xen", "--listen", SOCK, "--state-dir", "/var/lib/domsnap",
         "--snapshot-root", "/var/lib/domsnap/snapshots", "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    t = time.monotonic()
    while True:
        # The CLI's own start (Python, grpc) took 10 s on a quiet host's TCG
        # and over 30 s on a loaded one.
        r = run("setup", "agent-info", [DOMSNAP, "-H", SOCK, "info"], 120, check=False)
        if r.rc == 0:
            break
        if agent.poll() is not None or time.monotonic() - t > 240:
            result("agent-start", "FAIL", f"domsnapd did not answer: {r.err.strip()[-300:]}; log: "
                   + Path("/var/log/domsnapd.log").read_text()[-600:])
            return 1
        time.sleep(1)
    say(f"LABTIME setup agent_ready_s={time.monotonic() - t:.2f}")
    # How the agent finds a domain (xen.py): libxl in its own process, or xl.
    lookups = "libxl" if "looked up through libxl" in Path("/var/log/domsnapd.log").read_text() else "xl"
    say(f"LABINFO agent_lookups={lookups}")
    note(" ".join(r.out.split())[:300])
    result("agent-start", "PASS", " ".join(r.out.split())[:200])

    for name in ("pvq", "pvhq", "pvhlive", "pvlive", "cap", "cappvh", "hvmq", "hvmlive", "hvmgen"):
        run("setup", f"qemu-img-{name}", ["qemu-img", "create", "-q", "-f", "qcow2", str(LAB / f"{name}.qcow2"),
                                          "64M"], 60)
    lvm_ok = True
    try:
        setup_lvm()
    except StepFailed as e:
        lvm_ok = False
        result("lvm-setup", "FAIL", str(e))

    tests: list[tuple[str, Callable[[], None]]] = [
        ("capture-pv", lambda: capture("capture-pv", Guest("cap", "pv", str(LAB / "cap.qcow2"), "qcow2"))),
        ("capture-pvh", lambda: capture_pvh("capture-pvh", Guest("cappvh", "pvh", str(LAB / "cappvh.qcow2"),
                                                                 "qcow2"))),
        ("pv-qcow2-nonlive", lambda: snapshot_test(
            "pv-qcow2-nonlive", Guest("pvq", "pv", str(LAB / "pvq.qcow2"), "qcow2"), live=False)),
        ("pvh-qcow2-nonlive", lambda: snapshot_test(
            "pvh-qcow2-nonlive", Guest("pvhq", "pvh", str(LAB / "pvhq.qcow2"), "qcow2"), live=False)),
        ("pvh-qcow2-live", lambda: snapshot_test(
            "pvh-qcow2-live", Guest("pvhlive", "pvh", str(LAB / "pvhlive.qcow2"), "qcow2"), live=True)),
        ("pv-live-refused", lambda: live_refused(
            "pv-live-refused", Guest("pvlive", "pv", str(LAB / "pvlive.qcow2"), "qcow2"), "shadow")),
        ("hvm-qcow2-nonlive", lambda: snapshot_test(
            "hvm-qcow2-nonlive", Guest("hvmq", "hvm", str(LAB / "hvmq.qcow2"), "qcow2"), live=False)),
        # Its QEMU has released the image by the pause: qemu-img snapshots it there.
        ("hvm-qcow2-live", lambda: snapshot_test(
            "hvm-qcow2-live", Guest("hvmlive", "hvm", str(LAB / "hvmlive.qcow2"), "qcow2"), live=True)),
        ("hvm-genid", lambda: hvm_genid("hvm-genid", Guest("hvmgen", "hvm", str(LAB / "hvmgen.qcow2"), "qcow2"))),
    ]
    if lvm_ok:
        tests += [
            ("pv-lvm-thick-nonlive", lambda: snapshot_test(
                "pv-lvm-thick-nonlive", Guest("pvlv", "pv", "/dev/labvg/thick", "raw"), live=False)),
            ("pvh-lvm-thin-live", lambda: snapshot_test(
                "pvh-lvm-thin-live", Guest("pvhlv", "pvh", "/dev/labvg/thin", "raw"), live=True)),
            ("hvm-lvm-nonlive", lambda: snapshot_test(
                "hvm-lvm-nonlive", Guest("hvmlv", "hvm", "/dev/labvg/hvmthick", "raw"), live=False)),
        ]
    for name, fn in tests:
        if only and name not in only:
            continue
        note(f"test {name}")
        t = time.monotonic()
        fn()
        say(f"LABTIME {name} total_s={time.monotonic() - t:.1f}")
        cost_lines()

    agent.terminate()
    try:
        agent.wait(20)
    except subprocess.TimeoutExpired:
        agent.kill()
    failed = [k for k, v in RESULTS.items() if v == "FAIL"]
    # The agent's log: its timings per step, and on a failure what it saw.
    emit_file("domsnapd.log", Path("/var/log/domsnapd.log").read_text()[-60000:])
    say(f"LABSUMMARY passed={sum(v == 'PASS' for v in RESULTS.values())} failed={len(failed)} "
        f"skipped={sum(v == 'SKIP' for v in RESULTS.values())} {cost_summary()}".rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
