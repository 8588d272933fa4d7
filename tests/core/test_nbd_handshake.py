"""ServerHandshake against hand-built client byte streams (NBD fixed newstyle, doc/proto.md).

The client side is encoded here with ``struct`` and the server's replies are decoded with this
module's own structs, so a mistake in nbd_wire's layouts cannot hide itself; only the magic
numbers and enumeration values are taken from nbd_wire.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.core import nbd_wire as w
from volkeeper.core.nbd_handshake import ExportInfo, HandshakeState, ServerHandshake, TlsMode

# -- a tiny NBD client, written from the spec ----------------------------------------------

C_FIXED_NEWSTYLE = 1 << 0
C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY = 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# Transmission flags expected for a read-write export: HAS_FLAGS | SEND_FLUSH | SEND_FUA |
# SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN | SEND_CACHE; a read-only export sets
# READ_ONLY (bit 1) and, like nbdkit, does not advertise TRIM and WRITE_ZEROES.
RW_FLAGS = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400
RO_FLAGS = (RW_FLAGS | 0x0002) & ~(0x0020 | 0x0040)
assert RW_FLAGS == 0x056D

REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length


def client_flags(flags: int) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, magic: int = w.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, opt, len(data)) + data


def info_request(name: bytes | str, requests: Sequence[int] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
    return body + b"".join(struct.pack(">H", r) for r in requests)


def go(name: str | bytes, requests: Sequence[int] = ()) -> bytes:
    return option(OPT_GO, info_request(name, requests))


def info(name: str | bytes, requests: Sequence[int] = ()) -> bytes:
    return option(OPT_INFO, info_request(name, requests))


def reply(opt: int, reply_type: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", w.OPTION_REPLY_MAGIC, opt, reply_type, len(data)) + data


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into (option, reply type, data); every byte must be accounted for."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= REPLY_HEADER.size, f"truncated reply header at {pos}"
        magic, opt, reply_type, length = REPLY_HEADER.unpack_from(data, pos)
        assert magic == w.OPTION_REPLY_MAGIC
        pos += REPLY_HEADER.size
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated reply data"
        pos += length
        out.append((opt, reply_type, payload))
    return out


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


# -- an in-test export catalog ---------------------------------------------------------------


@dataclass
class Catalog:
    """Implements the ExportCatalog protocol: lookup / exports / shutting_down."""

    items: list[ExportInfo] = field(default_factory=list)
    shutting_down: bool = False

    def lookup(self, name: str) -> ExportInfo | None:
        return next((e for e in self.items if e.name == name), None)

    def exports(self) -> Sequence[ExportInfo]:
        return list(self.items)


MIB = 1024 * 1024
DATA1 = ExportInfo("data1", 64 * MIB, 512, description="web server data")
LOGS = ExportInfo("logs", 8 * MIB, 4096)
RO = ExportInfo("archive", 3 * MIB, 512, read_only=True)


def two_exports() -> Catalog:
    return Catalog([DATA1, LOGS])


def negotiating(catalog: Catalog, flags: int = C_FIXED_NEWSTYLE) -> ServerHandshake:
    hs = ServerHandshake(catalog)
    hs.greeting()
    assert hs.receive_data(client_flags(flags)) == b""
    assert hs.state is HandshakeState.OPTIONS
    return hs


# -- greeting and client flags -----------------------------------------------------------------


def test_greeting_bytes() -> None:
    hs = ServerHandshake(two_exports())
    # NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES.
    assert hs.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert hs.state is HandshakeState.CLIENT_FLAGS
    assert hs.export is None


def test_partial_client_flags_wait() -> None:
    hs = ServerHandshake(two_exports())
    assert hs.receive_data(b"\x00\x00\x00") == b""
    assert hs.state is HandshakeState.CLIENT_FLAGS
    assert hs.receive_data(b"\x01") == b""
    assert hs.state is HandshakeState.OPTIONS


@pytest.mark.parametrize(
    "flags", [0, C_FIXED_NEWSTYLE, C_NO_ZEROES, C_FIXED_NEWSTYLE | C_NO_ZEROES]
)
def test_known_client_flags_accepted(flags: int) -> None:
    negotiating(two_exports(), flags)


# BUG (src): ``flags & ~known`` in ServerHandshake._client_flags inverts an IntFlag, and on
# Python 3.11+ ``~(C_FIXED_NEWSTYLE | C_NO_ZEROES)`` is ClientFlag(0), so every unknown bit is
# accepted and negotiation goes on.  proto.md, "Client flags": "the server MUST drop the TCP
# connection if the client sets an unknown flag".
def test_unknown_client_flag_closes() -> None:
    for flags in (1 << 2, 1 << 31, C_FIXED_NEWSTYLE | C_NO_ZEROES | 1 << 7):
        hs = ServerHandshake(two_exports())
        # The option after the flags must not be answered: the connection is to be dropped.
        out = hs.receive_data(client_flags(flags) + option(OPT_LIST))
        assert out == b"", f"flags 0x{flags:08x} were accepted"
        assert hs.state is HandshakeState.CLOSED
        assert f"{flags:08x}" in hs.close_reason
        assert hs.receive_data(option(OPT_LIST)) == b""
        assert hs.state is HandshakeState.CLOSED


# -- NBD_OPT_EXPORT_NAME --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "length"),
    [(C_FIXED_NEWSTYLE, 134), (C_FIXED_NEWSTYLE | C_NO_ZEROES, 10), (0, 134), (C_NO_ZEROES, 10)],
)
def test_export_name_reply_and_no_zeroes(flags: int, length: int) -> None:
    hs = negotiating(two_exports(), flags)
    out = hs.receive_data(option(OPT_EXPORT_NAME, b"logs"))
    assert len(out) == length
    assert out[:10] == struct.pack(">QH", 8 * MIB, RW_FLAGS)
    assert out[10:] == bytes(length - 10)
    assert hs.state is HandshakeState.TRANSMISSION
    assert hs.export == LOGS
    assert hs.leftover == b""


def test_export_name_read_only_flag() -> None:
    hs = negotiating(Catalog([RO]), C_FIXED_NEWSTYLE | C_NO_ZEROES)
    out = hs.receive_data(option(OPT_EXPORT_NAME, b"archive"))
    assert out == struct.pack(">QH", 3 * MIB, RO_FLAGS)
    assert hs.export == RO


@pytest.mark.parametrize("name", [b"nope", b"DATA1", b"data1 ", b"\xff\xfe", b"x" * 5000])
def test_export_name_unknown_closes(name: bytes) -> None:
    hs = negotiating(two_exports())
    assert hs.receive_data(option(OPT_EXPORT_NAME, name)) == b""
    assert hs.state is HandshakeState.CLOSED
    assert hs.export is None
    assert "EXPORT_NAME" in hs.close_reason


def test_export_name_empty_is_the_only_export() -> None:
    hs = negotiating(Catalog([LOGS]), C_NO_ZEROES)
    out = hs.receive_data(option(OPT_EXPORT_NAME))
    assert out == struct.pack(">QH", 8 * MIB, RW_FLAGS)
    assert hs.state is HandshakeState.TRANSMISSION
    assert hs.export == LOGS


@pytest.mark.parametrize("items", [[], [DATA1, LOGS]], ids=["no-exports", "two-exports"])
def test_export_name_empty_without_single_export_closes(items: list[ExportInfo]) -> None:
    hs = negotiating(Catalog(items))
    assert hs.receive_data(option(OPT_EXPORT_NAME)) == b""
    assert hs.state is HandshakeState.CLOSED


def test_export_name_while_shutting_down_closes() -> None:
    hs = negotiating(Catalog([DATA1], shutting_down=True))
    assert hs.receive_data(option(OPT_EXPORT_NAME, b"data1")) == b""
    assert hs.state is HandshakeState.CLOSED


def test_bytes_after_export_name_are_leftover() -> None:
    hs = ServerHandshake(two_exports())
    trailing = b"\x25\x60\x95\x13" + bytes(range(40))
    stream = client_flags(C_NO_ZEROES) + option(OPT_EXPORT_NAME, b"data1") + trailing
    out = hs.receive_data(stream)
    assert out == struct.pack(">QH", 64 * MIB, RW_FLAGS)
    assert hs.leftover == trailing


# -- NBD_OPT_GO / NBD_OPT_INFO ------------------------------------------------------------


def test_go_replies_and_enters_transmission() -> None:
    hs = negotiating(two_exports())
    out = hs.receive_data(go("data1"))
    assert parse_replies(out) == [
        (OPT_GO, REP_INFO, info_export(64 * MIB, RW_FLAGS)),
        (OPT_GO, REP_INFO, info_block_size(512, 4096, 32 * MIB)),
        (OPT_GO, REP_ACK, b""),
    ]
    assert hs.state is HandshakeState.TRANSMISSION
    assert hs.export == DATA1
    assert hs.leftover == b""


def test_go_block_size_for_4k_sectors() -> None:
    hs = negotiating(two_exports())
    replies = parse_replies(hs.receive_data(go("logs", [INFO_BLOCK_SIZE])))
    infos = [data for _, kind, data in replies if kind == REP_INFO]
    assert info_block_size(4096, 4096, 32 * MIB) in infos
    assert info_export(8 * MIB, RW_FLAGS) in infos


def test_go_read_only_export_flags() -> None:
    hs = negotiating(Catalog([RO]))
    replies = parse_replies(hs.receive_data(go("archive")))
    assert (OPT_GO, REP_INFO, info_export(3 * MIB, RO_FLAGS)) in replies
    assert replies[-1] == (OPT_GO, REP_ACK, b"")


def test_info_stays_in_options_then_go_works() -> None:
    hs = negotiating(two_exports())
    out = hs.receive_data(info("logs"))
    assert parse_replies(out) == [
        (OPT_INFO, REP_INFO, info_export(8 * MIB, RW_FLAGS)),
        (OPT_INFO, REP_INFO, info_block_size(4096, 4096, 32 * MIB)),
        (OPT_INFO, REP_ACK, b""),
    ]
    assert hs.state is HandshakeState.OPTIONS
    assert hs.export is None
    out = hs.receive_data(go("data1"))
    assert parse_replies(out)[-1] == (OPT_GO, REP_ACK, b"")
    assert hs.export == DATA1


@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
def test_name_and_description_when_requested(opt: int) -> None:
    hs = negotiating(two_exports())
    requests = [INFO_DESCRIPTION, INFO_NAME, INFO_BLOCK_SIZE]
    replies = parse_replies(hs.receive_data(option(opt, info_request("data1", requests))))
    assert replies[-1] == (opt, REP_ACK, b"")
    assert all(o == opt and kind == REP_INFO for o, kind, _ in replies[:-1])
    assert sorted(data for _, _, data in replies[:-1]) == sorted(
        [
            info_export(64 * MIB, RW_FLAGS),
            info_block_size(512, 4096, 32 * MIB),
            b"\x00\x01" + b"data1",
            b"\x00\x02" + b"web server data",
        ]
    )


def test_no_name_or_description_unless_requested() -> None:
    hs = negotiating(two_exports())
    replies = parse_replies(hs.receive_data(info("data1", [INFO_EXPORT])))
    types = [struct.unpack_from(">H", data)[0] for _, kind, data in replies if kind == REP_INFO]
    assert sorted(types) == [INFO_EXPORT, INFO_BLOCK_SIZE]


def test_empty_description_is_omitted_and_unknown_info_types_ignored() -> None:
    hs = negotiating(two_exports())
    replies = parse_replies(hs.receive_data(info("logs", [0x7777, INFO_DESCRIPTION, 0xFFFF])))
    assert replies[-1] == (OPT_INFO, REP_ACK, b"")
    types = [struct.unpack_from(">H", data)[0] for _, kind, data in replies if kind == REP_INFO]
    assert sorted(types) == [INFO_EXPORT, INFO_BLOCK_SIZE]


def test_go_default_export_reports_canonical_name() -> None:
    hs = negotiating(Catalog([LOGS]))
    replies = parse_replies(hs.receive_data(go("", [INFO_NAME])))
    assert (OPT_GO, REP_INFO, b"\x00\x01logs") in replies
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    assert hs.export == LOGS


@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
@pytest.mark.parametrize(
    ("items", "name"),
    [([DATA1, LOGS], "nope"), ([DATA1, LOGS], ""), ([], ""), ([DATA1], "Data1")],
    ids=["unknown", "default-of-two", "default-of-none", "case-matters"],
)
def test_unknown_export_is_err_unknown_and_negotiation_continues(
    opt: int, items: list[ExportInfo], name: str
) -> None:
    hs = negotiating(Catalog(items))
    replies = parse_replies(hs.receive_data(option(opt, info_request(name))))
    assert len(replies) == 1
    assert replies[0][:2] == (opt, REP_ERR_UNKNOWN)
    replies[0][2].decode("utf-8")  # a human-readable message, if any, is UTF-8
    assert hs.state is HandshakeState.OPTIONS
    assert hs.export is None
    # The client may go on: list the exports and abort.
    replies = parse_replies(hs.receive_data(option(OPT_LIST)))
    assert replies[-1] == (OPT_LIST, REP_ACK, b"")


MALFORMED_GO_DATA = {
    "empty": b"",
    "short-name-length": b"\x00\x00\x00",
    "name-beyond-data": struct.pack(">I", 10) + b"data1",
    "missing-count": struct.pack(">I", 5) + b"data1",
    "half-count": struct.pack(">I", 5) + b"data1" + b"\x00",
    "too-few-requests": info_request("data1")[:-2] + struct.pack(">HH", 2, INFO_NAME),
    "trailing-bytes": info_request("data1", [INFO_NAME]) + b"\x00",
    "odd-trailing-byte": info_request("data1") + b"\x01",
    "bad-utf8": info_request(b"\xc3\x28"),
    "huge-name-length": struct.pack(">I", 0xFFFFFFFF) + b"data1\x00\x00",
    "name-over-4096": info_request(b"a" * 4097),
}


@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
@pytest.mark.parametrize("data", MALFORMED_GO_DATA.values(), ids=MALFORMED_GO_DATA.keys())
def test_malformed_go_data_is_err_invalid(opt: int, data: bytes) -> None:
    hs = negotiating(Catalog([DATA1]))
    replies = parse_replies(hs.receive_data(option(opt, data)))
    assert [r[:2] for r in replies] == [(opt, REP_ERR_INVALID)]
    assert hs.state is HandshakeState.OPTIONS
    # Framing survived: the next option is parsed normally.
    assert parse_replies(hs.receive_data(go("data1")))[-1] == (OPT_GO, REP_ACK, b"")


# -- NBD_OPT_LIST / NBD_OPT_ABORT / unsupported options ------------------------------------


def test_list_one_server_reply_per_export_then_ack() -> None:
    hs = negotiating(Catalog([DATA1, LOGS, RO]))
    out = hs.receive_data(option(OPT_LIST))
    assert out == (
        reply(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x05data1")
        + reply(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x04logs")
        + reply(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x07archive")
        + reply(OPT_LIST, REP_ACK)
    )
    assert hs.state is HandshakeState.OPTIONS


def test_list_without_exports_is_just_ack() -> None:
    hs = negotiating(Catalog([]))
    assert hs.receive_data(option(OPT_LIST)) == reply(OPT_LIST, REP_ACK)


def test_list_with_data_is_err_invalid() -> None:
    hs = negotiating(two_exports())
    replies = parse_replies(hs.receive_data(option(OPT_LIST, b"data1")))
    assert [r[:2] for r in replies] == [(OPT_LIST, REP_ERR_INVALID)]
    assert hs.state is HandshakeState.OPTIONS


def test_abort_acks_then_closes() -> None:
    hs = negotiating(two_exports())
    out = hs.receive_data(option(OPT_ABORT) + go("data1"))
    assert out == reply(OPT_ABORT, REP_ACK)
    assert hs.state is HandshakeState.CLOSED
    assert "ABORT" in hs.close_reason
    assert hs.export is None
    assert hs.receive_data(go("data1")) == b""


@pytest.mark.parametrize(
    ("opt", "data"),
    [
        (OPT_STARTTLS, b""),
        (OPT_STRUCTURED_REPLY, b""),
        (0, b""),
        (4, b"data1"),  # PEEK_EXPORT (withdrawn)
        (9, info_request("data1")),  # LIST_META_CONTEXT
        (10, info_request("data1")),  # SET_META_CONTEXT
        (11, b""),  # EXTENDED_HEADERS
        (12, b"\x00" * 100),
        (0xFFFFFFFF, option(OPT_ABORT)),  # data that looks like an option must be skipped
    ],
)
def test_unsupported_options_err_unsup_and_continue(opt: int, data: bytes) -> None:
    hs = negotiating(two_exports())
    out = hs.receive_data(option(opt, data) + option(OPT_LIST))
    replies = parse_replies(out)
    assert replies[0][:2] == (opt, REP_ERR_UNSUP)
    replies[0][2].decode("utf-8")
    assert [r[:2] for r in replies[1:]] == [
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_ACK),
    ]
    assert hs.state is HandshakeState.OPTIONS


# -- shutdown, framing violations ----------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "opt"),
    [(go("data1"), OPT_GO), (info("data1"), OPT_INFO), (option(OPT_LIST), OPT_LIST)],
)
def test_shutting_down_is_err_shutdown(stream: bytes, opt: int) -> None:
    hs = negotiating(Catalog([DATA1], shutting_down=True))
    replies = parse_replies(hs.receive_data(stream))
    assert [r[:2] for r in replies] == [(opt, REP_ERR_SHUTDOWN)]
    assert hs.state is HandshakeState.OPTIONS
    assert hs.export is None
    # NBD_OPT_ABORT is still acknowledged.
    assert hs.receive_data(option(OPT_ABORT)) == reply(OPT_ABORT, REP_ACK)
    assert hs.state is HandshakeState.CLOSED


def test_catalog_is_asked_afresh_at_each_option() -> None:
    catalog = Catalog([DATA1])
    hs = negotiating(catalog)
    assert parse_replies(hs.receive_data(info("data1")))[-1] == (OPT_INFO, REP_ACK, b"")
    catalog.shutting_down = True
    assert [r[:2] for r in parse_replies(hs.receive_data(go("data1")))] == [
        (OPT_GO, REP_ERR_SHUTDOWN)
    ]
    catalog.shutting_down = False
    catalog.items = [LOGS]
    replies = parse_replies(hs.receive_data(go("data1")))
    assert [r[:2] for r in replies] == [(OPT_GO, REP_ERR_UNKNOWN)]


def test_bad_option_magic_closes() -> None:
    hs = negotiating(two_exports())
    out = hs.receive_data(option(OPT_LIST, magic=0x49484156454F5055))
    assert out == b""
    assert hs.state is HandshakeState.CLOSED
    assert "magic" in hs.close_reason


def test_option_length_above_limit_closes_on_the_header_alone() -> None:
    hs = negotiating(two_exports())
    header = struct.pack(">QII", w.IHAVEOPT, 0x1234, w.MAX_OPTION_DATA + 1)
    assert hs.receive_data(header) == b""
    assert hs.state is HandshakeState.CLOSED
    assert str(w.MAX_OPTION_DATA + 1) in hs.close_reason


def test_option_length_at_limit_is_skipped() -> None:
    assert w.MAX_OPTION_DATA == 64 * 1024
    hs = negotiating(two_exports())
    out = hs.receive_data(option(0x1234, b"\xaa" * w.MAX_OPTION_DATA))
    assert [r[:2] for r in parse_replies(out)] == [(0x1234, REP_ERR_UNSUP)]
    assert hs.state is HandshakeState.OPTIONS


def test_bytes_after_go_end_up_in_leftover() -> None:
    hs = ServerHandshake(two_exports())
    trailing = struct.pack(">IHHQQI", w.REQUEST_MAGIC, 0, 0, 7, 0, 512) + b"\x01\x02"
    hs.receive_data(client_flags(C_FIXED_NEWSTYLE) + info("logs") + go("data1") + trailing)
    assert hs.state is HandshakeState.TRANSMISSION
    assert hs.export == DATA1
    assert hs.leftover == trailing


def test_option_data_arriving_in_pieces() -> None:
    hs = negotiating(two_exports())
    stream = go("data1", [INFO_NAME])
    for byte in stream[:-1]:
        assert hs.receive_data(bytes([byte])) == b""
        assert hs.state is HandshakeState.OPTIONS
    assert parse_replies(hs.receive_data(stream[-1:]))[-1] == (OPT_GO, REP_ACK, b"")
    assert hs.state is HandshakeState.TRANSMISSION


# -- spec rules that once failed here ----------------------------------------------------


def test_err_unknown_message_is_at_most_4096_bytes() -> None:
    hs = negotiating(two_exports())
    replies = parse_replies(hs.receive_data(go("n" * 4096)))
    assert replies[0][:2] == (OPT_GO, REP_ERR_UNKNOWN)
    assert len(replies[0][2]) <= 4096


def test_other_options_while_shutting_down_get_err_shutdown() -> None:
    hs = negotiating(Catalog([DATA1], shutting_down=True))
    for opt, data in [(OPT_STARTTLS, b""), (OPT_STRUCTURED_REPLY, b""), (0x1234, b"")]:
        replies = parse_replies(hs.receive_data(option(opt, data)))
        assert [r[:2] for r in replies] == [(opt, REP_ERR_SHUTDOWN)]


# -- the crucial property: any split of a valid stream gives the same negotiation ------------

UNSUPPORTED = [OPT_STARTTLS, OPT_STRUCTURED_REPLY, 0, 4, 9, 10, 11, 12, 0x7FFF_FFFF, 0xFFFF_FFFF]
INFO_TYPES = st.lists(st.sampled_from([0, 1, 2, 3, 0x1234]), max_size=4, unique=True)
NAMES = ["data1", "logs", "archive"]


@st.composite
def pre_option(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """One option that keeps negotiation going: (bytes, option, final reply type)."""
    kind = draw(st.sampled_from(["list", "info", "info-unknown", "go-unknown", "unsup", "bad"]))
    if kind == "list":
        return option(OPT_LIST), OPT_LIST, REP_ACK
    if kind == "info":
        data = info_request(draw(st.sampled_from(NAMES)), draw(INFO_TYPES))
        return option(OPT_INFO, data), OPT_INFO, REP_ACK
    if kind in ("info-unknown", "go-unknown"):
        opt = OPT_INFO if kind == "info-unknown" else OPT_GO
        name = draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in NAMES))
        return option(opt, info_request(name, draw(INFO_TYPES))), opt, REP_ERR_UNKNOWN
    if kind == "unsup":
        opt = draw(st.sampled_from(UNSUPPORTED))
        return option(opt, draw(st.binary(max_size=40))), opt, REP_ERR_UNSUP
    opt = draw(st.sampled_from([OPT_INFO, OPT_GO]))
    data = info_request(draw(st.sampled_from(NAMES)), [INFO_NAME]) + draw(st.binary(min_size=1))
    return option(opt, data), opt, REP_ERR_INVALID


@st.composite
def negotiation(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]], str, bytes, bool]:
    flags = draw(st.sampled_from([C_FIXED_NEWSTYLE, C_FIXED_NEWSTYLE | C_NO_ZEROES]))
    options = draw(st.lists(pre_option(), max_size=6))
    name = draw(st.sampled_from(NAMES))
    use_go = draw(st.booleans())
    final = go(name, draw(INFO_TYPES)) if use_go else option(OPT_EXPORT_NAME, name.encode())
    trailing = draw(st.binary(max_size=64))
    stream = client_flags(flags) + b"".join(o[0] for o in options) + final + trailing
    expected = [(opt, kind) for _, opt, kind in options]
    if use_go:
        expected.append((OPT_GO, REP_ACK))
    return stream, expected, name, trailing, bool(flags & C_NO_ZEROES)


def run(chunks: Sequence[bytes]) -> tuple[bytes, HandshakeState, ExportInfo | None, bytes, str]:
    """Feed chunks as the adapter does: stop feeding the handshake once negotiation ended."""
    hs = ServerHandshake(Catalog([DATA1, LOGS, RO]))
    out = hs.greeting()
    rest = b""
    for chunk in chunks:
        if hs.state in (HandshakeState.CLIENT_FLAGS, HandshakeState.OPTIONS):
            out += hs.receive_data(chunk)
        else:
            rest += chunk
    return out, hs.state, hs.export, hs.leftover + rest, hs.close_reason


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=150, deadline=None)
@given(negotiation(), st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_any_split_of_a_negotiation_gives_the_same_result(
    case: tuple[bytes, list[tuple[int, int]], str, bytes, bool], cuts: list[int]
) -> None:
    stream, expected, name, trailing, no_zeroes = case
    whole = run([stream])
    assert run([bytes([b]) for b in stream]) == whole
    assert run(split(stream, cuts)) == whole

    out, state, export, leftover, _ = whole
    assert state is HandshakeState.TRANSMISSION
    assert export is not None and export.name == name
    assert leftover == trailing
    # The output is the greeting, one complete answer per option, and (for EXPORT_NAME) the
    # export's size and flags.
    greeting, out = out[:18], out[18:]
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    if expected and expected[-1] == (OPT_GO, REP_ACK):
        replies = parse_replies(out)
    else:
        tail = 10 if no_zeroes else 134
        out, raw = out[:-tail], out[-tail:]
        assert raw[:10] == struct.pack(
            ">QH", export.size, RO_FLAGS if export.read_only else RW_FLAGS
        )
        replies = parse_replies(out)
    finals = [(opt, kind) for opt, kind, _ in replies if kind not in (REP_SERVER, REP_INFO)]
    assert finals == expected


# -- NBD_OPT_STARTTLS ---------------------------------------------------------------------------

REP_ERR_TLS_REQD = 0x80000005


def tls_negotiating(mode: TlsMode) -> ServerHandshake:
    hs = ServerHandshake(two_exports(), tls=mode)
    hs.greeting()
    hs.receive_data(client_flags(C_FIXED_NEWSTYLE))
    return hs


@pytest.mark.parametrize("mode", [TlsMode.OFFER, TlsMode.REQUIRE])
def test_starttls_is_acked_then_negotiation_goes_on_encrypted(mode: TlsMode) -> None:
    hs = tls_negotiating(mode)
    assert parse_replies(hs.receive_data(option(OPT_STARTTLS))) == [(OPT_STARTTLS, REP_ACK, b"")]
    assert hs.state is HandshakeState.STARTTLS and not hs.tls_active
    hs.tls_started()
    assert hs.state is HandshakeState.OPTIONS and hs.tls_active
    again = parse_replies(hs.receive_data(option(OPT_STARTTLS)))
    assert [(o, t) for o, t, _ in again] == [(OPT_STARTTLS, REP_ERR_INVALID)]
    hs.receive_data(go("data1"))
    assert hs.state is HandshakeState.TRANSMISSION and hs.export == DATA1


def test_a_tls_only_server_tells_a_plaintext_client_nothing_but_to_start_tls() -> None:
    hs = tls_negotiating(TlsMode.REQUIRE)
    for request in (option(OPT_LIST), info("data1"), go("data1"), option(OPT_STRUCTURED_REPLY)):
        (answer,) = parse_replies(hs.receive_data(request))
        assert answer[1] == REP_ERR_TLS_REQD, answer
        assert b"data1" not in answer[2] and b"logs" not in answer[2]
        assert hs.state is HandshakeState.OPTIONS
    hs.receive_data(option(OPT_EXPORT_NAME, b"data1"))  # it has no error reply
    assert hs.state is HandshakeState.CLOSED and hs.export is None
    assert hs.close_reason == "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only server"


def test_an_offering_server_serves_plaintext_clients_too() -> None:
    hs = tls_negotiating(TlsMode.OFFER)
    hs.receive_data(go("logs"))
    assert hs.state is HandshakeState.TRANSMISSION and not hs.tls_active


def test_starttls_on_a_plain_listener_is_unsupported() -> None:
    hs = tls_negotiating(TlsMode.OFF)
    (answer,) = parse_replies(hs.receive_data(option(OPT_STARTTLS)))
    assert answer == (OPT_STARTTLS, REP_ERR_UNSUP, b"TLS is not offered on this listener")


def test_bytes_injected_behind_starttls_close_the_connection() -> None:
    """STARTTLS command injection: a client waits for the ACK, so bytes sent along with the
    option were put there by someone else, and must never be read as negotiation."""
    hs = tls_negotiating(TlsMode.REQUIRE)
    out = hs.receive_data(option(OPT_STARTTLS) + go("data1"))
    assert out == b"" and hs.state is HandshakeState.CLOSED and hs.export is None
    assert hs.close_reason == "bytes after NBD_OPT_STARTTLS, before the TLS handshake"
    with_data = tls_negotiating(TlsMode.OFFER)
    (answer,) = parse_replies(with_data.receive_data(option(OPT_STARTTLS, b"x")))
    assert answer[1] == REP_ERR_INVALID and with_data.state is HandshakeState.OPTIONS
