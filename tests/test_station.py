"""The charging core end to end: station + simulator over real Modbus + SQLite."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from evse.connector import Fault, StopReason
from evse.rfid import RfidConfig
from evse.supervisor import Service, Supervisor
from tests.ptypair import PtyPair
from tests.station_harness import FAST, TAG, Rig, station_rig


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_full_session_tc_003_plug_in_first(tmp_path: Path, transport: str) -> None:
    async with station_rig(tmp_path, transport=transport) as rig:
        seen_running_at_first_command: list[bool] = []

        def spy(event: dict[str, object]) -> None:
            fields = event.get("fields")
            if isinstance(fields, dict) and fields.get("command", 0) > 0:
                rows = rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL")
                seen_running_at_first_command.append(bool(rows))

        original = rig.sim.record

        def record(event: dict[str, object]) -> None:
            original(event)
            spy(event)

        rig.sim.record = record  # type: ignore[method-assign]
        for device in rig.sim.devices.values():
            if hasattr(device, "record"):
                device.record = record
        await rig.charge()
        # On disk, in a file another process can read, before the contactor could close.
        assert seen_running_at_first_command[:1] == [True]
        assert rig.commands()[-1] == 16.0
        await trio.sleep(0.5)
        await rig.station.present_id_tag(TAG)  # same card again: Local stop
        await rig.status("Finishing")
        assert rig.commands()[-1] == 0.0
        rig.sim.set_ev({"plugged": False})
        await rig.status("Available")
        ((reason, start, stop),) = rig.db_rows(
            "SELECT stop_reason, meter_start_wh, meter_stop_wh FROM transactions"
        )
        assert reason == "Local"
        assert stop > start


async def test_authorize_first_then_connection_timeout(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        result = await rig.station.present_id_tag(TAG)
        assert result.accepted
        await rig.status("Preparing")
        await rig.status("Available", within=3.0)  # ConnectionTimeOut 2 s
        assert rig.db_rows("SELECT count(*) FROM transactions") == [(0,)]
        assert all(c == 0 for c in rig.commands())


async def test_unknown_and_blocked_tags_do_not_charge(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        rig.sim.set_ev({"plugged": True})
        await rig.status("Preparing")
        for tag in ("DEADBEEF", "BLOCKED1"):
            result = await rig.station.present_id_tag(tag)
            assert not result.accepted
        await trio.sleep(0.2)
        assert rig.station.connector.status.value == "Preparing"
        assert all(c == 0 for c in rig.commands())


async def test_free_charging_starts_on_plug_in(tmp_path: Path) -> None:
    async with station_rig(tmp_path, free=True) as rig:
        rig.sim.set_ev({"plugged": True})
        await rig.status("Charging")
        assert rig.db_rows("SELECT id_tag FROM transactions") == [("FREECHARGING",)]


async def test_ev_unplugged_stops_with_ev_disconnected(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        rig.sim.set_ev({"plugged": False})
        await rig.status("Available")
        await rig.until(
            lambda: rig.db_rows("SELECT stop_reason FROM transactions") == [("EVDisconnected",)],
            what="EVDisconnected on disk",
        )
        assert rig.commands()[-1] == 0.0


async def test_ev_pauses_suspended_ev_and_resumes(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        rig.sim.set_ev({"wants": "B"})
        await rig.status("SuspendedEV")
        rig.sim.set_ev({"wants": "C"})
        await rig.status("Charging")


async def test_transaction_meter_readings_are_persisted(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        await trio.sleep(1.0)
        ((start, last),) = rig.db_rows("SELECT meter_start_wh, last_meter_wh FROM transactions")
        assert last > start


# -- safety: every fault ends with the off-command at the board --------------------


def off_after(rig_commands: list[float], count_before: int) -> bool:
    return 0.0 in rig_commands[count_before:]


@pytest.mark.parametrize(
    ("fault", "params", "code"),
    [
        ("rcd_trip", None, "GroundFailure"),
        ("pilot_error", {"state": "E"}, "EVCommunicationError"),
        ("pilot_error", {"state": "F"}, "EVCommunicationError"),
        ("overdraw", {"amps": 5}, "OverCurrentFailure"),
        ("meter_silent", None, "PowerMeterFailure"),
    ],
)
async def test_fault_switches_off_in_time(
    tmp_path: Path, fault: str, params: dict[str, object] | None, code: str
) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        before = len(rig.commands())
        injected = trio.current_time()
        rig.sim.set_fault(fault, True, params)
        await rig.status("Faulted", within=3.0)
        assert rig.station.connector.error_code.value == code, rig.station.view()["faults"]
        await rig.until(lambda: off_after(rig.commands(), before), what="off write")
        off = [w for w in rig.writes()[before:] if w["fields"]["command"] == 0.0]
        # Detection (a board poll; the meter timeout; a meter poll plus the
        # over-current duration) + the safety tick + EVSE DIN's 100 ms gap, with
        # slack for a loaded test machine: this checks the path, the bench
        # measures the latency (bench/fault_latency.py).
        s = FAST.safety
        allowed = {
            "meter_silent": s.meter_timeout + 1.0,
            "overdraw": FAST.meter_poll + s.overcurrent_time + 1.0,
        }.get(fault, 1.0)
        assert off[0]["t"] - injected <= allowed
        await rig.until(
            lambda: rig.db_rows("SELECT stop_reason FROM transactions") == [("Other",)],
            what="Other on disk",
        )
        rig.sim.clear_faults()
        if fault != "overdraw":
            await rig.status("Finishing", within=3.0)


async def test_silent_board_is_a_fault_and_off_is_insisted_on(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        before = len(rig.commands())
        rig.sim.set_fault("board_silent", True)
        await rig.status("Faulted", within=3.0)
        assert rig.station.connector.error_code.value == "InternalError"
        # The board cannot hear it yet; once it answers again the off gets through.
        rig.sim.set_fault("board_silent", False)
        await rig.until(lambda: off_after(rig.commands(), before), what="off write")
        assert rig.sim.station.board.command == 0.0


async def test_welded_contactor_latches_across_restart(tmp_path: Path) -> None:
    db = tmp_path / "station.sqlite"
    async with station_rig(tmp_path, db=db) as rig:
        await rig.charge()
        rig.sim.set_fault("welded", True)
        await rig.station.request_stop(StopReason.LOCAL)
        await rig.status("Faulted", within=3.0)
        assert rig.station.connector.error_code.value == "PowerSwitchFailure"
        rig.sim.set_fault("welded", False)
        rig.sim.set_ev({"plugged": False})
        await trio.sleep(0.3)
        assert rig.station.connector.status.value == "Faulted"
    async with station_rig(tmp_path, db=db) as rig:
        await rig.status("Faulted")
        assert Fault.WELDED in rig.station.connector.snapshot.faults
        await rig.station.reset_faults()
        await rig.status("Available")


async def test_an_exception_in_any_task_ends_with_the_board_off(tmp_path: Path) -> None:
    boom = trio.Event()

    async def crashing(supervisor: Supervisor) -> None:
        await boom.wait()
        raise RuntimeError("injected failure")

    commands_before: list[int] = []

    async def scenario() -> None:
        async with station_rig(tmp_path, services=[Service("crasher", crashing)]) as rig:
            rigs.append(rig)
            await rig.charge()
            commands_before.append(len(rig.commands()))
            boom.set()
            await trio.sleep(5)

    rigs: list[Rig] = []
    with pytest.raises(ExceptionGroup) as exc_info:
        await scenario()
    rig = rigs[0]
    before = commands_before[0]
    assert exc_info.group_contains(RuntimeError, match="injected failure")
    assert rig.commands()[before:].count(0.0) >= 1
    assert rig.sim.station.board.command == 0.0
    # The board was disabled too, and the transaction did not stay open.
    assert rig.sim.station.board.enabled is False
    assert rig.db_rows("SELECT stop_reason FROM transactions") == [("Other",)]


async def test_cancellation_ends_with_the_board_off(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        before = len(rig.commands())
        rig.nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()
    assert 0.0 in rig.commands()[before:]
    assert rig.sim.station.board.command == 0.0


async def test_shutdown_stops_with_reboot_after_switching_off(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        await rig.charge()
        before = len(rig.commands())
        await rig.supervisor.shutdown(StopReason.REBOOT)
        await rig.until(
            lambda: rig.db_rows("SELECT stop_reason FROM transactions") == [("Reboot",)],
            what="Reboot stop",
        )
        assert rig.commands()[before] == 0.0


async def test_availability_is_scheduled_during_a_transaction_and_persists(tmp_path: Path) -> None:
    db = tmp_path / "station.sqlite"
    async with station_rig(tmp_path, db=db) as rig:
        await rig.charge()
        assert await rig.station.set_availability(False) == "Scheduled"
        await trio.sleep(0.2)
        assert rig.station.connector.status.value == "Charging"
        rig.sim.set_ev({"plugged": False})
        await rig.status("Unavailable")
    async with station_rig(tmp_path, db=db) as rig:
        await rig.status("Unavailable")
        rig.sim.set_ev({"plugged": True})
        result = await rig.station.present_id_tag(TAG)
        assert result.accepted  # the tag is fine; the connector is not
        await trio.sleep(0.3)
        assert rig.station.connector.status.value == "Unavailable"
        assert await rig.station.set_availability(True) == "Accepted"
        await rig.status("Preparing")


async def test_a_card_on_the_rfid_reader_starts_and_stops_charging(tmp_path: Path) -> None:
    with PtyPair() as pty:
        reader = RfidConfig(device=pty.path, debounce=0.2)
        async with station_rig(tmp_path, rfid=reader) as rig:
            assert rig.supervisor.reader is not None
            await rig.until(
                lambda: rig.supervisor.reader is not None and rig.supervisor.reader.state.ok,
                what="reader open",
            )
            rig.sim.set_ev({"plugged": True})
            await rig.status("Preparing")
            os.write(pty.master_fd, b"04a2b3c4\r\n")  # lower case: normalized
            await rig.status("Charging")
            await trio.sleep(0.4)  # past the debounce window
            os.write(pty.master_fd, b"04A2B3C4\r\n")
            await rig.status("Finishing")
            await rig.until(
                lambda: (
                    rig.db_rows("SELECT id_tag, stop_reason FROM transactions")
                    == [("04A2B3C4", "Local")]
                ),
                what="Local stop on disk",
            )


async def test_a_reservation_holds_the_connector_for_its_tag(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        expiry = datetime.now(UTC) + timedelta(seconds=30)
        assert await rig.station.reserve(1, TAG, expiry) == "Accepted"
        await rig.status("Reserved")
        assert await rig.station.reserve(2, TAG, expiry) == "Occupied"
        rig.sim.set_ev({"plugged": True})
        await trio.sleep(0.3)
        assert rig.station.connector.status.value == "Reserved"
        other = await rig.station.present_id_tag("BLOCKED1")
        assert not other.accepted
        result = await rig.station.present_id_tag(TAG)  # the reserved tag claims it
        assert result.accepted
        await rig.status("Charging")
        assert await rig.station.cancel_reservation(1) is False


async def test_a_reservation_expires(tmp_path: Path) -> None:
    async with station_rig(tmp_path) as rig:
        expiry = datetime.now(UTC) + timedelta(seconds=0.5)
        assert await rig.station.reserve(3, TAG, expiry) == "Accepted"
        await rig.status("Reserved")
        await rig.status("Available", within=3.0)
        past = datetime.now(UTC) - timedelta(seconds=1)
        assert await rig.station.reserve(4, TAG, past) == "Rejected"
