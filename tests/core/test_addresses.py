"""parse_address / parse_tcp_address: accepted forms, refusals that say what was expected."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core.addresses import (
    TcpAddress,
    UnixAddress,
    is_loopback,
    parse_address,
    parse_tcp_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/volkeeper/alpha.sock", UnixAddress("/run/volkeeper/alpha.sock")),
        ("127.0.0.1:7788", TcpAddress("127.0.0.1", 7788)),
        ("0.0.0.0:1", TcpAddress("0.0.0.0", 1)),
        ("localhost:65535", TcpAddress("localhost", 65535)),
        ("node-1.example.com:7788", TcpAddress("node-1.example.com", 7788)),
        ("[::1]:7788", TcpAddress("::1", 7788)),
        ("[::]:10809", TcpAddress("::", 10809)),
        ("[fe80::1%eth0]:7788", TcpAddress("fe80::1%eth0", 7788)),
    ],
)
def test_parse_address_accepts(text: str, expected: UnixAddress | TcpAddress) -> None:
    assert parse_address(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("7788", "no port"),
        ("alpha", "no port"),
        ("unix:", "must be absolute"),
        ("unix:run/alpha.sock", "must be absolute"),
        ("unix:/" + "a" * 107, "at most 107"),
        ("host:", "port is missing"),
        ("host:0", "from 1 to 65535, not 0"),
        ("host:65536", "from 1 to 65535, not 65536"),
        ("host:123456", "from 1 to 65535"),
        ("host:http", "from 1 to 65535"),
        ("host:-1", "from 1 to 65535"),
        (":7788", "host is missing"),
        ("::1:7788", "needs brackets"),
        ("[::1]", "port is missing"),
        ("[::1]7788", "must follow the closing bracket"),
        ("[1.2.3.4]:80", "brackets are for IPv6"),
        ("[not-v6:]:80", "not a valid IPv6"),
        ("999.1.1.1:80", "not a valid IPv4"),
        ("bad_host:80", "not a valid hostname"),
        ("a b:80", "not a valid hostname"),
        ("-lead.example:80", "not a valid hostname"),
    ],
)
def test_parse_address_refuses_with_form_text_and_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"expected .*:.*") as info:
        parse_address(text)
    message = str(info.value)
    assert f'got "{text}"' in message
    assert reason in message


def test_bare_port_error_names_both_forms() -> None:
    with pytest.raises(ValueError) as info:
        parse_address("7788")
    assert str(info.value) == ('expected "unix:/absolute/path" or "host:port", got "7788": no port')


def test_tcp_parser_refuses_unix_sockets() -> None:
    with pytest.raises(ValueError, match=r'expected "host:port", .*unix socket is not accepted'):
        parse_tcp_address("unix:/run/alpha.sock")
    assert parse_tcp_address("[::1]:1") == TcpAddress("::1", 1)


def test_unix_path_length_limit_is_in_bytes() -> None:
    assert parse_address("unix:/" + "a" * 106) == UnixAddress("/" + "a" * 106)
    with pytest.raises(ValueError, match="108 bytes long"):
        parse_address("unix:/" + "é" * 53 + "a")


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        (lambda: TcpAddress("host", 0), "from 1 to 65535"),
        (lambda: TcpAddress("", 80), "host is missing"),
        (lambda: TcpAddress("::zz", 80), "not a valid IPv6"),
        (lambda: UnixAddress("relative.sock"), "must be absolute"),
        (lambda: UnixAddress("/a\0b"), "NUL"),
    ],
)
def test_invalid_addresses_cannot_be_built(factory: object, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        factory()  # type: ignore[operator]


def test_addresses_are_frozen_and_hashable() -> None:
    address = TcpAddress("::1", 7788)
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.port = 1  # type: ignore[misc]
    assert {address, TcpAddress("::1", 7788)} == {address}


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_HOSTNAMES = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda host: not re.fullmatch(r"[0-9.]+", host))
)
_HOSTS = st.one_of(st.ip_addresses().map(str), _HOSTNAMES)
_TCP = st.builds(TcpAddress, host=_HOSTS, port=st.integers(min_value=1, max_value=65535))
_UNIX = st.builds(UnixAddress, path=st.from_regex(r"/[A-Za-z0-9_./-]{0,100}", fullmatch=True))


@given(st.one_of(_TCP, _UNIX))
def test_str_then_parse_round_trips(address: TcpAddress | UnixAddress) -> None:
    assert parse_address(str(address)) == address
    assert str(parse_address(str(address))) == str(address)


@given(_TCP)
def test_tcp_parser_agrees_with_general_parser(address: TcpAddress) -> None:
    assert parse_tcp_address(str(address)) == parse_address(str(address)) == address


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "gui.example.org"]))
