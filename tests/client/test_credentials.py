"""Control targets as people write them, and the pin checked before anything is sent."""

from __future__ import annotations

import pytest

from volkeeper.client.credentials import AccessError, Target, headers, parse_target, tls_context
from volkeeper.core.addresses import TcpAddress, UnixAddress

PIN = "sha256:" + "ab" * 32


def test_targets_parse_with_and_without_a_pin() -> None:
    assert parse_target("unix:/run/a.sock") == Target(UnixAddress("/run/a.sock"))
    assert parse_target("10.0.0.1:7789") == Target(TcpAddress("10.0.0.1", 7789))
    pinned = parse_target(f"10.0.0.1:7789#{PIN.upper()}")
    assert pinned == Target(TcpAddress("10.0.0.1", 7789), PIN) and pinned.tcp
    with pytest.raises(ValueError, match="a unix socket takes no fingerprint"):
        parse_target(f"unix:/run/a.sock#{PIN}")
    with pytest.raises(ValueError, match="a fingerprint is"):
        parse_target("10.0.0.1:7789#md5:00")


def test_a_token_goes_in_a_bearer_header_and_nowhere_else() -> None:
    assert headers("vk_abc") == {"Authorization": "Bearer vk_abc"}
    assert headers(None) == {}


def test_without_a_pin_or_a_ca_nothing_is_dialled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLKEEPER_CA", raising=False)
    with pytest.raises(AccessError, match=r"give its fingerprint as 127.0.0.1:1#sha256:"):
        tls_context(Target(TcpAddress("127.0.0.1", 1)))
    with pytest.raises(AccessError, match=r"cannot reach the node at 127.0.0.1:1 over TLS"):
        tls_context(Target(TcpAddress("127.0.0.1", 1), PIN), timeout=1)
