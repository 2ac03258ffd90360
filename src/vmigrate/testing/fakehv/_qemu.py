"""What a fake host's QEMU offers: machine types and CPU models, from captured data.

The data are what QEMU 7.2 said on the machine this project is built on (captured by
``tests/unit/data/capture_qemu.py`` into ``captured/``): under TCG, and under KVM
(nested, on an AMD EPYC whose KVM offers no SSE3 and beyond: a real "older host").
:class:`FakeQemu` answers the probe's questions (``query-version``,
``query-machines``, ``query-cpu-definitions``, static ``query-cpu-model-expansion``)
from them as QEMU does, and the answers go through the same parser as real ones
(:func:`vmigrate.qemu.probe.offer_from_replies`):

* an alias expands as the model it stands for (``alias-of``);
* features asked on top of a model switch its features; an unknown one is refused
  with QEMU's own message;
* a model this QEMU does not know is refused with QEMU's own message.

:meth:`FakeQemu.without_machines` and :meth:`FakeQemu.lacking` make an older QEMU
(machine types it does not have yet) and an older host (CPU features it lacks).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from vmigrate.qemu.cpu import QemuOffer, expansion_key
from vmigrate.qemu.probe import offer_from_replies, queries
from vmigrate.qemu.spec import CpuSpec

__all__ = ["FakeQemu", "captured_qemu"]

CAPTURED = Path(__file__).parent / "captured"


@cache
def _load(accel: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CAPTURED / f"qemu-7.2-{accel}.json").read_text())
    return data


@dataclass(frozen=True)
class FakeQemu:
    """One QEMU binary with an accelerator, as captured (see the module doc)."""

    accel: str
    #: machine types this QEMU does not have (an older QEMU)
    hidden_machines: frozenset[str] = field(default_factory=frozenset)
    #: CPU features the host's CPU lacks (an older host)
    missing_features: frozenset[str] = field(default_factory=frozenset)

    @property
    def data(self) -> Mapping[str, Any]:
        return _load(self.accel)

    # -- variations

    def without_machines(self, *names: str) -> FakeQemu:
        """This QEMU without machine types ``names`` (an alias pointing to one of them
        points nowhere: as in a QEMU that predates them, ask for the newest there is)."""
        return replace(self, hidden_machines=self.hidden_machines | set(names))

    def lacking(self, *features: str) -> FakeQemu:
        """This QEMU on a host whose CPU lacks ``features``."""
        return replace(self, missing_features=self.missing_features | set(features))

    # -- what QEMU answers

    def machines(self) -> list[dict[str, Any]]:
        """``query-machines``' return value."""
        out = [m for m in copy.deepcopy(self.data["query-machines"])
               if m["name"] not in self.hidden_machines]
        for hidden in copy.deepcopy(self.data["query-machines"]):
            if hidden["name"] not in self.hidden_machines or "alias" not in hidden:
                continue
            family = re.sub(r"-[0-9.]+$", "", hidden["name"])
            kin = [m for m in out if re.fullmatch(re.escape(family) + r"-[0-9.]+", m["name"])]
            if kin:
                newest = max(kin, key=lambda m: [int(p) for p in
                                                 m["name"][len(family) + 1:].split(".")])
                newest["alias"] = hidden["alias"]
                if hidden.get("is-default"):
                    newest["is-default"] = True
        return out

    def resolve_machine(self, name: str) -> str | None:
        """What ``-machine NAME`` starts here (None: QEMU refuses it)."""
        for m in self.machines():
            if m.get("alias") == name or m["name"] == name:
                return str(m["name"])
        return None

    def cpu_definitions(self) -> list[dict[str, Any]]:
        """``query-cpu-definitions``' return value."""
        defs = copy.deepcopy(self.data["query-cpu-definitions"])
        if self.missing_features:
            for d in defs:
                exp = self._captured(d.get("alias-of") or d["name"])
                if exp is not None:
                    lost = sorted(set(exp["model"]["true"]) & self.missing_features)
                    d["unavailable-features"] = sorted(set(d["unavailable-features"]) | set(lost))
        return list(defs)

    def knows_cpu(self, model: str) -> bool:
        return any(d["name"] == model for d in self.data["query-cpu-definitions"])

    def _captured(self, model: str) -> dict[str, Any] | None:
        got = self.data["expansions"].get(model)
        return None if got is None or "error" in got else dict(got)

    def expand(self, cpu: CpuSpec) -> dict[str, Any]:
        """The whole reply to a static ``query-cpu-model-expansion`` of ``cpu``."""
        if not self.knows_cpu(cpu.model):
            return {"error": {"class": "GenericError",
                              "desc": f"CPU model '{cpu.model}' not found"}}
        definition = next(d for d in self.data["query-cpu-definitions"]
                          if d["name"] == cpu.model)
        base = definition.get("alias-of") or cpu.model
        captured = self._captured(base)
        if captured is None:
            raise ValueError(f"no expansion of CPU model {base} was captured: add it to "
                             "tests/unit/data/capture_qemu.py's MODELS and capture again")
        known: list[str] = self.data["features"]
        on = set(captured["model"]["true"])
        if base in ("max", "host"):
            on -= self.missing_features
        for flag in cpu.features:
            name = flag[1:]
            if name not in known:
                return {"error": {"class": "GenericError",
                                  "desc": f"Property '{base}-x86_64-cpu.{name}' not found"}}
            (on.add if flag[0] == "+" else on.discard)(name)
        props: dict[str, object] = {f: f in on for f in known}
        props.update(captured["model"]["props"])
        return {"return": {"model": {"name": "base", "props": props}}}

    def replies(self, cpus: Sequence[CpuSpec]) -> dict[str, dict[str, Any]]:
        """The replies to :func:`vmigrate.qemu.probe.queries` by id, as QEMU sends them."""
        out: dict[str, dict[str, Any]] = {}
        for qid, command, _args in queries(cpus):
            if command == "query-version":
                out[qid] = {"return": copy.deepcopy(self.data["query-version"])}
            elif command == "query-machines":
                out[qid] = {"return": self.machines()}
            elif command == "query-cpu-definitions":
                out[qid] = {"return": self.cpu_definitions()}
        for cpu in cpus:
            out[f"x:{expansion_key(cpu)}"] = self.expand(cpu)
        return out

    def offer(self, cpus: Sequence[CpuSpec]) -> QemuOffer:
        """What the probe (or a running VM's monitor) of this QEMU reports (the same
        answer to the same question: kept, the fault sweeps ask it thousands of times)."""
        return _offer(self, tuple(cpus))


@lru_cache(maxsize=256)
def _offer(qemu: FakeQemu, cpus: tuple[CpuSpec, ...]) -> QemuOffer:
    return offer_from_replies(qemu.replies(cpus), cpus, qemu.accel)


def captured_qemu(accel: str) -> FakeQemu:
    """QEMU 7.2 as captured with ``accel`` (``tcg``; ``kvm``: the nested EPYC's)."""
    return FakeQemu(accel="kvm" if accel == "kvm" else "tcg")
