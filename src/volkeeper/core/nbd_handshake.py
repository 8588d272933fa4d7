"""Server side of the NBD fixed-newstyle handshake, as a sans-IO state machine.

How this works: the adapter sends ``greeting()`` on connect, then passes every chunk it reads
to ``receive_data()``, which returns the bytes to send back.  Parsing is incremental, so the
client's bytes may arrive whole, one at a time, or in any split.  Afterwards ``state`` says
what happened:

    state            meaning                                    next step for the adapter
    CLIENT_FLAGS     waiting for the client's 32-bit flags      keep reading
    OPTIONS          option haggling                            keep reading
    STARTTLS         NBD_OPT_STARTTLS was acknowledged          send the ACK, start TLS as the
                                                                server, then ``tls_started()``
    TRANSMISSION     an export was chosen (``export``)          transmission, fed ``leftover``
    CLOSED           negotiation ended (``close_reason``)       send what was returned, then close

TLS (``tls``): ``OFF`` answers STARTTLS NBD_REP_ERR_UNSUP; ``OFFER`` upgrades on STARTTLS;
``REQUIRE`` also answers every other option NBD_REP_ERR_TLS_REQD (and closes on EXPORT_NAME,
which has no error reply) until TLS is on, so no export, not even its name or size, is told
to a plaintext client.  Bytes that arrive behind a STARTTLS, before the TLS handshake, could
only be injected (the client waits for the ACK): the connection is closed instead of letting
them through.  A second STARTTLS is NBD_REP_ERR_INVALID.

Which options move the machine is the table ``_OPTION_HANDLERS``; every option not in it is
answered NBD_REP_ERR_UNSUP and skipped, as the spec asks.  A client that breaks the framing
(bad magic, unknown client flags, absurd option length, unknown name in EXPORT_NAME, which has
no error reply) is closed: that is the spec's remedy and costs only that client.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from volkeeper.core import nbd_wire as w

Reply = bytes


@dataclass(frozen=True)
class ExportInfo:
    """What a client may learn about one export (one volume)."""

    name: str
    size: int
    min_block_size: int
    read_only: bool = False
    description: str = ""
    max_block_size: int = w.MAX_BLOCK_SIZE  # the largest READ or WRITE taken ([limits])

    @property
    def transmission_flags(self) -> int:
        flags = (
            w.TransmissionFlag.HAS_FLAGS
            | w.TransmissionFlag.SEND_FLUSH
            | w.TransmissionFlag.SEND_FUA
            | w.TransmissionFlag.SEND_CACHE
            # One fd per volume shared by every connection, and replies sent only after
            # the I/O completed: a flush on any connection covers writes from all of them.
            | w.TransmissionFlag.CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= w.TransmissionFlag.READ_ONLY
        else:
            flags |= w.TransmissionFlag.SEND_TRIM | w.TransmissionFlag.SEND_WRITE_ZEROES
        return int(flags)


class ExportCatalog(Protocol):
    """The exports a listener offers, asked afresh at each option (locks can change)."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def exports(self) -> Sequence[ExportInfo]: ...

    @property
    def shutting_down(self) -> bool: ...


class HandshakeState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    STARTTLS = "starttls"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class TlsMode(enum.Enum):
    OFF = "off"
    OFFER = "offer"
    REQUIRE = "require"


# Options a client may send before TLS is on, when it is required.
_BEFORE_TLS = {w.Option.STARTTLS, w.Option.ABORT}


