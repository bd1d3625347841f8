"""Test doubles for the Xen and storage contract tests: a runner that checks
each argv against a script and replays recorded output, builders of save
streams laid out as the Xen specs say, and a QMP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domsnap.agent.drivers import xen_stream
from domsnap.agent.errors import CommandError
from domsnap.agent.runner import CommandResult

DATA = Path(__file__).resolve().parent.parent / "data"


def recorded(name: str) -> str:
    """A recorded output under tests/data (see the README beside each)."""
    return (DATA / name).read_text()


# An argv element the test cannot know in advance (a temporary path); checked by the predicate.
Matcher = str | Callable[[str], bool]
Action = Callable[[Sequence[str]], Awaitable[None]]


@dataclass
class Reply:
    stdout: str = ""
    stderr: str = ""
    rc: int = 0
    # Runs before the reply is returned, as the real process would act (write a file, talk to a socket).
    action: Action | None = None


@dataclass
class FakeRunner:
    """Expects exactly `script`, in order; every call is recorded in `calls`."""

    script: list[tuple[list[Matcher], Reply]]
    calls: list[list[str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def expect(self, argv: Sequence[Matcher], reply: Reply | None = None) -> FakeRunner:
        self.script.append((list(argv), reply or Reply()))
        return self

    async def __call__(
        self, argv: Sequence[str], *, timeout: float, check: bool = True,
        on_stderr_line: Callable[[str], None] | None = None,
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        self.events.append(" ".join(argv[:2]))
        assert timeout > 0, f"no timeout for {argv}"
        assert self.script, f"unexpected command {argv}"
        expected, reply = self.script.pop(0)
        assert len(argv) == len(expected) and all(
            e(a) if callable(e) else a == e for e, a in zip(expected, argv, strict=True)
        ), f"argv {argv} does not match {expected}"
        if reply.action is not None:
            await reply.action(argv)
        if on_stderr_line is not None:
            for line in reply.stderr.splitlines():
                on_stderr_line(line)
        if check and reply.rc != 0:
            raise CommandError(argv, reply.rc, reply.stdout, reply.stderr)
        return CommandResult(tuple(argv), reply.rc, reply.stdout, reply.stderr)

    def finished(self) -> None:
        assert not self.script, f"commands never run: {[argv for argv, _ in self.script]}"


# ------------------------------------------------------------ save streams


def record(rtype: int, body: bytes, order: str = "<") -> bytes:
    """A record of either layer: type, length, body, zero padding to 8."""
    return struct.pack(order + "II", rtype, len(body)) + body + bytes(xen_stream.padding(len(body)))


def xl_header(config: dict[str, Any], mandatory: int = 0b11) -> bytes:
    text = json.dumps(config).encode() + b"\0"
    optional = struct.pack("<I", len(text)) + text
    return xen_stream.XL_HEADER.pack(xen_stream.XL_MAGIC, 0x01020304, mandatory, 0, len(optional)) + optional


def libxl_header(options: int = 0, version: int = 2) -> bytes:
    return xen_stream.LIBXL_HEADER.pack(xen_stream.LIBXL_IDENT, version, options)


def libxc_headers(options: int = 0, version: int = 3) -> bytes:
    order = ">" if options & 1 else "<"
    image = xen_stream.LIBXC_IMAGE_HEADER.pack(xen_stream.LIBXC_MARKER, xen_stream.LIBXC_ID, version, options)
    # x86 PV, 4 KiB pages, saved by Xen 4.17.
    domain = struct.pack(order + "IHHII", 1, 12, 0, 4, 17)
    return image + domain


def page_data(pages: int, order: str = "<") -> bytes:
    """A PAGE_DATA record body: count, reserved, pfns, page contents."""
    pfns = b"".join(struct.pack(order + "Q", pfn) for pfn in range(pages))
    contents = b"".join(bytes([pfn % 251]) * 4096 for pfn in range(pages))
    return struct.pack(order + "II", pages, 0) + pfns + contents


CONFIG: dict[str, Any] = {
    "c_info": {"type": "pv", "name": "pvguest"},
    "b_info": {"max_memkb": 131072, "target_memkb": 131072},
    "disks": [{"pdev_path": "/srv/domsnap/images/pvguest.qcow2", "vdev": "xvda", "backend": "qdisk",
               "format": "qcow2", "readwrite": 1}],
}


def save_stream(config: dict[str, Any] | None = None, *, libxl_options: int = 0, libxc_options: int = 0) -> bytes:
    """An `xl save` image of a small PV guest, every layer in its spec's layout."""
    xo = ">" if libxl_options & 1 else "<"
    co = ">" if libxc_options & 1 else "<"
    libxc = (
        libxc_headers(libxc_options)
        + record(0x02, bytes(8), co)  # X86_PV_INFO
        + record(0x10, b"", co)  # STATIC_DATA_END
        + record(0x01, page_data(3, co), co)  # PAGE_DATA
        + record(0x80000001, b"12345", co)  # an optional record, padded
        + record(0x01, bytes(16), co)  # a body of zeros that look like END records
        + record(0x00, b"", co)  # libxc END
    )
    return (
        xl_header(config or CONFIG)
        + libxl_header(libxl_options)
        + record(0x01, b"", xo)  # LIBXC_CONTEXT
        + libxc
        + record(0x02, struct.pack(xo + "II", 2, 0) + b"device-model\0", xo)  # EMULATOR_XENSTORE_DATA
        + record(0x03, struct.pack(xo + "II", 2, 0) + b"qemu state", xo)  # EMULATOR_CONTEXT
        + record(0x00, b"", xo)  # libxl END
    )


# -------------------------------------------------------------------- QMP


class FakeQmp:
    """A QMP endpoint on a unix socket: greets, accepts anything, records each command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commands: list[dict[str, Any]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeQmp:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                            "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        with contextlib.suppress(ConnectionError):
            await self._answer(reader, writer)
        writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Clients send JSON objects without separators, as QEMU's streaming parser allows.
        decoder = json.JSONDecoder()
        buf = ""
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                if msg.get("execute") != "qmp_capabilities":
                    self.commands.append(msg)
                writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")
                await writer.drain()
