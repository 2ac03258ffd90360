"""The VM spec: what a VM is, independent of where it runs.

Every field has a type and an allowed form (:mod:`vmigrate.validate`), checked when a
spec is built or read back: names, paths (absolute, normalised, no shell or QEMU
metacharacters but the comma, which :func:`vmigrate.qemu.argv.qemu_value` escapes),
bridge names, MAC addresses, the machine type's form and NIC models from
:data:`NIC_MODELS`. What only the host's QEMU can tell (does it know this machine type,
this NIC model) is checked on the host before the VM starts
(:func:`vmigrate.qemu.process.check_host`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmigrate import units, validate
from vmigrate.errors import SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: a QEMU machine type's form (``pc``, ``q35``, ``pc-i440fx-7.2``, ``pc-q35-4.0.1``)
MACHINE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: NIC models a VM may use: QEMU's PCI network devices (``-device help``, Network devices)
NIC_MODELS = frozenset({
    "virtio-net-pci", "virtio-net-pci-transitional", "virtio-net-pci-non-transitional",
    "e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e",
    "rtl8139", "vmxnet3", "ne2k_pci", "pcnet", "tulip",
    "i82550", "i82551", "i82557a", "i82557b", "i82557c", "i82558a", "i82558b",
    "i82559a", "i82559b", "i82559c", "i82559er", "i82562", "i82801",
})
#: the lab guest's workload text (its grammar is checked above this layer)
_WORKLOAD_RE = re.compile(r"[A-Za-z0-9_.:=,+/-]{1,256}")
#: Linux's COMMAND_LINE_SIZE on x86 is 2048 bytes
MAX_APPEND = 2048


class _PartError(SpecError, ValueError):
    """A part of a spec built directly with a wrong field: a :class:`SpecError` for the
    caller, and a ``ValueError`` so that, inside a whole spec's validation, pydantic
    reports it under the part's own place (``disks.0``) like any field error."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Part(_Model):
    """A part of a spec (a disk, a NIC, the kernel) that callers also build directly."""

    def __init__(self, **data: Any) -> None:
        """Built directly (``NicSpec(bridge=..., mac=...)``), a wrong field raises
        :class:`SpecError` naming it, as :func:`build_spec` does: never pydantic's own
        error."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = validate.printable(".".join(str(p) for p in first["loc"]))
            msg = validate.printable(str(first["msg"]).removeprefix("Value error, "))
            raise _PartError(f"invalid {type(self).__name__}: {where}: {msg}") from exc


class DiskSpec(_Part):
    """A disk image attached to the VM."""

    path: str
    format: Literal["raw", "qcow2"] = "raw"
    bus: Literal["virtio", "ide", "scsi"] = "virtio"
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = "writeback"
    readonly: bool = Field(default=False, strict=True)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not PurePosixPath(value).is_absolute():
            raise ValueError(f"disk path must be absolute, got {value!r}")
        return validate.check_path(value, "disk path")


class NicSpec(_Part):
    """A NIC plugged into a bridge on the VM's host."""

    bridge: str
    mac: str
    model: str = "virtio-net-pci"

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", value.lower()):
            raise ValueError(f"not a MAC address: {value!r}")
        if int(value[:2], 16) & 1:
            raise ValueError(f"a NIC needs a unicast MAC address, got {value!r}")
        return value.lower()

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, value: str) -> str:
        return validate.check_ifname(value, "bridge name")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value not in NIC_MODELS:
            raise ValueError(f"unknown NIC model {value[:40]!r} (use one of "
                             "virtio-net-pci, e1000, e1000e, rtl8139, vmxnet3 ...)")
        return value


class KernelBoot(_Part):
    """Direct kernel boot instead of firmware booting a disk."""

    kernel: str
    initrd: str | None = None
    append: str = ""

    @field_validator("kernel", "initrd")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else validate.check_path(value, "kernel file path")

    @field_validator("append")
    @classmethod
    def _append(cls, value: str) -> str:
        return validate.check_text(value, "kernel command line", limit=MAX_APPEND)


#: a QEMU CPU model's name (``qemu64-v1``, ``Skylake-Client-v4``, ``host``) or one of
#: vmigrate's baselines (``x86-64-v2-AES``, see :mod:`vmigrate.qemu.cpu`)
CPU_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: a CPU feature switched on or off on top of the model (``+aes``, ``-x2apic``)
CPU_FEATURE_RE = re.compile(r"[+-][a-z0-9][a-z0-9_.-]{0,63}")


class CpuSpec(_Model):
    """The guest's CPU: a QEMU CPU model, with features switched on (``+``) or off
    (``-``) on top of it. Stored as the host's QEMU resolved it when the VM was
    defined (:func:`vmigrate.qemu.cpu.pin_cpu`)."""

    model: str
    features: tuple[str, ...] = ()
    #: the name it was asked by when that is not QEMU's model (a baseline such as
    #: ``x86-64-v2-AES``, an alias such as ``qemu64``), for people
    name: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not CPU_MODEL_RE.fullmatch(value):
            raise ValueError(f"not a CPU model: {value[:70]!r}")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not CPU_MODEL_RE.fullmatch(value):
            raise ValueError(f"not a CPU model: {value[:70]!r}")
        return value

    @field_validator("features")
    @classmethod
    def _features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for flag in value:
            if not CPU_FEATURE_RE.fullmatch(flag):
                raise ValueError(f"not a CPU feature switched on or off (+aes, -x2apic): "
                                 f"{flag[:70]!r}")
        return value

    def describe(self) -> str:
        """``x86-64-v2-AES (qemu64-v1 +aes +popcnt ...)``, or the model alone."""
        full = " ".join((self.model, *self.features))
        return f"{self.name} ({full})" if self.name and self.name != full else full


