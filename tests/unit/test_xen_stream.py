"""The save-stream parser against streams built byte for byte from the Xen specs
(docs/specs/libxl-migration-stream.pandoc, libxc-migration-stream.pandoc, xl.h)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domsnap.agent.drivers.xen_stream import StreamError, StreamParser, read_header
from tests.unit.xen_fakes import (
    CONFIG,
    libxc_headers,
    libxl_header,
    page_data,
    record,
    save_stream,
    xl_header,
)

STREAM = save_stream()


def parse(*chunks: bytes) -> StreamParser:
    parser = StreamParser()
    for chunk in chunks:
        parser.feed(chunk)
    return parser


def test_a_whole_stream_is_complete_at_its_last_byte() -> None:
    parser = parse(STREAM)
    assert parser.done
    assert parser.offset == len(STREAM)


def test_the_stream_is_laid_out_as_the_specs_say() -> None:
    # Guards the builder the other tests rely on.
    assert STREAM[:32] == b"Xen saved domain, xl format\n \0 \r"
    assert struct.unpack("<I", STREAM[32:36]) == (0x01020304,)
    libxl = STREAM.index(b"LibxlFmt")
    assert struct.unpack(">II", STREAM[libxl + 8 : libxl + 16]) == (2, 0)
    assert STREAM[libxl + 16 : libxl + 24] == struct.pack("<II", 1, 0)  # LIBXC_CONTEXT, empty
    assert STREAM[libxl + 24 : libxl + 32] == b"\xff" * 8  # libxc image header marker
    assert len(STREAM) % 8 == (libxl % 8)
    assert STREAM[-8:] == bytes(8)  # libxl END


def test_split_at_every_byte_boundary() -> None:
    for cut in range(1, len(STREAM)):
        parser = parse(STREAM[:cut])
        assert not parser.done, f"done after only {cut} bytes"
        parser.feed(STREAM[cut:])
        assert parser.done, f"not done when split at {cut}"


def test_byte_by_byte_it_is_done_exactly_at_the_end() -> None:
    parser = StreamParser()
    for i in range(len(STREAM)):
        assert not parser.done, f"done early, at byte {i}"
        parser.feed(STREAM[i : i + 1])
    assert parser.done


def test_every_truncation_is_incomplete_not_an_error() -> None:
    waits_for = set()
    for length in range(len(STREAM)):
        parser = parse(STREAM[:length])
        assert not parser.done
        assert parser.offset == length
        waits_for.add(parser.where.split(" more bytes")[0].lstrip("0123456789"))
    # It can say where every truncated stream stopped.
    assert {"xl header", "libxl stream header", "libxc image header", "libxc domain header",
            "a libxc record header", "a libxl record header", "libxc record padding"} <= waits_for


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=40))
def test_any_chunking(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert parse(*pieces).done


def test_libxc_end_alone_does_not_complete_the_stream() -> None:
    without_libxl_end = STREAM[:-8]
    parser = parse(without_libxl_end)
    assert not parser.done
    assert parser.where == "a libxl record header"


def test_big_endian_streams() -> None:
    stream = save_stream(libxl_options=1, libxc_options=1)
    assert stream != STREAM
    assert parse(stream).done


def test_an_older_libxc_version_2_stream() -> None:
    stream = (xl_header(CONFIG) + libxl_header() + record(1, b"") + libxc_headers(version=2)
              + record(1, page_data(1)) + record(0, b"") + record(0, b""))
    assert parse(stream).done


def test_a_stream_with_no_libxc_part() -> None:
    # libxl does not require one (a stream of only emulator records, then END).
    stream = xl_header(CONFIG) + libxl_header() + record(0x80000007, b"x") + record(0, b"")
    assert parse(stream).done


def _garbled(offset: int, value: bytes) -> bytes:
    return STREAM[:offset] + value + STREAM[offset + len(value) :]


LIBXL = STREAM.index(b"LibxlFmt")


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"Xen saved domain, xl format\n \0 X" + STREAM[32:], "wrong magic"),
        (_garbled(32, struct.pack("<I", 0x04030201)), "byte order"),
        (_garbled(36, struct.pack("<I", 0b111)), "unknown mandatory flags"),
        (_garbled(LIBXL, b"LibxlFmX"), "wrong ident"),
        (_garbled(LIBXL + 8, struct.pack(">I", 3)), "version 3"),
        (_garbled(LIBXL + 20, struct.pack("<I", 8)), "LIBXC_CONTEXT record with a 8-byte body"),
        (_garbled(LIBXL + 24, b"\xff" * 7 + b"\x00"), "wrong marker"),
        (_garbled(LIBXL + 36, struct.pack(">I", 9)), "unsupported version 9"),
        (STREAM[:-4] + struct.pack("<I", 8), "END record with a 8-byte body"),
        (STREAM + b"\0", "after the END record"),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + bytes(64), "wrong magic"),
    ],
)
def test_garbage_is_refused(stream: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        parse(stream)


def test_non_zero_padding_is_refused() -> None:
    body = b"12345"  # 3 bytes of padding follow
    at = STREAM.index(body) + len(body)
    with pytest.raises(StreamError, match="non-zero padding after a libxc record"):
        parse(_garbled(at, b"\x01"))


def test_read_header_gives_the_json_config_of_an_image(tmp_path: Path) -> None:
    image = tmp_path / "memory.save"
    image.write_bytes(STREAM)
    assert read_header(image).config() == CONFIG


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\0" * 64, "not an xl save image"),
        (xl_header(CONFIG, mandatory=0b10), "not JSON"),
    ],
)
def test_read_header_refuses_other_files(tmp_path: Path, content: bytes, message: str) -> None:
    image = tmp_path / "memory.save"
    image.write_bytes(content)
    with pytest.raises(StreamError, match=message):
        read_header(image)


def test_the_config_json_ends_with_its_nul_as_xl_writes_it() -> None:
    header = xl_header(CONFIG)
    (length,) = struct.unpack("<I", header[48:52])
    assert header[52 + length - 1] == 0
    assert json.loads(header[52 : 52 + length - 1]) == CONFIG
