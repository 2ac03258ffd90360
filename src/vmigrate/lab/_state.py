"""The lab's state file, ``<home>/labs/<name>/state.json``.

Write-ahead: every resource is appended to the file (atomically replaced and
fsynced) *before* it is created, so teardown after a crash removes exactly
what may exist. Format::

    {"magic": "vmigrate-lab-state", "version": 2, "name": "vml", "index": 1,
     "hosts": 2, "link_rate": "1gbit",
     "uplinks": {"h1": "1gbit", "h2": "1gbit"},
     "downlinks": {"h1": "1gbit", "h2": "200mbit"},
     "phase": "building" | "up", "created": 1700000000.0,
     "resources": [{"kind": "netns", "name": "vml-h1"}, ...]}

``link_rate`` is the lab's default rate; ``uplinks`` and ``downlinks`` the rate each
host's migration link is shaped to now, host -> switch and switch -> host. Version 1
(written before links had directions) had one ``rates`` map for both; it is read as
that rate in both directions, and written back as version 2.

Resource kinds: ``dir`` (path), ``netns`` (name), ``link`` (name, netns or
null for the root namespace), ``sshd`` (name = host, netns, path = pidfile),
``inventory`` (path). Reading validates the magic, the version and every
field, and raises :class:`LabError` for anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from vmigrate.errors import LabError

MAGIC = "vmigrate-lab-state"
VERSION = 2
_READS = (1, 2)
STATE_NAME = "state.json"

Kind = Literal["dir", "netns", "link", "sshd", "inventory"]
Phase = Literal["building", "up"]
_KINDS: tuple[str, ...] = get_args(Kind)
_PHASES: tuple[str, ...] = get_args(Phase)


@dataclass(frozen=True)
class Resource:
    """One thing the lab created (or was about to create)."""

    kind: Kind
    name: str = ""
    netns: str | None = None
    path: str | None = None


@dataclass
class LabState:
    """What a lab is made of; see the module docstring for the file format."""

    name: str
    index: int
    hosts: int
    link_rate: str
    created: float
    phase: Phase = "building"
    uplinks: dict[str, str] = field(default_factory=dict)
    downlinks: dict[str, str] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)

    def link_rates(self, host: str) -> tuple[str, str]:
        """(uplink, downlink) rate of ``host``, tc syntax; the lab's default for a
        direction not recorded."""
        return (self.uplinks.get(host, self.link_rate), self.downlinks.get(host, self.link_rate))

    def to_json(self) -> str:
        data: dict[str, Any] = {"magic": MAGIC, "version": VERSION}
        data.update(asdict(self))
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> LabState:
        """Parse and validate; raises :class:`LabError` naming ``source``."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LabError(f"{source}: lab state is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("magic") != MAGIC:
            raise LabError(f"{source}: not a vmigrate lab state file (bad magic)")
        version = data.get("version")
        if isinstance(version, bool) or version not in _READS:
            raise LabError(
                f"{source}: lab state version {version!r} is not known "
                f"(this vmigrate reads versions {', '.join(map(str, _READS))})"
            )
        try:
            if version == 1:
                uplinks = downlinks = _str_dict(data.get("rates", {}), "rates")
            else:
                uplinks = _str_dict(data.get("uplinks", {}), "uplinks")
                downlinks = _str_dict(data.get("downlinks", {}), "downlinks")
            return cls(
                name=_typed(data, "name", str),
                index=_typed(data, "index", int),
                hosts=_typed(data, "hosts", int),
                link_rate=_typed(data, "link_rate", str),
                created=float(_typed(data, "created", (int, float))),
                phase=cast(Phase, _choice(data, "phase", _PHASES)),
                uplinks=uplinks,
                downlinks=dict(downlinks),
                resources=[_resource(r) for r in _typed(data, "resources", list)],
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise LabError(f"{source}: invalid lab state: {exc}") from exc


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _typed(data, key, str)
    if value not in choices:
        raise ValueError(f"field {key!r} is {value!r}, not one of {choices}")
    return cast(str, value)


def _str_dict(value: object, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError(f"field {key!r} must map host names to rate strings")
    return dict(value)


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"resource field {key!r} must be a string or null")
    return value


def _resource(raw: object) -> Resource:
    if not isinstance(raw, dict):
        raise TypeError("a resource must be an object")
    unknown = set(raw) - {"kind", "name", "netns", "path"}
    if unknown:
        raise ValueError(f"unknown resource fields {sorted(unknown)}")
    return Resource(
        kind=cast(Kind, _choice(raw, "kind", _KINDS)),
        name=_typed(raw, "name", str) if "name" in raw else "",
        netns=_opt_str(raw, "netns"),
        path=_opt_str(raw, "path"),
    )


def read_state(path: Path) -> LabState:
    """Read a state file. Raises :class:`FileNotFoundError` if absent,
    :class:`LabError` if unreadable or invalid."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LabError(f"cannot read lab state {path}: {exc}") from exc
    return LabState.from_json(text, str(path))


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` atomically (temp file, fsync, rename, fsync dir).
    On failure the old content is intact; raises :class:`OSError`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_state(path: Path, state: LabState) -> None:
    """Write ``state`` atomically; raises :class:`LabError` on I/O failure."""
    try:
        atomic_write(path, state.to_json())
    except OSError as exc:
        raise LabError(f"cannot write lab state {path}: {exc}") from exc
