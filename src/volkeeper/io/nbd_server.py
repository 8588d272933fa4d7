"""The NBD listeners of a node, and the catalog of exports they offer.

How this works: ``NbdServer`` listens on unix sockets and TCP ports; each accepted socket gets
an ``NbdConnection`` (io/nbd_connection.py), which negotiates against this catalog (the
volumes' export information, with the node's largest request) and then serves requests.  The
server keeps the connections alive, with the access rules and limits they are held to
(io/nbd_access.py, io/limits.py).

Shutdown (``close``): listeners stop, connections still negotiating are closed (an option
that races in gets ERR_SHUTDOWN), new requests get ESHUTDOWN, in-flight requests finish, then
every connection is closed.  A volume locked while clients are attached (it became a mirror
target) refuses their writes with EPERM from then on.  ``detach`` does the same for the
clients of one export (a switchover moves its source away).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable, Sequence

import structlog

from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.core.nbd_handshake import ExportInfo
from volkeeper.io.limits import Limits
from volkeeper.io.listeners import bind_listener, remove_listener
from volkeeper.io.nbd_access import NbdAccess
from volkeeper.io.nbd_connection import NbdConnection
from volkeeper.io.volume_service import VolumeService

log = structlog.get_logger("volkeeper.nbd")


class NbdServer:
    """Every NBD listener of a node, and the catalog of exports they offer."""

    def __init__(
        self,
        services: Callable[[], Sequence[VolumeService]],
        access: NbdAccess | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._services = services
        self.access = access or NbdAccess()
        self.limits = limits or Limits()
        self._servers: list[asyncio.Server] = []
        self._listeners: list[tuple[UnixAddress | TcpAddress, socket.socket]] = []
        self._connections: set[NbdConnection] = set()
        self._shutting_down = False
        self.in_flight = 0  # requests on worker threads, all connections together

    # -- ExportCatalog ----------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def exports(self) -> Sequence[ExportInfo]:
        return [self._limited(service.export_info()) for service in self._services()]

    def lookup(self, name: str) -> ExportInfo | None:
        service = self.service(name)
        return self._limited(service.export_info()) if service else None

    def _limited(self, export: ExportInfo) -> ExportInfo:
        """``export`` with the node's largest request ([limits] nbd_max_request)."""
        largest = self.limits.nbd_max_request
        if export.max_block_size == largest:
            return export
        return dataclasses.replace(export, max_block_size=largest)

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

    async def close(self) -> None:
        self._shutting_down = True
        for server in self._servers:
            server.close()
        await asyncio.gather(*(c.drain_and_close() for c in list(self._connections)))
        for server in self._servers:
            await server.wait_closed()
        for address, sock in self._listeners:
            remove_listener(address, sock)

    async def detach(self, export: str) -> int:
        """Disconnect every client of ``export`` (a switchover): no new request of theirs
        is started; those in flight finish and are answered; then each is closed.
        Returns how many there were."""
        attached = [c for c in self._connections if c.export == export]
        await asyncio.gather(*(c.stop_and_close() for c in attached))
        return len(attached)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def open_connections(self, host: str | None) -> tuple[int, int]:
        """(connections open, of them from ``host``): what the connection limits count."""
        same = sum(1 for c in self._connections if host is not None and c.host == host)
        return len(self._connections), same

    def register(self, connection: NbdConnection, alive: bool) -> None:
        if alive:
            self._connections.add(connection)
        else:
            self._connections.discard(connection)
