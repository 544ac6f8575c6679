"""The socket's lock: the EV Charge Control Basic's table and driver, the
simulator's lock actuator and its failures, the connector's lock states, and
the station on the virtual-clock rig (lock before current, no current on a
lock that does not engage, unlock at the end and on UnlockConnector).

Register values are the device's raw values (Phoenix manual 106377_en_04
table 9-2, docs/device-maps.md 6b), packed here, not with ``Field.encode``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from evse.connector import (
    LOCK_NOT_ENGAGED,
    LOCK_NOT_RELEASED,
    Authorized,
    BeginTransaction,
    CancelTimer,
    Connector,
    EndTransaction,
    ErrorCode,
    Fault,
    FaultRaised,
    LimitChanged,
    Lock,
    LockChecked,
    MeterSample,
    PilotChanged,
    ResetFaults,
    SetCurrent,
    SetLock,
    State,
    Status,
    StatusChanged,
    StopReason,
    StopRequested,
    UnlockRequested,
)
from evse.station import StationSettings
from fieldbus.boards import (
    BASIC_ERROR_BIT_BASE,
    BOARD_MODELS,
    Board,
    LockError,
    _basic_bit,
)
from fieldbus.errors import DeviceDataError, Unsupported
from fieldbus.master import ModbusMaster
from fieldbus.registers import Table
from fieldbus.signals import BoardFault, PilotState
from ops.httpjson import request_json
from ops.run import plan_from_config, sim_config
from ops.sim.app import DeviceSpec, Endpoints, SimConfig, Simulator
from ops.sim.model import LOCK_TIME
from ops.sim.model import Station as SimStation
from tests.test_board_decode import board, status
from tests.vclock_rig import TAG, VRig, vclock_rig

IR, HR, CO = Table.INPUT, Table.HOLDING, Table.COIL
BASIC = "ev-cc-basic"
A, B, C, D, E, F = (PilotState(s) for s in "ABCDEF")


# Read through functions: mypy would otherwise narrow an attribute across the
# events that change it.
def state_of(c: Connector) -> State:
    return c.state


def lock_of(c: Connector) -> Lock:
    return c.snapshot.lock


def actuator(s: SimStation) -> tuple[bool, bool, bool]:
    """The simulated lock: (locked, locking error, unlocking error)."""
    return (s.board.locked, s.board.locking_error, s.board.unlocking_error)


def word(text: str) -> int:
    """IR 24000: two ASCII characters, the letter in the high byte."""
    padded = text + "\0"
    return ord(padded[0]) << 8 | ord(padded[1])


def errors(*printed: int) -> int:
    """IR 24025 with the bits the manual prints (BASIC_ERROR_BIT_BASE)."""
    value = 0
    for n in printed:
        value |= 1 << (n - BASIC_ERROR_BIT_BASE)
    return value


def basic(
    code: str = "A1", *, pp: int = 0, err: int = 0, lock: int | None = None
) -> dict[tuple[Table, int], int]:
    regs = {(IR, 24000): word(code), (IR, 24001): pp, (IR, 24025): err}
    if lock is not None:
        regs[(CO, 20002)] = lock
    return regs


# -- the table and the driver ---------------------------------------------------------


def test_the_basic_table() -> None:
    model = BOARD_MODELS[BASIC]
    caps = model.capabilities
    assert caps.lock is True
    assert caps.stop_by_disable is True  # HR 22000 is 6..63 A: off is coil 20000 off too
    assert caps.relay_drive is True and caps.contactor_feedback is False  # 24005 b3 CON
    assert caps.failsafe is False
    assert (caps.min_current, caps.max_current, caps.current_step) == (6.0, 63.0, 1.0)
    plan = model.poll_plan()
    # Every poll: status .. outputs in one request, the error word (faults and the
    # lock's errors) in another; the command and the coils are read-backs.
    assert [(b.table, b.address, b.count) for b in plan.every_poll] == [
        (IR, 24000, 6),
        (IR, 24025, 1),
    ]
    assert {(b.table, b.address, b.count) for b in plan.readbacks} == {
        (HR, 22000, 1),
        (CO, 20000, 3),
    }


def test_only_the_basic_declares_a_lock() -> None:
    # The EV-CC ETH locks by itself (its DIP switches / inputs); the EVSE DIN
    # and the Heidelberg have no lock actuator the station could drive.
    assert {k for k, m in BOARD_MODELS.items() if m.capabilities.lock} == {BASIC}
    assert {k for k, m in BOARD_MODELS.items() if m.lock is not None} == {BASIC}


@pytest.mark.parametrize(
    ("code", "pilot", "faults"),
    [
        ("A1", A, set()),
        ("B1", B, set()),
        ("B2", B, set()),
        ("C2", C, set()),
        ("D2", D, set()),
        ("E0", E, {BoardFault.PILOT}),
        ("F0", F, {BoardFault.PILOT}),
        ("F", F, {BoardFault.PILOT}),  # "E(0), F(0)": the digit may be missing
    ],
)
async def test_status_letter_is_the_high_byte(
    code: str, pilot: PilotState, faults: set[BoardFault]
) -> None:
    s = await status(BASIC, basic(code))
    assert s.pilot is pilot
    assert s.faults == faults


async def test_a_letter_in_the_low_byte_is_not_this_board() -> None:
    # The EV-CC ETH puts its letter in the low byte: 0x0042 is no state here.
    with pytest.raises(DeviceDataError, match="unknown pilot state"):
        await status(BASIC, {(IR, 24000): ord("B")})


@pytest.mark.parametrize(
    ("printed", "fault"),
    [
        (3, BoardFault.DEVICE),  # invalid PP
        (4, BoardFault.PILOT),  # invalid CP
        (5, BoardFault.PILOT),  # status F: station not available
        (11, BoardFault.VENTILATION),  # status D, vehicle rejected
        (12, BoardFault.DEVICE),  # charging contactor error
        (13, BoardFault.DIODE),  # no diode
        (15, BoardFault.RCD_TRIP),  # EV-RCM residual current
    ],
)
async def test_error_bits_that_are_faults(printed: int, fault: BoardFault) -> None:
    s = await status(BASIC, basic("C2", err=errors(printed)))
    assert s.faults == {fault}
    assert s.lock_errors == frozenset()


async def test_a_rejected_13_a_cable_is_not_a_station_fault() -> None:
    # Bit 2: the board refuses the cable itself (no PWM offer).
    s = await status(BASIC, basic("B1", err=errors(2)))
    assert s.faults == set()


@pytest.mark.parametrize(
    ("printed", "error"),
    [(6, LockError.LOCKING), (7, LockError.UNLOCKING), (8, LockError.NO_DETECTION)],
)
async def test_lock_error_bits(printed: int, error: LockError) -> None:
    s = await status(BASIC, basic("B1", err=errors(printed), lock=1))
    assert s.lock_errors == {error}
    assert s.lock_error == error.value
    # The lock's errors are not board faults: the station judges them itself.
    assert s.faults == set()
    data = s.to_json()
    assert data["lock_errors"] == [error.value]
    assert data["lock_commanded"] is True


def test_the_bit_numbering_is_one_constant() -> None:
    # 0-based, as IR 24004/24005 in the same table ("Bit 0 - bit 4").
    assert BASIC_ERROR_BIT_BASE == 0
    model = BOARD_MODELS[BASIC]
    assert set(model.lock_error_bits) == {_basic_bit(6), _basic_bit(7), _basic_bit(8)}
    assert _basic_bit(15) in model.fault_bits
    # "Bit 16 = EV-RCM selftest error" does not exist 0-based.
    assert all(0 <= bit < 16 for bit in model.fault_bits)


async def test_no_lock_errors_and_no_command_on_other_boards() -> None:
    s = await status("ev-cc", {(IR, 100): ord("B"), (IR, 101): 32})
    assert s.lock_errors == frozenset()
    assert s.lock_commanded is None
    assert s.lock_error is None


async def test_set_lock_writes_coil_20002_as_an_ordinary_write() -> None:
    b, bus = board(BASIC, basic("B1"))
    await b.set_lock(True)
    await b.set_lock(False)
    assert bus.writes == [(5, 20002, [1]), (5, 20002, [0])]
    assert bus.urgent == [False, False]
    assert (await b.read_status()).lock_commanded is False


@pytest.mark.parametrize("kind", ["evse-din", "heidelberg", "ev-cc"])
async def test_set_lock_is_unsupported_elsewhere(kind: str) -> None:
    b, bus = board(kind)
    with pytest.raises(Unsupported):
        await b.set_lock(True)
    assert bus.writes == []


async def test_initialize_hands_enable_and_lock_to_the_coils() -> None:
    b, bus = board(BASIC, basic())
    await b.initialize()
    # HR 4000 = 3: enable by coil 20000; HR 4002 = 3: lock by coil 20002 (FC06).
    assert bus.writes == [(6, 4000, [3]), (6, 4002, [3])]


async def test_off_is_current_0_then_the_enable_coil() -> None:
    b, bus = board(BASIC, basic("C2"))
    await b.set_current(0)
    await b.set_enabled(False)
    assert bus.writes == [(6, 22000, [0]), (5, 20000, [0])]
    assert bus.urgent == [True, True]


# -- the simulator --------------------------------------------------------------------


def sim_station(*, by_coil: bool = True) -> SimStation:
    s = SimStation()
    s.board.lock_by_coil = by_coil
    return s


def test_sim_lock_takes_its_time_to_engage() -> None:
    s = sim_station()
    s.advance(10.0)
    s.command_lock(True)
    s.advance(10.0 + LOCK_TIME / 2)
    assert actuator(s) == (False, False, False)
    s.advance(10.0 + LOCK_TIME + 0.01)
    assert actuator(s) == (True, False, False)
    s.command_lock(False)
    s.advance(10.0 + 2 * LOCK_TIME + 0.02)
    assert actuator(s) == (False, False, False)


def test_sim_lock_fail_sets_the_locking_error_and_stays_unlocked() -> None:
    s = sim_station()
    s.faults.lock_fail = True
    s.advance(1.0)
    s.command_lock(True)
    s.advance(1.0 + LOCK_TIME + 0.01)
    assert actuator(s) == (False, True, False)
    # Released again: the error goes with the command.
    s.command_lock(False)
    assert actuator(s) == (False, False, False)
    # The fault gone, a new lock engages.
    s.faults.lock_fail = False
    s.command_lock(True)
    s.advance(1.0 + 2 * LOCK_TIME + 0.02)
    assert actuator(s) == (True, False, False)


def test_sim_unlock_fail_sets_the_unlocking_error_and_stays_locked() -> None:
    s = sim_station()
    s.advance(1.0)
    s.command_lock(True)
    s.advance(1.0 + LOCK_TIME + 0.01)
    s.faults.unlock_fail = True
    s.command_lock(False)
    s.advance(1.0 + 2 * LOCK_TIME + 0.02)
    assert actuator(s) == (True, False, True)
    # A stuck lock that frees itself once the fault goes: the error goes too.
    s.faults.unlock_fail = False
    s.advance(1.0 + 3 * LOCK_TIME + 0.03)
    assert actuator(s) == (False, False, False)


def test_sim_lock_follows_the_plug_until_the_board_takes_the_coil() -> None:
    # HR 4002 = 0 (S1/DIP 3 OFF): the board locks in B and unlocks in A by itself.
    s = sim_station(by_coil=False)
    s.ev.plugged = True
    s.advance(1.0)
    s.advance(1.0 + LOCK_TIME + 0.01)
    assert actuator(s)[0] is True
    s.command_lock(False)  # the coil has no effect in this mode
    s.advance(1.0 + 2 * LOCK_TIME + 0.02)
    assert actuator(s)[0] is True
    s.ev.plugged = False
    s.advance(2.0)
    s.advance(2.0 + LOCK_TIME + 0.01)
    assert actuator(s)[0] is False


async def test_sim_serves_the_basic_with_its_lock_over_rtu_on_a_pty() -> None:
    async with trio.open_nursery() as nursery:
        sim = Simulator(SimConfig(devices=[DeviceSpec(BASIC, 1)], tcp_port=None))
        endpoints: Endpoints = await nursery.start(sim.run)
        assert endpoints.rtu is not None and endpoints.control is not None
        control = urlsplit(endpoints.control)
        assert control.hostname is not None and control.port is not None

        async def fault(name: str, active: bool) -> None:
            method = "POST" if active else "DELETE"
            await request_json(control.hostname or "", control.port or 0, method, f"/faults/{name}")

        async with ModbusMaster.for_port(endpoints.rtu, timeout=0.5) as master:
            b = Board(master, 1, BOARD_MODELS[BASIC])
            await b.initialize()
            sim.set_ev({"plugged": True})
            status = await b.read_status()
            assert status.pilot is B and status.cable_limit_a == 32.0
            await b.set_lock(True)
            await trio.sleep(LOCK_TIME + 0.05)
            status = await b.read_status()
            assert status.lock_commanded is True and status.lock_errors == frozenset()
            assert actuator(sim.station)[0] is True
            await fault("unlock_fail", True)  # the control interface's fault
            await b.set_lock(False)
            await trio.sleep(LOCK_TIME + 0.05)
            status = await b.read_status()
            assert status.lock_errors == {LockError.UNLOCKING}
            await fault("unlock_fail", False)
            await trio.sleep(0.05)
            status = await b.read_status()
            assert status.lock_errors == frozenset()
            assert actuator(sim.station)[0] is False
            await fault("lock_fail", True)
            await b.set_lock(True)
            await trio.sleep(LOCK_TIME + 0.05)
            status = await b.read_status()
            assert status.lock_errors == {LockError.LOCKING}
        writes = [e for e in sim.events if e["event"] == "write" and e["address"] == 20002]
        assert [w["fields"]["lock"] for w in writes] == [1.0, 0.0, 1.0]
        faults = [(e["fault"], e["active"]) for e in sim.events if e["event"] == "fault"]
        assert faults == [("unlock_fail", True), ("unlock_fail", False), ("lock_fail", True)]
        state = sim.state()["station"]["board"]
        assert (state["locked"], state["locking_error"]) == (False, True)
        nursery.cancel_scope.cancel()


# -- the connector ----------------------------------------------------------------------


def locking() -> Connector:
    """A connector with a lock: a meter reading, the limit, plugged, authorized."""
    c = Connector(lock=True)
    c.start()
    c.handle(MeterSample(100.0), 0)
    c.handle(LimitChanged(16.0), 0)
    c.handle(PilotChanged(B), 0)
    return c


def test_a_lock_comes_before_the_transaction() -> None:
    c = locking()
    assert lock_of(c) is Lock.UNLOCKING  # the start releases whatever a crash left
    effects = c.handle(Authorized(TAG), 1)
    assert effects == [CancelTimer("connection_timeout"), SetLock(True)]
    assert state_of(c) is State.LOCKING and c.status is Status.PREPARING
    # A verdict on the start's release, arriving late, changes nothing.
    assert c.handle(LockChecked(False, True), 2) == []
    effects = c.handle(LockChecked(True, True), 3)
    assert BeginTransaction(TAG, 100.0) in effects
    assert SetCurrent(16.0) in effects
    assert lock_of(c) is Lock.LOCKED
    # The end: off, the record, then the release.
    effects = c.handle(StopRequested(StopReason.LOCAL), 4)
    kinds = [type(e) for e in effects if not isinstance(e, StatusChanged)]
    assert kinds == [SetCurrent, EndTransaction, SetLock]
    assert effects[-1] == StatusChanged(Status.FINISHING, ErrorCode.NO_ERROR)
    assert SetLock(False) in effects and lock_of(c) is Lock.UNLOCKING


def test_connector_a_lock_that_does_not_engage_is_faulted_until_unplugged() -> None:
    c = locking()
    c.handle(Authorized(TAG), 1)
    effects = c.handle(LockChecked(True, False, "locking_error"), 3)
    assert not any(isinstance(e, BeginTransaction) for e in effects)
    assert not any(isinstance(e, SetCurrent) and e.amps > 0 for e in effects)
    assert SetLock(False) in effects
    assert state_of(c) is State.FAULTED
    assert c.error_code is ErrorCode.CONNECTOR_LOCK_FAILURE
    assert c.snapshot.faults == {Fault.CONNECTOR_LOCK: LOCK_NOT_ENGAGED}
    c.handle(LockChecked(False, True), 4)  # released again
    assert state_of(c) is State.FAULTED  # still plugged in
    c.handle(PilotChanged(A), 5)
    assert state_of(c) is State.IDLE and c.snapshot.faults == {}


def test_connector_a_lock_that_does_not_release_is_faulted_until_it_does() -> None:
    c = locking()
    c.handle(Authorized(TAG), 1)
    c.handle(LockChecked(True, True), 2)
    c.handle(StopRequested(StopReason.LOCAL), 3)
    c.handle(LockChecked(False, False, "unlocking_error"), 4)
    assert state_of(c) is State.FAULTED and lock_of(c) is Lock.STUCK
    assert c.snapshot.faults == {Fault.CONNECTOR_LOCK: LOCK_NOT_RELEASED}
    c.handle(PilotChanged(A), 5)  # the EV leaves; the plug stays locked in the socket
    assert state_of(c) is State.FAULTED
    assert c.handle(UnlockRequested(), 6)[0] == SetLock(False)
    c.handle(LockChecked(False, True), 7)
    assert state_of(c) is State.IDLE and lock_of(c) is Lock.UNLOCKED


def test_a_lost_lock_ends_the_transaction() -> None:
    c = locking()
    c.handle(Authorized(TAG), 1)
    c.handle(LockChecked(True, True), 2)
    effects = c.handle(LockChecked(True, False, "the board no longer holds the lock"), 3)
    assert effects[0] == SetCurrent(0.0)
    assert EndTransaction(StopReason.OTHER, 100.0) in effects
    assert c.error_code is ErrorCode.CONNECTOR_LOCK_FAILURE


def test_unplugged_while_locking_waits_for_the_ev_again() -> None:
    c = locking()
    c.handle(Authorized(TAG), 1)
    effects = c.handle(PilotChanged(A), 2)
    assert SetLock(False) in effects
    assert state_of(c) is State.AUTHORIZED
    effects = c.handle(PilotChanged(B), 3)
    assert SetLock(True) in effects and state_of(c) is State.LOCKING


def test_connector_a_welded_contactor_keeps_the_socket_locked() -> None:
    c = locking()
    c.handle(Authorized(TAG), 1)
    c.handle(LockChecked(True, True), 2)
    effects = c.handle(FaultRaised(Fault.WELDED, "current after off"), 3)
    assert SetLock(False) not in effects
    assert c.handle(UnlockRequested(), 4) == []
    assert lock_of(c) is Lock.LOCKED
    effects = c.handle(ResetFaults(), 5)
    assert SetLock(False) in effects


def test_a_connector_without_a_lock_commands_none() -> None:
    c = Connector()
    effects = c.start()
    c.handle(MeterSample(1.0), 0)
    c.handle(LimitChanged(16.0), 0)
    c.handle(PilotChanged(B), 0)
    effects += c.handle(Authorized(TAG), 1)
    effects += c.handle(StopRequested(StopReason.LOCAL), 2)
    effects += c.handle(UnlockRequested(), 3)
    assert not any(isinstance(e, SetLock) for e in effects)
    assert c.handle(LockChecked(True, False), 4) == []


# -- the station on the virtual clock ------------------------------------------------


def lock_writes(rig: VRig, after_seq: int = 0) -> list[dict[str, Any]]:
    return [w for w in rig.board_writes(after_seq) if "lock" in w["fields"]]


def first_on(rig: VRig, after_seq: int = 0) -> dict[str, Any] | None:
    return next((w for w in rig.writes() if w["seq"] > after_seq and w["fields"]["command"]), None)


async def plug_and_present(rig: VRig) -> dict[str, Any]:
    marker = rig.mark("plug")
    rig.plug()
    await rig.status("Preparing")
    result = await rig.station.present_id_tag(TAG)
    assert result.accepted
    return marker


@pytest.mark.parametrize("transport", ["rtu", "tcp"])
async def test_lock_is_confirmed_before_the_current(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport=transport) as rig:
        marker = await plug_and_present(rig)
        charging = await rig.status("Charging")
        (lock,) = lock_writes(rig, marker["seq"])
        on = first_on(rig, marker["seq"])
        assert lock["fields"]["lock"] == 1.0 and on is not None
        assert actuator(rig.sim.station)[0] is True
        # The current only after the verdict: lock_timeout after the lock's write.
        assert on["t"] >= lock["t"] + rig.settings.lock_timeout
        started = [r.t for r in rig.central.reports if r.kind == "started"]
        assert started and started[0] >= lock["t"] + rig.settings.lock_timeout
        # Preparing until then (LOCKING), no SuspendedEVSE/EV with 0 A offered.
        between = [s for t, s, _ in rig.statuses if marker["t"] < t < lock["t"] + 2.0]
        assert set(between) == {Status.PREPARING}
        assert charging > on["t"]
        assert rig.station.view()["lock"] == "locked"


async def test_no_current_when_the_lock_does_not_engage(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        rig.fault("lock_fail")
        marker = await plug_and_present(rig)
        faulted = await rig.status("Faulted")
        assert rig.station.connector.error_code is ErrorCode.CONNECTOR_LOCK_FAILURE
        assert first_on(rig, marker["seq"]) is None
        assert not [r for r in rig.central.reports if r.kind == "started"]
        assert rig.db_rows("SELECT count(*) FROM transactions") == [(0,)]
        # The lock is released again, so the cable can come out.
        await rig.until(lambda: [w["fields"]["lock"] for w in lock_writes(rig)][-2:] == [1.0, 0.0])
        (lock, _release) = lock_writes(rig, marker["seq"])
        assert faulted >= lock["t"] + rig.settings.lock_timeout
        # Faulted until the EV is unplugged; then a new plug-in charges.
        await trio.sleep(5.0)
        assert rig.station.connector.status is Status.FAULTED
        rig.unplug()
        await rig.status("Available")
        rig.clear("lock_fail")
        await rig.charge()


async def test_unlock_after_the_end_once_off_is_acknowledged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        await rig.charge()
        marker = rig.mark("stop")
        assert await rig.station.request_stop(StopReason.LOCAL)
        await rig.until(lambda: lock_writes(rig, marker["seq"]), what="the release")
        (release,) = lock_writes(rig, marker["seq"])
        assert release["fields"]["lock"] == 0.0
        off = rig.off_writes(marker["seq"])[0]
        enable_off = next(
            w for w in rig.board_writes(marker["seq"]) if w["fields"].get("enable") == 0.0
        )
        # After the whole off (current 0, then the enable coil) was acknowledged,
        # and after a meter reading that shows no current.
        assert release["t"] > rig.ack_time(enable_off) > rig.ack_time(off)
        quiet = [
            r
            for r in rig.meter_readings
            if rig.ack_time(enable_off) < r.read_at < release["t"]
            and max(c or 0.0 for c in r.current) == 0.0
        ]
        assert quiet
        await rig.until(lambda: rig.station.connector.snapshot.lock is Lock.UNLOCKED)
        assert actuator(rig.sim.station)[0] is False
        assert rig.station.connector.status is Status.FINISHING


async def test_a_lock_that_does_not_release_is_faulted_until_it_does(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        await rig.charge()
        rig.fault("unlock_fail")
        assert await rig.station.request_stop(StopReason.LOCAL)
        await rig.status("Faulted")
        assert rig.station.connector.error_code is ErrorCode.CONNECTOR_LOCK_FAILURE
        assert rig.station.connector.snapshot.faults == {Fault.CONNECTOR_LOCK: LOCK_NOT_RELEASED}
        rig.unplug()  # the EV goes; its cable stays locked in the socket
        await trio.sleep(2.0)
        assert rig.station.connector.status is Status.FAULTED
        rig.clear("unlock_fail")  # the lock frees itself
        await rig.status("Available")
        assert actuator(rig.sim.station)[0] is False


async def test_unlock_connector_stops_the_transaction_then_unlocks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        await rig.charge()
        marker = rig.mark("UnlockConnector")
        assert await rig.station.unlock_connector() == "Unlocked"
        ended = [r.detail[1] for r in rig.central.reports if r.kind == "ended"]
        assert ended == [StopReason.UNLOCK_COMMAND.value]
        (release,) = lock_writes(rig, marker["seq"])
        assert release["t"] > rig.ack_time(rig.off_writes(marker["seq"])[0])
        assert actuator(rig.sim.station)[0] is False
        # Again, with nothing running: the release is written and checked anew.
        assert await rig.station.unlock_connector() == "Unlocked"
        assert len(lock_writes(rig, marker["seq"])) == 2


async def test_unlock_connector_answers_unlock_failed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        await rig.charge()
        rig.fault("unlock_fail")
        assert await rig.station.unlock_connector() == "UnlockFailed"
        await rig.status("Faulted")
        assert actuator(rig.sim.station)[0] is True
        rig.clear("unlock_fail")
        await rig.status("Finishing")
        assert await rig.station.unlock_connector() == "Unlocked"


async def test_a_welded_contactor_keeps_the_socket_locked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        await rig.charge()
        marker = rig.mark("weld")
        rig.fault("welded")  # the EV keeps drawing after the off
        assert await rig.station.request_stop(StopReason.LOCAL)
        await rig.until(lambda: Fault.WELDED in rig.station.connector.snapshot.faults)
        assert await rig.station.unlock_connector() == "UnlockFailed"
        await trio.sleep(10.0)
        assert lock_writes(rig, marker["seq"]) == []
        assert actuator(rig.sim.station)[0] is True


async def test_a_lock_the_board_forgets_trips_the_charge(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A controller restart resets its volatile coils: coil 20002 reads 0 and the
    board releases the lock. The read-back shows it: off at once, Faulted."""
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu") as rig:
        await rig.charge()
        marker = rig.mark("board restarted")
        device = rig.sim.devices[1]
        device.store.put(CO, 20002, [0])
        rig.sim.station.command_lock(False)
        off = await rig.next_off(marker["seq"])
        await rig.status("Faulted")
        assert rig.station.connector.error_code is ErrorCode.CONNECTOR_LOCK_FAILURE

        def ended() -> list[str]:
            return [r.detail[1] for r in rig.central.reports if r.kind == "ended"]

        await rig.until(ended, what="the transaction's end")
        assert ended() == [StopReason.OTHER.value]
        # Seen at the next read-back of the coils (every READBACK_EVERY-th poll).
        assert off["t"] - marker["t"] <= 1.2


