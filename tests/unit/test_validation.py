"""Validation at the edges (issue 13, items 1 and 8): every spec and inventory field has an
allowed form; QEMU option values are escaped by one function; commands reach hosts as argv
lists; bad input exits 2 (a full destination 8), never with a traceback."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from vmigrate import validate
from vmigrate.config import HostConfig, load_inventory, parse_inventory
from vmigrate.errors import (
    ConfigError,
    DestinationFullError,
    HostError,
    NbdError,
    SpecError,
    TransferError,
    UserError,
)
from vmigrate.hosts import LocalHost, quote_argv
from vmigrate.qemu import process
from vmigrate.qemu.argv import VmPaths, build_argv, qemu_opts, qemu_value
from vmigrate.qemu.spec import (
    DiskSpec,
    KernelBoot,
    NicSpec,
    VMSpec,
    build_spec,
    mac_for,
    parse_disk,
    parse_nic,
    parse_spec_json,
    split_options,
    tap_name,
)
from vmigrate.testing.recordhost import RecordingHost

INJECT = "x';touch PWNED;'"
HOSTILE = [INJECT, "a b", "$(touch PWNED)", "`touch PWNED`", "a;b", "a\nb", "a\0b", "a|b",
           "a&b", "a>b", "a\"b", "a\\b", "a*", "~root", "x" * 5000, "é\u202eb", ""]
PATHS = VmPaths("/data/vms/web1")


def _host(**kw: Any) -> HostConfig:
    return HostConfig(name="h1", data_dir=Path("/var/lib/vmigrate"), **kw)


# -- qemu_value: the one escaping function ----------------------------------------------------


def test_qemu_value_doubles_commas() -> None:
    assert qemu_value("a,b,,c") == "a,,b,,,,c"
    assert qemu_value(3) == "3"
    assert qemu_opts("pc,memory-backend=evil", accel="tcg") == "pc,,memory-backend=evil,accel=tcg"
    assert qemu_opts(driver="file", node_name="n", cache__direct="on", skip=None) == (
        "driver=file,node-name=n,cache.direct=on")
    with pytest.raises(SpecError):
        qemu_value("a\0b")


def test_disk_path_with_comma_is_escaped_in_blockdev() -> None:
    spec = build_spec(name="g", memory_mib=64, disks=(DiskSpec(path="/img/a,b.raw"),))
    argv = build_argv(spec, PATHS, accel="tcg")
    blockdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs[0].startswith("driver=file,node-name=disk0-file,filename=/img/a,,b.raw,")


def test_runtime_paths_are_escaped_in_qmp_and_chardev() -> None:
    spec = build_spec(name="g", memory_mib=64)
    argv = build_argv(spec, VmPaths("/d,x/vms/g"), accel="tcg")
    assert argv[argv.index("-qmp") + 1] == "unix:/d,,x/vms/g/qmp.sock,server=on,wait=off"
    chardev = argv[argv.index("-chardev") + 1]
    assert "path=/d,,x/vms/g/console.sock," in chardev
    # options QEMU takes whole are passed whole
    assert argv[argv.index("-pidfile") + 1] == "/d,x/vms/g/qemu.pid"


# -- the VM spec ---------------------------------------------------------------------------


@pytest.mark.parametrize("machine", ["pc,memory-backend=evil", "pc accel", "PC;x", "", "pc\n",
                                     "-pc", "x" * 65])
def test_bad_machine_types(machine: str) -> None:
    with pytest.raises(SpecError, match="machine"):
        build_spec(name="g", memory_mib=64, machine=machine)


@pytest.mark.parametrize("machine", ["pc", "q35", "pc-i440fx-7.2", "pc-q35-4.0.1", "microvm"])
def test_good_machine_types(machine: str) -> None:
    assert build_spec(name="g", memory_mib=64, machine=machine).machine == machine


@pytest.mark.parametrize("text", [INJECT, "br0,model=e1000,x=y", "br0,model=e1000,,romfile=x",
                                  "br0,model=evil", "br0,mac=01:00:5e:00:00:01", "a b",
                                  "br0;id", "$(id)", "-br", "br0123456789abcdef",
                                  "br0,model=virtio-net-pci,bus=pci.0"])
def test_bad_nics(text: str) -> None:
    with pytest.raises(SpecError):
        parse_nic(text, "g", 0)


def test_good_nic() -> None:
    nic = parse_nic("br-vm.10,model=e1000e", "g", 0)
    assert (nic.bridge, nic.model, nic.mac) == ("br-vm.10", "e1000e", mac_for("g"))


@pytest.mark.parametrize("text", ["/img/a,b", "/img/a,file.filename=/etc/shadow", "/img/a b",
                                  "/img/$(id)", "/img/`id`", "/img/a;b", "/img/../etc/x",
                                  "/img//a", "/img/a/", "img/a", "/img/a\nb", "/img/a'b",
                                  "/img/a,readonly=maybe", "/img/*"])
def test_bad_disks(text: str) -> None:
    with pytest.raises(SpecError):
        parse_disk(text)


def test_disk_comma_written_doubled() -> None:
    assert split_options("/a,,b,format=qcow2") == ["/a,b", "format=qcow2"]
    disk = parse_disk("/img/a,,b.qcow2,format=qcow2,readonly=on")
    assert (disk.path, disk.format, disk.readonly) == ("/img/a,b.qcow2", "qcow2", True)


@pytest.mark.parametrize(("field", "value"), [
    ("name", "vm\n"), ("name", INJECT), ("vcpus", "2"), ("vcpus", True), ("memory_mib", 64.5),
    ("ip", "10.0.0.1;id"), ("workload", "memtouch; id"), ("firmware", "uefi"),
    ("kernel", {"kernel": "/k/vmlinuz x"}), ("kernel", {"kernel": "/k/v", "initrd": "rel"}),
    ("kernel", {"kernel": "/k/v", "append": "console=ttyS0\ninit=/bin/sh"}),
    ("kernel", {"kernel": "/k/v", "append": "x" * 3000}),
    ("disks", [{"path": "/a", "format": "vmdk"}]), ("disks", [{"path": "/a", "bus": "usb"}]),
    ("disks", [{"path": "/a", "readonly": "yes"}]),
    ("nics", [{"bridge": "br0", "mac": "52:54:00:00:00:01", "model": "e1000,x=y"}]),
    ("nics", [{"bridge": "br 0", "mac": "52:54:00:00:00:01"}]),
    ("extra", "x"),
])
def test_every_spec_field_is_checked(field: str, value: object) -> None:
    fields: dict[str, object] = {"name": "g", "memory_mib": 64, field: value}
    with pytest.raises(SpecError) as info:
        build_spec(**fields)
    assert field in str(info.value)  # the message names the field


def test_stored_spec_read_back_is_validated() -> None:
    good = build_spec(name="g", memory_mib=64, nics=(NicSpec(bridge="br0", mac=mac_for("g")),))
    assert parse_spec_json(good.model_dump_json()) == good
    bad = json.loads(good.model_dump_json())
    bad["nics"][0]["bridge"] = INJECT
    for text in (json.dumps(bad), "{", "[]", "\xff"):
        with pytest.raises(SpecError):
            parse_spec_json(text)


def test_kernel_append_keeps_quotes_and_spaces() -> None:
    kernel = KernelBoot(kernel="/k/vmlinuz", append='console=ttyS0 foo="a b"')
    spec = build_spec(name="g", memory_mib=64, kernel=kernel)
    argv = build_argv(spec, PATHS, accel="tcg")
    assert argv[argv.index("-append") + 1] == 'console=ttyS0 foo="a b"'


# -- the inventory -------------------------------------------------------------------------

BASE = '[hosts.h1]\ndata_dir = "/var/lib/vmigrate"\n'


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


@pytest.mark.parametrize("field", ["address", "user", "vm_bridge", "qemu_binary", "data_dir",
                                   "key", "tls_dir", "migration_address"])
@pytest.mark.parametrize("value", [INJECT, "$(touch PWNED)", "a b", "a\nb", "a\u0000b", "",
                                   "/srv/x;touch PWNED", "/srv/`id`"])
def test_every_inventory_field_is_checked(field: str, value: str) -> None:
    base = "[hosts.h1]\n" if field == "data_dir" else BASE
    with pytest.raises(ConfigError) as info:
        parse_inventory(f"{base}{field} = {_toml(value)}\n")
    assert field in str(info.value)


@pytest.mark.parametrize("text", [
    BASE + 'port = true\n', BASE + 'port = "22"\n', BASE + 'port = 0\n',
    BASE + '[hosts.h1.pools]\n"a b" = "/srv/p"\n', BASE + '[hosts.h1.pools]\nlocal = "rel"\n',
    BASE + '[hosts.h1.pools]\nlocal = "/srv/../etc"\n',
    BASE + 'vmigrate_command = []\n', BASE + 'vmigrate_command = ["vmigrate;id"]\n',
    BASE + 'vmigrate_command = ["/usr/bin/python3", "-m\\nx"]\n',
    BASE + 'name = "h2"\n', '[hosts."h 1"]\ndata_dir = "/d"\n',
    '[hosts."a;b"]\ndata_dir = "/d"\n',
    '[lab]\nname = "l"\ndir = "/l"\nvm_network = "10.0.0.0/33"\nprobe_netns = "p"\n',
    '[lab]\nname = "l"\ndir = "/l"\nvm_network = "10.0.0.0/24"\nprobe_netns = "p;x"\n',
    "a = [" * 2000 + "]" * 2000,
])
def test_bad_inventories(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_inventory(text)


def test_good_inventory_forms() -> None:
    inv = parse_inventory(BASE + 'address = "hv1.example.org"\nuser = "svc-vm"\n'
                          'vm_bridge = "br-vm"\nqemu_binary = "/usr/local/bin/qemu-x86,1"\n'
                          'vmigrate_command = ["/opt/py/bin/python3", "-m", "vmigrate"]\n'
                          '[hosts.h1.pools]\nfast = "/srv/pool é"\n'.replace(" é", "é"))
    h1 = inv.host("h1")
    assert h1.address == "hv1.example.org" and h1.vm_bridge == "br-vm"
    assert str(h1.pools["fast"]) == "/srv/poolé"


def test_non_utf8_inventory(tmp_path: Path) -> None:
    path = tmp_path / "vmigrate.toml"
    path.write_bytes(b'[hosts.h1]\ndata_dir = "/d\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_inventory(path)


def test_validate_forms() -> None:
    assert validate.check_path("/") == "/"
    assert validate.path_problem("/a/./b") is not None
    assert validate.path_problem("//a") is not None
    assert validate.path_problem("/" + "a" * 256) is not None
    assert validate.check_address("::1") == "::1"
    with pytest.raises(ValueError):
        validate.check_address("-oProxyCommand=x")
    with pytest.raises(ValueError):
        validate.check_command("-x")
    assert validate.check_word("a b") == "a b"


# -- commands reach hosts as argv, quoted once -------------------------------------------------


def test_quote_argv_round_trips_and_refuses_nul() -> None:
    import shlex

    words = [INJECT, "$(id)", "a\nb", "", "é", "--"]
    assert shlex.split(quote_argv(["echo", *words])) == ["echo", *words]
    with pytest.raises(HostError):
        quote_argv(["echo", "a\0b"])
    with pytest.raises(HostError):
        quote_argv([])


def _spec_with_raw_bridge(bridge: str) -> VMSpec:
    # bypasses validation on purpose: the host layer must still not run it as shell text
    nic = NicSpec.model_construct(bridge=bridge, mac=mac_for("g"), model="virtio-net-pci")
    return VMSpec.model_construct(name="g", vcpus=1, memory_mib=64, machine="pc",
                                  firmware="bios", disks=(), nics=(nic,), kernel=None,
                                  workload=None, ip=None)


def test_tap_setup_is_argv_only() -> None:
    host = RecordingHost()
    spec = _spec_with_raw_bridge(INJECT)
    asyncio.run(process._setup_taps(host, _host(), spec))
    assert host.shell_scripts() == []
    tap = tap_name("g", 0)
    assert ["ip", "link", "set", "dev", tap, "master", INJECT] in host.commands
    assert all(c[0] == "ip" for c in host.commands)


def test_missing_bridge_is_a_spec_error_and_nothing_is_created() -> None:
    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:3] == ["ip", "link", "show"]:
            return 1, "", "Device does not exist"
        if argv[1:] == ["-machine", "help"]:
            return 0, "Supported machines are:\npc    Standard PC\n", ""
        if argv[1:] == ["-device", "help"]:
            return 0, 'Network devices:\nname "virtio-net-pci", bus PCI\n', ""
        return 0, "", ""

    host = RecordingHost(answer=answer)
    spec = _spec_with_raw_bridge(INJECT)
    with pytest.raises(SpecError):
        asyncio.run(process.start_vm(host, _host(), spec))
    assert ["ip", "link", "show", "dev", INJECT] in host.commands
    assert not any(c[0] in {"mkdir", "rm"} or c[:3] == ["ip", "tuntap", "add"]
                   or (c[0] == "qemu-system-x86_64" and "help" not in c)
                   for c in host.commands)
    assert all(INJECT not in script for script in host.shell_scripts())


MACHINE_HELP = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
"""
DEVICE_HELP = """Network devices:
name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"
name "virtio-net-pci", bus PCI, alias "virtio-net"

Storage devices:
name "virtio-blk-pci", bus PCI
"""


