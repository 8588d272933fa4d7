"""HTTP client for a node's control API, over a unix socket or TCP.

How this works: the CLI resolves which node to talk to (``--node``, ``VOLKEEPER_NODE`` or the
``control`` address of ``--config``), then ``ControlClient.get`` returns decoded JSON or raises
``CliError`` with one line a person can act on.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from volkeeper.client.credentials import (
    AccessError,
    Target,
    headers,
    parse_target,
    tls_context,
    token_from_environment,
)
from volkeeper.core.addresses import UnixAddress
from volkeeper.daemon import node_access
from volkeeper.daemon.config.node import load_config
from volkeeper.errors import VolkeeperError


class CliError(VolkeeperError):
    """A CLI command failed; the message is printed as the one-line reason."""


def resolve_node(node: str | None, config: str | None) -> Target:
    text = node or os.environ.get("VOLKEEPER_NODE")
    if text:
        try:
            return parse_target(text)
        except ValueError as exc:
            raise CliError(f"bad node address {text!r}: {exc}") from exc
    if config:
        return _own_node(config)
    raise CliError("which node? give --node ADDR, set VOLKEEPER_NODE, or give --config FILE")


def _own_node(config: str) -> Target:
    """The control address of the node whose config this is; on TCP, pinned to its own
    certificate (this is that node's machine: it can read it)."""
    node = load_config(config)
    address = node.node.control
    if isinstance(address, UnixAddress):
        return Target(address)
    return Target(address, node_access.describe(node)["fingerprint"])


def http_client(target: Target, timeout: float) -> httpx.Client:
    """A client of the node's API: a unix socket, or TLS to its pinned certificate with the
    token of VOLKEEPER_TOKEN (client/credentials.py)."""
    if isinstance(target.address, UnixAddress):
        transport = httpx.HTTPTransport(uds=target.address.path)
        return httpx.Client(transport=transport, base_url="http://node", timeout=timeout)
    try:
        verify = tls_context(target, timeout)
    except AccessError as exc:
        raise CliError(str(exc)) from None
    return httpx.Client(
        base_url=f"https://{target.address}", verify=verify,
        headers=headers(token_from_environment()), timeout=timeout,
    )  # fmt: skip


class ControlClient:
    def __init__(self, target: Target, timeout: float = 10.0) -> None:
        self.address = target.address
        self._client = http_client(target, timeout)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the node at {self.address}: {exc}") from exc
        if response.status_code >= 400:
            raise CliError(_api_error(response))
        return response.json() if response.content else None

    def text(self, path: str) -> str:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the node at {self.address}: {exc}") from exc
        response.raise_for_status()
        return response.text


def _api_error(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"node answered HTTP {response.status_code}"
    hint = f" ({error['hint']})" if error.get("hint") else ""
    return f"{error['message']}{hint}"
