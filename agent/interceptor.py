"""The one place errors become gRPC statuses, and one log line per request."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from domsnap.agent.convert import error_status
from domsnap.agent.errors import DomsnapError, InternalError

log = logging.getLogger("domsnap.requests")


def _to_error(exc: Exception) -> DomsnapError:
    if isinstance(exc, DomsnapError):
        return exc
    log.exception("unexpected error")
    err = InternalError(f"internal error: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _log(method: str, context: grpc.aio.ServicerContext, started: float, code: grpc.StatusCode,
         message: str = "") -> None:
    log.info("rpc method=%s peer=%s code=%s ms=%.1f%s", method, context.peer(), code.name,
             (time.monotonic() - started) * 1000, f" error={message!r}" if message else "")


async def _abort(context: grpc.aio.ServicerContext, err: DomsnapError) -> None:
    if not err.caller_fault:
        log.error("%s", err.message, exc_info=err.__cause__ is not None)
    await context.abort_with_status(rpc_status.to_status(error_status(err)))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.monotonic()
                try:
                    response = await inner(request, context)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    err = _to_error(exc)
                    _log(method, context, started, err.code, err.message)
                    await _abort(context, err)
                _log(method, context, started, grpc.StatusCode.OK)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.monotonic()
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    err = _to_error(exc)
                    _log(method, context, started, err.code, err.message)
                    await _abort(context, err)
                _log(method, context, started, grpc.StatusCode.OK)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
