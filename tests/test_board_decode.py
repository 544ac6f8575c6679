"""Board tables + driver: status decoding and the writes each model needs.

Register values are the device's own raw values (docs/device-maps.md), packed
here independently of ``Field.encode``. The bus is a small in-memory fake of
``ModbusMaster``'s request methods; the real master is tested elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import cast

import pytest

from fieldbus.boards import (
    BOARD_MODELS,
    Board,
    BoardCapabilities,
    BoardFault,
    BoardStatus,
    PilotState,
)
from fieldbus.errors import DeviceDataError, Superseded, Unsupported
from fieldbus.master import ModbusMaster, Wanted
from fieldbus.registers import Table

IR, HR, CO = Table.INPUT, Table.HOLDING, Table.COIL
A, B, C, D, E, F = (PilotState(s) for s in "ABCDEF")


class FakeMaster:
    """Serves a dict of registers, records reads (fc, address, count) and writes.

    Writes take the master's ``urgent`` and ``wanted`` keywords: ``urgent`` is
    recorded per write, ``wanted`` asked before the write as the master does.
    """

    where = "fake:0"

    def __init__(self, regs: dict[tuple[Table, int], int] | None = None) -> None:
        self.regs = dict(regs or {})
        self.requests: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, list[int]]] = []
        self.urgent: list[bool] = []
        self.unit_gaps: dict[int, float] = {}

    def _write(
        self, fc: int, address: int, values: list[int], urgent: bool, wanted: Wanted
    ) -> None:
        if wanted is not None and not wanted():
            raise Superseded("request no longer wanted", where=self.where)
        self.writes.append((fc, address, values))
        self.urgent.append(urgent)

    def set_unit_gap(self, unit: int, seconds: float) -> None:
        self.unit_gaps[unit] = seconds

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
        return [bool(v) for v in self._get(CO, address, count)]

    async def read_discrete_inputs(self, unit: int, address: int, count: int) -> list[bool]:
        self.requests.append((2, address, count))
        return [bool(v) for v in self._get(Table.DISCRETE_INPUT, address, count)]

    async def write_register(
        self, unit: int, address: int, value: int, *, urgent: bool = False, wanted: Wanted = None
    ) -> None:
        self._write(6, address, [value], urgent, wanted)
        self.regs[(HR, address)] = value

    async def write_registers(
        self,
        unit: int,
        address: int,
        values: Sequence[int],
        *,
        urgent: bool = False,
        wanted: Wanted = None,
    ) -> None:
        self._write(16, address, list(values), urgent, wanted)
        for i, v in enumerate(values):
            self.regs[(HR, address + i)] = v

    async def write_coil(
        self, unit: int, address: int, value: bool, *, urgent: bool = False, wanted: Wanted = None
    ) -> None:
        self._write(5, address, [int(value)], urgent, wanted)
        self.regs[(CO, address)] = int(value)


def u16(value: int) -> int:
    """One register holding ``value`` as the device's unsigned 16-bit integer."""
    (word,) = struct.unpack(">H", struct.pack(">H", value))
    return int(word)


def board(model: str, regs: dict[tuple[Table, int], int] | None = None) -> tuple[Board, FakeMaster]:
    bus = FakeMaster(regs)
    return Board(cast(ModbusMaster, bus), 1, BOARD_MODELS[model]), bus


async def status(model: str, regs: dict[tuple[Table, int], int]) -> BoardStatus:
    b, _ = board(model, regs)
    return await b.read_status()


def test_every_model_is_tested_here() -> None:
    # ev-cc-basic: its decoding and lock are tested in tests/test_connector_lock.py.
    assert set(BOARD_MODELS) == {"evse-din", "heidelberg", "ev-cc", "ev-cc-basic"}


# -- EVSE DIN ----------------------------------------------------------------------


def din(vehicle: int = 2, status_bits: int = 0, **over: int) -> dict[tuple[Table, int], int]:
    regs = {
        1000: 16,  # configured current, A
        1001: 13,  # current on the PWM output, A
        1002: vehicle,
        1003: 20,  # cable limit, A
        1004: 0,  # commands: b0 "turn off"
        1005: 18,  # firmware
        1006: 2,
        1007: status_bits,
    }
    regs.update({int(k[1:]): v for k, v in over.items()})
    return {(HR, a): u16(v) for a, v in regs.items()}


@pytest.mark.parametrize(
    ("code", "state", "faults"),
    [(1, A, set()), (2, B, set()), (3, C, set()), (4, D, set()), (5, F, {BoardFault.DEVICE})],
)
async def test_din_vehicle_states(code: int, state: PilotState, faults: set[BoardFault]) -> None:
    s = await status("evse-din", din(vehicle=code))
    assert s.pilot is state
    assert s.faults == faults


