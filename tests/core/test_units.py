"""parse_size / parse_rate / format_size: the spellings administrators use, and round trips."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from volkeeper.core.units import format_size, parse_rate, parse_size

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
BINARY = {"KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": TIB}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GiB", GIB),
        ("512 MiB", 512 * MIB),
        ("4k", 4 * KIB),
        ("4KiB", 4 * KIB),
        ("4Ki", 4 * KIB),
        ("1G", GIB),
        ("2t", 2 * TIB),
        ("1KB", 1000),
        ("1 kb", 1000),
        ("3MB", 3_000_000),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("4096", 4096),
        ("0", 0),
        ("7 B", 7),
        ("7b", 7),
        (" 1 gib ", GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("0.5 KiB", 512),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_accepts_common_spellings(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "GiB",
        "1x",
        "1 XB",
        "1e3",
        "1,5G",
        "1_000",
        "-1",
        " -4k",
        "1 G B",
        "0x10",
        "١٢",
    ],
)
def test_parse_size_rejects_garbage_and_names_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f'got "{text}"')):
        parse_size(text)


def test_parse_size_says_why_for_negatives_and_fractions() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size("-1G")
    with pytest.raises(ValueError, match=r'"0\.3k": not a whole number of bytes'):
        parse_size("0.3k")


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_parse_size_rejects_other_types_with_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100MiB/s", 100 * MIB),
        ("10M", 10 * MIB),
        ("10 M / s", 10 * MIB),
        ("1GB/S", 10**9),
        ("512/s", 512),
        (4096, 4096),
    ],
)
def test_parse_rate_accepts_sizes_with_optional_per_second(text: str | int, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "/s", "fast", "5/s/s", "10M/h", "-1M/s"])
def test_parse_rate_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f'got "{text}"')):
        parse_rate(text)


@pytest.mark.parametrize("text", ["0", "0/s", 0, "0 MiB/s"])
def test_parse_rate_refuses_zero(text: str | int) -> None:
    with pytest.raises(ValueError, match="a rate must be positive"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (GIB, "1.0 GiB"),
        (MIB - 1, "1.0 MiB"),
        (1023 * MIB + 1000 * KIB, "1.0 GiB"),
        (5 * 1024 * TIB, "5120.0 TiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [-1, True])
def test_format_size_rejects_non_sizes(n: int) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        format_size(n)


@given(st.integers(min_value=0, max_value=2**70))
def test_bare_numbers_round_trip(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


@given(st.integers(min_value=2, max_value=2047), st.sampled_from(sorted(BINARY.items())))
def test_format_then_parse_is_exact_for_exact_values(halves: int, unit: tuple[str, int]) -> None:
    """Whole and half units (the only exact one-decimal values of a power of 1024) round-trip."""
    name, size = unit
    n = halves * size // 2
    text = format_size(n)
    assert text == f"{halves // 2}.{5 * (halves % 2)} {name}"
    assert parse_size(text) == n


@given(st.integers(min_value=0, max_value=2**60))
def test_format_size_is_within_half_a_displayed_digit(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    if unit == "B":
        assert int(number) == n < 1024
        return
    size = BINARY[unit]
    assert abs(Fraction(number) * size - n) <= Fraction(size, 20)
    assert Fraction(number) < 1024 or unit == "TiB"


@given(
    st.integers(min_value=1, max_value=10**6),
    st.sampled_from(["k", "ki", "kib", "kb", "m", "mib", "mb", "g", "gib", "gb", "t", "tib", "tb"]),
    st.data(),
)
def test_units_are_case_insensitive_and_rates_match_sizes(
    n: int, unit: str, data: st.DataObject
) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(unit), max_size=len(unit)))
    spelled = "".join(c.upper() if flip else c for c, flip in zip(unit, flips, strict=True))
    assert parse_size(f"{n}{spelled}") == parse_size(f"{n} {unit}")
    assert parse_rate(f"{n}{spelled}/s") == parse_size(f"{n}{unit}")
