"""An op's three countdowns: the reply, the flush's durability, the payload's owners."""

from __future__ import annotations

from volkeeper.core.peer import wire as pw
from volkeeper.daemon.source.op import Op, frame_of


def test_the_reply_leaves_once_every_side_is_done_and_carries_the_first_error() -> None:
    replies: list[BaseException | None] = []
    op = Op("write", 0, 4096, b"x" * 4096, on_done=replies.append, parts=3)
    op.part_done()
    first, second = OSError("disk"), OSError("target")
    op.part_done(first)
    assert replies == []
    op.part_done(second)
    assert replies == [first]


def test_a_flush_is_released_only_when_every_side_made_it_durable() -> None:
    released: list[str] = []
    flush = Op("flush", 0, 0, durable_parts=2, on_durable=lambda: released.append("now"))
    flush.durable_done()
    assert released == []
    flush.durable_done()
    assert released == ["now"]


def test_the_payload_goes_back_once_nobody_reads_it() -> None:
    back: list[object] = []
    payload = bytearray(4096)
    op = Op("write", 0, 4096, payload, recycle=back.append, holds=2)
    op.release_payload()
    assert back == []
    op.release_payload()
    assert back == [payload]
    Op("zero", 0, 4096).release_payload()  # no recycler: nothing to give back, no error


def test_frames_carry_the_op() -> None:
    assert frame_of(Op("write", 512, 3, b"abc", fua=True)) == pw.Write(512, b"abc", True)
    zero = frame_of(Op("zero", 0, 8192, may_trim=True))
    assert zero == pw.Zero(0, 8192, fua=False, may_trim=True)
    assert frame_of(Op("trim", 4096, 4096, fua=True)) == pw.Trim(4096, 4096, fua=True)
    assert isinstance(frame_of(Op("flush", 0, 0)), pw.Flush)
