"""NBD wire format: magic numbers, codes, and the fixed-size structs of the protocol.

How this works: every fixed-size record of NetworkBlockDevice/nbd doc/proto.md that volkeeper
sends or parses is one ``struct.Struct`` below, with its layout written beside it (all integers
are big-endian, network byte order).  Enumerations are ``IntEnum``/``IntFlag`` so that logs and
tests print names instead of numbers.  Nothing here keeps state; the handshake and
transmission state machines live in ``nbd_handshake`` and ``nbd_transmission``.
"""

from __future__ import annotations

import enum
import errno
import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the magic of every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

MAX_OPTION_DATA = 64 * 1024  # larger option payloads are not honest clients: disconnect
MAX_STRING = 4096  # the spec's limit on names and descriptions
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 32 * 1024 * 1024  # largest READ/WRITE payload volkeeper accepts


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Errno(enum.IntEnum):
    """Error codes on the wire; they equal Linux errno values, but the protocol fixes them."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


COMMAND_NAMES: dict[int, str] = {  # in logs and metrics
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.WRITE_ZEROES: "zero",
    Command.CACHE: "cache",
}
_ERRNO_ON_THE_WIRE = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def wire_errno(code: int) -> Errno:
    """Map an OS errno onto the few codes NBD defines; EINVAL for everything else."""
    return _ERRNO_ON_THE_WIRE.get(code, Errno.EINVAL)


# Server greeting: u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags.
GREETING = struct.Struct(">QQH")
# Client flags, sent once after the greeting: u32.
CLIENT_FLAGS = struct.Struct(">I")
# Option request header: u64 IHAVEOPT, u32 option, u32 data length; data follows.
OPTION_HEADER = struct.Struct(">QII")
# Option reply header: u64 OPTION_REPLY_MAGIC, u32 option, u32 reply type, u32 data length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME reply: u64 export size, u16 transmission flags (+124 zero bytes
# unless both sides agreed on NO_ZEROES).
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = bytes(124)
# NBD_INFO_EXPORT: u16 info type, u64 size, u16 transmission flags.
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: u16 info type, u32 minimum, u32 preferred, u32 maximum.
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# Leading u16 info type of NBD_INFO_NAME / NBD_INFO_DESCRIPTION (a string follows).
INFO_TYPE = struct.Struct(">H")
# u32 length prefix of strings inside option data (export names in GO/INFO, LIST replies).
U32 = struct.Struct(">I")
# u16 count / item inside option data (the info requests of GO/INFO).
U16 = struct.Struct(">H")
# Transmission request: u32 REQUEST_MAGIC, u16 command flags, u16 command, u64 cookie,
# u64 offset, u32 length; a WRITE carries ``length`` bytes of payload after it.
REQUEST = struct.Struct(">IHHQQI")
# Simple reply: u32 SIMPLE_REPLY_MAGIC, u32 error, u64 cookie; a successful READ is
# followed by its data.
SIMPLE_REPLY = struct.Struct(">IIQ")
