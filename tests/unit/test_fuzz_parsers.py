"""Property-based and fuzz tests (hypothesis) for the parsers at vmigrate's edges: the
inventory, the VM spec (fields, the CLI's --disk/--nic syntax, its stored JSON), QEMU's
help listings and QMP replies, and NBD replies as the client parses them.

Whatever comes in, only vmigrate's own errors come out; and a hostile value that is
accepted cannot change the structure of QEMU's argv (every option string splits, with
QEMU's rules, into exactly the keys vmigrate wrote, each value round-tripping)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import string
import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vmigrate import validate
from vmigrate.config import Inventory, load_inventory, parse_inventory
from vmigrate.errors import ConfigError, NbdError, QmpError, SpecError, UserError
from vmigrate.hosts import LocalHost, quote_argv
from vmigrate.qemu import process
from vmigrate.qemu.argv import VmPaths, build_argv
from vmigrate.qemu.qmp import qmp_session
from vmigrate.qemu.spec import VMSpec, build_spec, parse_disk, parse_nic, parse_spec_json
from vmigrate.testing import fakenbd
from vmigrate.transfer import nbd
from vmigrate.transfer.nbd import NbdClient

#: what an attacker or a careless operator types: shell, QEMU and TOML metacharacters
NASTY = ["'", '"', ";", "$(", ")", "`", "\n", "\r", "\0", ",", ",,", "=", " ", "\t", "|", "&",
         "<", ">", "*", "?", "[", "]", "{", "}", "~", "#", "!", "\\", "..", "/", "-", "é", "\u202e",
         "\ufeff", "touch PWNED", "x';touch PWNED;'", ",memory-backend=evil", ",file.driver=x"]
#: characters none of which may survive validation into a name, a bridge or a path
SHELL_META = set("'\";$`|&<>*?[]{}!\\#\n\r\t\0 ")

hostile = st.one_of(
    st.lists(st.sampled_from(NASTY) | st.text(string.ascii_letters + string.digits + "._-/",
                                              max_size=8), max_size=8).map("".join),
    st.text(max_size=40),
    st.text(string.printable, min_size=200, max_size=6000),
)
def one_line(exc: Exception) -> bool:
    """An error for the operator is one line: no newline or NUL from the input."""
    return not {"\n", "\r", "\0"} & set(str(exc))


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _toml_str(value: str) -> str:
    return json.dumps(value)  # JSON strings are TOML basic strings (NUL escaped as \u0000)


# -- inventory ---------------------------------------------------------------------------------


@FAST
@given(st.text(max_size=400))
@example("[hosts.h1]\ndata_dir = 3\n")
@example("a = [" * 3000)
def test_inventory_text_gives_only_config_errors(text: str) -> None:
    try:
        parse_inventory(text)
    except ConfigError as exc:
        assert one_line(exc)


@FAST
@given(st.binary(max_size=300))
@example(b'[hosts.h1]\ndata_dir = "/d\xff"\n')
def test_inventory_bytes_give_only_config_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vmigrate.toml"
        path.write_bytes(data)
        try:
            load_inventory(path)
        except ConfigError as exc:
            assert one_line(exc)


HOST_FIELDS = ["name", "transport", "address", "port", "user", "key", "known_hosts", "data_dir",
               "migration_address", "vm_bridge", "qemu_binary", "accel", "tls_dir"]


def _check_accepted(inv: Inventory) -> None:
    for name, host in inv.hosts.items():
        assert not SHELL_META & set(name)
        for value in (host.data_dir, host.key, host.tls_dir, *host.pools.values()):
            if value is not None:
                assert validate.path_problem(str(value)) is None
                assert not SHELL_META & set(str(value))
        for word in (host.address, host.user, host.vm_bridge or "", host.qemu_binary):
            assert not SHELL_META & set(word)
        if host.vm_bridge is not None:
            assert validate.IFNAME_RE.fullmatch(host.vm_bridge)


@FAST
@given(field=st.sampled_from([*HOST_FIELDS, "pool", "pool_name", "host_name"]), value=hostile)
def test_hostile_inventory_values(field: str, value: str) -> None:
    host_name, fields, pools = "h1", {"data_dir": "/var/lib/vmigrate"}, {}
    if field == "host_name":
        host_name = value
    elif field == "pool":
        pools["local"] = value
    elif field == "pool_name":
        pools[value] = "/srv/pool"
    else:
        fields[field] = value
    lines = [f"[hosts.{_toml_str(host_name)}]"]
    lines += [f"{k} = {_toml_str(v)}" for k, v in fields.items()]
    if pools:
        lines.append(f"[hosts.{_toml_str(host_name)}.pools]")
        lines += [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in pools.items()]
    try:
        inv = parse_inventory("\n".join(lines) + "\n")
    except ConfigError as exc:
        assert one_line(exc)
        return
    _check_accepted(inv)


@FAST
@given(field=st.sampled_from(["name", "dir", "vm_network", "probe_netns", "gateway"]),
       value=hostile)
def test_hostile_lab_values(field: str, value: str) -> None:
    lab = {"name": "l1", "dir": "/var/lib/lab", "vm_network": "10.242.1.0/24",
           "probe_netns": "l1-probe", "gateway": "10.242.1.254", field: value}
    text = "[lab]\n" + "".join(f"{k} = {_toml_str(v)}\n" for k, v in lab.items())
    try:
        inv = parse_inventory(text)
    except ConfigError as exc:
        assert one_line(exc)
        return
    assert inv.lab is not None
    assert validate.path_problem(str(inv.lab.dir)) is None
    assert not SHELL_META & set(inv.lab.name + inv.lab.probe_netns)


@FAST
@given(st.lists(hostile, min_size=1, max_size=4))
def test_hostile_vmigrate_command(words: list[str]) -> None:
    text = '[hosts.h1]\ndata_dir = "/d"\nvmigrate_command = [' + ", ".join(
        _toml_str(w) for w in words) + "]\n"
    try:
        inv = parse_inventory(text)
    except ConfigError as exc:
        assert one_line(exc)
        return
    argv = inv.host("h1").vmigrate_command
    assert all(w and "\0" not in w and "\n" not in w for w in argv)


# -- the VM spec and QEMU's argv ---------------------------------------------------------------


def split_qemu_opts(text: str) -> list[tuple[str | None, str]]:
    """QEMU's reading of an option string: ``,,`` is a comma, ``,`` ends a value; the
    first part without ``=`` is the implied value."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur, i = cur + ",", i + 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    out: list[tuple[str | None, str]] = []
    for n, part in enumerate(parts):
        key, sep, value = part.partition("=")
        out.append((None, part) if n == 0 and not sep else (key, value))
    return out


