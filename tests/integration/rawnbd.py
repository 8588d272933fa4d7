"""A small raw-socket NBD client for tests, written from NetworkBlockDevice/nbd doc/proto.md.

How this works: ``RawNbd`` wraps one blocking socket (unix path or TCP ``(host, port)``) and
knows nothing of volkeeper: every record is packed here with ``struct`` from the layouts below,
so a bug in volkeeper's codec cannot hide itself by being mirrored in the test client.  The
client can do things a real client would not: send any option bytes, any request header (bad
magic, unknown flags or commands, lengths that lie), half a request, then close.

Every read has a deadline (``timeout`` seconds per call); a server that closes the connection
raises ``NbdClosed`` (never a hang, never a partial record passed on), a server that stays silent
raises ``NbdTimeout``.  ``closed_within()`` tells whether the server hung up.

Wire formats (all integers big-endian, as in proto.md):

    greeting (server)        u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags
    client flags             u32
    option request           u64 IHAVEOPT, u32 option, u32 length, data
    option reply             u64 REPLY_MAGIC, u32 option, u32 reply type, u32 length, data
    EXPORT_NAME reply        u64 size, u16 transmission flags, [124 zero bytes unless NO_ZEROES]
    GO/INFO request data     u32 name length, name, u16 n, n x u16 info type
    NBD_INFO_EXPORT          u16 type (0), u64 size, u16 transmission flags
    NBD_INFO_BLOCK_SIZE      u16 type (3), u32 minimum, u32 preferred, u32 maximum
    request                  u32 REQUEST_MAGIC, u16 flags, u16 type, u64 cookie, u64 offset,
                             u32 length, [length bytes of payload for WRITE]
    simple reply             u32 SIMPLE_REPLY_MAGIC, u32 error, u64 cookie,
                             [length bytes of data after a successful READ]
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

# -- magic numbers and codes (proto.md "Values") ------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA, ROTATIONAL = (1 << i for i in range(5))
SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF, CAN_MULTI_CONN = (1 << i for i in range(5, 9))
SEND_RESIZE, SEND_CACHE, SEND_FAST_ZERO = (1 << i for i in range(9, 12))

# options
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11

# option reply types
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = REP_ERR + 1, REP_ERR + 2, REP_ERR + 3
REP_ERR_PLATFORM, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN = REP_ERR + 4, REP_ERR + 5, REP_ERR + 6
REP_ERR_SHUTDOWN, REP_ERR_BLOCK_SIZE_REQD, REP_ERR_TOO_BIG = REP_ERR + 7, REP_ERR + 8, REP_ERR + 9

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# commands and command flags
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, CMD_RESIZE = 6, 7, 8
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = (
    1 << i for i in range(6)
)

# error values
OK, EPERM, EIO, ENOMEM, EINVAL, ENOSPC = 0, 1, 5, 12, 22, 28
EOVERFLOW, ENOTSUP, ESHUTDOWN = 75, 95, 108

# -- structs --------------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_DATA = struct.Struct(">HQH")
INFO_BLOCK_SIZE_DATA = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")

Address = str | Path | tuple[str, int]


class NbdClosed(ConnectionError):
    """The server closed (or reset) the connection."""


class NbdTimeout(TimeoutError):
    """The server sent nothing (or not enough) before the deadline."""


class OptionFailed(Exception):
    def __init__(self, reply: OptionReply) -> None:
        super().__init__(f"option {reply.option} failed: {reply.type_name} {reply.data!r}")
        self.reply = reply


@dataclass(frozen=True)
class OptionReply:
    magic: int
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERR)

    @property
    def final(self) -> bool:
        """ACK or an error ends an option's replies; SERVER/INFO/META_CONTEXT do not."""
        return self.type == REP_ACK or self.is_error

    @property
    def type_name(self) -> str:
        return REPLY_NAMES.get(self.type, hex(self.type))


REPLY_NAMES = {
    REP_ACK: "ACK",
    REP_SERVER: "SERVER",
    REP_INFO: "INFO",
    REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP",
    REP_ERR_POLICY: "ERR_POLICY",
    REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM",
    REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}


@dataclass
class Export:
    """What negotiation told us about the export."""

    size: int
    flags: int
    block_size: tuple[int, int, int] | None = None  # minimum, preferred, maximum
    infos: list[bytes] = field(default_factory=list)  # raw NBD_REP_INFO payloads


@dataclass(frozen=True)
class SimpleReply:
    magic: int
    error: int
    cookie: int
    data: bytes = b""


def go_data(name: bytes | str, infos: tuple[int, ...] = ()) -> bytes:
    """GO/INFO option data: u32 name length, name, u16 count, count x u16 info type."""
    raw = name.encode() if isinstance(name, str) else name
    requests = b"".join(struct.pack(">H", i) for i in infos)
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + requests


