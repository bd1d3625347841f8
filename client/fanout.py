"""One call across many agents: at most `limit` hosts at a time, each given
`deadline` seconds from the moment its turn starts, every host's own result.

    results = fan_out(hosts, lambda agent: agent.list_domains(), limit=32, deadline=10)
    for host, result in results.items():
        print(host, result.value if result.ok else result.error)

A host that is slow, hung (its agent stopped) or unreachable costs at most
its deadline and never holds up the others: when its time is up its result
is DeadlineExceeded, its channel is closed (which cancels what it was doing)
and its slot goes to the next host, whatever its call is stuck in.
`fan_out` runs the calls in threads, on `Client`s; `fan_out_async` runs
coroutines on `AsyncClient`s. Results come back in the order of `hosts`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .aio import AsyncClient
from .api import Client
from .errors import DeadlineExceeded

T = TypeVar("T")

DEFAULT_LIMIT = 16
DEFAULT_DEADLINE = 30.0


@dataclass(frozen=True)
class Result(Generic[T]):
    """One host's outcome: `value` when the call returned, else `error`
    (a domsnap.client.errors exception for anything the agent or the
    connection did; whatever else the call raised, as it was)."""

    host: str
    value: T | None = None
    error: Exception | None = None
    # From the start of this host's turn to its result.
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T:
        """The value, or the error raised."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def _hosts(hosts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(hosts))


def _late(host: str, deadline: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"no result from {host} within {deadline:g} s", address=host)


def fan_out(hosts: Iterable[str], call: Callable[[Client], T], *, limit: int = DEFAULT_LIMIT,
            deadline: float = DEFAULT_DEADLINE, ca: str | None = None, cert: str | None = None,
            key: str | None = None) -> dict[str, Result[T]]:
    """`call(client)` for every host, in threads; {host: Result}, in the order of `hosts`.

    Each host's Client has `deadline` as its call timeout, so its RPCs end by
    themselves too; TLS files (`ca`, `cert`, `key`) apply to every TCP host.
    """
    if limit < 1 or deadline <= 0:
        raise ValueError("fan_out needs limit >= 1 and deadline > 0")
    order = _hosts(hosts)
    waiting = list(reversed(order))
    done: queue.SimpleQueue[tuple[str, T | None, Exception | None]] = queue.SimpleQueue()
    results: dict[str, Result[T]] = {}
    started: dict[str, float] = {}
    clients: dict[str, Client] = {}
    lock = threading.Lock()

    def run(host: str) -> None:
        value: T | None = None
        error: Exception | None = None
        try:
            client = Client(host, ca=ca, cert=cert, key=key, timeout=deadline)
            with lock:
                clients[host] = client
            try:
                value = call(client)
            finally:
                client.close()
        except Exception as err:
            error = err
        done.put((host, value, error))

    def admit() -> None:
        while waiting and len(started) < limit:
            host = waiting.pop()
            started[host] = time.monotonic()
            threading.Thread(target=run, args=(host,), name=f"fan-out {host}", daemon=True).start()

    admit()
    while started:
        now = time.monotonic()
        for host, t0 in list(started.items()):
            if now - t0 >= deadline:
                # Its thread may go on a little (until its channel notices); its answer is no longer wanted.
                del started[host]
                results[host] = Result(host, error=_late(host, deadline), seconds=now - t0)
                with lock:
                    client = clients.get(host)
                if client is not None:
                    client.close()
        admit()
        if not started:
            break
        wait = min(t0 + deadline for t0 in started.values()) - time.monotonic()
        try:
            host, value, error = done.get(timeout=max(wait, 0.0))
        except queue.Empty:
            continue
        if host in started:
            t0 = started.pop(host)
            results[host] = Result(host, value, error, time.monotonic() - t0)
            admit()
    return {host: results[host] for host in order}


async def fan_out_async(hosts: Iterable[str], call: Callable[[AsyncClient], Awaitable[T]], *,
                        limit: int = DEFAULT_LIMIT, deadline: float = DEFAULT_DEADLINE, ca: str | None = None,
                        cert: str | None = None, key: str | None = None) -> dict[str, Result[T]]:
    """`await call(client)` for every host, as tasks of the running loop; {host: Result}, in the order of `hosts`."""
    if limit < 1 or deadline <= 0:
        raise ValueError("fan_out_async needs limit >= 1 and deadline > 0")
    slots = asyncio.Semaphore(limit)
    loop = asyncio.get_running_loop()

    async def one(host: str) -> Result[T]:
        async with slots:
            t0 = loop.time()
            try:
                client = AsyncClient(host, ca=ca, cert=cert, key=key, timeout=deadline)
            except Exception as err:
                return Result(host, error=err)
            try:
                value = await asyncio.wait_for(call(client), deadline)
            except TimeoutError:
                return Result(host, error=_late(host, deadline), seconds=loop.time() - t0)
            except Exception as err:
                return Result(host, error=err, seconds=loop.time() - t0)
            finally:
                await client.close()
            return Result(host, value, seconds=loop.time() - t0)

    order = _hosts(hosts)
    return dict(zip(order, await asyncio.gather(*(one(h) for h in order)), strict=True))
