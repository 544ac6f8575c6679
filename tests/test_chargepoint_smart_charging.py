"""Smart Charging on the session (ocpp16/profiles/smart_charging.py), in process.

The charge point of tests/chargepoint_rig.py with Smart Charging registered (a
``ProfileStore`` on the rig's SQLite file) and its "smart charging limit" task
running. Wall time follows trio's MockClock exactly (``EPOCH`` at 0, through
the charge point's ``wall_clock`` seam, and the central system's
``currentTime`` says the same), so period boundaries are asserted to the
virtual second. Every frame either side sends is checked against the OCPP 1.6
schemas by the rig.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ocpp16.chargepoint import ChargePoint
from ocpp16.profile_store import ProfileStore, ProfileStoreError
from ocpp16.profiles import Lifetime
from ocpp16.profiles.smart_charging import SmartChargingProfile
from ocpp16.rpc import CallErrorReceived, CallResultReceived, IncomingCall
from ocpp16.smart_charging import ProfileSet
from tests.chargepoint_rig import (
    EPOCH,
    CentralSystem,
    FakeStation,
    Responder,
    Rig,
    open_rig,
    settle,
    wall,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


def at(t: float) -> Any:
    """A virtual time, give or take the millisecond of a startSchedule's text."""
    return pytest.approx(t, abs=0.002)


async def whole_second() -> float:
    """Sleep to the next whole virtual second (composite windows start on one)."""
    await trio.sleep_until(math.ceil(trio.current_time()) + 1)
    return trio.current_time()


def virtual_wall() -> datetime:
    return EPOCH + timedelta(seconds=trio.current_time())


def _now_answer(call: IncomingCall) -> dict[str, Any]:
    return {"currentTime": wall(trio.current_time())}


def _boot(call: IncomingCall) -> dict[str, Any]:
    return {"status": "Accepted", "currentTime": wall(trio.current_time()), "interval": 3600}


def started(tx_id: int) -> Responder:
    def answer(call: IncomingCall) -> dict[str, Any]:
        return {"transactionId": tx_id, "idTagInfo": {"status": "Accepted"}}

    return answer


def profile(
    profile_id: int,
    *,
    purpose: str = "TxDefaultProfile",
    stack: int = 0,
    kind: str = "Absolute",
    periods: tuple[tuple[int, float], ...] = ((0, 10.0),),
    start: float | None = 0.0,
    duration: int | None = None,
    unit: str = "A",
    **extra: Any,
) -> dict[str, Any]:
    """A csChargingProfiles object; ``start``: virtual second of startSchedule."""
    schedule: dict[str, Any] = {
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    if start is not None and kind != "Relative":
        schedule["startSchedule"] = wall(start)
    if duration is not None:
        schedule["duration"] = duration
    return {
        "chargingProfileId": profile_id,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
        **extra,
    }


@dataclass
class Smart:
    rig: Rig
    sc: SmartChargingProfile
    store: ProfileStore
    #: (virtual time, the published limit of connector 1) at each limits_changed.
    changes: list[tuple[float, float | None]] = field(default_factory=list)
    evaluations: int = 0

    @property
    def cp(self) -> ChargePoint:
        return self.rig.cp

    async def connect(self, **auto: Responder | None) -> CentralSystem:
        responders: dict[str, Responder | None] = {
            "BootNotification": _boot,
            "Heartbeat": _now_answer,
            "StartTransaction": started(42),
            "StopTransaction": lambda call: {},
            "MeterValues": lambda call: {},
            "Authorize": lambda call: {"idTagInfo": {"status": "Accepted"}},
        }
        responders.update(auto)
        cs = await self.rig.connect(**responders)
        await settle(lambda: len(cs.payloads("StatusNotification")) >= 2, "registered")
        return cs

    async def begin(self, local_id: int = 1) -> None:
        """A transaction starts on connector 1 at the current virtual time."""
        self.rig.station.running[1] = local_id
        await self.cp.transaction_started(
            local_id=local_id,
            connector_id=1,
            id_tag="TAG1",
            meter_start_wh=1000.0,
            timestamp=virtual_wall(),
        )

    async def end(self, local_id: int = 1) -> None:
        self.rig.station.running.pop(1, None)
        await self.cp.transaction_ended(
            local_id=local_id,
            connector_id=1,
            id_tag="TAG1",
            meter_start_wh=1000.0,
            started_at=EPOCH,
            meter_stop_wh=2000.0,
            stopped_at=virtual_wall(),
            reason="Local",
            stop_id_tag=None,
        )


def smart_chargepoint(store: ProfileStore) -> type[ChargePoint]:
    class SmartChargePoint(ChargePoint):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw, wall_clock=virtual_wall, charging_profiles=store)

    return SmartChargePoint


