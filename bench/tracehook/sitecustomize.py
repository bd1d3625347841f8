"""Timeline instrumentation for a domsnapd under benchmark (bench/vs_libvirt.py,
bench/agent_cost.py).

Imported by Python at start-up when this directory is on PYTHONPATH. It
changes no behaviour: each wrapper calls the original and only records times.

- DOMSNAP_BENCH_TRACE names a file: one JSON line per QMP command the agent
  sends (wall-clock send and reply times, and the reply of query-migrate), per
  os.fdatasync and per subprocess the agent runs.
- DOMSNAP_BENCH_TRACE_RPC names a file: the unary path's moments on the
  system-wide monotonic clock (the client's stamps compare with them): each
  time the unix socket's relay is woken to read from a connection, and each
  call's start and end inside the agent (its interceptor), with the
  connection's peer name. Kept in memory (an append: well under a
  microsecond, against calls of a millisecond) and written as one JSON
  document when the agent exits.
"""

from __future__ import annotations

import os

_PATH = os.environ.get("DOMSNAP_BENCH_TRACE")
_RPC_PATH = os.environ.get("DOMSNAP_BENCH_TRACE_RPC")

if _RPC_PATH:
    import atexit
    import json as _json
    import selectors
    import time as _time
    from typing import Any as _Any

    from domsnap.agent import interceptor, unix_relay

    _relay: list[tuple[float, str, str]] = []
    _calls: list[tuple[float, float, str, str]] = []
    _serve = unix_relay.UnixListener._serve
    _log = interceptor._Call._log

    def _traced_serve(self: _Any, conn: _Any, sock: _Any, events: int) -> None:
        if events & selectors.EVENT_READ:
            _relay.append((_time.monotonic(), conn.peer, "in" if sock is conn.client else "out"))
        _serve(self, conn, sock, events)

    def _traced_log(self: _Any, *args: _Any) -> None:
        _calls.append((self.started, _time.monotonic(), self.method, self.context.peer()))
        _log(self, *args)

    def _write(path: str = _RPC_PATH) -> None:
        with open(path, "w") as f:
            _json.dump({"relay": _relay, "calls": _calls}, f)

    unix_relay.UnixListener._serve = _traced_serve  # type: ignore[method-assign]
    interceptor._Call._log = _traced_log  # type: ignore[method-assign,assignment]
    atexit.register(_write)

if _PATH:
    import asyncio
    import json
    import threading
    import time
    from typing import Any

    _lock = threading.Lock()
    _trace: str = _PATH

    def _emit(record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with _lock, open(_trace, "a") as f:
            f.write(line)

    _fdatasync = os.fdatasync

    def fdatasync(fd: Any) -> None:
        t0 = time.time()
        try:
            _fdatasync(fd)
        finally:
            _emit({"kind": "fdatasync", "t0": t0, "t1": time.time()})

    os.fdatasync = fdatasync

    _spawn = asyncio.create_subprocess_exec

    async def create_subprocess_exec(*argv, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.time()
        proc = await _spawn(*argv, **kwargs)
        wait = proc.wait

        async def traced_wait() -> int:
            rc = await wait()
            _emit({"kind": "exec", "argv": [str(a) for a in argv[:3]], "t0": t0, "t1": time.time()})
            return rc

        proc.wait = traced_wait  # type: ignore[method-assign]
        return proc

    asyncio.create_subprocess_exec = create_subprocess_exec

    try:
        from qemu.qmp import QMPClient
    except ImportError:  # pragma: no cover - the agent needs it anyway
        QMPClient = None  # type: ignore[assignment,misc]

    if QMPClient is not None:
        _execute = QMPClient.execute

        async def execute(self, cmd, arguments=None, oob=False):  # type: ignore[no-untyped-def]
            t0 = time.time()
            ret = await _execute(self, cmd, arguments, oob)
            rec = {"kind": "qmp", "cmd": cmd, "t0": t0, "t1": time.time()}
            if cmd == "query-migrate":
                rec["ret"] = ret
            _emit(rec)
            return ret

        QMPClient.execute = execute  # type: ignore[method-assign]
