"""Issue 7's findings about the station, each on the virtual clock.

* the trip lane does not wait for a busy loop (disk, threads, a slow request);
* a slow start is not a silent board (the silence clocks start with the pollers);
* the first write after a start is the off-write, before recovery;
* requests fail loudly: a failure after a state change ends the station (which
  switches off), a failure before one goes back to the caller;
* a failing meter persistence is an error, and a fault after N in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from evse.connector import ErrorCode, Fault, LimitChanged, Status, StopReason
from evse.errors import InvariantBroken, StoreError
from evse.station import StationSettings
from evse.store import Store
from tests.vclock_rig import VRig, inline, vclock_rig

T = TypeVar("T")


@pytest.mark.parametrize("board", ["evse-din", "heidelberg", "ev-cc"])
async def test_a_fault_is_switched_off_while_the_loop_is_busy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, board: str
) -> None:
    """The loop is stuck in a slow request (30 s: a wedged disk, a thread): the
    RCD trip is still switched off within the board's bound."""
    async with vclock_rig(tmp_path, board=board) as rig:
        await rig.charge()
        busy = trio.Event()

        async def slow_request() -> None:
            busy.set()
            await trio.sleep(30)

        rig.nursery.start_soon(rig.station.call, slow_request)
        await busy.wait()
        await rig.next_read()
        injected = rig.fault("rcd_trip")
        off = await rig.next_off(injected["seq"])
        assert off["t"] - injected["t"] <= rig.off_bound()
        # No current above 0 is written while the fault waits for the loop.
        await trio.sleep(5)
        after = rig.board_writes(injected["seq"])
        assert all(w["fields"].get("command", 0) == 0 for w in after)
        assert all(w["fields"].get("enable", 0) == 0 for w in after)
        assert rig.station.connector.status is Status.CHARGING  # the loop has not seen it yet
        await trio.sleep(30)
        await rig.status("Faulted")


SLOW_DISK = 1.5


async def slow_disk(fn: Callable[..., T], *args: Any) -> T:
    """A disk on which every blocking call takes SLOW_DISK (virtual) seconds."""
    await trio.sleep(SLOW_DISK)
    return await inline(fn, *args)


