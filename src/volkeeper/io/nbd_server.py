"""asyncio adapter around the sans-IO NBD core: listeners, connections, request dispatch.

How this works: ``NbdServer`` listens on unix sockets and TCP ports; each accepted socket gets
an ``NbdConnection`` (an ``asyncio.Protocol``, so bytes arrive by callback with no per-read
task).  The connection runs ``ServerHandshake`` until an export is chosen, then feeds a
``RequestParser`` and dispatches each validated request to the export's ``VolumeService``:

* a request that completes without blocking (cached read, page-cache write) is answered
  inside ``data_received`` -- no task, no thread;
* anything else becomes a task; its reply goes out whenever it finishes, so replies can
  overtake each other (the cookie tells the client which request is answered).

Back-pressure: reading from a client pauses while it has ``MAX_IN_FLIGHT`` requests running or
while the transport's send buffer is full.  A protocol violation closes that one client; a
failing volume becomes an NBD error code; neither ever reaches the other connections.

Shutdown (``close``): listeners stop, handshakes in progress get ERR_SHUTDOWN, new requests
get ESHUTDOWN, in-flight requests finish, then every connection is closed.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import structlog

from volkeeper.core import nbd_wire as w
from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.core.nbd_handshake import ExportInfo, HandshakeState, ServerHandshake
from volkeeper.core.nbd_transmission import Request, RequestParser, simple_reply
from volkeeper.errors import ProtocolError, VolumeError
from volkeeper.io.listeners import bind_listener, remove_listener
from volkeeper.io.volume_service import VolumeService

log = structlog.get_logger("volkeeper.nbd")

MAX_IN_FLIGHT = 64
Cmd = w.Command

_OP_NAMES: dict[int, str] = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.WRITE_ZEROES: "zero",
    Cmd.CACHE: "cache",
}
_WIRE_ERRNO = {
    errno.EPERM: w.Errno.EPERM,
    errno.EROFS: w.Errno.EPERM,
    errno.EIO: w.Errno.EIO,
    errno.ENOMEM: w.Errno.ENOMEM,
    errno.ENOSPC: w.Errno.ENOSPC,
    errno.EDQUOT: w.Errno.ENOSPC,
    errno.EFBIG: w.Errno.ENOSPC,
    errno.ESHUTDOWN: w.Errno.ESHUTDOWN,
}


def wire_errno(code: int) -> w.Errno:
    """Map an OS errno onto the few codes NBD defines; EINVAL for everything else."""
    return _WIRE_ERRNO.get(code, w.Errno.EINVAL)


class NbdServer:
    """Every NBD listener of a node, and the catalog of exports they offer."""

    def __init__(self, services: Callable[[], Sequence[VolumeService]]) -> None:
        self._services = services
        self._servers: list[asyncio.Server] = []
        self._listeners: list[tuple[UnixAddress | TcpAddress, socket.socket]] = []
        self._connections: set[NbdConnection] = set()
        self._shutting_down = False

    # -- ExportCatalog ----------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def exports(self) -> Sequence[ExportInfo]:
        return [service.export_info() for service in self._services()]

    def lookup(self, name: str) -> ExportInfo | None:
        service = self.service(name)
        return service.export_info() if service else None

    def service(self, name: str) -> VolumeService | None:
        return next((s for s in self._services() if s.name == name), None)

    # -- lifecycle --------------------------------------------------------------------------

    async def listen(self, address: UnixAddress | TcpAddress) -> None:
        loop = asyncio.get_running_loop()
        sock = bind_listener(address, "NBD")
        self._listeners.append((address, sock))
        if isinstance(address, UnixAddress):
            server = await loop.create_unix_server(self._new_connection, sock=sock)
        else:
            server = await loop.create_server(self._new_connection, sock=sock)
        self._servers.append(server)
        log.info("nbd listening", address=str(address))

    def _new_connection(self) -> NbdConnection:
        return NbdConnection(self)

    def bound_ports(self) -> list[int]:
        """TCP ports actually bound (useful when the config asked for port 0)."""
        return [
            sock.getsockname()[1]
            for server in self._servers
            for sock in server.sockets
            if sock.family in (socket.AF_INET, socket.AF_INET6)
        ]

    async def close(self) -> None:
        self._shutting_down = True
        for server in self._servers:
            server.close()
        await asyncio.gather(*(c.drain_and_close() for c in list(self._connections)))
        for server in self._servers:
            await server.wait_closed()
        for address, sock in self._listeners:
            remove_listener(address, sock)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _register(self, connection: NbdConnection, alive: bool) -> None:
        if alive:
            self._connections.add(connection)
        else:
            self._connections.discard(connection)


class NbdConnection(asyncio.Protocol):
    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._handshake: ServerHandshake | None = ServerHandshake(server)
        self._parser: RequestParser | None = None
        self._service: VolumeService | None = None
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._peer = "?"
        self._closer: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        self._peer = str(self._transport.get_extra_info("peername") or "unix")
        self._server._register(self, True)
        assert self._handshake is not None
        self._transport.write(self._handshake.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server._register(self, False)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._handshake is not None:
            self._negotiate(data)
        else:
            assert self._parser is not None
            self._parser.feed(data)
            self._dispatch_all()

    # -- handshake --------------------------------------------------------------------------

    def _negotiate(self, data: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None and self._transport is not None
        self._transport.write(handshake.receive_data(data))
        if handshake.state is HandshakeState.CLOSED:
            log.info("nbd client closed in handshake", peer=self._peer, why=handshake.close_reason)
            self._close()
        elif handshake.state is HandshakeState.TRANSMISSION:
            assert handshake.export is not None
            self._service = self._server.service(handshake.export.name)
            assert self._service is not None
            self._parser = RequestParser(handshake.export)
            self._handshake = None
            log.info("nbd client attached", peer=self._peer, export=handshake.export.name)
            self._parser.feed(handshake.leftover)
            self._dispatch_all()

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

    def _dispatch(self, request: Request) -> None:
        if request.error:
            self._reply(request, request.error, started=time.perf_counter())
        elif request.command == Cmd.DISC:
            log.info("nbd client disconnected", peer=self._peer)
            self._closing = True
            self._closer = asyncio.ensure_future(self.drain_and_close())
        elif self._server.shutting_down:
            self._reply(request, w.Errno.ESHUTDOWN)
        elif not self._try_inline(request):
            task = asyncio.ensure_future(self._run(request))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            self._update_reading()

    def _try_inline(self, request: Request) -> bool:
        """Answer now if the request can complete without blocking the loop."""
        service = self._service
        assert service is not None
        started = time.perf_counter()
        try:
            if request.command == Cmd.READ:
                data = service.try_read(request.offset, request.length)
                if data is None:
                    return False
                self._reply(request, w.Errno.OK, data, started)
                return True
            if request.command == Cmd.WRITE and not request.fua:
                done = service.try_write(request.offset, request.payload)
                if done == request.length:
                    self._reply(request, w.Errno.OK, started=started)
                    return True
                if done:  # the pool writes the rest; length stays whole for the stats
                    request.payload = request.payload[done:]
                    request.offset += done
        except VolumeError as exc:
            self._reply_error(request, exc, started)
            return True
        return False

    async def _run(self, request: Request) -> None:
        assert self._service is not None
        started = time.perf_counter()
        try:
            data = await _EXECUTE[request.command](self._service, request)
        except VolumeError as exc:
            self._reply_error(request, exc, started)
        else:
            self._reply(request, w.Errno.OK, data, started)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("nbd request crashed", peer=self._peer, error=repr(task.exception()))
            self._close()
        self._update_reading()

    def _reply_error(self, request: Request, exc: VolumeError, started: float) -> None:
        code = wire_errno(exc.errno)
        log.warning("nbd request failed", peer=self._peer, error=str(exc), nbd_errno=code.name)
        self._reply(request, code, started=started)

    def _reply(
        self,
        request: Request,
        error: int,
        data: bytes | bytearray | None = None,
        started: float | None = None,
    ) -> None:
        op = _OP_NAMES.get(request.command)
        if started is not None and op is not None and self._service is not None:
            nbytes = request.length if op in ("read", "write") and not error else 0
            self._service.stats.record(op, nbytes, time.perf_counter() - started, failed=error != 0)
        if self._transport is None or self._transport.is_closing():
            return
        header = simple_reply(request.cookie, error)
        if data is not None and not error:
            self._transport.writelines((header, data))
        else:
            self._transport.write(header)

    def _update_reading(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        should_pause = self._writing_paused or len(self._tasks) >= MAX_IN_FLIGHT
        if should_pause and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not should_pause and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            if self._parser is not None:
                self._dispatch_all()

    async def drain_and_close(self) -> None:
        """Let in-flight requests finish and send their replies, then close."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


async def _execute_read(service: VolumeService, request: Request) -> bytes | bytearray:
    return await service.read(request.offset, request.length)


async def _execute_write(service: VolumeService, request: Request) -> None:
    await service.write(request.offset, request.payload, fua=request.fua)


async def _execute_flush(service: VolumeService, request: Request) -> None:
    await service.flush()


async def _execute_trim(service: VolumeService, request: Request) -> None:
    await service.trim(request.offset, request.length, fua=request.fua)


async def _execute_zero(service: VolumeService, request: Request) -> None:
    may_trim = not request.flags & w.CommandFlag.NO_HOLE
    await service.write_zeroes(request.offset, request.length, may_trim=may_trim, fua=request.fua)


async def _execute_cache(service: VolumeService, request: Request) -> None:
    await service.cache(request.offset, request.length)


_EXECUTE: dict[int, Callable[[VolumeService, Request], Awaitable[bytes | bytearray | None]]] = {
    Cmd.READ: _execute_read,
    Cmd.WRITE: _execute_write,
    Cmd.FLUSH: _execute_flush,
    Cmd.TRIM: _execute_trim,
    Cmd.WRITE_ZEROES: _execute_zero,
    Cmd.CACHE: _execute_cache,
}
