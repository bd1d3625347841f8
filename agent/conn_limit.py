"""How many connections the unix sockets relay at once.

Each relayed connection holds three descriptors (the caller's, the relay's
to the gRPC server, the server's own). A user other than root and the
agent's own may hold `max_connections_per_user` at once, and all together
never more than the descriptor limit leaves room for. A connection past a
limit is closed as soon as it is accepted: the agent never runs out of
descriptors (and never logs "Too many open files" for each attempt), and
one user's idle connections cannot keep root out. What was refused is
logged once a minute at most, with the count.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter

log = logging.getLogger(__name__)

FDS_PER_CONNECTION = 3
# Descriptors kept for everything else: QMP sockets, files, QEMU's pipes, TCP.
RESERVED_FDS = 256
LOG_EVERY = 60.0


def raise_fd_limit() -> int:
    """The soft descriptor limit raised to the hard one (systemd's LimitNOFILE); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class ConnectionLimit:
    def __init__(self, per_user: int, fd_limit: int) -> None:
        self.per_user = per_user
        self.total = max((fd_limit - RESERVED_FDS) // FDS_PER_CONNECTION, 1)
        self._open: Counter[int] = Counter()
        self._refused = 0
        self._logged_at = float("-inf")

    def admit(self, uid: int) -> bool:
        trusted = uid in (0, os.geteuid())
        if self._open.total() < self.total and (trusted or self._open[uid] < self.per_user):
            self._open[uid] += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            log.warning("unix socket: %d connection(s) refused since the last such line (uid %d holds %d; at most %d "
                        "per user, max_connections_per_user, and %d in all, from the descriptor limit)",
                        self._refused, uid, self._open[uid], self.per_user, self.total)
            self._refused = 0
            self._logged_at = now
        return False

    def release(self, uid: int) -> None:
        self._open[uid] -= 1
        if self._open[uid] <= 0:
            del self._open[uid]
