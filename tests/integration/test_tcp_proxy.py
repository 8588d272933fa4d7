"""The test proxy itself (tests/integration/tcp_proxy.py): forwarding, cut, restore, a cut
right after the target's next reply, a frozen link, and a target that is down.  An echo
server (or a bare listener) stands in for the target; every socket and thread here is closed
before the test returns."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from tests.integration.tcp_proxy import TcpProxy


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def dies_at_once(port: int) -> bool:
    """A new connection is closed by the other end (the reset may even beat connect())."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    with sock:
        return closed(sock)


def test_proxy_forwards_cuts_and_restores() -> None:
    with echo_server() as port, TcpProxy(port) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as live:
            live.sendall(b"ping")
            assert live.recv(4) == b"ping"
            assert proxy.accepted == 1 and proxy.live_connections == 1
            proxy.cut()
            assert closed(live), "a live connection survived cut()"
        assert dies_at_once(proxy.port), "a new connection got through a cut link"
        assert proxy.dropped >= 1 and proxy.accepted == 1
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as again:
            again.sendall(b"pong")
            assert again.recv(4) == b"pong"
        assert proxy.accepted == 2
    with socket.socket() as probe:  # close() released the port
        assert probe.connect_ex(("127.0.0.1", proxy.port)) != 0


def test_proxy_drops_clients_while_the_target_is_down() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, not listening: connections are refused
        with TcpProxy(port) as proxy:
            assert dies_at_once(proxy.port)
            assert (proxy.accepted, proxy.dropped) == (0, 1)


def test_proxy_cuts_right_after_the_next_reply() -> None:
    with echo_server() as port, TcpProxy(port) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as live:
            live.sendall(b"one")
            assert live.recv(3) == b"one"
            proxy.cut_after_reply()
            live.sendall(b"two")
            assert live.recv(3) == b"two", "the reply that triggers the cut must arrive"
            assert closed(live), "no cut after the reply"
        assert not proxy.connected and dies_at_once(proxy.port)
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as again:
            again.sendall(b"three")
            assert again.recv(5) == b"three"


def hears_nothing(sock: socket.socket, timeout: float = 0.5) -> bool:
    """Neither bytes nor a close arrive on ``sock`` within ``timeout``."""
    sock.settimeout(timeout)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    except OSError:
        return False
    return False


def test_a_frozen_link_is_a_black_hole_and_new_connections_pass() -> None:
    """After freeze() a live connection carries nothing either way, and its client's close
    never reaches the target: the target's end stays open (half-open, as after a partition)
    until the proxy closes.  A new connection is forwarded as usual."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(2)
        with TcpProxy(listener.getsockname()[1]) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
            upstream, _ = listener.accept()
            with upstream:
                client.sendall(b"a")
                upstream.settimeout(2)
                assert upstream.recv(1) == b"a"
                proxy.freeze()
                assert proxy.live_connections == 0
                client.sendall(b"lost")
                upstream.sendall(b"lost too")
                assert hears_nothing(client) and hears_nothing(upstream)
                client.close()
                assert hears_nothing(upstream), "the client's close got through a frozen link"
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as again:
                    fresh, _ = listener.accept()
                    with fresh:
                        again.sendall(b"b")
                        fresh.settimeout(2)
                        assert fresh.recv(1) == b"b"
            assert proxy.accepted == 2
