"""The board's hardware failsafe follows the transaction (issue 7, found by the
stateful test): armed with 0 while nothing runs, with the fallback limit while a
transaction is on disk; a transaction stays open while a silent board's
failsafe may deliver current, and the safety monitor does not take that current
for a welded contactor. On the virtual-clock rig (Heidelberg, the one board
with a failsafe)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from evse.connector import Fault, Status
from evse.station import StationSettings
from tests.vclock_rig import vclock_rig

WATCHDOG = StationSettings().failsafe_watchdog


def failsafe_writes(rig: object) -> list[tuple[float, float]]:
    """(time, amperes) of every write of the failsafe current."""
    return [
        (w["t"], w["fields"]["failsafe_current"])
        for w in rig.board_writes()  # type: ignore[attr-defined]
        if "failsafe_current" in w["fields"]
    ]


async def test_the_failsafe_is_armed_with_0_outside_a_transaction(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path, board="heidelberg") as rig:
        board = rig.sim.station.board
        await rig.until(lambda: board.failsafe_timeout == WATCHDOG, within=1.0)
        assert board.failsafe_current == 0.0
        await rig.charge()
        await trio.sleep(0.5)
        assert board.failsafe_current == rig.station.fallback == 6.0
        [(armed_at, _)] = [w for w in failsafe_writes(rig) if w[1] > 0]
        ((started,),) = rig.db_rows("SELECT COUNT(*) FROM transactions")
        assert started == 1
        rig.unplug()
        await rig.status("Available")
        await trio.sleep(0.5)
        assert board.failsafe_current == 0.0
        assert rig.db_rows("SELECT stop_reason FROM transactions") == [("EVDisconnected",)]
        # Never a positive failsafe current before the transaction was on disk.
        assert failsafe_writes(rig)[0][1] == 0.0
        assert armed_at > rig.started


async def test_an_ev_plugged_in_without_a_transaction_is_never_charged_by_the_failsafe(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The board silent past its watchdog, an EV plugged in, no transaction: no current."""
    async with vclock_rig(tmp_path, board="heidelberg") as rig:
        await rig.until(lambda: rig.sim.station.board.failsafe_timeout == WATCHDOG, within=1.0)
        rig.fault("board_silent")
        await trio.sleep(WATCHDOG + 1)
        rig.plug()
        await trio.sleep(6.0)
        s = rig.sim.station
        assert s.board.failsafe_tripped
        assert s.offered == 0.0
        assert not s.contactor_closed
        assert Fault.WELDED not in rig.station.connector.snapshot.faults


async def test_a_transaction_stays_open_while_the_silent_boards_failsafe_charges(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Charging, the board goes silent: Faulted at once, but the transaction is
    ended only when the board answers again, with the energy its failsafe
    delivered meanwhile; no false WELDED from that current."""
    async with vclock_rig(tmp_path, board="heidelberg") as rig:
        await rig.charge()
        await trio.sleep(2.0)
        rig.fault("board_silent")
        await rig.status("Faulted", within=3.0)
        await trio.sleep(WATCHDOG + 5.0)
        s = rig.sim.station
        assert s.board.failsafe_tripped and s.contactor_closed  # 6 A by the board itself
        assert rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL") == [(1,)]
        during_failsafe = s.energy_wh
        rig.clear("board_silent")
        await rig.until(
            lambda: not rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL"),
            within=10.0,
        )
        ((stop_wh, reason),) = rig.db_rows("SELECT meter_stop_wh, stop_reason FROM transactions")
        assert reason == "Other"
        assert stop_wh >= during_failsafe
        assert s.board.failsafe_current == 0.0
        await trio.sleep(10.0)
        assert Fault.WELDED not in rig.station.connector.snapshot.faults
        assert rig.station.connector.status is not Status.CHARGING


async def test_a_transaction_kept_open_is_ended_when_the_station_stops(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The board never answers again: a shutdown still ends the transaction (with
    the last reading) and does not hang waiting for the board."""
    async with vclock_rig(tmp_path, board="heidelberg") as rig:
        await rig.charge()
        rig.fault("board_silent")
        await trio.sleep(WATCHDOG + 2.0)
        assert rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL") == [(1,)]
        rig.nursery.cancel_scope.cancel()
        await rig.until(
            lambda: not rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL"),
            within=30.0,
        )
