"""systemd/: the unit passes `systemd-analyze verify` (its ExecStart= pointed
at this checkout's domsnapd, its Documentation= at docs/ through MANPATH),
keeps the settings the agent relies on, stays hardened, and the sysusers.d
and tmpfiles.d files make the domsnap group and /run/domsnap (0750) in a
scratch root, run as the unit's ExecStartPre= lines run them.

`systemd-analyze verify` and `security --offline` work without systemd as
PID 1, so this runs in a container too.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "domsnapd.service"
DOMSNAPD = Path(sys.executable).parent / "domsnapd"
INSTALLED_EXEC = "/usr/local/bin/domsnapd"
# systemd-analyze's exposure score, 0 (locked down) to 10; ours is 5.6 with
# everything QEMU and xl need left in (5.3 before CAP_SYS_PTRACE, which QEMU
# 7.2's background snapshots need: the unit's comments). Raise it only with a reason.
MAX_EXPOSURE = 5.6


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: scripts/setup installs it (Debian package systemd)")
    return path


def _settings() -> dict[str, list[str]]:
    """Every KEY=VALUE of the unit, repeated keys kept in order (sections flattened)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit, runnable from this checkout, and the man pages it names."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXEC}\n" in text
    unit = tmp_path / "domsnapd.service"
    unit.write_text(text.replace(f"ExecStart={INSTALLED_EXEC}", f"ExecStart={DOMSNAPD}"))
    for page in (REPO / "docs").iterdir():
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    return unit


def test_unit_verifies(unit_here: Path) -> None:
    proc = subprocess.run([_tool("systemd-analyze"), "verify", str(unit_here)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MANPATH": str(unit_here.parent / "man")})
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_unit_is_hardened(unit_here: Path) -> None:
    proc = subprocess.run([_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                           f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit_here)],
                          capture_output=True, text=True, timeout=60)
    overall = [line for line in proc.stdout.splitlines() if "Overall exposure" in line]
    assert proc.returncode == 0, overall or proc.stdout[-2000:] + proc.stderr


def test_unit_keeps_what_the_agent_relies_on() -> None:
    s = _settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    # Domains are separate processes that outlive an agent restart.
    assert s["KillMode"] == ["process"]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"]
    assert s["PrivateTmp"] == ["yes"] and s["NoNewPrivileges"] == ["yes"]
    # Room for thousands of relayed connections (three descriptors each).
    assert int(s["LimitNOFILE"][0]) >= 65536
    writable = " ".join(s["ReadWritePaths"]).split()
    for path in ("/var/lib/domsnap", "/run/domsnap", "-/var/lib/domsnap/snapshots"):
        assert path in writable
    caps = " ".join(s["CapabilityBoundingSet"]).split()
    # What QEMU and xl need (hypercalls, device mapper, tap devices, memory locking) ...
    assert {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE"} <= set(caps)
    # (QEMU's userfaultfd, for background snapshots: tests/integration/test_live_mode.py runs them under this set)
    assert "CAP_SYS_PTRACE" in caps
    # ... and not what they do not.
    assert not {"CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_BOOT", "CAP_MKNOD"} & set(caps)
    # Nothing filters the syscalls QEMU makes (userfaultfd among them).
    assert "SystemCallFilter" not in s
    # /dev/kvm and /dev/xen must stay reachable: no device allow-list.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert key not in s, f"{key} would break the domains (see the unit's comments)"


def test_sysusers_and_tmpfiles_make_the_group_and_the_socket_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name, folder in (("domsnap.sysusers", "sysusers.d"), ("domsnap.tmpfiles", "tmpfiles.d")):
        (root / "etc" / folder).mkdir(parents=True)
        shutil.copy(REPO / "systemd" / name, root / "etc" / folder / "domsnap.conf")
    # As the unit's ExecStartPre= lines run them, in a scratch root.
    pre = _settings()["ExecStartPre"]
    assert pre == ["+/usr/bin/systemd-sysusers domsnap.conf", "+/usr/bin/systemd-tmpfiles --create domsnap.conf"]
    for line in pre:
        program, *args = line.removeprefix("+").split()
        proc = subprocess.run([_tool(Path(program).name), f"--root={root}", *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
    groups = dict(line.split(":")[0:3:2] for line in (root / "etc" / "group").read_text().splitlines())
    st = os.stat(root / "run" / "domsnap")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (0, int(groups["domsnap"]))
