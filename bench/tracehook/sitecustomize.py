"""Timeline instrumentation for a domsnapd under benchmark (bench/vs_libvirt.py).

Imported by Python at start-up when this directory is on PYTHONPATH; active
only when DOMSNAP_BENCH_TRACE names a file. It then appends one JSON line per
QMP command the agent sends (wall-clock send and reply times, and the reply of
query-migrate), per os.fdatasync and per subprocess the agent runs. It
changes no behaviour: each wrapper calls the original and only records times.
"""

from __future__ import annotations

import os

_PATH = os.environ.get("DOMSNAP_BENCH_TRACE")

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
