#!/usr/bin/env python3
"""Boot the Xen lab (built by lab/xen/build.sh) under QEMU TCG and collect
what its dom0 self-test (lab/xen/selftest.py) prints on the serial line.

    lab/xen/run.py [--out DIR] [--timeout SECONDS] [--tests a,b,...] [--no-build]

Writes into DIR (default: a new directory under /tmp):
  serial.log      every serial line, prefixed with the host seconds since QEMU started
  results.json    {"results": {test: {"status", "detail"}}, "times": {...}, "steps": [...],
                   "boot": {...}, "exit": ..., "error": ...}
  files/          outputs the self-test captured (LABFILE), e.g. real `xl` outputs
Prints the LABRESULT/LABTIME lines as they come; exit status 0 when every
test passed, 1 when one failed, 2 when the lab did not run to its end.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LAB_DIR = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
# Xen's command line: `smap=0 smep=0` are required under TCG (without them
# dom0 dies at once with an unhandled #PF in create_bounce_frame).
# `dom0_max_vcpus=1`: with two dom0 vCPUs, processes in dom0 crashed at random
# after the first save/restore of a domU (malloc aborts in xl, qemu-img and
# domsnapd, ld.so inconsistencies, SIGSEGV of xl) in 5 runs of 6, while a
# digest of dom0's RAM-held root and of a 128 MiB buffer never changed: the
# signature of stale TLB entries in multi-threaded dom0 processes (a
# cross-vCPU TLB shootdown of a PV guest that TCG gets wrong), not of pages
# overwritten. With one dom0 vCPU every run passed. domUs still get the
# second CPU.
XEN_ARGS = ("com1=115200,8n1 console=com1 dom0_mem=2048M,max:2048M dom0_max_vcpus=1 smap=0 smep=0 "
            "loglvl=warning guest_loglvl=warning")
DOM0_ARGS = "console=hvc0 loglevel=4"
# `max`: TCG emulates AMD-V with nested paging, which PVH guests need.
# Without AVX: QEMU 7.2's TCG offers AVX/AVX2, and now and then a PVH domU's
# first process died of #UD on a VEX instruction (`vmovd`, glibc's AVX2
# string functions chosen from CPUID) that its CPUID had promised. Without
# it in the CPUID, glibc picks its SSE variants.
CPU = os.environ.get("DOMSNAP_XENLAB_CPU", "max,-avx,-avx2,-fma,-f16c")
ACCEL = os.environ.get("DOMSNAP_XENLAB_ACCEL", "tcg,thread=multi,tb-size=512")


def build(timeout: float) -> dict[str, str]:
    proc = subprocess.run(["bash", str(LAB_DIR / "build.sh")], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"lab/xen/build.sh failed ({proc.returncode}):\n{tail}")
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for key in ("xen", "dom0_kernel", "dom0_initrd"):
        if not Path(out.get(key, "")).is_file():
            raise RuntimeError(f"lab/xen/build.sh reported no {key}")
    return out


def qemu_argv(paths: dict[str, str], extra_dom0: str) -> list[str]:
    dom0 = f"{paths['dom0_kernel']} {DOM0_ARGS} {extra_dom0}".strip()
    if "," in dom0:
        raise ValueError("the dom0 command line cannot hold a comma (QEMU's multiboot module separator)")
    return [
        QEMU, "-accel", ACCEL, "-cpu", CPU, "-m", "3072", "-smp", "2",
        "-machine", "pc", "-no-reboot", "-display", "none", "-vga", "none", "-monitor", "none",
        "-serial", "stdio", "-net", "none",
        "-kernel", paths["xen"], "-append", f"{XEN_ARGS} {os.environ.get('DOMSNAP_XENLAB_XEN_ARGS', '')}".strip(),
        "-initrd", f"{dom0},{paths['dom0_initrd']}",
    ]


class Collector:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.files = out / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.serial = open(out / "serial.log", "w")  # noqa: SIM115
        self.results: dict[str, dict[str, str]] = {}
        self.times: dict[str, dict[str, str]] = {}
        self.steps: list[dict[str, Any]] = []
        self.boot: dict[str, float | str] = {}
        self.info: dict[str, str] = {}
        self.summary: str | None = None
        self.exit: str | None = None
        self.poweroff = False
        self._chunks: dict[str, list[str]] = {}

    def line(self, t: float, text: str) -> None:
        self.serial.write(f"{t:8.2f} {text}\n")
        self.serial.flush()
        if "(XEN)" in text and "xen_banner" not in self.boot and "Xen version" in text:
            self.boot["xen_banner"] = round(t, 2)
        m = re.match(r"(LAB[A-Z-]*) ?(.*)$", text.strip())
        if not m:
            return
        kind, rest = m.group(1), m.group(2)
        if kind == "LABRESULT":
            name, _, tail = rest.partition(" ")
            status, _, detail = tail.partition(" ")
            self.results[name] = {"status": status, "detail": detail}
            print(f"[{t:7.1f}] {text.strip()}", flush=True)
        elif kind == "LABTIME":
            name, _, tail = rest.partition(" ")
            self.times.setdefault(name, {}).update(kv.split("=", 1) for kv in tail.split() if "=" in kv)
            print(f"[{t:7.1f}] {text.strip()}", flush=True)
        elif kind == "LABSTEP":
            parts = rest.split()
            if len(parts) >= 4:
                self.steps.append({"test": parts[0], "step": parts[1], "seconds": float(parts[2]),
                                   "rc": parts[3].removeprefix("rc=")})
        elif kind == "LABBOOT":
            self.boot["dom0_init"] = round(t, 2)
        elif kind == "LABREADY":
            self.boot["dom0_ready"] = round(t, 2)
            print(f"[{t:7.1f}] {text.strip()}", flush=True)
        elif kind == "LABINFO":
            self.info.update(kv.split("=", 1) for kv in rest.split() if "=" in kv)
            print(f"[{t:7.1f}] {text.strip()}", flush=True)
        elif kind == "LABFILE":
            name, _, chunk = rest.partition(" ")
            self._chunks.setdefault(name, []).append(chunk.strip())
        elif kind == "LABFILE-END":
            name = rest.split()[0]
            data = base64.b64decode("".join(self._chunks.pop(name, [])))
            (self.files / Path(name).name).write_bytes(data)
        elif kind == "LABSUMMARY":
            self.summary = rest
            print(f"[{t:7.1f}] {text.strip()}", flush=True)
        elif kind == "LABEXIT":
            self.exit = rest
        elif kind == "LABPOWEROFF":
            self.poweroff = True


def run_lab(out: Path, timeout: float, tests: str, build_timeout: float, no_build: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t_build = time.monotonic()
    error: str | None = None
    col = Collector(out)
    record: dict[str, Any] = {}
    try:
        paths = build(build_timeout) if not no_build else {
            "xen": str(Path(os.environ.get("DOMSNAP_XENLAB_DIR", Path.home() / ".cache/domsnap/xenlab")) / "xen"),
        }
        if no_build:
            d = Path(paths["xen"]).parent
            paths.update(dom0_kernel=str(d / "vmlinuz-dom0"), dom0_initrd=str(d / "dom0.cpio"))
        record["build_seconds"] = round(time.monotonic() - t_build, 1)
        record["versions"] = paths.get("versions", "")
        extra = f"domsnap.labtimeout={int(timeout) - 60}"
        if tests:
            # A comma would end the module's command line (QEMU's multiboot separator).
            extra += f" domsnap.labtests={tests.replace(',', '+')}"
        if os.environ.get("DOMSNAP_XENLAB_DOM0_ARGS"):
            extra += " " + os.environ["DOMSNAP_XENLAB_DOM0_ARGS"]
        argv = qemu_argv(paths, extra)
        record["qemu"] = argv
        print(f"booting the Xen lab: {' '.join(argv)}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed = threading.Event()

        def watchdog() -> None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed.set()
                os.killpg(proc.pid, signal.SIGKILL)

        threading.Thread(target=watchdog, daemon=True).start()
        assert proc.stdout is not None
        for raw in proc.stdout:
            col.line(time.monotonic() - t0, raw.decode("utf-8", "replace").rstrip("\r\n"))
        rc = proc.wait()
        record["qemu_exit"] = rc
        record["wall_seconds"] = round(time.monotonic() - t0, 1)
        if killed.is_set():
            error = f"the lab ran over {timeout:.0f} s and was killed"
        elif col.summary is None:
            error = f"the lab ended (QEMU exit {rc}) without the self-test's summary; see {out}/serial.log"
    except Exception as e:
        error = str(e)
    record.update(results=col.results, times=col.times, steps=col.steps, boot=col.boot, info=col.info,
                  summary=col.summary, exit=col.exit, poweroff=col.poweroff, error=error)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    if error:
        print(f"LAB ERROR: {error}", file=sys.stderr, flush=True)
        return 2
    return 0 if col.results and all(r["status"] in ("PASS", "SKIP") for r in col.results.values()) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--timeout", type=float, default=float(os.environ.get("DOMSNAP_XENLAB_TIMEOUT", 1800)))
    p.add_argument("--build-timeout", type=float, default=3600)
    p.add_argument("--tests", default="", help="comma-separated self-test names (default: all)")
    p.add_argument("--no-build", action="store_true", help="boot what is built, do not run build.sh")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="domsnap-xenlab-"))
    rc = run_lab(out, a.timeout, a.tests, a.build_timeout, a.no_build)
    print(f"results: {out}/results.json", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
