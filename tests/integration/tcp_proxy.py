"""A loopback TCP proxy whose link a synchronous test can cut and restore.

How this works (after asyncpg's ``_testbase/fuzzer.py``, but with threads and blocking sockets
so a plain pytest test can drive it): ``TcpProxy(target_port)`` listens on a free loopback
port; an accept thread takes each client, dials the target and starts two pump threads
(client -> target, target -> client) that copy bytes until either side closes, then close
both sockets.  ``cut()`` closes every live connection at once (both ends see the connection
drop, as after a reset) and, until ``restore()``, accepts new connections only to close them
straight away -- the dialer sees a connection that dies before the first byte, never a hang.
``cut_after_reply()`` arms a cut at a protocol point: right after the next bytes from the
target reach the client (closed with FIN, so they do arrive).  ``freeze()`` makes every live
connection a black hole, as a partition that drops packets does: bytes either way are read
and thrown away, and when one end closes the other never hears of it (half-open until
``close()``); new connections are forwarded as usual.  ``tamper(how)`` changes the next chunk of
at least 1 KiB from the client, once: ``flip`` one bit of it, ``replay`` it (sent twice) or
``reorder`` it (held back and sent after the chunk that follows).  ``close()`` stops accepting
and closes everything; the proxy is a context manager.

A target that is down (its port refuses) is passed on the same way: the client's connection
is closed at once.  ``accepted`` counts connections the proxy forwarded, so a test can show
that traffic really went through it.

Only threads this module starts are stopped here, and all of them are daemon threads blocked
on sockets that ``cut()``/``close()`` shut down, so nothing outlives ``close()`` for long.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

CHUNK = 1 << 16
LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s: close() sends RST


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._graceful: set[tuple[socket.socket, socket.socket]] = set()  # closed with FIN
        self._frozen: set[tuple[socket.socket, socket.socket]] = set()  # black holes
        self._threads: list[threading.Thread] = []
        self._connected = True
        self._cut_armed = False
        self._closed = False
        self._tamper: str | None = None  # armed by tamper()
        self._held: bytes | None = None  # a chunk held back to be sent out of order
        self.tampered = 0  # chunks tampered with
        self.accepted = 0  # connections forwarded to the target
        self.dropped = 0  # connections closed at once (cut, or the target refused)
        self._accepter = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._accepter.daemon = True
        self._accepter.start()

    # -- control ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def live_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Drop every live connection; refuse new ones (accept, then close) until restore()."""
        with self._lock:
            self._connected = False
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            _close_pair(pair)

    def cut_after_reply(self) -> None:
        """Arm a one-shot cut: once the first bytes the proxy reads from the target after this
        call have been passed on to the client, cut() -- with a clean close (FIN), so those
        bytes still arrive.  This
        cuts a protocol at a known point: right after the target's first answer."""
        with self._lock:
            self._cut_armed = True

    def freeze(self) -> None:
        """Black-hole every live connection: nothing more passes, no close is passed on."""
        with self._lock:
            self._frozen |= self._pairs
            self._pairs = set()

    def tamper(self, how: str) -> None:
        assert how in ("flip", "replay", "reorder"), how
        with self._lock:
            self._tamper = how

    def _tampered(self, data: bytes) -> list[bytes]:
        """What to send for ``data`` from the client (with the chunk held back, if any)."""
        with self._lock:
            how = self._tamper if len(data) >= 1024 else None
            if how is not None:
                self._tamper = None
                self.tampered += 1
            held, self._held = self._held, None
        if how == "flip":
            middle = len(data) // 2
            return [data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]]
        if how == "replay":
            return [data, data]
        if how == "reorder":
            self._held = data
            return []
        return [data] if held is None else [data, held]

    def restore(self) -> None:
        with self._lock:
            self._connected = True
            self._cut_armed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._connected = False
            pairs, self._pairs = self._pairs | self._frozen, set()
        for pair in pairs:
            _close_pair(pair)
        self._accepter.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- threads ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.settimeout(None)
        if not self._connected:
            self._drop(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            self._drop(client)
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (client, upstream)
        with self._lock:
            if not self._connected:  # cut() ran while we dialled
                _close_pair(pair)
                self.dropped += 1
                return
            self._pairs.add(pair)
            self.accepted += 1
            self._threads = [t for t in self._threads if t.is_alive()]
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(pair, source, sink))
                thread.daemon = True
                thread.start()
                self._threads.append(thread)

    def _drop(self, client: socket.socket) -> None:
        with self._lock:
            self.dropped += 1
        _abort(client)

    def _pump(
        self,
        pair: tuple[socket.socket, socket.socket],
        source: socket.socket,
        sink: socket.socket,
    ) -> None:
        try:
            while data := source.recv(CHUNK):
                if pair in self._frozen:
                    continue
                # Looked at before passing the bytes on: bytes the client has already seen
                # can never trigger a cut armed after them.
                cut_now = source is pair[1] and self._cut_armed
                for chunk in self._tampered(data) if source is pair[0] else [data]:
                    sink.sendall(chunk)
                if cut_now:
                    with self._lock:
                        self._cut_armed = self._connected = False
                        pairs, self._pairs = self._pairs, set()
                        self._graceful.add(pair)
                    for other in pairs - {pair}:
                        _close_pair(other)
                    break
        except OSError:
            pass
        with self._lock:
            if pair in self._frozen:  # the other end never hears: close() closes it
                return
            self._pairs.discard(pair)
            reset = pair not in self._graceful
        _close_pair(pair, reset=reset)


def _abort(sock: socket.socket, reset: bool = True) -> None:
    """Close; with ``reset`` by RST (SO_LINGER 0): the peer's next read fails at once, and
    data it has not read yet may be lost.  Without, by FIN after everything sent."""
    if reset:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _close_pair(pair: tuple[socket.socket, socket.socket], reset: bool = True) -> None:
    for sock in pair:
        _abort(sock, reset)
