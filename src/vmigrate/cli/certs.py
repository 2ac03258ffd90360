"""``vmigrate certs ...``: the CA and x509 credentials for TLS migration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vmigrate import pki
from vmigrate.cli._common import CTX, out, print_json, run
from vmigrate.service import certs

app = typer.Typer(
    rich_markup_mode=None,
    help="TLS credentials for migration: a local CA, and per-host x509 certificates in "
    "the files QEMU's tls-creds-x509 reads (ca-cert.pem, server-cert.pem, server-key.pem, "
    "client-cert.pem, client-key.pem). The lab creates and installs its own at 'lab up'.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir", metavar="DIR",
        help="PKI directory holding the CA (default: the lab's <lab dir>/pki with a lab "
        "inventory, else $VMIGRATE_HOME/pki).",
    ),
]


def _pki_dir(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit.absolute()
    return certs.default_pki_dir(CTX.inventory(required=False))


@app.command()
def init(
    dir: DirOpt = None,
    name: Annotated[str, typer.Option(help="Common name of a new CA.")] = "vmigrate CA",
    as_json: JsonOpt = False,
) -> None:
    """Create the CA (ca-cert.pem, ca-key.pem 0600; 10 years). Keeps an existing CA."""
    where = _pki_dir(dir)
    existed = pki.ca_exists(where)
    pki.create_ca(where, name=name)
    info = pki.ca_info(where)
    if as_json:
        print_json({"dir": str(where), "created": not existed, "ca": info.as_dict()})
        return
    verb = "kept the existing CA" if existed else "created a CA"
    out.print(f"{verb} in {where}: [bold]{info.subject}[/], valid until "
              f"{info.not_after:%Y-%m-%d}")


@app.command()
def issue(
    hosts: Annotated[list[str], typer.Argument(help="Inventory hosts to issue credentials to.",
                                               metavar="HOST")],
    push: Annotated[
        bool,
        typer.Option(help="Install over SSH into each host's tls_path (default "
                     "<data_dir>/tls); --no-push writes them under DIR/hosts/HOST instead."),
    ] = True,
    dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue server and client certificates to hosts, signed by the CA (1 year).

    The certificates name the host (DNS) and its address and migration_address
    (IP), which is what the migration client checks against the destination.
    Reissuing replaces a host's files; a running QEMU keeps the credentials it
    loaded.
    """
    inventory = CTX.inventory()
    where = _pki_dir(dir)

    issued = run(certs.issue(inventory, where, hosts, push=push))
    if as_json:
        print_json([i.as_dict() for i in issued])
        return
    table = Table("host", "names", "valid until", "installed in")
    for i in issued:
        names = ", ".join([*i.server.dns_names, *i.server.ip_addresses])
        table.add_row(i.host, names, f"{i.server.not_after:%Y-%m-%d}", i.destination)
    out.print(table)


@app.command()
def show(dir: DirOpt = None, as_json: JsonOpt = False) -> None:
    """Show the CA (subject, expiry) and the credentials issued to each host."""
    st = certs.status(_pki_dir(dir))
    if as_json:
        print_json(st.as_dict())
        return
    ca = st.ca
    state = "[red]expired[/]" if ca.expired() else f"{certs.days_left(ca)} days left"
    out.print(f"CA [bold]{ca.subject}[/] in {st.dir}\n"
              f"  valid {ca.not_before:%Y-%m-%d} .. {ca.not_after:%Y-%m-%d} ({state})\n"
              f"  sha256 {ca.fingerprint_sha256}")
    if not st.hosts:
        out.print("no host credentials issued from this directory yet "
                  "('vmigrate certs issue HOST...')")
        return
    table = Table("host", "names", "valid until", "keys", "CA")
    for h in st.hosts:
        until = f"{h.server.not_after:%Y-%m-%d}"
        if h.server.expired():
            until = f"[red]{until} expired[/]"
        table.add_row(
            h.host, ", ".join([*h.server.dns_names, *h.server.ip_addresses]), until,
            f"local ({h.record})" if h.keys_local else "pushed to the host",
            "this CA" if h.from_this_ca else "[red]another CA[/]",
        )
    out.print(table)
