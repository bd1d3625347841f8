"""The byte layout of an `xl save` image, which is also what `xl migrate` sends.

Layers, as the Xen 4.17 sources and docs/specs write them:

1. xl's header (tools/xl/xl.h, xl_saverestore.c): a 32-byte magic, then four
   u32 in the saving host's byte order (0x01020304, mandatory flags, optional
   flags, optional data length), then the optional data (u32 config length,
   the domain config as JSON, NUL-terminated).
2. The libxl stream (docs/specs/libxl-migration-stream.pandoc): a 16-byte
   big-endian header (`LibxlFmt`, version 2, options), then records: u32
   type, u32 body length, body padded with zeros to a multiple of 8.
3. After the LIBXC_CONTEXT record (type 1, empty body) comes a whole libxc
   stream (docs/specs/libxc-migration-stream.pandoc): a 24-byte big-endian
   image header (marker of all ones, `XENF`, version, options), a 16-byte
   domain header, then records of the same shape until its END (type 0).
4. Back at the libxl layer, records follow until libxl's END (type 0): the
   stream is complete.

`StreamParser` follows this incrementally without buffering record bodies, so
a sink can tell exactly when the stream is complete: no timeouts, no guesses.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

XL_MAGIC: Final = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER: Final = 0x01020304
# xl refuses images with mandatory flags it does not know (JSON config, stream v2).
XL_MANDATORY_KNOWN: Final = 0b11
XL_HEADER: Final = struct.Struct("<32sIIII")

LIBXL_IDENT: Final = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION: Final = 2
LIBXL_HEADER: Final = struct.Struct(">QII")
LIBXL_END: Final = 0
LIBXL_LIBXC_CONTEXT: Final = 1

LIBXC_MARKER: Final = 0xFFFFFFFFFFFFFFFF
LIBXC_ID: Final = 0x58454E46  # "XENF"
# Xen 4.17 writes version 3; 4.6 to 4.13 wrote 2, which 4.17 still restores.
LIBXC_VERSIONS: Final = frozenset({2, 3})
LIBXC_IMAGE_HEADER: Final = struct.Struct(">QIIH6x")
LIBXC_DOMAIN_HEADER_SIZE: Final = 16
LIBXC_END: Final = 0

OPT_BIG_ENDIAN: Final = 1
RECORD_HEADER_SIZE: Final = 8
ALIGN: Final = 8


class StreamError(ValueError):
    """The bytes are not a save stream (or not one this parser understands)."""


def padding(length: int) -> int:
    return -length % ALIGN


@dataclass(frozen=True)
class _Step:
    """Wait for `size` bytes, then hand them to `then` (which sets the next step)."""

    size: int
    what: str
    then: Callable[[bytes], None]


class StreamParser:
    """Feed it the bytes xl writes, in pieces of any size; `done` turns True at
    the last byte of libxl's END record.

    Record bodies are skipped, never held, so memory stays constant whatever
    the guest's size. Bytes after the END record are an error: xl sends
    nothing more until the receiver answers.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.done = False
        self._buf = bytearray()
        self._skip = 0
        self._libxl_order = "<"
        self._libxc_order = "<"
        self._step: _Step | None = _Step(XL_HEADER.size, "xl header", self._xl_header)

    @property
    def where(self) -> str:
        """What the parser waits for, for messages about a stream that stopped."""
        if self.done:
            return "nothing (the stream is complete)"
        if self._skip:
            return f"{self._skip} more bytes of a record body"
        assert self._step is not None
        return self._step.what

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self.done:
                raise StreamError(f"{len(view)} bytes after the END record at offset {self.offset}")
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                self.offset += n
                view = view[n:]
                continue
            step = self._step
            assert step is not None
            n = min(step.size - len(self._buf), len(view))
            self._buf += view[:n]
            self.offset += n
            view = view[n:]
            if len(self._buf) == step.size:
                chunk = bytes(self._buf)
                self._buf.clear()
                step.then(chunk)

    def _expect(self, size: int, what: str, then: Callable[[bytes], None]) -> None:
        self._step = _Step(size, what, then)

    def _fail(self, what: str) -> StreamError:
        return StreamError(f"{what} (stream offset {self.offset})")

    # ------------------------------------------------------------- xl layer

    def _xl_header(self, chunk: bytes) -> None:
        magic, order, mandatory, _optional, optlen = XL_HEADER.unpack(chunk)
        if magic != XL_MAGIC:
            raise self._fail("not an xl save stream: wrong magic")
        if order != XL_BYTEORDER:
            raise self._fail("xl header: byte order of another architecture")
        if mandatory & ~XL_MANDATORY_KNOWN:
            raise self._fail(f"xl header: unknown mandatory flags {mandatory:#x}")
        # The optional data (the domain config) is skipped, then libxl starts.
        self._skip = optlen
        self._expect(LIBXL_HEADER.size, "libxl stream header", self._libxl_header)

    # ---------------------------------------------------------- libxl layer

    def _libxl_header(self, chunk: bytes) -> None:
        ident, version, options = LIBXL_HEADER.unpack(chunk)
        if ident != LIBXL_IDENT:
            raise self._fail("libxl stream header: wrong ident")
        if version != LIBXL_VERSION:
            raise self._fail(f"libxl stream header: version {version}, expected {LIBXL_VERSION}")
        self._libxl_order = ">" if options & OPT_BIG_ENDIAN else "<"
        self._libxl_record()

    def _libxl_record(self) -> None:
        self._expect(RECORD_HEADER_SIZE, "a libxl record header", self._libxl_record_header)

    def _libxl_record_header(self, chunk: bytes) -> None:
        rtype, length = struct.unpack(self._libxl_order + "II", chunk)
        if rtype == LIBXL_END:
            if length:
                raise self._fail(f"libxl END record with a {length}-byte body")
            self.done = True
            self._step = None
            return
        if rtype == LIBXL_LIBXC_CONTEXT:
            if length:
                raise self._fail(f"LIBXC_CONTEXT record with a {length}-byte body")
            self._expect(LIBXC_IMAGE_HEADER.size, "libxc image header", self._libxc_image_header)
            return
        self._body(length, "libxl", self._libxl_record)

    def _body(self, length: int, layer: str, after: Callable[[], None]) -> None:
        self._skip = length
        pad = padding(length)
        if not pad:
            after()
            return

        def check_padding(chunk: bytes) -> None:
            if any(chunk):
                raise self._fail(f"non-zero padding after a {layer} record body")
            after()

        self._expect(pad, f"{layer} record padding", check_padding)

    # ---------------------------------------------------------- libxc layer

    def _libxc_image_header(self, chunk: bytes) -> None:
        marker, ident, version, options = LIBXC_IMAGE_HEADER.unpack(chunk)
        if marker != LIBXC_MARKER or ident != LIBXC_ID:
            raise self._fail("libxc image header: wrong marker or id")
        if version not in LIBXC_VERSIONS:
            raise self._fail(f"libxc image header: unsupported version {version}")
        self._libxc_order = ">" if options & OPT_BIG_ENDIAN else "<"
        self._expect(LIBXC_DOMAIN_HEADER_SIZE, "libxc domain header", lambda _chunk: self._libxc_record())

    def _libxc_record(self) -> None:
        self._expect(RECORD_HEADER_SIZE, "a libxc record header", self._libxc_record_header)

    def _libxc_record_header(self, chunk: bytes) -> None:
        rtype, length = struct.unpack(self._libxc_order + "II", chunk)
        if rtype == LIBXC_END:
            if length:
                raise self._fail(f"libxc END record with a {length}-byte body")
            # libxc is done; libxl goes on with its own records.
            self._libxl_record()
            return
        self._body(length, "libxc", self._libxc_record)


