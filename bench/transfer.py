#!/usr/bin/env python3
"""Disk transfer benchmark: ``vmigrate copy-disk`` against rsync, qemu-img over NBD and scp.

Runs in a throw-away lab (root). Both hosts' migration links are shaped with tc tbf
(both ends) to 1gbit, then to 200mbit. Three source images are written into h1's
``local`` pool (the lab shares the host filesystem, so this process writes them
directly):

* ``random``:       512 MiB of ``os.urandom`` (incompressible, no zeroes);
* ``text``:         512 MiB of log-like text (timestamps, levels, a small vocabulary,
                    random numbers: compressible);
* ``sparse``:       2 GiB virtual, a hole except for 128 MiB of random data in the middle.

(``--quick``: 128 MiB / 128 MiB / 1 GiB with 64 MiB, and 1gbit only: a smoke test.)

Each image is copied from h1 to h2's ``local`` pool over the shaped migration link by:

* ours:       ``vmigrate copy-disk h1:SRC h2:DST --json`` run by this process (the
              controller); the sender on h1 connects straight to the receiver on h2's
              migration address (AES-256-GCM, zstd ``auto``, zero skipping, full
              verification re-reading the copy). Wall time is taken outside;
* rsync:      ``rsync --whole-file --sparse`` over ssh, started in h1's namespace, to
              root@<h2 migration address>. The lab's sshd listens only on the
              management address, so for this benchmark a second sshd (same host key
              and config, ``ListenAddress`` the migration address) is started in h2's
              namespace and stopped at the end by its PID;
* qemu-img:   ``qemu-img convert -n -O raw SRC nbd://<h2 migration addr>/`` started in
              h1's namespace, into a ``qemu-nbd`` started in h2's namespace on a
              pre-sized empty target (plain NBD, no encryption, no compression);
* scp:        ``scp`` (SFTP protocol, OpenSSH 9.2) from h1's namespace to the extra sshd.

ssh/scp/rsync use OpenSSH's default cipher and no compression (``-C`` off).

Plus one "incremental" row per rate: h2 already holds an older copy of ``random``
with 5% of its 1 MiB blocks rewritten; rsync in delta mode (no ``--whole-file``)
brings it up to date. vmigrate has no file-level delta against an existing copy (its
incremental rounds work from a running VM's QEMU dirty bitmap, through its journal and
manifest), so there is no row for ours: against a stale copy it sends the whole image
(the full-copy row).

Every copy is checked: sha256 of the destination against the source. Wire bytes are the
kernel counters of h1's migration interface (``link_bytes``: sent + received, IP and TCP
headers included) around each copy. The table gives time, the data rate against the link
(image bytes that were data / time), the effective rate (virtual size / time) against the
link, wire bytes, and each baseline's time divided by ours.

Usage: sudo .venv/bin/python bench/transfer.py [--quick] [--budget 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmigrate.config import HOME_ENV, Inventory, load_inventory
from vmigrate.lab.disks import thin_raw_image
from vmigrate.lab.links import host_netns, link_bytes, set_link_rate
from vmigrate.lab.net import LabSpec, lab_down, lab_up, require_root

MiB = 1 << 20
GiB = 1 << 30
RATES = {"1gbit": 125_000_000, "200mbit": 25_000_000}
NBD_PORT = 10809
SSH_PORT = 22
VMIGRATE = [sys.executable, "-m", "vmigrate"]
METHODS = ("ours", "rsync", "qemu-img", "scp")
LABELS = {
    "ours": "vmigrate copy-disk (AES-GCM, zstd, verify)",
    "rsync": "rsync --whole-file --sparse over ssh",
    "rsync-delta": "rsync delta (older copy on h2, 5% changed)",
    "qemu-img": "qemu-img convert -> qemu-nbd (plain TCP)",
    "scp": "scp (sftp) over ssh",
}


# -- images ---------------------------------------------------------------------------------


def text_image(path: Path, size: int) -> None:
    """``size`` bytes of log-like text: a 16 MiB block of varied lines, repeated."""
    rng = random.Random(5)
    words = ["GET", "PUT", "POST", "/api/v1/items", "/static/app.js", "/login", "user",
             "session", "cache", "miss", "hit", "timeout", "retry", "ok", "db", "query"]
    levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
    lines: list[str] = []
    n = 0
    while n < 16 * MiB:
        line = (f"2026-11-27T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                f"{rng.randrange(60):02d}.{rng.randrange(1000):03d}Z {rng.choice(levels)} "
                f"worker-{rng.randrange(16)} req={rng.getrandbits(32):08x} "
                f"{' '.join(rng.choices(words, k=rng.randrange(3, 8)))} "
                f"status={rng.choice((200, 200, 200, 304, 404, 500))} "
                f"ms={rng.randrange(2000)}\n")
        lines.append(line)
        n += len(line)
    block = "".join(lines).encode()[: 16 * MiB]
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def random_image(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))


def make_images(pool: Path, quick: bool) -> dict[str, dict[str, Any]]:
    data = 128 * MiB if quick else 512 * MiB
    sparse_size, sparse_data = (1 * GiB, 64 * MiB) if quick else (2 * GiB, 128 * MiB)
    images: dict[str, dict[str, Any]] = {
        "random": {"path": pool / "src-random.raw", "size": data, "data": data},
        "text": {"path": pool / "src-text.raw", "size": data, "data": data},
        "sparse": {"path": pool / "src-sparse.raw", "size": sparse_size, "data": sparse_data},
    }
    random_image(images["random"]["path"], data)
    text_image(images["text"]["path"], data)
    thin_raw_image(images["sparse"]["path"], sparse_size, sparse_data)
    for img in images.values():
        img["sha256"] = sha256(img["path"])
        img["allocated"] = img["path"].stat().st_blocks * 512
    zstd = subprocess.run(["zstd", "-3", "-c", str(images["text"]["path"])],
                          capture_output=True, check=True).stdout
    images["text"]["zstd3_ratio"] = round(data / len(zstd), 2)
    return images


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def stale_copy(src: Path, dst: Path, fraction: float) -> int:
    """Copy ``src`` to ``dst`` and rewrite ``fraction`` of its 1 MiB blocks at random."""
    shutil.copyfile(src, dst)
    blocks = src.stat().st_size // MiB
    chosen = random.Random(7).sample(range(blocks), max(1, round(blocks * fraction)))
    with dst.open("r+b") as f:
        for b in chosen:
            f.seek(b * MiB)
            f.write(os.urandom(MiB))
    return len(chosen) * MiB


# -- the extra sshd on h2's migration address ----------------------------------------------


class MigrationSshd:
    """A second sshd in h2's namespace, listening on its migration address (the lab's own
    listens only on the management address). Started in the foreground (``-D``) through
    ``ip netns exec``, which execs it: the Popen PID is sshd's own."""

    def __init__(self, inv: Inventory, home: Path, name: str, host: str) -> None:
        hc = inv.host(host)
        assert inv.lab is not None and hc.migration_address is not None
        hdir = inv.lab.dir / "hosts" / host
        self.address = hc.migration_address
        self.mgmt_address = hc.address
        self.netns = host_netns(home, host, name)
        self.config = hdir / "sshd-migration.config"
        lines = []
        for line in (hdir / "sshd_config").read_text().splitlines():
            if line.startswith("ListenAddress "):
                line = f"ListenAddress {self.address}:{SSH_PORT}"
            elif line.startswith("PidFile "):
                line = f'PidFile "{hdir / "sshd-migration.pid"}"'
            lines.append(line)
        self.config.write_text("\n".join(lines) + "\n")
        self.log = hdir / "sshd-migration.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def listening_before(self) -> bool:
        return _listens(self.netns, self.address, SSH_PORT)

    def start(self) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "/usr/sbin/sshd", "-D",
                                      "-f", str(self.config), "-E", str(self.log)])
        _wait_listen(self.netns, self.address, SSH_PORT, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def _listens(netns: str, addr: str, port: int) -> bool:
    ss = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],
                        capture_output=True, text=True)
    return any(f"{addr}:{port}" in line or f"*:{port}" in line or f"0.0.0.0:{port}" in line
               for line in ss.stdout.splitlines())


