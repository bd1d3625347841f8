"""Who may call what: roles, the caller's identity on each transport, and the audit log.

Two roles: read-only (look, watch) and admin (everything). `RPC_ROLES` is the
one table of what each RPC needs; an RPC missing from it needs admin, and a
unit test fails when one of the proto's is missing. Health answers anyone.

Identity, by transport:
- TLS (client certificates required and verified by gRPC): the certificate's
  subject common name (`CN=ops`) and subject alternative names (`SAN=...`),
  looked up in `[roles] admin` / `read_only`.
- unix socket: the connecting process's credentials from the kernel (see
  unix_socket.py): root (or the agent's own user) and members of
  `admin_group` are admins, members of `socket_group` read-only.
- plain TCP on loopback (only when allowed): `loopback`, looked up in [roles]
  like a certificate identity.
Anyone else has no role: PERMISSION_DENIED for everything but health.

`AuthInterceptor` goes first, before the error interceptor: a refused call
reaches nothing, and the audit line (logger `domsnap.audit`, one per
mutating call) sees the final status code.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_status import rpc_status

from domsnap.v1 import domsnap_pb2 as pb

from .config import RolesConfig
from .convert import error_status
from .errors import PermissionDenied
from .unix_socket import PeerCred, PeerTable

audit_log = logging.getLogger("domsnap.audit")
request_log = logging.getLogger("domsnap.requests")

if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


class Role(enum.IntEnum):
    NONE = 0
    READ_ONLY = 1
    ADMIN = 2

    def __str__(self) -> str:
        return {Role.NONE: "no role", Role.READ_ONLY: "read-only", Role.ADMIN: "admin"}[self]


_AGENT = "/domsnap.v1.SnapshotAgent/"
READ_ONLY_RPCS = ("GetAgentInfo", "ListDomains", "GetDomain", "ListSnapshots", "GetSnapshot", "ListOperations",
                  "WatchOperation", "GetOperation", "WatchEvents")
ADMIN_RPCS = ("CreateDomain", "DestroyDomain", "PauseDomain", "UnpauseDomain", "ChangeMedium", "CreateSnapshot",
              "RevertSnapshot", "DeleteSnapshot", "CancelOperation", "EditSnapshot", "GroupSnapshot")

# The role each RPC needs, by gRPC method path. Not listed: admin.
RPC_ROLES: Mapping[str, Role] = {
    **{_AGENT + name: Role.READ_ONLY for name in READ_ONLY_RPCS},
    **{_AGENT + name: Role.ADMIN for name in ADMIN_RPCS},
    "/grpc.health.v1.Health/Check": Role.NONE,
    "/grpc.health.v1.Health/Watch": Role.NONE,
    "/grpc.health.v1.Health/List": Role.NONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READ_ONLY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Role.READ_ONLY,
}

# What the audit line shows of a request, when the request has it.
AUDIT_FIELDS = ("domain_name", "domain_uid", "domid", "name", "snapshot_name", "snapshot_path", "path", "operation_id",
                "request_id")
_AUDIT_VALUE_MAX = 200


def required_role(method: str) -> Role:
    return RPC_ROLES.get(method, Role.ADMIN)


def rpc_name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Caller:
    role: Role
    # For messages and logs: "CN=ops", "uid=1000(alice) pid=42", "loopback".
    who: str
    # Who it is across connections (no pid, no port): whose request ids are whose.
    identity: str = ""


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("domsnap_caller", default=None)


def current_caller() -> str:
    """Who makes the call being served, for log lines ("" outside a call)."""
    caller = _caller.get()
    return caller.who if caller is not None else ""


def current_identity() -> str:
    """The stable identity of who makes the call being served ("" outside a call)."""
    caller = _caller.get()
    return (caller.identity or caller.who) if caller is not None else ""


class Authorizer:
    """The caller's identity and role from what gRPC knows of the connection. Pure but for the peer table."""

    def __init__(self, roles: RolesConfig, *, peers: PeerTable | None = None, admin_gid: int | None = None,
                 socket_gid: int | None = None) -> None:
        self._admin = frozenset(roles.admin)
        self._read_only = frozenset(roles.read_only)
        self._peers = peers or PeerTable()
        self._admin_gid = admin_gid
        self._socket_gid = socket_gid

    def caller(self, peer: str, auth: Mapping[str, Iterable[bytes]]) -> Caller:
        if [bytes(v) for v in auth.get("transport_security_type", ())] == [b"ssl"]:
            return self._certificate(auth)
        if peer.startswith(("unix:", "unix-abstract:")):
            cred = self._peers.lookup(peer)
            if cred is None:
                # Straight onto the private socket, not through our listener.
                return Caller(Role.NONE, f"unknown unix peer {peer!r}")
            return Caller(self.unix_role(cred), str(cred), f"uid={cred.uid}")
        if peer.startswith(("ipv4:", "ipv6:")) and _is_loopback(peer):
            return Caller(self._lookup(("loopback",)), f"loopback {peer}", "loopback")
        return Caller(Role.NONE, f"unauthenticated {peer}")

    def unix_role(self, cred: PeerCred) -> Role:
        if cred.uid in (0, os.geteuid()) or cred.in_group(self._admin_gid):
            return Role.ADMIN
        if cred.in_group(self._socket_gid):
            return Role.READ_ONLY
        return Role.NONE

    def _certificate(self, auth: Mapping[str, Iterable[bytes]]) -> Caller:
        names = [bytes(v).decode(errors="replace") for v in auth.get("x509_common_name", ())]
        sans = [bytes(v).decode(errors="replace") for v in auth.get("x509_subject_alternative_name", ())]
        principals = [f"CN={n}" for n in names] + [f"SAN={s}" for s in sans]
        # Shown in logs and messages: no control character may forge a line.
        who = _printable(principals[0]) if principals else "a certificate with neither CN nor SAN"
        return Caller(self._lookup(principals), who)

    def _lookup(self, principals: Iterable[str]) -> Role:
        found = set(principals)
        if found & self._admin:
            return Role.ADMIN
        if found & self._read_only:
            return Role.READ_ONLY
        return Role.NONE


