"""Who a node lets onto its replication port, and whom it agrees to send a volume to.

How this works: the replication link is TLS 1.3 with both ends authenticated, unless a peer is
configured ``insecure = true``.  A node proves who it is with its identity (io/identity.py, or
the ``[tls]`` certificate of a site CA); it recognises a peer by the fingerprint pinned for that
peer's name -- in ``[peers]`` (``fingerprint = ...``, which wins) or by ``volkeeper node trust``
(``known_peers.json``) -- or, with ``[tls]``, by the CA's signature and the node name the
certificate carries (a pinned fingerprint is then checked as well).

* Dialling (``client_context`` + ``check_server``): the handshake presents our certificate;
  the peer's is then held against the pin for the name we dialled.  With no pin, the
  connection is dropped before a byte of ours is sent, and the message quotes the fingerprint
  the peer presented and what to run; a different fingerprint is refused loudly, as SSH refuses
  a changed host key.  An ``insecure`` peer is dialled in plain TCP.
* Accepting (``server_context`` + ``check_source``): OpenSSL checks a client's certificate
  only against certificates it holds, so the server trusts the cached certificates of the
  pinned peers (identity/peers/NAME.pem) plus the site CA; ``check_source`` then binds the
  HELLO's node name to the certificate (the pin of that name, or the CA certificate's DNS
  name).  Plain TCP is admitted only while some peer is ``insecure``, and its HELLO must
  name such a peer: ``insecure`` trusts the network, whoever can reach the port.
* ``fetch_missing`` fills that cache: it dials each pinned peer whose certificate it lacks,
  keeps what the peer presents if it matches the pin, and rebuilds the server context.  The
  daemon runs it at start, when a client's handshake fails, and when the pins change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from volkeeper.core import fingerprints
from volkeeper.core.addresses import TcpAddress
from volkeeper.errors import ConfigError, PeerError
from volkeeper.io import peer_tls
from volkeeper.io.identity import Identity, KnownPeers

log = structlog.get_logger("volkeeper.trust")

FETCH_TIMEOUT = 5.0


@dataclass(frozen=True)
class PeerPolicy:
    """One ``[peers]`` entry: where it is, the pinned fingerprint, and whether it is insecure."""

    address: TcpAddress
    fingerprint: str | None = None
    insecure: bool = False


def link_security(insecure: bool, pin: str | None, site_ca: bool) -> str:
    """How a link to a peer is protected: insecure (plain TCP), pinned (its fingerprint),
    ca (the site CA vouches) or unpinned (refused until it is trusted)."""
    if insecure:
        return "insecure"
    if pin is not None:
        return "pinned"
    return "ca" if site_ca else "unpinned"


class Link(Protocol):
    """What ``check_source`` needs of an accepted link (io/peer_link.py ``PeerLink``)."""

    def certificate_der(self) -> bytes | None: ...
    def certificate_names(self) -> list[str] | None: ...
    @property
    def remote_host(self) -> str: ...


class PeerTrust:
    def __init__(
        self,
        node: str,
        peers: Mapping[str, PeerPolicy],
        known: KnownPeers,
        identity: Identity | None = None,
        site: peer_tls.TlsFiles | None = None,
    ) -> None:
        own: peer_tls.OwnFiles | None = site if site is not None else identity
        if own is None:
            raise ValueError("a node needs an identity or a site CA certificate")
        self.node = node
        self.peers = dict(peers)
        self.known = known
        self.site = site
        self.fingerprint = peer_tls.fingerprint_of(own.certificate)
        self.own = own  # this node's certificate and key (the control API on TCP serves it)
        self._client = peer_tls.pinning_client_context(own)
        self._site_client = peer_tls.client_context(site) if site else None
        self._server: ssl.SSLContext | None = None
        self._server_trusts: frozenset[tuple[str, str]] = frozenset()
        self._bad_pins = ""  # the last complaint about known_peers.json

    # -- what the configuration says ---------------------------------------------------------

    def pin(self, peer: str) -> str | None:
        policy = self.peers.get(peer)
        if policy is not None and policy.fingerprint is not None:
            return policy.fingerprint
        return self._known_pins().get(peer)

    def _known_pins(self) -> dict[str, str]:
        """``known_peers.json``; a file that does not parse pins nobody (said once a change)."""
        try:
            pins = self.known.pins()
        except ConfigError as exc:
            if str(exc) != self._bad_pins:
                log.error("known peers unreadable: no peer is trusted through it", error=str(exc))
                self._bad_pins = str(exc)
            return {}
        self._bad_pins = ""
        return pins

    def insecure(self, peer: str) -> bool:
        policy = self.peers.get(peer)
        return policy is not None and policy.insecure

    def security(self, peer: str) -> str:
        return link_security(self.insecure(peer), self.pin(peer), self.site is not None)

    # -- dialling -----------------------------------------------------------------------------

    def client_context(self, peer: str) -> ssl.SSLContext | None:
        """The context to dial ``peer`` with; None means plain TCP (an insecure peer)."""
        security = self.security(peer)
        if security == "insecure":
            return None
        # "ca": the CA vouches, and the certificate must name the peer; else the pin vouches,
        # checked by check_server
        return self._site_client if security == "ca" else self._client

    def check_server(self, peer: str, der: bytes | None) -> None:
        """Raise ``PeerError`` unless the certificate ``peer`` presented is the pinned one."""
        if self.security(peer) in ("insecure", "ca"):
            return
        presented = fingerprints.of(der) if der else "no certificate"
        pinned = self.pin(peer)
        if pinned is None:
            raise PeerError(
                f"peer {peer} is not trusted yet: it presents {presented}. If that is what "
                f"`volkeeper node show` prints on {peer}, run `volkeeper node trust {peer} "
                f"{presented}` here (or set fingerprint in [peers])"
            )
        if presented != pinned:
            raise PeerError(
                f"REFUSED: the identity of peer {peer} has changed. It presents {presented}, "
                f"but {pinned} is pinned for it. Someone may be impersonating {peer}, or its "
                f"identity was re-created: check `volkeeper node show` on {peer} and, if it "
                f"matches, run `volkeeper node trust {peer} FINGERPRINT` here"
            )

    # -- accepting ----------------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """Our certificate; trusting the site CA and every pinned peer's cached certificate."""
        cached = {
            (peer, fingerprint): pem
            for peer, fingerprint in self._pins().items()
            if (pem := self.known.certificate(peer, fingerprint)) is not None
        }
        trusts = frozenset(cached)
        if self._server is None or trusts != self._server_trusts:
            context = peer_tls.accepting_context(self.own, self.site)
            for pem in cached.values():
                context.load_verify_locations(cadata=pem.decode())
            self._server, self._server_trusts = context, trusts
        return self._server

    def plaintext_allowed(self) -> bool:
        """May a plain TCP connection be accepted?  Only while some peer is insecure (its
        HELLO must then name such a peer: ``check_source``).  ``insecure`` trusts the network,
        so the address it comes from proves nothing and is not checked (proxies, NAT)."""
        return any(policy.insecure for policy in self.peers.values())

    def check_source(self, node: str, link: Link) -> str | None:
        """Why a HELLO naming ``node`` must be refused on ``link``; None if it may proceed."""
        der = link.certificate_der()
        if der is None:
            if self.insecure(node):
                return None
            return (
                f"plain TCP from {link.remote_host} claiming to be {node} refused: only a peer "
                "configured insecure = true may connect without TLS"
            )
        presented, pinned = fingerprints.of(der), self.pin(node)
        if pinned is not None:
            if presented == pinned:
                return None
            return f"the certificate presented ({presented}) is not the one pinned for {node}"
        if self.site is None:
            return f"{node} is not a trusted peer of {self.node} (it presented {presented})"
        names = link.certificate_names() or []
        if node in names:  # the site CA vouches for the name
            return None
        shown = ", ".join(names) or "no DNS name"
        return f"the TLS certificate names {shown}, not the source node {node!r}"

    # -- the certificate cache ----------------------------------------------------------------

    def _pins(self) -> dict[str, str]:
        pins = {peer: pin for peer in self.peers if (pin := self.pin(peer)) is not None}
        return {peer: pin for peer, pin in pins.items() if not self.insecure(peer)}

    def missing(self) -> dict[str, str]:
        """Pinned peers whose certificate is not cached yet."""
        return {
            peer: pin
            for peer, pin in self._pins().items()
            if self.known.certificate(peer, pin) is None
        }

    async def fetch_missing(self) -> list[str]:
        """Fetch what ``missing`` lists; returns the peers whose certificate is now cached."""
        got = []
        for peer, pin in self.missing().items():
            try:
                der = await fetch_certificate(self.peers[peer].address, self._client, peer)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                log.info("peer certificate not fetched", peer=peer, why=peer_tls.describe(exc))
                continue
            presented = fingerprints.of(der)
            if presented != pin:
                log.error(
                    "peer certificate does not match its pin: not trusted",
                    peer=peer, presented=presented, pinned=pin,
                )  # fmt: skip
                continue
            self.known.keep_certificate(peer, der)
            log.info("peer certificate fetched", peer=peer, fingerprint=presented)
            got.append(peer)
        return got  # the next server_context() trusts them


async def fetch_certificate(address: TcpAddress, context: ssl.SSLContext, peer: str) -> bytes:
    """The certificate the node at ``address`` presents (its handshake is all we do)."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port, ssl=context, server_hostname=peer),
        FETCH_TIMEOUT,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            raise ssl.SSLError("the peer presented no certificate")
        return bytes(der)
    finally:
        writer.close()
        # the peer may refuse us (it does not know us yet): that is fine here
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
