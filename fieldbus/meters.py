"""Energy meters: one table per model, one driver, one normalized reading.

Each model maps the normalized quantities below to a ``Field``; the field's
scale converts to volts, amperes, watts, watt-hours and hertz, so the driver
never knows a model's units or word order. A quantity a model lacks (L2/L3 on
a single-phase meter) is simply absent from its table and reads as None.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import MappingProxyType
from typing import Any, Protocol

import trio

from fieldbus.devices import FieldReader
from fieldbus.errors import DeviceDataError, Superseded
from fieldbus.master import ModbusMaster, Wanted
from fieldbus.registers import Block, DType, Field, Table, WordOrder, decode_fields

#: The most registers one meter request reads, whatever the model allows
#: (``MeterModel.max_read``): the meter usually shares its line with the board,
#: and the bus serves one request at a time; an off-write or the board's next
#: poll can go only between two requests, never into one on the wire. At 9600
#: baud 8N1 a read of 8 registers holds the line 32 ms (8-byte request, 2 ms
#: device turnaround, 21-byte reply) + t3.5 3.6 ms, against 57 ms for the
#: SDM630's 18 phase registers in one read; an SDM630 reading takes 5 requests
#: instead of 3 (~160 ms of a 1-s meter period instead of ~108). 8 = four 32-bit
#: values: a phase triple and its total (the ABB's power set stays one request).
#: The same on TCP: a gateway may put the line behind it, and two more requests
#: a second cost nothing there.
LINE_SHARE_MAX_READ = 8

#: Measured durations kept per request of a reading (``Meter.read``'s ``share``).
_TIMED = 8


class LineTurn(Protocol):
    """The time another device's poller leaves a shared line free
    (``fieldbus.boards.LineShare``)."""

    async def wait(self, duration: float, not_before: float = ...) -> bool:
        """Until a request that holds the line ``duration`` s, sent no earlier
        than ``not_before``, may go; True if it fits (then ``fits`` is asked
        again once the bus is its own), False if it goes unchecked."""
        ...

    def fits(self, duration: float) -> bool: ...


PHASES = ("l1", "l2", "l3")
QUANTITIES = (
    *(f"voltage_{p}" for p in PHASES),
    *(f"current_{p}" for p in PHASES),
    *(f"power_{p}" for p in PHASES),
    "power_total",
    "energy_import",
    "frequency",
)


@dataclass(frozen=True, slots=True)
class MeterModel:
    kind: str
    title: str
    phases: int
    fields: Mapping[str, Field]
    #: Largest read the device accepts, in registers (the driver reads at most
    #: LINE_SHARE_MAX_READ at a time anyway).
    max_read: int = 125
    #: Unused registers a bulk read may span to save a request.
    max_gap: int = 8
    default_unit: int = 1
    #: A register naming the model, and the codes this table is valid for:
    #: read once before the first reading, so a wrong table is refused
    #: instead of silently giving wrong values.
    identity: Field | None = None
    identity_codes: frozenset[int] = frozenset()
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.fields) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"{self.kind}: unknown quantities {sorted(unknown)}")
        for name in ("energy_import", "power_total"):
            if name not in self.fields:
                raise ValueError(f"{self.kind}: a meter model needs {name}")


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One normalized reading. Units: V, A, W, Wh, Hz; None = not available."""

    voltage: tuple[float | None, float | None, float | None]
    current: tuple[float | None, float | None, float | None]
    power: tuple[float | None, float | None, float | None]
    power_total: float | None
    energy_import_wh: float | None
    frequency: float | None
    #: trio clock when the reading completed (for staleness checks).
    read_at: float
    #: Wall-clock time of the reading, UTC (for message timestamps).
    timestamp: datetime = field(compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "voltage": list(self.voltage),
            "current": list(self.current),
            "power": list(self.power),
            "power_total": self.power_total,
            "energy_import_wh": self.energy_import_wh,
            "frequency": self.frequency,
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
        }


def reading_from_values(values: Mapping[str, float | None], *, read_at: float) -> MeterReading:
    def three(prefix: str) -> tuple[float | None, float | None, float | None]:
        a, b, c = (values.get(f"{prefix}_{p}") for p in PHASES)
        return (a, b, c)

    return MeterReading(
        voltage=three("voltage"),
        current=three("current"),
        power=three("power"),
        power_total=values.get("power_total"),
        energy_import_wh=values.get("energy_import"),
        frequency=values.get("frequency"),
        read_at=read_at,
        timestamp=datetime.now(UTC),
    )


