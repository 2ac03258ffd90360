"""Ask a host's QEMU what it offers: its machine types and CPU models.

A probe is the host's QEMU binary (the inventory's ``qemu_binary``) started with
``-machine none`` and the host's accelerator: no guest, no disk, no network, nothing of
any VM. Its QMP monitor is on stdio: the commands go in on stdin, the replies (each
with the command's ``id``) come back on stdout, and ``quit`` ends it. libvirt probes
QEMU the same way. The same commands asked of a running VM's monitor say what the
QEMU that runs it offers (:meth:`vmigrate.drivers.base.Monitor.qemu_offer`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vmigrate.errors import CommandError, QemuError
from vmigrate.hosts import Host
from vmigrate.qemu.argv import qemu_opts
from vmigrate.qemu.cpu import QemuOffer, expansion_arguments, expansion_key, make_offer
from vmigrate.qemu.spec import CpuSpec

#: a probe that has not answered within this long is taken as failed
PROBE_TIMEOUT_S = 60.0


def probe_argv(binary: str, accel: str) -> list[str]:
    """The probe's command line."""
    return [binary, "-machine", qemu_opts("none", accel=accel), "-nodefaults",
            "-no-user-config", "-display", "none", "-qmp", "stdio"]


def queries(cpus: Sequence[CpuSpec]) -> list[tuple[str, str, dict[str, object] | None]]:
    """What to ask, as ``(id, command, arguments)``: the version, the machine types,
    the CPU models, and a static expansion of each of ``cpus``
    (id ``x:`` + :func:`~vmigrate.qemu.cpu.expansion_key`)."""
    out: list[tuple[str, str, dict[str, object] | None]] = [
        ("version", "query-version", None),
        ("machines", "query-machines", None),
        ("cpus", "query-cpu-definitions", None),
    ]
    out += [(f"x:{expansion_key(c)}", "query-cpu-model-expansion", expansion_arguments(c))
            for c in cpus]
    return out


def probe_input(cpus: Sequence[CpuSpec]) -> bytes:
    """The probe's stdin: capabilities negotiation, :func:`queries`, ``quit``."""
    msgs: list[dict[str, object]] = [{"execute": "qmp_capabilities", "id": "caps"}]
    for qid, command, args in queries(cpus):
        msg: dict[str, object] = {"execute": command, "id": qid}
        if args is not None:
            msg["arguments"] = args
        msgs.append(msg)
    msgs.append({"execute": "quit", "id": "quit"})
    return "".join(json.dumps(m) + "\n" for m in msgs).encode()


def offer_from_replies(replies: Mapping[str, Mapping[str, Any]], cpus: Sequence[CpuSpec],
                       accel: str) -> QemuOffer:
    """A :class:`~vmigrate.qemu.cpu.QemuOffer` from the whole replies to
    :func:`queries`, by id. Raises :class:`QemuError` for a missing or failed query
    (an expansion may fail: the offer keeps QEMU's reason)."""
    def value(qid: str) -> object:
        reply = replies.get(qid)
        if reply is None or "return" not in reply:
            why = (reply or {}).get("error", "no reply")
            raise QemuError(f"the QEMU probe did not answer {qid}: {str(why)[:200]}")
        return reply["return"]

    expansions: dict[str, Mapping[str, Any]] = {}
    for c in cpus:
        key = expansion_key(c)
        reply = replies.get(f"x:{key}")
        if reply is None:
            raise QemuError(f"the QEMU probe did not answer the expansion of {key}")
        expansions[key] = reply
    return make_offer(version=value("version"), accel=accel, machines=value("machines"),
                      cpus=value("cpus"), expansions=expansions)


def parse_transcript(stdout: str) -> dict[str, dict[str, Any]]:
    """The probe's stdout -> its replies by id (the greeting and events have none)."""
    replies: dict[str, dict[str, Any]] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QemuError(f"the QEMU probe wrote something that is not QMP: "
                            f"{line[:120]!r}") from exc
        if isinstance(msg, dict) and isinstance(msg.get("id"), str):
            replies[msg["id"]] = msg
    return replies


async def probe_host(host: Host, binary: str, accel: str, cpus: Sequence[CpuSpec]
                     ) -> QemuOffer:
    """What ``binary`` on ``host`` offers with accelerator ``accel``, with the static
    expansions of ``cpus``. Starts nothing that outlives the call. Raises
    :class:`CommandError` when the probe fails (QEMU's message in it) and
    :class:`QemuError` when its answers are not QMP."""
    argv = probe_argv(binary, accel)
    res = await host.run(argv, check=False, stdin=probe_input(cpus), timeout=PROBE_TIMEOUT_S)
    if res.status != 0:
        raise CommandError(host.name, argv, res.status, res.stderr or res.stdout)
    return offer_from_replies(parse_transcript(res.stdout), cpus, accel)
