"""What an installation gives: both programs' --version, and the bash
completion where README.md installs it, found there by bash-completion's
own on-demand loader (as a login shell would find it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
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


def test_wheel_holds_every_module_under_the_domsnap_package(tmp_path: Path) -> None:
    """A non-editable install: the wheel maps agent/, client/ and proto/domsnap/
    into one package `domsnap`, every module in it, and its programs run from it."""
    src = tmp_path / "src"
    for folder in ("agent", "client", "proto/domsnap"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, src / file)
    # The venv's setuptools (grpcio-tools needs it): no isolated build environment to install.
    subprocess.run([str(BIN / "pip"), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "w").glob("domsnap-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    sources = {f"domsnap/{p.relative_to(REPO / folder)}" if folder == "proto/domsnap" else
               f"domsnap/{p.relative_to(REPO)}"
               for folder in ("agent", "client", "proto/domsnap") for p in (REPO / folder).rglob("*.py")}
    assert sources - names == set(), "modules the wheel lacks (the packages list of pyproject.toml?)"
    assert not {n for n in names if n.split("/")[0] in ("agent", "client", "proto")}, "folders leaked as packages"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    code = ("import sys, domsnap.agent.main, domsnap.client.cli; "
            "print(domsnap.agent.main.__file__); sys.argv = ['domsnapd', '--version']; domsnap.agent.main.main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.splitlines() == [str(tmp_path / "site" / "domsnap" / "agent" / "main.py"),
                                        f"domsnapd {__version__}"], proc.stderr
    assert "domsnapd = domsnap.agent.main:main" in (tmp_path / "site" / entry_points).read_text()
