"""CPU models and machine types: what a guest sees of its hardware, and whether a
host's QEMU can give it the same. Pure: no I/O.

A guest keeps the CPU and the machine it booted with for as long as it runs, across
live migrations: a destination whose QEMU lacks the machine type cannot take it, and
one that cannot give every CPU feature the guest saw (``sse4.2``, ``aes``, ``avx2``
...) takes a guest that crashes the first time it uses one. So:

* a VM is defined with a CPU model (:class:`~vmigrate.qemu.spec.CpuSpec`): by default
  the fleet's baseline :data:`DEFAULT_CPU` (``x86-64-v2-AES``, as Proxmox VE uses),
  never ``host``, which passes the host's own CPU through and is migratable only
  between hosts the inventory declares identical (``cpu_group``);
* its machine type is pinned when it is defined: the alias ``pc`` becomes the
  versioned type the host's QEMU resolves it to (``pc-i440fx-7.2``), as libvirt does,
  so a QEMU upgrade on one host does not change the guest's hardware under it;
* before a live or online migration, :func:`check_cpu` and :func:`check_machine`
  compare what the source's QEMU gives the guest with what the destination's QEMU
  offers.

The facts come from QEMU itself (``query-machines``, ``query-cpu-definitions``,
``query-cpu-model-expansion`` of type ``static``), asked by
:mod:`vmigrate.qemu.probe` on a host and by the driver's monitor of a running VM, and
are parsed here into a :class:`QemuOffer`. Malformed replies raise
:class:`~vmigrate.errors.QemuError`.

QEMU 7.2 has no ``x86-64-v2``-style models: :data:`BASELINES` defines them, as Proxmox
VE does, as ``qemu64`` plus the features of each x86-64 micro-architecture level (and
without ``svm``, which QEMU gives ``qemu64`` under TCG only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmigrate.errors import QemuError, SpecError
from vmigrate.qemu.spec import CPU_FEATURE_RE, CPU_MODEL_RE, CpuSpec

# qemu64 is an AMD-flavoured model with svm (nested virtualisation), which QEMU turns
# off under KVM anyway; a baseline meant for every host of a fleet leaves it off
_V2 = ("+popcnt", "+pni", "+sse4.1", "+sse4.2", "+ssse3", "-svm")
_V3 = ("+aes", *_V2, "+avx", "+avx2", "+bmi1", "+bmi2", "+f16c", "+fma", "+abm", "+movbe",
       "+xsave")
#: vmigrate's named baselines: ``name -> (QEMU model, features switched on or off)``
BASELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "x86-64-v2": ("qemu64", _V2),
    "x86-64-v2-AES": ("qemu64", ("+aes", *_V2)),
    "x86-64-v3": ("qemu64", _V3),
    "x86-64-v4": ("qemu64", (*_V3, "+avx512f", "+avx512bw", "+avx512cd", "+avx512dq",
                             "+avx512vl")),
}
#: the CPU model a VM gets when neither the request nor the inventory names one
DEFAULT_CPU = "x86-64-v2-AES"
#: models that pass the host's CPU through (QEMU says they are not migration-safe):
#: only for hosts the inventory declares identical
HOST_MODELS = frozenset({"host", "max"})
#: what a spec without a CPU model (defined before vmigrate had them) runs, by accelerator
LEGACY_CPU = {"kvm": "host", "tcg": "qemu64"}
#: the model whose expansion says everything the host's QEMU and CPU can give a guest
OFFER_MODEL = "max"


def _canon(name: str) -> str:
    """A feature name as QEMU compares it: ``sse4_2``, ``sse4-2`` and ``sse4.2`` alike."""
    return name.lower().replace("_", "-").replace(".", "-")


def parse_cpu(text: str) -> CpuSpec:
    """``MODEL[,+FEATURE|-FEATURE|FEATURE=on|off ...]`` -> a :class:`CpuSpec` as asked
    (baselines expanded, nothing resolved against a QEMU yet: see :func:`pin_cpu`).

    Raises :class:`SpecError` naming what is wrong."""
    model, *opts = text.split(",")
    if not CPU_MODEL_RE.fullmatch(model):
        raise SpecError(f"invalid CPU model {model[:70]!r}: 1-64 letters, digits, '.', '_' "
                        "or '-' (x86-64-v2-AES, Nehalem, host ...)")
    features: dict[str, str] = {}  # by the name QEMU compares: the flag as written
    name: str | None = None
    if model in BASELINES:
        name = model
        model, flags = BASELINES[model]
        features.update({_canon(f[1:]): f for f in flags})
    for opt in opts:
        key, sep, value = opt.partition("=")
        if sep:
            if value not in ("on", "off"):
                raise SpecError(f"invalid CPU feature {opt[:70]!r} in --cpu: use +FEATURE, "
                                "-FEATURE or FEATURE=on|off")
            flag = ("+" if value == "on" else "-") + key
        else:
            flag = key
        if not CPU_FEATURE_RE.fullmatch(flag):
            raise SpecError(f"invalid CPU feature {opt[:70]!r} in --cpu: use +FEATURE, "
                            "-FEATURE or FEATURE=on|off")
        features.pop(_canon(flag[1:]), None)  # the last word on a feature wins
        features[_canon(flag[1:])] = flag
    if features and model in HOST_MODELS:
        raise SpecError(f"CPU model {model} takes the host's features as they are: it "
                        "takes no +FEATURE or -FEATURE")
    return CpuSpec(model=model, features=tuple(features.values()), name=name)


def effective_cpu(cpu: CpuSpec | None, accel: str) -> CpuSpec:
    """The CPU a spec runs with: its own, or for a spec without one what vmigrate ran
    before it had CPU models (:data:`LEGACY_CPU`)."""
    return cpu if cpu is not None else CpuSpec(model=LEGACY_CPU.get(accel, "qemu64"))


def expansion_key(cpu: CpuSpec) -> str:
    """A CPU as one string (``qemu64-v1,+aes,-x2apic``): the key of its expansion."""
    return ",".join((cpu.model, *cpu.features))


def expansion_arguments(cpu: CpuSpec) -> dict[str, object]:
    """``query-cpu-model-expansion``'s arguments for ``cpu`` (type ``static``: only
    CPUID features, by their canonical names)."""
    model: dict[str, object] = {"name": cpu.model}
    if cpu.features:
        model["props"] = {f[1:]: f[0] == "+" for f in cpu.features}
    return {"type": "static", "model": model}


# -- what QEMU says ---------------------------------------------------------------------


@dataclass(frozen=True)
class MachineType:
    """One entry of ``query-machines``."""

    name: str
    alias: str | None = None
    is_default: bool = False
    deprecated: bool = False


@dataclass(frozen=True)
class CpuDefinition:
    """One entry of ``query-cpu-definitions``."""

    name: str
    #: the features of the model this QEMU cannot give a guest on this host (with its
    #: accelerator): QEMU drops them from the guest's CPU unless told to enforce
    unavailable: tuple[str, ...] = ()
    #: the versioned model an alias stands for (``qemu64`` -> ``qemu64-v1``)
    alias_of: str | None = None
    migration_safe: bool = True
    deprecated: bool = False


@dataclass(frozen=True)
class CpuExpansion:
    """A static expansion of a CPU model: the features a guest running it sees."""

    features: frozenset[str]
    #: what is not a feature: family, model, stepping, vendor, model-id ...
    props: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class QemuOffer:
    """What one QEMU (a host's binary with the host's accelerator, or the process that
    runs a VM) says it offers."""

    version: tuple[int, int, int]
    accel: str
    machines: tuple[MachineType, ...]
    cpus: tuple[CpuDefinition, ...]
    #: every CPU feature this QEMU knows (the keys of a static expansion)
    known_features: frozenset[str]
    #: by :func:`expansion_key`: the expansion, or QEMU's error for a CPU it cannot expand
    expansions: Mapping[str, CpuExpansion | str] = field(default_factory=dict)

    # -- machines

    def resolve_machine(self, name: str) -> str | None:
        """The versioned machine type ``name`` stands for here (an alias resolved,
        a versioned type as it is), or None when this QEMU does not know it."""
        for m in self.machines:
            if m.alias == name:
                return m.name
        return name if any(m.name == name for m in self.machines) else None

    def newest_like(self, name: str) -> str | None:
        """The machine type here of the same family as ``name`` that an alias points to
        (``pc-i440fx-7.1`` for ``pc-i440fx-7.2``), for messages."""
        family = re.sub(r"-\d+(\.\d+)*$", "", name)
        for m in self.machines:
            if m.alias is not None and m.name.startswith(family + "-"):
                return m.name
        return None

    # -- CPUs

    def definition(self, model: str) -> CpuDefinition | None:
        return next((c for c in self.cpus if c.name == model), None)

    def expansion(self, cpu: CpuSpec) -> CpuExpansion | str:
        """The expansion asked for ``cpu``, or why there is none."""
        got = self.expansions.get(expansion_key(cpu))
        if got is None:
            return f"the expansion of {expansion_key(cpu)} was not asked for"
        return got

    def canonical_feature(self, name: str) -> str | None:
        """QEMU's own name of a feature (``sse4_2`` -> ``sse4.2``), None if unknown."""
        want = _canon(name)
        return next((f for f in sorted(self.known_features) if _canon(f) == want), None)


