"""Operations as resources, durable request ids and the change feed, over the
fake hypervisor: what survives a real SIGKILL of a forked agent (the
operation, its request id, every event once), paging and filters, and the
feed's tokens (resume, expiry, another feed's). The same against a real agent
and guest: tests/integration/test_operations_feed.py."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from domsnap.agent.catalogue import Entry
from domsnap.agent.errors import EventsExpired, InvalidArgument
from domsnap.agent.feed import Change, ChangeKind, Event, Feed
from domsnap.agent.journal import KILL_ENV
from domsnap.agent.op_history import DAY, History
from domsnap.agent.operations import Operation, OpKind, OpState
from domsnap.agent.request_ids import RequestIds
from domsnap.agent.service import AgentService, OperationFilter
from domsnap.v1 import domsnap_pb2 as pb
from tests.unit.test_core_recovery import DOMAIN, Host, create, create_request, finished, host, listed

__all__ = ["host"]  # the fixture


async def events_after(feed: Feed, since: str, domain: str = "") -> list[Event]:
    """What the feed holds after `since` (the watch never ends: stop once it waits)."""
    out: list[Event] = []

    async def collect() -> None:
        async for ev in feed.watch(since, domain):
            out.append(ev)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.05)
    if task.done():
        task.result()  # a refused token
    task.cancel()
    return out


def feed_after(host: Host, since: str, domain: str = "") -> list[Event]:
    return asyncio.run(events_after(host.service().feed, since, domain))


def summary(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(str(e.change.kind), e.change.snapshot, e.change.operation_state) for e in events]


def dies_after(host: Host, start: Callable[[AgentService], Awaitable[object]], step: str = "") -> None:
    """A forked agent runs `start`, then SIGKILLs itself: at journal `step`, or
    right after `start` returned (before the operation's first step)."""
    pid = os.fork()
    if pid == 0:
        try:
            async def run() -> None:
                if step:
                    os.environ[KILL_ENV] = step
                service = host.service(fault_injection=bool(step))
                await start(service)
                if not step:
                    os.kill(os.getpid(), signal.SIGKILL)
                await asyncio.sleep(60)

            asyncio.run(run())
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_the_feed_tells_each_change_once_in_order_and_resumes_across_restarts(host: Host) -> None:
    token = host.service().feed.token()
    asyncio.run(create("a")(host.service()))
    asyncio.run(host.service().pause_domain(DOMAIN))
    first = feed_after(host, token)
    assert summary(first) == [("operation", "a", "running"), ("operation", "a", "succeeded"),
                              ("snapshot_created", "a", ""), ("domain_paused", "", "")]
    assert [e.seq for e in first] == sorted({e.seq for e in first})
    # A watcher that saw two events resumes from the second's token, in a new agent.
    asyncio.run(host.service().unpause_domain(DOMAIN))
    rest = feed_after(host, first[1].token)
    assert summary(rest) == [*summary(first[2:]), ("domain_unpaused", "", "")]
    assert feed_after(host, rest[-1].token) == []
    assert feed_after(host, token, domain="other") == []


def test_an_operation_killed_mid_way_is_kept_and_told_once(host: Host) -> None:
    token = host.service().feed.token()
    dies_after(host, lambda s: s.create_snapshot(create_request("k"), "req-1"), "create:register")
    service = host.service()
    assert asyncio.run(service.recover()) == 1
    page = asyncio.run(service.list_operations(OperationFilter(request_id="req-1")))
    [op] = page.operations
    assert (op.kind, op.snapshot, op.state) == (OpKind.CREATE, "k", OpState.SUCCEEDED)
    assert service.operations.get(op.id) is op
    assert summary(feed_after(host, token)) == [("operation", "k", "running"), ("operation", "k", "succeeded"),
                                                ("snapshot_created", "k", "")]
    # A second restart recovers nothing and tells nothing again.
    again = host.service()
    assert asyncio.run(again.recover()) == 0
    assert again.operations.get(op.id).state is OpState.SUCCEEDED
    assert len(feed_after(host, token)) == 3


def test_an_operation_killed_before_its_first_step_is_listed_failed(host: Host) -> None:
    dies_after(host, lambda s: s.create_snapshot(create_request("early"), "req-2"))
    service = host.service()
    assert asyncio.run(service.recover()) == 0
    [op] = asyncio.run(service.list_operations(OperationFilter(request_id="req-2"))).operations
    assert op.state is OpState.FAILED and op.error is not None
    assert "before its first journaled step (nothing was done)" in op.error.message
    assert listed(host) == []


def test_an_outcome_the_feed_told_before_the_agent_died_is_kept(host: Host) -> None:
    """Killed between the feed's final event and the final record: the feed's word stands, told once."""
    op = Operation("0123456789abcdef", OpKind.DELETE, DOMAIN, "gone", "req-3")
    History(host.state_dir).record(op)
    token = host.service().feed.token()
    host.service().feed.append(Change(ChangeKind.OPERATION, DOMAIN, "gone", op.id, "succeeded", "delete"))
    service = host.service()
    assert asyncio.run(service.recover()) == 0
    assert service.operations.get(op.id).state is OpState.SUCCEEDED
    assert len(feed_after(host, token)) == 1


def test_a_retried_request_id_after_a_kill_gets_the_first_operation(host: Host) -> None:
    request = pb.CreateSnapshotRequest(request_id="retry-1", domain_name=DOMAIN)  # nameless: a new name each run

    def ids(service: AgentService) -> RequestIds:
        return RequestIds(host.state_dir, keep=DAY)

    async def start(service: AgentService) -> Operation:
        return await ids(service).once_operation(
            "uid=0", "CreateSnapshot", request,
            lambda: service.create_snapshot(create_request(""), request.request_id), service.operation)

    dies_after(host, start, "create:register")
    service = host.service()
    asyncio.run(service.recover())
    [first] = listed(host)
    op = asyncio.run(start(service))
    assert (op.state, op.snapshot) == (OpState.SUCCEEDED, first)
    assert isinstance(op.result, Entry) and op.result.manifest.name == first
    assert listed(host) == [first], "the retry ran again"
    other = pb.CreateSnapshotRequest(request_id="retry-1", domain_name=DOMAIN, name="different")
    with pytest.raises(InvalidArgument, match="already used for a different request"):
        asyncio.run(ids(service).once_operation("uid=0", "CreateSnapshot", other, lambda: start(service),
                                                service.operation))
    # Ids are per caller: another caller's same id is a new request.
    async def as_another_caller() -> Operation:
        return await finished(await ids(service).once_operation(
            "uid=1000", "CreateSnapshot", request,
            lambda: service.create_snapshot(create_request("by-1000"), request.request_id), service.operation))

    assert asyncio.run(as_another_caller()).id != op.id


def test_operations_page_newest_first_with_filters(host: Host) -> None:
    service = host.service()
    for name in ("p1", "p2", "p3"):
        asyncio.run(create(name)(service))
    pages, token = [], ""
    while True:
        page = asyncio.run(service.list_operations(OperationFilter(), 2, token))
        pages.append([op.snapshot for op in page.operations])
        if not (token := page.next_token):
            break
    assert pages == [["p3", "p2"], ["p1"]]
    kinds = OperationFilter(domain=DOMAIN, state=OpState.SUCCEEDED, kind=OpKind.CREATE)
    assert len(asyncio.run(service.list_operations(kinds)).operations) == 3
    assert asyncio.run(service.list_operations(OperationFilter(kind=OpKind.DELETE))).operations == []
    with pytest.raises(InvalidArgument, match="page_token"):
        asyncio.run(service.list_operations(OperationFilter(), 2, "garbage"))


def test_feed_tokens_expire_and_belong_to_their_feed(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "a", keep=DAY, max_events=100)
    first = feed.append(Change(ChangeKind.DOMAIN_PAUSED, "d"))
    for _ in range(1000):
        feed.append(Change(ChangeKind.DOMAIN_UNPAUSED, "d"))
    with pytest.raises(EventsExpired, match="older than the events this agent keeps"):
        asyncio.run(events_after(feed, first.token))
    with pytest.raises(EventsExpired, match="from another feed"):
        asyncio.run(events_after(Feed(tmp_path / "b", keep=DAY), first.token))
    with pytest.raises(InvalidArgument, match="not an event token"):
        asyncio.run(events_after(feed, "nonsense"))
    # A file made anew (here: unreadable) is a new epoch: old tokens expire.
    now = feed.token()
    feed.close()
    (tmp_path / "a" / "events.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(EventsExpired, match="from another feed"):
        asyncio.run(events_after(Feed(tmp_path / "a", keep=DAY), now))
