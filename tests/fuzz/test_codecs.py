"""Fuzz targets: the parsers that take bytes from the network or text from a file.

Each target feeds hostile input to one parser in process -- arbitrary bytes, valid input with
bytes flipped, cut or spliced, in random splits -- and asks only what must hold for any input:
the parser answers or refuses with its own error (``ProtocolError``, ``ConfigError``), never
another exception, never a hang, and never an answer that breaks its own framing.  ``make
test`` runs ``FUZZ_EXAMPLES`` (300) examples of each; ``make fuzz`` runs many more
(``VOLKEEPER_FUZZ_EXAMPLES``, default 20,000 each; hypothesis keeps what it finds in
``.hypothesis/`` and replays it first).  The daemons' own listeners are fuzzed end to end in
tests/integration/test_fuzz.py (NBD) and test_peer_fuzz.py (replication).
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volkeeper.core import nbd_wire as w
from volkeeper.core.nbd_handshake import ExportInfo, HandshakeState, ServerHandshake, TlsMode
from volkeeper.core.nbd_transmission import RequestParser
from volkeeper.core.peer.wire import Flush, FrameDecoder, FrameEncoder, Hello, Write
from volkeeper.daemon.config.node import NodeConfig, parse_config
from volkeeper.errors import ConfigError, ProtocolError

FUZZ_EXAMPLES = int(os.environ.get("VOLKEEPER_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
EXPORT = ExportInfo("data1", 1 << 20, 512)


class Catalog:
    shutting_down = False

    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORT if name == "data1" else None

    def exports(self) -> list[ExportInfo]:
        return [EXPORT]


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def mutated(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    return bytes(out)


flips = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)
cuts = st.lists(st.integers(0, 1 << 16), max_size=8)

# -- NBD handshake -------------------------------------------------------------------------------

OPTIONS = st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 0xFFFF_FFFF])


def option(number: int, data: bytes) -> bytes:
    return struct.pack(">QII", w.IHAVEOPT, number, len(data)) + data


valid_options = st.lists(
    st.builds(option, OPTIONS, st.one_of(st.just(b""), st.binary(max_size=40),
                                         st.just(b"\x00\x00\x00\x05data1\x00\x00"))),
    max_size=6,
).map(b"".join)  # fmt: skip


def check_replies(out: bytes, transmission: bool) -> None:
    """Every byte a handshake sends is a whole reply frame, or, last, EXPORT_NAME's answer
    (size and flags, with or without the 124 zero bytes) once in transmission."""
    pos = 0
    while pos < len(out):
        if transmission and len(out) - pos in (10, 134):
            return
        assert len(out) - pos >= w.OPTION_REPLY_HEADER.size, f"a cut reply at {pos}"
        magic, _, _, length = w.OPTION_REPLY_HEADER.unpack_from(out, pos)
        assert magic == w.OPTION_REPLY_MAGIC, f"not a reply at {pos}"
        pos += w.OPTION_REPLY_HEADER.size + length
    assert pos == len(out), f"a reply runs past what was sent ({pos} of {len(out)} bytes)"


@FUZZ
@given(
    st.sampled_from(list(TlsMode)),
    st.one_of(st.binary(max_size=300), valid_options.map(lambda b: b"\x00\x00\x00\x03" + b)),
    flips,
    cuts,
)
def test_the_nbd_handshake_answers_any_bytes_within_its_framing(
    mode: TlsMode, data: bytes, changes: list[tuple[int, int]], where: list[int]
) -> None:
    handshake = ServerHandshake(Catalog(), mode)
    handshake.greeting()
    for chunk in splits(mutated(data, changes), where):
        if handshake.state not in (HandshakeState.CLIENT_FLAGS, HandshakeState.OPTIONS):
            break
        out = handshake.receive_data(chunk)
        check_replies(out, handshake.state is HandshakeState.TRANSMISSION)
    assert handshake.state in HandshakeState
    if handshake.state is HandshakeState.TRANSMISSION:
        assert handshake.export == EXPORT
    if handshake.state is HandshakeState.STARTTLS:
        assert mode is not TlsMode.OFF


# -- NBD transmission ----------------------------------------------------------------------------


def request(command: int, offset: int, length: int, flags: int = 0) -> bytes:
    head = w.REQUEST.pack(w.REQUEST_MAGIC, flags, command, 7, offset, length)
    return head + (b"\xab" * length if command == w.Command.WRITE and length <= 4096 else b"")


valid_requests = st.lists(
    st.builds(request, st.sampled_from(list(w.Command)), st.integers(0, 1 << 21),
              st.sampled_from([0, 1, 512, 4096, 1 << 26]), st.sampled_from([0, 1, 2, 4, 0xFFFF])),
    max_size=6,
).map(b"".join)  # fmt: skip


@FUZZ
@given(st.one_of(st.binary(max_size=600), valid_requests), flips, cuts)
def test_the_request_parser_takes_or_refuses_any_bytes(
    data: bytes, changes: list[tuple[int, int]], where: list[int]
) -> None:
    parser = RequestParser(EXPORT)
    for chunk in splits(mutated(data, changes), where):
        window = parser.payload_window()
        if window is not None and len(chunk) <= len(window):
            window[: len(chunk)] = chunk
            parser.payload_received(len(chunk))
        else:
            parser.feed(chunk)
        try:
            while (found := parser.next_request()) is not None:
                assert found.offset >= 0 and found.length >= 0
        except ProtocolError:
            return  # the connection would be closed: that is a correct answer


# -- replication frames ---------------------------------------------------------------------------

HELLO = Hello(
    node="alpha", volume="data1", job="web", source_volume="data1", volume_size=1 << 20,
    sector_size=512, current_generation=1, previous_generation=0,
)  # fmt: skip


def encoded(*frames: object) -> bytes:
    encoder = FrameEncoder()
    return b"".join(bytes(part) for frame in frames for part in encoder.encode(frame))  # type: ignore[arg-type]


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=600),
        st.just(encoded(HELLO, Write(4096, b"x" * 600), Flush())),
    ),
    flips,
    cuts,
)
def test_the_frame_decoder_decodes_or_refuses_any_bytes(
    data: bytes, changes: list[tuple[int, int]], where: list[int]
) -> None:
    decoder = FrameDecoder()
    try:
        for chunk in splits(mutated(data, changes), where):
            window = decoder.payload_window()
            if window is not None and len(chunk) <= len(window):
                window[: len(chunk)] = chunk
                decoder.payload_received(len(chunk))
            else:
                decoder.feed(chunk)
            while decoder.next_frame() is not None:
                pass
        decoder.eof()
    except ProtocolError:
        pass


# -- the node config -------------------------------------------------------------------------------

VALID = """\
[node]
name = "alpha"
state_dir = "/var/lib/volkeeper/alpha"
listen = "127.0.0.1:7788"
control = "unix:/run/volkeeper/alpha.sock"
nbd = "127.0.0.1:10809"
nbd_tls = "offer"
nbd_allow = ["10.0.0.0/24"]

