"""Disk images for lab guests: thin raw files with some incompressible data in them."""

from __future__ import annotations

import os
from pathlib import Path

_CHUNK = 4 << 20


def thin_raw_image(path: Path, size: int, data: int = 0, *, offset: int | None = None) -> None:
    """Create (or replace) a sparse raw image of ``size`` bytes holding ``data`` random
    bytes at ``offset`` (default: the middle of the image); the rest is a hole.

    Raises ``ValueError`` when the data does not fit, ``OSError`` when the file cannot
    be written. After a failure the file may exist partly written.
    """
    if size <= 0 or data < 0:
        raise ValueError(f"bad image size {size} or data size {data}")
    start = (size - data) // 2 if offset is None else offset
    if start < 0 or start + data > size:
        raise ValueError(f"{data} bytes at offset {start} do not fit in {size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(start)
        left = data
        while left:
            chunk = min(left, _CHUNK)
            f.write(os.urandom(chunk))
            left -= chunk
