"""One NBD client's connection: negotiation, then request dispatch, over the sans-IO core.

How this works: an ``NbdConnection`` is an ``asyncio.BufferedProtocol``: bytes arrive by
callback with no per-read task, into a reused staging buffer -- or, for the bulk of a large
WRITE, straight into that write's payload buffer, so megabyte writes are never copied in user
space.  It runs ``ServerHandshake`` until an export is chosen, then feeds a
``RequestParser`` and dispatches each validated request to the export's ``VolumeService``:

* a request that completes without waiting on a disk (cached read, page-cache write, a flush
  when nothing else is in flight) is answered inside ``buffer_updated`` -- no task, no thread;
* anything else runs on a worker thread and is answered from its completion callback, so
  replies can overtake each other (the cookie tells the client which request is answered).

Replies are queued and leave in one ``writelines`` per batch: the requests of one read are
answered at its end, those completed on the loop while it is handled (a mirrored write's
local inline write and async shipping) included.  A completion that arrives later (a disk
read, a target's ACK) is answered at once: holding it for others of its burst saves system
calls but keeps the client waiting, which costs more on cold reads (measured:
docs/performance.md).
Back-pressure: reading from a client pauses while it has ``MAX_IN_FLIGHT`` requests on
threads, more than ``nbd_in_flight_bytes`` in them, or while the transport's send buffer is
full.  A protocol violation closes that one client; a failing volume becomes an NBD error
code; neither reaches the other connections.

Access (io/nbd_access.py): a TCP client outside ``nbd_allow`` or over the connection limits is
closed before the greeting; each client negotiates against the catalog as it may see it
(volumes read-only for it) within the handshake timeout; with ``nbd_tls`` the handshake
offers or requires STARTTLS, after which ``loop.start_tls`` wraps the same connection and
everything else goes on unchanged, over TLS.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import structlog

from volkeeper.core import nbd_wire as w
from volkeeper.core.nbd_handshake import ExportInfo, HandshakeState, ServerHandshake
from volkeeper.core.nbd_transmission import (
    FUA,
    MUTATING,
    NO_HOLE,
    Request,
    RequestParser,
    simple_reply,
)
from volkeeper.errors import ProtocolError, VolumeError
from volkeeper.io.limits import Limits
from volkeeper.io.nbd_access import NbdAccess
from volkeeper.io.volume_service import VolumeService

log = structlog.get_logger("volkeeper.nbd")

MAX_IN_FLIGHT = 64
REPLY_BATCH_BYTES = 4 * 1024 * 1024  # read data answered inline before it goes to the transport
STAGING_BYTES = 256 * 1024  # receive buffer of a connection
DIRECT_RECEIVE_BYTES = 64 * 1024  # a WRITE payload still missing this much is received in place
Cmd = w.Command


class Server(Protocol):
    """What a connection needs of its server (io/nbd_server.py ``NbdServer``): the export
    catalog, the rules and limits, the count of requests on threads, and its registry."""

    access: NbdAccess
    limits: Limits
    in_flight: int

    def lookup(self, name: str) -> ExportInfo | None: ...
    def exports(self) -> Sequence[ExportInfo]: ...
    @property
    def shutting_down(self) -> bool: ...
    def service(self, name: str) -> VolumeService | None: ...
    def open_connections(self, host: str | None) -> tuple[int, int]: ...
    def register(self, connection: NbdConnection, alive: bool) -> None: ...


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._staging = memoryview(bytearray(STAGING_BYTES))
        self._direct = False  # the last get_buffer() handed out a WRITE payload window
        self._handshake: ServerHandshake | None = None  # made when the client is known
        self._parser: RequestParser | None = None
        self._service: VolumeService | None = None
        self._transport: asyncio.Transport | None = None
        self._in_flight = 0
        self._drained: asyncio.Future[None] | None = None
        self._out: list[bytes | bytearray] = []  # replies waiting for the next send
        self._receiving = False  # inside buffer_updated, which sends at its end
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._peer = "?"
        self._closer: asyncio.Future[None] | None = None
        self._upgrading: asyncio.Future[None] | None = None  # STARTTLS under way
        self._negotiation_timer: asyncio.TimerHandle | None = None
        self._in_flight_bytes = 0  # READ and WRITE lengths of the requests in flight
        self._queued_bytes = 0  # read data in replies not yet handed to the transport
        self.host: str | None = None  # the client's address (None: a unix socket)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        peername = self._transport.get_extra_info("peername")
        self._peer = str(peername or "unix")
        host = str(peername[0]) if isinstance(peername, tuple) and peername else None
        self.host = host
        access, limits = self._server.access, self._server.limits
        if not access.admits(host):
            log.warning("nbd client refused", peer=self._peer, why="not in nbd_allow")
            self._refuse()
            return
        total, same = self._server.open_connections(host)
        if limits.over_connections("nbd", total, same, self._peer):
            self._refuse()
            return
        self._server.register(self, True)
        self._negotiation_timer = asyncio.get_running_loop().call_later(
            limits.handshake_timeout, self._negotiation_expired
        )
        catalog = access.catalog_for(self._server, host)
        self._handshake = ServerHandshake(catalog, access.tls)
        self._transport.write(self._handshake.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.register(self, False)
        if self._negotiation_timer is not None:
            self._negotiation_timer.cancel()

    def _refuse(self) -> None:
        self._closing = True
        assert self._transport is not None
        self._transport.close()

    def _negotiation_expired(self) -> None:
        if self._handshake is not None and not self._closing:
            self._server.limits.hit("nbd_handshake_timeout", peer=self._peer)
            self._close()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport puts the next bytes: a big WRITE's payload, else staging."""
        window = self._parser.payload_window() if self._parser is not None else None
        self._direct = window is not None and len(window) >= DIRECT_RECEIVE_BYTES
        return window if self._direct and window is not None else self._staging

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        self._receiving = True
        try:
            if self._direct:
                assert self._parser is not None
                self._parser.payload_received(nbytes)
                self._dispatch_all()
            elif self._handshake is not None:
                self._negotiate(bytes(self._staging[:nbytes]))
            else:
                assert self._parser is not None
                self._parser.feed(self._staging[:nbytes])
                self._dispatch_all()
        finally:
            self._receiving = False
        self._send()

    # -- handshake --------------------------------------------------------------------------

    def _negotiate(self, data: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None and self._transport is not None
        self._transport.write(handshake.receive_data(data))
        if handshake.state is HandshakeState.CLOSED:
            log.info("nbd client closed in handshake", peer=self._peer, why=handshake.close_reason)
            self._close()
        elif handshake.state is HandshakeState.STARTTLS:
            self._upgrading = asyncio.ensure_future(self._start_tls(handshake))
        elif handshake.state is HandshakeState.TRANSMISSION:
            assert handshake.export is not None
            self._service = self._server.service(handshake.export.name)
            assert self._service is not None
            self._parser = RequestParser(handshake.export)
            self._handshake = None
            if self._negotiation_timer is not None:
                self._negotiation_timer.cancel()
            log.info("nbd client attached", peer=self._peer, export=handshake.export.name)
            self._parser.feed(handshake.leftover)
            self._dispatch_all()

    async def _start_tls(self, handshake: ServerHandshake) -> None:
        """STARTTLS was acknowledged: the rest of the connection is TLS, or it is closed."""
        context, transport = self._server.access.context, self._transport
        assert context is not None and transport is not None
        try:
            upgraded = await asyncio.get_running_loop().start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=self._server.limits.handshake_timeout,
            )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.warning("nbd TLS handshake failed", peer=self._peer, why=str(exc) or repr(exc))
            self._close()
            return
        if upgraded is None or self._closing:
            self._close()
            return
        self._transport = upgraded
        handshake.tls_started()
        log.info("nbd client on TLS", peer=self._peer, version=self._tls_version())

    def _tls_version(self) -> str:
        ssl_object = self._transport.get_extra_info("ssl_object") if self._transport else None
        return str(ssl_object.version()) if ssl_object is not None else "?"

    # -- transmission -----------------------------------------------------------------------

    def _dispatch_all(self) -> None:
        assert self._parser is not None
        while not self._closing and not self._reading_paused:
            try:
                request = self._parser.next_request()
            except ProtocolError as exc:
                log.warning("nbd protocol error, dropping client", peer=self._peer, why=str(exc))
                self._close()
                return
            if request is None:
                return
            self._dispatch(request)
            if self._queued_bytes >= REPLY_BATCH_BYTES:  # hand them over: a client that does
                self._send()  # not read its replies pauses us here, at the transport's mark

    def _dispatch(self, request: Request) -> None:
        started = time.perf_counter()
        if request.error:
            self._reply(request, request.error, started=started)
        elif request.command == Cmd.DISC:
            log.info("nbd client disconnected", peer=self._peer)
            self._closing = True
            self._closer = asyncio.ensure_future(self.drain_and_close())
        elif self._server.shutting_down:
            self._reply(request, w.Errno.ESHUTDOWN)
        elif request.command in MUTATING and self._service_locked():
            # Locked after this client attached (it became a mirror target): refuse writes.
            self._reply(request, w.Errno.EPERM, started=started)
        elif (
            self._service is not None
            and self._service.replication is not None
            and (request.command in _REPLICATED)
        ):
            self._replicate(request, started)
        else:
            try:
                if not self._try_inline(request, started):
                    self._submit(request, started)
            except VolumeError as exc:
                self._reply_error(request, exc, started)

    def _service_locked(self) -> bool:
        return self._service is not None and self._service.lock_reason is not None

    def _try_inline(self, request: Request, started: float) -> bool:
        """Answer now if the request can complete on the loop without waiting on a disk."""
        service = self._service
        assert service is not None
        command = request.command
        if command == Cmd.READ:
            data = service.try_read(request.offset, request.length)
            if data is None:
                return False
            self._reply(request, w.Errno.OK, data, started)
            return True
        if command == Cmd.WRITE and not request.flags & FUA:
            done = service.try_write(request.offset, request.payload)
            if done == request.length:
                self._reply(request, w.Errno.OK, started=started)
                return True
            if done:  # the writer thread writes the rest; length stays whole for the stats
                request.payload = request.payload[done:]
                request.offset += done
            return False
        if command == Cmd.FLUSH and self._server.in_flight == 0 and service.writer_idle:
            # Nothing else is waiting anywhere: fdatasync here beats two thread hand-offs
            # (QD1 write+flush loads).  Under concurrency flushes go to the writer thread.
            service.volume.flush()
            self._reply(request, w.Errno.OK, started=started)
            return True
        return False

    def _submit(self, request: Request, started: float) -> None:
        service = self._service
        assert service is not None
        function, args, mutating = _blocking_call(service, request)
        self._in_flight += 1
        self._in_flight_bytes += _held(request)
        self._server.in_flight += 1
        done = functools.partial(self._completed, request, started)
        service.submit(function, *args, mutating=mutating, on_done=done)
        self._update_reading()

    def _replicate(self, request: Request, started: float) -> None:
        """A mirror source's mutation: the replication path orders, ships and answers it."""
        assert self._service is not None and self._service.replication is not None
        self._in_flight += 1
        self._in_flight_bytes += _held(request)
        self._server.in_flight += 1
        self._service.replication.submit(
            _REPLICATED[request.command],
            request.offset,
            request.length,
            payload=request.payload,
            fua=request.fua,
            may_trim=not request.flags & NO_HOLE,
            on_done=lambda error: self._completed(request, started, None, error, recycle=False),
            recycle=self._recycle if request.command == Cmd.WRITE else None,
        )
        self._update_reading()

    def _recycle(self, payload: bytes | bytearray | memoryview) -> None:
        """A replicated write's payload is written and every target has it: reuse it."""
        if self._parser is not None and isinstance(payload, bytearray):
            self._parser.recycle(payload)

    def _completed(
        self,
        request: Request,
        started: float,
        result: object,
        error: BaseException | None,
        *,
        recycle: bool = True,  # False: the replication path hands the payload back itself
    ) -> None:
        self._in_flight -= 1
        self._in_flight_bytes -= _held(request)
        self._server.in_flight -= 1
        if recycle and request.command == Cmd.WRITE and self._parser is not None:
            self._parser.recycle(request.payload)
        if error is None:
            data = result if isinstance(result, bytes | bytearray) else None
            self._reply(request, w.Errno.OK, data, started)
        elif isinstance(error, VolumeError):
            self._reply_error(request, error, started)
        else:
            log.error("nbd request crashed", peer=self._peer, error=repr(error))
            self._close()
        if not self._receiving:
            self._send()
        if self._in_flight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._update_reading()

    def _reply_error(self, request: Request, exc: VolumeError, started: float) -> None:
        code = w.wire_errno(exc.errno)
        log.warning("nbd request failed", peer=self._peer, error=str(exc), nbd_errno=code.name)
        self._reply(request, code, started=started)

    def _reply(
        self,
        request: Request,
        error: int,
        data: bytes | bytearray | None = None,
        started: float | None = None,
    ) -> None:
        """Queue a reply; ``_send`` writes everything queued in one call."""
        op = w.COMMAND_NAMES.get(request.command)
        if started is not None and op is not None and self._service is not None:
            nbytes = request.length if op in ("read", "write") and not error else 0
            self._service.stats.record(op, nbytes, time.perf_counter() - started, failed=error != 0)
        self._out.append(simple_reply(request.cookie, error))
        if data is not None and not error:
            self._out.append(data)
            self._queued_bytes += len(data)

    def _send(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, []
        self._queued_bytes = 0
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)

    def _update_reading(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        over = self._in_flight_bytes >= self._server.limits.nbd_in_flight_bytes
        if over and not self._reading_paused:
            self._server.limits.hit("nbd_in_flight_bytes", peer=self._peer)
        should_pause = self._writing_paused or self._in_flight >= MAX_IN_FLIGHT or over
        if should_pause and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not should_pause and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            if self._parser is not None:
                self._dispatch_all()
                self._send()

    @property
    def export(self) -> str | None:
        return self._service.name if self._service is not None else None

    async def stop_and_close(self) -> None:
        """Start nothing more, finish what is in flight, close."""
        self._closing = True
        log.info("nbd client detached", peer=self._peer, export=self.export)
        await self.drain_and_close()

    async def drain_and_close(self) -> None:
        """Let in-flight requests finish and send their replies, then close."""
        if self._in_flight:
            if self._drained is None or self._drained.done():  # one future for every waiter
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)
        self._send()
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def _held(request: Request) -> int:
    """Bytes a request in flight holds: its payload (WRITE) or its reply's data (READ)."""
    return request.length if request.command in (Cmd.READ, Cmd.WRITE) else 0


_REPLICATED: dict[int, str] = {
    Cmd.WRITE: "write",
    Cmd.WRITE_ZEROES: "zero",
    Cmd.TRIM: "trim",
    Cmd.FLUSH: "flush",
}


def _blocking_call(
    service: VolumeService, request: Request
) -> tuple[Callable[..., object], tuple[object, ...], bool]:
    """(function, args, mutating) that carries out a request on a worker thread."""
    command, offset, length, fua = request.command, request.offset, request.length, request.fua
    if command == Cmd.READ:
        return service.volume.read, (offset, length), False
    if command == Cmd.WRITE:
        return service.write, (offset, request.payload, fua), True
    if command == Cmd.FLUSH:
        return service.volume.flush, (), True
    if command == Cmd.TRIM:
        return service.trim, (offset, length, fua), True
    if command == Cmd.WRITE_ZEROES:
        may_trim = not request.flags & NO_HOLE
        return service.write_zeroes, (offset, length, may_trim, fua), True
    return service.volume.cache, (offset, length), False
