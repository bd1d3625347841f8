"""Hypervisor drivers by name; `auto` picks xen where `xl info` answers."""

from __future__ import annotations

import logging
import shutil

from ..config import AgentConfig
from ..errors import DomsnapError
from .base import Hypervisor

log = logging.getLogger(__name__)


async def make_driver(config: AgentConfig) -> Hypervisor:
    # Imported here, not at the package's top: `python -m
    # domsnap.agent.drivers.xen_sink` (the live-snapshot sink xl runs) must
    # not find its own module imported already by its package.
    from .qemu import QemuDriver
    from .xen import XenDriver

    if config.driver == "qemu":
        return QemuDriver(config.qemu, config.state_dir)
    xen = XenDriver(config.state_dir)
    if config.driver == "xen":
        return xen
    if shutil.which("xl"):
        try:
            version = await xen.probe()
        except (DomsnapError, OSError) as err:
            log.info("driver auto: xl is installed but `xl info` fails (%s); using qemu", err)
        else:
            log.info("driver auto: %s answers; using xen", version)
            return xen
    return QemuDriver(config.qemu, config.state_dir)
