"""OCPP 1.6 Smart Charging, the pure core: profiles, the installed set, the composite schedule.

Theory of operation
-------------------
Three pieces, none with I/O, every one taking the time as an argument:

* ``parse_profile`` turns a ``csChargingProfiles`` object (SetChargingProfile.req,
  OCPP 1.6 §5.16, §6.43; types §7.8-§7.14) into a frozen ``ChargingProfile``, or
  raises ``ProfileRejected`` with the reason. It checks everything that depends
  on the profile alone and the station's limits (station-spec §1, keys §9.4).
* ``ProfileSet`` is the immutable set of installed profiles. ``set_profile``
  (§5.16), ``clear`` (§5.5), ``transaction_ended`` and ``bind_transaction``
  return a new set and say what happened; a Rejected update returns the set
  unchanged, so "validate first, then replace" holds by construction. The
  caller keeps the latest set (and gives the persistent part to
  ``ocpp16.profile_store``).
* ``ProfileSet.limit_at`` / ``next_change`` / ``composite`` evaluate the set:
  the limit in force at an instant, the next instant it may change (so a trio
  task can ``sleep_until`` it instead of polling) and the GetCompositeSchedule
  answer (§5.7).

The evaluation rules (§3.13.2 stacking, §3.13.3 combining)
-------------------------------------------------------------
A profile is *in effect* at ``t`` when ``validFrom <= t < validTo`` (either
bound may be absent) and ``t`` lies inside its schedule: ``start <= t <
start + duration`` (no duration: for ever). The start is ``startSchedule``
(Absolute), the transaction's start (Relative), or the latest recurrence of
``startSchedule`` at or before ``t``, every 24 h (Daily) or 7 days (Weekly)
counted from ``startSchedule`` itself, not from midnight (Recurring; before
the first ``startSchedule`` it is not in effect). A recurring schedule lasts
its ``duration`` but never longer than the recurrence. Inside the schedule the
period with the greatest ``startPeriod <= t - start`` gives the limit; a
period that starts at or after the end of the schedule never applies.

For a connector ``c`` (1..NumberOfConnectors), two stacks are evaluated and
the lower limit wins (§3.13.3):

* ChargePointMaxProfile (connector 0 only): the highest ``stackLevel`` in
  effect;
* the transaction side: the highest TxProfile of ``c`` in effect (only while a
  transaction runs on ``c``), else the highest TxDefaultProfile of ``c`` in
  effect, else the highest TxDefaultProfile of connector 0 in effect (a
  connector's own default overrides the station-wide one, §3.13.1).

"Highest in effect" is decided per instant: when a higher level's schedule has
run out (its duration is over, it is not yet or no longer valid) the next lower
level applies (§3.13.2). No profile in effect on either side: ``None``,
unconstrained by smart charging.

The value is the raw limit in A. IEC 61851-1 cannot offer 0 < I < 6 A; that
"below 6 A is 0 A" rule belongs to the station's arbitration
(``evse/limits.py``, which also takes the lowest of the other limits), not
to this module: ``limit_at`` and ``composite`` report what the profiles say.

Decisions
---------
* **Rate unit W is Rejected, not converted.** This station declares
  ChargingScheduleAllowedChargingRateUnit = "Current" (§9.4, station-spec §1,
  read-only): the central system has been told to send A. Converting W to A
  needs the voltage and the number of phases the EV really uses; with the
  usual ``W / (230 V x numberPhases)`` and numberPhases absent = 3, an EV that
  charges on one phase gets a third of the power meant for it, and one that
  charges on three phases while the profile said 1 gets three times the power
  the central system allowed, which may overload the grid connection the
  profile exists to protect. Rejecting tells the central system at once that
  the profile is not in force; a conversion would hide it. (GetCompositeSchedule
  may still *report* in W: a report is "only indicative" (§5.7) and never
  controls the current; see ``composite``.)
* **minChargingRate** is parsed, validated (a number >= 0) and kept (it goes
  back into storage), but not used: it is the EV's lowest useful rate, for
  sharing power between connectors (§7.13), and this station has no local
  load balancing; the composite does not report it either.
* **Relative without a transaction does not apply.** §7.9: Relative schedules
  are relative to the start of the transaction; with none running there is no
  start, so a Relative TxDefaultProfile gives no limit then (neither in
  ``limit_at`` nor in the composite of an idle connector). A Relative
  ChargePointMaxProfile is Rejected: connector 0 never has a transaction, so
  it would silently never apply while the central system believes it does.
* **Contradictory fields are Rejected**: ``startSchedule`` on a Relative
  profile, ``recurrencyKind`` on a non-Recurring one, ``transactionId`` on a
  profile that is not a TxProfile (§7.8: "only valid if ChargingProfilePurpose
  is set to TxProfile"), a ``validTo`` not after ``validFrom`` or already past.
* **A TxProfile belongs to its transaction.** It is installed only while a
  transaction runs on its connector, with a matching ``transactionId`` if it
  gives one (§5.16); without one it is bound to the running transaction's id
  (``bind_transaction`` fills it in when that id becomes known, §5.16 note). It
  is removed when that transaction ends and never persisted, so it cannot
  survive a reboot.
* **Expired profiles** (``validTo`` reached) never apply again; they do not count
  against MaxChargingProfilesInstalled and an accepted SetChargingProfile
  drops them, so nine stale profiles cannot lock the station out of new ones.
* **startSchedule in the composite**: GetCompositeSchedule.conf carries the
  window start in ``scheduleStart`` (§6.31) and only there; the
  ``chargingSchedule`` inside has no ``startSchedule`` (issue 8 asks for it so:
  the composite is read together with the .conf's start, one time in one place).

Times: every datetime must be timezone-aware (naive ones raise ``ValueError``);
internally everything is UTC, so "24 h" is 86400 s even across a daylight
saving change.

mypy sees the ``ocpp`` package's enums as ``Any`` (the package ships no type
information); the parser is where their values are checked, at run time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from ocpp16.errors import CallError, OcppError
from ocpp16.schemas import OCPP_ENUMS, parse_date_time

if TYPE_CHECKING:
    # The same classes, for the type checker (their module, as written).
    from ocpp.v16.enums import (
        ChargingProfileKindType,
        ChargingProfilePurposeType,
        ChargingProfileStatus,
        ChargingRateUnitType,
        ClearChargingProfileStatus,
        RecurrencyKind,
    )
else:
    # The ocpp package's enums without its asyncio runtime (ocpp16/schemas.py says why).
    ChargingProfileKindType = OCPP_ENUMS.ChargingProfileKindType
    ChargingProfilePurposeType = OCPP_ENUMS.ChargingProfilePurposeType
    ChargingProfileStatus = OCPP_ENUMS.ChargingProfileStatus
    ChargingRateUnitType = OCPP_ENUMS.ChargingRateUnitType
    ClearChargingProfileStatus = OCPP_ENUMS.ClearChargingProfileStatus
    RecurrencyKind = OCPP_ENUMS.RecurrencyKind

CHARGE_POINT_MAX: Final = ChargingProfilePurposeType.charge_point_max_profile
TX_DEFAULT: Final = ChargingProfilePurposeType.tx_default_profile
TX_PROFILE: Final = ChargingProfilePurposeType.tx_profile
ABSOLUTE: Final = ChargingProfileKindType.absolute
RECURRING: Final = ChargingProfileKindType.recurring
RELATIVE: Final = ChargingProfileKindType.relative
AMPS: Final = ChargingRateUnitType.amps
WATTS: Final = ChargingRateUnitType.watts

#: The recurrence length of a Recurring profile, from its startSchedule (§7.9).
RECURRENCE: Final[Mapping[Any, timedelta]] = {
    RecurrencyKind.daily: timedelta(days=1),
    RecurrencyKind.weekly: timedelta(days=7),
}

#: The purposes kept across a restart (``ocpp16.profile_store``).
PERSISTENT_PURPOSES: Final = frozenset({CHARGE_POINT_MAX, TX_DEFAULT})


# -- errors --------------------------------------------------------------------


class SmartChargingError(OcppError):
    """Base of this module's errors."""