class Meter:
    """Driver: reads one meter on a bus and returns a ``MeterReading``."""

    def __init__(self, master: ModbusMaster, unit: int, model: MeterModel) -> None:
        self.model = model
        self.unit = unit
        self._verified = False
        self._reader = FieldReader(
            master,
            unit,
            model.fields,
            max_count=min(model.max_read, LINE_SHARE_MAX_READ),
            max_gap=model.max_gap,
        )

        #: How long each request of a reading held the line lately (trio time
        #: from the call to the reply, the line's silence before it included).
        self._took: list[deque[float]] = [deque(maxlen=_TIMED) for _ in self._reader.blocks]

    @property
    def master(self) -> ModbusMaster:
        return self._reader.master

    @property
    def requests_per_reading(self) -> int:
        return len(self._reader.blocks)

    def request_time(self, index: int) -> float:
        """The shortest of the last measured durations of request ``index`` (0 before any):
        a request that also waited for the bus does not count longer."""
        took = self._took[index]
        return min(took) if took else 0.0

    async def _read_block(self, block: Block, wanted: Wanted) -> list[int]:
        if wanted is None:
            return await self._reader.read_block(block)
        m, unit, address, count = self.master, self.unit, block.address, block.count
        match block.table:
            case Table.INPUT:
                return await m.read_input_registers(unit, address, count, wanted=wanted)
            case Table.HOLDING:
                return await m.read_holding_registers(unit, address, count, wanted=wanted)
            case Table.COIL:
                return [int(b) for b in await m.read_coils(unit, address, count, wanted=wanted)]
            case Table.DISCRETE_INPUT:
                bits = await m.read_discrete_inputs(unit, address, count, wanted=wanted)
                return [int(b) for b in bits]

    async def verify(self) -> None:
        """Check the model register, where the table names one."""
        f = self.model.identity
        if f is None or self._verified:
            return
        words = await self._reader.read_block(Block(f.table, f.address, f.width))
        code = f.decode(words)
        if code is None or int(code) not in self.model.identity_codes:
            others = [
                m.kind
                for m in METER_MODELS.values()
                if m.identity == f and code is not None and int(code) in m.identity_codes
            ]
            hint = f"; this looks like a {others[0]}" if others else ""
            raise DeviceDataError(
                f"model code {code!r} is not a {self.model.title}{hint}",
                where=f"{self._reader.master.where} unit {self.unit}",
            )
        self._verified = True

    async def read(self, *, share: LineTurn | None = None) -> MeterReading:
        """One reading, request by request (at most LINE_SHARE_MAX_READ registers
        each). With ``share`` (a line the board shares), each request first waits
        until it fits into the time the board's poller leaves free, judged from
        how long that request took lately."""
        await self.verify()
        reader = self._reader
        results: list[tuple[Block, list[int]]] = []
        # With a share, the line's silence after each request is waited out in
        # share.wait (a timer), not by the master (a busy wait): see LineShare.
        gap = self.master.gap if share is not None else 0.0
        free_from = -math.inf
        for i, block in enumerate(reader.blocks):
            while True:
                wanted: Wanted = None
                if share is not None:
                    duration = self.request_time(i)
                    if await share.wait(duration, free_from):
                        wanted = partial(share.fits, duration)
                began = trio.current_time()
                try:
                    words = await self._read_block(block, wanted)
                except Superseded:
                    # It got the bus too late for its share (or an off-write
                    # closed it): the next share.
                    free_from = trio.current_time() + gap
                    continue
                break
            results.append((block, words))
            ended = trio.current_time()
            self._took[i].append(ended - began)
            free_from = ended + gap
        values = decode_fields(reader.fields, results)
        return reading_from_values(values, read_at=trio.current_time())


def _f32(address: int, scale: float = 1.0) -> Field:
    # Eastron: IEEE-754 float32, high word first, input registers (function 04)
    # [mbmd-sdm] volkszaehler/mbmd meters/rs485/sdm.go (RTUIeee754ToFloat64).
    # No "not available" value is documented; a NaN or inf float reads as None.
    return Field(Table.INPUT, address, DType.F32, scale)