# -- parsing QEMU's replies ---------------------------------------------------------------


def _bad(what: str, value: object) -> QemuError:
    return QemuError(f"QEMU's {what} reply is not what QEMU sends: {str(value)[:120]!r}")


def _entries(reply: object, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(reply, list) or not all(isinstance(e, Mapping) for e in reply):
        raise _bad(what, reply)
    return list(reply)


def _text(entry: Mapping[str, Any], key: str, what: str, *, required: bool = True
          ) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(what, entry)
    return value


def parse_machines(reply: object) -> tuple[MachineType, ...]:
    """``query-machines``' return value -> its machine types."""
    out = []
    for e in _entries(reply, "query-machines"):
        out.append(MachineType(
            name=_text(e, "name", "query-machines") or "",
            alias=_text(e, "alias", "query-machines", required=False),
            is_default=e.get("is-default") is True, deprecated=e.get("deprecated") is True))
    return tuple(out)


def parse_machine_help(text: str) -> tuple[MachineType, ...]:
    """``qemu -machine help``'s output -> its machine types (aliases as QEMU lists them:
    ``pc   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)``)."""
    aliases: dict[str, str] = {}
    rows: list[tuple[str, str]] = []
    for line in text.splitlines()[1:]:
        m = re.match(r"^([a-z0-9][a-z0-9._-]*)\s+(.*)$", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    for name, desc in rows:
        alias = re.search(r"\(alias of ([a-z0-9][a-z0-9._-]*)\)", desc)
        if alias:
            aliases[alias.group(1)] = name
    return tuple(MachineType(name=name, alias=aliases.get(name),
                             is_default="(default)" in desc, deprecated="(deprecated)" in desc)
                 for name, desc in rows if "(alias of " not in desc)


def parse_cpu_definitions(reply: object) -> tuple[CpuDefinition, ...]:
    """``query-cpu-definitions``' return value -> its models."""
    out = []
    for e in _entries(reply, "query-cpu-definitions"):
        unavailable = e.get("unavailable-features", [])
        if not isinstance(unavailable, list) or not all(
                isinstance(f, str) for f in unavailable):
            raise _bad("query-cpu-definitions", e)
        out.append(CpuDefinition(
            name=_text(e, "name", "query-cpu-definitions") or "",
            unavailable=tuple(unavailable),
            alias_of=_text(e, "alias-of", "query-cpu-definitions", required=False),
            migration_safe=e.get("migration-safe") is not False,
            deprecated=e.get("deprecated") is True))
    return tuple(out)


def parse_expansion(reply: object) -> tuple[CpuExpansion, frozenset[str]]:
    """``query-cpu-model-expansion``'s (static) return value -> the expansion and every
    feature it names (true or false: the features this QEMU knows)."""
    model = reply.get("model") if isinstance(reply, Mapping) else None
    props = model.get("props", {}) if isinstance(model, Mapping) else None
    if not isinstance(props, Mapping) or not all(isinstance(k, str) for k in props):
        raise _bad("query-cpu-model-expansion", reply)
    on = frozenset(k for k, v in props.items() if v is True)
    known = frozenset(k for k, v in props.items() if isinstance(v, bool))
    return CpuExpansion(features=on, props={k: v for k, v in props.items()
                                            if not isinstance(v, bool)}), known


def make_offer(*, version: object, accel: str, machines: object, cpus: object,
               expansions: Mapping[str, Mapping[str, Any]]) -> QemuOffer:
    """A :class:`QemuOffer` from QEMU's replies: ``query-version``'s and the others'
    return values, and per :func:`expansion_key` the whole reply to its expansion
    (``{"return": ...}`` or ``{"error": {"desc": ...}}``)."""
    q = version.get("qemu") if isinstance(version, Mapping) else None
    try:
        ver = (int(q["major"]), int(q["minor"]), int(q["micro"]))  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise _bad("query-version", version) from exc
    known: set[str] = set()
    out: dict[str, CpuExpansion | str] = {}
    for key, reply in expansions.items():
        if "return" in reply:
            exp, names = parse_expansion(reply["return"])
            known |= names
            out[key] = exp
        else:
            err = reply.get("error")
            desc = err.get("desc") if isinstance(err, Mapping) else None
            out[key] = str(desc) if desc else "QEMU refused to expand it"
    return QemuOffer(version=ver, accel=accel, machines=parse_machines(machines),
                     cpus=parse_cpu_definitions(cpus), known_features=frozenset(known),
                     expansions=out)


# -- defining a VM ---------------------------------------------------------------------------


def pin_machine(machine: str, offer: QemuOffer, host: str) -> str:
    """The versioned machine type to store for a VM defined with ``machine`` on a host
    whose QEMU says ``offer``. Raises :class:`SpecError` when that QEMU lacks it."""
    pinned = offer.resolve_machine(machine)
    if pinned is None:
        raise SpecError(f"machine type {machine!r} is unknown to QEMU on host {host} "
                        "(see 'qemu-system-x86_64 -machine help' there)")
    return pinned


def pin_cpu(cpu: CpuSpec, offer: QemuOffer, host: str) -> CpuSpec:
    """``cpu`` as it is stored: an alias resolved to the versioned model it stands for
    on this QEMU (``qemu64`` -> ``qemu64-v1``), features by QEMU's own names. Raises
    :class:`SpecError` for a model or feature this QEMU does not know."""
    if cpu.model in HOST_MODELS:
        return cpu
    definition = offer.definition(cpu.model)
    if definition is None:
        raise SpecError(f"CPU model {cpu.model!r} is unknown to QEMU on host {host} (see "
                        "'qemu-system-x86_64 -cpu help' there)")
    flags = []
    for flag in cpu.features:
        name = offer.canonical_feature(flag[1:])
        if name is None:
            raise SpecError(f"CPU feature {flag[1:]!r} is unknown to QEMU on host {host}")
        flags.append(flag[0] + name)
    name = cpu.name or (cpu.model if definition.alias_of else None)
    return CpuSpec(model=definition.alias_of or cpu.model, features=tuple(flags), name=name)


def unavailable(cpu: CpuSpec, offer: QemuOffer, *, limit: CpuSpec | None = None
                ) -> tuple[str, ...]:
    """The features of ``cpu`` the host of ``offer`` cannot give a guest, sorted: those
    QEMU itself says its model lacks there (``query-cpu-definitions``), those switched
    on that its ``max`` does not offer, and (``limit``: the inventory's ``cpu_limit``)
    those beyond the limit's model. ``offer`` must hold the expansions of ``cpu``,
    :data:`OFFER_MODEL` and ``limit``."""
    wanted = offer.expansion(cpu)
    if isinstance(wanted, str):
        raise SpecError(f"QEMU cannot expand CPU model {expansion_key(cpu)}: {wanted}")
    missing = _lacks(cpu, offer)
    if limit is not None:
        missing |= wanted.features - _bound(offer, limit)
    return features_of(missing)


def _lacks(cpu: CpuSpec, offer: QemuOffer) -> set[str]:
    """What the host of ``offer`` cannot give of ``cpu`` (see :func:`unavailable`),
    by QEMU's names."""
    definition = offer.definition(cpu.model)
    lacks = {offer.canonical_feature(f) or f for f in definition.unavailable} if (
        definition is not None) else set()
    top = offer.expansions.get(OFFER_MODEL)
    for flag in cpu.features:
        name = offer.canonical_feature(flag[1:]) or flag[1:]
        if flag[0] == "-":
            lacks.discard(name)
        elif isinstance(top, CpuExpansion) and name not in top.features:
            lacks.add(name)
    return lacks


def _bound(offer: QemuOffer, limit: CpuSpec) -> frozenset[str]:
    """The features of the limit's model (none when this QEMU cannot expand it)."""
    bound = offer.expansion(limit)
    return bound.features if isinstance(bound, CpuExpansion) else frozenset()


# -- before a migration --------------------------------------------------------------------


@dataclass(frozen=True)
class CpuCheck:
    """Whether a destination can give the guest every CPU feature it has now."""

    cpu: str
    #: features the guest has that the destination cannot give, sorted
    missing: tuple[str, ...] = ()
    #: other reasons it cannot take the guest (the model unknown there ...)
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing and not self.problems

    def explain(self, src: str, dst: str) -> str:
        """One line for the operator."""
        parts = list(self.problems)
        if self.missing:
            parts.append(f"{dst} cannot give the guest's CPU ({self.cpu}) these features it "
                         f"has on {src}: {', '.join(self.missing)}")
        return "; ".join(parts)


def check_cpu(cpu: CpuSpec, src: QemuOffer, dst: QemuOffer, *, dst_name: str,
              dst_limit: CpuSpec | None = None, identical: bool = False,
              explicit: bool = True) -> CpuCheck:
    """Compare what the guest's CPU has on the source (``src``: the QEMU that runs it)
    with what the destination (``dst``: the QEMU that would, its host's CPU and the
    inventory's ``cpu_limit``) can give.

    The guest has the features of its model that its source could give (QEMU dropped
    the others when it started: :func:`unavailable`); the destination must give every
    one of them, in its own expansion of the model, and within ``dst_limit``. ``host``
    and ``max`` pass the host's CPU through: chosen on purpose (``explicit``) they need
    hosts declared ``identical``; a spec without a model (vmigrate's older VMs, ``host``
    under KVM) is checked by its features only."""
    problems: list[str] = []
    if cpu.model in HOST_MODELS and explicit and not identical:
        problems.append(f"CPU model {cpu.model} passes the host's CPU through: the "
                        f"inventory does not declare {dst_name} identical to the source "
                        "(the same cpu_group)")
    have = src.expansion(cpu)
    there = dst.expansion(cpu)
    if isinstance(have, str):
        problems.append(f"the source's QEMU cannot tell the guest's CPU features ({have})")
        return CpuCheck(expansion_key(cpu), problems=tuple(problems))
    if isinstance(there, str):
        problems.append(f"QEMU on {dst_name} has no CPU model {cpu.model} ({there})")
        return CpuCheck(expansion_key(cpu), problems=tuple(problems))
    if dst_limit is not None and isinstance(dst.expansion(dst_limit), str):
        problems.append(f"the inventory's cpu_limit {expansion_key(dst_limit)} for "
                        f"{dst_name} is unknown to its QEMU")
    needs = have.features - _lacks(cpu, src)
    gives = there.features - _lacks(cpu, dst)
    if dst_limit is not None:
        gives &= _bound(dst, dst_limit)
    missing = features_of(needs - gives)
    return CpuCheck(cpu.describe(), missing=missing, problems=tuple(problems))


def check_machine(machine: str, dst: QemuOffer, dst_name: str) -> str | None:
    """Why the destination's QEMU cannot run a guest of versioned machine type
    ``machine``, or None when it can."""
    if any(m.name == machine for m in dst.machines):
        return None
    newest = dst.newest_like(machine)
    also = f" (its newest of the kind is {newest})" if newest else ""
    return (f"QEMU {'.'.join(map(str, dst.version))} on {dst_name} has no machine type "
            f"{machine}{also}: the guest cannot keep its hardware there; upgrade QEMU on "
            f"{dst_name} or choose another destination")


def features_of(names: Iterable[str]) -> tuple[str, ...]:
    """Feature names deduplicated the way QEMU compares them, sorted."""
    seen: dict[str, str] = {}
    for n in names:
        seen.setdefault(_canon(n), n)
    return tuple(sorted(seen.values()))


def cpu_requests(*cpus: CpuSpec | None) -> Sequence[CpuSpec]:
    """The CPUs a probe must expand: ``max`` and each given one, once."""
    out: dict[str, CpuSpec] = {OFFER_MODEL: CpuSpec(model=OFFER_MODEL)}
    for cpu in cpus:
        if cpu is not None:
            out.setdefault(expansion_key(cpu), cpu)
    return list(out.values())
