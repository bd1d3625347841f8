"""Server reflection, in both of its protocol versions: `grpc.reflection.v1`
(what current tools ask first: grpcurl, grpc-js's and Java's clients) and
`grpc.reflection.v1alpha` (older tools).

grpcio-reflection (1.85) registers v1alpha only. The v1 protocol is the
v1alpha one under another package name: the same messages, field for field,
so the same servicer answers both, from the one descriptor pool, with the
v1alpha messages' (de)serializers; only the method's path differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE: str = reflection.SERVICE_NAME


def enable(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Serve reflection v1 and v1alpha, listing `services` and themselves."""
    servicer = reflection.aio.ReflectionServicer([*services, V1_SERVICE, V1ALPHA_SERVICE])
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )}
    server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(name, handlers)
                                          for name in (V1_SERVICE, V1ALPHA_SERVICE)))
