"""What an installation gives: both programs' --version, and the bash
completion where README.md installs it, found there by bash-completion's
own on-demand loader (as a login shell would find it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from domsnap import __version__

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


@pytest.mark.parametrize("program", ["domsnap", "domsnapd"])
def test_version(program: str) -> None:
    proc = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{program} {__version__}\n", "")


def test_readme_installs_the_completion_where_bash_completion_loads_it(tmp_path: Path) -> None:
    if not BASH_COMPLETION.exists():
        pytest.fail("bash-completion is missing: scripts/setup installs it")
    line = re.search(r"^install -D -m644 client/completion\.bash (/\S+)$", (REPO / "README.md").read_text(), re.M)
    assert line is not None, "README.md no longer says how to install the completion"
    target = Path(line[1])
    # /usr/local/share is on bash-completion's default search path (XDG_DATA_DIRS);
    # install under a stand-in for it and point XDG_DATA_DIRS there.
    share = target.parents[2]
    assert (share.name, target.parent.name, target.name) == ("share", "completions", "domsnap")
    stand_in = tmp_path / share.relative_to("/")
    dest = stand_in / target.relative_to(share)
    dest.parent.mkdir(parents=True)
    dest.write_text((REPO / "client" / "completion.bash").read_text())
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         f'source {BASH_COMPLETION}; _completion_loader domsnap; complete -p domsnap'],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "XDG_DATA_DIRS": str(stand_in)})
    assert (proc.returncode, proc.stdout.strip()) == (0, "complete -F _domsnap domsnap"), proc.stderr