async def test_din_values() -> None:
    s = await status("evse-din", din(vehicle=3, status_bits=0b1))
    assert s.command_a == 16.0
    assert s.offered_a == 13.0
    assert s.cable_limit_a == 20.0
    assert s.enabled is True
    # 1007 b0 is the relay DRIVE (polarity disputed; ESPHome: set = on), never
    # contactor feedback: the board reads no auxiliary contact.
    assert s.relay_on is True
    assert s.contactor_closed is None


async def test_din_relay_bit_clear_is_drive_off() -> None:
    s = await status("evse-din", din(vehicle=3, status_bits=0b10))
    assert s.relay_on is False
    assert s.contactor_closed is None


def test_din_declares_a_relay_drive_and_no_contactor_feedback() -> None:
    # Issue 7: the drive bit used to be declared as contactor feedback, which
    # switched the safety monitor's current-based welded check off.
    model = BOARD_MODELS["evse-din"]
    assert model.contactor is None
    assert model.relay is not None and model.relay.field.address == 1007
    assert model.capabilities.contactor_feedback is False
    assert model.capabilities.relay_drive is True


async def test_din_status_json_names_the_relay_drive() -> None:
    s = await status("evse-din", din(vehicle=3, status_bits=0b1))
    data = s.to_json()
    assert data["relay_on"] is True
    assert data["contactor_closed"] is None


def test_no_board_model_claims_contactor_feedback() -> None:
    # None of the tables reads an auxiliary contact (docs/device-maps.md,
    # "What each safety decision relies on").
    assert {k for k, m in BOARD_MODELS.items() if m.capabilities.contactor_feedback} == set()


async def test_din_turn_off_bit_means_disabled() -> None:
    s = await status("evse-din", din(r1004=0b1))
    assert s.enabled is False


@pytest.mark.parametrize(
    ("bit", "fault"),
    [
        (1, BoardFault.DIODE),
        (2, BoardFault.VENTILATION),
        (4, BoardFault.RCD_SELFTEST),
        (5, BoardFault.RCD_TRIP),
    ],
)
async def test_din_fault_bits(bit: int, fault: BoardFault) -> None:
    s = await status("evse-din", din(status_bits=1 << bit))
    assert s.faults == {fault}


async def test_din_relay_and_recovery_bits_are_not_faults() -> None:
    # b0 relay on, b3 waiting for pilot release: no fault.
    s = await status("evse-din", din(status_bits=0b1001))
    assert s.faults == frozenset()


async def test_din_all_fault_bits_with_failure_state() -> None:
    s = await status("evse-din", din(vehicle=5, status_bits=0b111111))
    assert s.faults == {
        BoardFault.DIODE,
        BoardFault.VENTILATION,
        BoardFault.RCD_SELFTEST,
        BoardFault.RCD_TRIP,
        BoardFault.DEVICE,
    }
    assert s.relay_on is True
    assert s.contactor_closed is None


async def test_din_reads_with_function_03_only() -> None:
    b, bus = board("evse-din", din())
    await b.read_status()
    assert {fc for fc, _, _ in bus.requests} == {3}
    assert bus.writes == []


@pytest.mark.parametrize(("amps", "raw"), [(16.0, 16), (16.9, 16), (6.0, 6), (80.0, 80), (0, 0)])
async def test_din_set_current_writes_function_16(amps: float, raw: int) -> None:
    b, bus = board("evse-din", din())
    assert await b.set_current(amps) == float(raw)
    assert bus.writes == [(16, 1000, [raw])]


@pytest.mark.parametrize("amps", [5.9, 80.5])
async def test_din_set_current_out_of_range(amps: float) -> None:
    b, bus = board("evse-din", din())
    with pytest.raises(ValueError, match=f"{amps:g} A"):
        await b.set_current(amps)
    assert bus.writes == []


async def test_din_set_enabled_keeps_other_bits() -> None:
    # 1004: b1 (self-test) and b2 (clear RCD error) set; b0 "turn off" clear.
    b, bus = board("evse-din", din(r1004=0b110))
    await b.set_enabled(False)
    assert bus.writes == [(16, 1004, [0b111])]
    await b.set_enabled(True)
    assert bus.writes[-1] == (16, 1004, [0b110])
    assert all(fc == 16 for fc, _, _ in bus.writes)
    assert (3, 1004, 1) in bus.requests  # read before modify