def _wait_listen(netns: str, addr: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not _listens(netns, addr, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nothing listening on {addr}:{port} in {netns}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- one copy ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, home: Path, name: str, inv: Inventory, sshd: MigrationSshd,
                 budget: float) -> None:
        self.home, self.name, self.inv, self.sshd, self.budget = home, name, inv, sshd, budget
        self.ns1 = host_netns(home, "h1", name)
        self.ns2 = host_netns(home, "h2", name)
        self.dst_pool = inv.host("h2").pools["local"]
        self.dst_pool.mkdir(parents=True, exist_ok=True)
        assert inv.lab is not None
        key, known = inv.host("h1").key, inv.host("h1").known_hosts
        self.ssh = (f"ssh -i {key} -o UserKnownHostsFile={known} -o BatchMode=yes "
                    f"-o HostKeyAlias={sshd.mgmt_address} -o Compression=no")
        self.ssh_opts = ["-i", str(key), "-o", f"UserKnownHostsFile={known}", "-o",
                         "BatchMode=yes", "-o", f"HostKeyAlias={sshd.mgmt_address}",
                         "-o", "Compression=no"]

    def copy(self, method: str, img: dict[str, Any], dst: Path) -> dict[str, Any]:
        src: Path = img["path"]
        remote = f"root@{self.sshd.address}:{dst}"
        extra: dict[str, Any] = {}
        nbd: subprocess.Popen[bytes] | None = None
        if method == "ours":
            argv = [*VMIGRATE, "copy-disk", f"h1:{src}", f"h2:{dst}", "--json"]
        elif method == "rsync":
            argv = ["ip", "netns", "exec", self.ns1, "rsync", "-e", self.ssh, "--whole-file",
                    "--sparse", "--stats", str(src), remote]
        elif method == "rsync-delta":
            argv = ["ip", "netns", "exec", self.ns1, "rsync", "-e", self.ssh, "--no-whole-file",
                    "--stats", str(src), remote]
        elif method == "scp":
            argv = ["ip", "netns", "exec", self.ns1, "scp", "-q", *self.ssh_opts, str(src),
                    remote]
        elif method == "qemu-img":
            with dst.open("wb") as f:
                f.truncate(img["size"])
            nbd = subprocess.Popen(
                ["ip", "netns", "exec", self.ns2, "qemu-nbd", "--format=raw",
                 f"--bind={self.sshd.address}", f"--port={NBD_PORT}", "--export-name=t",
                 str(dst)], stdout=subprocess.DEVNULL)
            _wait_listen(self.ns2, self.sshd.address, NBD_PORT, nbd)
            argv = ["ip", "netns", "exec", self.ns1, "qemu-img", "convert", "-n", "-f", "raw",
                    "-O", "raw", str(src), f"nbd://{self.sshd.address}:{NBD_PORT}/t"]
        else:
            raise ValueError(method)
        rx0, tx0 = link_bytes(self.home, "h1", self.name)
        t0 = time.monotonic()
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.budget,
                                 env={**os.environ, HOME_ENV: str(self.home)})
            rc, out, err = res.returncode, res.stdout, res.stderr
        except subprocess.TimeoutExpired:
            rc, out, err = -1, "", f"timed out after {self.budget:g} s"
        finally:
            if nbd is not None:
                _stop(nbd)  # qemu-nbd exits by itself when the client leaves
        seconds = time.monotonic() - t0
        rx1, tx1 = link_bytes(self.home, "h1", self.name)
        if method == "ours" and rc == 0:
            report = json.loads(out)
            extra = {k: report.get(k) for k in ("seconds", "data_bytes", "zero_bytes",
                                                 "skipped_bytes", "wire_bytes", "verified")}
        ok = rc == 0 and dst.exists()
        check = "-"
        if ok:
            check = "sha256 ok" if sha256(dst) == img["sha256"] else "SHA256 DIFFERS"
        return {
            "method": method, "status": "ok" if rc == 0 else "failed", "rc": rc,
            "error": None if rc == 0 else (err or out).strip()[-400:],
            "seconds": round(seconds, 3), "wire_tx": tx1 - tx0, "wire_rx": rx1 - rx0,
            "dst_allocated": dst.stat().st_blocks * 512 if dst.exists() else None,
            "check": check, **({"ours": extra} if extra else {}),
        }


