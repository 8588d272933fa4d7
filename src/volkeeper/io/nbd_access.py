"""Who may use a node's NBD exports, and how: TLS, client addresses, read-only clients.

How this works: ``NbdAccess`` is built once from ``[node]`` and the volumes' config and handed
to ``NbdServer``; each connection asks it three things.  ``admits(host)``: on TCP, a client
whose address is in no network of ``nbd_allow`` is closed before the greeting (an empty list
admits everyone; a unix socket's file mode is its gate).  ``tls``: the mode the handshake runs
in (core/nbd_handshake.py: off, offer, require) and the server context it upgrades with --
the node's certificate, or ``nbd_tls_certificate``; with ``nbd_tls_ca`` a client must present
a certificate that CA signed.  ``catalog_for(host)``: the export catalog as that client sees
it, where a volume whose ``read_only_clients`` names the client's network is read-only (the
request parser then refuses its writes with EPERM, as for a locked volume).  TLS-PSK is not
offered: Python 3.11's ``ssl`` module has no PSK callbacks (3.13 adds them).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from volkeeper.core.nbd_handshake import ExportCatalog, ExportInfo, TlsMode
from volkeeper.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NbdAccess:
    tls: TlsMode = TlsMode.OFF
    context: ssl.SSLContext | None = None
    allow: tuple[Network, ...] = ()
    read_only_clients: Mapping[str, tuple[Network, ...]] = field(default_factory=dict)

    def admits(self, host: str | None) -> bool:
        """May a client at ``host`` connect (None: a unix socket, always)?"""
        return host is None or not self.allow or _within(host, self.allow)

    def catalog_for(self, catalog: ExportCatalog, host: str | None) -> ExportCatalog:
        if host is None or not any(self.read_only_clients.values()):
            return catalog
        read_only = {
            volume for volume, networks in self.read_only_clients.items()
            if _within(host, networks)
        }  # fmt: skip
        return ClientCatalog(catalog, frozenset(read_only)) if read_only else catalog


@dataclass(frozen=True)
class ClientCatalog:
    """``catalog`` as one client sees it: ``read_only`` volumes offered read-only."""

    catalog: ExportCatalog
    read_only: frozenset[str]

    def lookup(self, name: str) -> ExportInfo | None:
        found = self.catalog.lookup(name)
        return self._as_seen(found) if found is not None else None

    def exports(self) -> Sequence[ExportInfo]:
        return [self._as_seen(export) for export in self.catalog.exports()]

    @property
    def shutting_down(self) -> bool:
        return self.catalog.shutting_down

    def _as_seen(self, export: ExportInfo) -> ExportInfo:
        if export.name in self.read_only and not export.read_only:
            return dataclasses.replace(export, read_only=True)
        return export


def networks(values: Sequence[str], key: str) -> tuple[Network, ...]:
    """``values`` (addresses or CIDR networks) parsed; ``ConfigError`` names ``key``."""
    found = []
    for value in values:
        try:
            found.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not an IP address or network") from None
    return tuple(found)


def server_context(certificate: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The context NBD clients are upgraded with (TLS 1.2 or later: qemu and libnbd)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certificate), str(key))
        if client_ca is not None:
            context.load_verify_locations(cafile=str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"NBD TLS: cannot load {certificate}, {key}: {exc}") from None
    return context


def _within(host: str, allowed: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allowed)
