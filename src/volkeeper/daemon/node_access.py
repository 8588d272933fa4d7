"""What ``volkeeper node`` and ``volkeeper token`` do, from the node's config file alone.

How this works: each function takes the node's loaded config and works on its state directory
directly (io/identity.py, io/control_tokens.py), whether or not the daemon runs; a running
daemon notices a changed ``known_peers.json`` or ``tokens.json`` by itself.  ``init`` makes the
identity if there is none; ``describe`` says how each peer's link is protected; ``trust`` and
``forget`` pin and unpin a peer, refusing what the config decides (a fingerprint in
``[peers]`` wins, an ``insecure`` peer takes no pin).  ``create_token`` returns the new token
(shown once), ``tokens`` lists names and roles (the tokens themselves are not kept),
``revoke_token`` removes one.  Every refusal is a ``ConfigError`` that says what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from volkeeper.core import fingerprints
from volkeeper.daemon.config.node import NodeConfig, PeerConfig
from volkeeper.errors import ConfigError
from volkeeper.io import identity, peer_tls
from volkeeper.io.control_tokens import TokenStore
from volkeeper.io.identity import KnownPeers
from volkeeper.io.peer_trust import link_security


def init(node: NodeConfig) -> tuple[str, bool]:
    """This node's fingerprint, and whether its identity was made now (a ``[tls]``
    certificate, if configured, is the identity)."""
    if node.tls is not None:
        return peer_tls.fingerprint_of(node.tls.certificate), False
    own, made = identity.ensure(Path(node.node.state_dir), node.node.name)
    return own.fingerprint, made


def describe(node: NodeConfig) -> dict[str, Any]:
    """This node's fingerprint (None: no identity yet) and each peer's protection and pin."""
    state_dir = Path(node.node.state_dir)
    if node.tls is not None:
        own: str | None = peer_tls.fingerprint_of(node.tls.certificate)
    else:
        loaded = identity.load(state_dir)
        own = loaded.fingerprint if loaded else None
    pins = KnownPeers(state_dir).pins()
    peers = []
    for name, peer in node.peers.items():
        pin = peer.fingerprint or pins.get(name)
        security = link_security(peer.insecure, pin, node.tls is not None)
        peers.append(
            {"name": name, "address": str(peer.address), "security": security, "fingerprint": pin}
        )
    return {"node": node.node.name, "fingerprint": own, "peers": peers}


def trust(node: NodeConfig, source: str, name: str, fingerprint: str) -> tuple[str, str | None]:
    """Pin peer ``name``; returns the canonical pin and the one it replaced, if any."""
    peer = _peer(node, name, source)
    try:
        pinned = fingerprints.parse(fingerprint)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if peer.insecure:
        raise ConfigError(f"{name} is insecure = true in {source}: remove that to use a pin")
    if peer.fingerprint is not None:
        raise ConfigError(f"{source} pins {name} to {peer.fingerprint} in [peers]; change it there")
    return pinned, KnownPeers(Path(node.node.state_dir)).trust(name, pinned)


def forget(node: NodeConfig, name: str) -> None:
    if not KnownPeers(Path(node.node.state_dir)).forget(name):
        raise ConfigError(f"{name} is not pinned by volkeeper node trust on {node.node.name}")


def _peer(node: NodeConfig, name: str, source: str) -> PeerConfig:
    peer = node.peers.get(name)
    if peer is None:
        known = ", ".join(node.peers) or "none"
        raise ConfigError(f"{name} is not in [peers] of {source} (peers: {known})")
    return peer


def create_token(node: NodeConfig, name: str, role: str, token: str | None = None) -> str:
    return TokenStore(Path(node.node.state_dir)).create(name, role, token)


def tokens(node: NodeConfig) -> list[dict[str, str]]:
    found = TokenStore(Path(node.node.state_dir)).tokens()
    return [{"name": name, "role": entry["role"]} for name, entry in found.items()]


def revoke_token(node: NodeConfig, name: str) -> None:
    TokenStore(Path(node.node.state_dir)).revoke(name)
