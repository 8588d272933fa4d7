from __future__ import annotations

import os
import resource

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from volkeeper.core.peer import wire as pw
from volkeeper.errors import ProtocolError
from volkeeper.io.codecs import compressor_for, decompress

SETTINGS = ["zlib:1", "zlib:9", "zstd:1", "zstd:19", "lz4"]
TEXT = b"volkeeper keeps block volumes mirrored between Linux nodes. " * 200


def test_none_is_no_compressor() -> None:
    assert compressor_for("none") is None


@pytest.mark.parametrize("setting", SETTINGS)
def test_compressible_data_round_trips(setting: str) -> None:
    compressor = compressor_for(setting)
    assert compressor is not None and compressor.setting == setting
    packed = compressor.compress(TEXT)
    assert packed is not None and len(packed) < len(TEXT) // 4
    assert decompress(compressor.codec, packed, len(TEXT)) == TEXT
    assert compressor.compress(memoryview(bytearray(TEXT))) == packed  # buffers too


@pytest.mark.parametrize("setting", SETTINGS)
def test_incompressible_data_is_sent_as_it_is(setting: str) -> None:
    compressor = compressor_for(setting)
    assert compressor is not None
    assert compressor.compress(os.urandom(64 * 1024)) is None


@pytest.mark.parametrize("setting", SETTINGS)
def test_decompress_refuses_a_wrong_length_or_garbage(setting: str) -> None:
    compressor = compressor_for(setting)
    assert compressor is not None
    packed = compressor.compress(TEXT)
    assert packed is not None
    with pytest.raises(ProtocolError, match=compressor.codec.name):
        decompress(compressor.codec, packed, len(TEXT) - 1)  # announced shorter than it is
    with pytest.raises(ProtocolError):
        decompress(compressor.codec, packed, len(TEXT) + 1)  # announced longer
    with pytest.raises(ProtocolError):
        decompress(compressor.codec, os.urandom(200), len(TEXT))


@settings(max_examples=60, deadline=None)
@given(
    setting=st.sampled_from(SETTINGS),
    data=st.binary(min_size=1, max_size=20000)
    | st.builds(lambda n: b"a" * n, st.integers(1, 1 << 20)),
)
def test_whatever_compresses_decompresses_to_the_same_bytes(setting: str, data: bytes) -> None:
    compressor = compressor_for(setting)
    assert compressor is not None
    packed = compressor.compress(data)
    if packed is not None:
        assert len(packed) < len(data)
        assert decompress(compressor.codec, packed, len(data)) == data


def test_zlib_bomb_is_cut_at_the_announced_length() -> None:
    compressor = compressor_for("zlib:9")
    assert compressor is not None
    packed = compressor.compress(bytes(pw.MAX_PAYLOAD))  # 32 MiB of zeros, tiny when packed
    assert packed is not None
    with pytest.raises(ProtocolError, match="ZLIB data longer than the announced 4096"):
        decompress(pw.Codec.ZLIB, packed, 4096)


def test_a_zstd_header_claiming_more_than_announced_allocates_nothing_big() -> None:
    """A 1 GiB zstd frame built without ever holding 1 GiB: decompressing it for a 4 KiB
    write must not allocate it either (the one-shot API would: the peak RSS would jump)."""
    zeros = bytes(1 << 20)
    packer = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30)
    bomb = b"".join([*(packer.compress(zeros) for _ in range(1024)), packer.flush()])
    headless = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ProtocolError, match="says 1073741824 bytes, not 4096"):
        decompress(pw.Codec.ZSTD, bomb, 4096)
    with pytest.raises(ProtocolError, match="not 4096"):
        decompress(pw.Codec.ZSTD, headless, 4096)  # no size in the header: read, bounded
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"decompressing grew the peak RSS by {grown_kib} KiB"
