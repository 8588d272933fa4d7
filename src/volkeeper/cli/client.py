"""HTTP client for a node's control API, over a unix socket or TCP.

How this works: the CLI resolves which node to talk to (``--node``, ``VOLKEEPER_NODE`` or the
``control`` address of ``--config``), then ``ControlClient.get`` returns decoded JSON or raises
``CliError`` with one line a person can act on.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from volkeeper.core.addresses import TcpAddress, UnixAddress, parse_address
from volkeeper.daemon.config.node import load_config
from volkeeper.errors import VolkeeperError


class CliError(VolkeeperError):
    """A CLI command failed; the message is printed as the one-line reason."""


def resolve_node(node: str | None, config: str | None) -> UnixAddress | TcpAddress:
    text = node or os.environ.get("VOLKEEPER_NODE")
    if text:
        try:
            return parse_address(text)
        except ValueError as exc:
            raise CliError(f"bad node address {text!r}: {exc}") from exc
    if config:
        return load_config(config).node.control
    raise CliError("which node? give --node ADDR, set VOLKEEPER_NODE, or give --config FILE")


class ControlClient:
    def __init__(self, address: UnixAddress | TcpAddress, timeout: float = 10.0) -> None:
        self.address = address
        if isinstance(address, UnixAddress):
            transport = httpx.HTTPTransport(uds=address.path)
            self._client = httpx.Client(
                transport=transport, base_url="http://node", timeout=timeout
            )
        else:
            base = f"http://{address}"
            self._client = httpx.Client(base_url=base, timeout=timeout)

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
