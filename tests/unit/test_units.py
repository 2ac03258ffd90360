"""vmigrate.units: the size and rate grammars, their bounds and their errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmigrate.errors import SpecError
from vmigrate.units import parse_rate, parse_size, parse_tc_rate

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BINARY = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _cases(text: str) -> st.SearchStrategy[str]:
    """``text`` in any mix of upper and lower case."""
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda upper: "".join(c.upper() if u else c.lower() for c, u in zip(text, upper,
                                                                             strict=True)))


# -- parse_size ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("4K", 4096), ("4k", 4096), ("256M", 256 * MiB), ("1.5G", 3 * GiB // 2),
    ("2GiB", 2 * GiB), ("2gib", 2 * GiB), ("64 kb", 64 * KiB), (" 1T ", TiB), ("512B", 512),
    ("0", 0), ("0.5K", 512), ("1.0001K", 1024),
])
def test_size(text: str, size: int) -> None:
    assert parse_size(text, what="size") == size


@pytest.mark.parametrize("text", [
    "", "M", "1P", "-1M", "1e3", ".5M", "1.M", "1 M B", "1MiBs", "1 000", "1X", "1" + "0" * 400,
    "9" * 30 + "T",
])
def test_size_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_size(text, what="size")


@given(number=st.integers(0, 10**6), prefix=st.sampled_from(sorted(BINARY)),
       suffix=st.sampled_from(["", "B", "iB"]), data=st.data())
def test_size_grammar(number: int, prefix: str, suffix: str, data: st.DataObject) -> None:
    if not prefix and suffix == "iB":
        suffix = "B"
    unit = data.draw(_cases(prefix + suffix))
    pad = data.draw(st.sampled_from(["", " ", "  "]))
    text = f"{pad}{number}{data.draw(st.sampled_from(['', ' ']))}{unit}{pad}"
    assert parse_size(text, what="size") == number * BINARY[prefix]


@given(whole=st.integers(0, 4096), eighths=st.integers(0, 7),
       prefix=st.sampled_from(sorted(BINARY)))
def test_size_fractions_drop_part_bytes(whole: int, eighths: int, prefix: str) -> None:
    got = parse_size(f"{whole}.{eighths * 125:03d}{prefix}", what="size")
    assert got == (whole * 8 + eighths) * BINARY[prefix] // 8


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("4K", 4096), ("4k", 4096), ("64M", 64 * MiB), ("1G", GiB), ("1g", GiB),
    ("0", 0), ("9" * 15, int("9" * 15)),
])
def test_strict_size(text: str, size: int) -> None:
    assert parse_size(text, what="size", strict=True) == size


@pytest.mark.parametrize("text", [
    "", "M", "1T", "1.5G", "-1", " 1M", "1M ", "1MB", "1KiB", "1" * 16, "+1", "1_000",
    "9" * 15 + "G",
])
def test_strict_size_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_size(text, what="size", strict=True)


@given(text=st.one_of(st.text(max_size=12),
                     st.from_regex(r"[0-9]{1,15}[KkMmGg]?", fullmatch=True)))
def test_strict_size_is_a_subset(text: str) -> None:
    """What strict accepts, the full grammar accepts with the same value."""
    try:
        strict = parse_size(text, what="size", strict=True)
    except SpecError:
        return
    assert parse_size(text, what="size") == strict


# -- parse_rate -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("100M", 100 * MiB), ("100MB", 100 * MiB), ("100MiB/s", 100 * MiB), ("1G", GiB),
    ("512", 512), ("1.5K", 1536), ("800mbit", 100_000_000), ("1Gbit/s", 125_000_000),
    ("100mbps", 12_500_000), ("8bit", 1), (" 2 t ", 2 * TiB), ("8bits", 1), (".5K", 512),
    ("5.", 5), ("0.6", 1), ("100 kib/s", 100 * KiB),
])
def test_rate(text: str, value: int) -> None:
    assert parse_rate(text, what="bandwidth") == value


@pytest.mark.parametrize("text", [
    "", "fast", "-1M", "0", "1X", "1 parsec", "0.01", "M", "1e3", "4bit", "1kibit", "1/s/s",
    "8388608T", "1" + "0" * 400,
])
def test_rate_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_rate(text, what="bandwidth")


@given(number=st.integers(1, 10**6), prefix=st.sampled_from(sorted(BINARY)),
       suffix=st.sampled_from(["", "B", "iB"]), per_s=st.booleans(), data=st.data())
def test_rate_bytes(number: int, prefix: str, suffix: str, per_s: bool,
                    data: st.DataObject) -> None:
    if not prefix and suffix == "iB":
        suffix = "B"
    unit = data.draw(_cases(prefix + suffix + ("/s" if per_s else "")))
    assert parse_rate(f"{number}{unit}", what="bandwidth") == number * BINARY[prefix]


@given(number=st.integers(1, 10**6), prefix=st.sampled_from(sorted(DECIMAL)),
       suffix=st.sampled_from(["bit", "bits", "bps"]), data=st.data())
def test_rate_bits(number: int, prefix: str, suffix: str, data: st.DataObject) -> None:
    text = f"{number}{data.draw(_cases(prefix + suffix))}"
    expected = round(number * DECIMAL[prefix] / 8)
    if expected < 1:
        with pytest.raises(SpecError):
            parse_rate(text, what="bandwidth")
    else:
        assert parse_rate(text, what="bandwidth") == expected


# -- parse_tc_rate --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("1gbit", 125_000_000), ("200mbit", 25_000_000), ("100Mbit", 12_500_000),
    ("10mbps", 10_000_000), ("10MBps", 10_000_000), ("1.5gbit", 187_500_000),
    ("1mibit", MiB / 8), ("64kbit", 8000), ("1bit", 0.125), (" 1kibps ", KiB), ("0bit", 0),
])
def test_tc_rate(text: str, value: float) -> None:
    assert parse_tc_rate(text, what="link rate") == value


@pytest.mark.parametrize("text", [
    "", "1000", "fast", "1 gbit", "-1gbit", "1gb", "5ibit", "1pbit", "1mbit/s", ".5mbit",
    "1e3bit", "9" * 30 + "tibps",
])
def test_tc_rate_rejects(text: str) -> None:
    with pytest.raises(SpecError):
        parse_tc_rate(text, what="link rate")


@given(number=st.integers(0, 10**6), prefix=st.sampled_from(["", "k", "m", "g", "t",
                                                              "ki", "mi", "gi", "ti"]),
       unit=st.sampled_from(["bit", "bps"]), data=st.data())
def test_tc_rate_grammar(number: int, prefix: str, unit: str, data: st.DataObject) -> None:
    scale = {**DECIMAL, "ki": KiB, "mi": MiB, "gi": GiB, "ti": TiB}[prefix]
    text = f"{number}{data.draw(_cases(prefix + unit))}"
    per_byte = 1 if unit == "bps" else 1 / 8  # tc: bps is bytes per second
    assert parse_tc_rate(text, what="link rate") == number * scale * per_byte


# -- errors ---------------------------------------------------------------------------------


@given(text=st.text(max_size=16))
def test_only_spec_errors(text: str) -> None:
    """Any text parses or raises SpecError, naming the field; nothing else escapes."""
    for parse in (lambda t: parse_size(t, what="the field"),
                  lambda t: parse_size(t, what="the field", strict=True),
                  lambda t: parse_rate(t, what="the field"),
                  lambda t: parse_tc_rate(t, what="the field")):
        try:
            value = parse(text)
        except SpecError as exc:
            assert "the field" in str(exc)
        else:
            assert value >= 0


@pytest.mark.parametrize("parse", [parse_size, parse_rate, parse_tc_rate])
def test_not_text(parse: object) -> None:
    with pytest.raises(SpecError):
        parse(12, what="x")  # type: ignore[operator]
