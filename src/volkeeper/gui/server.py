"""``volkeeper gui``: the GUI's web server, on localhost unless told otherwise.

How this works: ``serve`` checks everything it was given before it binds anything (a bad
address, a token file that cannot be read, a certificate without its key: one clear error),
builds the fleet of node links and the application, and runs uvicorn -- HTTPS when given a
certificate.  The links start polling when the server starts and stop when it stops.  A GUI
listening beyond localhost needs a login (gui/access.py).
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from volkeeper.client.credentials import Target, token_from_environment
from volkeeper.core.addresses import TcpAddress, is_loopback
from volkeeper.errors import ConfigError
from volkeeper.gui.access import Access, load_tokens
from volkeeper.gui.app import create_app
from volkeeper.gui.fleet import Fleet

DEFAULT_LISTEN = "127.0.0.1:8470"


def build(
    nodes: list[Target],
    listen: TcpAddress,
    tokens: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> FastAPI:
    if not nodes:
        raise ConfigError("which nodes? give --node ADDR (or --config FILE) once per node")
    if (cert is None) != (key is None):
        raise ConfigError("HTTPS needs both --cert FILE and --key FILE")
    for path in (cert, key):
        if path is not None and not path.is_file():
            raise ConfigError(f"no such file: {path}")
    access = Access(
        login_required=not is_loopback(listen.host),
        tokens=load_tokens(tokens) if tokens else {},
        https=cert is not None,
    )
    fleet = Fleet(nodes, token_from_environment())

    @contextlib.asynccontextmanager
    async def running(app: FastAPI) -> AsyncIterator[None]:
        fleet.start()
        yield
        await fleet.stop()

    app = create_app(fleet, access)
    app.router.lifespan_context = running
    return app


def serve(
    nodes: list[Target],
    listen: TcpAddress,
    tokens: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> None:
    app = build(nodes, listen, tokens, cert, key)
    listener = _bind(listen)
    scheme = "https" if cert else "http"
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    print(f"volkeeper GUI: {scheme}://{host}:{listen.port}/ watching {len(nodes)} node(s)",
          flush=True)  # fmt: skip
    config = uvicorn.Config(
        app, host=listen.host, port=listen.port, log_level="warning", access_log=False,
        ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None,
        timeout_graceful_shutdown=1,
    )  # fmt: skip
    _Server(config).run(sockets=[listener])


class _Server(uvicorn.Server):
    """uvicorn whose SIGTERM and SIGINT end it cleanly (exit status 0), not re-raised."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(listen: TcpAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((listen.host, listen.port))
    except OSError as exc:
        listener.close()
        raise ConfigError(f"the GUI cannot listen on {listen}: {exc.strerror}") from None
    listener.listen(128)
    return listener
