"""``vmigrate host ...``: the inventory's hosts as SSH sees them."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from vmigrate.cli._common import CTX, err, out, print_json, run
from vmigrate.errors import UserError
from vmigrate.hosts import (
    fetch_host_key,
    fingerprint,
    known_hosts_path,
    known_keys,
    record_host_key,
)

app = typer.Typer(
    rich_markup_mode=None,
    help="The inventory's hosts: record the SSH host key of a host on purpose. vmigrate "
    "checks every SSH host key against the inventory's host_key pin or the host's "
    "known_hosts file (default $VMIGRATE_HOME/known_hosts), never through ~/.ssh/config.",
    no_args_is_help=True,
)


@app.command()
def trust(
    host: Annotated[str, typer.Argument(help="Inventory host whose SSH key to record.",
                                        metavar="HOST")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Record it without asking.")
                   ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Fetch HOST's SSH host key, show its fingerprint and, once confirmed, record it
    as the one known key of the host's address in its known_hosts file (replacing a
    key recorded before). Compare the fingerprint with the host's own
    ('ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' on its console) before you
    confirm: this is the moment an attacker in the middle would be trusted.

    Exit status 0 when the key is recorded (or was already), 2 for a wrong request
    (unknown host, a local host, a pinned host_key, no confirmation), 1 when the
    host cannot be reached.
    """
    cfg = CTX.inventory().host(host)
    if cfg.transport == "local":
        raise UserError(f"host {host} is this machine (transport = \"local\"): no SSH key "
                        "to trust")
    if cfg.host_key is not None:
        raise UserError(f"host {host} pins its key in the inventory (host_key = "
                        f"{cfg.host_key}): change the pin there")
    path = known_hosts_path(cfg)
    key = run(fetch_host_key(cfg.address, cfg.port))
    got = fingerprint(key)
    recorded = [fingerprint(k) for k in known_keys(path, cfg.address, cfg.port)]
    result: dict[str, Any] = {
        "host": host, "address": cfg.address, "port": cfg.port,
        "key_type": key.get_algorithm(), "fingerprint": got, "known_hosts": str(path),
        "previous": recorded, "recorded": False,
    }
    if recorded == [got]:
        result["recorded"] = True
        if as_json:
            print_json({**result, "changed": False})
        else:
            out.print(f"{host} ({cfg.address}:{cfg.port}): {result['key_type']} {got} is "
                      f"already its recorded key in {path}")
        return
    where = f"{host} ({cfg.address}:{cfg.port})"
    err.print(f"{where} offers {result['key_type']} key {got}")
    if recorded:
        err.print(f"it REPLACES the key recorded for it: {', '.join(recorded)}")
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"not recording the host key of {host} without a confirmation: "
                            "pass --yes once you have checked the fingerprint")
        if not typer.confirm(f"record {got} as the host key of {host} in {path}?",
                             default=False, err=True):
            raise UserError(f"the host key of {host} was not recorded")
    record_host_key(path, cfg.address, cfg.port, key)
    result["recorded"] = True
    if as_json:
        print_json({**result, "changed": True})
    else:
        out.print(f"recorded {result['key_type']} {got} for {where} in {path}")
