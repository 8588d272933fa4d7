"""One error hierarchy for the whole project.

Every failure a user can see is a ``VolkeeperError``; subclasses say which layer raised it.
``VolumeError`` carries the errno of the failed syscall so the NBD server can map it onto the
wire's error codes without guessing.  A ``Refusal`` is a command the node declines: the
control API answers it with its code's HTTP status and a body of code, message and hint.
"""

from __future__ import annotations

import errno as errno_codes
from typing import ClassVar


class VolkeeperError(Exception):
    """Base of every error volkeeper raises on purpose."""


class ProtocolError(VolkeeperError):
    """A peer (NBD client or replication partner) broke the wire protocol."""


class VolumeError(VolkeeperError):
    """A volume operation failed; ``errno`` is the underlying OS error number."""

    def __init__(self, message: str, errno: int = errno_codes.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class PeerError(VolkeeperError):
    """The replication peer refused us or went away."""


class Refusal(VolkeeperError):
    """A command the node refuses (an API error): ``code`` is stable and names the kind of
    refusal, the message says what is wrong, ``hint`` what to do about it."""

    STATUS: ClassVar[dict[str, int]] = {  # code -> HTTP status of the control API's answer
        "bad_request": 400,
        "not_found": 404,
        "conflict": 409,
        "confirmation_required": 412,
        "unavailable": 503,
    }

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        if code not in self.STATUS:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(message)
        self.code, self.hint = code, hint

    @property
    def http_status(self) -> int:
        return self.STATUS[self.code]


class ConfigError(VolkeeperError):
    """A node configuration is invalid; the message names the key at fault."""
