"""Sizes and rates written by people: ``256M``, ``1.5GiB``, ``800mbit``, ``50MBps``.

Every size or rate vmigrate reads from a command line, a spec, the inventory or a
workload goes through this module (bottom layer: it imports nothing of vmigrate
but :mod:`vmigrate.errors`). Callers keep their own rules on top (a minimum, a
multiple, a unit of their own for a bare number) and their own error class
where it differs.

Three grammars, all pure; every function raises
:class:`~vmigrate.errors.SpecError` naming the field (``what``) and the text, and
nothing else happens on failure:

:func:`parse_size` (bytes)
    A number, optionally with a fraction, then an optional binary prefix ``K``,
    ``M``, ``G`` or ``T`` (1024-based, as in QEMU) and an optional ``B`` or
    ``iB``; any case, spaces around: ``4096``, ``256M``, ``1.5G``, ``2GiB``,
    ``64 kb``. A fraction of a byte is dropped. With ``strict``: only what the
    lab guest's programs read too (``parse_num`` in ``lab/guest/common.h``): 1
    to 15 digits and an optional ``K``, ``M`` or ``G``, nothing else (``64K``,
    ``1g``; not ``1.5G``, ``1T``, ``1MB`` or ``" 1M"``).
:func:`parse_rate` (whole bytes per second)
    vmigrate's own, for migration bandwidth caps: byte units are binary, as in
    QEMU (``100M``, ``100MB``, ``100MiB/s`` are 100 MiB/s; a bare number is
    bytes/s); bit units are decimal and spelled ``bit``, ``bits`` or ``bps``
    (``800mbit``, ``1Gbit/s``, ``100mbps`` are megabits). Any case, spaces
    around, an optional ``/s``. Rounded to whole bytes per second: at least 1,
    below 2**63.
:func:`parse_tc_rate` (bytes per second)
    ``tc``'s syntax, for the lab's links and the transfer engine's cap: a number
    and a unit ending in ``bit`` (bits) or ``bps`` (*bytes*, as tc reads it),
    with a decimal prefix ``k``/``m``/``g``/``t`` or a binary one
    ``ki``/``mi``/``gi``/``ti``; any case, no bare number (its unit would be
    ambiguous): ``200mbit``, ``1gbit``, ``10MBps``, ``1mibit``.

Beware: ``100mbps`` is 100 megabits/s for :func:`parse_rate` and 100 megabytes/s
for :func:`parse_tc_rate`, as in ``tc``.
"""

from __future__ import annotations

import math
import re
from typing import Final

from vmigrate.errors import SpecError

__all__ = ["parse_rate", "parse_size", "parse_tc_rate"]

#: sizes and rates stay below this (QEMU takes them as int64/uint64)
_LIMIT: Final = 1 << 63

_BINARY: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL: Final = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_STRICT_SIZE_RE: Final = re.compile(r"([0-9]{1,15})([KkMmGg]?)")
_RATE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z/]*)\s*$")
_BYTE_UNITS: Final = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_TC_RATE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?i?)(bit|bps)", re.IGNORECASE)
_TC_PREFIX: Final = {**_DECIMAL, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str, *, what: str, strict: bool = False) -> int:
    """Bytes in a size such as ``256M``, ``1.5G``, ``2GiB`` or ``4096`` (see the module doc).

    ``strict``: only digits and an optional ``K``, ``M`` or ``G``, as the lab guest's
    programs read sizes. Raises :class:`SpecError` naming ``what`` for anything
    else or for a size of 2**63 bytes or more.
    """
    if strict:
        strict_match = _STRICT_SIZE_RE.fullmatch(text) if isinstance(text, str) else None
        if strict_match is None:
            raise SpecError(
                f"invalid {what} {text!r}: expected a whole number with an optional K, M or G"
            )
        number, prefix = strict_match.groups()
        size: float = int(number) * _BINARY[prefix.lower()]
    else:
        match = _SIZE_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise SpecError(f"invalid {what} {text!r}: use a number with a unit, e.g. 256M or 2G")
        number, prefix = match.groups()
        size = float(number) * _BINARY[prefix.lower()]
    if size >= _LIMIT:
        raise SpecError(f"invalid {what} {text!r}: too large")
    return int(size)


def parse_rate(text: str, *, what: str) -> int:
    """Whole bytes per second in a rate such as ``100M``, ``100MiB/s``, ``800mbit`` or
    ``100mbps`` (megabits; see the module doc).

    Raises :class:`SpecError` naming ``what`` for anything else, or for a rate that
    rounds below 1 byte/s or reaches 2**63.
    """
    match = _RATE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise SpecError(f"{what} {text!r}: expected a number with a unit, e.g. 100M or 800mbit")
    number = float(match.group(1))
    unit = match.group(2).lower().removesuffix("/s")
    if unit.endswith("bps"):
        bit_scale = _DECIMAL.get(unit[:-3])
        scale = None if bit_scale is None else bit_scale / 8
    elif unit.endswith(("bits", "bit")):
        bit_scale = _DECIMAL.get(unit.removesuffix("s").removesuffix("bit"))
        scale = None if bit_scale is None else bit_scale / 8
    else:
        byte_scale = _BYTE_UNITS.get(unit)
        scale = None if byte_scale is None else float(byte_scale)
    if scale is None:
        raise SpecError(
            f"{what} {text!r}: unknown unit {match.group(2)!r} "
            "(use K/M/G/T for bytes, kbit/mbit/gbit or kbps/mbps/gbps for bits)"
        )
    exact = number * scale
    if not math.isfinite(exact):
        raise SpecError(f"{what} {text!r}: too large")
    value = round(exact)
    if value < 1:
        raise SpecError(f"{what} {text!r}: must be at least 1 byte/s")
    if value >= _LIMIT:
        raise SpecError(f"{what} {text!r}: too large")
    return value


def parse_tc_rate(text: str, *, what: str) -> float:
    """Bytes per second in a ``tc`` rate such as ``200mbit``, ``1gbit`` or ``10MBps``
    (``bps`` is bytes, as in tc; see the module doc).

    Raises :class:`SpecError` naming ``what`` for anything else (a bare number
    included) or for a rate of 2**63 bytes/s or more. Zero is a rate here: callers
    set their own minimum.
    """
    match = _TC_RATE_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    prefix = _TC_PREFIX.get(match.group(2).lower()) if match is not None else None
    if match is None or prefix is None:
        raise SpecError(
            f"invalid {what} {text!r}: use tc rate syntax such as 100mbit, 1gbit, 50MBps"
        )
    number, _prefix, unit = match.groups()
    bits = float(number) * prefix * (8 if unit.lower() == "bps" else 1)
    if bits / 8 >= _LIMIT:
        raise SpecError(f"invalid {what} {text!r}: too large")
    return bits / 8