def test_parse_help_outputs() -> None:
    assert process.parse_machine_help(MACHINE_HELP) == {"microvm", "pc", "pc-i440fx-7.2", "q35",
                                                        "pc-q35-7.2"}
    assert {"e1000", "e1000-82540em", "virtio-net-pci", "virtio-net"} <= (
        process.parse_device_help(DEVICE_HELP))


@pytest.mark.parametrize(("machine", "model", "ok"), [
    ("pc", "e1000", True), ("pc-q35-7.2", "virtio-net-pci", True),
    ("pc-i440fx-9.0", "e1000", False), ("pc", "rtl8139", False)])
def test_check_host_asks_the_hosts_qemu(machine: str, model: str, ok: bool) -> None:
    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[1:] == ["-machine", "help"]:
            return 0, MACHINE_HELP, ""
        if argv[1:] == ["-device", "help"]:
            return 0, DEVICE_HELP, ""
        return 0, "", ""

    spec = build_spec(name="g", memory_mib=64, machine=machine,
                      nics=(NicSpec(bridge="br0", mac=mac_for("g"), model=model),))
    host = RecordingHost(answer=answer)
    if ok:
        asyncio.run(process.check_host(host, _host(), spec))
    else:
        with pytest.raises(SpecError):
            asyncio.run(process.check_host(host, _host(), spec))
    assert host.commands[0] == ["qemu-system-x86_64", "-machine", "help"]


