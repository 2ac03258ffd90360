"""The lab guest's workload language, and the kernel command line that carries it (pure).

The guest is configured on the kernel command line (:func:`kernel_cmdline`):
its address, gateway and workloads (:class:`Workload`; several run at once when
joined with ``+``, see :func:`parse_workloads`).  The guest programs that run
them are built into the image by :mod:`vmigrate.lab.image`.  What the guest
prints on its console is documented in ``guest/init``, ``guest/memtouch.c``
and ``guest/diskwrite.c``; the records ``diskwrite`` writes are read back by
:mod:`vmigrate.lab.records`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from vmigrate import units
from vmigrate.errors import SpecError

__all__ = [
    "MAX_WORKLOADS",
    "WORKLOAD_DEFAULTS",
    "WORKLOAD_SEPARATOR",
    "Workload",
    "WorkloadKind",
    "format_workloads",
    "kernel_cmdline",
    "parse_size",
    "parse_workload",
    "parse_workloads",
]

WorkloadKind = Literal["memtouch", "diskwrite", "idle"]
_KINDS: tuple[str, ...] = get_args(WorkloadKind)

#: What each workload uses for a parameter that is not given.
WORKLOAD_DEFAULTS: Mapping[str, Mapping[str, str]] = {
    "memtouch": {"wss": "64M", "rate": "0"},
    "diskwrite": {"dev": "/dev/vdb", "rate": "50", "size": "4096"},
    "idle": {},
}

#: How many workloads one guest may run at once (``memtouch+diskwrite+...``).
MAX_WORKLOADS = 4
#: What joins several workloads in their text form.
WORKLOAD_SEPARATOR = "+"

_INT_RE = re.compile(r"[0-9]{1,12}")
_DEV_RE = re.compile(r"/dev/[A-Za-z0-9_][A-Za-z0-9_./-]*")
_PARAM_RE = re.compile(r"[a-z]+")


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse a size such as ``4096``, ``64K``, ``256M`` or ``1G`` (binary units), as the
    guest programs read it (:func:`vmigrate.units.parse_size` with ``strict``).

    Raises :class:`SpecError` naming ``what`` when ``text`` is not such a size.
    """
    return units.parse_size(text, what=what, strict=True)


def _parse_int(text: str, what: str) -> int:
    if _INT_RE.fullmatch(text) is None:
        raise SpecError(f"bad {what} {text!r}: expected a non-negative integer")
    return int(text)


def _check_wss(value: str) -> None:
    size = parse_size(value, what="memtouch wss")
    if not 4096 <= size <= 1 << 40:
        raise SpecError(f"bad memtouch wss {value!r}: must be between 4K and 1024G")


def _check_memtouch_rate(value: str) -> None:
    _parse_int(value, "memtouch rate (pages per second)")


def _check_dev(value: str) -> None:
    if _DEV_RE.fullmatch(value) is None or ".." in value:
        raise SpecError(f"bad diskwrite dev {value!r}: expected a device path such as /dev/vdb")


def _check_diskwrite_rate(value: str) -> None:
    _parse_int(value, "diskwrite rate (records per second)")


def _check_record_size(value: str) -> None:
    size = parse_size(value, what="diskwrite size")
    if size % 512 or not 512 <= size <= 1 << 20:
        raise SpecError(
            f"bad diskwrite size {value!r}: must be a multiple of 512 between 512 and 1M"
        )


_VALIDATORS: Mapping[str, Mapping[str, Callable[[str], None]]] = {
    "memtouch": {"wss": _check_wss, "rate": _check_memtouch_rate},
    "diskwrite": {
        "dev": _check_dev,
        "rate": _check_diskwrite_rate,
        "size": _check_record_size,
    },
    "idle": {},
}


@dataclass(frozen=True)
class Workload:
    """What the guest runs after boot, and with which parameters.

    ``params`` holds only the parameters that were given, as text (see
    :data:`WORKLOAD_DEFAULTS` and :meth:`effective_params` for the rest).
    Constructing a ``Workload`` validates it: an unknown kind, an unknown
    parameter or a bad value raises :class:`SpecError`.  ``str()`` gives the
    text form that :func:`parse_workload` reads back.
    """

    kind: WorkloadKind
    params: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise SpecError(f"unknown workload {self.kind!r}: expected one of {', '.join(_KINDS)}")
        allowed = _VALIDATORS[self.kind]
        for name, value in self.params.items():
            check = allowed.get(name)
            if check is None:
                known = ", ".join(allowed) or "none"
                raise SpecError(
                    f"unknown parameter {name!r} for workload {self.kind} (known: {known})"
                )
            check(value)

    def effective_params(self) -> dict[str, str]:
        """The parameters the guest program will use: defaults overlaid with ``params``."""
        return {**WORKLOAD_DEFAULTS[self.kind], **self.params}

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_workload(text: str) -> Workload:
    """Parse ``KIND[:name=value,...]``, e.g. ``memtouch:wss=256M,rate=50000``.

    Kinds: ``memtouch`` (``wss`` size, ``rate`` pages/s, 0 = flat out),
    ``diskwrite`` (``dev`` path, ``rate`` records/s, ``size`` bytes per record)
    and ``idle``.  Raises :class:`SpecError` on anything else.  One workload
    only: :func:`parse_workloads` reads several joined with ``+``.
    """
    kind, sep, rest = text.strip().partition(":")
    if kind not in _KINDS:
        raise SpecError(f"unknown workload {kind!r}: expected one of {', '.join(_KINDS)}")
    params: dict[str, str] = {}
    if sep:
        if not rest:
            raise SpecError(f"workload {text!r}: no parameters after ':'")
        for item in rest.split(","):
            name, eq, value = item.partition("=")
            if not eq or _PARAM_RE.fullmatch(name) is None or not value:
                raise SpecError(f"workload {text!r}: expected name=value, got {item!r}")
            if name in params:
                raise SpecError(f"workload {text!r}: parameter {name!r} given twice")
            params[name] = value
    return Workload(kind, params)  # type: ignore[arg-type]  # checked against _KINDS above


