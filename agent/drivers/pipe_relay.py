"""A memory image written through a pipe that the agent drains into the
image file, so that the agent paces QEMU's writer and can let it go on the
spot.

A group member's live save is held ready (its guest running) until every
member is: it keeps copying what its guest dirties, at a trickle, so that
QEMU never has it all and never stops the guest by itself. QEMU's own rate
limit would hold it too, but QEMU 7.2's migration thread sleeps out a 100 ms
window before it looks at a raised limit again, so each member would go on
at its own random point of that window. Paced by a pipe that the relay
reads slowly, the thread blocks in its write instead, and goes on at full
speed the moment the relay reads as fast as it can.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import threading

# Pipe capacity (Linux's default most an unprivileged process may set):
# large enough that the relay moves megabytes per splice.
PIPE_BYTES = 1 << 20
# How soon an abandoned relay notices, in seconds.
TICK = 0.1
# A held save's pace, bytes/s, and how much of it at a time.
TRICKLE = 1 << 20
TRICKLE_BYTES = 64 << 10


class Relay:
    """Splices everything QEMU writes into `write_end` on to `image` (at its
    file position), from a thread, until QEMU closes its copy of the pipe."""

    def __init__(self, image: int) -> None:
        self._image = image
        self._read, self.write_end = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(self._read, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._released = threading.Event()
        self._released.set()
        self._abandoned = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="image-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        try:
            # Polled, not blocking in splice: a QEMU that never started the
            # save keeps the write end open, and the relay must end anyway.
            while not self._abandoned:
                if not poller.poll(TICK * 1000):
                    continue
                held = not self._released.is_set()
                moved = os.splice(self._read, self._image, TRICKLE_BYTES if held else PIPE_BYTES)
                if not moved:
                    return
                if held:
                    self._released.wait(moved / TRICKLE)
        except OSError as err:
            self.error = err
        finally:
            # A writer left with no reader fails (EPIPE) instead of blocking for ever.
            os.close(self._read)

    def hold(self) -> None:
        """Read at a trickle: QEMU's writer blocks on the full pipe between reads."""
        self._released.clear()

    def release(self) -> None:
        """Read as fast as QEMU writes, from now on."""
        self._released.set()

    @property
    def disk_full(self) -> bool:
        return self.error is not None and self.error.errno == errno.ENOSPC

    async def drained(self) -> None:
        """Until QEMU closed the pipe and all it wrote is in the image (or the relay failed)."""
        self.release()
        await asyncio.to_thread(self._thread.join)

    async def stop(self) -> None:
        """End the relay whatever QEMU does (the save failed; a writer left fails), and wait for it."""
        self._abandoned = True
        await asyncio.to_thread(self._thread.join)

    def close(self) -> None:
        """Our copy of the write end (QEMU holds its own once it has been sent)."""
        os.close(self.write_end)
