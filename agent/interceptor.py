"""The one place errors become gRPC statuses, and one log line per request.

Every request is checked against the size limits (limits.py) first.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc_status import rpc_status

from .auth import current_caller
from .convert import error_status
from .errors import DomsnapError, InternalError
from .limits import check_request

log = logging.getLogger("domsnap.requests")

if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Unary = Callable[[Any, Ctx], Awaitable[Any]]
    Streaming = Callable[[Any, Ctx], AsyncIterator[Any]]
    Bidi = Callable[[AsyncIterator[Any], Ctx], AsyncIterator[Any]]


def _to_error(exc: Exception) -> DomsnapError:
    if isinstance(exc, DomsnapError):
        return exc
    log.error("unexpected error", exc_info=exc)
    err = InternalError(f"internal error: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class _Call:
    """One request: its log line and, on failure, its status."""

    def __init__(self, method: str, context: Ctx) -> None:
        self.method = method
        self.context = context
        self.started = time.monotonic()

    def ok(self) -> None:
        self._log(grpc.StatusCode.OK)

    async def fail(self, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        err = _to_error(exc)
        self._log(err.code, err.message)
        if not err.caller_fault:
            log.error("%s", err.message, exc_info=err.__cause__)
        await self.context.abort_with_status(rpc_status.to_status(error_status(err)))

    def _log(self, code: grpc.StatusCode, message: str = "") -> None:
        log.info("rpc method=%s caller=%s code=%s ms=%.1f%s", self.method, current_caller() or self.context.peer(),
                 code.name, (time.monotonic() - self.started) * 1000, f" error={message!r}" if message else "")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            inner = cast("Unary", handler.unary_unary)

            async def unary(request: Any, context: Ctx) -> Any:
                call = _Call(method, context)
                try:
                    check_request(request)
                    response = await inner(request, context)
                except Exception as exc:
                    await call.fail(exc)
                call.ok()
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        # (A streaming handler that writes with context.write() instead, like
        # health's Watch, passes as it is.)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = cast("Streaming", handler.unary_stream)

            async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
                async for item in _audited(_Call(method, context), _checked_first(request, inner_stream, context)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            inner_bidi = cast("Bidi", handler.stream_stream)

            async def bidi(requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
                async for item in _audited(_Call(method, context), inner_bidi(_checked(requests), context)):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


async def _audited(call: _Call, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A streamed answer, its end (or its error, as the API's status) logged as the call's."""
    try:
        async for item in items:
            yield item
    except Exception as exc:
        await call.fail(exc)
    call.ok()


async def _checked_first(request: Any, inner: Streaming, context: Ctx) -> AsyncIterator[Any]:
    """The handler's stream, once the request is checked against the limits."""
    check_request(request)
    async for item in inner(request, context):
        yield item


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose every message is checked against the limits as it comes."""
    async for request in requests:
        check_request(request)
        yield request