# Eastron SDM630: volkszaehler/mbmd meters/rs485/sdm.go; hhoefling/openWB_lite docs/infos.md.
_SDM630 = {
    "voltage_l1": _f32(0x0000),  # V L1-N [mbmd-sdm], [owb-lite]
    "voltage_l2": _f32(0x0002),  # V L2-N
    "voltage_l3": _f32(0x0004),  # V L3-N
    "current_l1": _f32(0x0006),  # A [mbmd-sdm], [owb-lite]
    "current_l2": _f32(0x0008),
    "current_l3": _f32(0x000A),
    "power_l1": _f32(0x000C),  # W, signed [mbmd-sdm], [owb-lite]
    "power_l2": _f32(0x000E),
    "power_l3": _f32(0x0010),
    "power_total": _f32(0x0034),  # W, total system power [mbmd-sdm], [owb-lite]
    "frequency": _f32(0x0046),  # Hz [mbmd-sdm], [owb-lite]
    "energy_import": _f32(0x0048, 1000.0),  # kWh -> Wh [mbmd-sdm]
}

# Eastron SDM120 (single phase): mbmd meters/rs485/sdm120.go lists only the L1
# addresses; it has no total-system-power register at 0x0034, so the L1
# active power at 0x000C is the meter's total.
_SDM120 = {
    "voltage_l1": _f32(0x0000),  # V [mbmd-sdm120]
    "current_l1": _f32(0x0006),  # A [mbmd-sdm120]
    "power_l1": _f32(0x000C),  # W [mbmd-sdm120]
    "power_total": _f32(0x000C),  # = L1 power (single phase) [mbmd-sdm120]
    "frequency": _f32(0x0046),  # Hz [mbmd-sdm120]
    "energy_import": _f32(0x0048, 1000.0),  # kWh -> Wh [mbmd-sdm120]
}

# Eastron SDM72D-M, V1 map (mbmd meters/rs485/sdm72.go: "This device does not
# provide voltage data"): totals only. The V2 hardware has the SDM630 per-phase
# set (openWB_lite docs/infos.md); use the sdm630 table for a V2. No frequency
# register is listed for V1.
_SDM72 = {
    "power_total": _f32(0x0034),  # W [mbmd-sdm72]
    "energy_import": _f32(0x0048, 1000.0),  # kWh -> Wh [mbmd-sdm72]
}

# ABB B23/B24: holding registers, function 03, high word first
# (volkszaehler/mbmd meters/rs485/abb.go; openWB/core packages/modules/common/b23.py).
# "Not available" is per type: all ones for unsigned values and 0x7FFF.. for
# signed ones (both drivers implement this table; ABB's manual text on the rule
# was not retrieved). Field.decode compares the raw *unsigned* value of the
# words, so the signed sentinels are given as their unsigned bit patterns.
_ABB_NA: Mapping[DType, frozenset[int]] = {
    DType.U16: frozenset({0xFFFF}),
    DType.S16: frozenset({0x7FFF}),
    DType.U32: frozenset({0xFFFF_FFFF}),
    DType.S32: frozenset({0x7FFF_FFFF}),
    DType.U64: frozenset({0xFFFF_FFFF_FFFF_FFFF}),
}


def _abb(address: int, dtype: DType, scale: float) -> Field:
    return Field(Table.HOLDING, address, dtype, scale, na=_ABB_NA[dtype])


_ABB_B23 = {
    # 0.01 kWh -> Wh, uint64 (4 registers) [mbmd-abb], [owb-b23]
    "energy_import": _abb(0x5000, DType.U64, 10.0),
    # 0.1 V (mbmd and openWB divide by 10; star.ke.st says 0.1 V too) [mbmd-abb], [owb-b23]
    "voltage_l1": _abb(0x5B00, DType.U32, 0.1),
    "voltage_l2": _abb(0x5B02, DType.U32, 0.1),
    "voltage_l3": _abb(0x5B04, DType.U32, 0.1),
    # 0.01 A [mbmd-abb], [owb-b23]
    "current_l1": _abb(0x5B0C, DType.U32, 0.01),
    "current_l2": _abb(0x5B0E, DType.U32, 0.01),
    "current_l3": _abb(0x5B10, DType.U32, 0.01),
    # 0.01 W, int32: the drivers read it signed; star.ke.st's "U32BE" is wrong
    # for an import/export meter. Total + L1..L3 are one 8-register read.
    "power_total": _abb(0x5B14, DType.S32, 0.01),
    "power_l1": _abb(0x5B16, DType.S32, 0.01),
    "power_l2": _abb(0x5B18, DType.S32, 0.01),
    "power_l3": _abb(0x5B1A, DType.S32, 0.01),
    # 0.01 Hz, uint16 [mbmd-abb], [owb-b23]
    "frequency": _abb(0x5B2C, DType.U16, 0.01),
}