def check_argv_structure(spec: VMSpec, argv: list[str]) -> None:
    """The argv vmigrate means for ``spec``, and nothing else."""
    flags = [a for i, a in enumerate(argv) if i and a.startswith("-")
             and argv[i - 1] not in {"-append", "-kernel", "-initrd", "-name", "-machine"}]
    assert flags.count("-blockdev") == 2 * len(spec.disks)
    assert flags.count("-netdev") == len(spec.nics)
    scsi = any(d.bus == "scsi" for d in spec.disks)
    assert flags.count("-device") == len(spec.disks) + len(spec.nics) + scsi
    assert split_qemu_opts(argv[argv.index("-name") + 1]) == [(None, spec.name),
                                                               ("debug-threads", "on")]
    assert split_qemu_opts(argv[argv.index("-machine") + 1]) == [(None, spec.machine),
                                                                  ("accel", "tcg")]
    files = [split_qemu_opts(argv[i + 1]) for i, a in enumerate(argv)
             if a == "-blockdev" and argv[i + 1].startswith("driver=file,")]
    assert [dict(f)["filename"] for f in files] == [d.path for d in spec.disks]
    assert all([k for k, _ in f] == ["driver", "node-name", "filename", "cache.direct",
                                     "discard"] for f in files)
    nic_devices = [split_qemu_opts(argv[i + 1]) for i, a in enumerate(argv)
                   if a == "-device" and "netdev=" in argv[i + 1]]
    assert [dict(d)["driver"] for d in nic_devices] == [n.model for n in spec.nics]
    assert all([k for k, _ in d][:4] == ["driver", "netdev", "mac", "id"] for d in nic_devices)
    if spec.kernel is not None:
        assert argv[argv.index("-kernel") + 1] == spec.kernel.kernel
        if spec.kernel.append:
            assert argv[argv.index("-append") + 1] == spec.kernel.append
    assert all("\0" not in a for a in argv)