class ServerHandshake:
    """One connection's negotiation; see the module docstring for the contract."""

    SERVER_FLAGS = w.HandshakeFlag.FIXED_NEWSTYLE | w.HandshakeFlag.NO_ZEROES

    def __init__(self, catalog: ExportCatalog, tls: TlsMode = TlsMode.OFF) -> None:
        self._catalog = catalog
        self._tls = tls
        self.tls_active = False
        self._buffer = bytearray()
        self._no_zeroes = False
        self.state = HandshakeState.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        self.close_reason = ""
        self.leftover = b""

    def greeting(self) -> bytes:
        return w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT, self.SERVER_FLAGS)

    def receive_data(self, data: bytes) -> bytes:
        """Consume client bytes; return the bytes to send (possibly empty)."""
        self._buffer += data
        out = bytearray()
        while True:
            if self.state is HandshakeState.CLIENT_FLAGS:
                step = self._client_flags()
            elif self.state is HandshakeState.OPTIONS:
                step = self._next_option()
            else:
                break
            if step is None:
                break
            out += step
        if self.state is HandshakeState.TRANSMISSION:
            self.leftover = bytes(self._buffer)
            self._buffer.clear()
        return bytes(out)

    # -- framing ---------------------------------------------------------------------------

    def _close(self, reason: str) -> bytes:
        self.state = HandshakeState.CLOSED
        self.close_reason = reason
        return b""

    def _client_flags(self) -> bytes | None:
        if len(self._buffer) < w.CLIENT_FLAGS.size:
            return None
        (flags,) = w.CLIENT_FLAGS.unpack_from(self._buffer)
        del self._buffer[: w.CLIENT_FLAGS.size]
        known = w.ClientFlag.C_FIXED_NEWSTYLE | w.ClientFlag.C_NO_ZEROES
        if flags & ~int(known):
            return self._close(f"client sent unknown handshake flags 0x{flags:08x}")
        self._no_zeroes = bool(flags & w.ClientFlag.C_NO_ZEROES)
        self.state = HandshakeState.OPTIONS
        return b""

    def _next_option(self) -> bytes | None:
        if len(self._buffer) < w.OPTION_HEADER.size:
            return None
        magic, option, length = w.OPTION_HEADER.unpack_from(self._buffer)
        if magic != w.IHAVEOPT:
            return self._close(f"option request has bad magic 0x{magic:016x}")
        if length > w.MAX_OPTION_DATA:
            return self._close(f"option {option} claims {length} bytes of data")
        end = w.OPTION_HEADER.size + length
        if len(self._buffer) < end:
            return None
        data = bytes(self._buffer[w.OPTION_HEADER.size : end])
        del self._buffer[:end]
        if self._catalog.shutting_down and option != w.Option.ABORT:
            return self._shutdown_reply(option)
        if self._tls is TlsMode.REQUIRE and not self.tls_active and option not in _BEFORE_TLS:
            return self._tls_required(option)
        handler = _OPTION_HANDLERS.get(option)
        if handler is None:
            return _error(option, w.OptionReply.ERR_UNSUP, f"option {option} is not supported")
        return handler(self, option, data)

    # -- options ---------------------------------------------------------------------------

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake: negotiation goes on, encrypted."""
        assert self.state is HandshakeState.STARTTLS
        self.tls_active = True
        self.state = HandshakeState.OPTIONS

    def _tls_required(self, option: int) -> Reply:
        if option == w.Option.EXPORT_NAME:  # no error reply: the spec says close
            return self._close("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only server")
        return _error(option, w.OptionReply.ERR_TLS_REQD, "this server requires TLS: STARTTLS")

    def _opt_starttls(self, option: int, data: bytes) -> Reply:
        if self._tls is TlsMode.OFF:
            return _error(option, w.OptionReply.ERR_UNSUP, "TLS is not offered on this listener")
        if self.tls_active:
            return _error(option, w.OptionReply.ERR_INVALID, "TLS is already on")
        if data:
            return _error(option, w.OptionReply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self._buffer:  # a client waits for our ACK: these bytes were slipped in
            return self._close("bytes after NBD_OPT_STARTTLS, before the TLS handshake")
        self.state = HandshakeState.STARTTLS
        return _reply(option, w.OptionReply.ACK)

    def _shutdown_reply(self, option: int) -> Reply:
        if option == w.Option.EXPORT_NAME:  # it has no error reply: the spec says close
            return self._close("NBD_OPT_EXPORT_NAME while the server is shutting down")
        return _error(option, w.OptionReply.ERR_SHUTDOWN, "server is shutting down")

    def _opt_export_name(self, option: int, data: bytes) -> Reply:
        name = _decode(data)
        export = self._resolve(name) if name is not None else None
        if export is None:
            return self._close(f"NBD_OPT_EXPORT_NAME asked for unavailable export {name!r}")
        self._enter_transmission(export)
        reply = w.EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags)
        return reply if self._no_zeroes else reply + w.EXPORT_NAME_PADDING

    def _opt_abort(self, option: int, data: bytes) -> Reply:
        reply = _reply(option, w.OptionReply.ACK)
        self._close("client sent NBD_OPT_ABORT")
        return reply

    def _opt_list(self, option: int, data: bytes) -> Reply:
        if data:
            return _error(option, w.OptionReply.ERR_INVALID, "NBD_OPT_LIST takes no data")
        out = bytearray()
        for export in self._catalog.exports():
            name = export.name.encode()
            out += _reply(option, w.OptionReply.SERVER, w.U32.pack(len(name)) + name)
        return bytes(out + _reply(option, w.OptionReply.ACK))

    def _opt_info_or_go(self, option: int, data: bytes) -> Reply:
        parsed = _parse_info_request(data)
        if isinstance(parsed, str):
            return _error(option, w.OptionReply.ERR_INVALID, parsed)
        name, requests = parsed
        export = self._resolve(name)
        if export is None:
            known = ", ".join(e.name for e in self._catalog.exports()) or "none"
            message = f"no export named {name!r} (exports: {known})"
            return _error(option, w.OptionReply.ERR_UNKNOWN, message)
        out = bytearray(_info_replies(option, export, requests))
        out += _reply(option, w.OptionReply.ACK)
        if option == w.Option.GO:
            self._enter_transmission(export)
        return bytes(out)

    def _opt_unsupported(self, option: int, data: bytes) -> Reply:
        reasons: dict[int, str] = {
            w.Option.STRUCTURED_REPLY: "this server sends simple replies only",
        }
        reason = reasons.get(option, f"option {option} is not supported")
        return _error(option, w.OptionReply.ERR_UNSUP, reason)

    # -- helpers ---------------------------------------------------------------------------

    def _resolve(self, name: str) -> ExportInfo | None:
        """The empty name is the default export: the node's only volume, if it has one."""
        if name == "":
            exports = self._catalog.exports()
            return exports[0] if len(exports) == 1 else None
        return self._catalog.lookup(name)

    def _enter_transmission(self, export: ExportInfo) -> None:
        self.export = export
        self.state = HandshakeState.TRANSMISSION


