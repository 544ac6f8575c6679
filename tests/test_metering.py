"""Meter values: measurands, units, phases, contexts, clock alignment."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocpp16.metering import (
    MeterSnapshot,
    format_time,
    meter_value,
    next_aligned,
    parse_measurands,
    sampled_values,
)

AT = datetime(2026, 11, 22, 13, 7, 30, 123456, tzinfo=UTC)
SNAP = MeterSnapshot(
    energy_wh=12345.678,
    power_w=11040.0,
    current_a=(16.0, 15.5, None),
    voltage_v=(230.1, 229.9, 231.0),
    offered_a=16.0,
    timestamp=AT,
)


def test_units_phases_and_context() -> None:
    values = sampled_values(
        SNAP,
        [
            "Energy.Active.Import.Register",
            "Current.Import",
            "Voltage",
            "Power.Active.Import",
            "Current.Offered",
            "Temperature",
        ],
        "Sample.Periodic",
    )
    rows = [(v["measurand"], v.get("phase"), v["value"], v["unit"]) for v in values]
    assert rows == [
        ("Energy.Active.Import.Register", None, "12345.678", "Wh"),
        ("Current.Import", "L1", "16", "A"),
        ("Current.Import", "L2", "15.5", "A"),  # L3 not measured: left out
        ("Voltage", "L1-N", "230.1", "V"),
        ("Voltage", "L2-N", "229.9", "V"),
        ("Voltage", "L3-N", "231", "V"),
        ("Power.Active.Import", None, "11040", "W"),
        ("Current.Offered", None, "16", "A"),
    ]  # no temperature sensor: no Temperature value
    assert {v["context"] for v in values} == {"Sample.Periodic"}
    assert {v["location"] for v in values} == {"Outlet"}


def test_meter_value_shape_and_time_format() -> None:
    value = meter_value(SNAP, ["Energy.Active.Import.Register"], "Transaction.End")
    assert value == {
        "timestamp": "2026-11-22T13:07:30.123Z",
        "sampledValue": [
            {
                "value": "12345.678",
                "context": "Transaction.End",
                "format": "Raw",
                "measurand": "Energy.Active.Import.Register",
                "location": "Outlet",
                "unit": "Wh",
            }
        ],
    }
    assert meter_value(SNAP, [], "Sample.Clock") is None
    assert format_time(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("now", "interval", "expected"),
    [
        (
            datetime(2026, 11, 22, 13, 7, tzinfo=UTC),
            900,
            datetime(2026, 11, 22, 13, 15, tzinfo=UTC),
        ),
        (
            datetime(2026, 11, 22, 13, 15, tzinfo=UTC),
            900,
            datetime(2026, 11, 22, 13, 30, tzinfo=UTC),
        ),
        (
            datetime(2026, 11, 22, 23, 59, tzinfo=UTC),
            3600,
            datetime(2026, 11, 23, 0, 0, tzinfo=UTC),
        ),
        (datetime(2026, 11, 22, 0, 0, 1, tzinfo=UTC), 86400, datetime(2026, 11, 23, tzinfo=UTC)),
        # 7 minutes does not divide an hour: still aligned to midnight.
        (datetime(2026, 11, 22, 1, 0, tzinfo=UTC), 420, datetime(2026, 11, 22, 1, 3, tzinfo=UTC)),
    ],
)
def test_clock_aligned_boundaries(now: datetime, interval: int, expected: datetime) -> None:
    assert next_aligned(now, interval) == expected


@given(st.datetimes(timezones=st.just(UTC)), st.integers(min_value=1, max_value=86400))
def test_boundary_is_after_now_and_a_multiple_from_midnight(now: datetime, interval: int) -> None:
    boundary = next_aligned(now, interval)
    assert now < boundary
    assert (boundary - now).total_seconds() <= interval
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert (boundary - midnight).total_seconds() % interval == 0


def test_parse_measurands() -> None:
    assert parse_measurands(" Voltage,,Current.Import ,Voltage") == ["Voltage", "Current.Import"]
    assert parse_measurands("") == []