async def test_din_has_no_failsafe() -> None:
    b, bus = board("evse-din", din())
    with pytest.raises(Unsupported):
        await b.arm_failsafe(10.0, 6.0)
    assert bus.writes == []


async def test_din_initialize_writes_nothing() -> None:
    b, bus = board("evse-din", din())
    await b.initialize()
    assert bus.writes == []


# -- Heidelberg Energy Control -------------------------------------------------------


def heid(state: int, command_raw: int = 160) -> dict[tuple[Table, int], int]:
    return {(IR, 5): u16(state), (HR, 261): u16(command_raw)}


@pytest.mark.parametrize(
    ("code", "state", "faults"),
    [
        (2, A, set()),
        (3, A, set()),
        (4, B, set()),
        (5, B, set()),
        (6, C, set()),
        (7, C, set()),
        (8, C, set()),  # derating: still charging
        (9, E, {BoardFault.PILOT}),
        (10, F, {BoardFault.PILOT}),
        (11, F, {BoardFault.DEVICE}),  # ERR: the box reports an error
    ],
)
async def test_heidelberg_states(code: int, state: PilotState, faults: set[BoardFault]) -> None:
    s = await status("heidelberg", heid(code))
    assert s.pilot is state
    assert s.faults == faults


async def test_heidelberg_values() -> None:
    b, bus = board("heidelberg", heid(7, command_raw=103))
    s = await b.read_status()
    assert s.command_a == pytest.approx(10.3)  # 0.1 A
    assert s.cable_limit_a is None
    assert s.offered_a is None
    assert s.contactor_closed is None
    assert s.relay_on is None
    assert s.enabled is None
    assert (4, 5, 1) in bus.requests  # state from input register 5 (FC04)
    assert (3, 261, 1) in bus.requests


@pytest.mark.parametrize(("amps", "raw"), [(10.37, 103), (16.0, 160), (6.0, 60), (0, 0)])
async def test_heidelberg_set_current(amps: float, raw: int) -> None:
    b, bus = board("heidelberg", heid(5))
    assert await b.set_current(amps) == pytest.approx(raw / 10)
    assert bus.writes == [(6, 261, [raw])]


@pytest.mark.parametrize("amps", [5.5, 16.1])
async def test_heidelberg_set_current_out_of_range(amps: float) -> None:
    b, bus = board("heidelberg", heid(5))
    with pytest.raises(ValueError, match=f"{amps:g} A"):
        await b.set_current(amps)
    assert bus.writes == []


async def test_heidelberg_arm_failsafe_writes_current_then_timeout() -> None:
    b, bus = board("heidelberg", heid(5))
    await b.arm_failsafe(watchdog=15.0, current=6.45)
    # 262 failsafe current in 0.1 A (rounded down to the step), then 257 in ms.
    assert bus.writes == [(6, 262, [64]), (6, 257, [15000])]


async def test_heidelberg_arm_failsafe_refuses_bad_values() -> None:
    b, bus = board("heidelberg", heid(5))
    with pytest.raises(ValueError, match="watchdog"):
        await b.arm_failsafe(watchdog=0.0, current=6.0)
    with pytest.raises(ValueError, match="3 A"):
        await b.arm_failsafe(watchdog=10.0, current=3.0)
    assert bus.writes == []


async def test_heidelberg_initialize_disables_standby() -> None:
    b, bus = board("heidelberg", heid(2))
    await b.initialize()
    assert bus.writes == [(6, 258, [4])]


async def test_heidelberg_has_no_enable_switch() -> None:
    b, _ = board("heidelberg", heid(2))
    with pytest.raises(Unsupported):
        await b.set_enabled(True)


# -- Phoenix Contact EV-CC (ETH) -----------------------------------------------------


def evcc(status_word: int, cable: int = 32, enable: int = 1) -> dict[tuple[Table, int], int]:
    return {(IR, 100): status_word, (IR, 101): u16(cable), (HR, 528): u16(16), (CO, 400): enable}


def ascii_low(letter: str, high: int = 0) -> int:
    """A register with ``letter`` as ASCII in its low byte (the device's format)."""
    (word,) = struct.unpack(">H", bytes([high]) + letter.encode("ascii"))
    return int(word)


@pytest.mark.parametrize(
    ("letter", "faults"),
    [
        ("A", set()),
        ("B", set()),
        ("C", set()),
        ("D", set()),
        ("E", {BoardFault.PILOT}),
        ("F", {BoardFault.PILOT}),
    ],
)
async def test_evcc_ascii_status(letter: str, faults: set[BoardFault]) -> None:
    s = await status("ev-cc", evcc(ascii_low(letter)))
    assert s.pilot is PilotState(letter)
    assert s.faults == faults


