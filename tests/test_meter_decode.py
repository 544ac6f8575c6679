"""Meter tables + driver: decode register images built from each device's own format.

Every register value here is packed with ``struct`` from the physical value in
the device's documented type, word order and scale (docs/device-maps.md), not
with ``Field.encode``. The bus is a small in-memory fake of ``ModbusMaster``'s
request methods; the real master is tested elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import cast

import pytest

from fieldbus.errors import DeviceDataError
from fieldbus.master import ModbusMaster
from fieldbus.meters import METER_MODELS, Meter, MeterReading
from fieldbus.registers import Table

IR, HR = Table.INPUT, Table.HOLDING


class FakeMaster:
    """Serves a dict of registers, records every request (function, address, count)."""

    where = "fake:0"

    def __init__(self, regs: dict[tuple[Table, int], int]) -> None:
        self.regs = regs
        self.requests: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, list[int]]] = []

    def _get(self, table: Table, address: int, count: int) -> list[int]:
        return [self.regs.get((table, a), 0) for a in range(address, address + count)]

    async def read_holding_registers(self, unit: int, address: int, count: int) -> list[int]:
        self.requests.append((3, address, count))
        return self._get(HR, address, count)

    async def read_input_registers(self, unit: int, address: int, count: int) -> list[int]:
        self.requests.append((4, address, count))
        return self._get(IR, address, count)

    async def read_coils(self, unit: int, address: int, count: int) -> list[bool]:
        self.requests.append((1, address, count))
        return [bool(v) for v in self._get(Table.COIL, address, count)]

    async def read_discrete_inputs(self, unit: int, address: int, count: int) -> list[bool]:
        self.requests.append((2, address, count))
        return [bool(v) for v in self._get(Table.DISCRETE_INPUT, address, count)]

    async def write_register(self, unit: int, address: int, value: int) -> None:
        self.writes.append((6, address, [value]))
        self.regs[(HR, address)] = value

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        self.writes.append((16, address, list(values)))
        for i, v in enumerate(values):
            self.regs[(HR, address + i)] = v

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        self.writes.append((5, address, [int(value)]))
        self.regs[(Table.COIL, address)] = int(value)


def put(
    regs: dict[tuple[Table, int], int],
    table: Table,
    address: int,
    data: bytes,
    *,
    low_word_first: bool = False,
) -> None:
    """Store big-endian ``data`` as registers from ``address``, optionally LSW first."""
    ws = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if low_word_first:
        ws.reverse()
    for i, w in enumerate(ws):
        regs[(table, address + i)] = w


async def read(model: str, regs: dict[tuple[Table, int], int]) -> tuple[MeterReading, FakeMaster]:
    bus = FakeMaster(regs)
    meter = Meter(cast(ModbusMaster, bus), 1, METER_MODELS[model])
    return await meter.read(), bus


# -- Eastron: float32, high word first, FC04 -------------------------------------


def eastron(values: dict[int, float]) -> dict[tuple[Table, int], int]:
    regs: dict[tuple[Table, int], int] = {}
    for address, v in values.items():
        put(regs, IR, address, struct.pack(">f", v))
    return regs


async def test_sdm630() -> None:
    regs = eastron(
        {
            0x00: 230.5,
            0x02: 231.25,
            0x04: 229.75,
            0x06: 10.5,
            0x08: 11.0,
            0x0A: 0.25,
            0x0C: 2400.0,
            0x0E: -120.5,
            0x10: 50.0,
            0x34: 2329.5,
            0x46: 50.0625,
            0x48: 1234.5,
        }
    )
    r, bus = await read("sdm630", regs)
    assert r.voltage == (230.5, 231.25, 229.75)
    assert r.current == (10.5, 11.0, 0.25)
    assert r.power == (2400.0, -120.5, 50.0)
    assert r.power_total == 2329.5
    assert r.frequency == 50.0625
    assert r.energy_import_wh == 1_234_500.0  # kWh -> Wh
    assert {fc for fc, _, _ in bus.requests} == {4}
    assert max(count for _, _, count in bus.requests) <= 40


async def test_sdm630_word_order_is_high_first() -> None:
    # 1234.5 as float32 is 0x449A5000: the high word 0x449A sits at the lower address.
    regs = eastron(
        dict.fromkeys((0x00, 0x02, 0x04, 0x06, 0x08, 0x0A, 0x0C, 0x0E, 0x10, 0x34, 0x46), 0.0)
    )
    regs[(IR, 0x48)], regs[(IR, 0x49)] = 0x449A, 0x5000
    r, _ = await read("sdm630", regs)
    assert r.energy_import_wh == 1_234_500.0


async def test_sdm630_nan_reads_as_none() -> None:
    regs = eastron({0x00: float("nan"), 0x02: 230.0, 0x34: float("inf"), 0x48: 1.0})
    r, _ = await read("sdm630", regs)
    assert r.voltage[0] is None
    assert r.voltage[1] == 230.0
    assert r.power_total is None
    assert r.energy_import_wh == 1000.0


async def test_sdm120_single_phase() -> None:
    # Registers for L2/L3 and 0x0034 hold values a 3-phase table would pick up.
    regs = eastron(
        {
            0x00: 229.5,
            0x02: 999.0,
            0x04: 999.0,
            0x06: 7.25,
            0x08: 99.0,
            0x0C: 1660.5,
            0x0E: 99.0,
            0x34: 12345.0,
            0x46: 49.9375,
            0x48: 12.75,
        }
    )
    r, bus = await read("sdm120", regs)
    assert r.voltage == (229.5, None, None)
    assert r.current == (7.25, None, None)
    assert r.power == (1660.5, None, None)
    # No total-system-power register on the SDM120: the L1 power is the total.
    assert r.power_total == 1660.5
    assert r.frequency == 49.9375
    assert r.energy_import_wh == 12_750.0
    assert max(count for _, _, count in bus.requests) <= 40


async def test_sdm72_totals_only_and_small_reads() -> None:
    regs = eastron({0x00: 230.0, 0x06: 5.0, 0x34: 7000.5, 0x46: 50.0, 0x48: 99.5})
    r, bus = await read("sdm72", regs)
    assert r.voltage == (None, None, None)
    assert r.current == (None, None, None)
    assert r.power == (None, None, None)
    assert r.frequency is None
    assert r.power_total == 7000.5
    assert r.energy_import_wh == 99_500.0
    # The 10-register limit is a conservative local choice (no source gives it).
    assert METER_MODELS["sdm72"].max_read == 10
    assert all(count <= 10 for _, _, count in bus.requests)
    assert {fc for fc, _, _ in bus.requests} == {4}


def test_eastron_read_limits_are_per_model() -> None:
    assert METER_MODELS["sdm630"].max_read == 40
    assert METER_MODELS["sdm120"].max_read == 40
    assert METER_MODELS["sdm72"].max_read == 10


# -- ABB B23: holding registers, high word first, per-type sentinels -------------


def abb_regs(**over: tuple[str, int]) -> dict[tuple[Table, int], int]:
    base: dict[str, tuple[int, str, int]] = {
        "energy": (0x5000, ">Q", 123_456_789),  # 1 234 567.89 kWh
        "v1": (0x5B00, ">I", 2301),
        "v2": (0x5B02, ">I", 2315),
        "v3": (0x5B04, ">I", 2298),
        "i1": (0x5B0C, ">I", 1050),
        "i2": (0x5B0E, ">I", 1625),
        "i3": (0x5B10, ">I", 5),
        "p": (0x5B14, ">i", -150_000),
        "p1": (0x5B16, ">i", 241_650),
        "p2": (0x5B18, ">i", -391_650),
        "p3": (0x5B1A, ">i", 0),
        "hz": (0x5B2C, ">H", 5002),
    }
    regs: dict[tuple[Table, int], int] = {}
    for key, (address, fmt, raw) in base.items():
        fmt_used, raw_used = over.get(key, (fmt, raw))
        put(regs, HR, address, struct.pack(fmt_used, raw_used))
    return regs


async def test_abb_b23() -> None:
    r, bus = await read("abb-b23", abb_regs())
    assert r.energy_import_wh == pytest.approx(1_234_567_890.0)  # 0.01 kWh -> Wh
    assert r.voltage == pytest.approx((230.1, 231.5, 229.8))  # 0.1 V
    assert r.current == pytest.approx((10.50, 16.25, 0.05))  # 0.01 A
    assert r.power_total == pytest.approx(-1500.00)  # 0.01 W, signed
    assert r.power == pytest.approx((2416.50, -3916.50, 0.0))
    assert r.frequency == pytest.approx(50.02)
    assert {fc for fc, _, _ in bus.requests} == {3}
    # Total and L1..L3 power come in the same request.
    assert any(a <= 0x5B14 and a + n >= 0x5B1C for _, a, n in bus.requests)


async def test_abb_not_available_per_type() -> None:
    regs = abb_regs(
        energy=(">Q", 0xFFFF_FFFF_FFFF_FFFF),
        v2=(">I", 0xFFFF_FFFF),
        i3=(">I", 0xFFFF_FFFF),
        p3=(">i", 0x7FFF_FFFF),
        hz=(">H", 0xFFFF),
    )
    r, _ = await read("abb-b23", regs)
    assert r.energy_import_wh is None
    assert r.voltage == pytest.approx((230.1, None, 229.8))
    assert r.current[2] is None
    assert r.power[2] is None
    assert r.frequency is None


async def test_abb_signed_all_ones_is_a_real_value() -> None:
    # int32 -1 (0xFFFFFFFF) is -0.01 W, not "not available" (that is 0x7FFFFFFF).
    r, _ = await read("abb-b23", abb_regs(p=(">i", -1), p1=(">i", -1)))
    assert r.power_total == pytest.approx(-0.01)
    assert r.power[0] == pytest.approx(-0.01)


async def test_abb_unsigned_0x7fff_is_a_real_value() -> None:
    r, _ = await read("abb-b23", abb_regs(v1=(">I", 0x7FFF_FFFF), hz=(">H", 0x7FFF)))
    assert r.voltage[0] == pytest.approx(0x7FFF_FFFF * 0.1)
    assert r.frequency == pytest.approx(0x7FFF * 0.01)


# -- Carlo Gavazzi EM24: int32 LSW first, FC04, two maps chosen by the model code ---


def em24_regs(
    *, model_code: int, hz_at: int, import_at: int, import_kwh_x10: int = 123_456
) -> dict[tuple[Table, int], int]:
    regs: dict[tuple[Table, int], int] = {}

    def s32(address: int, raw: int) -> None:
        put(regs, IR, address, struct.pack(">i", raw), low_word_first=True)

    for i, raw in enumerate((2301, 2315, 2298)):
        s32(0x0000 + 2 * i, raw)  # 0.1 V
    for i, raw in enumerate((70_500, 16_250, 50)):
        s32(0x000C + 2 * i, raw)  # 0.001 A; 70.5 A needs the high word
    for i, raw in enumerate((162_345, -39_165, 0)):
        s32(0x0012 + 2 * i, raw)  # 0.1 W
    s32(0x0028, 123_180)  # 0.1 W total
    put(regs, IR, hz_at, struct.pack(">h", 500))  # 0.1 Hz
    s32(import_at, import_kwh_x10)  # 0.1 kWh
    put(regs, IR, 0x000B, struct.pack(">H", model_code))
    return regs


async def test_em24_din_map() -> None:
    regs = em24_regs(model_code=46, hz_at=0x0037, import_at=0x0042)
    r, bus = await read("em24", regs)
    assert r.voltage == pytest.approx((230.1, 231.5, 229.8))
    assert r.current == pytest.approx((70.5, 16.25, 0.05))
    assert r.power == pytest.approx((16234.5, -3916.5, 0.0))
    assert r.power_total == pytest.approx(12318.0)
    assert r.frequency == pytest.approx(50.0)
    assert r.energy_import_wh == pytest.approx(12_345_600.0)  # 12 345.6 kWh
    assert {fc for fc, _, _ in bus.requests} == {4}
    assert all(count <= 11 for _, _, count in bus.requests)
    assert (4, 0x000B, 1) in bus.requests


async def test_em24_word_order_is_low_word_first() -> None:
    regs = em24_regs(model_code=45, hz_at=0x0037, import_at=0x0042)
    # 0x0001_E240 = 123 456: low word 0xE240 at the lower address.
    regs[(IR, 0x0042)], regs[(IR, 0x0043)] = 0xE240, 0x0001
    r, _ = await read("em24", regs)
    assert r.energy_import_wh == pytest.approx(12_345_600.0)
    # Negative power: -39 165 = 0xFFFF_6703, low word first.
    assert (regs[(IR, 0x0014)], regs[(IR, 0x0015)]) == (0x6703, 0xFFFF)


async def test_em24_e1_map() -> None:
    regs = em24_regs(model_code=1650, hz_at=0x0033, import_at=0x0034)
    r, bus = await read("em24-e1", regs)
    assert r.frequency == pytest.approx(50.0)
    assert r.energy_import_wh == pytest.approx(12_345_600.0)
    assert r.voltage == pytest.approx((230.1, 231.5, 229.8))
    assert all(count <= 11 for _, _, count in bus.requests)
    assert {fc for fc, _, _ in bus.requests} == {4}


async def test_em24_e1_import_is_0x0034_not_0x0042() -> None:
    # Regression: on an E1, 0x0042 is the L2 import energy, not the total.
    regs = em24_regs(model_code=1648, hz_at=0x0033, import_at=0x0034, import_kwh_x10=500_000)
    put(regs, IR, 0x0042, struct.pack(">i", 111_111), low_word_first=True)
    r, _ = await read("em24-e1", regs)
    assert r.energy_import_wh == pytest.approx(50_000_000.0)


async def test_em24_table_refuses_an_e1_and_names_it() -> None:
    regs = em24_regs(model_code=1650, hz_at=0x0033, import_at=0x0034)
    with pytest.raises(DeviceDataError, match="em24-e1") as info:
        await read("em24", regs)
    assert "1650" in str(info.value)
    assert "fake:0" in str(info.value)


async def test_em24_e1_table_refuses_a_din_meter() -> None:
    regs = em24_regs(model_code=47, hz_at=0x0037, import_at=0x0042)
    with pytest.raises(DeviceDataError, match=r"this looks like a em24$"):
        await read("em24-e1", regs)


@pytest.mark.parametrize("model", ["em24", "em24-e1"])
async def test_em24_unknown_model_code_refuses_readings(model: str) -> None:
    regs = em24_regs(model_code=1234, hz_at=0x0037, import_at=0x0042)
    bus = FakeMaster(regs)
    meter = Meter(cast(ModbusMaster, bus), 1, METER_MODELS[model])
    with pytest.raises(DeviceDataError, match="1234"):
        await meter.read()
    # Only the model register was read: no measurement was taken.
    assert bus.requests == [(4, 0x000B, 1)]


async def test_em24_model_code_is_checked_once() -> None:
    regs = em24_regs(model_code=48, hz_at=0x0037, import_at=0x0042)
    bus = FakeMaster(regs)
    meter = Meter(cast(ModbusMaster, bus), 1, METER_MODELS["em24"])
    await meter.read()
    await meter.read()
    assert bus.requests.count((4, 0x000B, 1)) == 1


@pytest.mark.parametrize(
    ("model", "codes"), [("em24", range(45, 49)), ("em24-e1", range(1648, 1654))]
)
def test_em24_identity_codes(model: str, codes: range) -> None:
    m = METER_MODELS[model]
    assert m.identity is not None
    assert (m.identity.address, m.identity.table) == (0x000B, IR)
    assert m.identity_codes == frozenset(codes)
    assert m.max_read == 11


def test_models_without_identity() -> None:
    for kind in ("sdm630", "sdm120", "sdm72", "abb-b23"):
        assert METER_MODELS[kind].identity is None


def test_every_model_is_tested_here() -> None:
    assert set(METER_MODELS) == {"sdm630", "sdm120", "sdm72", "abb-b23", "em24", "em24-e1"}