def test_console_and_stop_refuse_bad_numbers() -> None:
    host = RecordingHost()
    with pytest.raises(UserError):
        asyncio.run(process.read_console(host, _host(), "g", lines=-1))
    spec = build_spec(name="g", memory_mib=64)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(UserError):
            asyncio.run(process.stop_vm(host, _host(), spec, timeout=bad))
    assert host.commands == []  # refused before anything ran


def test_write_file_takes_the_path_as_a_word(tmp_path: Path) -> None:
    target = tmp_path / "a'; touch PWNED; echo '$(touch PWNED2)"
    host = LocalHost("local")
    asyncio.run(host.write_file(str(target), b"data"))
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert not Path("PWNED").exists()


def test_host_refuses_nul_before_running() -> None:
    host = RecordingHost()
    with pytest.raises(HostError):
        asyncio.run(host.run(["cat", "a\0b"]))
    with pytest.raises(HostError):
        asyncio.run(host.write_file("/tmp/a\0b", b""))
    assert host.commands == []


# -- a full destination: its own error class and exit status ------------------------------------


def test_out_of_space_is_found_however_wrapped() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise TransferError("cannot write the chunk") from exc
    except TransferError as wrapped:
        assert DestinationFullError.found_in(wrapped)
    assert DestinationFullError.found_in(NbdError("write failed", 28, "ENOSPC"))
    assert DestinationFullError.found_in(OSError(errno.EDQUOT, "quota"))
    assert not DestinationFullError.found_in(OSError(errno.EIO, "io"))
    assert not DestinationFullError.found_in(TransferError("x"))


