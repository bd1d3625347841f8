"""domsnapd: the domsnap agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from domsnap import __version__

from . import config as agent_config
from .errors import DomsnapError
from .server import serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="domsnapd",
        description="The domsnap agent: takes and reverts domain snapshots, serves the domsnap.v1 gRPC API.",
    )
    p.add_argument("--config", type=Path, help=f"TOML config file (default {agent_config.DEFAULT_CONFIG_FILE})")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="unix:/path or HOST:PORT (TCP: TLS per [tls], or plain on loopback with "
                        "allow_plaintext_loopback); repeatable "
                        f"(default {agent_config.DEFAULT_SOCKET})")
    p.add_argument("--state-dir", type=Path, help="where the agent keeps its state")
    p.add_argument("--snapshot-root", type=Path, help="default parent of snapshot directories")
    p.add_argument("--driver", choices=agent_config.DRIVERS, help="hypervisor driver")
    p.add_argument("--log-level", choices=agent_config.LOG_LEVELS)
    p.add_argument("--version", action="version", version=f"domsnapd {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = agent_config.load(
            args.config, listen=tuple(args.listen) if args.listen else None, state_dir=args.state_dir,
            snapshot_root=args.snapshot_root, driver=args.driver, log_level=args.log_level,
        )
    except DomsnapError as err:
        print(f"domsnapd: {err.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # qemu.qmp logs connection failures as errors; the agent reports them itself.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        asyncio.run(serve(cfg))
    except DomsnapError as err:
        print(f"domsnapd: {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
