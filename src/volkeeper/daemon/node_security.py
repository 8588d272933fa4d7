"""What a node trusts and whom it lets in, built from its config at start.

How this works: ``peer_trust`` gives the replication link its trust (io/peer_trust.py): the
node's identity, made on its first start, or its ``[tls]`` certificate, and the peers' pins;
``log_peer_security`` says at start how each peer's link is protected, loudly for an
insecure or unpinned one.  ``nbd_access`` gives the NBD listener its rules (io/nbd_access.py):
TLS mode and context, the client allow-list, the read-only clients of each volume, and a
warning for an NBD port on a network address without TLS.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from volkeeper.core.addresses import TcpAddress, is_loopback
from volkeeper.core.nbd_handshake import TlsMode
from volkeeper.daemon.config.node import NodeConfig
from volkeeper.io import identity, peer_tls
from volkeeper.io.identity import KnownPeers
from volkeeper.io.nbd_access import NbdAccess, networks, server_context
from volkeeper.io.peer_trust import PeerPolicy, PeerTrust

log = structlog.get_logger("volkeeper.node")


def nbd_access(config: NodeConfig, own: peer_tls.OwnFiles) -> NbdAccess:
    """Who may use the NBD exports, and over TLS how (io/nbd_access.py)."""
    node = config.node
    mode = TlsMode(node.nbd_tls)
    context = None
    if mode is not TlsMode.OFF:
        certificate = node.nbd_tls_certificate or own.certificate
        key = node.nbd_tls_key or own.key
        context = server_context(certificate, key, node.nbd_tls_ca)
    elif isinstance(node.nbd, TcpAddress) and not is_loopback(node.nbd.host):
        log.warning(
            "NBD on a network address without TLS: anyone who reaches it can read and write "
            'the exported volumes (set nbd_tls = "require" and nbd_allow)',
            address=str(node.nbd),
        )
    read_only = {
        volume.name: networks(volume.read_only_clients, f"{volume.name}.read_only_clients")
        for volume in config.volumes
    }
    allow = networks(node.nbd_allow, "node.nbd_allow")
    return NbdAccess(mode, context, allow, read_only)


def policies(config: NodeConfig) -> dict[str, PeerPolicy]:
    return {
        name: PeerPolicy(peer.address, peer.fingerprint, peer.insecure)
        for name, peer in config.peers.items()
    }


def peer_trust(config: NodeConfig) -> PeerTrust:
    """The replication link's trust: the node's identity (made on its first start) or the
    ``[tls]`` certificate of a site CA, and the pins of its peers."""
    state_dir = Path(config.node.state_dir)
    own = None
    if config.tls is None:
        own, made = identity.ensure(state_dir, config.node.name)
        if made:
            log.warning(
                "node identity created: peers must trust its fingerprint",
                fingerprint=own.fingerprint,
                hint=f"on each peer: volkeeper node trust {config.node.name} {own.fingerprint}",
            )
    else:
        problem = peer_tls.check_own_certificate(config.tls, config.node.name)
        if problem is not None:  # peers will likely refuse us; say so now, not on every connect
            log.warning("replication TLS certificate problem", problem=problem)
    known = KnownPeers(state_dir)
    return PeerTrust(config.node.name, policies(config), known, identity=own, site=config.tls)


def log_peer_security(config: NodeConfig, trust: PeerTrust) -> None:
    log.info(
        "replication link: TLS 1.3 with mutual authentication",
        identity=trust.fingerprint,
        certificates="site CA" if config.tls else "node identity",
    )
    for peer in config.peers:
        security = trust.security(peer)
        if security == "insecure":
            log.warning(
                "INSECURE replication link: plain TCP, neither authenticated nor encrypted "
                "(insecure = true): whoever reaches the port can read or overwrite mirrored data",
                peer=peer,
            )
        elif security == "unpinned":
            log.warning(
                "peer not trusted yet: its links are refused until its fingerprint is pinned",
                peer=peer,
                hint=f"volkeeper node trust {peer} FINGERPRINT (node show on {peer} prints it)",
            )