def test_agent_reports_out_of_space(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmigrate.transfer import agent, remote

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)

    async def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    assert agent.run(full) == DestinationFullError.exit_code == 8
    event = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert event["event"] == "error" and event["space"] is True

    async def failure() -> Exception:
        end = remote._End.__new__(remote._End)
        end.name, end.error, end.logs = "receiver", event, []
        return end.failure("")

    assert isinstance(asyncio.run(failure()), DestinationFullError)


# -- the CLI: bad input exits 2 with one line, never a traceback ---------------------------------


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         home: Path) -> tuple[int, str]:
    from vmigrate.cli.main import main

    monkeypatch.setenv("VMIGRATE_HOME", str(home))
    monkeypatch.delenv("VMIGRATE_CONFIG", raising=False)
    monkeypatch.setattr(sys, "argv", ["vmigrate", *args])
    with pytest.raises(SystemExit) as info:
        main()
    code = info.value.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return (code if isinstance(code, int) else 1), captured.err


def test_cli_non_utf8_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[hosts]\n")
    code, err = _cli(["-c", str(bad), "vm", "list"], monkeypatch, capsys, tmp_path)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["vm", "stop", "g", "--timeout", "-1"], ["vm", "stop", "g", "--timeout", "nan"],
    ["migrate", "g", "--to", "h2", "--timeout", "-1"],
    ["migrate", "g", "--to", "h2", "--shutdown-timeout", "0"],
    ["migrate", "g", "--to", "h2", "--max-age", "-5"],
    ["migrate", "g", "--to", "h2", "--downtime-ms", "-5"],
    ["plan", "g", "--shutdown-timeout", "inf"],
])
def test_cli_bad_numbers(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _cli(args, monkeypatch, capsys, tmp_path)
    assert code == 2


def test_cli_bad_spec_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    inv = tmp_path / "vmigrate.toml"
    inv.write_text(f'[hosts.h1]\ntransport = "local"\ndata_dir = "{tmp_path}/d"\n')
    for extra in (["--nic", INJECT], ["--machine", "pc,memory-backend=evil"],
                  ["--nic", "br0,model=e1000,,x"], ["--disk", "/img/a,file.driver=evil"]):
        code, err = _cli(["vm", "create", "g", "--host", "h1", "--no-start", *extra],
                         monkeypatch, capsys, tmp_path)
        assert code == 2 and err.startswith("error:")
    if (tmp_path / "vmigrate.db").exists():
        from vmigrate.store import Store

        assert Store(tmp_path / "vmigrate.db").list_vms() == []


def test_cli_copy_disk_special_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import os

    empty = tmp_path / "empty.raw"
    empty.touch()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for src in ("/dev/null", str(empty), str(fifo), str(tmp_path)):
        code, err = _cli(["copy-disk", src, str(tmp_path / "out.raw")], monkeypatch, capsys,
                         tmp_path)
        assert code == 2, err
    assert not (tmp_path / "out.raw").exists()


def test_direct_construction_raises_spec_error() -> None:
    """The service builds parts of a spec directly (the kernel of --kernel, the default
    NIC on the host's vm_bridge): a wrong value there is a SpecError too, not pydantic's."""
    with pytest.raises(SpecError):
        KernelBoot(kernel="/boot/$(touch PWNED)")
    with pytest.raises(SpecError):
        NicSpec(bridge=INJECT, mac=mac_for("g"))
    with pytest.raises(SpecError):
        DiskSpec(path="/img/a b")
