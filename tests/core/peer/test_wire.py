"""core/peer/wire.py: the replication protocol's frames, encoder and incremental decoder.

Expected bytes are built here with ``struct`` and ``xxhash`` straight from the layouts in
layout.py's docstring (``raw_frame``), not with the module's own Structs, so a layout change
on one side only fails a test.  Every decoding test feeds the stream whole, byte at a time
and in random splits; every corruption must end in a ProtocolError that names the frame.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import struct
from collections.abc import Iterable, Sequence

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.core.peer import wire as pw
from volkeeper.core.peer.wire import (
    Ack,
    Codec,
    DataState,
    Flush,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    Goodbye,
    GoodbyeReason,
    Handover,
    Hashes,
    HashRequest,
    Hello,
    HelloOk,
    Job,
    Marked,
    Ping,
    Pong,
    Refuse,
    RefuseReason,
    ResyncCompressed,
    ResyncData,
    Role,
    State,
    SwitchoverRequest,
    Trim,
    Write,
    WriteCompressed,
    Zero,
    choose_version,
)
from volkeeper.errors import ProtocolError

MAGIC = 0x564B5031
MIB = 1024 * 1024
MAX_BODY = 32 * MIB + 64
DIRECT_MIN = pw.DIRECT_MIN
U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1
# Names a ProtocolError must start with: "<TYPE> frame <n>: " (or "frame <n>: " when the
# header is too broken to know the type).
NAMED = re.compile(r"^(?:[A-Z_]+ )?frame \d+: \S")


def raw_frame(kind: int, body: bytes, seq: int = 1, flags: int = 0, magic: int = MAGIC) -> bytes:
    head = struct.pack(">IHHIQ", magic, kind, flags, len(body), seq) + body
    return head + struct.pack(">Q", xxhash.xxh3_64_intdigest(head))


def s16(text: bytes) -> bytes:
    return struct.pack(">H", len(text)) + text


def hello_body(
    node: bytes = b"alpha",
    volume: bytes = b"data1",
    job: bytes = b"web",
    role: int = 0,
    source: bytes = b"data0",
) -> bytes:
    fixed = struct.pack(">HHQIQQBIQ", 1, 1, 1 << 30, 512, 0xAAAA, 0xBBBB, role, 0, 0)
    return fixed + s16(node) + s16(volume) + s16(job) + s16(source)


def hello_ok_body(node: bytes = b"beta", volume: bytes = b"data1", state: int = 0) -> bytes:
    return struct.pack(">HQIQQB", 1, 1 << 30, 512, 0xAAAA, 0xBBBB, state) + s16(node) + s16(volume)


def decode(chunks: Iterable[bytes]) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    decoder.eof()
    return frames


def byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def stream(frames: Sequence[Frame]) -> bytes:
    encoder = FrameEncoder()
    return b"".join(b"".join(encoder.encode(frame)) for frame in frames)


def decode_error(data: bytes) -> str:
    """The message of the ProtocolError the stream must raise (fed whole)."""
    with pytest.raises(ProtocolError) as info:
        decode([data])
    message = str(info.value)
    assert NAMED.match(message), message
    return message


# --- strategies -------------------------------------------------------------------------

u16s, u32s, u64s = st.integers(0, U16), st.integers(0, U32), st.integers(0, U64)
names = st.text(max_size=12)
messages = st.text(max_size=40)
payloads = st.binary(max_size=600).flatmap(
    lambda b: st.sampled_from([b, bytearray(b), memoryview(b)])
)
versions = st.tuples(u16s, u16s).map(sorted)

hellos = st.builds(
    lambda v, **kw: Hello(min_version=v[0], max_version=v[1], **kw),
    versions,
    node=names, volume=names, job=names, source_volume=names, volume_size=u64s,
    sector_size=u32s, current_generation=u64s, previous_generation=u64s,
    role=st.sampled_from(Role),
)  # fmt: skip
hello_oks = st.builds(
    HelloOk,
    node=names, volume=names, volume_size=u64s, sector_size=u32s, current_generation=u64s,
    previous_generation=u64s, data_state=st.sampled_from(DataState), chosen_version=u16s,
)  # fmt: skip
frames_st: st.SearchStrategy[Frame] = st.one_of(
    hellos,
    hello_oks,
    st.builds(Refuse, st.sampled_from(RefuseReason), messages),
    st.builds(Write, u64s, payloads, st.booleans()),
    st.builds(ResyncData, u64s, payloads, st.booleans()),
    st.builds(Zero, u64s, u64s, st.booleans(), st.booleans()),
    st.builds(Trim, u64s, u64s, st.booleans()),
    st.just(Flush()),
    st.builds(Ack, u64s, u32s, st.booleans()),
    st.builds(Ping, u64s),
    st.builds(Pong, u64s),
    st.builds(Goodbye, st.sampled_from(GoodbyeReason), messages),
)

HELLO = Hello(
    node="alpha", volume="data1", job="web", source_volume="data0", volume_size=1 << 30,
    sector_size=512, current_generation=0xAAAA, previous_generation=0xBBBB,
)  # fmt: skip
SAMPLES: list[Frame] = [
    HELLO,
    HelloOk(
        node="beta", volume="data1", volume_size=1 << 30, sector_size=512,
        current_generation=0xAAAA, previous_generation=0xBBBB, data_state=DataState.OUTDATED,
    ),
    Refuse(RefuseReason.SIZE, "target volume beta:data1 is 1 GiB, smaller than 2 GiB"),
    Write(4096, b"\x5a" * 4096, fua=True),
    ResyncData(1 << 20, bytes(range(256)) * 16),
    Zero(8192, 65536, fua=True, may_trim=True),
    Trim(0, 1 << 20, fua=True),
    Flush(),
    Ack(3, 0, durable=True),
    Ping(0x0123456789ABCDEF),
    Pong(0x0123456789ABCDEF),
    Goodbye(GoodbyeReason.SHUTDOWN, "daemon stopping — à bientôt"),
    State(DataState.UP_TO_DATE, 0xAAAA, 0xBBBB),
    Job('{"name": "web", "description": "web server — à jour"}'),
    WriteCompressed(8192, Codec.ZSTD, 65536, b"\x28\xb5\x2f\xfd" + bytes(40), fua=True),
    ResyncCompressed(1 << 20, Codec.LZ4, 4096, bytes(range(200))),
    HashRequest(1 << 20, 1 << 20, 4096),
    Hashes(7, bytes(range(32))),
    Handover('{"job": {"name": "web", "source_node": "beta"}, "mirrors": []}'),
    Marked(65536, b"x\x9c\x03\x00\x00\x00\x00\x01"),
    SwitchoverRequest(),
]  # fmt: skip


# --- round trips --------------------------------------------------------------------------


def test_every_frame_type_has_a_sample() -> None:
    assert {frame.TYPE for frame in SAMPLES} == set(FrameType)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: f.TYPE.name)
def test_sample_round_trips_whole_and_byte_at_a_time(frame: Frame) -> None:
    data = stream([frame, frame])
    assert decode([data]) == [frame, frame]
    assert decode(byte_at_a_time(data)) == [frame, frame]


@settings(max_examples=300)
@given(st.lists(frames_st, max_size=8), st.lists(st.integers(0, 10**6), max_size=20))
def test_round_trip_whole_bytewise_and_random_splits(frames: list[Frame], cuts: list[int]) -> None:
    data = stream(frames)
    assert decode([data]) == frames
    assert decode(split_at(data, cuts)) == frames


@settings(max_examples=40)
@given(st.lists(frames_st, max_size=4))
def test_round_trip_byte_at_a_time(frames: list[Frame]) -> None:
    assert decode(byte_at_a_time(stream(frames))) == frames


def test_decoder_reports_each_frames_sequence() -> None:
    decoder = FrameDecoder()
    decoder.feed(stream(SAMPLES))
    seen = []
    while decoder.next_frame() is not None:
        seen.append(decoder.sequence)
    assert seen == list(range(1, len(SAMPLES) + 1))
    assert decoder.buffered == 0


def test_one_mib_write_in_random_splits() -> None:
    rng = random.Random(1234)
    payload = rng.randbytes(MIB)
    frames: list[Frame] = [Write(0, payload), Flush(), ResyncData(MIB, payload, fua=True)]
    data = stream(frames)
    for _ in range(5):
        cuts = [rng.randrange(len(data)) for _ in range(rng.randrange(1, 200))]
        assert decode(split_at(data, cuts)) == frames


@pytest.mark.parametrize(
    ("size", "cut", "kind"),
    [
        (DIRECT_MIN, 500, bytearray),  # big and in pieces: a buffer of its own
        (DIRECT_MIN, 28, bytearray),  # cut right after the offset
        (DIRECT_MIN, 27, bytes),  # the offset is not here yet: wait in the buffer
        (DIRECT_MIN - 1, 100, bytes),  # small: gathered in the buffer
        (DIRECT_MIN, 10**9, bytes),  # arrived whole
    ],
)
def test_where_a_payload_is_gathered(size: int, cut: int, kind: type) -> None:
    payload = random.Random(size).randbytes(size)
    data = stream([Write(0, payload)])
    (frame,) = decode([data[:cut], data[cut:]])
    assert isinstance(frame, Write)
    assert type(frame.data) is kind
    assert frame.data == payload


def test_payload_window_receives_without_a_copy() -> None:
    payload = bytes(range(256)) * 1024
    data = stream([Ping(1), ResyncData(512, payload, fua=True), Flush()])
    head_end = len(stream([Ping(1)])) + 28  # Ping frame, then RESYNC_DATA header + offset
    decoder = FrameDecoder()
    assert decoder.payload_window() is None
    decoder.feed(data[: head_end + 100])
    assert decoder.next_frame() == Ping(1)
    assert decoder.next_frame() is None
    window = decoder.payload_window()
    assert window is not None and len(window) == len(payload) - 100
    window[:1000] = payload[100:1100]  # as recv_into would, in two reads
    decoder.payload_received(1000)
    window = decoder.payload_window()
    assert window is not None
    window[:] = payload[1100:]
    decoder.payload_received(len(window))
    assert decoder.payload_window() is None
    assert decoder.next_frame() is None  # the checksum has not arrived yet
    decoder.feed(data[head_end + len(payload) :])
    frame = decoder.next_frame()
    assert frame == ResyncData(512, payload, fua=True)
    assert isinstance(frame, ResyncData)
    assert window.obj is frame.data  # the very buffer the "kernel" wrote into
    assert decoder.next_frame() == Flush()
    assert decoder.sequence == 3
    decoder.eof()


def test_payload_received_outside_the_window_is_refused() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ValueError):
        decoder.payload_received(1)
    decoder.feed(stream([Write(0, bytes(DIRECT_MIN))])[:40])
    assert decoder.next_frame() is None
    window = decoder.payload_window()
    assert window is not None and len(window) == DIRECT_MIN - 12  # 12 data bytes are here
    with pytest.raises(ValueError):
        decoder.payload_received(DIRECT_MIN - 11)


def test_recycled_buffer_is_reused_for_the_next_payload() -> None:
    encoder, decoder = FrameEncoder(), FrameDecoder()
    buffers = []
    for _ in range(3):
        data = b"".join(encoder.encode(Write(0, b"r" * DIRECT_MIN)))
        decoder.feed(data[:100])
        assert decoder.next_frame() is None
        decoder.feed(data[100:])
        frame = decoder.next_frame()
        assert isinstance(frame, Write) and frame.data == b"r" * DIRECT_MIN
        buffers.append(frame.data)
        decoder.recycle(frame.data)
    assert buffers[0] is buffers[1] is buffers[2]


def test_recycle_is_bounded() -> None:
    decoder = FrameDecoder()
    for _ in range(5):
        decoder.recycle(bytearray(pw.MAX_SPARE_BYTES // 4))
    assert decoder._spare_bytes == pw.MAX_SPARE_BYTES
    decoder.recycle(b"immutable bytes are never reused")
    assert decoder._spare_bytes == pw.MAX_SPARE_BYTES


def test_decoded_payload_is_independent_of_the_buffer() -> None:
    decoder = FrameDecoder()
    decoder.feed(stream([Write(0, b"a" * 100), Write(100, b"b" * 100)]))
    first = decoder.next_frame()
    decoder.feed(b"more")  # compacts the buffer; the first payload must not move
    assert isinstance(first, Write)
    assert first.data == b"a" * 100


# --- the encoder --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Write, ResyncData])
@pytest.mark.parametrize("payload", [b"x" * 4096, bytearray(4096), memoryview(b"y" * 512)])
def test_encoder_does_not_copy_payloads(
    kind: type[Write | ResyncData], payload: bytes | bytearray | memoryview
) -> None:
    parts = FrameEncoder().encode(kind(0, payload))
    assert len(parts) == 3
    assert parts[1] is payload


def test_encoder_numbers_frames_from_one() -> None:
    encoder = FrameEncoder()
    assert encoder.sequence == 0
    for expected in (1, 2, 3):
        data = b"".join(encoder.encode(Ping(expected)))
        assert struct.unpack_from(">Q", data, 12) == (expected,)
        assert encoder.sequence == expected


def test_write_layout_matches_the_spec() -> None:
    body = struct.pack(">Q", 4096) + b"\x5a" * 4096
    assert stream([Write(4096, b"\x5a" * 4096, fua=True)]) == raw_frame(4, body, flags=1)


@pytest.mark.parametrize(
    ("frame", "kind", "flags", "body"),
    [
        (SAMPLES[0], 1, 0, hello_body()),
        (Refuse(RefuseReason.BUSY, "try later"), 3, 0, b"\x00\x07try later"),
        (Zero(1, 2, may_trim=True), 6, 2, struct.pack(">QQ", 1, 2)),
        (Trim(1, 2), 7, 0, struct.pack(">QQ", 1, 2)),
        (Flush(), 8, 0, b""),
        (Ack(7, 5, durable=True), 9, 1, struct.pack(">QI", 7, 5)),
        (Ping(9), 10, 0, struct.pack(">Q", 9)),
        (Pong(9), 11, 0, struct.pack(">Q", 9)),
        (Goodbye(GoodbyeReason.PAUSED, ""), 12, 0, b"\x00\x02"),
        (State(DataState.INCONSISTENT, 5, 4), 13, 0, struct.pack(">BQQ", 2, 5, 4)),
        (Job('{"name":"web"}'), 14, 0, b'{"name":"web"}'),
        (Handover('{"job":{}}'), 19, 0, b'{"job":{}}'),
        (
            WriteCompressed(5, Codec.ZLIB, 4096, b"zz", fua=True),
            15,
            1,
            struct.pack(">QBI", 5, 1, 4096) + b"zz",
        ),
        (ResyncCompressed(6, Codec.LZ4, 512, b"q"), 16, 0, struct.pack(">QBI", 6, 3, 512) + b"q"),
    ],
    ids=lambda v: v.TYPE.name if hasattr(v, "TYPE") else "",
)
def test_layouts_match_the_spec(frame: Frame, kind: int, flags: int, body: bytes) -> None:
    assert stream([frame]) == raw_frame(kind, body, flags=flags)


def test_hello_ok_layout_matches_the_spec() -> None:
    assert stream([SAMPLES[1]]) == raw_frame(2, hello_ok_body(state=3))


def test_encoder_refuses_oversized_payload_and_names() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        FrameEncoder().encode(Write(0, memoryview(bytearray(32 * MIB + 1))))
    with pytest.raises(ValueError, match="node name"):
        FrameEncoder().encode(dataclasses.replace(HELLO, node="n" * 4097))


def test_long_message_is_cut_at_a_character_boundary() -> None:
    (frame,) = decode([stream([Refuse(RefuseReason.OTHER, "é" * 3000)])])
    assert isinstance(frame, Refuse)
    assert frame.message == "é" * 2048  # 4096 UTF-8 bytes


def test_write_repr_does_not_print_the_payload() -> None:
    assert repr(Write(5, b"x" * MIB)) == f"Write(offset=5, data=<{MIB} bytes>, fua=False)"


# --- corruption ---------------------------------------------------------------------------


@settings(max_examples=500)
@given(
    st.lists(frames_st, min_size=1, max_size=4),
    st.integers(0, 2**32),
    st.integers(0, 7),
    st.lists(st.integers(0, 10**6), max_size=6),
)
def test_any_flipped_bit_is_a_protocol_error(
    frames: list[Frame], where: int, bit: int, cuts: list[int]
) -> None:
    data = bytearray(stream(frames))
    sizes = [len(stream([f])) for f in frames]  # a frame's size does not depend on its number
    index = where % len(data)
    data[index] ^= 1 << bit
    hit = next(i for i in range(len(frames)) if index < sum(sizes[: i + 1]))
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    with pytest.raises(ProtocolError) as info:
        for chunk in split_at(bytes(data), cuts):
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                decoded.append(frame)
        decoder.eof()  # a length made larger waits for bytes that never come
    assert NAMED.match(str(info.value)), info.value
    assert decoded == frames[:hit]  # every frame before the damaged one arrived intact


def test_flipped_payload_bit_is_a_checksum_error() -> None:
    data = bytearray(stream([Write(0, bytes(MIB))]))
    data[len(data) // 2] ^= 0x10
    assert re.match(
        r"WRITE frame 1: checksum 0x[0-9a-f]{16} does not match", decode_error(bytes(data))
    )


def test_flipped_payload_bit_of_a_split_frame_is_a_checksum_error() -> None:
    data = bytearray(stream([Ping(1), ResyncData(0, bytes(MIB))]))
    data[-100] ^= 0x01
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match=r"^RESYNC_DATA frame 2: checksum 0x"):
        for chunk in split_at(bytes(data), range(0, len(data), 65536)):
            decoder.feed(chunk)
            while decoder.next_frame() is not None:
                pass
    assert decoder.buffered == 0
    assert decoder.payload_window() is None


def test_sequence_gap_in_a_split_frame() -> None:
    data = raw_frame(4, struct.pack(">Q", 0) + b"d" * 300, seq=2)
    decoder = FrameDecoder()
    decoder.feed(data[:50])
    assert decoder.next_frame() is None
    decoder.feed(data[50:])
    with pytest.raises(ProtocolError, match=r"^WRITE frame 2: sequence 2 where 1 was due"):
        decoder.next_frame()


def test_flipped_checksum_bit_is_a_checksum_error() -> None:
    data = bytearray(stream([Flush()]))
    data[-1] ^= 1
    assert decode_error(bytes(data)).startswith("FLUSH frame 1: checksum")


def test_bad_magic() -> None:
    message = decode_error(raw_frame(8, b"", magic=0xDEADBEEF))
    assert message == "frame 1: bad magic 0xdeadbeef, not 0x564b5031 (VKP1)"


def test_garbage_is_refused_after_four_bytes() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"GET ")
    with pytest.raises(ProtocolError, match="frame 1: bad magic 0x47455420"):
        decoder.next_frame()


@pytest.mark.parametrize("kind", [0, 22, 0xFFFF])
def test_unknown_frame_type(kind: int) -> None:
    good = stream([Ping(1)])
    assert decode_error(good + raw_frame(kind, b"", seq=2)) == f"frame 2: unknown frame type {kind}"


@pytest.mark.parametrize("length", [MAX_BODY + 1, U32])
def test_oversize_length_is_refused_from_the_header_alone(length: int) -> None:
    header = struct.pack(">IHHIQ", MAGIC, 4, 0, length, 1)
    decoder = FrameDecoder()
    decoder.feed(header)
    with pytest.raises(ProtocolError, match=f"WRITE frame 1: body length {length} exceeds"):
        decoder.next_frame()
    assert decoder.buffered == 0
    decoder.feed(b"\0" * 65536)  # the rest of the "body": dropped, never buffered
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_frame()


def test_largest_write_is_waited_for_not_refused() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IHHIQQ", MAGIC, 4, 0, 8 + 32 * MIB, 1, 0))
    assert decoder.next_frame() is None  # 32 MiB of data: legal, so wait for it
    too_big = FrameDecoder()  # one byte more: within MAX_BODY, but over WRITE's own limit
    too_big.feed(struct.pack(">IHHIQ", MAGIC, 4, 0, 8 + 32 * MIB + 1, 1))
    with pytest.raises(ProtocolError, match="WRITE frame 1: body of 33554441 bytes is longer"):
        too_big.next_frame()
    assert too_big.buffered == 0


@pytest.mark.parametrize(
    ("sequences", "message"),
    [
        ([1, 3], "PING frame 3: sequence 3 where 2 was due (frames missing)"),
        ([1, 1], "PING frame 1: sequence 1 where 2 was due (a repeat or reorder)"),
        ([1, 2, 4, 3], "PING frame 4: sequence 4 where 3 was due (frames missing)"),
        ([2, 1], "PING frame 2: sequence 2 where 1 was due (frames missing)"),
        ([0], "PING frame 0: sequence 0 where 1 was due (a repeat or reorder)"),
    ],
)
def test_sequence_gap_repeat_or_reorder(sequences: list[int], message: str) -> None:
    data = b"".join(raw_frame(10, struct.pack(">Q", 0), seq=s) for s in sequences)
    assert decode_error(data) == message


def test_consecutive_sequences_decode() -> None:
    data = b"".join(raw_frame(10, struct.pack(">Q", s), seq=s) for s in range(1, 6))
    assert decode([data]) == [Ping(s) for s in range(1, 6)]


def _valid_body(frame: Frame) -> tuple[int, int, bytes]:
    data = stream([frame])
    _, kind, flags, length, _ = struct.unpack_from(">IHHIQ", data)
    return kind, flags, data[20 : 20 + length]


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: f.TYPE.name)
def test_truncated_bodies_are_refused(frame: Frame) -> None:
    kind, flags, body = _valid_body(frame)
    fixed = {
        1: 53,
        2: 35,
        3: 2,
        4: 8,
        5: 8,
        6: 16,
        7: 16,
        8: 0,
        9: 12,
        10: 8,
        11: 8,
        12: 2,
        13: 17,
        14: 0,  # the whole body is the JSON text: a cut one is caught by the JSON parser
        15: 13,
        16: 13,
        17: 16,
        18: 8,
        19: 0,  # JSON too, as JOB
        20: 4,
        21: 0,
    }[kind]
    # Strings make every proper prefix of a HELLO / HELLO_OK invalid; elsewhere the tail
    # after the fixed part is data or a message, so only a cut into the fixed part is.
    cuts = range(len(body)) if kind in (1, 2) else range(fixed)
    for cut in cuts:
        message = decode_error(raw_frame(kind, body[:cut], flags=flags))
        assert message.startswith(f"{frame.TYPE.name} frame 1: "), message
        if cut < fixed:
            assert message.endswith(f"body of {cut} bytes is shorter than its {fixed}-byte header")


def test_short_write_message() -> None:
    message = decode_error(raw_frame(4, b"\0" * 5, seq=1))
    assert message == "WRITE frame 1: body of 5 bytes is shorter than its 8-byte header"


@pytest.mark.parametrize("frame", SAMPLES[5:11], ids=lambda f: f.TYPE.name)
def test_long_fixed_bodies_are_refused(frame: Frame) -> None:
    kind, flags, body = _valid_body(frame)
    message = decode_error(raw_frame(kind, body + b"\0", flags=flags))
    assert message.startswith(f"{frame.TYPE.name} frame 1: body of {len(body) + 1} bytes is longer")


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (1, hello_body() + b"!", "HELLO frame 1: 1 stray bytes after the source volume name"),
        (2, hello_ok_body() + b"!!", "HELLO_OK frame 1: 2 stray bytes after the volume name"),
        (
            1,
            hello_body()[:-7] + b"\xff\xff",
            "HELLO frame 1: source volume name of 65535 bytes is longer",
        ),
        (1, hello_body(node=b"n" * 5000), "HELLO frame 1: node name of 5000 bytes is longer"),
        (2, hello_ok_body()[:-7], "HELLO_OK frame 1: body ends before the length of the volume"),
    ],
)
def test_string_framing_errors(kind: int, body: bytes, message: str) -> None:
    assert decode_error(raw_frame(kind, body)).startswith(message)


BAD_UTF8 = b"ab\xff\xfe"


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (1, hello_body(node=BAD_UTF8), "HELLO frame 1: node name is not valid UTF-8"),
        (1, hello_body(volume=BAD_UTF8), "HELLO frame 1: volume name is not valid UTF-8"),
        (1, hello_body(job=b"\xc3"), "HELLO frame 1: job name is not valid UTF-8"),
        (2, hello_ok_body(node=BAD_UTF8), "HELLO_OK frame 1: node name is not valid UTF-8"),
        (2, hello_ok_body(volume=b"\xed\xa0\x80"), "HELLO_OK frame 1: volume name is not valid"),
        (3, b"\x00\x01" + BAD_UTF8, "REFUSE frame 1: message is not valid UTF-8"),
        (12, b"\x00\x01" + BAD_UTF8, "GOODBYE frame 1: message is not valid UTF-8"),
        (14, BAD_UTF8, "JOB frame 1: job document is not valid UTF-8"),
    ],
)
def test_bad_utf8(kind: int, body: bytes, message: str) -> None:
    assert decode_error(raw_frame(kind, body)).startswith(message)


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (1, hello_body(role=3), "HELLO frame 1: unknown role 3"),
        (1, hello_body(role=255), "HELLO frame 1: unknown role 255"),
        (2, hello_ok_body(state=4), "HELLO_OK frame 1: unknown data state 4"),
        (3, b"\x00\x00", "REFUSE frame 1: unknown refusal reason 0"),
        (3, b"\x00\x0boops", "REFUSE frame 1: unknown refusal reason 11"),
        (12, b"\xff\xff", "GOODBYE frame 1: unknown goodbye reason 65535"),
        (13, struct.pack(">BQQ", 9, 1, 0), "STATE frame 1: unknown data state 9"),
        (15, struct.pack(">QBI", 0, 9, 10) + b"x", "WRITE_Z frame 1: unknown codec 9"),
    ],
)
def test_unknown_enum_values(kind: int, body: bytes, message: str) -> None:
    assert decode_error(raw_frame(kind, body)) == message


@pytest.mark.parametrize(
    ("kind", "flags", "body", "message"),
    [
        (1, 2, hello_body(), "HELLO frame 1: unknown flags 0x0002"),
        (2, 2, hello_ok_body(), "HELLO_OK frame 1: unknown flags 0x0002"),
        (4, 2, b"\0" * 8, "WRITE frame 1: unknown flags 0x0002"),
        (5, 0x8001, b"\0" * 8, "RESYNC_DATA frame 1: unknown flags 0x8000"),
        (6, 4, b"\0" * 16, "ZERO frame 1: unknown flags 0x0004"),
        (7, 2, b"\0" * 16, "TRIM frame 1: unknown flags 0x0002"),
        (8, 1, b"", "FLUSH frame 1: unknown flags 0x0001"),
        (9, 2, b"\0" * 12, "ACK frame 1: unknown flags 0x0002"),
    ],
)
def test_unknown_flags(kind: int, flags: int, body: bytes, message: str) -> None:
    assert decode_error(raw_frame(kind, body, flags=flags)) == message


def test_min_version_above_max_version() -> None:
    body = bytearray(hello_body())
    body[0:4] = struct.pack(">HH", 3, 2)
    assert decode_error(raw_frame(1, bytes(body))) == (
        "HELLO frame 1: min_version 3 is above max_version 2"
    )


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(10, b"\0" * 8, seq=2))
    with pytest.raises(ProtocolError, match="sequence 2"):
        decoder.next_frame()
    decoder.feed(raw_frame(10, b"\0" * 8, seq=1))  # a good frame cannot revive it
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="sequence 2"):
        decoder.next_frame()
    with pytest.raises(ProtocolError, match="sequence 2"):
        decoder.eof()


BIG = DIRECT_MIN + 96  # data of a WRITE that does not arrive whole gets a buffer of its own
BIG_FRAME = 20 + 8 + BIG + 8


@pytest.mark.parametrize(
    ("size", "keep", "message"),
    [
        (96, 10, "frame 1: connection closed after 10 of the 20 header bytes"),
        (96, 30, "WRITE frame 1: connection closed after 30 of its 132 bytes"),
        (96, 131, "WRITE frame 1: connection closed after 131 of its 132 bytes"),
        (BIG, 30, f"WRITE frame 1: connection closed after 30 of its {BIG_FRAME} bytes"),
        (BIG, 4000, f"WRITE frame 1: connection closed after 4000 of its {BIG_FRAME} bytes"),
        (BIG, BIG_FRAME - 1, f"WRITE frame 1: connection closed after {BIG_FRAME - 1} of its"),
    ],
)
def test_truncated_stream_at_eof(size: int, keep: int, message: str) -> None:
    data = stream([Write(0, b"z" * size)])
    assert decode_error(data[:keep]).startswith(message)
    cut = min(29, keep)  # in two pieces: a big WRITE's data goes to a buffer of its own
    with pytest.raises(ProtocolError) as info:
        decode([data[:cut], data[cut:keep]])
    assert str(info.value).startswith(message)


@settings(max_examples=25)
@given(
    st.integers(DIRECT_MIN - 50, DIRECT_MIN + 3000),
    st.lists(st.integers(0, 10**6), max_size=12),
)
def test_big_payloads_round_trip_in_random_splits(size: int, cuts: list[int]) -> None:
    frames: list[Frame] = [
        Write(size, random.Random(size).randbytes(size), fua=True),
        Ping(5),
        ResyncData(0, bytes(size)),
    ]
    assert decode(split_at(stream(frames), cuts)) == frames


@pytest.mark.parametrize("index", [0, 5, 9, 13, 19, 20, 27, 28, 5000, BIG_FRAME - 9, BIG_FRAME - 1])
def test_flipped_bit_in_a_big_split_frame(index: int) -> None:
    data = bytearray(stream([Write(0, random.Random(7).randbytes(BIG))]))
    data[index] ^= 0x04
    with pytest.raises(ProtocolError) as info:
        decode([bytes(data[:30]), bytes(data[30:3000]), bytes(data[3000:])])
    assert NAMED.match(str(info.value)), info.value


def test_clean_eof_between_frames() -> None:
    assert decode([stream([Flush()])]) == [Flush()]
    decode([])  # nothing at all is fine too


# --- version negotiation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        ((1, 1, 1, 1), 1),
        ((1, 3, 2, 5), 3),
        ((2, 5, 1, 3), 3),
        ((1, 2, 3, 4), None),
        ((4, 4, 1, 3), None),
    ],
)
def test_choose_version(ranges: tuple[int, int, int, int], expected: int | None) -> None:
    assert choose_version(*ranges) == expected


@given(
    st.tuples(st.integers(0, 9), st.integers(0, 9)), st.tuples(st.integers(0, 9), st.integers(0, 9))
)
def test_choose_version_is_the_highest_common_version(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    common = set(range(a[0], a[1] + 1)) & set(range(b[0], b[1] + 1))
    assert choose_version(*a, *b) == (max(common) if common else None)


def test_protocol_version_constant() -> None:
    assert pw.PROTOCOL_VERSION == 1
    assert Hello(
        node="a", volume="b", job="c", source_volume="d", volume_size=0, sector_size=512,
        current_generation=0, previous_generation=0,
    ).max_version == 1  # fmt: skip


def test_job_document_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Job("x" * (pw.MAX_JOB_DOCUMENT + 1)).encode(1)
    big = raw_frame(14, b"x" * (pw.MAX_JOB_DOCUMENT + 1))
    assert "longer than" in decode_error(big)


def test_hello_carries_the_jobs_epoch_and_what_the_sender_marks() -> None:
    hello = dataclasses.replace(HELLO, epoch=7, marked_bytes=1 << 40, keep=True)
    assert decode([stream([hello])]) == [hello]


def test_hello_ok_says_whether_marked_regions_follow() -> None:
    owed = dataclasses.replace(SAMPLES[1], owed=True)
    assert decode([stream([owed])]) == [owed]
    assert struct.unpack_from(">IHH", stream([owed]))[2] == pw.OWED


def test_handover_document_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Handover("x" * (pw.MAX_HANDOVER + 1)).encode(1)
    assert "not valid UTF-8" in decode_error(raw_frame(19, b"\xff\xfe"))


def test_compressed_frames_refuse_a_raw_length_over_the_payload_limit() -> None:
    body = struct.pack(">QBI", 0, 1, pw.MAX_PAYLOAD + 1) + b"x"
    assert decode_error(raw_frame(15, body)) == (
        f"WRITE_Z frame 1: raw length {pw.MAX_PAYLOAD + 1} exceeds {pw.MAX_PAYLOAD}"
    )
    with pytest.raises(ValueError, match="exceeds"):
        WriteCompressed(0, Codec.ZLIB, pw.MAX_PAYLOAD + 1, b"x").encode(1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (struct.pack(">QII", 0, 4096, 1000), "region size 1000 is not a power of two >= 512"),
        (struct.pack(">QII", 0, 4096, 256), "region size 256 is not a power of two >= 512"),
        (struct.pack(">QII", 0, 0, 4096), "range 0+0 is not whole regions"),
        (struct.pack(">QII", 512, 4096, 4096), "range 512+4096 is not whole regions"),
        (struct.pack(">QII", 0, pw.MAX_HASH_SPAN + 4096, 4096), "is not whole regions of at most"),
    ],
)
def test_bad_hash_requests(body: bytes, message: str) -> None:
    assert message in decode_error(raw_frame(17, body))


def test_hashes_must_be_whole_digests() -> None:
    message = decode_error(raw_frame(18, struct.pack(">Q", 3) + bytes(17)))
    assert message == "HASHES frame 1: 17 digest bytes are not a whole number of digests"
    frame = decode([raw_frame(18, struct.pack(">Q", 3) + bytes(range(32)))])[0]
    assert isinstance(frame, Hashes) and list(frame) == [bytes(range(16)), bytes(range(16, 32))]