async def test_a_slow_start_is_not_a_silent_board(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Every blocking call at start-up takes 1.5 s (a slow disk): no BOARD_SILENT."""
    async with vclock_rig(tmp_path, offload=slow_disk) as rig:
        await trio.sleep(3)
        assert all(status is not Status.FAULTED for _, status, _ in rig.statuses)
        assert rig.station.connector.snapshot.faults == {}


async def test_the_first_write_after_a_start_is_the_off_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """After a crash (a transaction left running on disk), the first bus write is
    "off", before the recovery's disk work, not after it."""
    db = tmp_path / "station.sqlite"
    with Store.open(db) as store:
        store.begin_transaction(
            connector_id=1, id_tag="T", meter_start_wh=0.0, started_at=datetime.now(UTC)
        )
    async with vclock_rig(tmp_path, db=db, offload=slow_disk) as rig:
        writes = rig.board_writes()
        assert writes[0]["fields"] == {"command": 0.0}
        # Opening the store is the first slow call; the recovery would be the second.
        assert writes[0]["t"] - rig.started < 2 * SLOW_DISK
        ((reason,),) = rig.db_rows("SELECT stop_reason FROM transactions")
        assert reason == "PowerLoss"


async def test_a_request_failing_before_a_change_goes_back_to_the_caller(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vclock_rig(tmp_path) as rig:

        async def bad() -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            await rig.station.call(bad)
        await trio.sleep(1)
        assert rig.station.connector.status is Status.AVAILABLE  # still running


async def test_a_request_failing_after_a_change_ends_the_station(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Its effects are half done: the station stops, and switches off on the way out."""
    rigs: list[VRig] = []

    async def scenario() -> None:
        async with vclock_rig(tmp_path) as rig:
            rigs.append(rig)
            await rig.charge()
            station = rig.station

            async def half_done() -> None:
                await station._handle(LimitChanged(10.0))  # a request that changes state
                raise KeyError("bug after a change")

            with pytest.raises(KeyError):
                await station.call(half_done)
            await trio.sleep(10)

    with pytest.raises(BaseExceptionGroup) as failure:
        await scenario()
    assert failure.group_contains(InvariantBroken, match="KeyError")
    (rig,) = rigs
    assert rig.sim.station.board.command == 0.0
    assert rig.db_rows("SELECT stop_reason FROM transactions") == [("Other",)]


async def test_failed_meter_persistence_is_an_error_then_a_fault(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = replace(StationSettings(), persist_interval=1.0, persist_failures=3)
    async with vclock_rig(tmp_path, settings=settings) as rig:
        await rig.charge()
        store = rig.station.store

        def full_disk(*args: object, **kwargs: object) -> None:
            raise StoreError("database or disk is full", path=rig.db)

        original = store.record_meter
        store.record_meter = full_disk  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="evse.station"):
            await trio.sleep(2.5)
            assert "not persisted (1 in a row)" in caplog.text
            assert rig.station.connector.status is Status.CHARGING
            await rig.status("Faulted", within=10)
        assert Fault.STORE in rig.station.connector.snapshot.faults
        assert rig.station.connector.error_code is ErrorCode.INTERNAL_ERROR
        await rig.until(lambda: rig.sim.station.board.command == 0.0, what="the off-write")
        # The disk recovers: the fault clears on the next reading persisted (no
        # transaction runs now, so there is none; the fault stays until then).
        store.record_meter = original  # type: ignore[method-assign]


async def test_an_off_disables_a_board_whose_current_0_is_no_confirmed_stop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """EV-CC: nobody confirms that 0 A on HR 528 stops charging (evcc stops with
    coil 400 off), so every off there also disables the board, and the next
    current is enabled again only after it is written."""
    async with vclock_rig(tmp_path, board="ev-cc") as rig:
        assert rig.sim.station.board.enabled is False  # off at start means disabled
        await rig.charge()
        writes = rig.board_writes()
        command = next(i for i, w in enumerate(writes) if w["fields"].get("command", 0) > 0)
        enable = next(i for i, w in enumerate(writes) if w["fields"].get("enable") == 1)
        assert command < enable
        await rig.next_read()
        injected = rig.fault("rcd_trip")
        off = await rig.next_off(injected["seq"])
        await rig.until(lambda: rig.sim.station.board.enabled is False, what="disabled")
        (disable,) = [w for w in rig.board_writes(off["seq"] - 1) if "enable" in w["fields"]]
        assert disable["t"] - injected["t"] <= rig.off_bound() + rig.one_request()


async def test_every_switch_off_step_runs_even_when_one_fails(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The board goes silent, then the station is cancelled mid-transaction: the
    off-write and the disable run out of time (logged critically, by name), and
    the transaction record is still ended, within the deadlines."""
    rigs: list[VRig] = []
    with caplog.at_level(logging.INFO, logger="evse.supervisor"):
        async with vclock_rig(tmp_path, board="evse-din") as rig:
            rigs.append(rig)
            await rig.charge()
            rig.fault("board_silent")
            started = trio.current_time()
            rig.nursery.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()
        took = trio.current_time() - started
    (rig,) = rigs
    text = caplog.text
    assert "switch-off: allowed current 0 A did not go through" in text
    assert "switch-off: board disabled did not go through" in text
    assert "switch-off: transaction record ended" in text
    assert rig.db_rows("SELECT stop_reason FROM transactions") == [("Other",)]
    # The bus steps share off_deadline (each at least 1 s); the record has its own.
    assert took <= rig.supervisor.plan.off_deadline + 1.0 + 3.0 + 1.0


@pytest.mark.parametrize("board", ["ev-cc", "ev-cc-basic"])
async def test_a_refused_zero_current_does_not_keep_the_disable_from_going_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, board: str
) -> None:
    """A board that switches off by its enable coil (stop_by_disable) and refuses a
    current command of 0 A (exception 03: its register is documented 6..63 A):
    the disable is still written, so the stop is acknowledged and the EV stops
    (found while adding the EV-CC Basic, issue 8)."""
    transport = "rtu" if board == "ev-cc-basic" else "tcp"
    async with vclock_rig(tmp_path, board=board, transport=transport) as rig:
        await rig.charge()
        rig.fault("refuse_zero")
        assert await rig.station.request_stop(StopReason.LOCAL)
        await rig.until(lambda: not rig.sim.station.board.enabled, within=2.0)
        await rig.until(lambda: not rig.sim.station.contactor_closed, within=5.0)
        ended = "SELECT stop_reason FROM transactions WHERE stop_reason IS NOT NULL"
        await rig.until(lambda: rig.db_rows(ended), within=10.0)
        assert rig.db_rows(ended) == [("Local",)]
