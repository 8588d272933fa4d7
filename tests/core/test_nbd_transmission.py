"""RequestParser / validate / simple_reply: NBD transmission phase (doc/proto.md, "Transmission").

Requests are encoded here with ``struct`` straight from the spec's layout; the expected error
of a request comes from ``expected_error``, an independent restatement of the validation table
in nbd_transmission's docstring (which follows nbdkit's server/protocol.c).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.core import nbd_wire as w
from volkeeper.core.nbd_handshake import ExportInfo
from volkeeper.core.nbd_transmission import (
    MAX_SKIPPED_PAYLOAD,
    Request,
    RequestParser,
    simple_reply,
    validate,
)
from volkeeper.errors import ProtocolError

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE = range(9)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = (1 << i for i in range(6))
OK, EPERM, EINVAL, ENOSPC, EOVERFLOW = 0, 1, 22, 28, 75

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
MAX_BLOCK = 32 * MIB
U64_MAX = 2**64 - 1

RW = ExportInfo("data1", 1 * MIB, 512)
RO = ExportInfo("archive", 1 * MIB, 512, read_only=True)
BIG = ExportInfo("big", 1 * TIB, 4096)


def request(
    cmd: int, flags: int = 0, offset: int = 0, length: int = 0, cookie: int = 0x1122334455667788
) -> bytes:
    """A request header: magic, flags, type, cookie, offset, length (no payload)."""
    return struct.pack(">IHHQQI", w.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def write(offset: int, payload: bytes, flags: int = 0, cookie: int = 1) -> bytes:
    return request(WRITE, flags, offset, len(payload), cookie) + payload


def drain(parser: RequestParser) -> list[Request]:
    out = []
    while (req := parser.next_request()) is not None:
        out.append(req)
    return out


def parse_chunks(export: ExportInfo, chunks: Sequence[bytes]) -> list[Request]:
    parser = RequestParser(export)
    out: list[Request] = []
    for chunk in chunks:
        parser.feed(chunk)
        out += drain(parser)
    return out


def expected_error(cmd: int, flags: int, offset: int, length: int, export: ExportInfo) -> int:
    if cmd == DISC:  # "There is no reply to an NBD_CMD_DISC": it is never refused
        return OK
    if export.read_only and cmd in (WRITE, TRIM, WRITE_ZEROES):
        return EPERM
    if cmd not in (READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES):
        return EINVAL
    if cmd in (READ, WRITE, TRIM, WRITE_ZEROES, CACHE) and offset + length > export.size:
        return ENOSPC if cmd in (WRITE, WRITE_ZEROES) else EINVAL
    if cmd == FLUSH and (offset or length):
        return EINVAL
    if flags & 0xFFE0:  # bits 5..15: not negotiated (PAYLOAD_LEN) or undefined
        return EINVAL
    if flags & NO_HOLE and cmd != WRITE_ZEROES:
        return EINVAL
    if flags & (DF | REQ_ONE | FAST_ZERO):  # none of SEND_DF, BLOCK_STATUS, FAST_ZERO offered
        return EINVAL
    if cmd in (READ, WRITE) and length > MAX_BLOCK:
        return EINVAL  # proto.md: EOVERFLOW only for READ with DF
    return OK


# -- the property: any split of the stream yields the same requests -------------------------

EXPORTS = [RW, RO, ExportInfo("mid", 64 * MIB, 4096), ExportInfo("mid-ro", 64 * MIB, 512, True)]


@st.composite
def client_request(draw: st.DrawFn, export: ExportInfo) -> tuple[int, int, int, int, int, bytes]:
    cmd = draw(
        st.one_of(
            st.sampled_from([READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES]),
            st.integers(min_value=7, max_value=0xFFFF),
        )
    )
    flags = draw(
        st.one_of(
            st.just(0),
            st.sampled_from([FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN, FUA | NO_HOLE]),
            st.integers(min_value=0, max_value=0x3F),
            st.integers(min_value=0, max_value=0xFFFF),
        )
    )
    size = export.size
    offset = draw(
        st.one_of(
            st.just(0),
            st.integers(min_value=0, max_value=64),
            st.integers(min_value=max(0, size - 64), max_value=size + 64),
            st.sampled_from([U64_MAX, 2**63]),
        )
    )
    if cmd == WRITE:
        payload = draw(st.binary(max_size=48))
        length = len(payload)
    else:
        payload = b""
        length = draw(
            st.one_of(
                st.integers(min_value=0, max_value=4 * KIB),
                st.sampled_from([MAX_BLOCK, MAX_BLOCK + 1, 2**32 - 1]),
            )
        )
    cookie = draw(st.integers(min_value=0, max_value=U64_MAX))
    return cmd, flags, cookie, offset, length, payload


@st.composite
def request_stream(
    draw: st.DrawFn,
) -> tuple[ExportInfo, list[tuple[int, int, int, int, int, bytes]]]:
    export = draw(st.sampled_from(EXPORTS))
    return export, draw(st.lists(client_request(export), min_size=1, max_size=12))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=150, deadline=None)
@given(request_stream(), st.lists(st.integers(min_value=0, max_value=1000), max_size=40))
def test_any_split_yields_the_same_requests(
    case: tuple[ExportInfo, list[tuple[int, int, int, int, int, bytes]]], cuts: list[int]
) -> None:
    export, specs = case
    stream = b"".join(
        request(cmd, flags, offset, length, cookie) + payload
        for cmd, flags, cookie, offset, length, payload in specs
    )
    whole = parse_chunks(export, [stream])
    assert parse_chunks(export, [bytes([b]) for b in stream]) == whole
    assert parse_chunks(export, split(stream, cuts)) == whole

    assert len(whole) == len(specs)
    for got, (cmd, flags, cookie, offset, length, payload) in zip(whole, specs, strict=True):
        assert (got.command, got.flags, got.cookie, got.offset, got.length) == (
            cmd,
            flags,
            cookie,
            offset,
            length,
        )
        assert got.error == expected_error(cmd, flags, offset, length, export)
        # A refused WRITE's payload is skipped, never delivered; an accepted one is exact.
        assert got.payload == (payload if got.error == OK else b"")


# -- the validation table, one test per row ------------------------------------------------


@pytest.mark.parametrize("cmd", [WRITE, TRIM, WRITE_ZEROES])
@pytest.mark.parametrize(
    ("flags", "offset", "length"),
    [
        (0, 0, 512),
        (0, 1 * MIB, 512),  # also beyond the end: EPERM comes first
        (0, U64_MAX, 1),
        (DF | 0x8000, 0, 512),  # also bad flags
        (0, 0, MAX_BLOCK + 1),  # also oversize
    ],
)
def test_row_mutation_on_read_only_export_is_eperm(
    cmd: int, flags: int, offset: int, length: int
) -> None:
    assert validate(cmd, flags, offset, length, RO) == EPERM


@pytest.mark.parametrize(("cmd", "length"), [(READ, 512), (CACHE, 4096), (FLUSH, 0), (DISC, 0)])
def test_row_non_mutating_commands_allowed_on_read_only_export(cmd: int, length: int) -> None:
    assert validate(cmd, 0, 0, length, RO) == OK


@pytest.mark.parametrize("cmd", [BLOCK_STATUS, RESIZE, 9, 0x7FFF, 0xFFFF])
@pytest.mark.parametrize("export", [RW, RO], ids=["rw", "ro"])
@pytest.mark.parametrize(("offset", "length"), [(0, 512), (2 * MIB, 512)])
def test_row_unknown_command_is_einval(
    cmd: int, export: ExportInfo, offset: int, length: int
) -> None:
    assert validate(cmd, 0, offset, length, export) == EINVAL


@pytest.mark.parametrize(
    ("cmd", "error"),
    [(WRITE, ENOSPC), (WRITE_ZEROES, ENOSPC), (READ, EINVAL), (TRIM, EINVAL), (CACHE, EINVAL)],
)
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (1 * MIB - 511, 512),
        (1 * MIB, 1),
        (1 * MIB + 1, 0),
        (U64_MAX, 1),
        (U64_MAX, 0),
        (0, 2 * MIB),
    ],
)
def test_row_beyond_the_end(cmd: int, error: int, offset: int, length: int) -> None:
    assert validate(cmd, 0, offset, length, RW) == error


@pytest.mark.parametrize("cmd", [READ, WRITE, TRIM, WRITE_ZEROES, CACHE])
@pytest.mark.parametrize(("offset", "length"), [(1 * MIB - 512, 512), (0, 1 * MIB), (1 * MIB, 0)])
def test_row_up_to_the_end_is_fine(cmd: int, offset: int, length: int) -> None:
    assert validate(cmd, 0, offset, length, RW) == OK


@pytest.mark.parametrize(("offset", "length"), [(1, 0), (0, 1), (1 * MIB, 0), (512, 512)])
def test_row_flush_with_offset_or_length_is_einval(offset: int, length: int) -> None:
    assert validate(FLUSH, 0, offset, length, RW) == EINVAL
    assert validate(FLUSH, FUA, 0, 0, RW) == OK


@pytest.mark.parametrize("cmd", [READ, WRITE, FLUSH])
def test_row_payload_len_flag_is_einval(cmd: int) -> None:
    # PAYLOAD_LEN (bit 5) needs extended headers, which volkeeper never negotiates.
    length = 0 if cmd == FLUSH else 512
    assert validate(cmd, PAYLOAD_LEN, 0, length, RW) == EINVAL


# ``~`` on an IntFlag stays inside the enum's members: validate() must mask with a plain int.
# proto.md, "Error values": the server SHOULD return EINVAL on an unknown command flag.
def test_row_unknown_flag_is_einval() -> None:
    for cmd, length in ((READ, 512), (WRITE, 512), (FLUSH, 0), (WRITE_ZEROES, 512)):
        for bit in range(6, 16):
            assert validate(cmd, 1 << bit, 0, length, RW) == EINVAL, (cmd, bit)


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (WRITE, NO_HOLE),
        (READ, NO_HOLE),
        (TRIM, NO_HOLE),
        (CACHE, NO_HOLE),
        (READ, DF),  # SEND_DF is never advertised (no structured replies)
        (READ, REQ_ONE),  # only for BLOCK_STATUS, which is not offered
        (WRITE_ZEROES, FAST_ZERO),  # SEND_FAST_ZERO is not advertised
        (WRITE, FAST_ZERO),
        (WRITE_ZEROES, NO_HOLE | FAST_ZERO),
    ],
)
def test_row_flag_on_a_command_it_does_not_apply_to_is_einval(cmd: int, flags: int) -> None:
    assert validate(cmd, flags, 0, 512, RW) == EINVAL


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [(WRITE_ZEROES, NO_HOLE), (WRITE_ZEROES, NO_HOLE | FUA)]
    + [(cmd, FUA) for cmd in (READ, WRITE, TRIM, WRITE_ZEROES, CACHE)],
)
def test_row_flags_that_apply_are_fine(cmd: int, flags: int) -> None:
    # FUA "is valid for all commands" once SEND_FUA is negotiated (proto.md, Command flags).
    assert validate(cmd, flags, 0, 512, RW) == OK


@pytest.mark.parametrize("cmd", [READ, WRITE])
def test_row_oversize_read_or_write_is_eoverflow(cmd: int) -> None:
    assert validate(cmd, 0, 0, MAX_BLOCK, BIG) == OK
    assert validate(cmd, 0, 0, MAX_BLOCK + 1, BIG) == EINVAL
    assert validate(cmd, 0, 0, 2**32 - 1, BIG) == EINVAL


@pytest.mark.parametrize("cmd", [TRIM, WRITE_ZEROES, CACHE])
def test_commands_without_payload_have_no_size_limit(cmd: int) -> None:
    assert validate(cmd, 0, 0, 2**32 - 1, BIG) == OK


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "export", "error"),
    [
        (WRITE, 0x8000, U64_MAX, MAX_BLOCK + 1, RO, EPERM),  # read-only first
        (9, 0, U64_MAX, 1, RO, EINVAL),  # unknown command before range
        (WRITE, DF, 2 * MIB, 1, RW, ENOSPC),  # range before flags
        (READ, DF, 2 * MIB, 1, RW, EINVAL),
        (READ, 0, 0, MAX_BLOCK + 1, RW, EINVAL),  # range before size on a small export
        (READ, DF, 0, MAX_BLOCK + 1, BIG, EINVAL),  # flags before size
        (WRITE, NO_HOLE, 0, MAX_BLOCK + 1, BIG, EINVAL),
    ],
    ids=["ro>all", "cmd>range", "range>flags-w", "range>flags-r", "range>size", "flags>size", "nh"],
)
def test_validation_order_follows_nbdkit(
    cmd: int, flags: int, offset: int, length: int, export: ExportInfo, error: int
) -> None:
    assert validate(cmd, flags, offset, length, export) == error


# -- the parser ----------------------------------------------------------------------------


def test_request_fields_and_valid_write_payload() -> None:
    parser = RequestParser(RW)
    parser.feed(write(4096, b"hello", FUA, cookie=0xDEADBEEF_CAFEF00D))
    [req] = drain(parser)
    assert req == Request(WRITE, FUA, 0xDEADBEEF_CAFEF00D, 4096, 5, b"hello", w.Errno.OK)
    assert req.fua
    assert not Request(READ, NO_HOLE, 0, 0, 0).fua


def test_valid_write_waits_for_its_payload() -> None:
    parser = RequestParser(RW)
    parser.feed(request(WRITE, 0, 0, 8, cookie=3) + b"1234")
    assert parser.next_request() is None
    parser.feed(b"5678" + request(FLUSH, cookie=4)[:10])
    [req] = drain(parser)
    assert (req.cookie, req.payload, req.error) == (3, b"12345678", OK)
    parser.feed(request(FLUSH, cookie=4)[10:])
    assert [(r.command, r.cookie) for r in drain(parser)] == [(FLUSH, 4)]


def test_refused_write_is_released_at_once_and_its_payload_skipped() -> None:
    parser = RequestParser(RO)
    parser.feed(request(WRITE, 0, 0, 4096, cookie=9))
    [req] = drain(parser)  # answered before a single payload byte arrived
    assert (req.cookie, req.error, req.payload) == (9, EPERM, b"")
    # Payload bytes that look like a request header must be skipped, not parsed.
    fake = request(READ, 0, 0, 512, cookie=666)
    parser.feed(fake * (4096 // len(fake)))
    assert drain(parser) == []
    parser.feed(bytes(4096 % len(fake)) + request(READ, 0, 0, 512, cookie=10))
    assert [(r.command, r.cookie, r.error) for r in drain(parser)] == [(READ, 10, OK)]


def test_oversize_refused_write_payload_is_skipped() -> None:
    parser = RequestParser(BIG)
    length = MAX_BLOCK + 1
    parser.feed(request(WRITE, 0, 0, length, cookie=1))
    [req] = drain(parser)
    assert (req.error, req.payload) == (EINVAL, b"")
    chunk = bytes(MIB)
    for _ in range(length // MIB):
        parser.feed(chunk)
        assert parser.next_request() is None
    parser.feed(b"\x00" * (length % MIB) + request(CACHE, 0, 0, 512, cookie=2))
    assert [(r.command, r.cookie, r.error) for r in drain(parser)] == [(CACHE, 2, OK)]


def test_refused_write_of_max_skipped_payload_is_skipped() -> None:
    assert MAX_SKIPPED_PAYLOAD == 64 * MIB
    parser = RequestParser(BIG)
    stream = request(WRITE, 0, 0, MAX_SKIPPED_PAYLOAD, cookie=1) + bytes(MAX_SKIPPED_PAYLOAD)
    parser.feed(stream + request(FLUSH, cookie=2))
    assert [(r.cookie, r.error) for r in drain(parser)] == [(1, EINVAL), (2, OK)]


@pytest.mark.parametrize(
    ("export", "offset", "length"),
    [(BIG, 0, MAX_SKIPPED_PAYLOAD + 1), (BIG, 0, 2**32 - 1), (RW, 2 * MIB, 2**32 - 1)],
)
def test_refused_write_too_long_to_skip_is_a_protocol_error(
    export: ExportInfo, offset: int, length: int
) -> None:
    parser = RequestParser(export)
    parser.feed(request(WRITE, 0, offset, length))
    with pytest.raises(ProtocolError, match=str(length)):
        parser.next_request()


@pytest.mark.parametrize("magic", [0x25609514, 0x67446698, 0, 0xFFFFFFFF])
def test_bad_magic_is_a_protocol_error(magic: int) -> None:
    parser = RequestParser(RW)
    parser.feed(request(READ, 0, 0, 512, cookie=1))
    bad = struct.pack(">I", magic) + request(READ, 0, 0, 512)[4:]
    parser.feed(bad[:-1])
    assert [r.cookie for r in drain(parser)] == [1]  # an incomplete header is not judged yet
    parser.feed(bad[-1:])
    with pytest.raises(ProtocolError, match=f"{magic:08x}"):
        parser.next_request()


@pytest.mark.parametrize("cmd", [READ, WRITE, TRIM, WRITE_ZEROES, CACHE])
@pytest.mark.parametrize("offset", [0, 4096, 1 * MIB])
def test_zero_length_requests_are_valid(cmd: int, offset: int) -> None:
    parser = RequestParser(RW)
    parser.feed(request(cmd, 0, offset, 0, cookie=5) + request(FLUSH, cookie=6))
    got = drain(parser)
    assert [(r.command, r.cookie, r.length, r.payload, r.error) for r in got] == [
        (cmd, 5, 0, b"", OK),
        (FLUSH, 6, 0, b"", OK),
    ]


def test_disc_is_delivered() -> None:
    parser = RequestParser(RW)
    parser.feed(request(DISC, cookie=7))
    assert [(r.command, r.cookie, r.error) for r in drain(parser)] == [(DISC, 7, OK)]


# -- replies -------------------------------------------------------------------------------


def test_simple_reply_layout() -> None:
    assert simple_reply(0x0102030405060708, 22) == bytes.fromhex(
        "67446698 00000016 0102030405060708"
    )
    assert simple_reply(U64_MAX) == bytes.fromhex("67446698 00000000 ffffffffffffffff")
    assert simple_reply(0, w.Errno.ESHUTDOWN) == bytes.fromhex("67446698 0000006c 0000000000000000")
