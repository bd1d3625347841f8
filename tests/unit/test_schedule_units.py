"""systemd/domsnap-snapshot@.timer and .service: `systemd-analyze verify`
passes on an instance of each (ExecStart= pointed at this checkout's
domsnap, Documentation= at docs/), with no warning; the timer starts the
service of its own instance. What the service runs is tested against a real
agent in tests/integration/test_schedule.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALLED = "/usr/local/bin/domsnap"


def test_units_verify(tmp_path: Path) -> None:
    for suffix in (".timer", ".service"):
        text = (REPO / "systemd" / f"domsnap-snapshot@{suffix}").read_text()
        if suffix == ".service":
            assert f"ExecStart={INSTALLED} " in text
            text = text.replace(INSTALLED, str(Path(sys.executable).parent / "domsnap"))
        (tmp_path / f"domsnap-snapshot@{suffix}").write_text(text)
    man = tmp_path / "man" / "man1"
    man.mkdir(parents=True)
    shutil.copy(REPO / "docs" / "domsnap.1", man)
    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze is not None, "scripts/setup installs systemd (systemd-analyze)"
    proc = subprocess.run([systemd_analyze, "verify", str(tmp_path / "domsnap-snapshot@web.timer"),
                           str(tmp_path / "domsnap-snapshot@web.service")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MANPATH": str(tmp_path / "man")})
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
