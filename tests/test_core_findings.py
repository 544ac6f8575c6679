"""OCPP 1.6 Core behaviours an independent central system found wrong (issue 8),
each with a test named after the behaviour, on the virtual-clock rig where the
station alone decides it (tests/vclock_rig.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from evse.connector import State, Status
from evse.station import StationSettings
from evse.store import Store
from fieldbus.boards import BOARD_MODELS
from tests.vclock_rig import TAG, vclock_rig


def _left_running(db: Path) -> None:
    """A transaction a power loss left running on disk."""
    with Store.open(db) as store:
        store.begin_transaction(
            connector_id=1, id_tag="T", meter_start_wh=0.0, started_at=datetime.now(UTC)
        )


async def test_after_a_power_loss_with_the_ev_plugged_in_the_connector_is_finishing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """TC_032 (power failure): the PowerLoss stop is followed by Finishing, not
    Preparing, while the EV is still plugged in (OCPP 1.6 4.9); it becomes
    Available once unplugged."""
    db = tmp_path / "station.sqlite"
    _left_running(db)
    async with vclock_rig(tmp_path, db=db, plugged=True) as rig:
        await trio.sleep(1.0)
        ((reason,),) = rig.db_rows("SELECT stop_reason FROM transactions")
        assert reason == "PowerLoss"
        seen = [status for _, status, _ in rig.statuses]
        assert Status.PREPARING not in seen
        assert seen[-1] is Status.FINISHING
        assert rig.station.connector.state is State.FINISHING
        rig.unplug()
        await rig.status("Available")


async def test_after_a_power_loss_with_the_ev_gone_the_connector_is_available(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "station.sqlite"
    _left_running(db)
    async with vclock_rig(tmp_path, db=db) as rig:
        await trio.sleep(1.0)
        seen = [status for _, status, _ in rig.statuses]
        assert Status.FINISHING not in seen
        assert seen[-1] is Status.AVAILABLE


async def test_a_new_authorization_after_a_power_loss_starts_a_transaction(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "station.sqlite"
    _left_running(db)
    async with vclock_rig(tmp_path, db=db, plugged=True) as rig:
        await rig.status("Finishing")
        result = await rig.station.present_id_tag(TAG)
        assert result.accepted
        await rig.status("Charging")


async def test_a_start_transaction_is_never_stamped_before_the_remote_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """StartTransaction timestamps came up to 0.4 s before the RemoteStart that caused
    them (the last meter poll's time); the start reads the meter afresh."""
    async with vclock_rig(tmp_path, plugged=True) as rig:
        await rig.status("Preparing")
        await trio.sleep(0.95)  # well after a meter poll
        asked = datetime.now(UTC)
        assert await rig.station.remote_start(TAG)
        await rig.status("Charging")
        ((started_at,),) = rig.db_rows("SELECT started_at FROM transactions")
        assert datetime.fromisoformat(started_at.replace("Z", "+00:00")) >= asked


async def test_mains_lost_stops_the_transaction_with_power_loss_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Mains lost (SIGPWR or the meter; OCTT TC_032_1, a station on backup power):
    the off-write at once, the transaction ended with PowerLoss and its
    StopTransaction on disk, Finishing while the EV is plugged in, and 0 A offered
    until the mains is back (issue 8)."""
    async with vclock_rig(tmp_path) as rig:
        await rig.charge()
        marker = rig.mark("mains lost")
        lost = trio.current_time()
        await rig.station.mains_power(False, "test")
        off = await rig.next_off(marker["seq"])
        assert rig.sent_at(off) - lost <= rig.one_request() + 0.01
        ((reason,),) = rig.db_rows("SELECT stop_reason FROM transactions")
        assert reason == "PowerLoss"
        assert rig.station.connector.status is Status.FINISHING
        assert rig.station.limit.bound_by.startswith("mains lost")
        assert (await rig.station.present_id_tag(TAG)).accepted
        await rig.status("SuspendedEVSE")  # a new transaction gets no current
        assert rig.sim.station.board.command == 0.0
        await rig.station.mains_power(True, "test")
        await rig.status("Charging")


async def test_the_meter_voltage_tells_the_station_mains_is_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = StationSettings(mains_lost_voltage=100.0)
    async with vclock_rig(tmp_path, settings=settings) as rig:
        await rig.charge()
        rig.sim.station.voltage = 20.0
        await rig.status("Finishing", within=5.0)
        ended = "SELECT stop_reason FROM transactions WHERE stop_reason IS NOT NULL"
        await rig.until(lambda: rig.db_rows(ended), within=5.0)
        assert rig.db_rows(ended) == [("PowerLoss",)]
        assert rig.station.limit.bound_by.startswith("mains lost")
        rig.sim.station.voltage = 230.0
        await rig.until(lambda: "mains" not in rig.station.limit.bound_by, within=5.0)


@pytest.mark.parametrize("board", sorted(BOARD_MODELS))
@pytest.mark.parametrize("phases", [1, 3])
def test_the_boot_notification_model_fits_ocpp_on_every_board(board: str, phases: int) -> None:
    """chargePointModel is CiString20 (OCPP 1.6 6.2): "AC 3-phase heidelberg" (21) made
    a Heidelberg station fail its own schema check on every BootNotification."""
    from ops.run import charge_point_model  # noqa: PLC0415

    model = charge_point_model(phases, board)
    assert len(model) <= 20
    assert board in model
