"""The charging core's wiring: station + simulator over real Modbus sockets and SQLite.

Only what needs real I/O stays here: one full session over Modbus TCP and one
over RTU on a pseudo-terminal, the switch-off on cancellation and on shutdown
(what SIGTERM does) at a simulator reached through real sockets, and the RFID
reader on a real serial line. Everything about the station's behaviour and
timing runs on the virtual clock in tests/test_station_vclock.py, with exact
times instead of wall-clock margins.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from evse.connector import StopReason
from evse.rfid import RfidConfig
from tests.ptypair import PtyPair
from tests.station_harness import TAG, station_rig


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
        # The status does not wait for the bus or the disk: the off-write and the
        # record follow (the record after the off is acknowledged).
        await rig.until(lambda: rig.commands()[-1] == 0.0, what="the off-write")
        rig.sim.set_ev({"plugged": False})
        await rig.status("Available")
        await rig.until(
            lambda: (
                rig.db_rows("SELECT count(*) FROM transactions WHERE stop_reason IS NULL") == [(0,)]
            ),
            what="the end on disk",
        )
        ((reason, start, stop),) = rig.db_rows(
            "SELECT stop_reason, meter_start_wh, meter_stop_wh FROM transactions"
        )
        assert reason == "Local"
        assert stop > start


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