SPEC_FIELDS = ["name", "vcpus", "memory_mib", "machine", "firmware", "disk", "disk_format",
               "disk_bus", "disk_cache", "bridge", "model", "mac", "kernel", "initrd", "append",
               "workload", "ip"]


@FAST
@given(field=st.sampled_from(SPEC_FIELDS), value=hostile)
@example(field="machine", value="pc,memory-backend=evil")
@example(field="model", value="e1000,romfile=/etc/shadow")
@example(field="disk", value="/img/a,b")
@example(field="bridge", value="x';touch PWNED;'")
def test_hostile_spec_values(field: str, value: str) -> None:
    disk: dict[str, Any] = {"path": "/img/root.raw"}
    nic: dict[str, Any] = {"bridge": "br0", "mac": "52:54:00:12:34:56"}
    kernel: dict[str, Any] = {"kernel": "/boot/vmlinuz", "append": "console=ttyS0"}
    fields: dict[str, Any] = {"name": "g", "memory_mib": 64, "machine": "pc"}
    target = {"disk": (disk, "path"), "disk_format": (disk, "format"),
              "disk_bus": (disk, "bus"), "disk_cache": (disk, "cache"), "bridge": (nic, "bridge"),
              "model": (nic, "model"), "mac": (nic, "mac"), "kernel": (kernel, "kernel"),
              "initrd": (kernel, "initrd"), "append": (kernel, "append")}
    if field in target:
        where, key = target[field]
        where[key] = value
    else:
        fields[field] = value
    fields.update(disks=(disk, {"path": "/img/data,x.raw", "bus": "scsi"}), nics=(nic,),
                  kernel=kernel)
    try:
        spec = build_spec(**fields)
    except SpecError as exc:
        assert one_line(exc)
        return
    check_argv_structure(spec, build_argv(spec, VmPaths("/var/lib/vmigrate/vms/g"),
                                          accel="tcg"))
    assert validate.NAME_RE.fullmatch(spec.name)
    assert all(validate.path_problem(d.path) is None for d in spec.disks)
    assert all(validate.IFNAME_RE.fullmatch(n.bridge) for n in spec.nics)


@FAST
@given(text=hostile)
@example(text="/img/a,,b.raw,format=qcow2")
def test_cli_disk_syntax(text: str) -> None:
    try:
        disk = parse_disk(text)
    except SpecError as exc:
        assert one_line(exc)
        return
    assert validate.path_problem(disk.path) is None
    spec = build_spec(name="g", memory_mib=64, disks=(disk,))
    check_argv_structure(spec, build_argv(spec, VmPaths("/d/vms/g"), accel="tcg"))


@FAST
@given(text=hostile)
def test_cli_nic_syntax(text: str) -> None:
    try:
        nic = parse_nic(text, "g", 0)
    except SpecError as exc:
        assert one_line(exc)
        return
    assert not SHELL_META & set(nic.bridge) and "," not in nic.model
    spec = build_spec(name="g", memory_mib=64, nics=(nic,))
    check_argv_structure(spec, build_argv(spec, VmPaths("/d/vms/g"), accel="tcg"))


