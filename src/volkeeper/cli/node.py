"""``volkeeper node``: this node's identity and the peers it trusts, like SSH host keys.

How this works: these commands read the node's config file (``--config``) and hand it to
daemon/node_access.py, which works on the state directory directly, whether or not the
daemon runs: ``init`` makes the node's key and certificate and prints the fingerprint the
other nodes must trust; ``show`` prints it again with each peer's pin; ``trust NAME
FINGERPRINT`` pins a peer (the daemon reads it when it changes) and ``forget NAME`` unpins one.
A fingerprint written in ``[peers]`` wins over ``trust`` and cannot be changed from here.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from volkeeper.daemon import node_access
from volkeeper.daemon.config.node import load_config

node_app = typer.Typer(no_args_is_help=True, help="This node's identity and trusted peers.")

RequiredConfig = Annotated[str, typer.Option("--config", help="the node's config file (TOML)")]
_SHOWN = {"insecure": "[bold red]INSECURE (plain TCP)[/]", "unpinned": "[yellow]not trusted[/]"}
Json = Annotated[bool, typer.Option("--json", help="print JSON")]


@node_app.command("init")
def init(config: RequiredConfig, as_json: Json = False) -> None:
    """Create this node's identity (key and self-signed certificate) and print its
    fingerprint; an existing identity is kept and shown."""
    node = load_config(config)
    fingerprint, made = node_access.init(node)
    if as_json:
        print(json.dumps({"node": node.node.name, "fingerprint": fingerprint, "created": made}))
        return
    what = "created" if made else "exists"
    print(f"identity of {node.node.name} {what}: {fingerprint}")
    print(f"on each peer, run:  volkeeper node trust {node.node.name} {fingerprint}")


@node_app.command("show")
def show(config: RequiredConfig, as_json: Json = False) -> None:
    """Print this node's fingerprint and how each peer is trusted."""
    document = node_access.describe(load_config(config))
    if as_json:
        print(json.dumps(document, indent=2))
        return
    print(f"node {document['node']}: {document['fingerprint'] or 'no identity yet (node init)'}")
    table = Table("peer", "address", "link", "pinned fingerprint", box=None)
    for peer in document["peers"]:
        link = _SHOWN.get(peer["security"], peer["security"])
        table.add_row(peer["name"], peer["address"], link, peer["fingerprint"] or "")
    Console().print(table)


@node_app.command("trust")
def trust(
    name: Annotated[str, typer.Argument(help="the peer's node name, as in [peers]")],
    fingerprint: Annotated[str, typer.Argument(help="sha256:... as `node show` prints it there")],
    config: RequiredConfig,
) -> None:
    """Pin peer NAME's identity: only the node holding that key can mirror with this one."""
    pinned, replaced = node_access.trust(load_config(config), config, name, fingerprint)
    print(f"{name} trusted: {pinned}" + (f" (replaces {replaced})" if replaced else ""))


@node_app.command("forget")
def forget(
    name: Annotated[str, typer.Argument(help="the peer's node name")], config: RequiredConfig
) -> None:
    """Unpin peer NAME: its links are refused until it is trusted again."""
    node_access.forget(load_config(config), name)
    print(f"{name} forgotten: its links are refused until it is trusted again")


token_app = typer.Typer(no_args_is_help=True, help="Tokens for the control API on TCP.")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="a name for the token (letters, digits, - _)")],
    config: RequiredConfig,
    role: Annotated[str, typer.Option("--role", help="read (GET only) or admin")] = "read",
    stdin: Annotated[
        bool, typer.Option("--stdin", help="install the token read from stdin (one for many nodes)")
    ] = False,
) -> None:
    """Make a token and print it, once: only its hash is kept."""
    given = sys.stdin.readline().strip() if stdin else None
    token = node_access.create_token(load_config(config), name, role, given)
    if not stdin:
        print(token)


@token_app.command("list")
def token_list(config: RequiredConfig, as_json: Json = False) -> None:
    """The tokens' names and roles (the tokens themselves are not kept)."""
    found = node_access.tokens(load_config(config))
    if as_json:
        print(json.dumps(found))
        return
    for entry in found:
        print(f"{entry['name']}\t{entry['role']}")


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="the token's name")], config: RequiredConfig
) -> None:
    """Revoke a token: requests bearing it are refused from now on."""
    node_access.revoke_token(load_config(config), name)
    print(f"token {name} revoked")
