"""Register maps as data: a field is (table, address, type, word order, scale, n/a).

A device model is a table of fields; decoding, read planning and the
simulator's encoding all read those tables, so adding a model is adding a
table (and a test), never code per register.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from fieldbus.errors import DeviceDataError


class Table(Enum):
    """The four Modbus data tables, with the function code that reads each."""

    COIL = 1
    DISCRETE_INPUT = 2
    HOLDING = 3
    INPUT = 4

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE_INPUT)


class DType(Enum):
    """Register value types; the value is the width in 16-bit registers."""

    U16 = ("H", 1)
    S16 = ("h", 1)
    U32 = ("I", 2)
    S32 = ("i", 2)
    U64 = ("Q", 4)
    F32 = ("f", 2)
    BIT = ("?", 1)
    #: One ASCII character in the low byte of a register (Phoenix EV-CC status).
    CHAR = ("c", 1)

    def __init__(self, fmt: str, width: int) -> None:
        self.fmt = fmt
        self.width = width


class WordOrder(Enum):
    """Order of the 16-bit words of a multi-register value; bytes in a word are big-endian."""

    HIGH_FIRST = "high-first"  # Modbus convention (Eastron, ABB)
    LOW_FIRST = "low-first"  # Carlo Gavazzi EM24


@dataclass(frozen=True, slots=True)
class Field:
    """One quantity in a register map.

    ``scale`` turns the raw integer into the engineering unit the driver
    reports (e.g. 0.01 for a register in 0.01 kWh read as kWh). ``na`` lists
    raw values the device uses for "not available"; they decode to None.
    """

    table: Table
    address: int
    dtype: DType = DType.U16
    scale: float = 1.0
    word_order: WordOrder = WordOrder.HIGH_FIRST
    na: frozenset[int] = frozenset()

    @property
    def width(self) -> int:
        return self.dtype.width

    def _words_to_bytes(self, words: Sequence[int]) -> bytes:
        ordered = list(words) if self.word_order is WordOrder.HIGH_FIRST else list(words)[::-1]
        return b"".join(w.to_bytes(2, "big") for w in ordered)

    def raw(self, words: Sequence[int]) -> int | float:
        """The raw value (before scale) from this field's registers."""
        if len(words) != self.width:
            raise DeviceDataError(f"field at {self.address} needs {self.width} registers")
        if self.dtype is DType.BIT:
            return int(bool(words[0]))
        if self.dtype is DType.CHAR:
            return words[0] & 0xFF
        data = self._words_to_bytes(words)
        value: int | float = struct.unpack(">" + self.dtype.fmt, data)[0]
        return value

    def decode(self, words: Sequence[int]) -> float | None:
        """Engineering value, or None for "not available" (NaN on a float meter too)."""
        if self.dtype is DType.F32:
            value = self.raw(words)
            bits = int.from_bytes(self._words_to_bytes(words), "big")
            if bits in self.na or math.isnan(value) or math.isinf(value):
                return None
            return float(value) * self.scale
        raw = int(self.raw(words))
        if self.na:
            unsigned = int.from_bytes(self._words_to_bytes(words), "big")
            if unsigned in self.na:
                return None
        return raw * self.scale if self.scale != 1.0 else float(raw)

    def encode(self, value: float | None) -> list[int]:
        """Registers holding ``value`` (None encodes the first n/a sentinel).

        Used by the simulator and for writes; the tests check decoding against
        values packed independently, not against this function.
        """
        if value is None:
            if not self.na:
                raise ValueError(f"field at {self.address} has no 'not available' value")
            unsigned = min(self.na)
            data = unsigned.to_bytes(2 * self.width, "big")
        elif self.dtype is DType.F32:
            data = struct.pack(">f", value / self.scale)
        elif self.dtype is DType.BIT:
            return [1 if value else 0]
        elif self.dtype is DType.CHAR:
            return [int(value) & 0xFF]
        else:
            raw = round(value / self.scale)
            bits = 16 * self.width
            signed = self.dtype in (DType.S16, DType.S32)
            low, high = (
                (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            )
            raw = min(max(raw, low), high)
            data = struct.pack(">" + self.dtype.fmt, raw)
        words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
        return words if self.word_order is WordOrder.HIGH_FIRST else words[::-1]


@dataclass(frozen=True, slots=True)
class Block:
    """One read request covering several fields."""

    table: Table
    address: int
    count: int
    names: tuple[str, ...] = field(default=())


def plan_reads(
    fields: Mapping[str, Field], *, max_count: int = 125, max_gap: int = 8
) -> list[Block]:
    """Group fields into as few reads as the device allows.

    Fields of one table closer than ``max_gap`` unused registers share a read,
    up to ``max_count`` registers per request (125 is the protocol's limit for
    function 03/04, Modbus Application Protocol 6.3; some meters allow fewer).
    """
    blocks: list[Block] = []
    by_table: dict[Table, list[tuple[str, Field]]] = {}
    for name, f in fields.items():
        by_table.setdefault(f.table, []).append((name, f))
    for table, items in by_table.items():
        items.sort(key=lambda item: item[1].address)
        start = end = -1
        names: list[str] = []
        for name, f in items:
            f_end = f.address + f.width
            if names and f.address - end <= max_gap and f_end - start <= max_count:
                end = max(end, f_end)
                names.append(name)
                continue
            if names:
                blocks.append(Block(table, start, end - start, tuple(names)))
            start, end, names = f.address, f_end, [name]
        if names:
            blocks.append(Block(table, start, end - start, tuple(names)))
    return blocks


def decode_fields(
    fields: Mapping[str, Field], blocks: Iterable[tuple[Block, Sequence[int]]]
) -> dict[str, float | None]:
    """Decode every field from the registers its block returned."""
    values: dict[str, float | None] = {}
    for block, words in blocks:
        for name in block.names:
            f = fields[name]
            offset = f.address - block.address
            values[name] = f.decode(words[offset : offset + f.width])
    return values
