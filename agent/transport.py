"""The server's transport policy: keepalive pings and message sizes.

gRPC's own defaults make a server refuse the keepalive its guidance suggests
for clients: a ping received more often than every 5 minutes while no data
flows is a "strike", and the third one closes the connection with GOAWAY
too_many_pings (grpc-js reports that as RESOURCE_EXHAUSTED, the code this API
uses for a full disk). A controller following operations and the change feed
holds streams open for hours with nothing on them, behind NATs and
firewalls that drop silent connections. So:

- clients may ping every `MIN_CLIENT_PING_S` seconds or less often, also with
  no call open; a faster client gets the usual strikes;
- the server pings every `SERVER_PING_S` seconds on its own, without limit
  while no data flows, and drops a connection whose peer does not answer
  within `PING_TIMEOUT_S` (a controller that vanished stops holding a stream).

The unix socket's relay (unix_socket.py) passes HTTP/2 frames through
unchanged, so the same policy holds there.

Message sizes: a request is at most `limits.MAX_REQUEST_BYTES` (its largest
valid form); a response at most `MAX_RESPONSE_BYTES`, gRPC's usual 4 MiB,
which every list stays under by paging.
"""

from __future__ import annotations

from . import limits

MIN_CLIENT_PING_S = 5
SERVER_PING_S = 60
PING_TIMEOUT_S = 20
MAX_RESPONSE_BYTES = 4 * limits.MiB

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", limits.MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS is spelt so (an
    # unknown option name is silently ignored: the node test would show it).
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_S * 1000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_time_ms", SERVER_PING_S * 1000),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_S * 1000),
    ("grpc.http2.max_pings_without_data", 0),
]
