"""A mirror's compression setting as administrators write it: none, lz4, zlib:N or zstd:N.

How this works: ``parse_compression`` checks the text and returns it normalised (lower case,
no surrounding spaces, the level without leading zeros), so equal settings compare equal
wherever they come from (node config, ``job create``, ``mirror set``). ``none`` and ``lz4``
take no level; ``zlib`` takes a level from 1 to 9 and ``zstd`` one from 1 to 19 (zlib's 0,
which stores without compressing, and zstd's 0 and negative levels are left out). Every
refusal is a ``ValueError`` that lists the allowed forms. Only the setting lives here; the
codecs themselves are io/'s business.
"""

from __future__ import annotations

import json
import re

NO_COMPRESSION = "none"
LEVELS = {"zlib": range(1, 10), "zstd": range(1, 20)}  # algorithm -> its accepted levels
UNLEVELLED = (NO_COMPRESSION, "lz4")

ALLOWED_FORMS = '"none", "lz4", "zlib:1".."zlib:9" or "zstd:1".."zstd:19"'
_LEVEL_RE = re.compile(r"[0-9]{1,4}", re.ASCII)


def parse_compression(text: str) -> str:
    """Return the normalised compression setting ``text`` names; ``ValueError`` if invalid."""
    if not isinstance(text, str):
        raise ValueError(f"expected {ALLOWED_FORMS}, got {_show(text)}")
    setting = text.strip().lower()
    algorithm, colon, level = setting.partition(":")
    if algorithm in UNLEVELLED:
        if colon:
            raise _refusal(text, f"{algorithm} takes no level")
        return algorithm
    levels = LEVELS.get(algorithm)
    if levels is None:
        raise _refusal(text)
    if not colon:
        raise _refusal(text, f"{algorithm} needs a level, like {algorithm}:{levels[0]}")
    if not _LEVEL_RE.fullmatch(level) or int(level) not in levels:
        raise _refusal(text, f"the {algorithm} level must be from {levels[0]} to {levels[-1]}")
    return f"{algorithm}:{int(level)}"


def _refusal(text: str, reason: str = "") -> ValueError:
    detail = f": {reason}" if reason else ""
    return ValueError(f"expected {ALLOWED_FORMS}, got {_show(text)}{detail}")


def _show(value: object) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