def option_bytes(option: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """One option request; ``length`` may lie about the data that follows."""
    declared = len(data) if length is None else length
    return OPTION.pack(IHAVEOPT, option, declared) + data


def request_bytes(
    cmd: int,
    *,
    flags: int = 0,
    cookie: int = 0,
    offset: int = 0,
    length: int | None = None,
    payload: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    """One request header plus payload; ``length`` defaults to the payload's length."""
    declared = len(payload) if length is None else length
    return REQUEST.pack(magic, flags, cmd, cookie, offset, declared) + payload


class RawNbd:
    """One connection.  Use ``RawNbd.open(...)`` for a connection already in transmission."""

    _cookies = itertools.count(0x1000)

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.handshake_flags: int | None = None
        self.export: Export | None = None

    # -- connection -------------------------------------------------------------------------

    @classmethod
    def connect(cls, address: Address, timeout: float = 5.0) -> RawNbd:
        if isinstance(address, tuple):
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(address))
            except OSError:
                sock.close()
                raise
        return cls(sock, timeout)

    @classmethod
    def open(
        cls,
        address: Address,
        name: str = "",
        *,
        via: str = "go",
        no_zeroes: bool = True,
        block_size: bool = False,
        timeout: float = 5.0,
    ) -> RawNbd:
        """Connect and negotiate into transmission with OPT_GO or OPT_EXPORT_NAME."""
        client = cls.connect(address, timeout)
        try:
            client.greeting()
            flags = FLAG_C_FIXED_NEWSTYLE
            if no_zeroes and (client.handshake_flags or 0) & FLAG_NO_ZEROES:
                flags |= FLAG_C_NO_ZEROES
            client.send_client_flags(flags)
            if via == "go":
                client.go(name, infos=(INFO_BLOCK_SIZE,) if block_size else ())
            elif via == "export_name":
                client.export_name(name, no_zeroes=bool(flags & FLAG_C_NO_ZEROES))
            else:
                raise ValueError(f"via must be 'go' or 'export_name', not {via!r}")
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send everything; a server that hung up raises NbdClosed."""
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise NbdClosed(f"server closed while we sent: {exc}") from exc
        except TimeoutError as exc:
            raise NbdTimeout(f"server stopped reading for {self.timeout}s") from exc

    def recv_exact(self, size: int, timeout: float | None = None) -> bytes:
        """Exactly ``size`` bytes before the deadline, else NbdClosed or NbdTimeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        chunks: list[bytes] = []
        got = 0
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NbdTimeout(f"got {got} of {size} bytes before the deadline")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(min(size - got, 1 << 20))
            except TimeoutError as exc:
                raise NbdTimeout(f"got {got} of {size} bytes before the deadline") from exc
            except ConnectionResetError as exc:
                raise NbdClosed(f"connection reset after {got} of {size} bytes") from exc
            if not chunk:
                raise NbdClosed(f"server closed after {got} of {size} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def closed_within(self, timeout: float = 2.0) -> bool:
        """True if the server closes the connection within ``timeout`` (data is discarded)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if not readable:
                return False
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return True
            except BlockingIOError:  # pragma: no cover - select said readable
                continue
            if not chunk:
                return True

    def pending(self, timeout: float = 0.2) -> bytes:
        """Whatever the server sends within ``timeout`` (b"" if nothing); never raises on EOF."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1 << 16)
        except (TimeoutError, ConnectionResetError):
            return b""

    # -- handshake --------------------------------------------------------------------------

    def greeting(self) -> tuple[int, int, int]:
        magic, ihaveopt, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise AssertionError(f"bad greeting 0x{magic:016x} 0x{ihaveopt:016x}")
        self.handshake_flags = flags
        return magic, ihaveopt, flags

    def send_client_flags(self, flags: int = FLAG_C_FIXED_NEWSTYLE) -> None:
        self.send(CLIENT_FLAGS.pack(flags))

    def send_option(self, option: int, data: bytes = b"", *, length: int | None = None) -> None:
        self.send(option_bytes(option, data, length=length))

    def recv_option_reply(self) -> OptionReply:
        magic, option, kind, length = OPTION_REPLY.unpack(self.recv_exact(OPTION_REPLY.size))
        if magic != REPLY_MAGIC:
            raise AssertionError(f"option reply has bad magic 0x{magic:016x}")
        data = self.recv_exact(length) if length else b""
        return OptionReply(magic, option, kind, data)

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option; return all its replies, the final (ACK or error) one last."""
        self.send_option(option, data)
        replies = [self.recv_option_reply()]
        while not replies[-1].final:
            replies.append(self.recv_option_reply())
        return replies

    def info(self, name: bytes | str = "", infos: tuple[int, ...] = ()) -> list[OptionReply]:
        return self.option(OPT_INFO, go_data(name, infos))

    def go(self, name: bytes | str = "", infos: tuple[int, ...] = ()) -> Export:
        replies = self.option(OPT_GO, go_data(name, infos))
        if replies[-1].is_error:
            raise OptionFailed(replies[-1])
        self.export = parse_infos(replies)
        return self.export

    def export_name(self, name: str = "", *, no_zeroes: bool = True) -> Export:
        self.send_option(OPT_EXPORT_NAME, name.encode())
        size, flags = EXPORT_NAME_REPLY.unpack(self.recv_exact(EXPORT_NAME_REPLY.size))
        if not no_zeroes:
            padding = self.recv_exact(124)
            if padding != bytes(124):
                raise AssertionError(f"EXPORT_NAME padding is not zeros: {padding!r}")
        self.export = Export(size, flags)
        return self.export

    # -- transmission -----------------------------------------------------------------------

    def send_request(
        self,
        cmd: int,
        *,
        flags: int = 0,
        cookie: int | None = None,
        offset: int = 0,
        length: int | None = None,
        payload: bytes = b"",
        magic: int = REQUEST_MAGIC,
    ) -> int:
        cookie = next(self._cookies) if cookie is None else cookie
        header = request_bytes(
            cmd, flags=flags, cookie=cookie, offset=offset, length=length, magic=magic
        )
        self.send(header + payload)
        return cookie

    def recv_simple_reply(self, read_length: int = 0) -> SimpleReply:
        """One simple reply; ``read_length`` data bytes follow it if it reports success."""
        header = self.recv_exact(SIMPLE_REPLY.size)
        magic, error, cookie = SIMPLE_REPLY.unpack(header)
        if magic != SIMPLE_REPLY_MAGIC:
            raise AssertionError(f"reply has bad magic 0x{magic:08x} ({header!r})")
        data = self.recv_exact(read_length) if read_length and error == OK else b""
        return SimpleReply(magic, error, cookie, data)

    def recv_replies(self, read_lengths: dict[int, int]) -> dict[int, SimpleReply]:
        """One reply per cookie in ``read_lengths`` (cookie -> READ length, 0 if not a READ),
        in whatever order the server sends them; an unexpected cookie is an AssertionError."""
        replies: dict[int, SimpleReply] = {}
        while len(replies) < len(read_lengths):
            header = self.recv_exact(SIMPLE_REPLY.size)
            magic, error, cookie = SIMPLE_REPLY.unpack(header)
            if magic != SIMPLE_REPLY_MAGIC:
                raise AssertionError(f"reply has bad magic 0x{magic:08x} ({header!r})")
            if cookie not in read_lengths or cookie in replies:
                raise AssertionError(f"reply for cookie 0x{cookie:x}, which is not pending")
            length = read_lengths[cookie]
            data = self.recv_exact(length) if length and error == OK else b""
            replies[cookie] = SimpleReply(magic, error, cookie, data)
        return replies

    def request(
        self,
        cmd: int,
        *,
        flags: int = 0,
        offset: int = 0,
        length: int | None = None,
        payload: bytes = b"",
        cookie: int | None = None,
    ) -> SimpleReply:
        """Send one request and wait for its reply (a READ's data included on success)."""
        declared = len(payload) if length is None else length
        cookie = self.send_request(
            cmd, flags=flags, cookie=cookie, offset=offset, length=declared, payload=payload
        )
        reply = self.recv_simple_reply(declared if cmd == CMD_READ else 0)
        if reply.cookie != cookie:
            raise AssertionError(f"reply cookie 0x{reply.cookie:x}, expected 0x{cookie:x}")
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> SimpleReply:
        return self.request(CMD_READ, flags=flags, offset=offset, length=length)

    def write(self, offset: int, data: bytes, flags: int = 0) -> SimpleReply:
        return self.request(CMD_WRITE, flags=flags, offset=offset, payload=data)

    def flush(self, flags: int = 0) -> SimpleReply:
        return self.request(CMD_FLUSH, flags=flags)

    def disconnect(self) -> None:
        """NBD_CMD_DISC: no reply; the server closes."""
        self.send_request(CMD_DISC)


def parse_infos(replies: list[OptionReply]) -> Export:
    """The Export described by GO/INFO replies (INFO_EXPORT is mandatory before ACK)."""
    size = flags = None
    block_size = None
    infos = []
    for reply in replies:
        if reply.type != REP_INFO:
            continue
        infos.append(reply.data)
        (kind,) = struct.unpack_from(">H", reply.data)
        if kind == INFO_EXPORT:
            if len(reply.data) != INFO_EXPORT_DATA.size:
                raise AssertionError(f"NBD_INFO_EXPORT of {len(reply.data)} bytes")
            _, size, flags = INFO_EXPORT_DATA.unpack(reply.data)
        elif kind == INFO_BLOCK_SIZE:
            if len(reply.data) != INFO_BLOCK_SIZE_DATA.size:
                raise AssertionError(f"NBD_INFO_BLOCK_SIZE of {len(reply.data)} bytes")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE_DATA.unpack(reply.data)
            block_size = (minimum, preferred, maximum)
    if size is None or flags is None:
        raise AssertionError("GO/INFO succeeded without NBD_INFO_EXPORT")
    return Export(size, flags, block_size, infos)
