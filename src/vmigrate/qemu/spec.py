"""The VM spec: what a VM is, independent of where it runs."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmigrate import units
from vmigrate.errors import SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiskSpec(_Model):
    """A disk image attached to the VM."""

    path: str
    format: Literal["raw", "qcow2"] = "raw"
    bus: Literal["virtio", "ide", "scsi"] = "virtio"
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = "writeback"
    readonly: bool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not PurePosixPath(value).is_absolute():
            raise ValueError(f"disk path must be absolute, got {value!r}")
        return value


class NicSpec(_Model):
    """A NIC plugged into a bridge on the VM's host."""

    bridge: str
    mac: str
    model: str = "virtio-net-pci"

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", value.lower()):
            raise ValueError(f"not a MAC address: {value!r}")
        return value.lower()


class KernelBoot(_Model):
    """Direct kernel boot instead of firmware booting a disk."""

    kernel: str
    initrd: str | None = None
    append: str = ""


class VMSpec(_Model):
    """Everything needed to build the VM's QEMU command line."""

    name: str
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(ge=16, le=4 * 1024 * 1024)
    machine: str = "pc"
    firmware: Literal["bios"] = "bios"
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    kernel: KernelBoot | None = None
    #: lab guests: the workload chosen on the kernel command line, and the guest's address.
    workload: str | None = None
    ip: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
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
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise SpecError(f"invalid VM spec: {where}: {msg}") from exc


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


def parse_disk(text: str) -> DiskSpec:
    """``PATH[,format=raw|qcow2][,bus=virtio|ide|scsi][,cache=...]`` -> :class:`DiskSpec`."""
    path, *opts = text.split(",")
    fields: dict[str, object] = {"path": path}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in {"format", "bus", "cache", "readonly"}:
            raise SpecError(
                f"invalid disk option {opt!r} in {text!r}: "
                "known options are format=, bus=, cache=, readonly="
            )
        fields[key] = value in {"on", "1", "true", "yes"} if key == "readonly" else value
    try:
        return DiskSpec.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise SpecError(f"invalid disk {text!r}: {msg}") from exc


def parse_nic(text: str, vm: str, index: int) -> NicSpec:
    """``BRIDGE[,mac=MAC][,model=virtio-net-pci|e1000]`` -> :class:`NicSpec`."""
    bridge, *opts = text.split(",")
    fields: dict[str, object] = {"bridge": bridge, "mac": mac_for(vm, index)}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in {"mac", "model"}:
            raise SpecError(
                f"invalid NIC option {opt!r} in {text!r}: known options are mac=, model="
            )
        fields[key] = value
    if not bridge:
        raise SpecError(f"invalid NIC {text!r}: name the bridge first")
    try:
        return NicSpec.model_validate(fields)
    except ValidationError as exc:
        msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise SpecError(f"invalid NIC {text!r}: {msg}") from exc


def mac_for(name: str, index: int = 0) -> str:
    """A stable locally-administered MAC in QEMU's 52:54:00 range for a VM's NIC."""
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def tap_name(name: str, index: int = 0) -> str:
    """A tap device name (<= 15 chars) unique to a VM's NIC."""
    digest = hashlib.sha256(f"{name}/{index}".encode()).hexdigest()[:9]
    return f"vmt{digest}{index}"