@asynccontextmanager
async def smart_rig(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    *,
    settings: dict[str, str] | None = None,
    station: FakeStation | None = None,
    store: ProfileStore | None = None,
) -> AsyncIterator[Smart]:
    own = store is None
    store = store or ProfileStore.open(tmp_path / "station.db")
    try:
        async with open_rig(
            tmp_path, clock, settings=settings, station=station, cp_class=smart_chargepoint(store)
        ) as rig:
            sc = rig.cp.smart_charging
            assert sc is not None
            smart = Smart(rig, sc, store)
            sc.local_limit = lambda connector_id: 32.0
            sc.limits_changed = lambda: smart.changes.append((trio.current_time(), sc.limit(1)))
            evaluate = sc._evaluate

            def counted(now: datetime) -> Any:
                smart.evaluations += 1
                return evaluate(now)

            sc._evaluate = counted  # type: ignore[method-assign]
            rig.nursery.start_soon(sc.run_limits, name="smart charging limit")
            await settle(sc._loaded.is_set, "profiles loaded")
            yield smart
    finally:
        if own:
            store.close()


async def result(cs: CentralSystem, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await cs.call(action, payload)
    assert isinstance(answer, CallResultReceived), answer
    return answer.payload


async def set_profile(
    cs: CentralSystem, connector_id: int, cs_profile: dict[str, Any]
) -> dict[str, Any]:
    return await result(
        cs, "SetChargingProfile", {"connectorId": connector_id, "csChargingProfiles": cs_profile}
    )


ACCEPTED = {"status": "Accepted"}
REJECTED = {"status": "Rejected"}


# -- registration and configuration ------------------------------------------------------


async def test_smart_charging_is_advertised_with_its_read_only_keys(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        keys = [
            "SupportedFeatureProfiles",
            "ChargeProfileMaxStackLevel",
            "ChargingScheduleAllowedChargingRateUnit",
            "ChargingScheduleMaxPeriods",
            "MaxChargingProfilesInstalled",
        ]
        got = await result(cs, "GetConfiguration", {"key": keys})
        values = {k["key"]: (k["value"], k["readonly"]) for k in got["configurationKey"]}
        assert "SmartCharging" in values["SupportedFeatureProfiles"][0].split(",")
        assert values["ChargeProfileMaxStackLevel"] == ("5", True)
        assert values["ChargingScheduleAllowedChargingRateUnit"] == ("Current", True)
        assert values["ChargingScheduleMaxPeriods"] == ("5", True)
        assert values["MaxChargingProfilesInstalled"] == ("9", True)
        answer = await result(
            cs, "ChangeConfiguration", {"key": "MaxChargingProfilesInstalled", "value": "20"}
        )
        assert answer == REJECTED
        tasks = [(t.name, t.lifetime) for t in smart.cp.profiles.tasks(Lifetime.CHARGE_POINT)]
        assert ("smart charging limit", Lifetime.CHARGE_POINT) in tasks


# -- SetChargingProfile (5.16) --------------------------------------------------------------


async def test_set_charging_profile_publishes_the_limit_before_it_answers(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        assert smart.sc.limit(1) is None
        uid = cs.send_call(
            "SetChargingProfile", {"connectorId": 0, "csChargingProfiles": profile(1)}
        )
        answer = await cs.answer_to_call()
        assert isinstance(answer, CallResultReceived) and answer.unique_id == uid
        assert answer.payload == ACCEPTED
        # Published (and the station told) by the time the answer went out.
        assert smart.sc.limit(1) == 10.0
        assert smart.changes[-1] == (trio.current_time(), 10.0)
        assert smart.sc.tx_profile_in_effect(1) is False


@pytest.mark.parametrize(
    ("connector_id", "cs_profile", "why"),
    [
        (0, profile(2, stack=6), "stack level above ChargeProfileMaxStackLevel"),
        (0, profile(2, unit="W", periods=((0, 11000.0),)), "W: this station takes A only"),
        (
            0,
            profile(2, periods=tuple((60 * i, 10.0) for i in range(6))),
            "six periods, ChargingScheduleMaxPeriods is 5",
        ),
        (1, profile(2, purpose="ChargePointMaxProfile"), "ChargePointMax on connector 1"),
        (2, profile(2), "no connector 2"),
        (1, profile(2, purpose="TxProfile"), "TxProfile without a transaction"),
        (0, profile(2, periods=((10, 10.0),)), "first startPeriod not 0"),
    ],
)
async def test_a_rejected_profile_changes_nothing(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    connector_id: int,
    cs_profile: dict[str, Any],
    why: str,
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        assert await set_profile(cs, 0, profile(2, periods=((0, 16.0),))) == ACCEPTED
        writes = smart.store.writes
        before = smart.sc.profiles
        assert await set_profile(cs, connector_id, cs_profile) == REJECTED, why
        # The old profile with the same id stays, nothing was written.
        assert smart.sc.profiles is before
        assert smart.store.writes == writes
        assert smart.sc.limit(1) == 16.0


async def test_a_tx_profile_needs_its_transaction_and_ends_with_it(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        assert await set_profile(cs, 0, profile(1, periods=((0, 16.0),))) == ACCEPTED
        tx = profile(5, purpose="TxProfile", stack=1, kind="Relative", periods=((0, 8.0),))
        assert await set_profile(cs, 1, tx) == REJECTED  # no transaction yet
        await smart.begin()
        await settle(lambda: cs.payloads("StartTransaction") != [], "StartTransaction")
        await settle(lambda: smart.sc._running[1].transaction_id == 42, "transaction id")
        assert await set_profile(cs, 1, tx | {"transactionId": 41}) == REJECTED  # not ours
        writes = smart.store.writes
        assert await set_profile(cs, 1, tx | {"transactionId": 42}) == ACCEPTED
        assert smart.sc.limit(1) == 8.0
        assert smart.sc.tx_profile_in_effect(1) is True
        assert smart.store.writes == writes  # a TxProfile is never written
        await smart.end()
        # Its transaction ended: gone; the TxDefault applies again.
        assert smart.sc.profiles.get(5) is None
        assert smart.sc.limit(1) == 16.0
        assert smart.sc.tx_profile_in_effect(1) is False
        assert await result(cs, "ClearChargingProfile", {"id": 5}) == {"status": "Unknown"}


async def test_a_tx_profile_without_transaction_id_is_bound_when_the_id_is_known(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect(StartTransaction=None)  # answered by the test
        await smart.begin()
        start = await cs.expect("StartTransaction")
        tx = profile(5, purpose="TxProfile", kind="Relative", periods=((0, 8.0),))
        assert await set_profile(cs, 1, tx) == ACCEPTED  # the id is not known yet
        assert smart.sc.profiles.entries[0].transaction_id is None
        cs.answer(start, {"transactionId": 77, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: smart.sc.profiles.entries[0].transaction_id == 77, "bound")
        assert smart.sc.limit(1) == 8.0


# -- the limit on trio's clock --------------------------------------------------------------


async def test_the_limit_changes_exactly_at_each_period_boundary_without_polling(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        # Level 0: 6 / 8 / 10 A at 0 / 100 / 200 s for 400 s; level 1: 16 A for 150 s.
        t0 = await whole_second()
        base = profile(1, periods=((0, 6.0), (100, 8.0), (200, 10.0)), start=t0, duration=400)
        top = profile(2, stack=1, periods=((0, 16.0),), start=t0, duration=150)
        assert await set_profile(cs, 0, base) == ACCEPTED
        assert await set_profile(cs, 0, top) == ACCEPTED
        evaluations = smart.evaluations
        smart.changes.clear()
        await trio.sleep(t0 + 1000 - trio.current_time())
        assert smart.changes == [(at(t0 + 150), 8.0), (at(t0 + 200), 10.0), (at(t0 + 400), None)]
        # Woken at the boundaries (100, 150, 200, 400) and by heartbeats' clock
        # answers at most: no polling.
        assert smart.evaluations - evaluations <= 6


async def test_a_relative_tx_default_counts_from_the_transaction_start(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        relative = profile(1, kind="Relative", periods=((0, 7.0), (60, 12.0)))
        assert await set_profile(cs, 1, relative) == ACCEPTED
        # No transaction: as if one started now, its first period.
        assert smart.sc.limit(1) == 7.0
        await trio.sleep(500)
        assert smart.sc.limit(1) == 7.0
        begun = trio.current_time()
        await smart.begin()
        smart.changes.clear()
        await trio.sleep(100)
        assert smart.changes == [(at(begun + 60), 12.0)]


async def test_offline_the_task_keeps_applying_the_tx_profile_and_its_boundaries(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        await smart.begin()
        tx = profile(5, purpose="TxProfile", kind="Relative", periods=((0, 8.0), (300, 13.0)))
        assert await set_profile(cs, 1, tx) == ACCEPTED
        begun = smart.sc._running[1].started_at - EPOCH
        cs.conn.drop()
        await settle(lambda: not smart.cp.channel.connected, "offline")
        smart.changes.clear()
        await trio.sleep(400)
        assert smart.changes == [(at(begun.total_seconds() + 300), 13.0)]
        assert smart.sc.tx_profile_in_effect(1) is True


async def test_a_clock_step_reschedules_the_boundary(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    step = timedelta(0)

    def heartbeat(call: IncomingCall) -> dict[str, Any]:
        return {"currentTime": wall(trio.current_time() + step.total_seconds())}

    def boot(call: IncomingCall) -> dict[str, Any]:
        return {"status": "Accepted", "currentTime": wall(trio.current_time()), "interval": 60}

    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect(BootNotification=boot, Heartbeat=heartbeat)
        t0 = trio.current_time()
        assert t0 < 50
        cs_profile = profile(1, periods=((0, 6.0), (600, 9.0)), start=t0)
        assert await set_profile(cs, 0, cs_profile) == ACCEPTED
        step = timedelta(seconds=300)  # the central system's clock is 300 s ahead
        smart.changes.clear()
        await trio.sleep(t0 + 700 - trio.current_time())
        # The next heartbeat (60 s) stepped the clock: 600 s of central time came
        # 300 s early, at the first evaluation after the step.
        assert smart.changes == [(at(t0 + 300), 9.0)]


# -- RemoteStartTransaction with a chargingProfile (5.11) ------------------------------------


class RecordingStation(FakeStation):
    """Remembers the published limit when the station is asked to start."""

    limit_at_start: list[float | None]
    smart: SmartChargingProfile | None = None

    async def remote_start(self, id_tag: str, connector_id: int | None) -> bool:
        assert self.smart is not None
        self.limit_at_start.append(self.smart.limit(1))
        return await super().remote_start(id_tag, connector_id)


def recording_station() -> RecordingStation:
    station = RecordingStation()
    station.limit_at_start = []
    return station


async def test_remote_start_with_a_tx_profile_applies_it_from_the_first_ampere(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = recording_station()
    async with smart_rig(tmp_path, clock, station=station) as smart:
        station.smart = smart.sc
        cs = await smart.connect()
        tx = profile(9, purpose="TxProfile", kind="Relative", periods=((0, 11.0), (120, 7.0)))
        answer = await result(
            cs,
            "RemoteStartTransaction",
            {"idTag": "TAG1", "connectorId": 1, "chargingProfile": tx},
        )
        assert answer == ACCEPTED
        # Pending: in force before the station was asked to start.
        assert station.limit_at_start == [11.0]
        assert smart.sc.tx_profile_in_effect(1) is True
        await trio.sleep(30)  # the EV plugs in later
        begun = trio.current_time()
        await smart.begin()
        installed = smart.sc.profiles.get(9)
        assert installed is not None and installed.connector_id == 1
        smart.changes.clear()
        await trio.sleep(200)
        # Relative: counted from the transaction's start, not the RemoteStart.
        assert smart.changes == [(at(begun + 120), 7.0)]
        composite = await result(cs, "GetCompositeSchedule", {"connectorId": 1, "duration": 60})
        periods = composite["chargingSchedule"]["chargingSchedulePeriod"]
        assert periods == [{"startPeriod": 0, "limit": 7.0}]
        await smart.end()
        assert smart.sc.profiles.get(9) is None


@pytest.mark.parametrize(
    ("charging_profile", "why"),
    [
        (profile(9, purpose="TxDefaultProfile"), "not a TxProfile"),
        (profile(9, purpose="ChargePointMaxProfile"), "not a TxProfile"),
        (profile(9, purpose="TxProfile", transactionId=3), "names a transaction"),
        (profile(9, purpose="TxProfile", stack=9), "stack level"),
    ],
)
async def test_remote_start_with_an_unusable_profile_is_rejected_and_starts_nothing(
    tmp_path: Path, clock: trio.testing.MockClock, charging_profile: dict[str, Any], why: str
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        answer = await result(
            cs, "RemoteStartTransaction", {"idTag": "TAG1", "chargingProfile": charging_profile}
        )
        assert answer == REJECTED, why
        assert smart.rig.station.called("remote_start") == []
        assert cs.payloads("Authorize") == []  # refused before asking
        assert smart.sc.limit(1) is None


async def test_a_refused_remote_start_forgets_its_profile(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = FakeStation(remote_start_result=False)
    async with smart_rig(tmp_path, clock, station=station) as smart:
        cs = await smart.connect()
        tx = profile(9, purpose="TxProfile", kind="Relative", periods=((0, 11.0),))
        answer = await result(
            cs, "RemoteStartTransaction", {"idTag": "TAG1", "chargingProfile": tx}
        )
        assert answer == REJECTED
        assert smart.sc.limit(1) is None
        await smart.begin()  # a later transaction does not get it
        assert smart.sc.profiles.get(9) is None


async def test_a_pending_profile_lapses_with_connection_timeout(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock, settings={"ConnectionTimeOut": "60"}) as smart:
        cs = await smart.connect()
        tx = profile(9, purpose="TxProfile", kind="Relative", periods=((0, 11.0),))
        asked = trio.current_time()
        answer = await result(
            cs, "RemoteStartTransaction", {"idTag": "TAG1", "chargingProfile": tx}
        )
        assert answer == ACCEPTED
        assert smart.sc.limit(1) == 11.0
        await trio.sleep(100)  # nobody plugged in
        assert smart.changes[-1] == (at(asked + 60), None)
        await smart.begin()
        assert smart.sc.profiles.get(9) is None


# -- ClearChargingProfile (5.5) and GetCompositeSchedule (5.7) --------------------------------


async def test_clear_charging_profile_rules(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        for cid, item in [
            (0, profile(1, purpose="ChargePointMaxProfile", periods=((0, 20.0),))),
            (0, profile(2, stack=1)),
            (1, profile(3, stack=2, periods=((0, 12.0),))),
        ]:
            assert await set_profile(cs, cid, item) == ACCEPTED
        clear = "ClearChargingProfile"
        # Given fields are ANDed: nothing is a TxDefault on connector 1 at level 1.
        answer = await result(
            cs,
            clear,
            {"connectorId": 1, "chargingProfilePurpose": "TxDefaultProfile", "stackLevel": 1},
        )
        assert answer == {"status": "Unknown"}
        # The id alone decides (the other fields are ignored).
        answer = await result(cs, clear, {"id": 3, "connectorId": 0, "stackLevel": 5})
        assert answer == ACCEPTED
        assert smart.sc.limit(1) == 10.0
        assert await result(cs, clear, {"id": 3}) == {"status": "Unknown"}
        assert await result(cs, clear, {}) == ACCEPTED  # no field: all of them
        assert len(smart.sc.profiles) == 0
        assert smart.sc.limit(1) is None
        assert await result(cs, clear, {}) == {"status": "Unknown"}
        # Cleared for good: nothing left in the store either.
        with ProfileStore.open(tmp_path / "station.db") as other:
            assert other.load().entries == ()


async def test_get_composite_schedule_answers(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        t0 = await whole_second()
        assert (
            await set_profile(
                cs, 0, profile(1, purpose="ChargePointMaxProfile", periods=((0, 20.0),), start=t0)
            )
            == ACCEPTED
        )
        base = profile(2, periods=((0, 6.0), (100, 16.0), (200, 25.0)), start=t0, duration=400)
        assert await set_profile(cs, 1, base) == ACCEPTED
        got = await result(cs, "GetCompositeSchedule", {"connectorId": 1, "duration": 600})
        assert got["status"] == "Accepted" and got["connectorId"] == 1
        assert datetime.fromisoformat(got["scheduleStart"]) == virtual_wall()
        schedule = got["chargingSchedule"]
        assert schedule["chargingRateUnit"] == "A" and schedule["duration"] == 600
        # Capped by ChargePointMax (20 A) and by the station's own 32 A past 400 s.
        assert schedule["chargingSchedulePeriod"] == [
            {"startPeriod": 0, "limit": 6.0},
            {"startPeriod": 100, "limit": 16.0},
            {"startPeriod": 200, "limit": 20.0},
        ]
        # Connector 0 is the station; W on request (230 V x 3 phases).
        got = await result(
            cs,
            "GetCompositeSchedule",
            {"connectorId": 0, "duration": 150, "chargingRateUnit": "W"},
        )
        assert got["chargingSchedule"]["chargingRateUnit"] == "W"
        assert got["chargingSchedule"]["chargingSchedulePeriod"] == [
            {"startPeriod": 0, "limit": 4140.0},
            {"startPeriod": 100, "limit": 11040.0},
        ]
        # At most 24 h.
        got = await result(cs, "GetCompositeSchedule", {"connectorId": 1, "duration": 200_000})
        assert got["chargingSchedule"]["duration"] == 86_400
        assert await result(cs, "GetCompositeSchedule", {"connectorId": 2, "duration": 60}) == (
            REJECTED
        )
        # An unknown unit is a CALLERROR (the schema refuses it before the handler).
        cs.send_raw(
            '[2,"kw","GetCompositeSchedule",{"connectorId":1,"duration":60,"chargingRateUnit":"kW"}]'
        )
        frame = await cs.stray()
        assert frame[:3] == [4, "kw", "PropertyConstraintViolation"]


# -- persistence --------------------------------------------------------------------------


async def test_charge_point_max_and_tx_default_survive_a_restart_tx_profiles_do_not(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with smart_rig(tmp_path, clock) as smart:
        cs = await smart.connect()
        assert (
            await set_profile(
                cs, 0, profile(1, purpose="ChargePointMaxProfile", periods=((0, 20.0),))
            )
            == ACCEPTED
        )
        assert await set_profile(cs, 1, profile(2, periods=((0, 12.0),))) == ACCEPTED
        await smart.begin()
        tx = profile(3, purpose="TxProfile", stack=1, kind="Relative", periods=((0, 8.0),))
        assert await set_profile(cs, 1, tx) == ACCEPTED
        writes = smart.store.writes
        # Sent again unchanged: Accepted, nothing rewritten (no flash wear).
        assert await set_profile(cs, 1, profile(2, periods=((0, 12.0),))) == ACCEPTED
        assert smart.store.writes == writes
    # The restart: a new store and charge point on the same file.
    async with smart_rig(tmp_path, clock) as smart:
        assert [e.profile.id for e in smart.sc.profiles.entries] == [1, 2]
        assert smart.sc.limit(1) == 12.0
        assert smart.sc.tx_profile_in_effect(1) is False


class FailingStore(ProfileStore):
    fail = False

    def save(self, profiles: ProfileSet) -> bool:
        if self.fail:
            raise ProfileStoreError(str(self.path), "disk full")
        return super().save(profiles)


async def test_a_profile_that_cannot_be_saved_is_an_internal_error_and_changes_nothing(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    store = FailingStore.open(tmp_path / "station.db")
    assert isinstance(store, FailingStore)
    try:
        async with smart_rig(tmp_path, clock, store=store) as smart:
            cs = await smart.connect()
            assert await set_profile(cs, 0, profile(1, periods=((0, 16.0),))) == ACCEPTED
            store.fail = True
            answer = await cs.call(
                "SetChargingProfile",
                {"connectorId": 0, "csChargingProfiles": profile(1, periods=((0, 6.0),))},
            )
            assert isinstance(answer, CallErrorReceived) and answer.code == "InternalError"
            assert smart.sc.limit(1) == 16.0
            answer = await cs.call("ClearChargingProfile", {})
            assert isinstance(answer, CallErrorReceived) and answer.code == "InternalError"
            assert len(smart.sc.profiles) == 1
    finally:
        store.close()


class SlowStore(ProfileStore):
    """A save that waits (in its worker thread) until ``release`` is set."""

    entered: threading.Event | None = None
    release: threading.Event | None = None

    def save(self, profiles: ProfileSet) -> bool:
        if self.entered is not None and self.release is not None:
            self.entered.set()
            self.release.wait(10)
        return super().save(profiles)


async def test_a_transaction_that_ends_during_a_save_is_not_undone(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    store = SlowStore.open(tmp_path / "station.db")
    assert isinstance(store, SlowStore)
    try:
        async with smart_rig(tmp_path, clock, store=store) as smart:
            cs = await smart.connect()
            await smart.begin()
            tx = profile(5, purpose="TxProfile", stack=1, kind="Relative", periods=((0, 8.0),))
            assert await set_profile(cs, 1, tx) == ACCEPTED
            store.entered, store.release = threading.Event(), threading.Event()
            cs.send_call("SetChargingProfile", {"connectorId": 0, "csChargingProfiles": profile(1)})
            await trio.to_thread.run_sync(store.entered.wait, 10)
            await smart.end()  # while the TxDefault is being written
            assert smart.sc.profiles.get(5) is None
            store.release.set()
            answer = await cs.answer_to_call()
            assert isinstance(answer, CallResultReceived) and answer.payload == ACCEPTED
            # Decided again on the state after the end: the TxProfile stays gone.
            assert smart.sc.profiles.get(5) is None
            assert smart.sc.profiles.get(1) is not None
            assert smart.sc.limit(1) == 10.0
    finally:
        store.close()
