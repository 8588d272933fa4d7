"""Node identity fingerprints: ``sha256:`` and the hex SHA-256 of a DER certificate.

How this works: a node's identity is its TLS certificate; what an administrator compares and
pins (``volkeeper node trust``, ``[peers] beta = { fingerprint = ... }``) is the SHA-256 of
that certificate's DER bytes, written ``sha256:`` and 64 lowercase hex digits.  ``of`` makes
one; ``parse`` accepts what people paste -- upper or lower case, with or without the colons
``openssl x509 -fingerprint`` puts between bytes, with the prefix in any case -- and returns
the canonical form, or raises ``ValueError`` saying what it expected.  ``short`` is the
12-digit form that fits a status table.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "sha256:"
_HEX_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_FORM = '"sha256:" and 64 hex digits (volkeeper node show prints it)'


def of(certificate_der: bytes) -> str:
    """The fingerprint of a DER-encoded certificate."""
    return PREFIX + hashlib.sha256(certificate_der).hexdigest()


def parse(text: str) -> str:
    """``text`` as a canonical fingerprint; ``ValueError`` names the form expected."""
    value = text.strip().lower()
    if not value.startswith(PREFIX):
        raise ValueError(f"a fingerprint is {_FORM}, got {text!r}")
    digits = value[len(PREFIX) :].replace(":", "")
    if not _HEX_RE.fullmatch(digits):
        raise ValueError(f"a fingerprint is {_FORM}, got {text!r}")
    return PREFIX + digits


def short(fingerprint: str) -> str:
    """``sha256:`` and the first 12 hex digits, for tables."""
    return fingerprint[: len(PREFIX) + 12]
