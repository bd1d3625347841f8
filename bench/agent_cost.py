"""The agent's own cost: every row of issue 18's table in one run, each with
the baseline it is judged against, measured in the same run.

    .venv/bin/python -m bench.agent_cost [--count 10000] [--big 100000] [--domains 20] [--repeat 5]

Rows and their baselines:
  ListSnapshots of one domain's COUNT snapshots, and of BIG snapshots in all
  (every page, unix socket) | reading the same manifests (open + json.loads);
  the agent's start with BIG snapshots to index (first start: the index is
  built; next start: it is checked) | the same manifest reads;
  `domsnap snapshot-list` of COUNT | the manifest reads, and a bare
  `python -c pass` (the interpreter's own start);
  a health Check through the unix socket's relay | the same Check on the
  gRPC server's own (private) socket, under the same load: the relay's cost;
  unary calls (GetAgentInfo, ListDomains, GetDomain, ListSnapshots of one
  domain) p50 and p99 with DOMAINS small guests running while another
  domain's snapshots are taken and deleted in a loop | the standard health
  Check on the same server at the same time (gRPC's own floor), the methods
  called in turn so that each meets the same moments of the snapshots; the
  host's own wake-up latency meanwhile (bench/wake_probe.py: the floor of
  any process on the host, gRPC's included); the host's
  CPU use with the guests booted and idle, and during those calls (the
  small guests run the test guest with its counter ticking once a second,
  `domsnap.tick=1000`, as idle servers; each is up, READY, before the
  calls start);
  where the slowest 1 % of those unary calls spent their time, segment by
  segment (bench/rpc_trace.py: the agent runs with bench/tracehook's RPC
  trace) | the fastest half's same segments;
  `domsnap list` (process wall) | `virsh -c test:///default list` when virsh
  is installed, and `python -c pass`;
  a non-live create (internal disk snapshot) through domsnapd | the same QMP
  steps sent directly on MIGRATION events (bench/qmp_direct.py), A/B
  interleaved, the agent stopped during the direct runs (one QMP client).

The catalogue is filled as bench/catalogue_list.py does (real manifests),
COUNT snapshots of domain `big` (with 1 KiB memory images) and BIG - COUNT of
`huge` (without: the listing reads none).

Commands (the CLI, `python -c pass`, virsh) are given with their wall time
and their CPU time: on a loaded machine the wall is mostly waiting for a core.
Each row also names its goal (issue 18). Writes
bench/results/agent-cost-<time>.md, with the command that made it, and prints
it. About 5 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import concurrent.futures
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import domsnap
from bench import qmp_direct, rpc_trace
from bench.catalogue_list import fill, timed
from bench.rpc_trace import ClientCall
from bench.snapshot_pause import machine
from bench.vs_libvirt import pct
from bench.wake_probe import WakeProbe
from domsnap.agent import manifest
from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc
from testbed import guestprobe, harness
from testbed.harness import BIN, Agent, guest_config, make_disk

HERE = Path(__file__).resolve().parent
# p99 of 2000: the 20 slowest, not the 6 of 600 (less the luck of one run).
RPC_CALLS = 2000
OVERHEAD_MIB = 256
# The test guest's smallest comfortable size: at 64 MiB its kernel resets
# before init, a QEMU rebooting at 100 % of a core for ever.
SMALL_MIB = 128
BASELINE = "health Check (baseline)"
OWN_SOCKET = "health Check, gRPC's own socket"
# The small domains idle as servers do: their counter ticks once a second (the
# default 10 per second costs each ~10 % of a core under TCG, 20 of them both cores).
IDLE = "domsnap.tick=1000"
Rows = list[tuple[str, str, str, str, str]]


def med(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def process(argv: list[str], repeat: int) -> str:
    """Wall times of a command, and its CPU time (user + system) per run: on a
    loaded machine the wall is mostly waiting for a core, the CPU time is not."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    walls = timed(run(*argv), repeat)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / repeat
    return f"{med(walls)}, CPU {cpu * 1000:.0f} ms"


