"""What the qemu driver checks on the host before it runs an HVM domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from domsnap.agent import convert
from domsnap.agent.config import QemuConfig
from domsnap.agent.domain import Domain, DomainConfig, RunState
from domsnap.agent.drivers.qemu import QemuDriver
from domsnap.agent.errors import NotFound


def _config(tmp_path: Path, *lines: str) -> DomainConfig:
    disk = tmp_path / "a.qcow2"
    disk.write_bytes(b"")
    return DomainConfig.parse(f'type = "hvm"\nname = "web1"\ndisk = ["{disk},qcow2,xvda,w"]\n' + "\n".join(lines))


def test_a_bridge_that_does_not_exist_is_refused_by_name(tmp_path: Path) -> None:
    driver = QemuDriver(QemuConfig(), tmp_path)
    with pytest.raises(NotFound, match="bridge domsnap-nobr0 does not exist on this host"):
        driver._check_host(_config(tmp_path, 'vif = ["bridge=domsnap-nobr0"]'))
    # No bridge named: user-mode networking, nothing to find.
    assert driver._check_host(_config(tmp_path, 'vif = [""]')).nics[0].bridge is None


def test_a_missing_cdrom_image_is_refused_and_an_empty_drive_is_not(tmp_path: Path) -> None:
    driver = QemuDriver(QemuConfig(), tmp_path)
    with pytest.raises(NotFound, match=r"hdc: /nonexistent\.iso does not exist"):
        driver._check_host(_config(tmp_path, 'disk = ["/nonexistent.iso,raw,hdc,cdrom"]'))
    assert driver._check_host(_config(tmp_path, 'disk = [",raw,hdc,cdrom"]')).drives[0].cdrom


def test_a_snapshots_nvram_lies_beside_its_memory_image(tmp_path: Path) -> None:
    driver = QemuDriver(QemuConfig(), tmp_path)
    assert driver.snapshot_files(Path("/s/web1/base/memory.save")) == [Path("/s/web1/base/memory.save.nvram")]


def test_a_vnc_password_is_never_shown_to_callers(tmp_path: Path) -> None:
    config = _config(tmp_path, "vnc = 1", 'vncpasswd = "s3cret"')
    shown = convert.domain(Domain(1, config, RunState.RUNNING), uid="u").config
    assert "s3cret" not in shown and 'vncpasswd = "********"' in shown
    assert "s3cret" in config.to_text(), "the agent itself keeps it, to relaunch the domain"
