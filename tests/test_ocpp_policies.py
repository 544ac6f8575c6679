"""The charge point's pure parts, without sockets, trio or a clock: the status and
sampling policies (ocpp16/policy.py), the central system's clock
(ocpp16/clock.py), the profile registry (ocpp16/profiles), and the
dependency-free vocabulary the charging core imports."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ocpp16.clock import BOOT_ID, UNSYNCED, CentralClock
from ocpp16.policy import (
    NOTHING_TO_REPORT,
    REPORT_NOW,
    START_ORDER_PATIENCE,
    AlignedSchedule,
    StatusDecision,
    StatusPolicy,
    TransactionSampling,
    status_notification,
)
from ocpp16.profiles import FEATURE_PROFILES, Handler, Lifetime, Profiles, Task
from ocpp16.vocabulary import ErrorCode, Status

AVAILABLE = (Status.AVAILABLE.value, ErrorCode.NO_ERROR.value, "")
PREPARING = (Status.PREPARING.value, ErrorCode.NO_ERROR.value, "")
CHARGING = (Status.CHARGING.value, ErrorCode.NO_ERROR.value, "")
FAULTED = (Status.FAULTED.value, ErrorCode.GROUND_FAILURE.value, "rcd_trip")


# ------------------------------------------------------------------ status policy


def test_every_status_is_reported_once_and_again_after_a_reconnect() -> None:
    policy = StatusPolicy()
    assert policy.decide(1, AVAILABLE, now=0.0, minimum=0.0) == REPORT_NOW
    policy.reported(1, AVAILABLE)
    assert policy.decide(1, AVAILABLE, now=1.0, minimum=0.0) == NOTHING_TO_REPORT
    assert math.isinf(NOTHING_TO_REPORT.wait)
    # Connector 0 (the station) is a connector of its own.
    assert policy.decide(0, AVAILABLE, now=1.0, minimum=0.0) == REPORT_NOW
    policy.reconnected()
    assert policy.decide(1, AVAILABLE, now=2.0, minimum=0.0) == REPORT_NOW


def test_a_status_not_accepted_is_reported_again() -> None:
    policy = StatusPolicy()
    assert policy.decide(1, PREPARING, now=0.0, minimum=0.0).report
    # The StatusNotification failed: nothing was recorded as reported.
    assert policy.decide(1, PREPARING, now=5.0, minimum=0.0) == REPORT_NOW


def test_minimum_status_duration_hides_flicker_but_not_faults() -> None:
    policy = StatusPolicy()
    policy.reported(1, AVAILABLE)
    assert policy.decide(1, AVAILABLE, now=0.0, minimum=10.0) == NOTHING_TO_REPORT
    # Preparing at 20, back to Available at 25: never held 10 s, never reported.
    assert policy.decide(1, PREPARING, now=20.0, minimum=10.0) == StatusDecision(False, 10.0)
    assert policy.decide(1, PREPARING, now=24.0, minimum=10.0) == StatusDecision(False, 6.0)
    assert policy.decide(1, AVAILABLE, now=25.0, minimum=10.0) == NOTHING_TO_REPORT
    # Preparing again at 30: it counts from 30, not from 20.
    assert policy.decide(1, PREPARING, now=30.0, minimum=10.0) == StatusDecision(False, 10.0)
    assert policy.decide(1, PREPARING, now=40.0, minimum=10.0) == REPORT_NOW
    policy.reported(1, PREPARING)
    # A fault is reported at once, whatever MinimumStatusDuration says.
    assert policy.decide(1, FAULTED, now=50.0, minimum=10.0) == REPORT_NOW


def test_a_changed_info_or_error_code_is_a_new_status() -> None:
    policy = StatusPolicy()
    policy.reported(1, FAULTED)
    other = (Status.FAULTED.value, ErrorCode.GROUND_FAILURE.value, "rcd_trip, board_error")
    assert policy.decide(1, other, now=0.0, minimum=60.0) == REPORT_NOW


@pytest.mark.parametrize("status", list(Status))
def test_only_transaction_statuses_follow_the_start(status: Status) -> None:
    expected = status in (Status.CHARGING, Status.SUSPENDED_EV, Status.SUSPENDED_EVSE)
    assert StatusPolicy.follows_start((status.value, "NoError", "")) is expected


def test_a_transaction_status_waits_for_the_start_answer_only_so_long() -> None:
    policy = StatusPolicy()
    # First look at 5: ask the queue; the Start is unanswered: wait the patience.
    assert policy.ask_queue(5.0)
    assert policy.start_wait(5.0, start_pending=True) == START_ORDER_PATIENCE
    assert policy.ask_queue(8.0)
    assert policy.start_wait(8.0, start_pending=True) == 7.0
    # Patience over at 15: reported without asking (a stuck queue hides nothing).
    assert not policy.ask_queue(15.0)
    # The next transaction status waits afresh.
    assert policy.ask_queue(16.0)
    assert policy.start_wait(16.0, start_pending=True) == START_ORDER_PATIENCE


def test_an_answered_start_lets_the_status_go_and_resets_the_patience() -> None:
    policy = StatusPolicy()
    assert policy.ask_queue(5.0)
    assert policy.start_wait(5.0, start_pending=True) == 10.0
    assert policy.ask_queue(8.0)
    assert policy.start_wait(8.0, start_pending=False) is None
    assert policy.ask_queue(14.0)
    assert policy.start_wait(14.0, start_pending=True) == 10.0


def test_the_start_wait_counts_from_time_zero_too() -> None:
    # trio's MockClock starts at 0.0: a wait begun then is not "no wait at all".
    policy = StatusPolicy()
    assert policy.ask_queue(0.0)
    assert policy.start_wait(3.0, start_pending=True) == 7.0
    assert not policy.ask_queue(10.0)


def test_status_notification_payload() -> None:
    assert status_notification(1, AVAILABLE, "2026-05-01T09:00:00.000Z") == {
        "connectorId": 1,
        "status": "Available",
        "errorCode": "NoError",
        "timestamp": "2026-05-01T09:00:00.000Z",
    }
    long_info = (Status.FAULTED.value, ErrorCode.OTHER_ERROR.value, "x" * 80)
    payload = status_notification(0, long_info, "t")
    assert payload["info"] == "x" * 50  # CiString50Type


# ------------------------------------------------------------------ sampling


def test_periodic_samples_count_from_each_transactions_start() -> None:
    sampling = TransactionSampling()
    assert sampling.next_due(0.0, 60) is None  # no transaction
    sampling.begin(1, 100.0)
    assert sampling.next_due(100.0, 0) is None  # MeterValueSampleInterval 0: none
    assert sampling.next_due(100.0, 60) == (160.0, 1)
    assert sampling.next_due(159.9, 60) == (160.0, 1)
    assert sampling.next_due(160.0, 60) == (220.0, 1)  # at a due time: the next one
    sampling.begin(2, 130.0)
    assert sampling.next_due(161.0, 60) == (190.0, 2)
    assert sampling.next_due(161.0, 30) == (190.0, 1)  # a tie: the older transaction
    sampling.end(2)
    assert sampling.next_due(161.0, 60) == (220.0, 1)


def test_stop_txn_sampled_data_is_collected_per_transaction() -> None:
    sampling = TransactionSampling()
    first: dict[str, Any] = {"timestamp": "begin"}
    sampling.begin(1, 0.0, first)
    sampling.add(1, {"timestamp": "p1"})
    sampling.begin(2, 0.0)
    sampling.add(2, {"timestamp": "other"})
    sampling.add(1, {"timestamp": "p2"})
    assert sampling.end(1) == [first, {"timestamp": "p1"}, {"timestamp": "p2"}]
    assert sampling.end(1) == []
    assert sampling.next_due(0.0, 60) == (60.0, 2)
    # A reading of a transaction begun before this boot is still collected.
    sampling.add(7, {"timestamp": "x"})
    assert sampling.end(7) == [{"timestamp": "x"}]


def test_clock_aligned_boundaries_each_once() -> None:
    schedule = AlignedSchedule()
    now = datetime(2026, 5, 1, 8, 58, 20, tzinfo=UTC)
    nine = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    assert schedule.next(now, 900) == nine
    schedule.read(nine)
    assert schedule.next(nine, 900) == nine + timedelta(minutes=15)
    # The clock steps back 2 s after the 9:00 reading: 9:00 is not read again.
    assert schedule.next(nine - timedelta(seconds=2), 900) == nine + timedelta(minutes=15)
    assert AlignedSchedule().next(nine - timedelta(seconds=2), 900) == nine


# ------------------------------------------------------------------ the clock


class Wall:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def test_the_clock_follows_the_central_systems_current_time() -> None:
    wall = Wall(datetime(1970, 1, 1, 0, 10, tzinfo=UTC))
    clock = CentralClock(wall)
    assert clock.now() == wall.at
    for bad in (None, 5, "yesterday", "2026-11-22T12:00:00"):  # no zone: ignored too
        assert not clock.set(bad)
    assert clock.now() == wall.at
    assert clock.set("2026-11-22T12:00:00Z")  # first set: a step
    assert clock.now() == datetime(2026, 11, 22, 12, tzinfo=UTC)
    first = clock.now() - wall.at
    wall.at += timedelta(seconds=10)
    assert not clock.set("2026-11-22T12:00:10.500Z")  # 0.5 s: no step
    assert clock.set("2026-11-22T12:00:05Z")  # 5 s back: a step
    assert clock.synced_offset == first  # the first offset stays for old stamps
    assert clock.now() - wall.at == first - timedelta(seconds=5)
    assert clock.to_station(clock.now()) == wall.at


def test_a_time_taken_before_the_clock_is_set_is_marked_then_corrected() -> None:
    wall = Wall(datetime(1970, 1, 1, 0, 10, tzinfo=UTC))
    clock = CentralClock(wall)
    payload: dict[str, Any] = {"meterValue": [{}]}
    payload["timestamp"] = clock.stamp(wall.at, payload)
    payload["meterValue"][0]["timestamp"] = clock.stamp(wall.at, payload["meterValue"][0])
    assert payload[UNSYNCED] == payload["meterValue"][0][UNSYNCED] == BOOT_ID
    clock.set("2026-11-22T12:00:00Z")
    sent = clock.prepare("MeterValues", payload)
    assert sent == {
        "timestamp": "2026-11-22T12:00:00.000Z",
        "meterValue": [{"timestamp": "2026-11-22T12:00:00.000Z"}],
    }
    # Once set, a time is converted as it is taken, and not marked.
    later: dict[str, Any] = {}
    assert clock.stamp(wall.at + timedelta(minutes=1), later) == "2026-11-22T12:01:00.000Z"
    assert later == {}


# ------------------------------------------------------------------ profiles


async def _answer(payload: dict[str, Any]) -> dict[str, Any]:
    return {}


async def _forever() -> None:
    raise AssertionError("not started by these tests")


class FakeProfile:
    def __init__(self, name: str, actions: Sequence[str], tasks: Sequence[Task] = ()) -> None:
        self.name = name
        self.handlers: Mapping[str, Handler] = dict.fromkeys(actions, _answer)
        self._tasks = tuple(tasks)

    def tasks(self) -> Sequence[Task]:
        return self._tasks


def test_supported_feature_profiles_are_the_registered_ones_in_ocpp_order() -> None:
    profiles = Profiles()
    assert profiles.supported == ""
    profiles.register(FakeProfile("RemoteTrigger", ["TriggerMessage"]))
    profiles.register(FakeProfile("Core", ["Reset"]))
    profiles.register(FakeProfile("Reservation", ["ReserveNow", "CancelReservation"]))
    assert profiles.names == ("Core", "Reservation", "RemoteTrigger")
    assert profiles.supported == "Core,Reservation,RemoteTrigger"
    assert set(profiles.names) <= set(FEATURE_PROFILES)
    # A name OCPP 1.6 does not list (a later Security extension) comes last.
    profiles.register(FakeProfile("Security", ["ExtendedTriggerMessage"]))
    assert profiles.supported == "Core,Reservation,RemoteTrigger,Security"


def test_a_profile_answers_only_its_own_actions() -> None:
    profiles = Profiles()
    profiles.register(FakeProfile("Core", ["Reset"]))
    assert profiles.handler("Reset") is _answer
    assert profiles.handler("ReserveNow") is None


def test_a_profile_or_an_action_is_registered_once() -> None:
    profiles = Profiles()
    profiles.register(FakeProfile("Core", ["Reset"]))
    with pytest.raises(ValueError, match="registered twice"):
        profiles.register(FakeProfile("Core", ["ClearCache"]))
    with pytest.raises(ValueError, match="Reset is handled by Core"):
        profiles.register(FakeProfile("SmartCharging", ["SetChargingProfile", "Reset"]))
    with pytest.raises(ValueError, match="not a SupportedFeatureProfiles item"):
        profiles.register(FakeProfile("Core,Reservation", ["ReserveNow"]))
    # A refused profile left nothing behind.
    assert profiles.supported == "Core"
    assert profiles.handler("SetChargingProfile") is None


def test_tasks_by_lifetime_in_registration_order() -> None:
    profiles = Profiles()
    core = FakeProfile(
        "Core",
        [],
        [Task("status", _forever), Task("meter values", _forever, Lifetime.CHARGE_POINT)],
    )
    profiles.register(core)
    profiles.register(FakeProfile("SmartCharging", [], [Task("limits", _forever)]))
    assert [t.name for t in profiles.tasks(Lifetime.CONNECTION)] == ["status", "limits"]
    assert [t.name for t in profiles.tasks(Lifetime.CHARGE_POINT)] == ["meter values"]
    assert [p.name for p in profiles] == ["Core", "SmartCharging"]


# ------------------------------------------------------------------ dependency-free


#: What the charging core must load without: the event loop, the Modbus stack,
#: pyserial, and the OCPP/WebSocket stack.
POISONED = ("trio", "pymodbus", "serial", "ocpp", "jsonschema", "trio_websocket")


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize(
    "module", ["evse.connector", "ocpp16.vocabulary", "fieldbus.signals", "ocpp16.policy"]
)
def test_sans_io_modules_import_without_trio_pymodbus_or_serial(module: str) -> None:
    code = "\n".join(
        [
            "import sys",
            # None in sys.modules makes every import of the name fail.
            *(f"sys.modules[{name!r}] = None" for name in POISONED),
            f"import {module}",
            "print('imported')",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


def test_the_charging_core_uses_the_one_vocabulary() -> None:
    from evse import connector  # noqa: PLC0415
    from fieldbus import boards, signals  # noqa: PLC0415

    assert connector.Status is Status
    assert connector.ErrorCode is ErrorCode
    assert boards.PilotState is signals.PilotState
    assert boards.BoardFault is signals.BoardFault
