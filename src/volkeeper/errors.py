"""One error hierarchy for the whole project.

Every failure a user can see is a ``VolkeeperError``; subclasses say which
layer raised it.  ``VolumeError`` carries the errno of the failed syscall so the
NBD server can map it onto the wire's error codes without guessing.
"""

from __future__ import annotations

import errno as errno_codes


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


class ConfigError(VolkeeperError):
    """A node configuration is invalid; the message names the key at fault."""
