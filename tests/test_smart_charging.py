"""OCPP 1.6 Smart Charging core (ocpp16/smart_charging.py): table-driven, no sockets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocpp16.errors import CallError
from ocpp16.schemas import parse_date_time, validate_request, validate_response
from ocpp16.smart_charging import (
    ChargingProfile,
    ProfileRejected,
    ProfileSet,
    SmartChargingConfig,
    Transaction,
    UnknownConnector,
    UnsupportedRateUnit,
    format_time,
    parse_profile,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LOCAL = 32.0  # the station's own maximum in composite() calls


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def payload(
    profile_id: int = 1,
    *,
    stack: int = 0,
    purpose: str = "TxDefaultProfile",
    kind: str = "Absolute",
    periods: tuple[tuple[int, float], ...] = ((0, 16.0),),
    duration: int | None = None,
    start: datetime | None = T0,
    unit: str = "A",
    **extra: Any,
) -> dict[str, Any]:
    """A csChargingProfiles object; ``start`` is dropped for Relative profiles."""
    schedule: dict[str, Any] = {
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    if duration is not None:
        schedule["duration"] = duration
    if start is not None and kind != "Relative":
        schedule["startSchedule"] = format_time(start)
    out: dict[str, Any] = {
        "chargingProfileId": profile_id,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
    }
    out.update(extra)
    return out


def install(
    *items: tuple[int, dict[str, Any]],
    now: datetime = T0,
    transactions: Mapping[int, int | None] | None = None,
    config: SmartChargingConfig | None = None,
) -> ProfileSet:
    """A set with every (connectorId, profile) installed; each must be Accepted."""
    profiles = ProfileSet() if config is None else ProfileSet(config)
    for connector_id, item in items:
        result = profiles.set_profile(connector_id, item, now=now, transactions=transactions)
        assert result.accepted, result.reason
        profiles = result.profiles
    return profiles


# -- stacking: a higher level until its schedule ends, then the lower one -----------

STACKED = install(
    (1, payload(1, stack=0, periods=((0, 6.0), (100, 8.0), (200, 10.0)), duration=400)),
    (1, payload(2, stack=1, periods=((0, 16.0),), duration=150)),
)


@pytest.mark.parametrize(
    ("second", "limit", "next_change"),
    [
        (-1, None, 0),  # before both schedules start
        (0, 16.0, 100),  # level 1; level 0's own boundary at 100 may be reported
        (99.5, 16.0, 100),
        (100, 16.0, 150),
        (149.999, 16.0, 150),
        (150, 8.0, 200),  # level 1's duration is over: level 0's period from 100 s
        (199, 8.0, 200),
        (200, 10.0, 400),
        (399, 10.0, 400),
        (400, None, None),  # level 0's duration is over too: unconstrained for ever
        (10_000, None, None),
    ],
)
def test_higher_stack_level_until_its_duration_ends(
    second: float, limit: float | None, next_change: float | None
) -> None:
    assert STACKED.limit_at(at(second), 1) == limit
    expected = None if next_change is None else at(next_change)
    assert STACKED.next_change(at(second), 1) == expected


def test_same_stack_from_a_later_instant_in_another_time_zone() -> None:
    # Aware datetimes in any zone mean the same instant.
    plus2 = timezone(timedelta(hours=2))
    assert STACKED.limit_at(at(160).astimezone(plus2), 1) == 8.0
    assert STACKED.next_change(at(160).astimezone(plus2), 1) == at(200)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        STACKED.limit_at(datetime(2024, 5, 1, 12, 0), 1)


# -- Recurring Daily across midnight --------------------------------------------------

EVENING = datetime(2024, 5, 1, 22, 0, tzinfo=UTC)
DAILY = install(
    (
        0,
        payload(
            7,
            purpose="ChargePointMaxProfile",
            kind="Recurring",
            recurrencyKind="Daily",
            start=EVENING,
            duration=4 * 3600,  # 22:00 to 02:00
            periods=((0, 10.0), (3600, 8.0), (7200, 6.0), (90_000, 1.0)),  # the last: never
        ),
    ),
)


def utc(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2024, 5, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("when", "limit", "next_change"),
    [
        (utc(1, 21, 59), None, utc(1, 22)),  # before the first startSchedule
        (utc(1, 22), 10.0, utc(1, 23)),
        (utc(1, 23, 30), 8.0, utc(2, 0)),
        (utc(2, 0), 6.0, utc(2, 2)),  # after midnight: still the run of May 1st
        (utc(2, 1, 59, 59), 6.0, utc(2, 2)),
        (utc(2, 2), None, utc(2, 22)),  # the run is over until 22:00
        (utc(2, 12), None, utc(2, 22)),
        (utc(2, 22, 30), 10.0, utc(2, 23)),  # every 24 h from startSchedule
        (utc(3, 0, 10), 6.0, utc(3, 2)),
        (utc(30, 23, 0), 8.0, utc(31, 0)),
    ],
)
def test_daily_recurring_profile_across_midnight(
    when: datetime, limit: float | None, next_change: datetime
) -> None:
    assert DAILY.limit_at(when, 1) == limit
    assert DAILY.next_change(when, 1) == next_change


def test_weekly_recurrence_counts_seven_days_from_start_schedule() -> None:
    weekly = install(
        (
            1,
            payload(1, kind="Recurring", recurrencyKind="Weekly", start=T0, periods=((0, 7.0),)),
        ),
        (
            1,
            payload(2, stack=1, kind="Recurring", recurrencyKind="Weekly", start=T0, duration=60),
        ),
    )
    week = 7 * 86400
    assert weekly.limit_at(at(30), 1) == 16.0
    assert weekly.limit_at(at(60), 1) == 7.0  # no duration: the whole week
    assert weekly.limit_at(at(week - 1), 1) == 7.0
    assert weekly.limit_at(at(week + 30), 1) == 16.0
    assert weekly.next_change(at(60), 1) == at(week)


# -- Relative TxDefault ------------------------------------------------------------------

RELATIVE = install(
    (1, payload(3, kind="Relative", periods=((0, 16.0), (600, 10.0)), duration=1200)),
)


@pytest.mark.parametrize(
    ("second", "tx_start", "limit", "next_change"),
    [
        (300, T0, 16.0, at(600)),
        (600, T0, 10.0, at(1200)),
        (1199, T0, 10.0, at(1200)),
        (1200, T0, None, None),
        (900, at(500), 16.0, at(1100)),  # counted from this transaction's start
        (300, None, None, None),  # no transaction: a Relative profile does not apply
        (400, at(500), None, at(500)),  # the transaction starts later (clock set back)
    ],
)
def test_relative_tx_default_counts_from_the_transaction_start(
    second: float, tx_start: datetime | None, limit: float | None, next_change: datetime | None
) -> None:
    assert RELATIVE.limit_at(at(second), 1, tx_start) == limit
    assert RELATIVE.next_change(at(second), 1, tx_start) == next_change


# -- replacement ------------------------------------------------------------------------


def test_replacement_with_a_future_valid_from_replaces_at_once() -> None:
    base = install(
        (1, payload(1, stack=0, periods=((0, 6.0),))),
        (1, payload(2, stack=1, periods=((0, 16.0),))),
    )
    result = base.set_profile(
        1, payload(2, stack=1, periods=((0, 10.0),), validFrom=format_time(at(3600))), now=T0
    )
    assert result.accepted and result.removed == (2,)
    profiles = result.profiles
    # The old level-1 profile is gone now; until validFrom the level below applies.
    assert profiles.limit_at(at(60), 1) == 6.0
    assert profiles.next_change(at(60), 1) == at(3600)
    assert profiles.limit_at(at(3600), 1) == 10.0
    assert len(profiles) == 2


@pytest.mark.parametrize(
    ("connector_id", "update", "replaced"),
    [
        pytest.param(1, payload(1, stack=3, periods=((0, 9.0),)), (1,), id="same-id"),
        pytest.param(1, payload(5, stack=0, periods=((0, 9.0),)), (1,), id="same-level-purpose"),
        pytest.param(0, payload(5, stack=0), (), id="same-level-other-connector"),
        pytest.param(1, payload(5, stack=1), (), id="other-level"),
        pytest.param(
            1, payload(2, stack=0, periods=((0, 9.0),)), (1, 2), id="id-and-slot-replace-two"
        ),
    ],
)
def test_replacement_rule(
    connector_id: int, update: dict[str, Any], replaced: tuple[int, ...]
) -> None:
    profiles = install(
        (1, payload(1, stack=0)),
        (0, payload(2, stack=2, purpose="ChargePointMaxProfile", periods=((0, 20.0),))),
    )
    result = profiles.set_profile(connector_id, update, now=T0)
    assert result.accepted
    assert result.removed == replaced
    assert {e.profile.id for e in result.profiles.entries} == (
        {1, 2} - set(replaced) | {update["chargingProfileId"]}
    )


def test_nine_profiles_then_a_tenth_is_rejected_and_a_resend_accepted() -> None:
    items = [(0, payload(i, stack=i, purpose="ChargePointMaxProfile")) for i in range(6)]
    items += [(1, payload(10 + i, stack=i)) for i in range(3)]
    profiles = install(*items)
    assert len(profiles) == 9
    tenth = profiles.set_profile(1, payload(99, stack=4), now=T0)
    assert not tenth.accepted
    assert tenth.conf() == {"status": "Rejected"}
    assert "MaxChargingProfilesInstalled" in (tenth.reason or "")
    assert tenth.profiles is profiles
    again = profiles.set_profile(1, payload(11, stack=1, periods=((0, 7.0),)), now=T0)
    assert again.accepted and again.conf() == {"status": "Accepted"}
    assert len(again.profiles) == 9
    # A new id in an occupied slot replaces, so the count stays 9: Accepted.
    slot = profiles.set_profile(1, payload(98, stack=2), now=T0)
    assert slot.accepted and len(slot.profiles) == 9 and slot.removed == (12,)


def test_expired_profiles_do_not_count_and_are_dropped() -> None:
    items = [
        (0, payload(i, stack=i, purpose="ChargePointMaxProfile", validTo=format_time(at(60))))
        for i in range(6)
    ]
    items += [(1, payload(10 + i, stack=i)) for i in range(3)]
    profiles = install(*items)
    later = profiles.set_profile(1, payload(99, stack=4), now=at(61))
    assert later.accepted
    assert {e.profile.id for e in later.profiles.entries} == {10, 11, 12, 99}
    assert later.removed == (0, 1, 2, 3, 4, 5)


def test_a_rejected_update_keeps_the_old_profile() -> None:
    profiles = install((1, payload(1, periods=((0, 12.0),))))
    bad = payload(1, periods=((0, 6.0),), unit="W")
    result = profiles.set_profile(1, bad, now=T0)
    assert not result.accepted
    assert result.profiles is profiles
    assert result.profiles.limit_at(at(10), 1) == 12.0


# -- validation ---------------------------------------------------------------------------


def _without_start(p: dict[str, Any]) -> dict[str, Any]:
    del p["chargingSchedule"]["startSchedule"]
    return p


def _schedule(**fields: Any) -> dict[str, Any]:
    p = payload(1)
    p["chargingSchedule"].update(fields)
    return p


def _periods(*periods: dict[str, Any]) -> dict[str, Any]:
    return _schedule(chargingSchedulePeriod=list(periods))


REJECTIONS = [
    pytest.param(2, payload(1), "connectors 0..1", id="unknown-connector"),
    pytest.param(-1, payload(1), "connectors 0..1", id="negative-connector"),
    pytest.param(1, payload(1, stack=6), "ChargeProfileMaxStackLevel", id="stack-above-5"),
    pytest.param(1, payload(1, stack=-1), "ChargeProfileMaxStackLevel", id="stack-negative"),
    pytest.param(
        1, payload(1, purpose="ChargePointMaxProfile"), "only connector 0", id="cpmax-on-1"
    ),
    pytest.param(0, payload(1, purpose="TxProfile"), "connector 0", id="txprofile-on-0"),
    pytest.param(
        1, payload(1, transactionId=42), "only valid for a TxProfile", id="txid-on-default"
    ),
    pytest.param(1, payload(1, kind="Recurring"), "recurrencyKind", id="recurring-no-kind"),
    pytest.param(
        1,
        _without_start(payload(1, kind="Recurring", recurrencyKind="Daily")),
        "startSchedule",
        id="recurring-no-start",
    ),
    pytest.param(1, payload(1, start=None), "startSchedule", id="absolute-no-start"),
    pytest.param(
        1, payload(1, recurrencyKind="Daily"), "only for Recurring", id="recurrency-on-absolute"
    ),
    pytest.param(
        1,
        _schedule(startSchedule=format_time(T0)) | {"chargingProfileKind": "Relative"},
        "relative to the transaction",
        id="relative-with-start",
    ),
    pytest.param(
        0,
        payload(1, purpose="ChargePointMaxProfile", kind="Relative"),
        "no transaction to count from",
        id="relative-cpmax",
    ),
    pytest.param(1, payload(1, unit="W"), "ChargingScheduleAllowedChargingRateUnit", id="watts"),
    pytest.param(1, payload(1, unit="kW"), "not one of", id="unknown-unit"),
    pytest.param(1, payload(1, periods=((10, 6.0),)), "first period starts at 0", id="first-not-0"),
    pytest.param(
        1, payload(1, periods=((0, 6.0), (100, 7.0), (100, 8.0))), "strictly", id="equal-starts"
    ),
    pytest.param(
        1, payload(1, periods=((0, 6.0), (100, 7.0), (50, 8.0))), "strictly", id="decreasing"
    ),
    pytest.param(
        1,
        payload(1, periods=tuple((i * 60, 6.0) for i in range(6))),
        "ChargingScheduleMaxPeriods",
        id="six-periods",
    ),
    pytest.param(1, _periods(), "ChargingScheduleMaxPeriods", id="no-periods"),
    pytest.param(1, _periods({"startPeriod": 0, "limit": -1.0}), ">= 0", id="negative-limit"),
    pytest.param(1, _periods({"startPeriod": 0, "limit": math.inf}), "finite", id="infinite-limit"),
    pytest.param(
        1,
        _periods({"startPeriod": 0, "limit": 6.0, "numberPhases": 4}),
        "numberPhases",
        id="four-phases",
    ),
    pytest.param(1, _schedule(duration=0), "duration", id="zero-duration"),
    pytest.param(1, _schedule(minChargingRate=-0.1), "minChargingRate", id="negative-min-rate"),
    pytest.param(
        1,
        payload(1, validFrom=format_time(at(60)), validTo=format_time(at(60))),
        "never valid",
        id="valid-to-not-after-from",
    ),
    pytest.param(1, payload(1, validFrom="yesterday"), "validFrom", id="bad-date"),
    pytest.param(
        1, payload(1, validFrom="2024-05-01T12:00:00"), "time zone", id="date-without-zone"
    ),
    pytest.param(1, payload(1) | {"stackLevel": True}, "not an integer", id="bool-stack-level"),
    pytest.param(1, payload(1) | {"extra": 1}, "not allowed", id="extra-field"),
    pytest.param(1, {"chargingProfileId": 1}, "required", id="missing-fields"),
    pytest.param(
        1, payload(1) | {"chargingProfilePurpose": "Max"}, "not one of", id="unknown-purpose"
    ),
    pytest.param(1, [], "not an object", id="not-an-object"),
]


@pytest.mark.parametrize(("connector_id", "profile", "reason"), REJECTIONS)
def test_validation_rejections(connector_id: int, profile: object, reason: str) -> None:
    profiles = install((1, payload(50, stack=5)))
    result = profiles.set_profile(connector_id, profile, now=T0)
    assert not result.accepted
    assert reason in (result.reason or ""), result.reason
    assert result.profiles is profiles
    with pytest.raises(ProfileRejected):
        parse_profile(connector_id, profile)


@pytest.mark.parametrize(
    ("transactions", "extra", "reason"),
    [
        pytest.param(None, {}, "no transaction runs on connector 1", id="no-transaction"),
        pytest.param({2: 5}, {}, "no transaction runs on connector 1", id="other-connector"),
        pytest.param({1: 41}, {"transactionId": 42}, "is 41", id="other-transaction"),
        pytest.param({1: None}, {"transactionId": 42}, "not known yet", id="id-not-known"),
    ],
)
def test_tx_profile_needs_its_transaction(
    transactions: Mapping[int, int | None] | None, extra: dict[str, Any], reason: str
) -> None:
    config = SmartChargingConfig(number_of_connectors=2)
    tx = payload(1, purpose="TxProfile", **extra)
    result = ProfileSet(config).set_profile(1, tx, now=T0, transactions=transactions)
    assert not result.accepted
    assert reason in (result.reason or ""), result.reason


def test_valid_to_already_past_is_rejected() -> None:
    result = ProfileSet().set_profile(1, payload(1, validTo=format_time(at(-1))), now=T0)
    assert not result.accepted and "validTo has passed" in (result.reason or "")


# -- the W rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number_phases", [None, 1, 3], ids=["phases-absent", "one-phase", "three-phases"]
)
def test_w_profiles_are_rejected_not_converted(number_phases: int | None) -> None:
    period: dict[str, Any] = {"startPeriod": 0, "limit": 11040.0}
    if number_phases is not None:
        period["numberPhases"] = number_phases
    profile = payload(1, unit="W")
    profile["chargingSchedule"]["chargingSchedulePeriod"] = [period]
    validate_request("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": profile})
    result = ProfileSet().set_profile(1, profile, now=T0)
    assert result.conf() == {"status": "Rejected"}
    assert "ChargingScheduleAllowedChargingRateUnit = Current" in (result.reason or "")
    assert len(result.profiles) == 0


# -- TxProfile lifecycle ---------------------------------------------------------------------


def test_tx_profile_overrides_tx_default_and_goes_with_its_transaction() -> None:
    profiles = install(
        (0, payload(1, stack=5, periods=((0, 20.0),))),  # station-wide default
        (1, payload(2, stack=0, periods=((0, 14.0),))),  # the connector's own: overrides
        (0, payload(3, purpose="ChargePointMaxProfile", periods=((0, 30.0),))),
    )
    assert profiles.limit_at(at(10), 1) == 14.0
    result = profiles.set_profile(
        1,
        payload(4, purpose="TxProfile", kind="Relative", periods=((0, 25.0), (60, 8.0))),
        now=at(5),
        transactions={1: 42},
    )
    assert result.accepted
    with_tx = result.profiles
    entry = with_tx.get(4)
    assert entry is not None and entry.transaction_id == 42
    assert with_tx.limit_at(at(10), 1, T0, 42) == 25.0
    assert with_tx.limit_at(at(60), 1, T0, 42) == 8.0
    # Not for another transaction, nor without one.
    assert with_tx.limit_at(at(10), 1, T0, 43) == 14.0
    assert with_tx.limit_at(at(10), 1) == 14.0
    assert [e.profile.id for e in with_tx.persistent()] == [1, 2, 3]
    absolute = with_tx.set_profile(
        1, payload(4, purpose="TxProfile", periods=((0, 9.0),)), now=at(5), transactions={1: 42}
    ).profiles
    assert absolute.limit_at(at(10), 1, T0, 42) == 9.0
    assert absolute.limit_at(at(10), 1) == 14.0  # an Absolute TxProfile too needs the transaction
    # A late end of an older transaction leaves it; its own end removes it.
    assert with_tx.transaction_ended(1, 41) is with_tx
    ended = with_tx.transaction_ended(1, 42)
    assert ended.get(4) is None and len(ended) == 3
    assert ended.limit_at(at(10), 1, T0, 42) == 14.0


def test_tx_profile_set_before_the_id_is_known_is_bound_later() -> None:
    result = ProfileSet().set_profile(
        1, payload(1, purpose="TxProfile"), now=T0, transactions={1: None}
    )
    assert result.accepted
    unbound = result.profiles
    assert unbound.entries[0].transaction_id is None
    assert unbound.limit_at(at(1), 1, T0, None) == 16.0
    bound = unbound.bind_transaction(1, 77)
    assert bound.entries[0].transaction_id == 77
    assert bound.transaction_ended(1, 76) is bound
    assert len(bound.transaction_ended(1)) == 0


def test_tx_default_of_connector_zero_applies_where_the_connector_has_none_in_effect() -> None:
    profiles = install(
        (0, payload(1, periods=((0, 20.0),))),
        (1, payload(2, periods=((0, 10.0),), validFrom=format_time(at(100)))),
    )
    assert profiles.limit_at(at(50), 1) == 20.0
    assert profiles.limit_at(at(100), 1) == 10.0


# -- ClearChargingProfile (§5.5) -------------------------------------------------------------

CLEARABLE = install(
    (0, payload(1, stack=0, purpose="ChargePointMaxProfile")),
    (0, payload(2, stack=1, purpose="ChargePointMaxProfile")),
    (0, payload(3, stack=0)),
    (1, payload(4, stack=0)),
    (1, payload(5, stack=1)),
    (1, payload(6, stack=1, purpose="TxProfile")),
    transactions={1: 42},
)


@pytest.mark.parametrize(
    ("request_payload", "cleared"),
    [
        pytest.param({}, {1, 2, 3, 4, 5, 6}, id="no-fields-all"),
        pytest.param({"id": 4}, {4}, id="id"),
        pytest.param(
            {"id": 4, "connectorId": 0, "chargingProfilePurpose": "TxProfile", "stackLevel": 5},
            {4},
            id="id-ignores-the-rest",
        ),
        pytest.param({"id": 99, "connectorId": 1}, set(), id="unknown-id-even-if-rest-matches"),
        pytest.param({"connectorId": 0}, {1, 2, 3}, id="connector-0-is-its-own"),
        pytest.param({"connectorId": 1}, {4, 5, 6}, id="connector"),
        pytest.param({"chargingProfilePurpose": "TxDefaultProfile"}, {3, 4, 5}, id="purpose"),
        pytest.param({"stackLevel": 1}, {2, 5, 6}, id="stack-level"),
        pytest.param(
            {"connectorId": 1, "chargingProfilePurpose": "TxDefaultProfile"},
            {4, 5},
            id="connector-and-purpose",
        ),
        pytest.param(
            {"chargingProfilePurpose": "ChargePointMaxProfile", "stackLevel": 1},
            {2},
            id="purpose-and-level",
        ),
        pytest.param(
            {"connectorId": 1, "chargingProfilePurpose": "TxDefaultProfile", "stackLevel": 0},
            {4},
            id="all-three",
        ),
        pytest.param(
            {"connectorId": 0, "chargingProfilePurpose": "TxProfile"}, set(), id="nothing-matched"
        ),
        pytest.param({"connectorId": 2}, set(), id="no-such-connector"),
    ],
)
def test_clear_charging_profile(request_payload: dict[str, Any], cleared: set[int]) -> None:
    validate_request("ClearChargingProfile", request_payload)
    result = CLEARABLE.clear_request(request_payload)
    assert result.conf() == {"status": "Accepted" if cleared else "Unknown"}
    assert set(result.removed) == cleared
    left = {e.profile.id for e in result.profiles.entries}
    assert left == {1, 2, 3, 4, 5, 6} - cleared
    if not cleared:
        assert result.profiles is CLEARABLE


# -- GetCompositeSchedule (§5.7) ---------------------------------------------------------------


def test_composite_of_the_stacked_example() -> None:
    composite = STACKED.composite(at(0.7), 1, 600, local_limit=LOCAL)
    conf = composite.conf()
    validate_response("GetCompositeSchedule", conf)
    assert conf == {
        "status": "Accepted",
        "connectorId": 1,
        "scheduleStart": "2024-05-01T12:00:00Z",  # the window starts at the whole second
        "chargingSchedule": {
            "duration": 600,
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [
                {"startPeriod": 0, "limit": 16.0},
                {"startPeriod": 150, "limit": 8.0},
                {"startPeriod": 200, "limit": 10.0},
                {"startPeriod": 400, "limit": LOCAL},  # no profile: the local limit
            ],
        },
    }


def test_composite_periods_are_relative_to_the_window_start() -> None:
    composite = STACKED.composite(at(120), 1, 200, "A", local_limit=LOCAL)
    assert composite.schedule_start == at(120)
    assert composite.periods == ((0, 16.0), (30, 8.0), (80, 10.0))  # cut at the window end


@pytest.mark.parametrize(
    ("asked", "given"), [(100_000, 86_400), (86_400, 86_400), (3600, 3600), (0, 0)]
)
def test_composite_duration_is_capped_at_24_hours(asked: int, given: int) -> None:
    composite = DAILY.composite(utc(1, 21), 1, asked, local_limit=LOCAL)
    assert composite.duration == given
    assert all(start < max(given, 1) for start, _ in composite.periods)
    validate_response("GetCompositeSchedule", composite.conf())


def test_composite_over_a_day_of_the_daily_profile() -> None:
    composite = DAILY.composite(utc(1, 21), 1, 86_400, local_limit=LOCAL)
    # 21:00 to 21:00 the next day: the run of May 2nd (22:00) is outside the window.
    assert composite.periods == (
        (0, LOCAL),
        (3600, 10.0),
        (7200, 8.0),
        (10_800, 6.0),
        (18_000, LOCAL),
    )


def test_composite_rounds_down_to_multiples_of_a_tenth() -> None:
    config = SmartChargingConfig(number_of_connectors=2)
    profiles = install(
        (1, payload(1, periods=((0, 6.1),))), (2, payload(2, periods=((0, 6.2),))), config=config
    )
    # 6.1 + 6.2 is 12.299999999999999 in binary: the station total reports 12.3.
    assert profiles.composite(T0, 0, 60, local_limit=40.0).periods == ((0, 12.3),)
    assert profiles.composite(T0, 1, 60, local_limit=40.0).periods == ((0, 6.1),)
    # A local limit that is not a multiple of 0.1 is rounded down.
    assert profiles.composite(T0, 1, 60, local_limit=5.99).periods == ((0, 5.9),)
    # W: A x 230 V x 3 phases.
    watts = profiles.composite(T0, 1, 60, "W", local_limit=40.0)
    assert watts.periods == ((0, 4209.0),) and watts.charging_schedule()["chargingRateUnit"] == "W"
    validate_response("GetCompositeSchedule", watts.conf())


def test_composite_of_connector_0_is_the_whole_station() -> None:
    profiles = install(
        (0, payload(1, purpose="ChargePointMaxProfile", periods=((0, 20.0), (300, 10.0)))),
        (1, payload(2, periods=((0, 16.0),), duration=600)),
    )
    station = profiles.composite(T0, 0, 900, local_limit=LOCAL)
    assert station.connector_id == 0 and station.conf()["connectorId"] == 0
    assert station.periods == ((0, 16.0), (300, 10.0))
    assert profiles.composite(T0, 1, 900, local_limit=LOCAL).periods == station.periods
    # An idle connector with a Relative profile: the profile does not apply.
    relative = install(
        (0, payload(1, purpose="ChargePointMaxProfile", periods=((0, 20.0),))),
        (1, payload(2, kind="Relative", periods=((0, 8.0),), duration=600)),
    )
    assert relative.composite(T0, 0, 900, local_limit=LOCAL).periods == ((0, 20.0),)
    running = {1: Transaction(at(-300), 42)}
    assert relative.composite(T0, 0, 900, local_limit=LOCAL, transactions=running).periods == (
        (0, 8.0),
        (300, 20.0),
    )


def test_composite_unknown_connector_and_unit() -> None:
    with pytest.raises(UnknownConnector):
        STACKED.composite(T0, 2, 60, local_limit=LOCAL)
    with pytest.raises(UnknownConnector):
        STACKED.composite(T0, -1, 60, local_limit=LOCAL)
    with pytest.raises(UnsupportedRateUnit) as unit:
        STACKED.composite(T0, 1, 60, "kW", local_limit=LOCAL)
    assert isinstance(unit.value, CallError)
    assert unit.value.code == "PropertyConstraintViolation"
    with pytest.raises(CallError, match="duration"):
        STACKED.composite(T0, 1, -1, local_limit=LOCAL)
    with pytest.raises(UnknownConnector):
        STACKED.limit_at(T0, 0)


# -- the profile as data ---------------------------------------------------------------------


def test_payload_round_trip() -> None:
    original = payload(
        1,
        stack=2,
        kind="Recurring",
        recurrencyKind="Weekly",
        start=datetime(2024, 5, 1, 14, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=2))),
        duration=3600,
        validFrom="2024-05-01T00:00:00Z",
        validTo="2024-06-01T00:00:00.123456+00:00",
    )
    original["chargingSchedule"]["minChargingRate"] = 6.0
    original["chargingSchedule"]["chargingSchedulePeriod"][0]["numberPhases"] = 1
    profile = parse_profile(1, original)
    assert isinstance(profile, ChargingProfile)
    assert profile.schedule.start_schedule == datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert profile.schedule.min_charging_rate == 6.0
    again = profile.to_payload()
    assert again["chargingSchedule"]["startSchedule"] == "2024-05-01T12:00:00.250000Z"
    assert parse_profile(1, again) == profile
    validate_request("SetChargingProfile", {"connectorId": 1, "csChargingProfiles": again})


def test_min_charging_rate_is_kept_but_not_used() -> None:
    p = payload(1, periods=((0, 10.0),))
    p["chargingSchedule"]["minChargingRate"] = 12.0
    profiles = install((1, p))
    assert profiles.limit_at(at(1), 1) == 10.0
    assert profiles.entries[0].profile.schedule.min_charging_rate == 12.0
    assert (
        "minChargingRate"
        not in profiles.composite(T0, 1, 60, local_limit=LOCAL).conf()["chargingSchedule"]
    )


# -- the property: limit_at and next_change against a brute-force reference -----------------

GRID = 1800  # every generated time and duration is a multiple of this many seconds


def _ref_profile_limit(
    p: Mapping[str, Any], t: datetime, tx_start: datetime | None
) -> float | None:
    """One profile at ``t``, straight from its payload, by walking the recurrences."""
    if "validFrom" in p and t < parse_date_time(p["validFrom"]):
        return None
    if "validTo" in p and t >= parse_date_time(p["validTo"]):
        return None
    schedule = p["chargingSchedule"]
    length = schedule.get("duration")
    if p["chargingProfileKind"] == "Relative":
        if tx_start is None:
            return None
        begin = tx_start
    else:
        begin = parse_date_time(schedule["startSchedule"])
    if p["chargingProfileKind"] == "Recurring":
        cycle = 86_400 if p["recurrencyKind"] == "Daily" else 7 * 86_400
        if t < begin:
            return None
        while begin + timedelta(seconds=cycle) <= t:
            begin += timedelta(seconds=cycle)
        length = cycle if length is None or length > cycle else length
    elapsed = (t - begin).total_seconds()
    if elapsed < 0 or (length is not None and elapsed >= length):
        return None
    started = [q for q in schedule["chargingSchedulePeriod"] if q["startPeriod"] <= elapsed]
    limit: float = max(started, key=lambda q: q["startPeriod"])["limit"]
    return limit


def _ref_limit(
    installed: Mapping[int, tuple[int, dict[str, Any]]],
    t: datetime,
    tx_start: datetime | None,
) -> float | None:
    def highest(purpose: str, connector_id: int) -> float | None:
        in_effect = []
        for cid, p in installed.values():
            if cid == connector_id and p["chargingProfilePurpose"] == purpose:
                limit = _ref_profile_limit(p, t, tx_start)
                if limit is not None:
                    in_effect.append((p["stackLevel"], limit))
        return max(in_effect)[1] if in_effect else None

    cp_max = highest("ChargePointMaxProfile", 0)
    side = highest("TxProfile", 1) if tx_start is not None else None
    if side is None:
        side = highest("TxDefaultProfile", 1)
    if side is None:
        side = highest("TxDefaultProfile", 0)
    limits = [x for x in (cp_max, side) if x is not None]
    return min(limits) if limits else None


SLOTS = [
    ("ChargePointMaxProfile", 0),
    ("TxDefaultProfile", 0),
    ("TxDefaultProfile", 1),
    ("TxProfile", 1),
]


@st.composite
def profile_payloads(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    purpose, connector_id = draw(st.sampled_from(SLOTS))
    kinds = ["Absolute", "Recurring"] + ([] if purpose == "ChargePointMaxProfile" else ["Relative"])
    kind = draw(st.sampled_from(kinds))
    starts = sorted(draw(st.sets(st.integers(1, 60), max_size=4)))
    limits = draw(st.lists(st.integers(0, 320), min_size=len(starts) + 1, max_size=len(starts) + 1))
    periods = tuple(zip([0, *(s * GRID for s in starts)], [x / 10 for x in limits], strict=True))
    duration = draw(st.none() | st.integers(1, 150).map(lambda n: n * GRID))
    start = T0 + timedelta(seconds=draw(st.integers(-100, 100)) * GRID)
    extra: dict[str, Any] = {}
    if kind == "Recurring":
        extra["recurrencyKind"] = draw(st.sampled_from(["Daily", "Weekly"]))
    valid_from = draw(st.none() | st.integers(-150, 300))
    valid_to = draw(st.none() | st.integers(-150, 300))
    if valid_from is not None:
        extra["validFrom"] = format_time(T0 + timedelta(seconds=valid_from * GRID))
    if valid_to is not None and (valid_from is None or valid_to > valid_from):
        extra["validTo"] = format_time(T0 + timedelta(seconds=valid_to * GRID))
    if purpose == "TxProfile" and draw(st.booleans()):
        extra["transactionId"] = draw(st.sampled_from([42, 7]))  # 7: Rejected
    item = payload(
        draw(st.integers(1, 12)),
        stack=draw(st.integers(0, 5)),
        purpose=purpose,
        kind=kind,
        periods=periods,
        duration=duration,
        start=start,
        **extra,
    )
    return connector_id, item


def _grid_after(t: datetime) -> datetime:
    steps = math.floor((t - T0).total_seconds() / GRID) + 1
    return T0 + timedelta(seconds=steps * GRID)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(profile_payloads(), min_size=1, max_size=10),
    tx_offset=st.none() | st.integers(-100, 100),
    instants=st.lists(st.integers(-120 * GRID, 250 * GRID), min_size=1, max_size=4),
)
def test_limit_at_and_next_change_match_brute_force(
    items: list[tuple[int, dict[str, Any]]], tx_offset: int | None, instants: list[int]
) -> None:
    tx_start = None if tx_offset is None else T0 + timedelta(seconds=tx_offset * GRID)
    transactions = {} if tx_start is None else {1: 42}
    profiles = ProfileSet()
    installed: dict[int, tuple[int, dict[str, Any]]] = {}
    set_at = T0 - timedelta(days=30)  # before every validTo: none is Rejected for that
    for connector_id, item in items:
        result = profiles.set_profile(connector_id, item, now=set_at, transactions=transactions)
        if result.accepted:
            for gone in result.removed:
                del installed[gone]
            installed[item["chargingProfileId"]] = (connector_id, item)
        profiles = result.profiles
    assert set(installed) == {e.profile.id for e in profiles.entries}

    for when in instants:
        t = T0 + timedelta(seconds=when)
        expected = _ref_limit(installed, t, tx_start)
        assert profiles.limit_at(t, 1, tx_start, 42) == expected
        # Asked without the transaction: no TxProfile, no Relative profile.
        assert profiles.limit_at(t, 1) == _ref_limit(installed, t, None)

        change = profiles.next_change(t, 1, tx_start, 42)
        if change is not None:
            assert change > t
        # The reference limit stays the same on every grid instant before
        # next_change (every boundary is on the grid: none hides between two).
        horizon = change if change is not None else T0 + timedelta(days=40)
        probe = _grid_after(t)
        while probe < horizon:
            assert _ref_limit(installed, probe, tx_start) == expected, (probe, change)
            probe += timedelta(seconds=GRID)

    # The composite answers what the reference says, capped by the local limit.
    t = T0 + timedelta(seconds=instants[0])
    running = {} if tx_start is None else {1: Transaction(tx_start, 42)}
    composite = profiles.composite(t, 1, 86_400, local_limit=30.0, transactions=running)
    station = profiles.composite(t, 0, 86_400, local_limit=30.0, transactions=running)
    assert station.periods == composite.periods  # one connector: the station is that connector
    starts = [s for s, _ in composite.periods] + [composite.duration]
    for (start, limit), end in zip(composite.periods, starts[1:], strict=True):
        for offset in (start, (start + end) // 2, end - 1):
            moment = composite.schedule_start + timedelta(seconds=offset)
            ref = _ref_limit(installed, moment, tx_start)
            assert limit == (30.0 if ref is None else min(ref, 30.0)), (offset, composite)
