"""Agent configuration: defaults, then the TOML file, then command-line flags.

Listening follows the security rules of docs/design.md: a unix socket by default
(mode 0660, group `socket_group`); TCP only with TLS and client certificates
(`[tls]`), except plain TCP on loopback when `allow_plaintext_loopback` says so.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

DEFAULT_CONFIG_FILE = Path("/etc/domsnap/domsnapd.toml")
DEFAULT_SOCKET = "unix:/run/domsnap/domsnapd.sock"
DRIVERS = ("auto", "xen", "qemu")
LIVE_MODES = ("auto", "background", "precopy")
ACCELS = ("auto", "kvm", "tcg")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class QemuConfig:
    binary: str = "qemu-system-x86_64"
    img: str = "qemu-img"
    # "auto": KVM where a probe guest really runs under it (a nested
    # /dev/kvm can crawl: kvm_probe.py), else TCG; "kvm" or "tcg" force one.
    accel: str = "auto"
    # Resolved from the `pc` alias at domain creation when empty, and pinned
    # per domain so a memory image always loads into the same machine.
    machine: str = ""
    # How --live writes memory: "precopy" (pre-copy while the guest runs, with
    # a downtime limit that starts at 20 ms and doubles each pass: the state
    # at the end, the shortest total time), "background" (QEMU's
    # background-snapshot: the state at the start, a pause of the device
    # state only, but RAM written page by page, 3-4x slower in total), or
    # "auto": background where the domain's QEMU would lose guest writes in a
    # pre-copy (TCG before QEMU 9.0: qemu_migration.precopy_loses_writes),
    # pre-copy elsewhere.
    live_mode: str = "auto"
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
class TlsConfig:
    """The agent's certificate and key, and the CA that issues its clients' certificates."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class RolesConfig:
    """Client certificate identities by role: `CN=<subject common name>` or
    `SAN=<a subject alternative name>`; `loopback` stands for every caller
    of a plain-TCP loopback listener."""

    admin: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: off when `listen` is empty. Unauthenticated,
    so a loopback HOST:PORT or a unix socket only."""

    listen: str = ""


@dataclass(frozen=True)
class AgentConfig:
    listen: tuple[str, ...] = (DEFAULT_SOCKET,)
    state_dir: Path = Path("/var/lib/domsnap")
    snapshot_root: Path = Path("/var/lib/domsnap/snapshots")
    # Where snapshot files may go; empty: snapshot_root alone.
    snapshot_roots: tuple[Path, ...] = ()
    # The unix socket's group: its members may connect, read-only.
    socket_group: str = "domsnap"
    # Members of this group connecting on the unix socket are admins (root always is).
    admin_group: str = ""
    # Plain TCP on a loopback address; callers there are `loopback` in [roles].
    allow_plaintext_loopback: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    driver: str = "auto"
    log_level: str = "info"
    # Longest backing chain an external snapshot may make (each external
    # snapshot adds one image that every read may go through).
    max_chain_depth: int = 32
    # Connections one user (not root, not the agent's user) may hold open on
    # the unix sockets at once; more are closed as they are accepted.
    max_connections_per_user: int = 64
    # How long the records of finished operations are kept (listed after a restart).
    operation_history_days: int = 30
    # The longest a group snapshot's coordinator may leave a member waiting
    # (its guest paused, at worst) before the member resumes and rolls back.
    group_lease_max_seconds: int = 60
    qemu: QemuConfig = field(default_factory=QemuConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)

    @property
    def roots(self) -> tuple[Path, ...]:
        """The snapshot roots: `snapshot_roots`, else `snapshot_root` alone."""
        return self.snapshot_roots or (self.snapshot_root,)


@dataclass(frozen=True)
class ListenAddress:
    """`unix:/path` or `HOST:PORT` (port 0: the OS picks one)."""

    unix_path: Path | None = None
    host: str = ""
    port: int = 0
    loopback: bool = False

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
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"listen address {addr!r}: expected unix:/path or HOST:PORT")
    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError as err:
        raise InvalidArgument(f"listen address {addr!r}: {host!r} is not an IP address") from err
    return ListenAddress(host=str(ip), port=int(port), loopback=ip.is_loopback)


def check_listen(config: AgentConfig) -> None:
    """Every listen address parses, and TCP is TLS unless plain loopback was allowed."""
    for addr in config.listen:
        listen = parse_listen(addr)
        if listen.unix_path is not None or config.tls.enabled:
            continue
        if not listen.loopback:
            # Plain TCP would hand root-equivalent control to the network.
            raise InvalidArgument(
                f"listen address {addr!r}: TCP needs TLS with client certificates: set [tls] cert, key and "
                "client_ca, or listen on a unix socket")
        if not config.allow_plaintext_loopback:
            raise InvalidArgument(
                f"listen address {addr!r}: plain TCP, even on loopback, lets any local user in: set [tls] cert, "
                "key and client_ca, or allow_plaintext_loopback = true (and give `loopback` a role in [roles])")


def parse_metrics_listen(addr: str) -> ListenAddress:
    """`[metrics] listen`: a unix socket or a loopback HOST:PORT; anything else is refused."""
    listen = parse_listen(addr)
    if listen.unix_path is None and not listen.loopback:
        raise InvalidArgument(f"[metrics] listen {addr!r}: the metrics endpoint has no authentication: use a "
                              "loopback address (127.0.0.1:9464) or unix:/path, and let a local scraper or "
                              "proxy carry it further")
    return listen


_SECTIONS: dict[str, type[Any]] = {"qemu": QemuConfig, "testing": TestingConfig, "tls": TlsConfig,
                                   "roles": RolesConfig, "metrics": MetricsConfig}


def _convert(kind: str, value: Any, where: str) -> Any:
    """A TOML value as the field's declared type (the dataclasses' annotations are strings)."""
    if kind in ("str", "bool", "int") and type(value).__name__ != kind:
        raise InvalidArgument(f"{where}: expected {'an' if kind == 'int' else 'a'} {kind}, not {value!r}")
    if kind in ("Path", "Path | None"):
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{where}: expected a path, not {value!r}")
        return Path(value)
    if kind.startswith("tuple["):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise InvalidArgument(f"{where}: expected a list of strings, not {value!r}")
        return tuple(Path(v) for v in items) if kind == "tuple[Path, ...]" else tuple(items)
    return value


def _section(cls: type[Any], data: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise InvalidArgument(f"{where}: unknown setting {key!r}")
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise InvalidArgument(f"{where}: {key} must be a [{key}] section")
            out[key] = _SECTIONS[key](**_section(_SECTIONS[key], value, f"{where} [{key}]"))
        else:
            out[key] = _convert(str(known[key].type), value, f"{where}: {key}")
    return out


def _check_security(config: AgentConfig) -> None:
    tls = config.tls
    given = [name for name in ("cert", "key", "client_ca") if getattr(tls, name) is not None]
    if given and len(given) != 3:
        # Client certificates are always required: no CA, no TLS.
        raise InvalidArgument(f"[tls] needs cert, key and client_ca together (got only {', '.join(given)})")
    for role, entries in (("admin", config.roles.admin), ("read_only", config.roles.read_only)):
        for entry in entries:
            if entry != "loopback" and not (entry.startswith(("CN=", "SAN=")) and entry.partition("=")[2]):
                raise InvalidArgument(f"[roles] {role}: {entry!r}: expected CN=<common name>, SAN=<name> or loopback")
    for root in config.roots:
        if not root.is_absolute():
            raise InvalidArgument(f"snapshot_roots: {str(root)!r} must be an absolute path")
    if config.snapshot_roots and not any(config.snapshot_root.is_relative_to(r) for r in config.snapshot_roots):
        raise InvalidArgument(f"snapshot_root {config.snapshot_root} must lie inside one of snapshot_roots")


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
    if config.log_level not in LOG_LEVELS:
        raise InvalidArgument(f"log_level {config.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    if config.operation_history_days <= 0:
        raise InvalidArgument(f"operation_history_days {config.operation_history_days}: expected more than 0")
    if config.group_lease_max_seconds < 1:
        raise InvalidArgument(f"group_lease_max_seconds {config.group_lease_max_seconds}: expected at least 1")
    if config.max_connections_per_user < 1:
        raise InvalidArgument(f"max_connections_per_user {config.max_connections_per_user}: expected at least 1")
    if config.max_chain_depth < 1:
        raise InvalidArgument(f"max_chain_depth {config.max_chain_depth}: expected at least 1")
    if config.qemu.max_bandwidth < 0:
        raise InvalidArgument(f"[qemu] max_bandwidth {config.qemu.max_bandwidth}: expected 0 or more bytes/s")
    if config.qemu.accel not in ACCELS:
        raise InvalidArgument(f"[qemu] accel {config.qemu.accel!r}: expected one of {', '.join(ACCELS)}")
    if config.qemu.live_mode not in LIVE_MODES:
        raise InvalidArgument(f"[qemu] live_mode {config.qemu.live_mode!r}: expected one of {', '.join(LIVE_MODES)}")
    _check_security(config)
    check_listen(config)
    if config.metrics.listen:
        parse_metrics_listen(config.metrics.listen)
    return config