class VMSpec(_Model):
    """Everything needed to build the VM's QEMU command line."""

    name: str
    vcpus: int = Field(default=1, ge=1, le=64, strict=True)
    memory_mib: int = Field(ge=16, le=4 * 1024 * 1024, strict=True)
    machine: str = "pc"
    #: None: a VM defined before vmigrate had CPU models; it runs what it ran then
    #: (``host`` under KVM, ``qemu64`` under TCG: :func:`vmigrate.qemu.cpu.effective_cpu`)
    cpu: CpuSpec | None = None
    firmware: Literal["bios"] = "bios"
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    kernel: KernelBoot | None = None
    #: lab guests: the workload chosen on the kernel command line, and the guest's address.
    workload: str | None = None
    ip: str | None = None

    @field_validator("machine")
    @classmethod
    def _machine(cls, value: str) -> str:
        if not MACHINE_RE.fullmatch(value):
            raise ValueError("a machine type is 1-64 of lowercase letters, digits, '.', '_' "
                             f"or '-' (pc, q35, pc-i440fx-7.2 ...); got {value[:70]!r}")
        return value

    @field_validator("workload")
    @classmethod
    def _workload(cls, value: str | None) -> str | None:
        if value is not None and not _WORKLOAD_RE.fullmatch(value):
            raise ValueError(f"not a workload: {value[:70]!r}")
        return value

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return None if value is None else validate.check_ip(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError(
                "VM name must be 1-63 characters of letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit; got {value!r}"
            )
        return value


def build_spec(**fields: object) -> VMSpec:
    """Validate fields into a :class:`VMSpec`, raising :class:`SpecError` on bad input."""
    try:
        return VMSpec.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = validate.printable(".".join(str(p) for p in first["loc"]))
        msg = validate.printable(str(first["msg"]).removeprefix("Value error, "))
        raise SpecError(f"invalid VM spec: {where}: {msg}") from exc


def parse_spec_json(text: str | bytes, *, what: str = "stored VM spec") -> VMSpec:
    """A spec from its JSON form (``spec.json``, the store), validated like a new one.

    Raises :class:`SpecError` naming the field for anything that is not a valid spec."""
    try:
        return VMSpec.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = validate.printable(".".join(str(p) for p in first["loc"])) or "(document)"
        msg = validate.printable(str(first["msg"]).removeprefix("Value error, "))
        raise SpecError(f"invalid {what}: {where}: {msg}") from exc


def parse_size(text: str, *, what: str = "size") -> int:
    """``'256M'`` -> bytes. Bare numbers are bytes (:func:`vmigrate.units.parse_size`).

    Raises :class:`SpecError` naming ``what``."""
    return units.parse_size(text, what=what)


def parse_memory(text: str) -> int:
    """``'256M'`` -> MiB. A bare number means MiB, as in QEMU's ``-m``."""
    if text.strip().isdigit():
        mib = int(text)
    else:
        mib = parse_size(text, what="memory size") // (1024 * 1024)
    if mib < 16:
        raise SpecError(f"invalid memory size {text!r}: at least 16M is needed")
    return mib


_ON, _OFF = {"on", "1", "true", "yes"}, {"off", "0", "false", "no"}


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def split_options(text: str) -> list[str]:
    """``a,,b,x=1`` -> ``["a,b", "x=1"]``: the CLI's ``VALUE,KEY=V`` lists, where, as in
    QEMU, a doubled comma is a literal comma (a path that holds one)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def parse_disk(text: str) -> DiskSpec:
    """``PATH[,format=raw|qcow2][,bus=virtio|ide|scsi][,cache=...][,readonly=on|off]``
    -> :class:`DiskSpec`; a comma in PATH is written ``,,``."""
    path, *opts = split_options(text)
    fields: dict[str, object] = {"path": path}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in {"format", "bus", "cache", "readonly"}:
            raise SpecError(
                f"invalid disk option {_short(opt)} in {_short(text)}: "
                "known options are format=, bus=, cache=, readonly= (a comma in the "
                "path is written ',,')"
            )
        if key == "readonly":
            if value not in _ON | _OFF:
                raise SpecError(f"invalid disk {_short(text)}: readonly= is on or off")
            fields[key] = value in _ON
        else:
            fields[key] = value
    try:
        return DiskSpec.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = validate.printable(str(first["msg"]).removeprefix("Value error, "))
        raise SpecError(f"invalid disk {_short(text)}: {msg}") from exc


def parse_nic(text: str, vm: str, index: int) -> NicSpec:
    """``BRIDGE[,mac=MAC][,model=virtio-net-pci|e1000]`` -> :class:`NicSpec`."""
    bridge, *opts = text.split(",")
    fields: dict[str, object] = {"bridge": bridge, "mac": mac_for(vm, index)}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in {"mac", "model"}:
            raise SpecError(
                f"invalid NIC option {_short(opt)} in {_short(text)}: known options are "
                "mac=, model="
            )
        fields[key] = value
    if not bridge:
        raise SpecError(f"invalid NIC {_short(text)}: name the bridge first")
    try:
        return NicSpec.model_validate(fields)
    except ValidationError as exc:
        msg = validate.printable(str(exc.errors()[0]["msg"]).removeprefix("Value error, "))
        raise SpecError(f"invalid NIC {_short(text)}: {msg}") from exc


def mac_for(name: str, index: int = 0) -> str:
    """A stable locally-administered MAC in QEMU's 52:54:00 range for a VM's NIC."""
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def tap_name(name: str, index: int = 0) -> str:
    """A tap device name (<= 15 chars) unique to a VM's NIC."""
    digest = hashlib.sha256(f"{name}/{index}".encode()).hexdigest()[:9]
    return f"vmt{digest}{index}"
