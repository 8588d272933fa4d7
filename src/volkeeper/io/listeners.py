"""Bind listening sockets for the node's servers, refusing to steal a live one.

How this works: ``bind_listener(address, what)`` returns a bound, listening socket for a
``unix:`` path or a ``host:port``.  A unix socket file is only replaced when nothing answers
on it (a stale file from a crash); if another process is serving there, the bind is refused,
so a second daemon started with the same config cannot take over a running node's sockets.
Every failure is a ``VolkeeperError`` naming the address and the reason.
"""

from __future__ import annotations

import contextlib
import os
import socket

from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.errors import VolkeeperError

BACKLOG = 128


def bind_listener(address: UnixAddress | TcpAddress, what: str) -> socket.socket:
    try:
        if isinstance(address, UnixAddress):
            return _bind_unix(address.path, what)
        return _bind_tcp(address)
    except OSError as exc:
        raise VolkeeperError(f"cannot listen for {what} on {address}: {exc.strerror}") from exc


def remove_listener(address: UnixAddress | TcpAddress, sock: socket.socket) -> None:
    """Close a listener of ours and remove its socket file, leaving no stale path behind."""
    sock.close()
    if isinstance(address, UnixAddress):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)


def _bind_unix(path: str, what: str) -> socket.socket:
    if _someone_listens(path):
        raise VolkeeperError(
            f"cannot listen for {what} on unix:{path}: address in use by another process "
            "(is this node already running?)"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _someone_listens(path: str) -> bool:
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _bind_tcp(address: TcpAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
