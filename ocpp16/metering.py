"""Meter values: measurands, units, phases and contexts (OCPP 1.6 sections 3.16, 7.31, 9.1).

Pure functions. A ``MeterSnapshot`` is what the station measured at one
moment; ``sampled_values`` turns it into OCPP ``SampledValue`` objects for
the measurands configured in MeterValuesSampledData / MeterValuesAlignedData
/ StopTxnSampledData, each with its unit, phase, location and context.
``next_aligned`` gives the clock-aligned boundaries: OCPP 1.6 9.1.2 aligns
ClockAlignedDataInterval to midnight, so with 900 s the readings fall on
:00, :15, :30 and :45 of every hour, whenever the station booted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

#: The measurands this station can measure (station-spec section 1).
SUPPORTED_MEASURANDS = (
    "Energy.Active.Import.Register",
    "Current.Import",
    "Current.Offered",
    "Temperature",
    "Voltage",
    "Power.Active.Import",
)

PHASE_NAMES = ("L1", "L2", "L3")
# Voltage is measured phase to neutral (OCPP 1.6 7.31 Phase: L1-N ...).
VOLTAGE_PHASES = ("L1-N", "L2-N", "L3-N")


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    energy_wh: float | None
    power_w: float | None
    current_a: tuple[float | None, float | None, float | None]
    voltage_v: tuple[float | None, float | None, float | None]
    offered_a: float
    timestamp: datetime
    temperature_c: float | None = None


def format_time(at: datetime) -> str:
    """RFC 3339 UTC with milliseconds and 'Z' (OCPP-J 1.6 section 3.1.3)."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: float) -> str:
    """SampledValue.value is a string; keep it short and exact enough."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def sampled_values(
    snapshot: MeterSnapshot, measurands: Sequence[str], context: str
) -> list[dict[str, Any]]:
    """SampledValue objects for ``measurands``; a value the meter lacks is left out."""
    out: list[dict[str, Any]] = []

    def add(measurand: str, value: float | None, unit: str, phase: str | None = None) -> None:
        if value is None or math.isnan(value):
            return
        sample: dict[str, Any] = {
            "value": _number(value),
            "context": context,
            "format": "Raw",
            "measurand": measurand,
            "location": "Outlet",
            "unit": unit,
        }
        if phase is not None:
            sample["phase"] = phase
        out.append(sample)

    for measurand in measurands:
        if measurand == "Energy.Active.Import.Register":
            add(measurand, snapshot.energy_wh, "Wh")
        elif measurand == "Power.Active.Import":
            add(measurand, snapshot.power_w, "W")
        elif measurand == "Current.Offered":
            add(measurand, snapshot.offered_a, "A")
        elif measurand == "Current.Import":
            for phase, value in zip(PHASE_NAMES, snapshot.current_a, strict=True):
                add(measurand, value, "A", phase)
        elif measurand == "Voltage":
            for phase, value in zip(VOLTAGE_PHASES, snapshot.voltage_v, strict=True):
                add(measurand, value, "V", phase)
        elif measurand == "Temperature":
            sample_count = len(out)
            add(measurand, snapshot.temperature_c, "Celsius")
            if len(out) > sample_count:
                out[-1]["location"] = "Body"
    return out


def meter_value(
    snapshot: MeterSnapshot, measurands: Sequence[str], context: str, *, at: datetime | None = None
) -> dict[str, Any] | None:
    """One MeterValue (timestamp + samples), or None when nothing was measurable."""
    samples = sampled_values(snapshot, measurands, context)
    if not samples:
        return None
    return {"timestamp": format_time(at or snapshot.timestamp), "sampledValue": samples}


def next_aligned(now: datetime, interval: int) -> datetime:
    """The next clock-aligned boundary after ``now`` (aligned to UTC midnight)."""
    if interval <= 0:
        raise ValueError(f"interval must be positive, not {interval}")
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = (now - midnight).total_seconds()
    steps = math.floor(elapsed / interval) + 1
    return midnight + timedelta(seconds=steps * interval)


def parse_measurands(text: str) -> list[str]:
    """A configuration value's measurands, in order, without blanks or repeats."""
    seen: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if item and item not in seen:
            seen.append(item)
    return seen
