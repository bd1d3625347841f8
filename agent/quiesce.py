"""Guest quiesce: the guest's filesystems frozen through its QEMU guest
agent just before a snapshot's instant and thawed just after, the thaw
guaranteed.

The freeze is asked while the guest runs (the guest agent runs in it), just
before the checkpoint pauses it, and the thaw once it runs again. The thaw
is sent on every way out (success, failure, cancel, rollback) and, when the
freeze outlives its deadline, at the deadline itself: queued behind a freeze
that hangs or in a guest that is paused, the guest agent runs it the moment
it can. The freeze is journaled before it is asked; an agent restarted
after a kill thaws what its journal says was frozen (`thaw_after_crash`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .domain import Domain, RunState
from .drivers.base import Hypervisor
from .drivers.qga import GuestAgent
from .errors import DeadlineExceeded, DomsnapError, FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

# Windows VSS's own limit on a freeze.
DEFAULT_DEADLINE = 10.0
MAX_DEADLINE = 600.0
# How long a guest agent has to answer the sync that opens a session.
SYNC_TIMEOUT = 5.0
# How long a thaw may take to be answered: it may wait behind a freeze that
# hangs (a freeze hook), so longer than any deadline.
THAW_TIMEOUT = 120.0
# Journal steps: before the freeze is asked; after the thaw was answered.
FREEZE_STEP = "freeze"
THAWED_STEP = "thawed"

Step = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class QuiesceRequest:
    enabled: bool = False
    # A guest that cannot be frozen (no channel, no answer, paused) is
    # snapshotted unfrozen instead of refused.
    best_effort: bool = False
    deadline: float = DEFAULT_DEADLINE

    @classmethod
    def of(cls, enabled: bool, best_effort: bool, deadline: float) -> QuiesceRequest:
        """From a request's fields (0 or less: the default deadline)."""
        if not enabled and (best_effort or deadline):
            raise InvalidArgument("quiesce_best_effort and freeze_timeout_seconds need quiesce")
        if not deadline <= MAX_DEADLINE:  # NaN too
            raise InvalidArgument(f"freeze_timeout_seconds: at most {MAX_DEADLINE:g}")
        return cls(enabled, best_effort, deadline if deadline > 0 else DEFAULT_DEADLINE)


NO_QUIESCE = QuiesceRequest()


@dataclass
class Freeze:
    """What a quiesced checkpoint did: whether the guest was frozen, and when
    (the agent's wall clock, seconds since the epoch)."""

    frozen: bool = False
    frozen_at: float = 0.0
    thawed_at: float = 0.0
    # The reason the guest was not frozen (best effort), for the operation's messages.
    skipped: str = ""


def check(driver: Hypervisor, domain: Domain, req: QuiesceRequest) -> GuestAgent | None:
    """The guest agent to freeze `domain` through, None for no freeze (not
    asked, or best effort and impossible); FailedPrecondition otherwise. Touches nothing."""
    if not req.enabled:
        return None
    try:
        if domain.state is not RunState.RUNNING:
            raise FailedPrecondition(f"domain {domain.name} is {domain.state}: its guest agent runs only while "
                                     "it does; unpause it first", reason="DOMAIN_NOT_RUNNING", domain=domain.name)
        return driver.guest_agent(domain.name)
    except FailedPrecondition:
        if req.best_effort:
            return None
        raise


@contextlib.asynccontextmanager
async def frozen(agent: GuestAgent | None, req: QuiesceRequest, step: Step) -> AsyncIterator[Freeze]:
    """The guest frozen for the body (when `agent`), thawed on every way out;
    DeadlineExceeded (after the thaw) if the freeze outlived `req.deadline`."""
    result = Freeze()
    if agent is None:
        result.skipped = "not asked" if not req.enabled else "the guest cannot be frozen"
        yield result
        return
    try:
        await agent.sync(SYNC_TIMEOUT)
    except Unavailable as err:
        await agent.close()
        if req.best_effort:
            log.warning("%s; snapshot taken unfrozen (best effort)", err.message)
            result.skipped = err.message
            yield result
            return
        raise FailedPrecondition(f"{err.message} (--quiesce-best-effort snapshots it unfrozen)",
                                 reason="GUEST_AGENT_UNAVAILABLE", domain=agent.domain) from err
    await step(FREEZE_STEP)
    started = time.monotonic()
    expired = asyncio.Event()
    try:
        try:
            count = await agent.execute("guest-fsfreeze-freeze", timeout=req.deadline)
        except TimeoutError:
            raise DeadlineExceeded(f"domain {agent.domain}: the guest agent did not freeze its filesystems "
                                   f"within {req.deadline:g} s; thawed, no snapshot taken", reason="FREEZE_TIMEOUT",
                                   domain=agent.domain) from None
        result.frozen, result.frozen_at = True, time.time()
        log.info("domain %s: %s filesystem(s) frozen", agent.domain, count)
        watchdog = asyncio.create_task(_thaw_at(agent, started + req.deadline, expired))
        try:
            yield result
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
    finally:
        await _thaw(agent)
        result.thawed_at = time.time()
        await step(THAWED_STEP)
        await agent.close()
    if expired.is_set():
        raise DeadlineExceeded(f"domain {agent.domain}: its filesystems stayed frozen longer than "
                               f"{req.deadline:g} s; thawed at the deadline, snapshot rolled back",
                               reason="FREEZE_TIMEOUT", domain=agent.domain)


async def _thaw_at(agent: GuestAgent, when: float, expired: asyncio.Event) -> None:
    await asyncio.sleep(max(when - time.monotonic(), 0.0))
    expired.set()
    log.warning("domain %s: the freeze reached its deadline; thawing", agent.domain)
    await _thaw(agent)


async def _thaw(agent: GuestAgent) -> None:
    try:
        await agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
    except (DomsnapError, OSError, TimeoutError) as err:
        # Said loudly: the guest may stay frozen; a thaw is retried by the next
        # agent only after a crash, so an operator has to look.
        log.error("domain %s: the thaw failed (%s): the guest's filesystems may still be frozen "
                  "(virsh-less: guest-fsfreeze-thaw through %s)", agent.domain, err, agent.socket)


async def thaw(driver: Hypervisor, domain: str, what: str) -> int | None:
    """Thaw a guest that may be frozen: one a dead agent's journal says it
    froze, or one restored from a quiesced snapshot (frozen, as it was at the
    instant). The number of filesystems thawed (0: none was frozen), None if
    the guest agent could not be asked."""
    try:
        agent = driver.guest_agent(domain)
        await agent.sync(SYNC_TIMEOUT)
    except DomsnapError as err:
        log.error("domain %s: cannot thaw %s: %s", domain, what, err.message)
        return None
    try:
        count = await agent.execute("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
        log.info("domain %s: thawed %s (%s filesystem(s))", domain, what, count)
        return int(count)
    except (DomsnapError, OSError, TimeoutError) as err:
        log.error("domain %s: cannot thaw %s: %s", domain, what, err)
        return None
    finally:
        await agent.close()
