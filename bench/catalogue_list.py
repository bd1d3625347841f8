"""ListSnapshots with a large catalogue, through a real agent.

    .venv/bin/python -m bench.catalogue_list [--count 10000] [--repeat 5]

Fills a catalogue with COUNT snapshots of one domain (real manifests in real
snapshot directories, 1 KiB memory images: the listing reads manifests and
file sizes, never images), then times, repeated: ListSnapshots over the unix
socket, `domsnap snapshot-list` wall time, and as the baseline in the same
run, the bare cost of reading the same manifests (open + json.loads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from domsnap.agent import manifest
from domsnap.agent.manifest import Manifest
from domsnap.agent.storage.base import DiskRecord, Method
from domsnap.v1 import domsnap_pb2 as pb
from testbed.harness import BIN, Agent

DOMAIN = "big"


def fill(state_dir: Path, root: Path, count: int, domain: str = DOMAIN, *, images: bool = True) -> list[Path]:
    """Snapshot directories and the catalogue's pointers to them, written
    plainly (no fsync: a bench's data); the agent indexes them when it starts.
    `images`: each with its 1 KiB memory image (else only the manifest names one)."""
    pointers = state_dir / "catalogue" / domain
    pointers.mkdir(parents=True)
    dirs = []
    parent = ""
    for i in range(count):
        name = f"s{i:05d}"
        d = root / domain / name
        d.mkdir(parents=True)
        if images:
            (d / manifest.MEMORY).write_bytes(b"\0" * 1024)
        m = Manifest(
            name=name, domain=domain, description="", created_at=1e9 + i, finished_at=1e9 + i + 1,
            state="running", live=False, domain_config=f'name = "{domain}"\n',
            disks=(DiskRecord("xvda", "qcow2", "qcow2", Method.INTERNAL, f"/img/{domain}.qcow2", tag=name),),
            memory_file=str(d / manifest.MEMORY), memory_bytes=1024, driver="qemu",
            hypervisor_version="QEMU 7.2.22", parent=parent,
        )
        (d / manifest.MANIFEST).write_text(m.to_json())
        (pointers / name).write_text(f"{d}\n")
        parent = name
        dirs.append(d)
    (pointers / ".current").write_text(f"{parent}\n")
    return dirs


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="domsnap-cat-") as tmp:
        agent = Agent(Path(tmp))
        t0 = time.perf_counter()
        dirs = fill(agent.state_dir, agent.snapshot_root, args.count)
        filled = time.perf_counter() - t0
        agent.start()
        try:
            stub = agent.stub()

            def rpc() -> None:
                n, token = 0, ""
                while True:
                    page = stub.ListSnapshots(pb.ListSnapshotsRequest(domain_name=DOMAIN, page_token=token),
                                              timeout=300)
                    n += len(page.snapshots)
                    if not (token := page.next_page_token):
                        break
                assert n == args.count, n

            def cli() -> None:
                subprocess.run([str(BIN / "domsnap"), "-H", agent.address, "snapshot-list", DOMAIN],
                               check=True, capture_output=True, timeout=300)

            def baseline() -> None:
                for d in dirs:
                    json.loads((d / manifest.MANIFEST).read_text())

            results = {"read the manifests (baseline)": timed(baseline, args.repeat),
                       "ListSnapshots (unix socket)": timed(rpc, args.repeat),
                       "domsnap snapshot-list": timed(cli, args.repeat)}
        finally:
            agent.stop()
    base = statistics.median(results["read the manifests (baseline)"])
    lines = [f"# ListSnapshots with {args.count} snapshots ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)", "",
             f"Catalogue filled in {filled:.1f} s; median (min-max) of {args.repeat} runs; the first "
             "ListSnapshots parses every manifest, later ones only stat them.", "",
             "| | seconds | x baseline |", "|---|---|---|"]
    for label, values in results.items():
        med = statistics.median(values)
        lines.append(f"| {label} | {med:.3f} ({min(values):.3f}-{max(values):.3f}) | {med / base:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M", time.gmtime())
    out = Path(__file__).resolve().parent / "results" / f"catalogue-list-{stamp}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
