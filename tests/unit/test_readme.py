"""README.md and docs/ against the repository and the code: every file they
name is in the repository, and the defaults and limits README.md states are
the code's."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import config as agent_config
from domsnap.agent import limits
from domsnap.agent.drivers import qemu_migration
from domsnap.client import connection

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").iterdir())]
# A path in the repository, under one of its top folders; a Markdown file named alone.
TOP = "|".join(sorted(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")))
REPO_PATH = re.compile(rf"(?<![\w/.$-])((?:{TOP})/[\w./*-]*[\w/*])(?![\w-])")
MARKDOWN = re.compile(r"(?<![\w/.$-])([\w.-]+\.md)(?![\w-])")


def _ignored(path: str) -> bool:
    """Whether git ignores `path` (an output folder, like bench/results/raw/)."""
    return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], timeout=30).returncode == 0


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_named_is_in_the_repository(doc: str) -> None:
    text = (REPO / doc).read_text()
    paths = sorted(set(REPO_PATH.findall(text)))
    missing = [p for p in paths if not list(REPO.glob(p.rstrip("/"))) and not _ignored(p)]
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.md"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    markdown = {Path(p).name for p in tracked}
    missing += sorted(set(MARKDOWN.findall(text)) - markdown)
    assert missing == [], f"{doc} names files the repository does not have"


def _toml_blocks(text: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", text, re.M | re.S)


def _as_toml(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_as_toml(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def test_readme_config_shows_the_agents_defaults() -> None:
    """The settings the README's domsnapd.toml shows, top-level and [qemu], at
    the code's defaults; [tls], [roles] and [metrics] are examples of settings
    that are off unless set. (domsnap.cfg(5) documents every setting:
    test_docs.py.)"""
    (block,) = _toml_blocks(README)
    shown = tomllib.loads(block)
    defaults = agent_config.AgentConfig()
    top = {k: v for k, v in shown.items() if not isinstance(v, dict)}
    assert top == {k: _as_toml(getattr(defaults, k)) for k in top}
    assert shown["qemu"] == {k: getattr(defaults.qemu, k) for k in shown["qemu"]}
    assert not defaults.tls.enabled and defaults.roles == agent_config.RolesConfig()
    assert defaults.metrics.listen == "", "README says the metrics endpoint is off unless set"


def test_readme_limits_are_the_codes() -> None:
    m = re.search(r"names (\d+) bytes, paths (\d+), cfg text (\d+) MiB, (\d+) overrides", README)
    assert m is not None, "README no longer states the request size limits"
    assert tuple(int(g) for g in m.groups()) == (limits.NAME, limits.PATH, limits.CFG >> 20, limits.MAX_OVERRIDES)


def test_readme_and_domsnap_1_live_default_is_the_codes() -> None:
    assert agent_config.QemuConfig().live_mode == "auto"
    assert ".B auto\n(the default)" in (REPO / "docs" / "domsnap.1").read_text()
    assert re.search(r"`--live` snapshots \(pre-copy:", README), "README's --live no longer says pre-copy"
    assert f"downtime limit that starts at\n{qemu_migration.FIRST_DOWNTIME_MS} ms" in README


def test_readme_default_socket_is_the_agents_and_the_clients() -> None:
    assert f'listen = ["{agent_config.DEFAULT_SOCKET}"]' in README
    assert connection.DEFAULT_ADDRESS == agent_config.DEFAULT_SOCKET