@FAST
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                              | st.text(max_size=20),
                              lambda kids: st.lists(kids, max_size=4)
                              | st.dictionaries(st.sampled_from(
                                  ["name", "memory_mib", "vcpus", "disks", "nics", "path",
                                   "bridge", "mac", "model", "kernel", "machine"]), kids,
                                  max_size=5), max_leaves=20).map(json.dumps)))
def test_stored_spec_json_gives_only_spec_errors(data: str | bytes) -> None:
    try:
        spec = parse_spec_json(data)
    except SpecError as exc:
        assert one_line(exc)
        return
    check_argv_structure(spec, build_argv(spec, VmPaths("/d/vms/g"), accel="tcg"))


@FAST
@given(st.lists(hostile.filter(lambda w: "\0" not in w), min_size=1, max_size=5))
def test_remote_command_lines_keep_their_words(words: list[str]) -> None:
    import shlex

    assert shlex.split(quote_argv(["cmd", *words])) == ["cmd", *words]


# -- QEMU's answers -----------------------------------------------------------------------------


@FAST
@given(st.text(max_size=500))
def test_help_listings_never_raise(text: str) -> None:
    assert isinstance(process.parse_machine_help(text), set)
    assert isinstance(process.parse_device_help(text), set)
    assert process.run_state(text) in set(process.VmState)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                           max_leaves=10)
qmp_replies = st.one_of(
    st.binary(max_size=200).map(lambda b: b + b"\n"),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
    json_values.map(lambda v: json.dumps({"return": v}).encode() + b"\n"),
    st.fixed_dictionaries({"class": st.text(max_size=12), "desc": st.text(max_size=30)}).map(
        lambda e: json.dumps({"error": e}).encode() + b"\n"),
    st.just(b""),
)


async def _read_message(reader: asyncio.StreamReader, buf: list[str]) -> dict[str, Any]:
    """The next JSON object the client sent (QMP is a stream of objects, not lines)."""
    decoder = json.JSONDecoder()
    while True:
        text = buf[0].lstrip()
        if text:
            try:
                msg, end = decoder.raw_decode(text)
                buf[0] = text[end:]
                return dict(msg)
            except json.JSONDecodeError:
                pass
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("client went away")
        buf[0] += chunk.decode()


def _with_id(reply: bytes, msg_id: object) -> bytes:
    """``reply`` answering the command ``msg_id`` when it is a JSON object (QMP matches
    replies by id), else as it is."""
    try:
        value = json.loads(reply)
    except ValueError:
        return reply
    if isinstance(value, dict) and msg_id is not None:
        value["id"] = msg_id
        return json.dumps(value).encode() + b"\n"
    return reply


async def _qmp_exchange(path: str, greeting: bytes, reply: bytes) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = [""]
        try:
            writer.write(greeting)
            caps = await _read_message(reader, buf)
            writer.write(json.dumps({"return": {}, "id": caps.get("id")}).encode() + b"\n")
            cmd = await _read_message(reader, buf)
            writer.write(_with_id(reply, cmd.get("id")))
            await writer.drain()
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()  # a reply that did not answer must not leave the client waiting

    server = await asyncio.start_unix_server(serve, path)
    try:
        async with qmp_session(LocalHost("fuzz"), path, vm="fuzz", timeout=1) as qmp:
            return await qmp.execute("query-status", timeout=1)
    finally:
        server.close()
        await server.wait_closed()


GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, ' \
           b'"capabilities": []}}\n'