# -- the run --------------------------------------------------------------------------------


def summarise(rows: list[dict[str, Any]], images: dict[str, dict[str, Any]]) -> str:
    out = ["| link | image | method | time s | ours' own s | data / link | "
           "effective (virtual) / link | wire MiB (h1 tx+rx) | time / ours | check |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["rate"], r["image"]): r for r in rows if r["method"] == "ours"}
    for r in rows:
        img = images[r["image"]]
        link = RATES[r["rate"]]
        ok = r["status"] == "ok"
        data_frac = img["data"] / r["seconds"] / link if ok else None
        eff = img["size"] / r["seconds"] / link if ok else None
        base = ours.get((r["rate"], r["image"]))
        ratio = (r["seconds"] / base["seconds"]
                 if ok and base and base["status"] == "ok" and r["method"] != "ours" else None)
        moved = f" ({r['moved'] / MiB:.0f} MiB changed)" if "moved" in r else ""
        out.append(
            f"| {r['rate']} | {r['image']}{moved} | {LABELS[r['method']]} | "
            f"{r['seconds']:.1f} | {_own(r)} | {_pct(data_frac)} | {_pct(eff)} | "
            f"{(r['wire_tx'] + r['wire_rx']) / MiB:.0f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | "
            f"{r['check'] if ok else r['status'] + ': ' + str(r['error'])[:80]} |")
    return "\n".join(out)


def _own(row: dict[str, Any]) -> str:
    """The engine's own time (from its JSON report: connected ends to verified copy)."""
    own = row.get("ours", {}).get("seconds")
    return "-" if own is None else f"{own:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small images (128 MiB; sparse 1 GiB with 64 MiB), 1gbit only")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds one copy may run before it is killed (default 200)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    require_root()
    for tool in ("rsync", "scp", "qemu-nbd", "qemu-img", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (scripts/setup.sh installs it)")
    rates = ["1gbit"] if args.quick else list(RATES)
    home = Path(tempfile.mkdtemp(prefix="vmigrate-bench-"))
    os.environ[HOME_ENV] = str(home)
    name = "t" + secrets.token_hex(2)
    rows: list[dict[str, Any]] = []
    images: dict[str, dict[str, Any]] = {}
    started = time.time()
    sshd: MigrationSshd | None = None

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps({"rows": rows, "images": _jsonable(images)},
                                           indent=2))

    try:
        lab_up(LabSpec(name=name, hosts=2, link_rate=rates[0]), home)
        inv = load_inventory(home / "vmigrate.toml")
        src_pool = inv.host("h1").pools["local"]
        src_pool.mkdir(parents=True, exist_ok=True)
        t_img = time.monotonic()
        images = make_images(src_pool, args.quick)
        print(f"images ready in {time.monotonic() - t_img:.0f} s: "
              f"{json.dumps(_jsonable(images))}", flush=True)
        sshd = MigrationSshd(inv, home, name, "h2")
        already = sshd.listening_before()
        print(f"lab sshd on h2's migration address: {'yes' if already else 'no'}; "
              "starting a second sshd there", flush=True)
        sshd.start()
        bench = Bench(home, name, inv, sshd, args.budget)
        dst = bench.dst_pool / "dst.raw"
        for rate in rates:
            for host in ("h1", "h2"):
                set_link_rate(home, host, rate, name)
            for image, img in images.items():
                for method in METHODS:
                    dst.unlink(missing_ok=True)
                    row = bench.copy(method, img, dst)
                    keep({"rate": rate, "image": image, **row})
                    dst.unlink(missing_ok=True)
            # incremental: an older copy on h2, 5% of its 1 MiB blocks different
            moved = stale_copy(images["random"]["path"], dst, 0.05)
            row = bench.copy("rsync-delta", images["random"], dst)
            keep({"rate": rate, "image": "random", "moved": moved, **row})
            dst.unlink(missing_ok=True)
    finally:
        if sshd is not None:
            sshd.stop()
        lab_down(home, name)
        shutil.rmtree(home, ignore_errors=True)
    print(f"\n{len(rows)} copies in {time.time() - started:.0f} s; {os.cpu_count()} cores; "
          f"host {socket.gethostname()}; links {', '.join(rates)} (tbf, both ends, h1 and h2)\n")
    print(summarise(rows, images))
    return 0


def _jsonable(images: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {**v, "path": str(v["path"])} for k, v in images.items()}


if __name__ == "__main__":
    sys.exit(main())
