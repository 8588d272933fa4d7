"""How a client reaches a node's control API on TCP: TLS to a pinned certificate, a token.

How this works: a TCP control API serves TLS with the node's own certificate (its identity, or
its ``[tls]`` one) and wants ``Authorization: Bearer TOKEN``.  A client names the node as
``host:port#sha256:...`` -- the fingerprint ``volkeeper node show`` prints there -- and takes
its token from ``VOLKEEPER_TOKEN`` (never from the command line, where ``ps`` would show it).
``tls_context`` dials the node once, before any token is sent, takes the certificate it
presents, checks its fingerprint, and returns a context that trusts exactly that certificate,
so every later connection is verified by OpenSSL against it.  Without a fingerprint, a
``VOLKEEPER_CA`` file verifies the node as an ordinary TLS server; with neither, nothing is
sent and the error says what to give.  A unix socket needs none of this: its file mode decides.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass

from volkeeper.core import fingerprints
from volkeeper.core.addresses import TcpAddress, UnixAddress, parse_address
from volkeeper.errors import VolkeeperError

TOKEN_VARIABLE = "VOLKEEPER_TOKEN"
CA_VARIABLE = "VOLKEEPER_CA"


class AccessError(VolkeeperError):
    """The node cannot be reached safely: the message says what to give or check."""


@dataclass(frozen=True)
class Target:
    """A node's control address, with the fingerprint its certificate is pinned to."""

    address: UnixAddress | TcpAddress
    fingerprint: str | None = None

    @property
    def tcp(self) -> bool:
        return isinstance(self.address, TcpAddress)


def parse_target(text: str) -> Target:
    """``unix:/path``, ``host:port`` or ``host:port#sha256:...`` (``ValueError`` if bad)."""
    where, _, pin = text.partition("#")
    address = parse_address(where)
    if not pin:
        return Target(address)
    if isinstance(address, UnixAddress):
        raise ValueError("a unix socket takes no fingerprint (its file mode decides access)")
    return Target(address, fingerprints.parse(pin))


def token_from_environment() -> str | None:
    return os.environ.get(TOKEN_VARIABLE) or None


def headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def tls_context(target: Target, timeout: float = 5.0) -> ssl.SSLContext:
    """A context that verifies the node at ``target`` (see above); blocks up to ``timeout``."""
    assert isinstance(target.address, TcpAddress)
    if target.fingerprint is None:
        ca = os.environ.get(CA_VARIABLE)
        if not ca:
            raise AccessError(
                f"{target.address} is a TCP control API (TLS): give its fingerprint as "
                f"{target.address}#sha256:... (volkeeper node show prints it on that node), "
                f"or a CA file in {CA_VARIABLE}"
            )
        return ssl.create_default_context(cafile=ca)
    der = _presented(target.address, timeout)
    presented = fingerprints.of(der)
    if presented != target.fingerprint:
        raise AccessError(
            f"REFUSED: the node at {target.address} presents {presented}, not the pinned "
            f"{target.fingerprint}: nothing was sent (check volkeeper node show on it)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin names the certificate; its name does not matter
    context.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(der))
    return context


def _presented(address: TcpAddress, timeout: float) -> bytes:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((address.host, address.port), timeout=timeout) as raw,
            probe.wrap_socket(raw, server_hostname=address.host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise AccessError(f"cannot reach the node at {address} over TLS: {exc}") from exc
    if not der:
        raise AccessError(f"the node at {address} presented no certificate")
    return der
