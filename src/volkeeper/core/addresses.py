"""Listener and peer addresses: ``unix:/abs/path``, ``host:port`` and ``[ipv6]:port``.

How this works: ``parse_address`` splits the text into a ``UnixAddress`` or a ``TcpAddress`` and
``str()`` gives the same text back (IPv6 hosts regain their brackets). Both dataclasses check
their fields on construction, so an invalid address cannot exist, whether parsed or built in
code; the parser reports problems as ``ValueError`` naming the form it expected and the text
it got.

Port 0 is refused. Every address here is one that something else must reach (a peer, the CLI, an
NBD client), and an ephemeral port chosen by the kernel at bind time cannot be written into
anyone else's configuration. Tests that need free ports pick them before writing the config.
A unix socket path must be absolute and fit ``sockaddr_un.sun_path`` (107 bytes on Linux).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import NoReturn

_UNIX_PREFIX = "unix:"
_UNIX_PATH_MAX = 107
_HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_IPV4_LIKE_RE = re.compile(r"[0-9.]+", re.ASCII)
_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_BRACKETED_RE = re.compile(r"\[([^\]]*)\](?::(.*))?", re.DOTALL)

_ANY_FORM = '"unix:/absolute/path" or "host:port"'
_UNIX_FORM = '"unix:/absolute/path"'
_TCP_FORM = '"host:port"'
_IPV6_FORM = '"[ipv6]:port"'


@dataclass(frozen=True)
class UnixAddress:
    """A unix-domain socket, written ``unix:/abs/path``."""

    path: str

    def __post_init__(self) -> None:
        problem = _unix_path_problem(self.path)
        if problem:
            raise ValueError(f"invalid unix socket path {_quote(self.path)}: {problem}")

    def __str__(self) -> str:
        return _UNIX_PREFIX + self.path


@dataclass(frozen=True)
class TcpAddress:
    """A TCP endpoint, written ``host:port``, or ``[host]:port`` when the host is IPv6."""

    host: str
    port: int

    def __post_init__(self) -> None:
        problem = _host_problem(self.host) or _port_problem(self.port)
        if problem:
            raise ValueError(f"invalid TCP address {_quote(self.host)} port {self.port}: {problem}")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> UnixAddress | TcpAddress:
    """Parse ``unix:/abs/path``, ``host:port`` or ``[ipv6]:port``."""
    if text.startswith(_UNIX_PREFIX):
        path = text[len(_UNIX_PREFIX) :]
        _refuse(text, _UNIX_FORM, _unix_path_problem(path))
        return UnixAddress(path)
    if ":" not in text:
        _fail(text, _ANY_FORM, "no port" if text else "empty")
    return parse_tcp_address(text)


def parse_tcp_address(text: str) -> TcpAddress:
    """Parse ``host:port`` or ``[ipv6]:port``; unix sockets are refused."""
    if text.startswith(_UNIX_PREFIX):
        _fail(text, _TCP_FORM, "a unix socket is not accepted here")
    host, port = _split_host_port(text)
    _refuse(text, _TCP_FORM, _port_text_problem(port) or _host_problem(host))
    return TcpAddress(host, int(port))


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        match = _BRACKETED_RE.fullmatch(text)
        if match is None:
            _fail(text, _IPV6_FORM, "the port must follow the closing bracket")
        _refuse(text, _IPV6_FORM, None if ":" in match[1] else "brackets are for IPv6 addresses")
        return match[1], match[2] or ""
    host, sep, port = text.rpartition(":")
    if not sep:
        _fail(text, _TCP_FORM, "no port" if text else "empty")
    if ":" in host:
        _fail(text, _IPV6_FORM, "an IPv6 address needs brackets, as in [::1]:7788")
    return host, port


def _refuse(text: str, form: str, problem: str | None) -> None:
    if problem:
        _fail(text, form, problem)


def _fail(text: str, form: str, problem: str) -> NoReturn:
    raise ValueError(f"expected {form}, got {_quote(text)}: {problem}")


def _unix_path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "the socket path must be absolute"
    if "\0" in path:
        return "the socket path contains a NUL character"
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > _UNIX_PATH_MAX:
        return f"the socket path is {size} bytes long, at most {_UNIX_PATH_MAX} fit"
    return None


def _host_problem(host: str) -> str | None:
    if not host:
        return "the host is missing (use 0.0.0.0 or [::] to listen on every interface)"
    if ":" in host:
        return None if _is_ip(host, version=6) else f"{host} is not a valid IPv6 address"
    if _IPV4_LIKE_RE.fullmatch(host):
        return None if _is_ip(host, version=4) else f"{host} is not a valid IPv4 address"
    labels = host.split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL_RE.fullmatch(label) for label in labels):
        return f"{host} is not a valid hostname"
    return None


def _port_text_problem(port: str) -> str | None:
    if not _PORT_RE.fullmatch(port):
        return "the port must be a number from 1 to 65535" if port else "the port is missing"
    return _port_problem(int(port))


def _port_problem(port: int) -> str | None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return f"the port must be a number from 1 to 65535, not {port}"
    return None


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def is_loopback(host: str) -> bool:
    """Is ``host`` (an address, bracketed or not, or ``localhost``) this machine's loopback?
    Any other name is not known to be."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