def _check_together(workloads: Sequence[Workload]) -> None:
    """Raise :class:`SpecError` unless ``workloads`` can run in one guest at once."""
    if not workloads:
        raise SpecError("no workload given")
    if len(workloads) > MAX_WORKLOADS:
        raise SpecError(f"{len(workloads)} workloads: at most {MAX_WORKLOADS} run at once")
    kinds = [w.kind for w in workloads]
    if len(workloads) > 1 and "idle" in kinds:
        raise SpecError("idle runs nothing: it cannot be joined with other workloads")
    if kinds.count("memtouch") > 1:
        raise SpecError("at most one memtouch workload per guest")
    devices: set[str] = set()
    for w in workloads:
        if w.kind == "diskwrite":
            dev = w.effective_params()["dev"]
            if dev in devices:
                raise SpecError(f"two diskwrite workloads on {dev}: give each its own dev=")
            devices.add(dev)


def parse_workloads(text: str) -> tuple[Workload, ...]:
    """Parse one workload or several joined with ``+``, each as :func:`parse_workload`.

    E.g. ``memtouch:wss=64M,rate=5000+diskwrite:dev=/dev/vda+diskwrite:dev=/dev/vdb``;
    the guest starts them all at once.  Raises :class:`SpecError` when a part
    is bad or empty, when there are more than :data:`MAX_WORKLOADS`, when
    ``idle`` is joined with anything, when ``memtouch`` appears twice, or when
    two ``diskwrite`` share a device (their default ``dev`` included).
    :func:`format_workloads` gives the text back.
    """
    parts = text.strip().split(WORKLOAD_SEPARATOR)
    if len(parts) > MAX_WORKLOADS:
        raise SpecError(
            f"workload {text!r}: {len(parts)} parts, at most {MAX_WORKLOADS} run at once"
        )
    workloads: list[Workload] = []
    for part in parts:
        if not part.strip():
            raise SpecError(f"workload {text!r}: empty part between '+'")
        workloads.append(parse_workload(part))
    _check_together(workloads)
    return tuple(workloads)


def format_workloads(workloads: Workload | Sequence[Workload]) -> str:
    """The text form :func:`parse_workloads` reads back (parts joined with ``+``).

    Raises :class:`SpecError` when the workloads cannot run together (the
    rules of :func:`parse_workloads`; an empty sequence included).
    """
    seq = (workloads,) if isinstance(workloads, Workload) else tuple(workloads)
    _check_together(seq)
    return WORKLOAD_SEPARATOR.join(str(w) for w in seq)


def kernel_cmdline(
    *,
    ip: str | None = None,
    gateway: str | None = None,
    workload: Workload | Sequence[Workload] | None = None,
    extra: str = "",
) -> str:
    """The kernel command line for the lab guest.

    ``ip`` is ``ADDR/PREFIX`` for eth0; ``gateway`` an address; ``workload``
    one workload or several to run at once (``vmigrate.workload=A+B``).
    Raises :class:`SpecError` when an address is malformed or the workloads
    cannot run together (see :func:`format_workloads`).  ``extra`` is
    appended as is.
    """
    # pti=on: under TCG, QEMU 7.2 misses guest writes made through TLB entries that
    # stay cached across a dirty-bitmap sync, so a busy guest's kernel data can arrive
    # stale (seen: oopses and hangs on the destination after multi-pass migrations,
    # 4 of 6 runs). Page-table isolation reloads CR3 at every kernel entry, which
    # flushes TCG's TLB; with it, 0 of 6. KVM tracks dirty pages in hardware.
    parts = ["console=ttyS0", "panic=-1", "pti=on"]
    if ip is not None:
        try:
            if "/" not in ip:
                raise ValueError("no prefix length")
            iface = ipaddress.ip_interface(ip)
        except ValueError as exc:
            raise SpecError(f"bad guest address {ip!r}: expected ADDR/PREFIX ({exc})") from exc
        parts.append(f"vmigrate.ip={iface.with_prefixlen}")
    if gateway is not None:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError as exc:
            raise SpecError(f"bad gateway address {gateway!r}") from exc
        parts.append(f"vmigrate.gw={gw}")
    if workload is not None:
        parts.append(f"vmigrate.workload={format_workloads(workload)}")
    if extra.strip():
        parts.append(extra.strip())
    return " ".join(parts)

