"""Where the agent is and how to talk to it: the `-H ADDR` syntax, TLS and the channel.

A unix socket is plain (the agent knows who we are from the kernel); TCP is
TLS with our client certificate whenever `--ca`, `--cert` or `--key` (or
their DOMSNAP_* variables) are given, else plain (an agent allows that on
loopback only, and only when configured to).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

# gRPC and ssl are loaded by the functions that use them: the CLI parses
# `-H` with this module before it knows whether it will talk to an agent.
if TYPE_CHECKING:
    import grpc
    import grpc.aio

DEFAULT_ADDRESS = "unix:/run/domsnap/domsnapd.sock"
ADDRESS_ENV = "DOMSNAP_HOST"
ADDRESS_SYNTAX = "unix:PATH (or an absolute PATH), HOST:PORT or [IPV6]:PORT"
# Several agents at once (list, info and snapshot-list): comma-separated addresses.
ADDRESS_LIST_SYNTAX = f"{ADDRESS_SYNTAX}; several, comma-separated, for list, info and snapshot-list"
# Seconds a unary call may take; operation streams run as long as their operation.
DEFAULT_TIMEOUT = 30.0
CA_ENV = "DOMSNAP_CA"
CERT_ENV = "DOMSNAP_CERT"
KEY_ENV = "DOMSNAP_KEY"

_HOST_PORT = re.compile(r"^(?:\[[^\[\]\s/]+\]|[^:\[\]\s/]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Address:
    """A parsed `-H` value."""

    # As the user wrote it: messages quote this, not grpc's spelling.
    text: str
    # grpc's channel target.
    target: str
    # A unix socket means the agent shares our filesystem, so client-side
    # relative paths can be made absolute for it.
    local: bool


def parse_address(text: str) -> Address:
    """Parse `unix:PATH`, `/PATH` (a socket too), `HOST:PORT` or `[IPV6]:PORT`; ValueError otherwise."""
    if text.startswith("/"):
        return Address(text=text, target="unix:" + text, local=True)
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        # grpc also spells absolute paths unix:///path; accept what it accepts.
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"no socket path in {text!r}")
        # A relative path stays relative: grpc resolves it against the cwd,
        # and so it is not held to the 108-byte limit of a socket address.
        return Address(text=text, target="unix:" + path, local=True)
    match = _HOST_PORT.match(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{text!r} is not {ADDRESS_SYNTAX}")
    return Address(text=text, target=text, local=False)


def parse_addresses(text: str) -> tuple[Address, ...]:
    """`ADDR[,ADDR...]`: several agents, for the commands that fan out (list, info, snapshot-list)."""
    parts = [part.strip() for part in text.split(",")]
    if any(not part for part in parts):
        raise ValueError(f"{text!r}: an empty address in the list (ADDR,ADDR,...)")
    return tuple(dict.fromkeys(parse_address(part) for part in parts))


def default_address() -> str:
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


@dataclass(frozen=True)
class TlsFiles:
    """--ca (the CA that signed the agent's certificate), --cert and --key (ours)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    @classmethod
    def from_env(cls) -> TlsFiles:
        return cls(os.environ.get(CA_ENV) or None, os.environ.get(CERT_ENV) or None,
                   os.environ.get(KEY_ENV) or None)


class TlsError(Exception):
    """A TLS setup the client can tell is wrong before (or without) the agent's word."""


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise TlsError(f"cannot read {option} {path}: {err.strerror}") from err


def certificate_dates(path: str) -> tuple[float, float] | None:
    """(notBefore, notAfter) of a PEM certificate file, as epoch seconds; None if unknown."""
    import _ssl
    import ssl

    decode = getattr(_ssl, "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        info = decode(path)
        return ssl.cert_time_to_seconds(info["notBefore"]), ssl.cert_time_to_seconds(info["notAfter"])
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None


def certificate_subject(path: str) -> str:
    """`CN=...` of a PEM certificate file, or "" if it cannot be told."""
    import _ssl
    import ssl

    decode = getattr(_ssl, "_test_decode_cert", None)
    try:
        info = decode(path) if decode is not None else {}
    except (ssl.SSLError, OSError):
        return ""
    for rdn in info.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return f"CN={value}"
    return ""


def channel_credentials(tls: TlsFiles, now: float | None = None) -> grpc.ChannelCredentials:
    """Our certificate and the agent's CA as gRPC credentials; TlsError for a
    file that cannot be read, a key that is not the certificate's, or a
    certificate that has expired or is not valid yet."""
    import ssl

    import grpc

    if bool(tls.cert) != bool(tls.key):
        raise TlsError("--cert and --key go together (or DOMSNAP_CERT and DOMSNAP_KEY)")
    ca = _read("--ca", tls.ca) if tls.ca else None
    if ca is not None:
        try:
            ssl.create_default_context(cadata=ca.decode(errors="replace"))
        except (ssl.SSLError, ValueError) as err:
            raise TlsError(f"--ca {tls.ca}: no CA certificate in it") from err
    cert = key = None
    if tls.cert and tls.key:
        cert, key = _read("--cert", tls.cert), _read("--key", tls.key)
        try:
            ssl.create_default_context(ssl.Purpose.SERVER_AUTH).load_cert_chain(tls.cert, tls.key)
        except ssl.SSLError as err:
            raise TlsError(f"--cert {tls.cert} and --key {tls.key}: {err.reason or err} "
                           "(is the key the certificate's?)") from err
        dates = certificate_dates(tls.cert)
        now = time.time() if now is None else now
        if dates is not None and now > dates[1]:
            raise TlsError(f"the client certificate {tls.cert} expired on {_day(dates[1])}")
        if dates is not None and now < dates[0]:
            raise TlsError(f"the client certificate {tls.cert} is not valid before {_day(dates[0])}")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _day(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def tls_failure(details: str, address: Address, tls: TlsFiles) -> str | None:
    """What a failed TLS connection means, from gRPC's error text; None if it is not a TLS failure.

    The agent checks our certificate during the handshake and just closes the
    connection on one it does not accept; our side names what it rejected in
    the agent's certificate.
    """
    verify = re.search(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)", details)
    if verify is not None:
        ca = f"--ca {tls.ca}" if tls.ca else "the system's CAs (no --ca given)"
        return f"the agent's certificate at {address.text} is not trusted by {ca}: {verify[1].strip()}"
    if "Peer name" in details and "not in peer certificate" in details:
        return f"the agent's certificate is not for {address.text.rsplit(':', 1)[0]}: {connect_failure_reason(details)}"
    if re.search(r"handshake failed|Socket closed|Connection reset|Broken pipe", details, re.IGNORECASE):
        if not (tls.cert and tls.key):
            return (f"the agent at {address.text} closed the connection during the handshake: it requires a "
                    "client certificate: give --cert and --key (or DOMSNAP_CERT and DOMSNAP_KEY)")
        who = certificate_subject(tls.cert)
        return (f"the agent at {address.text} refused the client certificate {tls.cert}"
                f"{f' ({who})' if who else ''}: not issued by the CA it trusts for clients, or expired")
    return None


def uses_tls(address: Address, tls: TlsFiles) -> bool:
    """TLS on TCP whenever a TLS file is given; a unix socket never needs it."""
    return not address.local and tls.enabled


def open_channel(address: Address, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    import grpc

    if credentials is not None:
        return grpc.secure_channel(address.target, credentials)
    return grpc.insecure_channel(address.target)


def open_aio_channel(address: Address, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """The same channel for asyncio (the client library's AsyncClient)."""
    import grpc.aio

    if credentials is not None:
        return grpc.aio.secure_channel(address.target, credentials)
    return grpc.aio.insecure_channel(address.target)


def is_reachable(channel: grpc.Channel, timeout: float = 0.25) -> bool:
    """Whether a connection to the agent can be made now.

    UNAVAILABLE comes both from a failed connect and from an agent whose
    hypervisor does not answer; only the first is "cannot reach". A reachable
    agent connects at once, an unreachable one stays in connect backoff.
    """
    import grpc

    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    finally:
        future.cancel()
    return True


def unreachable_message(address: Address, details: str, *, tls_used: bool) -> str:
    """The line for an agent we cannot connect to: the OS reason, then what to do."""
    reason = connect_failure_reason(details)
    if "permission denied" in reason.lower():
        hint = ("Only root and the agent's socket_group (domsnap by default) may connect: join that group and "
                "log in again, or run as root")
    elif not address.local and not tls_used and "refused" not in reason.lower():
        hint = "An agent on TCP speaks TLS: give --ca, --cert and --key"
    else:
        start = " (systemctl start domsnapd)" if address.local else ""
        hint = f"Is domsnapd running there{start}? Another agent: -H ADDR or ${ADDRESS_ENV}"
    return f"cannot reach the agent at {address.text}: {reason}. {hint}"


def connect_failure_reason(details: str) -> str:
    """The OS-level reason at the end of grpc's connect error text.

    grpc says e.g. "failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused";
    the user needs only "Connection refused".
    """
    reason = details.rsplit(": ", 1)[-1].strip(" []")
    return reason or details