[peers]
beta = { address = "10.0.0.2:7788", fingerprint = "sha256:%s" }
gamma = "10.0.0.3:7788"

[[volume]]
name = "data1"
path = "/srv/data1.img"
size = "1GiB"
read_only_clients = ["10.0.0.7"]
""" % ("ab" * 32)

toml_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
              st.floats(allow_nan=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip


def test_the_fuzzed_config_starts_valid() -> None:
    assert isinstance(parse_config(VALID), NodeConfig)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=400), st.binary(max_size=400).map(lambda b: VALID + b.decode("latin-1"))
    ),
    flips,
)
def test_the_config_loader_loads_or_names_the_problem(
    text: str, changes: list[tuple[int, int]]
) -> None:
    mangled = mutated(text.encode("utf-8", "surrogatepass"), changes).decode("utf-8", "replace")
    try:
        parse_config(mangled, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: "), exc


@FUZZ
@given(st.dictionaries(st.sampled_from(["node", "peers", "volume", "tls", "job", "x"]),
                       toml_values, max_size=5))  # fmt: skip
def test_any_structure_is_validated_not_crashed_on(document: dict[str, object]) -> None:
    try:
        NodeConfig.model_validate(document)
    except Exception as exc:  # pydantic's ValidationError: parse_config turns it into lines
        assert type(exc).__name__ == "ValidationError", repr(exc)