def _em24(address: int, scale: float) -> Field:
    # Carlo Gavazzi EM24: INT32 with the least significant word first
    # (mbmd Int32LswFirst via RTUInt32ToFloat64Swapped; Victron Reg_s32l).
    # Read with function 04: CG says 03 and 04 "have exactly the same effect"
    # [cg-pfx-proto]; mbmd uses 04, Victron 03. No sentinel is documented.
    return Field(Table.INPUT, address, DType.S32, scale, WordOrder.LOW_FIRST)


def _em24_hz(address: int) -> Field:
    # INT16 at 0.1 Hz in both maps (mbmd; Victron reads it as u16).
    return Field(Table.INPUT, address, DType.S16, 0.1)


# Values common to both EM24 maps: [mbmd-em24] meters/rs485/carlogavazzi-em24.go,
# [victron-cg] dbus-modbus-client carlo_gavazzi.py.
_EM24_COMMON = {
    "voltage_l1": _em24(0x0000, 0.1),  # 0.1 V
    "voltage_l2": _em24(0x0002, 0.1),
    "voltage_l3": _em24(0x0004, 0.1),
    "current_l1": _em24(0x000C, 0.001),  # 0.001 A
    "current_l2": _em24(0x000E, 0.001),
    "current_l3": _em24(0x0010, 0.001),
    "power_l1": _em24(0x0012, 0.1),  # 0.1 W
    "power_l2": _em24(0x0014, 0.1),
    "power_l3": _em24(0x0016, 0.1),
    "power_total": _em24(0x0028, 0.1),  # 0.1 W, W sum
}

# EM24-DIN RS-485 map (model codes 45..48): mbmd carlogavazzi-em24.go, the
# branch taken for those codes.
_EM24_DIN = {
    **_EM24_COMMON,
    "frequency": _em24_hz(0x0037),
    "energy_import": _em24(0x0042, 100.0),  # kWh(+) TOT, 0.1 kWh -> Wh
}

# EM24 Ethernet (E1) map (model codes 1648..1653): mbmd
# carlogavazzi-em24_e1.go and Victron carlo_gavazzi.py. On an E1, 0x0042 is
# the L2 import energy: the DIN table would read a wrong value without error,
# which is why both tables check the model code first.
_EM24_E1 = {
    **_EM24_COMMON,
    "frequency": _em24_hz(0x0033),
    "energy_import": _em24(0x0034, 100.0),  # kWh(+) TOT, 0.1 kWh -> Wh
}

# Model / carrier code, register 0x000B (mbmd Initialize, Victron probe). The
# sources read it as a holding register; CG documents 03 and 04 as equivalent,
# so it is read with 04 like the measurements.
_EM24_MODEL = Field(Table.INPUT, 0x000B)

METER_MODELS: Mapping[str, MeterModel] = MappingProxyType(
    {
        m.kind: m
        for m in (
            # Eastron says "not more than 40 parameters (80 registers)" [lamaplc];
            # openWB saw some units refuse more than 50 registers [owb-2890].
            # 40 registers stays below both.
            MeterModel("sdm630", "Eastron SDM630", 3, _SDM630, max_read=40),
            MeterModel("sdm120", "Eastron SDM120", 1, _SDM120, max_read=40),
            # 10 registers is a conservative local choice, not a documented
            # limit: sources give 30 parameters (SDM72DM-V2 datasheet,
            # esphome/issues#4627) to 50 registers (openWB PR #2890).
            MeterModel(
                "sdm72",
                "Eastron SDM72D-M (V1, totals only)",
                3,
                _SDM72,
                max_read=10,
                notes="max_read 10 is a conservative local choice, not a vendor limit",
            ),
            MeterModel("abb-b23", "ABB B23/B24", 3, _ABB_B23),
            # CG: "maximum 11 registers with a single request" [cg-pfx-proto]
            # (the same line also says "1 to 10h"; 11 is the smaller reading).
            MeterModel(
                "em24",
                "Carlo Gavazzi EM24-DIN",
                3,
                _EM24_DIN,
                max_read=11,
                identity=_EM24_MODEL,
                identity_codes=frozenset(range(45, 49)),
            ),
            MeterModel(
                "em24-e1",
                "Carlo Gavazzi EM24 Ethernet (E1)",
                3,
                _EM24_E1,
                max_read=11,
                identity=_EM24_MODEL,
                identity_codes=frozenset(range(1648, 1654)),
            ),
        )
    }
)
