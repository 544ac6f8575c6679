"""OCPP 1.6 Core behaviours an independent central system found wrong (issue 8),
each with a test named after the behaviour, on the virtual-clock rig where the
station alone decides it (tests/vclock_rig.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import trio
import trio.testing

from evse.connector import State, Status
from evse.store import Store
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
