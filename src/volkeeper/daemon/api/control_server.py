"""The control API's server: uvicorn on the node's own loop, on a socket bound up front.

How this works: ``ControlServer`` binds its listener when the node starts (a bad or busy
address fails the start cleanly) and serves ``create_app`` (daemon/api/control.py) on the
daemon's event loop, without uvicorn's signal handling (the daemon owns signals).  On a unix
socket, access is the socket file's mode, set as it is bound (daemon/api/control_access.py);
on TCP the listener is TLS with the node's certificate and every request needs a token.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

import uvicorn

from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.daemon.api.control import NodeView, create_app
from volkeeper.daemon.api.control_access import BearerAuth, unix_socket_mode
from volkeeper.io.control_tokens import TokenStore
from volkeeper.io.listeners import bind_listener, remove_listener


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: SIGTERM belongs to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ControlServer:
    """uvicorn on a socket bound up front, so a bad address fails the node's start cleanly.

    On a unix socket, access is its file mode (daemon/api/control_access.py); on TCP the
    listener is TLS with ``certificate`` and ``key`` and every request needs a token of
    ``tokens``."""

    def __init__(
        self,
        node: NodeView,
        address: UnixAddress | TcpAddress,
        tokens: TokenStore,
        certificate: Path,
        key: Path,
        group: str | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.address = address
        app: Any = create_app(node)
        tls: dict[str, Any] = {}
        if isinstance(address, TcpAddress):
            app = BearerAuth(app, tokens)
            tls = {"ssl_certfile": str(certificate), "ssl_keyfile": str(key)}
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False,
            limit_concurrency=max_connections, **tls,
        )  # fmt: skip
        self._server = _QuietServer(config)
        self._socket: socket.socket | None = None
        self._mode = unix_socket_mode(group)

    def bind(self) -> None:
        if isinstance(self.address, TcpAddress):
            self._socket = bind_listener(self.address, "the control API")
            return
        mode, gid = self._mode
        os.makedirs(os.path.dirname(self.address.path) or ".", exist_ok=True)
        previous = os.umask(0o777 & ~mode)  # the file is born with its final mode
        try:
            self._socket = bind_listener(self.address, "the control API")
        finally:
            os.umask(previous)
        if gid is not None:
            os.chown(self.address.path, -1, gid)

    async def serve(self) -> None:
        assert self._socket is not None, "bind() first"
        await self._server.serve(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True

    def close(self) -> None:
        if self._socket is not None:
            remove_listener(self.address, self._socket)
            self._socket = None
