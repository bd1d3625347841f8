"""One member's side of a group snapshot: where its create waits for the
coordinator, and the lease that bounds each wait.

A create that is a group's member stops twice: once ready to pause the guest
(PREPARED, waiting for FREEZE) and once with the guest paused at the instant
(FROZEN), where it takes its disks and the rest of its state while the
coordinator gathers the other members' FROZEN, then waits for COMMIT before
the guest resumes. The coordinator answers each through the gate; ABORT, a
coordinator that left, or no answer within the lease raises out of the
create, whose rollback resumes the guest and removes what it made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import Cancelled, FailedPrecondition, InvalidArgument

# The lease of a coordinator that asks for none, in seconds.
DEFAULT_LEASE = 10.0


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    # DOMAIN@ADDR, as the coordinator named them.
    members: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "members": list(self.members)}

    @classmethod
    def from_dict(cls, data: Any) -> Group:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or \
                not isinstance(data.get("name"), str) or not isinstance(data.get("members"), list) or \
                not all(isinstance(m, str) for m in data["members"]):
            raise TypeError("group: not a map of id, name and a list of members")
        return cls(data["id"], data["name"], tuple(data["members"]))


class Command(StrEnum):
    FREEZE = "freeze"
    COMMIT = "commit"
    ABORT = "abort"


class Phase(StrEnum):
    PREPARED = "prepared"
    FROZEN = "frozen"


# Told each phase the member reaches, with its wall-clock time.
OnReached = Callable[[Phase, float], None]


class Gate:
    def __init__(self, group: Group, lease: float, on_reached: OnReached) -> None:
        self.group = group
        self.lease = lease
        self._on_reached = on_reached
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._why = ""
        # When FROZEN was told (monotonic): the wait for COMMIT ends a lease after it.
        self._frozen_at: float | None = None

    def tell(self, command: Command) -> None:
        self._commands.put_nowait(command)

    def leave(self, why: str) -> None:
        """The coordinator is gone (or gave up): the next wait rolls back. Harmless after COMMIT."""
        self._why = self._why or why
        self._commands.put_nowait(Command.ABORT)

    async def prepared(self) -> None:
        """Ready to pause the guest: tell the coordinator, wait for FREEZE."""
        self._on_reached(Phase.PREPARED, time.time())
        await self._next(Phase.PREPARED, Command.FREEZE, time.monotonic() + self.lease)

    def frozen(self) -> None:
        """The guest is paused at the instant: tell the coordinator, at once (the member takes its state
        meanwhile)."""
        self._frozen_at = time.monotonic()
        self._on_reached(Phase.FROZEN, time.time())

    async def committed(self) -> None:
        """The member's state is taken, its guest still paused: wait for COMMIT, at most a lease from FROZEN."""
        assert self._frozen_at is not None, "a driver runs in_pause before before_resume"
        await self._next(Phase.FROZEN, Command.COMMIT, self._frozen_at + self.lease)

    async def _next(self, phase: Phase, wanted: Command, deadline: float) -> None:
        try:
            # A command already queued is taken even when the deadline has passed meanwhile.
            got = self._commands.get_nowait() if not self._commands.empty() else \
                await asyncio.wait_for(self._commands.get(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise Cancelled(f"group {self.group.name}: no {wanted} from the coordinator within the "
                            f"{self.lease:g} s lease; this member rolled back") from None
        if got is Command.ABORT:
            raise Cancelled(f"group {self.group.name}: {self._why or 'the coordinator aborted'}; "
                            "this member rolled back")
        if got is not wanted:
            raise FailedPrecondition(f"group {self.group.name}: {got} while {phase}: the coordinator sends "
                                     f"{wanted} next; this member rolled back")


def lease_of(requested: float, most: float) -> float:
    """The lease a member holds: the coordinator's, within the agent's bound."""
    if requested < 0 or requested > most:
        raise InvalidArgument(f"lease {requested:g} s: this agent holds a group's member for at most "
                              f"{most:g} s (group_lease_max_seconds)")
    return requested or min(DEFAULT_LEASE, most)
