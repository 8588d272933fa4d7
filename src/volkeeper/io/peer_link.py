"""asyncio adapter for the replication protocol: one ``PeerLink`` per TCP connection.

How this works: ``PeerLink`` is an ``asyncio.Protocol`` wrapped around the sans-IO codec of
core/peer_wire.py.  Bytes read go to a ``FrameDecoder``; each frame is handed to the owner's
``on_frame`` callback in arrival order (the order the peer sent them, which is the order writes
must be applied in).  ``send(frame)`` encodes with the link's ``FrameEncoder`` and writes the
buffers with one ``writelines`` (a payload is never copied); it returns the frame's sequence
number, which the peer's ACK will name.  ``drained()`` waits while the socket's send buffer is
above its high-water mark, so a sender can apply back-pressure.

A corrupt or unexpected frame closes that connection with the decoder's reason, and the owner
hears about it once, through ``on_lost(reason)``; nothing propagates further.

``connect()`` dials a peer with a timeout; ``PeerServer`` accepts connections on the node's
``listen`` address (bound by io/listeners.py, so a live node's port is never taken over).
Sockets get TCP_NODELAY and 4 MiB buffers: the link carries both tiny ACKs and megabyte
writes, and a deep pipe is what keeps a long, thin link full.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import cast

import structlog

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer_wire import Frame, FrameDecoder, FrameEncoder
from volkeeper.errors import PeerError, ProtocolError
from volkeeper.io.listeners import bind_listener, remove_listener

log = structlog.get_logger("volkeeper.peer")

SOCKET_BUFFER = 4 * 1024 * 1024
OnFrame = Callable[["PeerLink", Frame], None]
OnLost = Callable[["PeerLink", str], None]


class PeerLink(asyncio.Protocol):
    def __init__(self, on_frame: OnFrame, on_lost: OnLost) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        self.peer = "?"

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.peer = str(self._transport.get_extra_info("peername"))
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self._decoder.feed(data)
        try:
            while not self._lost and (frame := self._decoder.next_frame()) is not None:
                self._on_frame(self, frame)
        except ProtocolError as exc:
            self.close(f"protocol error from {self.peer}: {exc}")

    def eof_received(self) -> bool | None:
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            self.close(f"protocol error from {self.peer}: {exc}")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self._report_lost(f"connection to {self.peer} lost" + (f": {exc}" if exc else ""))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- for the owner ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return not self._lost and self._transport is not None

    def send(self, frame: Frame) -> int:
        """Queue ``frame``; returns its sequence number.  Raises PeerError once lost."""
        if not self.is_open:
            raise PeerError(f"link to {self.peer} is closed")
        parts = self._encoder.encode(frame)
        assert self._transport is not None
        self._transport.writelines(parts)
        return self._encoder.sequence

    @property
    def last_received(self) -> int:
        """Sequence number of the last frame received (what our ACKs name)."""
        return self._decoder.sequence

    async def drained(self) -> None:
        await self._writable.wait()

    def close(self, reason: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._report_lost(reason)

    def _report_lost(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            log.info("peer link closed", peer=self.peer, why=reason)
            self._on_lost(self, reason)


async def connect(
    address: TcpAddress,
    on_frame: OnFrame,
    on_lost: OnLost,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    peer_name: str | None = None,
) -> PeerLink:
    """Dial ``address``; with ``tls``, the peer's certificate must name ``peer_name``."""
    loop = asyncio.get_running_loop()
    try:
        _, link = await asyncio.wait_for(
            loop.create_connection(
                lambda: PeerLink(on_frame, on_lost),
                address.host,
                address.port,
                ssl=tls,
                server_hostname=peer_name if tls is not None else None,
            ),
            timeout,
        )
    except (TimeoutError, OSError) as exc:
        raise PeerError(f"cannot reach peer at {address}: {exc or 'timed out'}") from exc
    return link


class PeerServer:
    """Accepts replication connections; ``make_link()`` builds the protocol for each."""

    def __init__(self, make_link: Callable[[], PeerLink]) -> None:
        self._make_link = make_link
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None
        self.address: TcpAddress | None = None

    async def listen(self, address: TcpAddress) -> None:
        self._socket = bind_listener(address, "replication")
        self.address = address
        self._server = await asyncio.get_running_loop().create_server(
            self._make_link, sock=self._socket
        )
        log.info("replication listening", address=str(address))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._socket is not None and self.address is not None:
            remove_listener(self.address, self._socket)
