"""The intent-log format: headers round-trip, and no change to a sealed page goes unseen."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core import intent_log_format as fmt
from volkeeper.core.activity_log import BLOCK_BYTES
from volkeeper.core.bitmap import PAGE_BYTES

LOG_ID = 0xFEED_0000_0000_0001
IMAGE_BYTES = 2 * PAGE_BYTES + 10  # two full pages and a short third


def header(**changes: object) -> fmt.Header:
    fields: dict[str, object] = {
        "geometry": fmt.Geometry(1 << 30, 65536, 4 << 20, 512),
        "generations": fmt.Generations(5, 3),
        "log_id": LOG_ID,
        "mirror": "web: data1 -> beta:data1",
        "open": True,
    }
    fields.update(changes)
    return fmt.Header(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("open_", [True, False])
def test_a_header_round_trips(open_: bool) -> None:
    original = header(open=open_, mirror="jöb: d -> β:d")
    block = fmt.encode_header(original)
    assert len(block) == BLOCK_BYTES
    assert fmt.decode_header(block) == original


@given(st.integers(0, BLOCK_BYTES - 1), st.integers(1, 255))
def test_any_changed_byte_of_a_header_is_seen(at: int, flip: int) -> None:
    block = bytearray(fmt.encode_header(header()))
    block[at] ^= flip
    with pytest.raises(fmt.LogDamage):
        fmt.decode_header(bytes(block))


def test_header_problems_are_named() -> None:
    with pytest.raises(fmt.LogDamage, match="shorter than its header"):
        fmt.decode_header(b"VKIL")
    with pytest.raises(fmt.LogDamage, match="bad magic"):
        fmt.decode_header(bytes(BLOCK_BYTES))
    future = bytearray(fmt.encode_header(header()))
    future[4:6] = (9).to_bytes(2, "big")
    body = bytes(future[:-4])
    block = body + zlib.crc32(body).to_bytes(4, "big")
    with pytest.raises(fmt.LogDamage, match="format 9 is not one this volkeeper reads"):
        fmt.decode_header(block)
    with pytest.raises(ValueError, match="mirror name"):
        fmt.encode_header(header(mirror="x" * (fmt.MAX_MIRROR_NAME + 1)))


@given(st.integers(0, 2), st.binary(min_size=PAGE_BYTES, max_size=PAGE_BYTES))
def test_a_sealed_page_opens_to_its_image(page: int, data: bytes) -> None:
    image = data[: min(PAGE_BYTES, IMAGE_BYTES - page * PAGE_BYTES)]
    block = fmt.seal_page(LOG_ID, page, image)
    assert len(block) == BLOCK_BYTES
    assert fmt.unseal_page(LOG_ID, page, block, IMAGE_BYTES) == image


@given(
    st.binary(min_size=PAGE_BYTES, max_size=PAGE_BYTES),
    st.integers(0, BLOCK_BYTES - 1),
    st.integers(1, 255),
)
def test_any_changed_byte_of_a_page_is_seen(image: bytes, at: int, flip: int) -> None:
    block = bytearray(fmt.seal_page(LOG_ID, 1, image))
    block[at] ^= flip
    assert fmt.unseal_page(LOG_ID, 1, bytes(block), IMAGE_BYTES) is None


@given(
    st.binary(min_size=PAGE_BYTES, max_size=PAGE_BYTES),
    st.integers(fmt.PAGE_SEAL.size + 1, BLOCK_BYTES - 1),  # a shorter tear is the old block
)
def test_a_torn_page_is_seen(image: bytes, cut: int) -> None:
    old = fmt.seal_page(LOG_ID, 0, image)
    new = fmt.seal_page(LOG_ID, 0, bytes(b ^ 0xFF for b in image))
    assert fmt.unseal_page(LOG_ID, 0, new[:cut] + old[cut:], IMAGE_BYTES) is None


def test_a_page_of_another_log_or_place_is_seen() -> None:
    block = fmt.seal_page(LOG_ID, 1, bytes(PAGE_BYTES))
    assert fmt.unseal_page(LOG_ID + 1, 1, block, IMAGE_BYTES) is None
    assert fmt.unseal_page(LOG_ID, 0, block, IMAGE_BYTES) is None


def test_the_short_last_page_must_be_zero_padded() -> None:
    padded = fmt.seal_page(LOG_ID, 2, b"\x01" * 10 + b"\x02")  # one byte past the image
    assert fmt.unseal_page(LOG_ID, 2, padded, IMAGE_BYTES) is None


def test_geometry_of_the_file() -> None:
    assert fmt.page_count(IMAGE_BYTES) == 3
    assert fmt.file_size(IMAGE_BYTES) == fmt.BITMAP_OFFSET + 3 * BLOCK_BYTES
    assert fmt.page_regions(2, 2 * PAGE_BYTES * 8 + 80) == (2 * PAGE_BYTES * 8, 80)