class ProfileRejected(SmartChargingError):
    """A charging profile cannot be installed: SetChargingProfile.conf Rejected.

    ``reason`` says why (for the log; OCPP 1.6 has no field for it).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnknownConnector(SmartChargingError):
    """No such connector: GetCompositeSchedule.conf answers status Rejected (§5.7)."""

    def __init__(self, connector_id: int, number_of_connectors: int) -> None:
        self.connector_id = connector_id
        super().__init__(
            f"connector {connector_id} does not exist (connectors 0..{number_of_connectors})"
        )


class UnsupportedRateUnit(CallError):
    """GetCompositeSchedule asked for a rate unit that is neither A nor W.

    A CallError (PropertyConstraintViolation), so a handler that lets it
    propagate answers the CALL with a CALLERROR. The schema check normally
    catches it first; this is the core's own guard.
    """

    def __init__(self, unit: object) -> None:
        self.unit = unit
        super().__init__(
            "PropertyConstraintViolation",
            f"chargingRateUnit {str(unit)[:20]!r} is not one of A, W",
        )


# -- configuration -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmartChargingConfig:
    """The station's Smart Charging limits (station-spec §1, keys OCPP 1.6 §9.4).

    The defaults are the read-only keys' values; whoever builds the set reads
    them from the registry (ocpp16/config.py) and passes them.
    """

    #: NumberOfConnectors: valid connector ids are 0 (the station) to this.
    number_of_connectors: int = 1
    #: ChargeProfileMaxStackLevel: stack levels 0..this.
    max_stack_level: int = 5
    #: MaxChargingProfilesInstalled (all purposes and connectors together).
    max_profiles: int = 9
    #: ChargingScheduleMaxPeriods: periods per schedule.
    max_periods: int = 5
    #: GetCompositeSchedule duration cap (station-spec §1: at most 24 h).
    max_composite_duration_s: int = 86_400
    #: For reporting a composite in W only (W = A x voltage x phases).
    nominal_voltage: float = 230.0
    #: Phases of the supply, for the same W report.
    phases: int = 3


DEFAULT_CONFIG: Final = SmartChargingConfig()


# -- the profile ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchedulePeriod:
    """ChargingSchedulePeriod (§7.14). ``limit`` in A (this station's only unit)."""

    start_period: int  # seconds from the schedule's start
    limit: float
    number_phases: int | None = None


@dataclass(frozen=True, slots=True)
class ChargingSchedule:
    """ChargingSchedule (§7.13); ``periods`` start at 0 and strictly increase."""

    rate_unit: Any  # ChargingRateUnitType; always A once parsed (W is Rejected)
    periods: tuple[SchedulePeriod, ...]
    duration: int | None = None  # seconds
    start_schedule: datetime | None = None  # UTC
    #: Kept and stored, never used (see the module docstring).
    min_charging_rate: float | None = None


@dataclass(frozen=True, slots=True)
class ChargingProfile:
    """ChargingProfile (§7.8), validated by ``parse_profile``. Times are UTC."""

    id: int
    stack_level: int
    purpose: Any  # ChargingProfilePurposeType
    kind: Any  # ChargingProfileKindType
    schedule: ChargingSchedule
    transaction_id: int | None = None
    recurrency_kind: Any = None  # RecurrencyKind | None
    valid_from: datetime | None = None
    valid_to: datetime | None = None

    def to_payload(self) -> dict[str, Any]:
        """The ``csChargingProfiles`` object: camelCase, no absent fields, UTC times.

        ``parse_profile`` of this payload gives an equal profile (persistence
        relies on it).
        """
        schedule = self.schedule
        periods: list[dict[str, Any]] = []
        for p in schedule.periods:
            period: dict[str, Any] = {"startPeriod": p.start_period, "limit": p.limit}
            if p.number_phases is not None:
                period["numberPhases"] = p.number_phases
            periods.append(period)
        sched: dict[str, Any] = {
            "chargingRateUnit": str(schedule.rate_unit.value),
            "chargingSchedulePeriod": periods,
        }
        if schedule.duration is not None:
            sched["duration"] = schedule.duration
        if schedule.start_schedule is not None:
            sched["startSchedule"] = format_time(schedule.start_schedule)
        if schedule.min_charging_rate is not None:
            sched["minChargingRate"] = schedule.min_charging_rate
        out: dict[str, Any] = {
            "chargingProfileId": self.id,
            "stackLevel": self.stack_level,
            "chargingProfilePurpose": str(self.purpose.value),
            "chargingProfileKind": str(self.kind.value),
            "chargingSchedule": sched,
        }
        if self.transaction_id is not None:
            out["transactionId"] = self.transaction_id
        if self.recurrency_kind is not None:
            out["recurrencyKind"] = str(self.recurrency_kind.value)
        if self.valid_from is not None:
            out["validFrom"] = format_time(self.valid_from)
        if self.valid_to is not None:
            out["validTo"] = format_time(self.valid_to)
        return out


def format_time(moment: datetime) -> str:
    """UTC RFC 3339 with a ``Z``, microseconds kept when there are any (exact round trip)."""
    utc = _utc(moment).replace(tzinfo=None)
    spec = "microseconds" if utc.microsecond else "seconds"
    return utc.isoformat(timespec=spec) + "Z"


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment.isoformat()}: a time zone is required")
    return moment.astimezone(UTC)


