"""Helpers for tests that drive an ``evse sim`` process from outside."""

from __future__ import annotations

from functools import partial
from typing import Any
from urllib.parse import urlsplit

import trio

from fieldbus.boards import BOARD_MODELS, Board
from fieldbus.master import ModbusMaster
from ops.httpjson import request_json


def control(
    ready: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """Call the simulator's HTTP control interface (from synchronous test code)."""
    url = urlsplit(ready["control"])
    assert url.hostname is not None and url.port is not None
    return trio.run(partial(request_json, url.hostname, url.port, method, path, body))


def write_board_current(port: str, unit: int, amps: float, kind: str = "evse-din") -> None:
    async def write() -> None:
        async with ModbusMaster.for_port(port) as master:
            await Board(master, unit, BOARD_MODELS[kind]).set_current(amps)

    trio.run(write)