@SLOW
@given(reply=qmp_replies)
def test_qmp_replies_give_only_qmp_errors(reply: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(QmpError):
        asyncio.run(_qmp_exchange(os.path.join(tmp, "qmp.sock"), GREETING, reply))


@SLOW
@given(greeting=qmp_replies)
def test_qmp_greetings_give_only_qmp_errors(greeting: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(QmpError):
        asyncio.run(_qmp_exchange(os.path.join(tmp, "qmp.sock"), greeting, b"{}\n"))


# -- NBD replies --------------------------------------------------------------------------------


async def _nbd_session(path: str, script: bytes, op: str) -> None:
    async with fakenbd.ScriptedNbdServer(path, script, linger=0.01) as server:
        client = await NbdClient.connect(server.address, timeout=2)
        try:
            async with asyncio.timeout(2):
                if op == "read":
                    await client.read(0, 4096)
                elif op == "status":
                    await client.block_status(0, 8192)
                elif op == "write":
                    await client.write(0, b"x" * 512)
                else:
                    await client.flush()
        finally:
            await client.close(timeout=1)


def _run_nbd(script: bytes, op: str = "read") -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(NbdError, UserError):
        asyncio.run(_nbd_session(os.path.join(tmp, "nbd.sock"), script, op))


@SLOW
@given(st.one_of(st.binary(max_size=120),
                 st.binary(max_size=120).map(lambda b: fakenbd.handshake()[:18] + b),
                 st.tuples(st.integers(0, len(fakenbd.handshake())), st.binary(max_size=40))
                 .map(lambda t: fakenbd.handshake()[:t[0]] + t[1])))
def test_nbd_handshakes_give_only_nbd_errors(script: bytes) -> None:
    _run_nbd(script)


chunk_types = st.sampled_from([nbd.NBD_REPLY_TYPE_NONE, nbd.NBD_REPLY_TYPE_OFFSET_DATA,
                               nbd.NBD_REPLY_TYPE_OFFSET_HOLE, nbd.NBD_REPLY_TYPE_BLOCK_STATUS,
                               nbd.NBD_REPLY_TYPE_ERROR, nbd.NBD_REPLY_TYPE_ERROR_OFFSET]
                              ) | st.integers(0, 0xFFFF)
replies = st.one_of(
    st.binary(max_size=200),
    st.builds(fakenbd.chunk, st.sampled_from([1, 1, 2, 0, 2**64 - 1]), chunk_types,
              st.one_of(st.binary(max_size=64),
                        st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=64)).map(
                            lambda t: struct.pack(">Q", t[0]) + t[1]),
                        st.tuples(st.just(fakenbd.CONTEXT_ID),
                                  st.lists(st.tuples(st.integers(0, 2**32 - 1),
                                                     st.integers(0, 2**32 - 1)), max_size=4))
                        .map(lambda t: struct.pack(">I", t[0]) + b"".join(
                            struct.pack(">II", *d) for d in t[1])),
                        st.tuples(st.integers(0, 2**32 - 1), st.text(max_size=10)).map(
                            lambda t: struct.pack(">IH", t[0], len(t[1].encode()))
                            + t[1].encode())),
              done=st.booleans()),
    st.builds(fakenbd.simple_reply, st.sampled_from([1, 2, 0]), st.integers(0, 2**32 - 1),
              st.binary(max_size=64)),
)


@SLOW
@given(op=st.sampled_from(["read", "status", "write", "flush"]),
       script=st.lists(replies, min_size=1, max_size=3).map(b"".join))
def test_nbd_replies_give_only_nbd_errors(op: str, script: bytes) -> None:
    _run_nbd(fakenbd.handshake(1 << 20) + script, op)


def test_scripted_nbd_server_serves_a_good_read() -> None:
    """The fake is right: a well-formed reply is read back as the data it carries."""
    data = bytes(range(256)) * 16

    async def go(path: str) -> bytes:
        script = fakenbd.handshake(1 << 20) + fakenbd.chunk(
            1, nbd.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + data)
        async with fakenbd.ScriptedNbdServer(path, script) as server, \
                await NbdClient.connect(server.address, timeout=2) as client:
            assert client.size == 1 << 20 and client.contexts == ["base:allocation"]
            return await client.read(0, 4096)

    with tempfile.TemporaryDirectory() as tmp:
        assert asyncio.run(go(os.path.join(tmp, "nbd.sock"))) == data