# -- parsing -------------------------------------------------------------------

_PROFILE_FIELDS: Final = frozenset(
    {
        "chargingProfileId",
        "transactionId",
        "stackLevel",
        "chargingProfilePurpose",
        "chargingProfileKind",
        "recurrencyKind",
        "validFrom",
        "validTo",
        "chargingSchedule",
    }
)
_SCHEDULE_FIELDS: Final = frozenset(
    {"duration", "startSchedule", "chargingRateUnit", "chargingSchedulePeriod", "minChargingRate"}
)
_PERIOD_FIELDS: Final = frozenset({"startPeriod", "limit", "numberPhases"})


def _fields(obj: object, allowed: frozenset[str], where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ProfileRejected(f"{where} is not an object")
    extra = sorted(str(k) for k in obj if k not in allowed)
    if extra:
        raise ProfileRejected(f"{where}.{extra[0][:40]}: field not allowed here")
    return obj


def _int(obj: Mapping[str, Any], key: str, where: str, *, required: bool) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProfileRejected(f"{where}.{key}: required field missing")
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProfileRejected(f"{where}.{key}: not an integer")
    return value


def _number(obj: Mapping[str, Any], key: str, where: str, *, required: bool) -> float | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProfileRejected(f"{where}.{key}: required field missing")
        return None
    if not isinstance(value, int | float | Decimal) or isinstance(value, bool):
        raise ProfileRejected(f"{where}.{key}: not a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ProfileRejected(f"{where}.{key}: {number!r} is not a finite number >= 0")
    return number


def _time(obj: Mapping[str, Any], key: str, where: str) -> datetime | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProfileRejected(f"{where}.{key}: not a date-time text")
    try:
        return parse_date_time(value).astimezone(UTC)
    except ValueError as exc:
        raise ProfileRejected(f"{where}.{key}: {exc}") from exc


def _enum(enum: Any, obj: Mapping[str, Any], key: str, where: str, *, required: bool) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise ProfileRejected(f"{where}.{key}: required field missing")
        return None
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise ProfileRejected(
            f"{where}.{key}: {str(value)[:40]!r} is not one of {choices}"
        ) from None


def parse_profile(
    connector_id: int, payload: object, config: SmartChargingConfig = DEFAULT_CONFIG
) -> ChargingProfile:
    """Validate a SetChargingProfile.req's ``connectorId`` and ``csChargingProfiles``.

    Raises ``ProfileRejected`` naming the field and the rule. Checks that need
    the station's state (a running transaction for a TxProfile, the number
    installed, a ``validTo`` already past) are ``ProfileSet.install``'s.
    """
    where = "csChargingProfiles"
    obj = _fields(payload, _PROFILE_FIELDS, where)
    if not isinstance(connector_id, int) or isinstance(connector_id, bool):
        raise ProfileRejected("connectorId: not an integer")
    if not 0 <= connector_id <= config.number_of_connectors:
        raise ProfileRejected(
            f"connectorId {connector_id}: this station has connectors"
            f" 0..{config.number_of_connectors}"
        )
    profile_id = _int(obj, "chargingProfileId", where, required=True)
    stack_level = _int(obj, "stackLevel", where, required=True)
    assert profile_id is not None and stack_level is not None
    if not 0 <= stack_level <= config.max_stack_level:
        raise ProfileRejected(
            f"{where}.stackLevel {stack_level}: outside 0..{config.max_stack_level}"
            " (ChargeProfileMaxStackLevel, §9.4)"
        )
    purpose = _enum(ChargingProfilePurposeType, obj, "chargingProfilePurpose", where, required=True)
    kind = _enum(ChargingProfileKindType, obj, "chargingProfileKind", where, required=True)
    recurrency = _enum(RecurrencyKind, obj, "recurrencyKind", where, required=False)
    transaction_id = _int(obj, "transactionId", where, required=False)
    valid_from = _time(obj, "validFrom", where)
    valid_to = _time(obj, "validTo", where)
    schedule = _parse_schedule(obj.get("chargingSchedule"), f"{where}.chargingSchedule", config)

    if purpose is CHARGE_POINT_MAX and connector_id != 0:
        raise ProfileRejected(
            f"ChargePointMaxProfile on connector {connector_id}: only connector 0 (§3.13.1)"
        )
    if purpose is TX_PROFILE and connector_id == 0:
        raise ProfileRejected("TxProfile on connector 0: a transaction runs on a connector >= 1")
    if transaction_id is not None and purpose is not TX_PROFILE:
        raise ProfileRejected(
            f"transactionId on a {purpose.value}: only valid for a TxProfile (§7.8)"
        )
    if kind is RECURRING:
        if recurrency is None:
            raise ProfileRejected("Recurring profile without recurrencyKind (§7.8)")
        if schedule.start_schedule is None:
            raise ProfileRejected("Recurring profile without startSchedule: nothing to repeat from")
    elif recurrency is not None:
        raise ProfileRejected(f"recurrencyKind on a {kind.value} profile: only for Recurring")
    if kind is ABSOLUTE and schedule.start_schedule is None:
        raise ProfileRejected("Absolute profile without startSchedule (§7.13)")
    if kind is RELATIVE:
        if schedule.start_schedule is not None:
            raise ProfileRejected(
                "Relative profile with a startSchedule: it is relative to the transaction's start"
            )
        if purpose is CHARGE_POINT_MAX:
            raise ProfileRejected(
                "Relative ChargePointMaxProfile: connector 0 has no transaction to count from"
            )
    if valid_from is not None and valid_to is not None and valid_to <= valid_from:
        raise ProfileRejected("validTo is not after validFrom: the profile is never valid")
    return ChargingProfile(
        id=profile_id,
        stack_level=stack_level,
        purpose=purpose,
        kind=kind,
        schedule=schedule,
        transaction_id=transaction_id,
        recurrency_kind=recurrency,
        valid_from=valid_from,
        valid_to=valid_to,
    )


def _parse_schedule(obj: object, where: str, config: SmartChargingConfig) -> ChargingSchedule:
    if obj is None:
        raise ProfileRejected(f"{where}: required field missing")
    sched = _fields(obj, _SCHEDULE_FIELDS, where)
    unit = _enum(ChargingRateUnitType, sched, "chargingRateUnit", where, required=True)
    if unit is not AMPS:
        # The W rule: see the module docstring.
        raise ProfileRejected(
            f"{where}.chargingRateUnit {unit.value}: this station takes A only"
            " (ChargingScheduleAllowedChargingRateUnit = Current, §9.4)"
        )
    duration = _int(sched, "duration", where, required=False)
    if duration is not None and duration <= 0:
        raise ProfileRejected(f"{where}.duration {duration}: must be > 0 s")
    start = _time(sched, "startSchedule", where)
    min_rate = _number(sched, "minChargingRate", where, required=False)
    raw = sched.get("chargingSchedulePeriod")
    if not isinstance(raw, list | tuple):
        raise ProfileRejected(f"{where}.chargingSchedulePeriod: required array missing")
    if not 1 <= len(raw) <= config.max_periods:
        raise ProfileRejected(
            f"{where}.chargingSchedulePeriod: {len(raw)} periods, 1..{config.max_periods}"
            " allowed (ChargingScheduleMaxPeriods, §9.4)"
        )
    periods: list[SchedulePeriod] = []
    for i, item in enumerate(raw):
        at = f"{where}.chargingSchedulePeriod[{i}]"
        period = _fields(item, _PERIOD_FIELDS, at)
        start_period = _int(period, "startPeriod", at, required=True)
        limit = _number(period, "limit", at, required=True)
        phases = _int(period, "numberPhases", at, required=False)
        assert start_period is not None and limit is not None
        if phases is not None and not 1 <= phases <= 3:
            raise ProfileRejected(f"{at}.numberPhases {phases}: must be 1..3")
        if i == 0 and start_period != 0:
            raise ProfileRejected(f"{at}.startPeriod {start_period}: the first period starts at 0")
        if i > 0 and start_period <= periods[-1].start_period:
            raise ProfileRejected(
                f"{at}.startPeriod {start_period}: periods must start in strictly increasing order"
            )
        periods.append(SchedulePeriod(start_period, limit, phases))
    return ChargingSchedule(
        rate_unit=unit,
        periods=tuple(periods),
        duration=duration,
        start_schedule=start,
        min_charging_rate=min_rate,
    )


# -- evaluating one profile ----------------------------------------------------


def _span(profile: ChargingProfile) -> timedelta | None:
    """How long one run of the schedule lasts (None: for ever)."""
    duration = profile.schedule.duration
    length = None if duration is None else timedelta(seconds=duration)
    if profile.kind is RECURRING:
        cycle = RECURRENCE[profile.recurrency_kind]
        return cycle if length is None else min(length, cycle)
    return length


def _run_start(profile: ChargingProfile, t: datetime, tx_start: datetime | None) -> datetime | None:
    """The start of the schedule's run that ``t`` falls in or is waiting for."""
    if profile.kind is RELATIVE:
        return tx_start
    first = profile.schedule.start_schedule
    assert first is not None  # parse_profile: Absolute and Recurring have one
    if profile.kind is RECURRING and t >= first:
        cycle = RECURRENCE[profile.recurrency_kind]
        return first + ((t - first) // cycle) * cycle
    return first


def _valid(profile: ChargingProfile, t: datetime) -> bool:
    if profile.valid_from is not None and t < profile.valid_from:
        return False
    return profile.valid_to is None or t < profile.valid_to


def profile_limit(
    profile: ChargingProfile, t: datetime, tx_start: datetime | None = None
) -> float | None:
    """This one profile's limit at ``t`` (UTC), or None when it is not in effect then."""
    if not _valid(profile, t):
        return None
    start = _run_start(profile, t, tx_start)
    if start is None or t < start:
        return None
    offset = t - start
    span = _span(profile)
    if span is not None and offset >= span:
        return None
    limit: float | None = None
    for period in profile.schedule.periods:
        if timedelta(seconds=period.start_period) > offset:
            break
        limit = period.limit
    return limit


def profile_next_change(
    profile: ChargingProfile, t: datetime, tx_start: datetime | None = None
) -> datetime | None:
    """The first instant after ``t`` at which this profile's limit (or being in
    effect) may change: a period boundary, the end of the run, the next
    recurrence, validFrom or validTo. None: it never changes again."""
    if profile.valid_to is not None and t >= profile.valid_to:
        return None  # never in effect again
    if profile.valid_from is not None and t < profile.valid_from:
        return profile.valid_from  # nothing of this profile matters before
    start = _run_start(profile, t, tx_start)
    if start is None:
        return None  # Relative without a transaction: never in effect
    span = _span(profile)
    candidates: list[datetime] = []
    for period in profile.schedule.periods:
        offset = timedelta(seconds=period.start_period)
        if span is None or offset < span:
            candidates.append(start + offset)
    if span is not None:
        candidates.append(start + span)
    if profile.kind is RECURRING:
        candidates.append(start + RECURRENCE[profile.recurrency_kind])
    if profile.valid_to is not None:
        candidates.append(profile.valid_to)
    later = [c for c in candidates if c > t]
    if profile.valid_to is not None:
        later = [c for c in later if c <= profile.valid_to]
    return min(later, default=None)


# -- the installed set ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstalledProfile:
    """A profile as installed on a connector.

    ``transaction_id`` (TxProfile only) is the transaction it belongs to: the
    profile's own ``transactionId``, else the id of the transaction running when
    it was set, None while that id is not known yet.
    """

    connector_id: int
    profile: ChargingProfile
    transaction_id: int | None = None


@dataclass(frozen=True, slots=True)
class Transaction:
    """A running transaction, for the composite: its start and central system id."""

    started_at: datetime
    transaction_id: int | None = None


@dataclass(frozen=True, slots=True)
class SetResult:
    """The outcome of SetChargingProfile: ``profiles`` is the set to keep."""

    status: Any  # ChargingProfileStatus
    profiles: ProfileSet
    reason: str | None = None
    #: Ids of the profiles the new one replaced (and expired ones dropped).
    removed: tuple[int, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.status is ChargingProfileStatus.accepted

    def conf(self) -> dict[str, Any]:
        """SetChargingProfile.conf."""
        return {"status": str(self.status.value)}


@dataclass(frozen=True, slots=True)
class ClearResult:
    """The outcome of ClearChargingProfile: ``profiles`` is the set to keep."""

    status: Any  # ClearChargingProfileStatus
    profiles: ProfileSet
    removed: tuple[int, ...] = ()

    def conf(self) -> dict[str, Any]:
        """ClearChargingProfile.conf."""
        return {"status": str(self.status.value)}


@dataclass(frozen=True, slots=True)
class CompositeSchedule:
    """A GetCompositeSchedule answer (§5.7, §6.31).

    ``periods`` are (startPeriod from ``schedule_start``, limit in ``unit``),
    limits rounded down to a multiple of 0.1, consecutive equal limits merged.
    """

    connector_id: int
    schedule_start: datetime
    duration: int
    unit: Any  # ChargingRateUnitType
    periods: tuple[tuple[int, float], ...]

    def charging_schedule(self) -> dict[str, Any]:
        """The ``chargingSchedule`` object. No ``startSchedule`` inside: the window
        start is the answer's ``scheduleStart`` (OCPP 1.6 6.31), and one time in
        one place leaves a central system nothing to reconcile (issue 8)."""
        return {
            "duration": self.duration,
            "chargingRateUnit": str(self.unit.value),
            "chargingSchedulePeriod": [
                {"startPeriod": start, "limit": limit} for start, limit in self.periods
            ],
        }

    def conf(self) -> dict[str, Any]:
        """GetCompositeSchedule.conf, status Accepted."""
        return {
            "status": "Accepted",
            "connectorId": self.connector_id,
            "scheduleStart": format_time(self.schedule_start),
            "chargingSchedule": self.charging_schedule(),
        }


def _floor_tenth(value: float) -> float:
    # The tiny bias keeps 6.1 (61.00000000000001 or 60.99999999999999 once
    # multiplied) at 6.1; n / 10 reprs as the shortest decimal, so the result
    # passes the schema's exact multipleOf 0.1 (ocpp16/schemas.py).
    return math.floor(value * 10 + 1e-6) / 10


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass(frozen=True, slots=True)
class ProfileSet:
    """The installed charging profiles: immutable; every change returns a new set.

    ``entries`` are ordered by chargingProfileId. Build an empty one with
    ``ProfileSet(config)``, a restored one with ``ProfileSet(config, entries)``
    (``ocpp16.profile_store`` does).
    """

    config: SmartChargingConfig = DEFAULT_CONFIG
    entries: tuple[InstalledProfile, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.entries, key=lambda e: e.profile.id))
        ids = [e.profile.id for e in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate chargingProfileId in {ids}")
        object.__setattr__(self, "entries", ordered)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, profile_id: int) -> InstalledProfile | None:
        return next((e for e in self.entries if e.profile.id == profile_id), None)

    def persistent(self) -> tuple[InstalledProfile, ...]:
        """What survives a restart: ChargePointMax and TxDefault profiles, never TxProfiles."""
        return tuple(e for e in self.entries if e.profile.purpose in PERSISTENT_PURPOSES)

    # -- SetChargingProfile (§5.16) -------------------------------------------

    def set_profile(
        self,
        connector_id: int,
        payload: object,
        *,
        now: datetime,
        transactions: Mapping[int, int | None] | None = None,
    ) -> SetResult:
        """SetChargingProfile.req: parse, check against the station's state, install.

        ``transactions`` maps each connector with a running transaction to its
        central system transactionId (None while StartTransaction.conf has not
        given it). Rejected: the set is returned unchanged, with the reason.
        """
        try:
            profile = parse_profile(connector_id, payload, self.config)
        except ProfileRejected as exc:
            return SetResult(ChargingProfileStatus.rejected, self, exc.reason)
        return self.install(connector_id, profile, now=now, transactions=transactions)

    def install(
        self,
        connector_id: int,
        profile: ChargingProfile,
        *,
        now: datetime,
        transactions: Mapping[int, int | None] | None = None,
    ) -> SetResult:
        """Install a parsed profile (``set_profile`` after parsing; also for a
        RemoteStartTransaction's TxProfile once its transaction runs)."""
        now = _utc(now)
        running = {} if transactions is None else transactions

        def rejected(reason: str) -> SetResult:
            return SetResult(ChargingProfileStatus.rejected, self, reason)

        bound: int | None = None
        if profile.purpose is TX_PROFILE:
            # §5.16: a TxProfile needs a transaction on its connector, and the
            # same one when it names it.
            if connector_id not in running:
                return rejected(f"TxProfile: no transaction runs on connector {connector_id}")
            current = running[connector_id]
            if profile.transaction_id is not None and profile.transaction_id != current:
                known = "not known yet" if current is None else str(current)
                return rejected(
                    f"TxProfile for transaction {profile.transaction_id}: the one on connector"
                    f" {connector_id} is {known}"
                )
            bound = current if profile.transaction_id is None else profile.transaction_id
        if profile.valid_to is not None and profile.valid_to <= now:
            return rejected("validTo has passed: the profile would never apply")
        # §5.16: the same chargingProfileId, or the same stackLevel and purpose
        # on the same connector, is replaced; expired profiles go too.
        kept: list[InstalledProfile] = []
        removed: list[int] = []
        for entry in self.entries:
            old = entry.profile
            same_slot = (
                old.stack_level == profile.stack_level
                and old.purpose is profile.purpose
                and entry.connector_id == connector_id
            )
            expired = old.valid_to is not None and old.valid_to <= now
            if old.id == profile.id or same_slot or expired:
                removed.append(old.id)
            else:
                kept.append(entry)
        if len(kept) + 1 > self.config.max_profiles:
            return rejected(
                f"{len(kept)} profiles installed: at most {self.config.max_profiles}"
                " (MaxChargingProfilesInstalled, §9.4)"
            )
        kept.append(InstalledProfile(connector_id, profile, bound))
        return SetResult(
            ChargingProfileStatus.accepted, replace(self, entries=tuple(kept)), None, tuple(removed)
        )

    # -- ClearChargingProfile (§5.5) ------------------------------------------

    def clear(
        self,
        *,
        profile_id: int | None = None,
        connector_id: int | None = None,
        purpose: Any = None,
        stack_level: int | None = None,
    ) -> ClearResult:
        """ClearChargingProfile.req: ``profile_id`` alone decides when given (the
        other fields are ignored); otherwise the given fields must all match
        (connector 0 means the profiles installed on connector 0); none given
        clears everything. Nothing matched: Unknown, and the set is unchanged.
        A ``purpose`` that is not a ChargingProfilePurposeType value raises
        ``ValueError`` (the schema check refuses it first)."""
        purpose = None if purpose is None else ChargingProfilePurposeType(purpose)

        def matches(entry: InstalledProfile) -> bool:
            p = entry.profile
            if profile_id is not None:
                return p.id == profile_id
            return (
                (connector_id is None or entry.connector_id == connector_id)
                and (purpose is None or p.purpose is purpose)
                and (stack_level is None or p.stack_level == stack_level)
            )

        gone = tuple(e.profile.id for e in self.entries if matches(e))
        if not gone:
            return ClearResult(ClearChargingProfileStatus.unknown, self)
        left = tuple(e for e in self.entries if e.profile.id not in gone)
        return ClearResult(ClearChargingProfileStatus.accepted, replace(self, entries=left), gone)

    def clear_request(self, payload: Mapping[str, Any]) -> ClearResult:
        """``clear`` from a (schema-valid) ClearChargingProfile.req payload."""
        return self.clear(
            profile_id=payload.get("id"),
            connector_id=payload.get("connectorId"),
            purpose=payload.get("chargingProfilePurpose"),
            stack_level=payload.get("stackLevel"),
        )

    # -- transactions -----------------------------------------------------------

    def transaction_ended(self, connector_id: int, transaction_id: int | None = None) -> ProfileSet:
        """The transaction on ``connector_id`` ended: its TxProfiles go (§3.13.1).

        With ``transaction_id``, the TxProfiles bound to it or to no known id;
        without, every TxProfile of the connector. (A TxProfile of a newer
        transaction on the same connector stays if this call comes late.)
        """

        def belongs(entry: InstalledProfile) -> bool:
            return (
                entry.profile.purpose is TX_PROFILE
                and entry.connector_id == connector_id
                and (
                    transaction_id is None
                    or entry.transaction_id is None
                    or entry.transaction_id == transaction_id
                )
            )

        left = tuple(e for e in self.entries if not belongs(e))
        return self if len(left) == len(self.entries) else replace(self, entries=left)

    def bind_transaction(self, connector_id: int, transaction_id: int) -> ProfileSet:
        """The running transaction's id became known: TxProfiles of ``connector_id``
        installed before it was (bound to no id) now carry it (§5.16 note)."""
        entries = tuple(
            replace(e, transaction_id=transaction_id)
            if e.profile.purpose is TX_PROFILE
            and e.connector_id == connector_id
            and e.transaction_id is None
            else e
            for e in self.entries
        )
        return replace(self, entries=entries)

    # -- evaluation ---------------------------------------------------------------

    def _check_connector(self, connector_id: int, *, station: bool) -> None:
        low = 0 if station else 1
        if not low <= connector_id <= self.config.number_of_connectors:
            raise UnknownConnector(connector_id, self.config.number_of_connectors)

    def _stacks(
        self, connector_id: int, tx_start: datetime | None, tx_id: int | None
    ) -> tuple[list[ChargingProfile], list[ChargingProfile]]:
        """(ChargePointMax stack, transaction-side stack), each in precedence order."""

        def by_level(entries: Iterable[InstalledProfile]) -> list[ChargingProfile]:
            return [
                e.profile
                for e in sorted(entries, key=lambda e: e.profile.stack_level, reverse=True)
            ]

        cp_max = by_level(e for e in self.entries if e.profile.purpose is CHARGE_POINT_MAX)
        tx: list[ChargingProfile] = []
        if tx_start is not None:
            tx += by_level(
                e
                for e in self.entries
                if e.profile.purpose is TX_PROFILE
                and e.connector_id == connector_id
                and (tx_id is None or e.transaction_id is None or e.transaction_id == tx_id)
            )
        for cid in (connector_id, 0):
            tx += by_level(
                e for e in self.entries if e.profile.purpose is TX_DEFAULT and e.connector_id == cid
            )
        return cp_max, tx

    @staticmethod
    def _first_in_effect(
        stack: list[ChargingProfile], t: datetime, tx_start: datetime | None
    ) -> float | None:
        for profile in stack:
            limit = profile_limit(profile, t, tx_start)
            if limit is not None:
                return limit
        return None

    def _connector_limit(
        self, t: datetime, connector_id: int, tx_start: datetime | None, tx_id: int | None
    ) -> tuple[float | None, float | None]:
        """(ChargePointMax limit, transaction-side limit) for a connector at ``t``."""
        cp_max, tx = self._stacks(connector_id, tx_start, tx_id)
        return self._first_in_effect(cp_max, t, tx_start), self._first_in_effect(tx, t, tx_start)

    def _connector_next(
        self, t: datetime, connector_id: int, tx_start: datetime | None, tx_id: int | None
    ) -> datetime | None:
        cp_max, tx = self._stacks(connector_id, tx_start, tx_id)
        changes = (profile_next_change(p, t, tx_start) for p in (*cp_max, *tx))
        return min((c for c in changes if c is not None), default=None)

    def limit_at(
        self,
        now: datetime,
        connector_id: int,
        tx_start: datetime | None = None,
        tx_id: int | None = None,
    ) -> float | None:
        """The smart-charging limit in A for ``connector_id`` (>= 1) at ``now``.

        ``tx_start``: the start of the transaction running there (None: none
        runs, so no TxProfile and no Relative profile applies); ``tx_id``: its
        central system id (None: not known yet). None: unconstrained. The raw
        value: below 6 A is the arbitration's business (evse/limits.py).
        """
        self._check_connector(connector_id, station=False)
        t = _utc(now)
        start = None if tx_start is None else _utc(tx_start)
        return _min(*self._connector_limit(t, connector_id, start, tx_id))

    def next_change(
        self,
        now: datetime,
        connector_id: int,
        tx_start: datetime | None = None,
        tx_id: int | None = None,
    ) -> datetime | None:
        """The first instant after ``now`` at which ``limit_at`` may change (UTC), or
        None if it never will. Never later than the actual next change; it may
        be an instant at which the limit stays the same (a boundary of a
        profile that is overridden then). Only time is considered: a new or
        cleared profile, or a transaction starting or ending, needs a new call.
        """
        self._check_connector(connector_id, station=False)
        start = None if tx_start is None else _utc(tx_start)
        return self._connector_next(_utc(now), connector_id, start, tx_id)

    # -- GetCompositeSchedule (§5.7) ------------------------------------------

    def composite(
        self,
        now: datetime,
        connector_id: int,
        duration_s: int,
        unit: object = None,
        *,
        local_limit: float,
        transactions: Mapping[int, Transaction] | None = None,
    ) -> CompositeSchedule:
        """GetCompositeSchedule.req: the limits from ``now`` for ``duration_s``.

        The window starts at ``now`` rounded down to the whole second (so the
        integer startPeriods fall on profile boundaries exactly) and lasts
        ``duration_s``, at most ``max_composite_duration_s`` (station-spec §1:
        24 h). Connector 0 is the whole station: ChargePointMax combined with
        the sum of the connectors' transaction-side limits (with one connector,
        simply that connector's). ``local_limit`` is the station's own maximum
        for the connector (installer, hardware, cable: §5.7 "possible local
        limits"): it caps every period and is the limit where no profile
        applies. ``transactions``: the running ones by connector (none: no
        TxProfile, no Relative profile). ``unit``: A (also when None) or W
        (reported as A x ``nominal_voltage`` x ``phases``).

        Raises ``UnknownConnector`` (answer Rejected), ``UnsupportedRateUnit``
        and ``CallError`` for a negative duration (answer with the CALLERROR).
        """
        rate_unit = self._rate_unit(unit)
        self._check_connector(connector_id, station=True)
        if not isinstance(duration_s, int) or isinstance(duration_s, bool) or duration_s < 0:
            raise CallError(
                "PropertyConstraintViolation", f"duration {duration_s!r}: must be an integer >= 0"
            )
        duration = min(duration_s, self.config.max_composite_duration_s)
        txs = {} if transactions is None else dict(transactions)
        start = _utc(now).replace(microsecond=0)
        end = start + timedelta(seconds=duration)
        offsets = {0}
        t = start
        while True:
            change = self._station_next(t, connector_id, txs)
            if change is None or change >= end:
                break
            offsets.add(math.ceil((change - start).total_seconds()))
            t = change
        factor = 1.0 if rate_unit is AMPS else self.config.nominal_voltage * self.config.phases
        periods: list[tuple[int, float]] = []
        for offset in sorted(o for o in offsets if o < max(duration, 1)):
            amps = _min(
                self._station_limit(start + timedelta(seconds=offset), connector_id, txs),
                local_limit,
            )
            assert amps is not None
            limit = _floor_tenth(amps * factor)
            if not periods or periods[-1][1] != limit:
                periods.append((offset, limit))
        return CompositeSchedule(connector_id, start, duration, rate_unit, tuple(periods))

    @staticmethod
    def _rate_unit(unit: object) -> Any:
        if unit is None:
            return AMPS
        try:
            return ChargingRateUnitType(unit)
        except ValueError:
            raise UnsupportedRateUnit(unit) from None

    def _connectors(self, connector_id: int) -> range:
        if connector_id == 0:
            return range(1, self.config.number_of_connectors + 1)
        return range(connector_id, connector_id + 1)

    def _station_limit(
        self, t: datetime, connector_id: int, txs: Mapping[int, Transaction]
    ) -> float | None:
        cp_max: float | None = None
        total: float | None = 0.0
        for cid in self._connectors(connector_id):
            tx = txs.get(cid)
            start = None if tx is None else _utc(tx.started_at)
            cp_max, side = self._connector_limit(
                t, cid, start, None if tx is None else tx.transaction_id
            )
            total = None if total is None or side is None else total + side
        return _min(cp_max, total)

    def _station_next(
        self, t: datetime, connector_id: int, txs: Mapping[int, Transaction]
    ) -> datetime | None:
        changes: list[datetime] = []
        for cid in self._connectors(connector_id):
            tx = txs.get(cid)
            start = None if tx is None else _utc(tx.started_at)
            change = self._connector_next(t, cid, start, None if tx is None else tx.transaction_id)
            if change is not None:
                changes.append(change)
        return min(changes, default=None)