_OptionHandler = Callable[[ServerHandshake, int, bytes], Reply]

_OPTION_HANDLERS: dict[int, _OptionHandler] = {
    w.Option.EXPORT_NAME: ServerHandshake._opt_export_name,
    w.Option.ABORT: ServerHandshake._opt_abort,
    w.Option.LIST: ServerHandshake._opt_list,
    w.Option.INFO: ServerHandshake._opt_info_or_go,
    w.Option.GO: ServerHandshake._opt_info_or_go,
    w.Option.STARTTLS: ServerHandshake._opt_starttls,
    w.Option.STRUCTURED_REPLY: ServerHandshake._opt_unsupported,
}


def _reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return w.OPTION_REPLY_HEADER.pack(w.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def _error(option: int, reply_type: int, message: str) -> bytes:
    """An error reply; its message, like every string in NBD, is at most 4096 bytes."""
    text = message.encode()
    if len(text) > w.MAX_STRING:
        text = text[: w.MAX_STRING - 3].decode(errors="ignore").encode() + b"..."
    return _reply(option, reply_type, text)


def _decode(data: bytes) -> str | None:
    if len(data) > w.MAX_STRING:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_info_request(data: bytes) -> tuple[str, list[int]] | str:
    """GO/INFO data: u32 name length, name, u16 count, count x u16 info type."""
    if len(data) < w.U32.size:
        return "option data too short for the export name length"
    (name_length,) = w.U32.unpack_from(data)
    counts_at = w.U32.size + name_length
    if len(data) < counts_at + w.U16.size:
        return "option data too short for the export name and info count"
    name = _decode(data[w.U32.size : counts_at])
    if name is None:
        return "export name is not valid UTF-8 of at most 4096 bytes"
    (count,) = w.U16.unpack_from(data, counts_at)
    requests_at = counts_at + w.U16.size
    if len(data) != requests_at + count * w.U16.size:
        return f"option data length does not match {count} info requests"
    requests = [w.U16.unpack_from(data, requests_at + 2 * i)[0] for i in range(count)]
    return name, requests


def _info_replies(option: int, export: ExportInfo, requests: list[int]) -> bytes:
    infos = [
        w.INFO_EXPORT.pack(w.Info.EXPORT, export.size, export.transmission_flags),
        w.INFO_BLOCK_SIZE.pack(
            w.Info.BLOCK_SIZE,
            export.min_block_size,
            max(export.min_block_size, w.PREFERRED_BLOCK_SIZE),
            export.max_block_size,
        ),
    ]
    if w.Info.NAME in requests:
        infos.append(w.INFO_TYPE.pack(w.Info.NAME) + export.name.encode())
    if w.Info.DESCRIPTION in requests and export.description:
        infos.append(w.INFO_TYPE.pack(w.Info.DESCRIPTION) + export.description.encode())
    return b"".join(_reply(option, w.OptionReply.INFO, info) for info in infos)
