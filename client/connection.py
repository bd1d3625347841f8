"""Where the agent is and how to talk to it: the `-H ADDR` syntax and the channel.

TLS is not wired yet; `open_channel` takes the credentials so that the later
change only has to build them, not touch the callers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import grpc

from domsnap.v1 import domsnap_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "unix:/run/domsnap/domsnapd.sock"
ADDRESS_ENV = "DOMSNAP_HOST"
ADDRESS_SYNTAX = "unix:PATH, HOST:PORT or [IPV6]:PORT"

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
    """Parse `unix:PATH`, `HOST:PORT` or `[IPV6]:PORT`; ValueError otherwise."""
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


def default_address() -> str:
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def open_channel(address: Address, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address.target, credentials)
    return grpc.insecure_channel(address.target)


def stub(channel: grpc.Channel) -> pb_grpc.SnapshotAgentStub:
    return pb_grpc.SnapshotAgentStub(channel)


def is_reachable(channel: grpc.Channel, timeout: float = 0.25) -> bool:
    """Whether a connection to the agent can be made now.

    UNAVAILABLE comes both from a failed connect and from an agent whose
    hypervisor does not answer; only the first is "cannot reach". A reachable
    agent connects at once, an unreachable one stays in connect backoff.
    """
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    finally:
        future.cancel()
    return True


def connect_failure_reason(details: str) -> str:
    """The OS-level reason at the end of grpc's connect error text.

    grpc says e.g. "failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused";
    the user needs only "Connection refused".
    """
    reason = details.rsplit(": ", 1)[-1].strip(" []")
    return reason or details