@pytest.mark.parametrize("kind", ["evse-din", "heidelberg", "ev-cc"])
async def test_unlock_connector_is_not_supported_without_a_lock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with vclock_rig(tmp_path, board=kind, transport="tcp") as rig:
        await rig.charge()
        assert rig.station.lock_in_use is False
        assert await rig.station.unlock_connector() == "NotSupported"
        # Nothing stopped.
        await trio.sleep(1.0)
        assert rig.station.connector.status is Status.CHARGING
        assert rig.station.view()["lock"] is None


async def test_the_cable_version_never_locks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = StationSettings(connector="cable")
    async with vclock_rig(tmp_path, board=BASIC, transport="rtu", settings=settings) as rig:
        marker = await plug_and_present(rig)
        charging = await rig.status("Charging")
        on = first_on(rig, marker["seq"])
        # No lock to wait for: the current within a second of the tag.
        assert on is not None and on["t"] - marker["t"] < 1.0
        assert await rig.station.unlock_connector() == "NotSupported"
        assert rig.station.connector.status is Status.CHARGING
        assert await rig.station.request_stop(StopReason.LOCAL)
        await rig.status("Finishing")
        assert lock_writes(rig) == []
        assert charging > marker["t"]


def test_the_config_s_connector_reaches_the_station(tmp_path: Path) -> None:
    config = sim_config("tcp://127.0.0.1:502", tmp_path, board=BASIC)
    assert plan_from_config(config).station.connector == "socket"
    cable = replace(config, station=replace(config.station, connector="cable"))
    assert plan_from_config(cable).station.connector == "cable"