@dataclass(frozen=True)
class XlHeader:
    """xl's header of a save image: its flags, the domain config's JSON text,
    what follows the config in the optional data, and where the libxl stream
    starts."""

    mandatory: int
    optional_flags: int
    config_text: bytes
    trailer: bytes
    stream_offset: int

    def config(self) -> dict[str, Any]:
        config = json.loads(self.config_text.rstrip(b"\0").decode())
        if not isinstance(config, dict):
            raise StreamError("the domain config is not a JSON object")
        return config

    def with_config(self, config: dict[str, Any]) -> bytes:
        """This header, carrying `config` instead (xl_saverestore.c writes the
        config NUL-terminated, its length counting the NUL)."""
        text = json.dumps(config, indent=4).encode() + b"\0"
        optional = struct.pack("<I", len(text)) + text + self.trailer
        return XL_HEADER.pack(XL_MAGIC, XL_BYTEORDER, self.mandatory, self.optional_flags, len(optional)) + optional


def read_header(image: Path) -> XlHeader:
    with open(image, "rb") as f:
        head = f.read(XL_HEADER.size)
        if len(head) < XL_HEADER.size:
            raise StreamError(f"{image}: too short for an xl save image")
        magic, order, mandatory, optional_flags, optlen = XL_HEADER.unpack(head)
        if magic != XL_MAGIC or order != XL_BYTEORDER:
            raise StreamError(f"{image}: not an xl save image of this architecture")
        if not mandatory & 1:
            raise StreamError(f"{image}: its domain config is not JSON (made by an xl older than 4.5?)")
        optional = f.read(optlen)
    if len(optional) < 4 or len(optional) < optlen:
        raise StreamError(f"{image}: the header carries no domain config")
    (length,) = struct.unpack("<I", optional[:4])
    if 4 + length > len(optional):
        raise StreamError(f"{image}: the domain config runs past the header")
    return XlHeader(mandatory, optional_flags, optional[4 : 4 + length], optional[4 + length :],
                    XL_HEADER.size + optlen)
