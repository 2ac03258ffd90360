"""Shared CLI plumbing: consoles, state, running coroutines, JSON output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from vmigrate.config import Inventory, load_inventory, state_home
from vmigrate.store import Store

T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Context:
    """Options given before the subcommand."""

    config: Path | None = None

    def inventory(self, *, required: bool = True) -> Inventory:
        return load_inventory(self.config, required=required)

    def store(self) -> Store:
        return Store(state_home() / "vmigrate.db")


CTX = Context()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()

