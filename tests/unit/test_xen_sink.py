"""The migration sink as xl runs it: the driver's rune through `sh -c`, xl's
pipes on stdin/stdout, a synthetic save stream, the agent's control socket.
The test plays xl: it reads the banner, sends the stream, and checks that the
"ready" message xl waits for never comes."""

from __future__ import annotations

import asyncio
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from domsnap.agent.drivers import xl_argv
from domsnap.agent.drivers.xen_sink import BANNER, PROGRESS_EVERY
from tests.unit.xen_fakes import libxl_header, record, save_stream, xl_header

STREAM = save_stream()
SINK = (sys.executable, "-m", "domsnap.agent.drivers.xen_sink")
WAIT = 20.0


class Sink:
    """One sink process and the agent's end of its control socket."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        while line := await reader.readline():
            await self.messages.put(line.decode().rstrip("\n"))
        await self.messages.put("<eof>")

    @property
    def process(self) -> asyncio.subprocess.Process:
        assert self.proc is not None
        return self.proc

    async def message(self) -> str:
        return await asyncio.wait_for(self.messages.get(), WAIT)

    async def banner(self) -> bytes:
        assert self.process.stdout is not None
        return await asyncio.wait_for(self.process.stdout.readexactly(len(BANNER)), WAIT)

    async def send(self, data: bytes, chunk: int = 1000) -> None:
        assert self.process.stdin is not None
        for i in range(0, len(data), chunk):
            self.process.stdin.write(data[i : i + chunk])
            await self.process.stdin.drain()

    async def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    async def release(self) -> None:
        assert self.writer is not None
        self.writer.write(b"release\n")
        await self.writer.drain()

    async def nothing_on_stdout_for_now(self) -> bool:
        assert self.process.stdout is not None
        try:
            await asyncio.wait_for(self.process.stdout.read(1), 0.3)
        except TimeoutError:
            return True
        return False

    async def rest_of_stdout(self) -> bytes:
        assert self.process.stdout is not None
        return await asyncio.wait_for(self.process.stdout.read(), WAIT)

    async def status(self) -> int:
        return await asyncio.wait_for(self.process.wait(), WAIT)


@asynccontextmanager
async def sink(tmp_path: Path, *, control: Path | None = None) -> AsyncIterator[Sink]:
    s = Sink(tmp_path / "memory.save")
    listening = tmp_path / "control.sock"
    server = await asyncio.start_unix_server(s.accept, listening)
    # Exactly what XenDriver hands xl, run the way xl runs it (sh -c).
    rune = xl_argv.migrate_to_sink(3, [*SINK, str(s.out), str(control or listening)])[5]
    s.proc = await asyncio.create_subprocess_exec(
        "sh", "-c", rune, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        yield s
    finally:
        if s.proc.returncode is None:
            s.proc.kill()
            await s.proc.wait()
        server.close()


def test_banner_is_xls_54_bytes() -> None:
    assert BANNER == b"xl migration receiver ready, send binary domain data.\n"
    assert len(BANNER) == 54


def test_records_the_stream_and_exits_without_ready(tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(tmp_path) as s:
            assert await s.banner() == BANNER
            await s.send(STREAM)
            assert await s.message() == f"complete {len(STREAM)}"
            # The domain is suspended now and xl waits for "ready": the sink
            # stays, silent, until the agent releases it.
            assert await s.nothing_on_stdout_for_now()
            assert s.process.returncode is None
            await s.release()
            assert await s.rest_of_stdout() == b""  # EOF: never "domain received, ready to unpause"
            assert await s.status() == 0
        assert s.out.read_bytes() == STREAM
        assert stat.S_IMODE(s.out.stat().st_mode) == 0o600

    asyncio.run(main())


def test_an_agent_that_goes_away_after_complete_also_releases_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(tmp_path) as s:
            await s.banner()
            await s.send(STREAM)
            assert (await s.message()).startswith("complete ")
            assert s.writer is not None
            s.writer.close()
            assert await s.rest_of_stdout() == b""
            assert await s.status() == 0

    asyncio.run(main())


def test_reports_progress_on_long_streams(tmp_path: Path) -> None:
    # An optional libxl record (skipped by libxl) big enough to cross the progress step.
    at = STREAM.index(b"LibxlFmt") + 16
    big = STREAM[:at] + record(0x80000002, bytes(PROGRESS_EVERY + 4096)) + STREAM[at:]

    async def main() -> None:
        async with sink(tmp_path) as s:
            await s.banner()
            await s.send(big, chunk=1 << 20)
            progress = await s.message()
            assert progress.startswith("progress ")
            assert int(progress.split()[1]) >= PROGRESS_EVERY
            assert await s.message() == f"complete {len(big)}"
            await s.release()
            assert await s.status() == 0

    asyncio.run(main())


def test_a_stream_cut_short_is_a_failure(tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(tmp_path) as s:
            await s.banner()
            await s.send(STREAM[:5000])
            await s.close_stdin()
            failed = await s.message()
            assert failed.startswith("failed xl closed the stream after 5000 bytes, while expecting")
            assert await s.rest_of_stdout() == b""
            assert await s.status() == 1

    asyncio.run(main())


def test_garbage_is_a_failure(tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(tmp_path) as s:
            await s.banner()
            await s.send(b"SSH-2.0-OpenSSH_9.2p1\r\n" + bytes(100))
            assert (await s.message()).startswith("failed not a save stream: not an xl save stream")
            assert await s.status() == 1

    asyncio.run(main())


def test_release_before_the_end_aborts(tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(tmp_path) as s:
            await s.banner()
            await s.send(xl_header({}) + libxl_header())
            for _ in range(int(WAIT / 0.01)):
                if s.writer is not None:
                    break
                await asyncio.sleep(0.01)
            await s.release()
            assert (await s.message()).startswith("failed released by the agent")
            assert await s.rest_of_stdout() == b""
            assert await s.status() == 1

    asyncio.run(main())


def test_an_existing_output_file_stops_it_before_the_banner(tmp_path: Path) -> None:
    async def main() -> None:
        (tmp_path / "memory.save").write_bytes(b"another snapshot's image")
        async with sink(tmp_path) as s:
            assert (await s.message()).startswith("failed cannot create")
            # No banner: xl gives up before touching the domain.
            assert await s.rest_of_stdout() == b""
            assert await s.status() == 1
        assert (tmp_path / "memory.save").read_bytes() == b"another snapshot's image"

    asyncio.run(main())


def test_no_agent_no_banner(tmp_path: Path) -> None:
    async def main() -> None:
        async with sink(tmp_path, control=tmp_path / "nobody.sock") as s:
            assert await s.rest_of_stdout() == b""
            assert await s.status() == 1
        assert not (tmp_path / "memory.save").exists()

    asyncio.run(main())