async def test_evcc_status_is_the_low_byte() -> None:
    # High byte holds another letter: only the low byte counts.
    s = await status("ev-cc", evcc(ascii_low("C", high=ord("A"))))
    assert s.pilot is C


async def test_evcc_values() -> None:
    b, bus = board("ev-cc", evcc(ascii_low("B"), cable=20, enable=1))
    s = await b.read_status()
    assert s.cable_limit_a == 20.0
    assert s.command_a == 16.0
    assert s.enabled is True
    assert s.offered_a is None
    assert s.contactor_closed is None
    assert s.relay_on is None
    assert (1, 400, 1) in bus.requests  # enable coil
    s = await status("ev-cc", evcc(ascii_low("B"), enable=0))
    assert s.enabled is False


async def test_evcc_set_current_in_amps() -> None:
    b, bus = board("ev-cc", evcc(ascii_low("B")))
    assert await b.set_current(16.7) == 16.0
    assert bus.writes == [(6, 528, [16])]


async def test_evcc_set_enabled_writes_coil_400() -> None:
    b, bus = board("ev-cc", evcc(ascii_low("B"), enable=0))
    await b.set_enabled(True)
    await b.set_enabled(False)
    assert bus.writes == [(5, 400, [1]), (5, 400, [0])]


async def test_evcc_has_no_failsafe() -> None:
    b, bus = board("ev-cc", evcc(ascii_low("B")))
    with pytest.raises(Unsupported):
        await b.arm_failsafe(10.0, 6.0)
    assert bus.writes == []


def test_evcc_default_unit_is_a_valid_unit_id() -> None:
    # Devices default to 255, which the unit-id checks refuse (1..247).
    assert BOARD_MODELS["ev-cc"].default_unit == 180


# -- all boards --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "regs"),
    [
        ("evse-din", din(vehicle=0)),
        ("evse-din", din(vehicle=6)),
        ("heidelberg", heid(1)),
        ("heidelberg", heid(12)),
        ("ev-cc", evcc(ascii_low("G"))),
        ("ev-cc", evcc(ascii_low("a"))),
    ],
)
async def test_unknown_pilot_code_is_a_data_error(
    model: str, regs: dict[tuple[Table, int], int]
) -> None:
    with pytest.raises(DeviceDataError, match="unknown pilot state") as info:
        await status(model, regs)
    assert "fake:0" in str(info.value)


@pytest.mark.parametrize(
    ("model", "caps"),
    [
        (
            "evse-din",
            BoardCapabilities(
                failsafe=False,
                contactor_feedback=False,
                relay_drive=True,
                fault_flags=True,
                cable_limit=True,
                offered_current=True,
                enable_switch=True,
                stop_by_disable=False,
                current_step=1.0,
                min_current=6.0,
                max_current=80.0,
            ),
        ),
        (
            "heidelberg",
            BoardCapabilities(
                failsafe=True,
                contactor_feedback=False,
                relay_drive=False,
                fault_flags=True,
                cable_limit=False,
                offered_current=False,
                enable_switch=False,
                stop_by_disable=False,
                current_step=0.1,
                min_current=6.0,
                max_current=16.0,
            ),
        ),
        (
            "ev-cc",
            BoardCapabilities(
                failsafe=False,
                contactor_feedback=False,
                relay_drive=False,
                fault_flags=True,
                cable_limit=True,
                offered_current=False,
                enable_switch=True,
                stop_by_disable=True,
                current_step=1.0,
                min_current=6.0,
                max_current=32.0,
            ),
        ),
    ],
)
def test_capabilities(model: str, caps: BoardCapabilities) -> None:
    assert BOARD_MODELS[model].capabilities == caps


def test_only_heidelberg_has_a_failsafe() -> None:
    assert {k for k, m in BOARD_MODELS.items() if m.capabilities.failsafe} == {"heidelberg"}


def test_write_function_per_model() -> None:
    assert BOARD_MODELS["evse-din"].write_multiple is True
    assert BOARD_MODELS["heidelberg"].write_multiple is False


def test_slow_board_firmware_gets_its_own_request_gap() -> None:
    # openWB waits 100 ms before each EVSE DIN access; other models need none.
    din = FakeMaster()
    Board(din, 3, BOARD_MODELS["evse-din"])  # type: ignore[arg-type]
    assert din.unit_gaps == {3: 0.1}
    heidelberg = FakeMaster()
    Board(heidelberg, 1, BOARD_MODELS["heidelberg"])  # type: ignore[arg-type]
    assert heidelberg.unit_gaps == {}
