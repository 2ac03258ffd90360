"""Capture what this machine's QEMU says of its machine types and CPU models.

Writes ``src/vmigrate/testing/fakehv/captured/qemu-<version>-<accel>.json``, the data
the fake hypervisor (:mod:`vmigrate.testing.fakehv`) and ``tests/unit/test_cpu_models.py``
work from. It runs the same probe vmigrate runs on a host (a QEMU with ``-machine none``
and its QMP monitor on stdio, :mod:`vmigrate.qemu.probe`) plus ``-machine help``::

    python tests/unit/data/capture_qemu.py tcg
    python tests/unit/data/capture_qemu.py kvm   # needs /dev/kvm

The replies are kept verbatim but for one lossless reduction: a static CPU model
expansion lists every CPU feature this QEMU knows with true or false; the file keeps
that list once (``features``) and, per model, the features that are true and the
properties that are not features (family, model, vendor ...).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

BINARY = "qemu-system-x86_64"
#: every model the unit tests and the fake need expanded (versioned names: the fake
#: resolves aliases with query-cpu-definitions' alias-of, as QEMU does)
MODELS = ["qemu64-v1", "kvm64-v1", "core2duo-v1", "Conroe-v1", "Penryn-v1", "Nehalem-v1",
          "Nehalem-v2", "Westmere-v1", "Westmere-v2", "SandyBridge-v1", "Haswell-v4",
          "Skylake-Client-v4", "EPYC-v1", "EPYC-Rome-v1", "max", "host", "base"]
OUT = Path(__file__).resolve().parents[3] / "src/vmigrate/testing/fakehv/captured"


def main(accel: str) -> None:
    cmds = [{"execute": "qmp_capabilities", "id": "caps"},
            {"execute": "query-version", "id": "version"},
            {"execute": "query-machines", "id": "machines"},
            {"execute": "query-cpu-definitions", "id": "cpus"}]
    cmds += [{"execute": "query-cpu-model-expansion", "id": f"x:{m}",
              "arguments": {"type": "static", "model": {"name": m}}} for m in MODELS]
    cmds.append({"execute": "quit", "id": "quit"})
    argv = [BINARY, "-machine", f"none,accel={accel}", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", "stdio"]
    stdin = "".join(json.dumps(c) + "\n" for c in cmds)
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True,
                         timeout=60)
    replies = {}
    for line in res.stdout.splitlines():
        msg = json.loads(line)
        if "id" in msg:
            replies[msg["id"]] = msg
    help_text = subprocess.run([BINARY, "-machine", "help"], capture_output=True, text=True,
                               check=True).stdout
    features: set[str] | None = None
    expansions: dict[str, object] = {}
    for m in MODELS:
        reply = replies[f"x:{m}"]
        if "error" in reply:
            expansions[m] = {"error": reply["error"]}
            continue
        model = reply["return"]["model"]
        props = model["props"]
        names = {k for k, v in props.items() if isinstance(v, bool)}
        if features is None:
            features = names
        assert names == features, f"{m}: another feature list"
        expansions[m] = {"model": {
            "name": model["name"],
            "true": sorted(k for k, v in props.items() if v is True),
            "props": {k: v for k, v in sorted(props.items()) if not isinstance(v, bool)}}}
    ver = replies["version"]["return"]
    data = {
        "captured": {"binary": BINARY, "accel": accel, "argv": argv,
                     "package": ver.get("package", ""),
                     "cpu": _cpu_name(), "machine": platform.machine()},
        "machine_help": help_text,
        "query-version": ver,
        "query-machines": replies["machines"]["return"],
        "query-cpu-definitions": replies["cpus"]["return"],
        "features": sorted(features or ()),
        "expansions": expansions,
    }
    q = ver["qemu"]
    path = OUT / f"qemu-{q['major']}.{q['minor']}-{accel}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(path)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tcg")
