"""Fingerprints as people paste them: canonical form, colons, case, and what is refused."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core import fingerprints

DIGEST = hashlib.sha256(b"certificate").hexdigest()


def test_of_is_sha256_of_the_der_bytes() -> None:
    assert fingerprints.of(b"certificate") == "sha256:" + DIGEST


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + DIGEST,
        "SHA256:" + DIGEST.upper(),
        "  sha256:" + DIGEST + "\n",
        "sha256:" + ":".join(DIGEST[i : i + 2] for i in range(0, 64, 2)).upper(),  # openssl's
    ],
)
def test_parse_accepts_what_people_paste(text: str) -> None:
    assert fingerprints.parse(text) == "sha256:" + DIGEST


@pytest.mark.parametrize(
    "text",
    ["", DIGEST, "md5:" + DIGEST[:32], "sha256:" + DIGEST[:-1], "sha256:" + DIGEST + "0",
     "sha256:" + "g" * 64, "sha256:"],
)  # fmt: skip
def test_parse_refuses_anything_else_and_says_what_it_wants(text: str) -> None:
    with pytest.raises(ValueError, match=r'a fingerprint is "sha256:" and 64 hex digits'):
        fingerprints.parse(text)


@given(st.binary())
def test_every_fingerprint_parses_back_to_itself(der: bytes) -> None:
    made = fingerprints.of(der)
    assert fingerprints.parse(made) == made
    assert fingerprints.short(made) == made[:19] and made.startswith(fingerprints.short(made))
