"""The xen driver on real Xen: the Xen lab tier.

lab/xen/build.sh builds (cached) a Xen 4.17 host image from Debian packages;
lab/xen/run.py boots it under QEMU TCG once per session, and inside its dom0
lab/xen/selftest.py runs domsnapd with the xen driver against real PV, PVH
and HVM domUs (qcow2 and LVM disks; non-live and live snapshots; the VM
generation ID an HVM guest reads) and prints one LABRESULT line per check.
These tests assert on those lines.

A lab that cannot be built (a Debian package missing, no network to the
mirror) or does not run to its end FAILS, with the reason. The tier is
skipped only when DOMSNAP_SKIP_XENLAB=1 says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "lab" / "xen" / "run.py"
#: build (cold: ~2 min, more on a slow mirror) + boot + self-test (~10 min under TCG)
LAB_TIMEOUT = float(os.environ.get("DOMSNAP_XENLAB_TIMEOUT", "2400"))
BUILD_TIMEOUT = 3600.0

#: Every check the self-test makes; each must report PASS.
EXPECTED = (
    "agent-start",
    "capture-pv",
    "capture-pvh",
    "pv-qcow2-nonlive",
    "pvh-qcow2-nonlive",
    "pvh-qcow2-live",
    "pv-live-refused",
    "pv-lvm-thick-nonlive",
    "pvh-lvm-thin-live",
    "hvm-qcow2-nonlive",
    "hvm-qcow2-live",
    "hvm-lvm-nonlive",
    "hvm-genid",
)

# The session's first test pays for the build and the boot: past the suite's 300 s default.
pytestmark = [pytest.mark.xenlab, pytest.mark.slow, pytest.mark.timeout(LAB_TIMEOUT + BUILD_TIMEOUT + 300)]


@pytest.fixture(scope="session")
def lab() -> dict[str, Any]:
    if os.environ.get("DOMSNAP_SKIP_XENLAB") == "1":
        pytest.skip("DOMSNAP_SKIP_XENLAB=1: the Xen lab tier (build + boot of a Xen 4.17 host under QEMU TCG) "
                    "was skipped on request")
    out = Path(tempfile.mkdtemp(prefix="domsnap-xenlab-"))
    try:
        proc = subprocess.run(
            [sys.executable, str(RUN), "--out", str(out), "--timeout", str(LAB_TIMEOUT - 60),
             "--build-timeout", str(BUILD_TIMEOUT)],
            capture_output=True, text=True, timeout=LAB_TIMEOUT + BUILD_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the Xen lab did not finish within {LAB_TIMEOUT + BUILD_TIMEOUT:.0f} s (output in {out})")
    results = out / "results.json"
    if not results.is_file():
        pytest.fail(f"the Xen lab wrote no results (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")
    record: dict[str, Any] = json.loads(results.read_text())
    record["out"] = str(out)
    if record.get("error"):
        pytest.fail(f"the Xen lab did not run to its end: {record['error']} (serial log: {out}/serial.log)")
    return record


def test_lab_ran_to_its_end(lab: dict[str, Any]) -> None:
    assert lab["summary"], f"no LABSUMMARY line; see {lab['out']}/serial.log"
    assert lab["poweroff"], "dom0 never reached its power-off"
    assert lab["info"].get("xen_version", "").startswith("4.17"), lab["info"]
    missing = [name for name in EXPECTED if name not in lab["results"]]
    assert not missing, f"the self-test reported nothing for {missing}; see {lab['out']}/serial.log"


@pytest.mark.parametrize("name", EXPECTED)
def test_lab_check(lab: dict[str, Any], name: str) -> None:
    got = lab["results"].get(name)
    assert got is not None, f"the self-test reported nothing for {name}; see {lab['out']}/serial.log"
    assert got["status"] == "PASS", f"{name}: {got['status']} {got['detail']} (serial log: {lab['out']}/serial.log)"


#: The agent's wall time per operation against the tools' work it waited on
#: (xl's save/restore/destroy/unpause/migrate, LVM, qemu-img, QMP): the
#: overhead of its own queries and bookkeeping must stay small.
COST_TARGET = 1.1


def _cost(lab: dict[str, Any], kind: str) -> float:
    fields = dict(kv.split("=", 1) for kv in (lab["summary"] or "").split() if "=" in kv)
    ratio = fields.get(f"{kind}_ratio_max")
    assert ratio is not None, f"the summary gives no {kind} cost: {lab['summary']} (see {lab['out']}/serial.log)"
    return float(ratio)


@pytest.mark.parametrize("kind", ["create", "revert"])
def test_lab_reports_the_agents_cost(lab: dict[str, Any], kind: str) -> None:
    assert _cost(lab, kind) >= 1.0, "the agent cannot take less time than the commands it waited on"


@pytest.mark.xfail(reason="met on a quiet host, not on every loaded one: speed is not asserted in timed tests. "
                          "No xl query is left in a create or a revert (libxl is asked in the agent's process, "
                          "`xl list -l` once per domain); what remains is the agent's own Python in the "
                          "single-vCPU TCG dom0. Merged main, quiet (2026-12-03 05:35, load 0.9-1.3): creates "
                          "median 1.035x, worst 1.100x (the agent's first create); reverts median 1.028x, worst "
                          "1.051x. Under load 4-23: creates worst 1.104-1.108x, reverts 1.071x; "
                          "bench/results/xen-lab-cost-20261203T0440.md",
                   strict=False)
@pytest.mark.parametrize("kind", ["create", "revert"])
def test_lab_cost_target(lab: dict[str, Any], kind: str) -> None:
    assert _cost(lab, kind) <= COST_TARGET, (f"a {kind} took more than {COST_TARGET}x the tools' time it waited on "
                                             f"(the cost:*:{kind} LABTIME lines of {lab['out']}/serial.log)")