def run(*argv: str) -> Callable[[], object]:
    return lambda: subprocess.run(argv, check=True, capture_output=True, timeout=300)


def list_all(stub: pb_grpc.SnapshotAgentStub, domain: str | None) -> int:
    """Every page of one domain's snapshots, or of every domain's (None)."""
    n, token = 0, ""
    while True:
        request = pb.ListSnapshotsRequest(page_token=token)
        if domain is not None:
            request.domain_name = domain
        page = stub.ListSnapshots(request, timeout=300)
        n += len(page.snapshots)
        if not (token := page.next_page_token):
            return n


def catalogue_rows(work: Path, count: int, big: int, repeat: int) -> Rows:
    agent = Agent(work / "cat")
    agent.base.mkdir()
    big_dirs = fill(agent.state_dir, agent.snapshot_root, count)
    # Fewer files for the many: the listing reads no memory image.
    huge_dirs = fill(agent.state_dir, agent.snapshot_root, big - count, domain="huge", images=False)
    # The first start indexes every manifest.
    harness.AGENT_START_TIMEOUT = 900

    def read(dirs: list[Path]) -> Callable[[], object]:
        return lambda: [json.loads((d / manifest.MANIFEST).read_text()) for d in dirs]

    rows: Rows = []
    base_count = timed(read(big_dirs), repeat)
    base_big = timed(read(big_dirs + huge_dirs), max(2, repeat // 2))
    t0 = time.perf_counter()
    agent.start()
    first_start = time.perf_counter() - t0
    try:
        stub = agent.stub()
        assert list_all(stub, "big") == count
        rpc = timed(lambda: list_all(stub, "big"), repeat)
        rpc_big = timed(lambda: list_all(stub, None), max(2, repeat // 2))
        python = process([sys.executable, "-c", "pass"], repeat)
        cli = process([str(BIN / "domsnap"), "-H", agent.address, "snapshot-list", "big"], repeat)
        agent.stop()
        t0 = time.perf_counter()
        agent.start()
        next_start = time.perf_counter() - t0
    finally:
        agent.stop()
    m_count = f"reading the {count} manifests: {med(base_count)}"
    m_big = f"reading the {big} manifests: {med(base_big)}"
    rows.append((f"ListSnapshots, {count} snapshots (all pages)", med(rpc), m_count,
                 f"{statistics.median(base_count) / statistics.median(rpc):.2f}x", "≤ 100 ms"))
    rows.append((f"ListSnapshots, {big} snapshots (all pages)", med(rpc_big), m_big,
                 f"{statistics.median(base_big) / statistics.median(rpc_big):.2f}x", "≤ 1 s"))
    rows.append((f"agent start, {big} snapshots, index built", f"{first_start * 1000:.0f} ms", m_big, "", ""))
    rows.append((f"agent start, {big} snapshots, index checked", f"{next_start * 1000:.0f} ms", m_big, "", ""))
    rows.append((f"`domsnap snapshot-list`, {count}", cli, f"{m_count}; `python -c pass`: {python}",
                 "", "≤ 300 ms"))
    return rows


def boot(agent: Agent, work: Path, name: str, mib: int, extra: str = "") -> Path:
    """Start a test guest; returns its serial log."""
    kernel, initrd = guestprobe.guest_paths()
    disk = work / f"{name}.qcow2"
    make_disk(disk, "qcow2", 32)
    serial = work / f"{name}.serial"
    cfg = guest_config(name, kernel, initrd, {"xvda": (disk, "qcow2")}, serial, memory=mib, extra=extra)
    agent.stub().CreateDomain(pb.CreateDomainRequest(config=cfg, request_id=uuid.uuid4().hex), timeout=120)
    return serial


class HostCpu:
    """The host's CPU use between start() and stop(), from /proc/stat (all
    cores: 100 % is every core busy), and the guests' QEMUs' share of it."""

    def __init__(self, pidfiles: list[Path]) -> None:
        self.pids = [int(p.read_text()) for p in pidfiles]

    @staticmethod
    def _host() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    def _guests(self) -> int:
        return sum(sum(int(v) for v in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
                   for pid in self.pids)

    def start(self) -> None:
        self.t0, self.host0, self.guests0 = time.monotonic(), self._host(), self._guests()

    def stop(self) -> str:
        (all1, idle1), guests1 = self._host(), self._guests()
        total, idle = all1 - self.host0[0], idle1 - self.host0[1]
        cores = os.cpu_count() or 1
        guests = (guests1 - self.guests0) / (os.sysconf("SC_CLK_TCK") * (time.monotonic() - self.t0) * cores)
        return f"host CPU {100 * (total - idle) / total:.0f} % busy, the guests' QEMUs {100 * guests:.0f} %"


def create(stub: pb_grpc.SnapshotAgentStub, dom: str, name: str) -> pb.Snapshot:
    events = list(stub.CreateSnapshot(pb.CreateSnapshotRequest(
        domain_name=dom, name=name, method=pb.SNAPSHOT_METHOD_INTERNAL, request_id=uuid.uuid4().hex), timeout=600))
    return events[-1].finished.result


def delete(stub: pb_grpc.SnapshotAgentStub, dom: str, name: str) -> None:
    list(stub.DeleteSnapshot(pb.DeleteSnapshotRequest(domain_name=dom, snapshot_name=name, request_id=uuid.uuid4().hex),
                             timeout=600))


def overhead_rows(agent: Agent, work: Path, repeat: int) -> Rows:
    """A/B: a non-live create through the agent, the same QMP steps direct on events."""
    fill_mib = OVERHEAD_MIB * 7 // 10
    # READY comes after the fill.
    guestprobe.wait_ready(boot(agent, work, "ov", OVERHEAD_MIB, f"domsnap.fill={fill_mib} {IDLE}"), timeout=300)
    sock = agent.state_dir / "qemu" / "ov" / "qmp.sock"
    wall: dict[str, list[float]] = {"agent": [], "direct": []}
    pause: dict[str, list[float]] = {"agent": [], "direct": []}
    for i in range(repeat):
        for side in ("agent", "direct") if i % 2 == 0 else ("direct", "agent"):
            if side == "agent":
                stub = agent.stub()
                # Connected before the clock starts, as the direct side's QMP session is.
                stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=30)
                t0 = time.perf_counter()
                snap = create(stub, "ov", f"ov{i}")
                wall[side].append(time.perf_counter() - t0)
                pause[side].append(snap.downtime.ToNanoseconds() / 1e9)
                delete(stub, "ov", f"ov{i}")
            else:
                agent.stop()
                mem = work / f"direct{i}.save"
                res = asyncio.run(qmp_direct.create(sock, mem, vdev="xvda", tag=f"direct{i}", wait="events"))
                wall[side].append(res.wall)
                pause[side].append(res.pause)
                mem.unlink()
                agent.start()
    ratio = statistics.median(wall["agent"]) / statistics.median(wall["direct"])
    return [
        (f"non-live create, {OVERHEAD_MIB} MiB guest ({fill_mib} MiB filled): wall", med(wall["agent"]),
         f"direct QMP on events: {med(wall['direct'])}", f"{ratio:.2f}x", "≤ 1.05x"),
        ("the same: guest pause", med(pause["agent"]), f"direct: {med(pause['direct'])}",
         f"{statistics.median(pause['agent']) / statistics.median(pause['direct']):.2f}x", ""),
    ]


def rpc_rows(agent: Agent, work: Path, domains: int, repeat: int) -> tuple[Rows, list[ClientCall]]:
    """The unary rows, and the calls through the relay as the client timed them (for rpc_trace)."""
    names = [f"d{i:02d}" for i in range(domains)]
    serials = [boot(agent, work, name, SMALL_MIB, IDLE) for name in names]
    for serial in serials:
        guestprobe.wait_ready(serial, timeout=300)
    idle = HostCpu([agent.state_dir / "qemu" / name / "qemu.pid" for name in names])
    idle.start()
    time.sleep(5)  # the guests, booted, alone
    idle_cpu = idle.stop()
    stop = threading.Event()
    made = [0]

    def snapshots() -> None:
        stub = agent.stub()
        while not stop.is_set():
            name = f"bg{made[0]}"
            create(stub, "ov", name)
            delete(stub, "ov", name)
            made[0] += 1

    # Where the agent's gRPC server listens itself (unix_socket.private_socket_path): health answers anyone there.
    private = agent.sock.parent / f".{agent.sock.name}.private" / "grpc.sock"
    with grpc.insecure_channel(agent.address) as ch, grpc.insecure_channel(f"unix:{private}") as direct, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        stub = pb_grpc.SnapshotAgentStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        unrelayed = health_pb2_grpc.HealthStub(direct)
        calls: dict[str, Callable[[], object]] = {
            BASELINE: lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
            OWN_SOCKET: lambda: unrelayed.Check(health_pb2.HealthCheckRequest(), timeout=10),
            "GetAgentInfo": lambda: stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=10),
            "ListDomains": lambda: stub.ListDomains(pb.ListDomainsRequest(), timeout=10),
            "GetDomain": lambda: stub.GetDomain(pb.GetDomainRequest(domain_name="d00"), timeout=10),
            "ListSnapshots, 1 domain": lambda: stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name="ov"),
                                                                  timeout=10),
        }
        assert len(stub.ListDomains(pb.ListDomainsRequest(), timeout=10).domains) == domains + 1
        log_from = agent.log.stat().st_size
        busy = HostCpu([agent.state_dir / "qemu" / name / "qemu.pid" for name in [*names, "ov"]])
        busy.start()
        background = pool.submit(snapshots)
        probe = WakeProbe()
        try:
            timed_calls = interleaved(calls, RPC_CALLS)
        finally:
            wake = probe.stop()
            stop.set()
            background.result()
        rounds_cpu = busy.stop()
    python = process([sys.executable, "-c", "pass"], repeat)
    cli = process([str(BIN / "domsnap"), "-H", agent.address, "list"], repeat)
    virsh = shutil.which("virsh")
    floor = f"`python -c pass`: {python}"
    if virsh:
        peer = process([virsh, "-c", "test:///default", "list"], repeat)
        floor = f"`virsh -c test:///default list`: {peer}; {floor}"
    with open(agent.log) as f:
        f.seek(log_from)
        served = server_side(f.read())
    lat: dict[str, list[float]] = {label: [] for label in calls}
    for c in timed_calls:
        lat[c.label].append(c.t1 - c.t0)
    base = lat.pop(BASELINE)
    own = lat.pop(OWN_SOCKET)
    rows: Rows = [(f"{domains} small domains ({SMALL_MIB} MiB, `{IDLE}`), booted and idle: host CPU over 5 s",
                   idle_cpu, "", "", ""),
                  ("the same, during the RPC rounds below (and the snapshots they run under)", rounds_cpu, "", "",
                   ""),
                  (f"health Check through the unix socket's relay: p50 / p99 ({domains + 1} domains, under the same "
                   "snapshots)", f"{pct(base, 50) * 1000:.2f} / {pct(base, 99) * 1000:.2f} ms",
                   f"on the gRPC server's own socket: {pct(own, 50) * 1000:.2f} / {pct(own, 99) * 1000:.2f} ms",
                   f"{pct(base, 99) / pct(own, 99):.2f}x at p99", ""),
                  ("the host's own wake-up latency meanwhile: how late a process sleeping 0.5 ms wakes, p50 / p99 "
                   "(bench/wake_probe.py)", f"{pct(wake, 50) * 1000:.2f} / {pct(wake, 99) * 1000:.2f} ms; "
                   f"{sum(1 for w in wake if w > 0.002)} of {len(wake)} wake-ups over 2 ms", "", "", "")]
    for label, values in lat.items():
        inside = served.get(label.split(",")[0], [0.0])
        rows.append((f"{label}: p50 / p99 ({domains + 1} domains, {made[0]} snapshots taken meanwhile)",
                     f"{pct(values, 50) * 1000:.2f} / {pct(values, 99) * 1000:.2f} ms (inside the agent: "
                     f"{pct(inside, 50):.2f} / {pct(inside, 99):.2f} ms)",
                     f"health Check: {pct(base, 50) * 1000:.2f} / {pct(base, 99) * 1000:.2f} ms",
                     f"{pct(values, 99) / pct(base, 99):.2f}x at p99", "p99 ≤ 5 ms"))
    rows.append((f"`domsnap list` ({domains + 1} domains), process wall", cli, floor, "", "≤ 150 ms"))
    return rows, [c for c in timed_calls if c.label != OWN_SOCKET]


def interleaved(calls: dict[str, Callable[[], object]], n: int) -> list[ClientCall]:
    """Each call timed, the calls taken in turn (one of each, n times): every
    method meets the same moments of the snapshots running meanwhile, as its baseline does."""
    for call in calls.values():
        for _ in range(20):
            call()
    out: list[ClientCall] = []
    for _ in range(n):
        for label, call in calls.items():
            t0 = time.monotonic()
            call()
            out.append(ClientCall(label, t0, time.monotonic()))
    return out


def server_side(log: str) -> dict[str, list[float]]:
    """Each unary call's time inside the agent (its request log line's ms), by method."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r"rpc method=/domsnap\.v1\.SnapshotAgent/(\w+) .* ms=([\d.]+)", log):
        out.setdefault(m[1], []).append(float(m[2]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="catalogue,overhead,rpc", help="sections to run (a quick look at one)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    started = datetime.now(UTC)
    load0 = os.getloadavg()[0]
    # The CLI's start as installed (pip byte-compiles): not compiling sources
    # where PYTHONDONTWRITEBYTECODE kept an edited module's .pyc from being written.
    compileall.compile_dir(Path(domsnap.__file__).parent, quiet=1)
    rows: Rows = []
    with tempfile.TemporaryDirectory(prefix="domsnap-cost-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if "catalogue" in only:
            rows += catalogue_rows(work, args.count, args.big, args.repeat)
        if only & {"overhead", "rpc"}:
            rows += guest_rows(work, args.domains, args.repeat, only)
        # Before the work folder goes: removing 100,000 snapshot folders takes minutes on a loaded disk.
        return print_rows(started, load0, args.repeat, rows)


def guest_rows(work: Path, domains: int, repeat: int, only: set[str]) -> Rows:
    trace = work / "rpc-trace.json"
    # The unary path's moments (bench/rpc_trace.py), written when the agent exits.
    agent = Agent(work / "guests", env={"PYTHONPATH": str(HERE / "tracehook"), "DOMSNAP_BENCH_TRACE_RPC": str(trace)})
    agent.base.mkdir()
    agent.start()
    calls: list[ClientCall] = []
    try:
        # The RPC rows take their snapshots of the overhead rows' guest.
        rows = overhead_rows(agent, work, repeat)
        if "rpc" in only:
            unary, calls = rpc_rows(agent, work, domains, repeat)
            rows += unary
    finally:
        stub = agent.stub()
        for d in stub.ListDomains(pb.ListDomainsRequest(), timeout=30).domains:
            stub.DestroyDomain(pb.DestroyDomainRequest(domain_name=d.name, request_id=uuid.uuid4().hex), timeout=60)
        agent.stop()
    return rows + (rpc_trace.rows(rpc_trace.match(trace, calls), len(calls)) if calls else [])


def print_rows(started: datetime, load0: float, repeat: int, rows: Rows) -> int:
    load1 = os.getloadavg()[0]
    lines = [f"# The agent's own cost ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {machine()}; load average {load0:.2f} at start, {load1:.2f} at end.", "",
             f"Median (min-max) of {repeat} runs unless said; RPC latencies over {RPC_CALLS} calls each, "
             "the methods called in turn. Ratio: baseline / domsnap for the catalogue rows (above 1: faster than "
             "reading the manifests), domsnap / baseline otherwise.", "",
             f"Command: `{' '.join(['.venv/bin/python -m bench.agent_cost', *sys.argv[1:]])}`", "",
             "| figure | domsnap | baseline, same run | ratio | goal (issue 18) |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results" / f"agent-cost-{started:%Y%m%dT%H%M}.md"
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
