"""Agent configuration: defaults, then the TOML file, then command-line flags."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from domsnap.agent.errors import InvalidArgument

DEFAULT_CONFIG_FILE = Path("/etc/domsnap/domsnapd.toml")
DEFAULT_SOCKET = "unix:/run/domsnap/domsnapd.sock"
DRIVERS = ("auto", "xen", "qemu")
LIVE_MODES = ("background", "precopy")


@dataclass(frozen=True)
class QemuConfig:
    binary: str = "qemu-system-x86_64"
    img: str = "qemu-img"
    # KVM guests fail on machines whose /dev/kvm comes from a nested module
    # that cannot run them; TCG always works, so it is the default.
    accel: str = "tcg"
    # Resolved from the `pc` alias at domain creation when empty, and pinned
    # per domain so a memory image always loads into the same machine.
    machine: str = ""
    # How --live writes memory: "background" (QEMU's background-snapshot:
    # the state at the start, a pause of the device state only) or "precopy"
    # (pre-copy to pre-switchover: the state at the end).
    live_mode: str = "background"
    # Cap on the memory image's write rate in bytes/s, to spare a busy
    # host's disk; 0 writes as fast as the disk takes it (QEMU's own default
    # cap, 32 MiB/s, is always lifted).
    max_bandwidth: int = 0


@dataclass(frozen=True)
class TestingConfig:
    # Lets DOMSNAP_KILL_AT make the agent SIGKILL itself at a journal step;
    # never set outside tests.
    fault_injection: bool = False


@dataclass(frozen=True)
class AgentConfig:
    listen: tuple[str, ...] = (DEFAULT_SOCKET,)
    state_dir: Path = Path("/var/lib/domsnap")
    snapshot_root: Path = Path("/var/lib/domsnap/snapshots")
    driver: str = "auto"
    log_level: str = "info"
    # Longest backing chain an external snapshot may make (each external
    # snapshot adds one image that every read may go through).
    max_chain_depth: int = 32
    qemu: QemuConfig = field(default_factory=QemuConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)


@dataclass(frozen=True)
class ListenAddress:
    """`unix:/path` or a loopback `HOST:PORT`."""

    unix_path: Path | None = None
    host: str = ""
    port: int = 0

    @property
    def grpc_target(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(addr: str) -> ListenAddress:
    if addr.startswith("unix:"):
        path = Path(addr.removeprefix("unix:"))
        if not path.is_absolute():
            raise InvalidArgument(f"listen address {addr!r}: the socket path must be absolute")
        return ListenAddress(unix_path=path)
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"listen address {addr!r}: expected unix:/path or HOST:PORT")
    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError as err:
        raise InvalidArgument(f"listen address {addr!r}: {host!r} is not an IP address") from err
    if not ip.is_loopback:
        # Plain TCP beyond loopback would hand root-equivalent control to the
        # network; TLS arrives with the security work.
        raise InvalidArgument(f"listen address {addr!r}: plain TCP is only allowed on loopback")
    return ListenAddress(host=str(ip), port=int(port))


def _section(cls: type[Any], data: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise InvalidArgument(f"{where}: unknown setting {key!r}")
        if key == "qemu":
            out[key] = QemuConfig(**_section(QemuConfig, value, f"{where} [qemu]"))
        elif key == "testing":
            out[key] = TestingConfig(**_section(TestingConfig, value, f"{where} [testing]"))
        elif key == "listen":
            out[key] = tuple([value] if isinstance(value, str) else value)
        elif key in ("state_dir", "snapshot_root"):
            out[key] = Path(value)
        else:
            out[key] = value
    return out


def load(path: Path | None, **overrides: Any) -> AgentConfig:
    """The config file's settings over the defaults, then non-None overrides."""
    data: dict[str, Any] = {}
    file = path or DEFAULT_CONFIG_FILE
    if path is not None or file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except OSError as err:
            raise InvalidArgument(f"cannot read config {file}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise InvalidArgument(f"config {file}: {err}") from err
    config = AgentConfig(**_section(AgentConfig, data, str(file)))
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if config.driver not in DRIVERS:
        raise InvalidArgument(f"driver {config.driver!r}: expected one of {', '.join(DRIVERS)}")
    if config.qemu.live_mode not in LIVE_MODES:
        raise InvalidArgument(f"[qemu] live_mode {config.qemu.live_mode!r}: expected one of {', '.join(LIVE_MODES)}")
    for addr in config.listen:
        parse_listen(addr)
    return config