def _is_loopback(peer: str) -> bool:
    host = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def denial(caller: Caller, method: str, need: Role) -> str:
    if caller.role is Role.NONE:
        return (f"permission denied: {caller.who} has no role on this agent (a certificate identity needs an "
                "entry in [roles]; a local user, the socket or admin group)")
    way = ("run it as root or as a member of the agent's admin_group" if caller.who.startswith("uid=")
           else f"use a certificate listed under [roles] {need}")
    return f"permission denied: {caller.who} is {caller.role}; {rpc_name(method)} needs {need}: {way}"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authorizer: Authorizer) -> None:
        self._authz = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        call = _Guard(self._authz, details.method)
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for kind, make in kinds.items():
            inner = getattr(handler, kind)
            if inner is not None:
                wrapped = call.wrap_stream(inner) if kind.endswith("_stream") else call.wrap_unary(inner)
                return make(wrapped, request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


class _Guard:
    """One method's check and audit around its handler."""

    def __init__(self, authz: Authorizer, method: str) -> None:
        self._authz = authz
        self.method = method
        self.need = required_role(method)
        self.audited = self.need is Role.ADMIN

    async def _admit(self, request: Any, context: Ctx) -> Caller:
        caller = self._authz.caller(context.peer(), context.auth_context())
        _caller.set(caller)
        if caller.role < self.need:
            message = denial(caller, self.method, self.need)
            if self.audited:
                self._audit(caller, request, grpc.StatusCode.PERMISSION_DENIED)
            else:
                request_log.info("rpc method=%s caller=%s code=PERMISSION_DENIED", self.method, caller.who)
            await context.abort_with_status(rpc_status.to_status(error_status(PermissionDenied(message))))
        return caller

    def _audit(self, caller: Caller, request: Any, code: grpc.StatusCode, operation: str = "") -> None:
        if not self.audited:
            return
        fields = []
        for name in AUDIT_FIELDS:
            value = getattr(request, name, "") if request is not None else ""
            if value:
                fields.append(f"{name}={_short(str(value))}")
        if operation:
            fields.append(f"operation={operation}")
        audit_log.info("caller=%s role=%s rpc=%s %s code=%s", _short(caller.who), caller.role.name.lower(),
                       rpc_name(self.method), " ".join(fields), code.name)

    def wrap_unary(self, inner: Callable[..., Awaitable[Any]]) -> Callable[[Any, Ctx], Awaitable[Any]]:
        async def unary(request: Any, context: Ctx) -> Any:
            caller = await self._admit(request, context)
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await inner(request, context)
                code = grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:
                code = _code_of(exc)
                raise
            finally:
                self._audit(caller, _unary_request(request), code)

        return unary

    def wrap_stream(self, inner: Callable[..., Any]) -> Callable[[Any, Ctx], Any]:
        if not inspect.isasyncgenfunction(inner):
            # A handler that writes with context.write() and returns: awaited
            # like a unary one.
            return self.wrap_unary(inner)

        async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            caller = await self._admit(request, context)
            code = grpc.StatusCode.UNKNOWN
            operation = ""
            try:
                async for item in inner(request, context):
                    if isinstance(item, pb.OperationEvent) and item.HasField("started"):
                        operation = item.started.id
                    yield item
                code = grpc.StatusCode.OK
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:
                code = _code_of(exc)
                raise
            finally:
                self._audit(caller, _unary_request(request), code, operation)

        return stream


def _unary_request(request: Any) -> Any:
    """The request message, or None for a request stream."""
    return None if hasattr(request, "__aiter__") or hasattr(request, "__anext__") else request


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(text: str) -> str:
    # repr: a newline or an escape sequence in a name cannot forge a log line.
    return repr(text if len(text) <= _AUDIT_VALUE_MAX else text[:_AUDIT_VALUE_MAX] + "...")
