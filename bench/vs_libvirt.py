"""domsnap against libvirt (and the disk's own bandwidth), side by side in one run.

    .venv/bin/python -m bench.vs_libvirt [--sizes 256,1024] [--repeat 5]

Sets up what it needs: Debian's libvirt (`apt-get install -y
libvirt-daemon-system libvirt-clients` if missing), virtlogd and libvirtd for
the run only (when not already running; it stops what it started), a domsnapd
(testbed/harness.py's Agent) on a private unix socket plus a plain-TCP loopback
listener (`allow_plaintext_loopback`), and per guest size the same guest
(guest/build.sh: kernel, initramfs, cmdline, memory, 1 vCPU, a 64 MiB qcow2
disk with 64 KiB clusters, writeback cache, serial to a file, TCG,
pc-i440fx-7.2) four times: idle (`domsnap.fill` = 70 % of RAM) and busy
(`domsnap.busy=64`, the fill 64 MiB less) under domsnap, and the same two
under libvirt.

Per repetition, A/B interleaved (domsnap first on even repetitions, libvirt
first on odd ones):
  non-live create (external memory + external disk on both): wall, guest pause;
  live create of the idle and of the busy guest: pause and total time, domsnap
  in both its live modes (background-snapshot, the default; precopy);
  revert: wall (libvirt 9.0 refuses to revert external snapshots: its revert
  is of an internal snapshot of the same guest; the refusal is recorded);
  memory-image throughput against dd writing and reading the same bytes on
  the same filesystem;
  agent overhead: a non-live create (internal disk snapshot) through domsnapd
  against the same QMP steps sent by bench/qmp_direct.py to the same QEMU;
  and once per size: unary RPC latency on the unix socket and on loopback TCP,
  `domsnap list` against `virsh list`.

Guest pause is QEMU's own account on both sides: its STOP and RESUME event
timestamps (domsnap records them in the manifest's `downtime`; for libvirt a
`virsh qemu-monitor-event` reader per domain). The busy guest of the side not
being measured is kept paused so that it does not take a core.

domsnapd runs with bench/tracehook on its PYTHONPATH: a timeline of its QMP
commands, fdatasync calls and subprocesses (bench/results/raw/) that tells
where its time goes; it changes no behaviour.

Writes bench/results/vs-libvirt-<time>.md (and raw/<same>.json) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench import libvirt_peer as lv
from bench import qmp_direct
from bench.snapshot_pause import dd_write_read, machine
from domsnap.client.views import phase_word
from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc
from testbed import guestprobe
from testbed.harness import BIN, Agent, guest_config, make_disk

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRACEHOOK = HERE / "tracehook"
CMDLINE = guestprobe.KERNEL_CMDLINE
BUSY_MIB = 64
RPC_CALLS = 300
R = dict[str, list[float]]


# ---------------------------------------------------------------- helpers


def add(r: R, key: str, value: float | None) -> None:
    if value is not None:
        r.setdefault(key, []).append(value)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def qemu_processes() -> dict[int, str]:
    out = subprocess.run(["pgrep", "-a", "qemu-system"], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        procs[int(pid)] = cmd
    return procs


def others(ours: set[int]) -> list[str]:
    """QEMU processes of someone else (not this run's guests, not libvirt's probes)."""
    return [
        f"{pid}: {cmd[:90]}"
        for pid, cmd in qemu_processes().items()
        if pid not in ours and "-machine none" not in cmd and "accel=kvm:tcg" not in cmd
    ]


def stamps(events: list[pb.OperationEvent]) -> dict[str, float]:
    """The first progress time of each phase (wall clock seconds)."""
    out: dict[str, float] = {}
    for e in events:
        if e.WhichOneof("event") == "progress":
            phase, at = phase_word(e.progress.phase), e.progress.time.ToNanoseconds() / 1e9
            out.setdefault(phase, at)
            out["_last_" + phase] = at
    return out


def read_trace(path: Path, t0: float, t1: float) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if t0 <= rec["t0"] <= t1:
            out.append(rec)
    return out


class DomsnapSide:
    """domsnapd and its guests for one size."""

    def __init__(self, base: Path, port: int) -> None:
        self.trace = base / "trace.jsonl"
        self.port = port
        self.agent = Agent(
            base / "agent",
            env={"PYTHONPATH": str(TRACEHOOK), "DOMSNAP_BENCH_TRACE": str(self.trace)},
            extra_listen=(f"127.0.0.1:{port}",),
        )
        self.agent.base.mkdir()
        self.mode = "background"
        self.tcp = True
        self._start()

    def _toml(self) -> str:
        tcp = "allow_plaintext_loopback = true\n" if self.tcp else ""
        roles = '[roles]\nread_only = ["loopback"]\n' if self.tcp else ""
        return f'{tcp}[qemu]\nlive_mode = "{self.mode}"\n{roles}'

    def _start(self) -> None:
        self.agent.config_toml = self._toml()
        try:
            self.agent.start()
        except RuntimeError:
            if not self.tcp:
                raise
            # An agent without the plain-loopback setting: the TCP rows stay empty.
            self.tcp = False
            self.agent.extra_listen = ()
            self.agent.config_toml = self._toml()
            self.agent.start()
        self.stub = self.agent.stub()

    def set_mode(self, mode: str) -> None:
        if mode != self.mode:
            self.mode = mode
            self.agent.stop()
            self._start()

    def stop(self) -> None:
        if self.agent.proc is not None:
            self.agent.stop()

    def start(self) -> None:
        if self.agent.proc is None:
            self._start()

    def qmp_socket(self, dom: str) -> Path:
        return self.agent.state_dir / "qemu" / dom / "qmp.sock"

    def pid(self, dom: str) -> int | None:
        try:
            return int((self.agent.state_dir / "qemu" / dom / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None

    def create(self, dom: str, name: str, *, live: bool, method: pb.SnapshotMethod.ValueType) -> dict[str, Any]:
        t_wall0 = time.time()
        t0 = time.monotonic()
        events = list(
            self.stub.CreateSnapshot(
                pb.CreateSnapshotRequest(domain_name=dom, name=name, live=live, method=method,
                                         request_id=uuid.uuid4().hex),
                timeout=900,
            )
        )
        wall = time.monotonic() - t0
        snap = events[-1].finished.result
        trace = read_trace(self.trace, t_wall0, time.time())
        syncs = [r["t1"] - r["t0"] for r in trace if r["kind"] == "fdatasync"]
        migr = [r["ret"] for r in trace if r["kind"] == "qmp" and r["cmd"] == "query-migrate"]
        return {
            "wall": wall,
            "pause": snap.downtime.ToNanoseconds() / 1e9,
            "bytes": snap.memory.size_bytes,
            "memory": snap.memory.path,
            "fdatasync": sum(syncs) if syncs else None,
            "migrate": migr[-1] if migr else {},
            "trace": trace,
            "stamps": stamps(events),
        }

    def revert(self, dom: str, name: str) -> dict[str, Any]:
        t_wall0 = time.time()
        t0 = time.monotonic()
        events = list(
            self.stub.RevertSnapshot(
                pb.RevertSnapshotRequest(domain_name=dom, snapshot_name=name, request_id=uuid.uuid4().hex), timeout=900
            )
        )
        wall = time.monotonic() - t0
        return {"wall": wall, "stamps": stamps(events), "trace": read_trace(self.trace, t_wall0, time.time())}

    def pause(self, dom: str) -> None:
        self.stub.PauseDomain(pb.PauseDomainRequest(domain_name=dom, request_id=uuid.uuid4().hex), timeout=60)

    def unpause(self, dom: str) -> None:
        self.stub.UnpauseDomain(pb.UnpauseDomainRequest(domain_name=dom, request_id=uuid.uuid4().hex), timeout=60)


def latencies(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(20):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


# ---------------------------------------------------------------- one size


def bench_size(
    work: Path, kernel: Path, initrd: Path, mib: int, repeat: int, info: dict[str, Any], daemons: lv.Daemons
) -> R:
    r: R = {}
    base = work / f"s{mib}"
    base.mkdir()
    base.chmod(0o755)
    fill = mib * 7 // 10
    extra_idle = f"domsnap.fill={fill}"
    extra_busy = f"domsnap.fill={fill - BUSY_MIB} domsnap.busy={BUSY_MIB}"
    ds = DomsnapSide(base, free_port())
    info.setdefault("tcp", ds.tcp)
    lvi = lv.Domain(f"dsbench-idle-{mib}", base)
    lvb = lv.Domain(f"dsbench-busy-{mib}", base)
    serials: dict[str, Path] = {}
    try:
        # ---- guests
        for dom, extra in (("dsi", extra_idle), ("dsb", extra_busy)):
            disk = base / f"{dom}.qcow2"
            make_disk(disk, "qcow2", 64)
            serials[dom] = base / f"{dom}.serial"
            cfg = base / f"{dom}.cfg"
            cfg.write_text(
                guest_config(dom, kernel, initrd, {"xvda": (disk, "qcow2")}, serials[dom], memory=mib, extra=extra)
            )
            t0 = time.monotonic()
            ds.agent.cli("create", str(cfg), check=True)
            add(r, "machine: domsnap create domain", time.monotonic() - t0)
        since = datetime.now(UTC).strftime("%H:%M:%S.%f")[:12]
        for ldom, extra in ((lvi, extra_idle), (lvb, extra_busy)):
            disk = base / f"{ldom.name}.qcow2"
            make_disk(disk, "qcow2", 64)
            serials[ldom.name] = base / f"{ldom.name}.serial"
            add(
                r,
                "machine: libvirt define",
                ldom.define(
                    lv.domain_xml(
                        ldom.name,
                        memory_mib=mib,
                        kernel=kernel,
                        initrd=initrd,
                        cmdline=f"{CMDLINE} {extra}",
                        disk=disk,
                        serial=serials[ldom.name],
                    )
                ),
            )
            add(r, "machine: libvirt start", ldom.start())
        for s in lv.probe_seconds(daemons.log_file, since):
            add(r, "machine: libvirt caps re-probe per start", s)
        for serial in serials.values():
            guestprobe.wait_ready(serial, timeout=600)
            guestprobe.wait_disk_ok(serial, "vda", timeout=120)

        def ours() -> set[int]:
            return {p for p in (ds.pid("dsi"), ds.pid("dsb"), lvi.pid(), lvb.pid()) if p}

        info.setdefault("argv", {})[mib] = {
            "domsnap": Path(f"/proc/{ds.pid('dsi')}/cmdline").read_text().split("\0")[:-1],
            "libvirt": lvi.command_line(),
        }
        info.setdefault("migrate-parameters", {})[f"libvirt {mib}"] = json.loads(lvi.qmp("query-migrate-parameters"))[
            "return"
        ]
        # libvirt's revert target: an internal snapshot of the idle guest, taken now.
        wall, _ = lv.virsh("snapshot-create-as", lvi.name, "internal0")
        add(r, "libvirt internal create (savevm)", wall)
        ds.pause("dsb")
        lv.virsh("suspend", lvb.name)

        # ---- RPC latency, once per size
        rpc(ds, r, lvi)

        # ---- repetitions
        for i in range(repeat):
            order = ("ds", "lv") if i % 2 == 0 else ("lv", "ds")
            add(r, "load (1 min)", os.getloadavg()[0])
            info.setdefault("others", []).append(others(ours()))
            ds.set_mode("background")
            for side in order:  # non-live create
                if side == "ds":
                    res = ds.create("dsi", f"nl{i}", live=False, method=pb.SNAPSHOT_METHOD_EXTERNAL)
                    add(r, "nonlive ds wall", res["wall"])
                    add(r, "nonlive ds pause", res["pause"])
                    add(r, "nonlive ds fdatasync after resume", res["fdatasync"])
                    add(r, "nonlive ds bytes", res["bytes"])
                    add(r, "nonlive ds qemu mbps", res["migrate"].get("ram", {}).get("mbps"))
                    nl_bytes = res["bytes"]
                    info.setdefault("traces", {}).setdefault(f"nonlive {mib}", []).append(res["trace"])
                else:
                    res = lv_create(lvi, base, f"nl{i}", live=False)
                    r_lv(r, "nonlive lv", res)
                    if i == 0:
                        _, refusal = lv.virsh("snapshot-revert", lvi.name, "nl0", check=False)
                        info["libvirt external revert"] = refusal.strip()
            for side in order:  # live, idle guest
                if side == "ds":
                    res = ds.create("dsi", f"lb{i}", live=True, method=pb.SNAPSHOT_METHOD_EXTERNAL)
                    r_ds(r, "live idle ds-bg", res)
                    info.setdefault("traces", {}).setdefault(f"live idle background {mib}", []).append(res["trace"])
                else:
                    r_lv(r, "live idle lv", lv_create(lvi, base, f"li{i}", live=True))
            for side in order:  # live, busy guest
                if side == "ds":
                    ds.unpause("dsb")
                    time.sleep(2)
                    res = ds.create("dsb", f"bb{i}", live=True, method=pb.SNAPSHOT_METHOD_EXTERNAL)
                    ds.pause("dsb")
                    r_ds(r, "live busy ds-bg", res)
                    info.setdefault("traces", {}).setdefault(f"live busy background {mib}", []).append(res["trace"])
                else:
                    lv.virsh("resume", lvb.name)
                    time.sleep(2)
                    res = lv_create(lvb, base, f"lb{i}", live=True)
                    lv.virsh("suspend", lvb.name)
                    r_lv(r, "live busy lv", res)
            ds.set_mode("precopy")
            res = ds.create("dsi", f"lp{i}", live=True, method=pb.SNAPSHOT_METHOD_EXTERNAL)
            r_ds(r, "live idle ds-pre", res)
            info.setdefault("traces", {}).setdefault(f"live idle precopy {mib}", []).append(res["trace"])
            ds.unpause("dsb")
            time.sleep(2)
            res = ds.create("dsb", f"bp{i}", live=True, method=pb.SNAPSHOT_METHOD_EXTERNAL)
            ds.pause("dsb")
            r_ds(r, "live busy ds-pre", res)
            info.setdefault("traces", {}).setdefault(f"live busy precopy {mib}", []).append(res["trace"])
            for side in order:  # revert, cold page cache on both
                drop_caches()
                if side == "ds":
                    res = ds.revert("dsi", f"nl{i}")
                    add(r, "revert ds wall", res["wall"])
                    st = res["stamps"]
                    if "restore" in st and "_last_restore" in st:
                        add(r, "revert ds restore MB/s", nl_bytes / (st["_last_restore"] - st["restore"]) / 1e6)
                    info.setdefault("traces", {}).setdefault(f"revert {mib}", []).append(
                        {"stamps": st, "trace": res["trace"]}
                    )
                    (base / "agent" / "snapshots" / "dsi" / f"nl{i}" / "memory.save").unlink(missing_ok=True)
                else:
                    since = datetime.now(UTC).strftime("%H:%M:%S.%f")[:12]
                    wall, _ = lv.virsh("snapshot-revert", lvi.name, "internal0")
                    add(r, "revert lv wall", wall)
                    probes = lv.probe_seconds(daemons.log_file, since)
                    add(r, "revert lv caps re-probe", sum(probes))
                    add(r, "revert lv wall without re-probe", wall - sum(probes))
                    lv.virsh("migrate-setspeed", lvi.name, str(lv.UNLIMITED_MIB_S))
            time.sleep(1)
            overhead(ds, r, base, i, info, mib)
            w, rd = dd_write_read(base / "dd.bin", int(nl_bytes))
            add(r, "dd write MB/s", w / 1e6)
            add(r, "dd read MB/s", rd / 1e6)
            add(r, "load (1 min)", os.getloadavg()[0])
        info.setdefault("others_end", []).append(others(ours()))
    finally:
        for dom in ("dsi", "dsb"):
            try:
                ds.start()
                ds.stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=dom, request_id=uuid.uuid4().hex), timeout=60)
            except Exception as err:  # clean up the rest regardless
                print(f"cleanup: domsnap destroy {dom}: {err}")
        ds.stop()
        for d in (lvi, lvb):
            d.destroy()
    return r


def r_ds(r: R, key: str, res: dict[str, Any]) -> None:
    add(r, f"{key} wall", res["wall"])
    add(r, f"{key} pause", res["pause"])
    Path(res["memory"]).unlink(missing_ok=True)


def r_lv(r: R, key: str, res: dict[str, Any]) -> None:
    add(r, f"{key} wall", res["wall"])
    add(r, f"{key} pause", res["pause"])
    add(r, f"{key} bytes", res["bytes"])
    add(r, f"{key} qemu mbps", res["migrate"].get("ram", {}).get("mbps"))


def lv_create(dom: lv.Domain, base: Path, name: str, *, live: bool) -> dict[str, Any]:
    d = base / "libvirt-snapshots" / dom.name / name
    d.mkdir(parents=True)
    offset = dom.events_offset()
    args = [
        "snapshot-create-as",
        dom.name,
        name,
        "--memspec",
        f"file={d}/memory,snapshot=external",
        "--diskspec",
        f"vda,snapshot=external,file={d}/vda.qcow2",
    ]
    wall, _ = lv.virsh(*args, *(["--live"] if live else []))
    stop, resume = dom.pause_since(offset)
    size = (d / "memory").stat().st_size
    (d / "memory").unlink()
    migrate = json.loads(dom.qmp("query-migrate"))["return"]
    return {"wall": wall, "pause": resume - stop, "bytes": size, "migrate": migrate}


def overhead(ds: DomsnapSide, r: R, base: Path, i: int, info: dict[str, Any], mib: int) -> None:
    """A non-live create (internal disk snapshot) through the agent, and the
    same QMP steps sent directly (polling as the agent does, and on events)."""
    d = base / "direct"
    d.mkdir(exist_ok=True)

    def agent_run() -> None:
        ds.start()
        res = ds.create("dsi", f"ov{i}", live=False, method=pb.SNAPSHOT_METHOD_INTERNAL)
        add(r, "overhead agent wall", res["wall"])
        add(r, "overhead agent pause", res["pause"])
        Path(res["memory"]).unlink(missing_ok=True)

    def direct(wait: str) -> None:
        ds.stop()
        mem = d / f"{wait}{i}.save"
        res = asyncio.run(qmp_direct.create(ds.qmp_socket("dsi"), mem, vdev="xvda", tag=f"direct-{wait}{i}", wait=wait))
        add(r, f"overhead direct-{wait} wall", res.wall)
        add(r, f"overhead direct-{wait} pause", res.pause)
        add(r, f"overhead direct-{wait} fdatasync", res.fdatasync)
        info.setdefault("direct-migrate", {})[f"{mib} {wait}"] = res.migrate
        mem.unlink()

    def direct_poll() -> None:
        direct("poll")

    def direct_events() -> None:
        direct("events")

    steps = [agent_run, direct_poll, direct_events]
    for step in steps if i % 2 == 0 else reversed(steps):
        step()
    ds.start()


def _calls(stub: pb_grpc.SnapshotAgentStub) -> list[tuple[str, Callable[[], object]]]:
    def info() -> object:
        return stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=10)

    def domains() -> object:
        return stub.ListDomains(pb.ListDomainsRequest(), timeout=10)

    return [("GetAgentInfo", info), ("ListDomains", domains)]


def rpc(ds: DomsnapSide, r: R, lvi: lv.Domain) -> None:
    targets = [("unix", ds.agent.address)] + ([("tcp", f"127.0.0.1:{ds.port}")] if ds.tcp else [])
    for rnd in range(5):  # interleaved rounds
        for label, target in targets if rnd % 2 == 0 else reversed(targets):
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.SnapshotAgentStub(ch)
                for rpc_name, call in _calls(stub):
                    r.setdefault(f"rpc {rpc_name} {label}", []).extend(latencies(call, RPC_CALLS // 5))
        for _ in range(2):
            t0 = time.monotonic()
            subprocess.run([str(BIN / "domsnap"), "-H", ds.agent.address, "list"], check=True, capture_output=True)
            add(r, "cli domsnap list", time.monotonic() - t0)
            add(r, "cli virsh list", lv.virsh("list")[0])


# ---------------------------------------------------------------- report


def fmt(values: list[float] | None, scale: float = 1000, unit: str = " ms", digits: int = 0) -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f}{unit} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def med(r: R, key: str) -> float | None:
    return statistics.median(r[key]) if r.get(key) else None


def lead(ours: float | None, theirs: float | None, higher_better: bool = False) -> str:
    if not ours or not theirs:
        return "-"
    x = ours / theirs if higher_better else theirs / ours
    return f"{x:.2f}x"


def table(r: R) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, ours: str, theirs: str, ok: float | None, peer: float | None, hb: bool = False) -> None:
        rows.append((label, fmt(r.get(ours)), fmt(r.get(theirs)) if theirs else "-", lead(ok, peer, hb)))

    def m(key: str) -> float | None:
        return med(r, key)

    row("non-live create: wall", "nonlive ds wall", "nonlive lv wall", m("nonlive ds wall"), m("nonlive lv wall"))
    row(
        "non-live create: guest pause",
        "nonlive ds pause",
        "nonlive lv pause",
        m("nonlive ds pause"),
        m("nonlive lv pause"),
    )
    eq = [
        p + s
        for p, s in zip(r.get("nonlive ds pause", []), r.get("nonlive ds fdatasync after resume", []), strict=False)
    ]
    r["nonlive ds pause+fdatasync"] = eq
    row(
        "non-live: domsnap pause + its fdatasync (libvirt syncs inside the pause)",
        "nonlive ds pause+fdatasync",
        "nonlive lv pause",
        m("nonlive ds pause+fdatasync"),
        m("nonlive lv pause"),
    )
    for load in ("idle", "busy"):
        for mode, label in (("bg", "background-snapshot"), ("pre", "precopy (default)")):
            row(
                f"live create, {load} guest, domsnap {label}: guest pause",
                f"live {load} ds-{mode} pause",
                f"live {load} lv pause",
                m(f"live {load} ds-{mode} pause"),
                m(f"live {load} lv pause"),
            )
            row(
                f"live create, {load} guest, domsnap {label}: total",
                f"live {load} ds-{mode} wall",
                f"live {load} lv wall",
                m(f"live {load} ds-{mode} wall"),
                m(f"live {load} lv wall"),
            )
    row(
        "revert: wall (libvirt: internal snapshot)",
        "revert ds wall",
        "revert lv wall",
        m("revert ds wall"),
        m("revert lv wall"),
    )
    row(
        "revert: wall, libvirt without its capability re-probe",
        "revert ds wall",
        "revert lv wall without re-probe",
        m("revert ds wall"),
        m("revert lv wall without re-probe"),
    )
    out = ["| | domsnap | libvirt | domsnap leads by |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]

    def tput(key_bytes: str, key_pause: str) -> list[float]:
        return [b / p / 1e6 for b, p in zip(r.get(key_bytes, []), r.get(key_pause, []), strict=False) if p]

    r["save ds MB/s"] = tput("nonlive ds bytes", "nonlive ds pause")
    r["save lv MB/s"] = tput("nonlive lv bytes", "nonlive lv pause")
    r["save ds durable MB/s"] = tput("nonlive ds bytes", "nonlive ds pause+fdatasync")
    dd_w, dd_r = m("dd write MB/s"), m("dd read MB/s")
    out += [
        "",
        "| memory image | domsnap | libvirt | dd, same bytes, same filesystem | domsnap / dd |",
        "|---|---|---|---|---|",
        f"| size | {fmt(r.get('nonlive ds bytes'), 1 / 2**20, ' MiB')} | "
        f"{fmt(r.get('nonlive lv bytes'), 1 / 2**20, ' MiB')} | | |",
        f"| save, non-live (bytes / guest pause) | {fmt(r.get('save ds MB/s'), 1, ' MB/s')} | "
        f"{fmt(r.get('save lv MB/s'), 1, ' MB/s')} | {fmt(r.get('dd write MB/s'), 1, ' MB/s')} (write + "
        f"fdatasync) | {lead(m('save ds MB/s'), dd_w, True)} |",
        f"| save, non-live, durable (bytes / (guest pause + fdatasync after it); libvirt: its pause holds "
        f"the fdatasync) | {fmt(r.get('save ds durable MB/s'), 1, ' MB/s')} | "
        f"{fmt(r.get('save lv MB/s'), 1, ' MB/s')} | {fmt(r.get('dd write MB/s'), 1, ' MB/s')} | "
        f"{lead(m('save ds durable MB/s'), dd_w, True)} |",
        f"| save, QEMU's own rate (query-migrate mbps) | "
        f"{fmt(r.get('nonlive ds qemu mbps'), 1 / 8, ' MB/s')} | "
        f"{fmt(r.get('nonlive lv qemu mbps'), 1 / 8, ' MB/s')} | | |",
        f"| restore (revert's restore phase: QEMU start + load) | "
        f"{fmt(r.get('revert ds restore MB/s'), 1, ' MB/s')} | - "
        f"(internal snapshot) | {fmt(r.get('dd read MB/s'), 1, ' MB/s')} (read, cold cache) | "
        f"{lead(m('revert ds restore MB/s'), dd_r, True)} |",
    ]
    out += [
        "",
        "| agent overhead (non-live create, internal disk snapshot, same QEMU) | wall | guest pause |",
        "|---|---|---|",
        f"| through domsnapd | {fmt(r.get('overhead agent wall'))} | {fmt(r.get('overhead agent pause'))} |",
        f"| direct QMP, polling as the agent does | {fmt(r.get('overhead direct-poll wall'))} | "
        f"{fmt(r.get('overhead direct-poll pause'))} |",
        f"| direct QMP, on MIGRATION events | {fmt(r.get('overhead direct-events wall'))} | "
        f"{fmt(r.get('overhead direct-events pause'))} |",
    ]
    if r.get("rpc GetAgentInfo unix"):
        out += ["", "| RPC (unary) | p50 | p99 |", "|---|---|---|"]
        for rpc_name in ("GetAgentInfo", "ListDomains"):
            for label in ("unix", "tcp"):
                v = r.get(f"rpc {rpc_name} {label}")
                if v:
                    out.append(
                        f"| {rpc_name}, {'unix socket' if label == 'unix' else 'loopback TCP (plain)'} | "
                        f"{pct(v, 50) * 1000:.2f} ms | {pct(v, 99) * 1000:.2f} ms |"
                    )
        out.append(f"| `domsnap list` (CLI process) | {fmt(r.get('cli domsnap list'))} | |")
        out.append(f"| `virsh list` (peer, CLI process) | {fmt(r.get('cli virsh list'))} | |")
    out += ["", "| costs of this machine, not of either design | median (min-max) |", "|---|---|"]
    for key in (
        "machine: libvirt caps re-probe per start",
        "revert lv caps re-probe",
        "machine: libvirt define",
        "machine: libvirt start",
        "machine: domsnap create domain",
        "libvirt internal create (savevm)",
    ):
        out.append(f"| {key.removeprefix('machine: ')} | {fmt(r.get(key))} |")
    out.append(f"| load average (1 min) during the run | {fmt(r.get('load (1 min)'), 1, '', 2)} |")
    return "\n".join(out)


def argv_diff(info: dict[str, Any]) -> str:
    out = []
    for mib, both in info.get("argv", {}).items():
        a, b = lv.argv_options(both["domsnap"]), lv.argv_options(both["libvirt"])
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        out.append(
            f"### {mib} MiB guest\n\ndomsnap: `{' '.join(both['domsnap'])}`\n\n"
            f"libvirt: `{' '.join(both['libvirt'])}`\n\n"
            f"- only domsnap: {', '.join(f'`{k}`' for k in only_a) or '-'}\n"
            f"- only libvirt: {', '.join(f'`{k}`' for k in only_b) or '-'}\n"
            f"- both, different values: "
            + ", ".join(f"`{k}` ({' '.join(a[k])} / {' '.join(b[k])})" for k in differ)
            + "\n"
        )
        break  # the command lines differ between sizes only in -m
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    installed = lv.ensure_installed()
    kernel0, initrd0 = guestprobe.guest_paths()
    started = datetime.now(UTC)
    # libvirt runs QEMU as libvirt-qemu: everything the guests use lies in a
    # directory it can enter; the kernel and initramfs are copied there.
    work = Path(tempfile.mkdtemp(prefix="dvl-", dir="/var/tmp"))
    work.chmod(0o755)
    kernel, initrd = work / "vmlinuz", work / "initrd.img"
    shutil.copy(kernel0, kernel)
    shutil.copy(initrd0, initrd)
    daemons = lv.Daemons(work / "libvirtd-debug.log")
    info: dict[str, Any] = {
        "installed libvirt": installed,
        "machine": machine(),
        "load_start": os.getloadavg(),
        "others_start": others(set()),
    }
    results: dict[int, R] = {}
    try:
        daemons.start()
        info["started daemons"] = [name for name, _ in daemons.started]
        info["versions"] = lv.virsh("version")[1].strip()
        for s in args.sizes.split(","):
            results[int(s)] = bench_size(work, kernel, initrd, int(s), args.repeat, info, daemons)
    finally:
        daemons.stop()
        shutil.rmtree(work, ignore_errors=True)
    info["load_end"] = os.getloadavg()
    info["others_end_run"] = others(set())
    text = report(started, args.repeat, results, info)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vs-libvirt-{started:%Y%m%dT%H%M}.md"
    out.write_text(text)
    (RESULTS / "raw").mkdir(exist_ok=True)
    traces = info.pop("traces", {})
    (RESULTS / "raw" / f"{out.stem}.json").write_text(
        json.dumps({"results": results, "info": info}, indent=1, default=str)
    )
    (RESULTS / "raw" / f"{out.stem}.traces.json").write_text(json.dumps(traces, default=str))
    print(text)
    print(f"written to {out}")
    return 0


def report(started: datetime, repeat: int, results: dict[int, R], info: dict[str, Any]) -> str:
    others_seen = sorted({o for rep in info.get("others", []) for o in rep} | set(info.get("others_start", [])))
    parts = [
        f"# domsnap vs libvirt ({started:%Y-%m-%d %H:%M} UTC)\n",
        f"Machine: {info['machine']}.",
        f"Load average at start {info['load_start'][0]:.2f}, at end {info['load_end'][0]:.2f}.",
        f"Other QEMU processes seen during the run (not this benchmark's): {len(others_seen)}"
        + "".join(f"\n- `{o}`" for o in others_seen)
        + "\n",
        f"Peer: {info.get('versions', '').splitlines()[-1] if info.get('versions') else 'libvirt'}; "
        f"daemons started for this run: {', '.join(info.get('started daemons', [])) or 'none (already running)'}.",
        f"libvirt's answer to reverting an external snapshot: `{info.get('libvirt external revert', '?')}` — so its "
        "revert row reverts an internal snapshot (savevm/loadvm) of the same guest.\n",
        f"Median (min-max) of {repeat} repetitions, A/B interleaved; guest pause from QEMU's STOP/RESUME events "
        "on both sides. \"domsnap leads by\": libvirt's median / domsnap's (above 1: domsnap is faster).\n",
    ]
    parts.append(
        "Method: both sides run QEMU with unlimited migration bandwidth (libvirt sets it itself for a save; "
        "`virsh migrate-setspeed` too), QEMU's default 300 ms downtime limit, no compression, no multifd. "
        "libvirt pipes the image through libvirt_iohelper and keeps the guest paused through its fdatasync and the "
        "disk snapshot (stop, RAM, fdatasync, disks, cont); domsnap passes QEMU the file, takes the disks at "
        "pre-switchover and fdatasyncs after the resume, before writing the manifest (stop, RAM, disks, device "
        "state, cont, fdatasync): the third row adds that fdatasync to domsnap's pause. Each create writes a fresh "
        "image. domsnapd runs with bench/tracehook (timestamps of its QMP commands, fdatasync and subprocesses; "
        "raw/*.traces.json). The page cache is dropped before every revert and before dd's read.\n"
    )
    for mib, r in results.items():
        parts.append(f"## {mib} MiB guest ({mib * 7 // 10} MiB of RAM filled)\n\n{table(r)}\n")
    parts.append("## QEMU command lines\n\n" + argv_diff(info))
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
