"""Transmission phase of NBD: an incremental request parser, request validation, replies.

How this works: the adapter passes every chunk it reads to ``RequestParser.feed()`` and then
drains ``next_request()`` until it returns None.  Each ``Request`` arrives already validated
against the export: ``error`` is ``Errno.OK`` for a request to execute, or the error to answer
with.  A WRITE's payload is collected before the request is released; the payload of a WRITE
that failed validation is skipped as it arrives (never buffered), so a client cannot make the
server hold an oversized write in memory.  A request header with a bad magic cannot be
resynchronised, so ``next_request()`` raises ``ProtocolError`` and the adapter drops that client.

Validation follows the order nbdkit uses (server/protocol.c), so both servers give the same
answer to the same malformed request.  NBD_CMD_DISC is never answered, whatever its fields.

    check                                        error
    write, trim or zero on a read-only export    EPERM
    unknown command                              EINVAL
    read/write/trim/zero/cache beyond the end    ENOSPC for write and zero, EINVAL otherwise
    flush with offset or length                  EINVAL
    unknown flag, or a flag on a command it does not apply to   EINVAL
    read or write longer than max_block_size     EINVAL (the spec keeps EOVERFLOW for DF reads)

Replies are simple replies: ``simple_reply(cookie, error)``; a successful READ's data follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from volkeeper.core import nbd_wire as w
from volkeeper.core.nbd_handshake import ExportInfo
from volkeeper.errors import ProtocolError

Cmd = w.Command
# Plain ints, not IntFlag: ``~`` and ``&`` on IntFlag stay inside the enum (``~`` of the known
# flags would never show an unknown bit) and cost microseconds per request on the hot path.
FUA = int(w.CommandFlag.FUA)
NO_HOLE = int(w.CommandFlag.NO_HOLE)
_RANGED = frozenset(int(c) for c in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE))
MUTATING = frozenset(int(c) for c in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
_SUPPORTED = _RANGED | {int(Cmd.FLUSH), int(Cmd.DISC)}
_PAYLOAD_CAPPED = frozenset({int(Cmd.READ), int(Cmd.WRITE)})
_ENOSPC_BEYOND_END = frozenset({int(Cmd.WRITE), int(Cmd.WRITE_ZEROES)})
_FLUSH = int(Cmd.FLUSH)
_DISC = int(Cmd.DISC)
# Flags each command accepts.  FUA is accepted everywhere, as nbdkit does; NO_HOLE only on
# WRITE_ZEROES.  DF, REQ_ONE and FAST_ZERO need structured replies, block status or fast-zero
# support, none of which volkeeper negotiates, so they are never valid here.
_ALLOWED_FLAGS = {int(Cmd.WRITE_ZEROES): FUA | NO_HOLE}
# A write payload this large is skipped to answer its error; anything larger is hostile.
MAX_SKIPPED_PAYLOAD = 2 * w.MAX_BLOCK_SIZE
MAX_SPARE_PAYLOADS = 8  # per size: enough for a queue depth of 8 large writes


@dataclass(slots=True)
class Request:
    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes | bytearray = b""
    error: w.Errno = w.Errno.OK

    @property
    def fua(self) -> bool:
        return bool(self.flags & FUA)


def validate(command: int, flags: int, offset: int, length: int, export: ExportInfo) -> w.Errno:
    """The error a request must be answered with, or Errno.OK if it may run."""
    if command == _DISC:  # never answered, whatever its fields: the client is leaving
        return w.Errno.OK
    if export.read_only and command in MUTATING:
        return w.Errno.EPERM
    if command not in _SUPPORTED:
        return w.Errno.EINVAL
    if command in _RANGED and offset + length > export.size:
        return w.Errno.ENOSPC if command in _ENOSPC_BEYOND_END else w.Errno.EINVAL
    if command == _FLUSH and (offset or length):
        return w.Errno.EINVAL
    if flags & ~_ALLOWED_FLAGS.get(command, FUA):
        return w.Errno.EINVAL
    if length > export.max_block_size and command in _PAYLOAD_CAPPED:
        return w.Errno.EINVAL
    return w.Errno.OK


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, cookie)


class RequestParser:
    """Turns the client's byte stream into validated ``Request`` objects.

    A WRITE's payload is gathered in a bytearray of its own.  While one is incomplete and
    nothing else is buffered, ``payload_window()`` exposes its unfilled tail so the adapter
    can have the kernel receive straight into it (``payload_received(n)`` records that),
    which spares large writes every user-space copy.  Such payload buffers are handed back
    with ``recycle()`` once the write is done, so the next one costs no allocation (zeroing
    a fresh megabyte was the largest CPU cost of sequential writes).
    """

    def __init__(self, export: ExportInfo) -> None:
        self.export = export
        self._buffer = bytearray()
        self._pos = 0  # parsed up to here; compacted on the next feed
        self._pending: Request | None = None  # a WRITE whose payload is still arriving
        self._payload = bytearray()
        self._filled = 0
        self._skip = 0  # payload bytes of a refused WRITE still to discard
        self._spare: dict[int, list[bytearray]] = {}  # recycled payload buffers, by size

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self._skip:
            skipped = min(self._skip, len(view))
            self._skip -= skipped
            view = view[skipped:]
        if self._pending is not None:
            take = min(len(view), len(self._payload) - self._filled)
            # Through a memoryview: bytearray slice assignment would copy ``view`` twice.
            memoryview(self._payload)[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += view

    def payload_window(self) -> memoryview | None:
        """The unfilled part of the pending WRITE's payload, or None if none is pending."""
        if self._pending is None:
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_received(self, nbytes: int) -> None:
        self._filled += nbytes

    def next_request(self) -> Request | None:
        if self._skip:
            return None
        if self._pending is not None:
            return self._finish_write() if self._filled == len(self._payload) else None
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < w.REQUEST.size:
            return None
        magic, flags, command, cookie, offset, length = w.REQUEST.unpack_from(buffer, pos)
        if magic != w.REQUEST_MAGIC:
            raise ProtocolError(f"request has bad magic 0x{magic:08x}")
        self._pos = pos + w.REQUEST.size
        error = validate(command, flags, offset, length, self.export)
        request = Request(command, flags, cookie, offset, length, error=error)
        if command != Cmd.WRITE:
            return request
        if error:
            return self._refuse_write(request)
        return self._start_write(request)

    def _start_write(self, request: Request) -> Request | None:
        take = min(request.length, len(self._buffer) - self._pos)
        if take == request.length:  # all here: one copy, no pending state
            with memoryview(self._buffer) as view:
                request.payload = bytes(view[self._pos : self._pos + take])
            self._pos += take
            return request
        spare = self._spare.get(request.length)
        self._payload = spare.pop() if spare else bytearray(request.length)
        with memoryview(self._buffer) as view:
            memoryview(self._payload)[:take] = view[self._pos : self._pos + take]
        self._pos += take
        self._filled = take
        self._pending = request
        return None

    def recycle(self, payload: bytes | bytearray) -> None:
        """Take back a finished WRITE's payload buffer; nothing may use it afterwards."""
        if isinstance(payload, bytearray):
            spare = self._spare.setdefault(len(payload), [])
            if len(spare) < MAX_SPARE_PAYLOADS:
                spare.append(payload)

    def _finish_write(self) -> Request:
        request, self._pending = self._pending, None
        assert request is not None
        request.payload, self._payload = self._payload, bytearray()
        return request

    def _refuse_write(self, request: Request) -> Request:
        if request.length > MAX_SKIPPED_PAYLOAD:
            raise ProtocolError(f"refused write carries {request.length} bytes, too many to skip")
        skipped = min(request.length, len(self._buffer) - self._pos)
        self._pos += skipped
        self._skip = request.length - skipped
        return request
