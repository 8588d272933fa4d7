"""The replication listener: which connections become links, and how fast they must say so.

How this works: ``PeerServer`` runs its own accept loop on the node's ``listen`` address
(bound by io/listeners.py, so a live node's port is never taken over).  Each connection is
first counted against the limits (io/limits.py: per listener, per client address), then
peeked at: its first bytes, within the handshake timeout, say whether it starts a TLS
handshake.  With ``trust``, a TLS connection must complete its handshake against
``trust.server_context()`` (a client certificate it trusts), handshaken with
``connect_accepted_socket`` because a server made by ``create_server(ssl=...)`` drops failed
handshakes without a word: here each one is logged with its reason, ``on_refused`` hears of
it (the daemon then looks for peers' certificates it lacks), and the server goes on
accepting.  A plain connection is admitted only while ``trust`` allows plain TCP (an insecure
peer), else read and closed with a FIN.  Without ``trust`` (tests of the link alone) every
connection is plain.  ``make_link()`` builds the ``PeerLink`` of each admitted connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

import structlog

from volkeeper.core.addresses import TcpAddress
from volkeeper.io.limits import Limits
from volkeeper.io.listeners import bind_listener, remove_listener
from volkeeper.io.peer_link import RECEIVE_CHUNK, PeerLink
from volkeeper.io.peer_tls import describe, looks_like_tls

log = structlog.get_logger("volkeeper.peer")

HANDSHAKE_TIMEOUT = 10.0  # without limits: first bytes, then a TLS handshake, within this


class Gatekeeper(Protocol):
    """Whom to accept (io/peer_trust.py ``PeerTrust``): the TLS context a connection must
    complete its handshake with, and whether plain TCP is allowed."""

    def server_context(self) -> ssl.SSLContext: ...
    def plaintext_allowed(self) -> bool: ...


class PeerServer:
    """Accepts replication connections; see the module docstring."""

    def __init__(
        self,
        make_link: Callable[[], PeerLink],
        trust: Gatekeeper | None = None,
        on_refused: Callable[[], None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._make_link = make_link
        self._trust = trust
        self._limits = limits or Limits(handshake_timeout=HANDSHAKE_TIMEOUT)
        self._open: dict[asyncio.BaseTransport, str] = {}  # admitted connections -> host
        self._admitting: dict[socket.socket, str] = {}  # connections still negotiating
        self._on_refused = on_refused or (lambda: None)
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self.address: TcpAddress | None = None

    async def listen(self, address: TcpAddress) -> None:
        self._socket = bind_listener(address, "replication")
        self.address = address
        self._socket.setblocking(False)
        self._accepting = asyncio.create_task(self._accept(self._socket))
        log.info("replication listening", address=str(address), tls=self._trust is not None)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: say so, breathe, keep serving
                log.error("replication accept failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._admit(sock, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _admit(self, sock: socket.socket, peer: object) -> None:
        where, host = _show_peer(peer), _host(peer)
        self._open = {t: h for t, h in self._open.items() if not t.is_closing()}
        hosts = [*self._open.values(), *self._admitting.values()]
        same = sum(1 for h in hosts if h == host)
        if self._limits.over_connections("replication", len(hosts), same, where):
            sock.close()
            return
        self._admitting[sock] = host
        try:
            await self._negotiate(sock, where, host)
        finally:
            del self._admitting[sock]

    async def _negotiate(self, sock: socket.socket, where: str, host: str) -> None:
        timeout = self._limits.handshake_timeout
        try:
            first = await _first_bytes(sock, timeout)
        except (TimeoutError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                self._limits.hit("replication_handshake_timeout", peer=where)
            log.warning("replication connection dropped", peer=where, why=_silent(exc, timeout))
            sock.close()
            return
        if not first:
            sock.close()
            return
        trust = self._trust
        if trust is not None and looks_like_tls(first):
            await self._handshake(sock, where, host, trust.server_context())
        elif trust is None or trust.plaintext_allowed():
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                self._make_link, sock
            )
            self._open[transport] = host
        else:
            log.warning(
                "replication connection refused",
                peer=where,
                why="plain TCP, and no peer is configured insecure = true",
            )
            with contextlib.suppress(OSError):  # read what came, so the close is a FIN, not RST
                sock.recv(RECEIVE_CHUNK)
            sock.close()

    async def _handshake(
        self, sock: socket.socket, where: str, host: str, tls: ssl.SSLContext
    ) -> None:
        timeout = self._limits.handshake_timeout
        try:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                self._make_link, sock, ssl=tls, ssl_handshake_timeout=timeout
            )
            self._open[transport] = host
            return
        except ssl.SSLError as exc:  # the loop has closed sock
            why = describe(exc)
        except (TimeoutError, ConnectionAbortedError) as exc:  # the loop's handshake timeout
            why = describe(exc) if str(exc) else f"no handshake in {timeout:g} s"
        except OSError as exc:  # a TLS client that gives up sends no alert, it just closes
            why = (
                "the other end closed the connection during the handshake; it may have "
                f"refused our certificate (see its log) [{describe(exc)}]"
            )
        except Exception as exc:  # never let one connection take the server down
            log.error("replication TLS handshake failed", peer=where, error=repr(exc))
            return
        log.warning("replication TLS handshake failed", peer=where, why=why)
        self._on_refused()

    async def close(self) -> None:
        tasks = [task for task in (self._accepting, *self._handshakes) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None and self.address is not None:
            remove_listener(self.address, self._socket)


async def _first_bytes(sock: socket.socket, timeout: float) -> bytes:
    """Peek at what a new connection sends first (left in the socket for the protocol)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(readable, timeout)
    finally:
        loop.remove_reader(fd)
    return sock.recv(3, socket.MSG_PEEK)


def _silent(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"sent nothing in {timeout:g} s"
    return str(exc) or type(exc).__name__


def _host(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _show_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)
