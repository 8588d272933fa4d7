"""asyncio adapter for the replication protocol: one ``PeerLink`` per TCP connection.

How this works: ``PeerLink`` is an ``asyncio.BufferedProtocol`` wrapped around the sans-IO
codec of core/peer/wire.py.  The socket is read into a fixed chunk that the ``FrameDecoder``
is fed from -- or, while a large WRITE's data is still arriving, straight into that frame's
own buffer (``payload_window``: no copy at all); hand such a buffer back with ``recycle``
once it is written.  Each frame goes to the owner's ``on_frame`` callback in arrival order
(the order the peer sent them, which is the order writes must be applied in).
``send(frame)`` encodes with the link's ``FrameEncoder`` (a payload is never copied) and
returns the frame's sequence number, which the peer's ACK will name.  Frames sent during one
turn of the event loop (the async writes of one burst of NBD requests) are gathered and
handed to the transport with one ``writelines`` right after it (``call_soon``): one system
call for many frames, and an NBD reply is never held up by it.  Frames sent while a receive
is handled (ACKs) leave together at its end; ``push()`` sends at once (a sync write, whose
reply waits for the target: measured, that is worth a system call per frame).
``drained()`` hands them over at once and waits while the socket's send buffer is above its
high-water mark, so a sender can apply back-pressure.

A corrupt or unexpected frame closes that connection with the decoder's reason, and the owner
hears about it once, through ``on_lost(reason)``; nothing propagates further.

``connect()`` dials a peer with a timeout; io/peer_server.py accepts the connections a node
is dialled with, and makes a ``PeerLink`` of each it admits.  Sockets get TCP_NODELAY and
4 MiB buffers: the link carries both tiny ACKs and megabyte writes, and a deep pipe is what
keeps a long, thin link full.

With TLS (io/peer_trust.py says how), ``connect`` checks the certificate the peer presented
before anything is sent; a failed handshake is a ``PeerError`` that says why.  A link only
ever sees connections whose handshake completed.  A plain link that
receives a TLS record first says so in its close reason (TLS on one side only).  Over TLS,
``writelines`` hands the buffers to the SSL transport, which copies them once to encrypt them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import structlog

from volkeeper.core.addresses import TcpAddress
from volkeeper.core.peer.wire import Buffer, Frame, FrameDecoder, FrameEncoder
from volkeeper.errors import PeerError, ProtocolError
from volkeeper.io.peer_tls import describe, looks_like_tls

log = structlog.get_logger("volkeeper.peer")

SOCKET_BUFFER = 4 * 1024 * 1024
RECEIVE_CHUNK = 64 * 1024  # bytes read at once when not straight into a payload
OnFrame = Callable[["PeerLink", Frame], None]
OnLost = Callable[["PeerLink", str], None]


class Credentials(Protocol):
    """How to dial a peer (io/peer_trust.py ``PeerTrust``): the TLS context for it (None:
    plain TCP), and the check of the certificate it presented (raises ``PeerError``)."""

    def client_context(self, peer: str) -> ssl.SSLContext | None: ...
    def check_server(self, peer: str, der: bytes | None) -> None: ...


class PeerLink(asyncio.BufferedProtocol):
    def __init__(self, on_frame: OnFrame, on_lost: OnLost) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        self._first_bytes = b""  # the first few bytes received, to recognise a TLS peer
        self._tls = False
        self._chunk = memoryview(bytearray(RECEIVE_CHUNK))
        self._into_payload = False  # the last buffer handed out was a payload window
        self._outbox: list[Buffer] = []  # frames sent and not yet handed to the transport
        self._flush_scheduled = False
        self._receiving = False  # inside buffer_updated: sends wait for its end
        self.held = False  # not read, by hold(): its silence proves nothing
        self.peer = "?"

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.peer = str(self._transport.get_extra_info("peername"))
        self._tls = self._transport.get_extra_info("ssl_object") is not None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

    def get_buffer(self, sizehint: int) -> memoryview:
        window = self._decoder.payload_window()
        self._into_payload = window is not None
        return window if window is not None else self._chunk

    def buffer_updated(self, nbytes: int) -> None:
        if self._lost:
            return
        if self._into_payload:
            self._decoder.payload_received(nbytes)
        else:
            data = self._chunk[:nbytes]
            if len(self._first_bytes) < 3:
                self._first_bytes += bytes(data[: 3 - len(self._first_bytes)])
            self._decoder.feed(data)
        self._receiving = True
        try:
            while not self._lost and (frame := self._decoder.next_frame()) is not None:
                self._on_frame(self, frame)
        except ProtocolError as exc:
            self.close(f"protocol error from {self.peer}: {exc}{self._tls_hint()}")
        finally:
            self._receiving = False
            self._flush()  # the ACKs of this receive, in one write

    def _flush(self) -> None:
        """Hand every frame sent since the last flush to the transport in one write."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        transport = self._transport
        if outbox and transport is not None and not transport.is_closing():
            transport.writelines(outbox)

    def _tls_hint(self) -> str:
        if not looks_like_tls(self._first_bytes):
            return ""
        return " (the peer speaks TLS and this link does not: is [tls] configured on both nodes?)"

    def eof_received(self) -> bool | None:
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            self.close(f"protocol error from {self.peer}: {exc}")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if isinstance(exc, ssl.SSLError):  # after the handshake: a record failed its checks
            reason = exc.reason or describe(exc)
            why = f": TLS record rejected, damaged or tampered with on the way ({reason})"
        elif not self._first_bytes and (exc is None or isinstance(exc, ConnectionResetError)):
            # asyncio sends no TLS alert when a handshake fails, and with TLS 1.3 the server
            # checks our certificate after our side of the handshake is done: a refusal
            # looks like this, and only the other node's log can say more.
            maybe = (
                "it may have refused our TLS certificate: see its log"
                if self._tls
                else "it takes plain TCP only from peers it has as insecure = true: see its log"
            )
            why = f": closed by the other end before it sent anything ({maybe})"
        else:
            why = f": {exc}" if exc else ""
        self._report_lost(f"connection to {self.peer} lost{why}")

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
        self._outbox += self._encoder.encode(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return self._encoder.sequence

    def push(self) -> None:
        """Hand what was sent to the transport now, not at the end of the loop turn (a
        synchronous write's frame: the target starts on it while the source writes locally)."""
        if not self._receiving:
            self._flush()

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) reading: back-pressure on the peer, through TCP."""
        self.held = held
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if held:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def recycle(self, data: Buffer) -> None:
        """A received frame's data has been written: its buffer may take the next one."""
        self._decoder.recycle(data)

    def certificate_der(self) -> bytes | None:
        """The peer's TLS certificate (DER); None on a plain TCP link."""
        ssl_object = self._transport.get_extra_info("ssl_object") if self._transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return bytes(der) if der else None

    @property
    def remote_host(self) -> str:
        peername = self._transport.get_extra_info("peername") if self._transport else None
        return str(peername[0]) if isinstance(peername, tuple) else "?"

    def certificate_names(self) -> list[str] | None:
        """DNS names in the peer's TLS certificate; None on a plain TCP link."""
        if self._transport is None or not self._tls:
            return None
        certificate = self._transport.get_extra_info("peercert") or {}
        return [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]

    @property
    def last_received(self) -> int:
        """Sequence number of the last frame received (what our ACKs name)."""
        return self._decoder.sequence

    async def drained(self) -> None:
        if self._outbox:
            self._flush()
        await self._writable.wait()

    def close(self, reason: str) -> None:
        self._flush()  # a REFUSE or GOODBYE sent just before goes out first
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._report_lost(reason)

    def abandon(self) -> None:
        """Close without telling the owner: the link was never handed to it (connect)."""
        self._lost = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

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
    trust: Credentials | None = None,
    peer_name: str = "?",
) -> PeerLink:
    """Dial ``peer_name`` at ``address``.  With ``trust``, the link is TLS unless that peer
    is insecure, and the certificate it presents must be the one trusted for ``peer_name``
    (``PeerError`` otherwise, before anything is sent); without, it is plain TCP."""
    loop = asyncio.get_running_loop()
    tls = trust.client_context(peer_name) if trust is not None else None
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
    except ssl.SSLError as exc:  # an OSError too: catch it first, to say what went wrong
        raise PeerError(
            f"TLS handshake with {peer_name} at {address} failed: {describe(exc)}"
        ) from exc
    except (ConnectionResetError, ConnectionAbortedError) as exc:
        if tls is None:
            raise PeerError(f"cannot reach peer at {address}: {describe(exc)}") from exc
        raise PeerError(
            f"TLS handshake with {peer_name} at {address} failed: the other end closed the "
            "connection (does it run volkeeper with TLS on this port?)"
        ) from exc
    except (TimeoutError, OSError) as exc:
        why = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else repr(exc))
        raise PeerError(f"cannot reach peer at {address}: {why}") from exc
    if trust is not None:
        try:
            trust.check_server(peer_name, link.certificate_der())
        except PeerError:
            link.abandon()
            raise
    return link
