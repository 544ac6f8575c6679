"""``evse probe``: read one device once and return its normalized reading."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fieldbus.boards import BOARD_MODELS, Board
from fieldbus.master import ModbusMaster
from fieldbus.meters import METER_MODELS, Meter
from fieldbus.ports import check_unit, parse_port

KINDS = tuple(sorted([*METER_MODELS, *BOARD_MODELS]))


def check_kind(kind: str) -> str:
    if kind not in METER_MODELS and kind not in BOARD_MODELS:
        raise ValueError(f"unknown device kind {kind!r} (known: {', '.join(KINDS)})")
    return kind


def default_unit(kind: str) -> int:
    model = METER_MODELS.get(kind) or BOARD_MODELS[kind]
    return model.default_unit


async def probe(
    kind: str, port: str, unit: int | None = None, *, reply_timeout: float = 1.0, retries: int = 1
) -> dict[str, Any]:
    """Read ``kind`` at ``port``/``unit`` once; raises ValueError or FieldbusError."""
    check_kind(kind)
    spec = parse_port(port)
    unit = check_unit(default_unit(kind) if unit is None else unit)
    if kind in METER_MODELS:
        model = METER_MODELS[kind]
        async with ModbusMaster.for_port(spec, timeout=reply_timeout, retries=retries) as master:
            reading = await Meter(master, unit, model).read()
        return {
            "kind": kind,
            "model": model.title,
            "port": spec.url,
            "unit": unit,
            "reading": reading.to_json(),
        }
    board_model = BOARD_MODELS[kind]
    async with ModbusMaster.for_port(spec, timeout=reply_timeout, retries=retries) as master:
        board = Board(master, unit, board_model)
        status = await board.read_status()
    caps = board.capabilities
    return {
        "kind": kind,
        "model": board_model.title,
        "port": spec.url,
        "unit": unit,
        "status": status.to_json(),
        "capabilities": asdict(caps),
    }
