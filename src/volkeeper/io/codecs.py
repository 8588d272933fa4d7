"""The compression codecs of the replication link: zlib, zstd and lz4 (block format).

How this works: ``compressor_for(setting)`` turns a mirror's setting (core/compression_setting.py:
``zlib:N``, ``zstd:N``, ``lz4``) into a ``Compressor``, or None for ``none``.  ``compress``
returns the compressed bytes, or None when they would not save at least ``MIN_SAVING`` of the
size (incompressible data is sent as it is: a WRITE, not a WRITE_Z).  ``decompress`` is the
target's half; it refuses output that is not exactly the announced length, so a bad frame can
neither write the wrong number of bytes nor make the target allocate more than the frame says
(at most ``MAX_PAYLOAD``).  All three libraries release the GIL while they work, so
compression runs on a thread pool beside the event loop (daemon/source/sender.py), and
decompression on the target volume's writer thread.  zstd contexts are not thread-safe: each
thread gets its own.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import cast

import lz4.block
import zstandard

from volkeeper.core.peer import wire as pw
from volkeeper.errors import ProtocolError

MIN_SAVING = 1 / 16  # compressed output must be at least this much smaller to be sent
_local = threading.local()


@dataclass(frozen=True)
class Compressor:
    codec: pw.Codec
    level: int
    setting: str

    def compress(self, data: pw.Buffer) -> bytes | None:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if self.codec is pw.Codec.ZLIB:
            packed = zlib.compress(data, self.level)
        elif self.codec is pw.Codec.ZSTD:
            packed = _zstd_compressor(self.level).compress(data)
        else:
            packed = cast(bytes, lz4.block.compress(data, store_size=False))
        return packed if len(packed) <= size * (1 - MIN_SAVING) else None


def compressor_for(setting: str) -> Compressor | None:
    """``setting`` is already normalised (core/compression_setting.parse_compression)."""
    name, _, level = setting.partition(":")
    if name == "none":
        return None
    codec = {"zlib": pw.Codec.ZLIB, "zstd": pw.Codec.ZSTD, "lz4": pw.Codec.LZ4}[name]
    return Compressor(codec, int(level or 0), setting)


def decompress(codec: pw.Codec, data: bytes, raw_length: int) -> bytes:
    try:
        if codec is pw.Codec.ZLIB:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, raw_length)
            if inflater.unconsumed_tail or not inflater.eof:
                raise ProtocolError(f"ZLIB data longer than the announced {raw_length} bytes")
        elif codec is pw.Codec.ZSTD:
            raw = _zstd_bounded(data, raw_length)
        else:
            raw = cast(bytes, lz4.block.decompress(data, uncompressed_size=raw_length))
    except (zlib.error, zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
        raise ProtocolError(f"bad {codec.name} data: {exc}") from None
    if len(raw) != raw_length:
        raise ProtocolError(f"{codec.name} data gave {len(raw)} bytes, not {raw_length}")
    return raw


def _zstd_bounded(data: bytes, raw_length: int) -> bytes:
    """zstd output, never more than ``raw_length`` + 1 bytes of it: a frame's header may
    claim any size (the one-shot API would allocate what it claims)."""
    claimed = zstandard.get_frame_parameters(data).content_size
    if claimed not in (zstandard.CONTENTSIZE_UNKNOWN, raw_length):
        raise ProtocolError(f"ZSTD data says {claimed} bytes, not {raw_length}")
    pieces, size = [], 0
    with _zstd_decompressor().stream_reader(data) as reader:
        while size <= raw_length and (piece := reader.read(raw_length + 1 - size)):
            pieces.append(piece)
            size += len(piece)
    return b"".join(pieces)


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    compressors: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zstd", {})
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "unzstd", None)
    if decompressor is None:
        decompressor = _local.unzstd = zstandard.ZstdDecompressor()
    return decompressor
