"""The ``vmigrate`` entry point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from vmigrate import __version__
from vmigrate.cli import (
    audit,
    certs,
    host,
    lab,
    migrate,
    plan,
    transfer,
    transfer_ends,
    vm,
    wave,
)
from vmigrate.cli._common import CTX, err
from vmigrate.errors import VmigrateError

app = typer.Typer(
    rich_markup_mode=None,
    help="vmigrate moves QEMU/KVM virtual machines between hosts.\n\n"
    "Start with 'vmigrate lab up' to build a test datacenter on this machine, or write "
    "an inventory (vmigrate.toml) naming your hosts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(vm.app, name="vm")
app.add_typer(lab.app, name="lab")
app.add_typer(migrate.job_app, name="job")
app.add_typer(certs.app, name="certs")
app.add_typer(audit.app, name="audit")
app.add_typer(host.app, name="host")
app.add_typer(wave.app, name="wave")
app.command("assess")(plan.assess)
app.command("plan")(plan.plan)
app.command("migrate")(migrate.migrate)
app.command("copy-disk")(transfer.copy_disk)
app.add_typer(transfer_ends.app, name="transfer")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vmigrate {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", envvar="VMIGRATE_CONFIG",
            help="Inventory file (default: $VMIGRATE_HOME/vmigrate.toml).",
        ),
    ] = None,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True,
        help="Log what happens (-vv: also every SSH and QMP message).")] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    CTX.config = config
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if verbose == 1:  # the libraries' own debug logs (whole QMP replies) need -vv
        for noisy in ("asyncssh", "qemu.qmp"):
            logging.getLogger(noisy).setLevel(logging.INFO)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Leave the lab up at the end.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Build a lab, run a guest, live-migrate it under load, report, tear down."""
    from vmigrate.cli.demo import run_demo

    run_demo(keep=keep, as_json=as_json)


def main() -> None:
    """Console script: run the app, turn vmigrate errors into one line and an exit status."""
    try:
        app()
    except VmigrateError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
