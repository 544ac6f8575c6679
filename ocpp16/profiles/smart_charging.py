"""The Smart Charging profile (OCPP 1.6 section 3.13): its handlers, its state, its task.

The pure core is ``ocpp16.smart_charging`` (profiles in, limits and the
composite schedule out, given ``now``) and ``ocpp16.profile_store`` (the
persistent part, in the station's SQLite file). This module puts them on the
session:

* the central system's calls: SetChargingProfile (5.16), ClearChargingProfile
  (5.5) and GetCompositeSchedule (5.7). The payloads were validated against
  the ``ocpp`` package's schemas by ``rpc`` before they get here, and every
  answer is validated by it again before it goes out;
* a TxProfile inside RemoteStartTransaction (5.11): Core's handler asks this
  profile (``check``, ``expect``, ``forget``: the ``RemoteStartProfiles`` hook of
  ``profiles.core``) and the profile applies to the transaction the start
  leads to;
* the transactions, as the charge point is told about them
  (``transaction_began``, ``transaction_identified``, ``transaction_ending``:
  the station's own notifications, with the record's connector, local id and
  start time): a TxProfile lives as long as its transaction;
* the task "smart charging limit" (``Lifetime.CHARGE_POINT``: it runs offline
  too), which evaluates the composite limit of each connector, publishes it
  (``limit``, ``tx_profile_in_effect``: what ``evse.ocpp_port.OcppPort`` hands
  the station's arbitration) and sleeps until the next ``next_change`` boundary
  on trio's clock, or until something changes. It never polls.

Rules
-----
* **Every change of the set is decided, saved, then adopted.** A handler
  computes the new set from the current one (pure), writes its persistent part
  (``ProfileStore.save`` in a worker thread; skipped when the ChargePointMax and
  TxDefault profiles did not change, so a TxProfile never touches the disk) and
  only then makes it the set in force and answers. A save that fails changes
  nothing and is answered with a CALLERROR InternalError. A transaction that
  begins or ends while a save is in progress (the hooks change the state
  without waiting) makes the handler decide again on the new state, so a
  TxProfile is never installed for a transaction that ended meanwhile.
* **A TxProfile in RemoteStartTransaction** must be a valid TxProfile without
  a ``transactionId`` (the transaction does not exist yet, so nothing could
  match it) that could be installed (stack level, periods, the number of
  profiles): otherwise the RemoteStart is Rejected and nothing starts. Once
  the start is accepted it is *pending* on its connector (the request's, or
  this station's only one) and counts as that connector's TxProfile as if a
  transaction started now, so the first ampere of the transaction already
  obeys it (the station holds a start's current until its record is written
  and takes the latest limit then). The next transaction that begins on the
  connector gets it installed, bound to it; it is dropped when the start is
  refused, or after ConnectionTimeOut without a transaction.
* **A connector without a transaction** is evaluated as if one started now:
  Relative TxDefault profiles apply from their first period. No current flows
  without a transaction; what this decides is the current a transaction that
  starts is offered first. Only the absolute boundaries (Absolute and
  Recurring schedules, validFrom/validTo) wake the task then.
* **GetCompositeSchedule** reports from the request's whole second (the
  core's window, ``ProfileSet.composite``), capped by the station's own
  maximum (``local_limit``: board, installer, cable). A transaction that began
  within that first second counts from the window's start: the answer's
  resolution is a second, and "no transaction yet" for a fraction of period 0
  would only confuse.
* **Time.** Profiles are in the central system's time (``ChargePoint.now``);
  a transaction's start is the station's time, moved by the clock offset. A
  boundary is turned into a trio deadline once (``boundary - now`` from
  ``trio.current_time()``); a clock step (the charge point's ``timing``
  parking lot) makes the task convert again. Woken by that deadline, the task
  evaluates at the boundary itself even if the wall clock reads a little
  earlier, so a change is never missed nor waited for twice.

The published limit is the raw composite in A (``None``: no profile applies).
Below 6 A being 0 A, the other limits, and the offline fallback are the
station's arbitration (``evse.limits.arbitrate``): offline, the fallback limit
applies unless a TxProfile of the running transaction is in effect
(``tx_profile_in_effect``), see evse/limits.py for that precedence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio

from ocpp16.errors import CallError, OcppError
from ocpp16.profiles import Handler, Lifetime, Task
from ocpp16.smart_charging import (
    RELATIVE,
    TX_PROFILE,
    ChargingProfile,
    ProfileRejected,
    ProfileSet,
    SmartChargingConfig,
    Transaction,
    UnknownConnector,
    parse_profile,
    profile_next_change,
)

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint
    from ocpp16.profile_store import ProfileStore

log = logging.getLogger(__name__)

#: How long after a failed load of the stored profiles it is tried again (s).
LOAD_RETRY = 10.0
#: The station's own maximum current when nobody said (``local_limit``): the
#: port sets the real one (hardware, installer, cable).
DEFAULT_LOCAL_LIMIT = 32.0


@dataclass(slots=True)
class _Running:
    """A transaction running on a connector, as the station reported it."""

    local_id: int
    #: Its start on the station's (system) clock.
    started_at: datetime
    #: The central system's transactionId, once its StartTransaction is answered.
    transaction_id: int | None = None


@dataclass(frozen=True, slots=True)
class _Pending:
    """A RemoteStartTransaction's TxProfile, waiting for the transaction it starts."""

    connector_id: int | None  # None: whichever connector the transaction begins on
    id_tag: str
    profile: ChargingProfile
    expires: float  # trio time: ConnectionTimeOut after the RemoteStart


@dataclass(frozen=True, slots=True)
class _Published:
    """What the task last published for a connector."""

    limit: float | None = None
    tx_profile: bool = False


@dataclass(slots=True)
class _Wait:
    """The task's next wake-up: the trio deadline and the boundary it stands for."""

    deadline: float = float("inf")
    boundary: datetime | None = None
    published: dict[int, _Published] = field(default_factory=dict)


class SmartChargingProfile:
    """OCPP 1.6 Smart Charging on the session; ``store`` keeps ChargePointMax and
    TxDefault profiles across restarts (None: kept in memory only)."""

    name = "SmartCharging"

    def __init__(self, cp: ChargePoint, store: ProfileStore | None = None) -> None:
        self.cp = cp
        self.store = store
        c = cp.config
        self.config = SmartChargingConfig(
            number_of_connectors=c.get_int("NumberOfConnectors"),
            max_stack_level=c.get_int("ChargeProfileMaxStackLevel"),
            max_profiles=c.get_int("MaxChargingProfilesInstalled"),
            max_periods=c.get_int("ChargingScheduleMaxPeriods"),
        )
        #: The installed profiles in force (replaced, never changed in place).
        self.profiles = ProfileSet(self.config)
        #: Told (without waiting) when a published limit changed: the station
        #: recomputes its offer (``OcppPort`` sets it).
        self.limits_changed: Callable[[], None] = lambda: None
        #: The station's own maximum for a connector (0: the station), the cap of
        #: every GetCompositeSchedule period (``OcppPort`` sets it).
        self.local_limit: Callable[[int], float] = lambda connector_id: DEFAULT_LOCAL_LIMIT
        self.handlers: dict[str, Handler] = {
            "SetChargingProfile": self.set_charging_profile,
            "ClearChargingProfile": self.clear_charging_profile,
            "GetCompositeSchedule": self.get_composite_schedule,
        }
        self._loaded = trio.Event()
        self._load_lock = trio.Lock()
        self._change_lock = trio.Lock()
        #: Bumped by every change of the state a decision depends on.
        self._generation = 0
        self._running: dict[int, _Running] = {}
        self._pending: list[_Pending] = []
        self._published: dict[int, _Published] = {}
        self._wakeup = trio.Event()

    def tasks(self) -> Sequence[Task]:
        return (Task("smart charging limit", self.run_limits, Lifetime.CHARGE_POINT),)

    # -- what the station reads -------------------------------------------------------

    def limit(self, connector_id: int) -> float | None:
        """The smart-charging limit in A now published for a connector (None: none)."""
        return self._published.get(connector_id, _Published()).limit

    def tx_profile_in_effect(self, connector_id: int) -> bool:
        """A TxProfile of the connector's transaction (or of the RemoteStart that is
        starting one) is part of the published limit."""
        return self._published.get(connector_id, _Published()).tx_profile

    # -- loading --------------------------------------------------------------------------

    async def _ensure_loaded(self) -> None:
        """The stored profiles, once (a restarted charge point keeps its set).

        Raises ``OcppError`` (ProfileStoreError) when the store cannot be read:
        no change may then be saved over rows that were never read.
        """
        if self._loaded.is_set():
            return
        async with self._load_lock:
            if self._loaded.is_set():
                return
            if self.store is not None:
                loaded = await trio.to_thread.run_sync(self.store.load, self.config)
                for profile_id, reason in self.store.dropped:
                    log.warning("stored charging profile %d dropped: %s", profile_id, reason)
                # Before any change was adopted (changes wait for the load).
                self.profiles = loaded
                log.info("%d stored charging profile(s) loaded", len(loaded))
            self._loaded.set()
            self._changed()

    async def _loaded_or_error(self) -> None:
        try:
            await self._ensure_loaded()
        except OcppError as exc:
            raise CallError("InternalError", f"charging profiles not readable: {exc}") from exc

    # -- transactions (the charge point's hooks) ------------------------------------------

    def _connector(self, connector_id: int | None, local_id: int | None = None) -> int | None:
        if connector_id is not None:
            return connector_id
        station = self.cp.station
        if local_id is not None:
            for cid in station.connector_ids:
                if station.running_transaction(cid) == local_id:
                    return cid
        ids = station.connector_ids
        return ids[0] if len(ids) == 1 else None

    def _connector_of(self, local_id: int) -> int | None:
        return next((c for c, run in self._running.items() if run.local_id == local_id), None)

    def transaction_began(
        self, *, local_id: int, connector_id: int | None, started_at: datetime
    ) -> None:
        """A transaction began (its record is written): a pending RemoteStart
        TxProfile of its connector is installed for it."""
        cid = self._connector(connector_id, local_id)
        if cid is None:
            log.error("transaction %d: no connector known; smart charging ignores it", local_id)
            return
        self._running[cid] = _Running(local_id, started_at)
        pending = next((p for p in self._pending if p.connector_id in (cid, None)), None)
        if pending is not None:
            self._pending.remove(pending)
            result = self.profiles.install(
                cid, pending.profile, now=self.cp.now(), transactions={cid: None}
            )
            if result.accepted:
                self.profiles = result.profiles
                log.info(
                    "TxProfile %d of the RemoteStart for %s applies to transaction %d",
                    pending.profile.id,
                    pending.id_tag,
                    local_id,
                )
            else:
                log.error(
                    "TxProfile %d of the RemoteStart for %s not installed: %s",
                    pending.profile.id,
                    pending.id_tag,
                    result.reason,
                )
        self._changed()

    def transaction_identified(self, local_id: int, transaction_id: object) -> None:
        """Its StartTransaction was answered with the central system's id."""
        cid = self._connector_of(local_id)
        if cid is None or not isinstance(transaction_id, int) or isinstance(transaction_id, bool):
            return
        self._running[cid].transaction_id = transaction_id
        self.profiles = self.profiles.bind_transaction(cid, transaction_id)
        self._changed()

    def transaction_ending(self, local_id: int) -> None:
        """The transaction is over: its TxProfiles are removed (never restored)."""
        cid = self._connector_of(local_id)
        if cid is None:
            return
        run = self._running.pop(cid)
        self.profiles = self.profiles.transaction_ended(cid, run.transaction_id)
        self._changed()

    async def _learn_transaction_ids(self) -> None:
        """The central ids of running transactions not yet known here (the queue has
        them once their StartTransaction was answered)."""
        for run in list(self._running.values()):
            if run.transaction_id is None:
                real = await trio.to_thread.run_sync(
                    self.cp.queue.real_transaction_id, run.local_id
                )
                if real is not None and run.transaction_id is None:
                    self.transaction_identified(run.local_id, real)

    def _transaction_ids(self) -> dict[int, int | None]:
        return {cid: run.transaction_id for cid, run in self._running.items()}

    def _tx_start(self, run: _Running) -> datetime:
        """The transaction's start in the central system's time."""
        offset = self.cp.clock.offset
        return run.started_at + offset if offset is not None else run.started_at

    # -- RemoteStartTransaction (5.11; Core's RemoteStartProfiles hook) ---------------------

    def _remote_start_profile(
        self, connector_id: int | None, payload: dict[str, Any]
    ) -> ChargingProfile:
        """The request's chargingProfile, parsed; ProfileRejected if it cannot apply."""
        cid = self._connector(connector_id)
        parse_on = cid if cid is not None else self.cp.station.connector_ids[0]
        profile = parse_profile(parse_on, payload, self.config)
        if profile.purpose is not TX_PROFILE:
            raise ProfileRejected(
                f"{profile.purpose.value} in RemoteStartTransaction: only a TxProfile (5.11)"
            )
        if profile.transaction_id is not None:
            raise ProfileRejected(
                "transactionId in RemoteStartTransaction's TxProfile: the transaction"
                " does not exist yet"
            )
        trial = self.profiles.install(
            parse_on, profile, now=self.cp.now(), transactions={parse_on: None}
        )
        if not trial.accepted:
            raise ProfileRejected(trial.reason or "not installable")
        return profile

    async def check(self, connector_id: int | None, payload: dict[str, Any]) -> bool:
        """Whether a RemoteStartTransaction's chargingProfile can be used."""
        await self._loaded_or_error()
        try:
            self._remote_start_profile(connector_id, payload)
        except ProfileRejected as exc:
            log.info("RemoteStartTransaction rejected: %s", exc.reason)
            return False
        return True

    def expect(self, connector_id: int | None, id_tag: str, payload: dict[str, Any]) -> None:
        """The start goes ahead (``check`` said yes): the profile is pending on its
        connector, in force from now, until the transaction it starts begins."""
        try:
            profile = self._remote_start_profile(connector_id, payload)
        except ProfileRejected as exc:  # the state changed since ``check``
            log.error("TxProfile of the RemoteStart for %s not kept: %s", id_tag, exc.reason)
            return
        expires = trio.current_time() + self.cp.config.get_int("ConnectionTimeOut")
        self._pending = [p for p in self._pending if p.id_tag != id_tag]
        self._pending.append(_Pending(self._connector(connector_id), id_tag, profile, expires))
        self._changed()

    def forget(self, id_tag: str) -> None:
        """The start was refused: its pending profile goes."""
        before = len(self._pending)
        self._pending = [p for p in self._pending if p.id_tag != id_tag]
        if len(self._pending) != before:
            self._changed()

    # -- the central system's calls ---------------------------------------------------------

    async def _commit(
        self, decide: Callable[[ProfileSet], tuple[ProfileSet, Any]], what: str
    ) -> Any:
        """Decide a change on the current set, persist it, then adopt it.

        ``decide`` is pure: the new set and the answer. It runs again when the
        state changed while the save was in progress (a transaction began or
        ended). A failed save changes nothing: CallError InternalError.
        """
        async with self._change_lock:
            saved: ProfileSet | None = None  # what this call last wrote to the store
            while True:
                base, generation = self.profiles, self._generation
                new, answer = decide(base)
                store = self.store
                written = base if saved is None else saved
                if store is not None and new.persistent() != written.persistent():
                    # Also when a decision taken again undoes what was written.
                    try:
                        await trio.to_thread.run_sync(store.save, new)
                    except OcppError as exc:
                        log.error("%s not saved: %s", what, exc)
                        raise CallError(
                            "InternalError", f"charging profiles not saved: {exc}"
                        ) from exc
                    saved = new
                if generation != self._generation:
                    continue  # a transaction began or ended meanwhile: decide again
                if new is not base:
                    self.profiles = new
                    self._changed()
                return answer

    async def set_charging_profile(self, p: dict[str, Any]) -> dict[str, Any]:
        """SetChargingProfile (5.16): validated first, then replaced; Rejected changes
        nothing. A TxProfile needs a running transaction (the same one, when it
        names one)."""
        await self._loaded_or_error()
        await self._learn_transaction_ids()
        connector_id = p["connectorId"]
        payload = p["csChargingProfiles"]

        def decide(base: ProfileSet) -> tuple[ProfileSet, Any]:
            result = base.set_profile(
                connector_id, payload, now=self.cp.now(), transactions=self._transaction_ids()
            )
            return result.profiles, result

        result = await self._commit(decide, "SetChargingProfile")
        profile_id = payload.get("chargingProfileId")
        if result.accepted:
            log.info("charging profile %s installed on connector %d", profile_id, connector_id)
        else:
            log.info("charging profile %s rejected: %s", profile_id, result.reason)
        conf: dict[str, Any] = result.conf()
        return conf

    async def clear_charging_profile(self, p: dict[str, Any]) -> dict[str, Any]:
        """ClearChargingProfile (5.5): no field clears all; the given ones must all
        match; ``id`` alone decides; nothing matched is Unknown."""
        await self._loaded_or_error()

        def decide(base: ProfileSet) -> tuple[ProfileSet, Any]:
            result = base.clear_request(p)
            return result.profiles, result

        result = await self._commit(decide, "ClearChargingProfile")
        if result.removed:
            log.info("charging profile(s) %s cleared", ", ".join(map(str, result.removed)))
        conf: dict[str, Any] = result.conf()
        return conf

    async def get_composite_schedule(self, p: dict[str, Any]) -> dict[str, Any]:
        """GetCompositeSchedule (5.7): from receipt for ``duration`` (at most 24 h);
        connector 0 is the station; an unknown connector is Rejected."""
        await self._loaded_or_error()
        await self._learn_transaction_ids()
        connector_id = p["connectorId"]
        now = self.cp.now()
        # The window starts on the whole second (the composite's resolution): a
        # transaction that began within that second counts from the window's
        # start, not as "no transaction yet" for a fraction of the first period.
        window = now.replace(microsecond=0)
        transactions = {
            cid: Transaction(min(self._tx_start(run), window), run.transaction_id)
            for cid, run in self._running.items()
        }
        try:
            composite = self.profiles.composite(
                now,
                connector_id,
                p["duration"],
                p.get("chargingRateUnit"),
                local_limit=self.local_limit(connector_id),
                transactions=transactions,
            )
        except UnknownConnector as exc:
            log.info("GetCompositeSchedule rejected: %s", exc)
            return {"status": "Rejected"}
        conf: dict[str, Any] = composite.conf()
        return conf

    # -- the limit task -----------------------------------------------------------------------

    def _changed(self) -> None:
        """The state changed: publish at once, and let the task reschedule."""
        self._generation += 1
        self._refresh(self.cp.now())
        self._wakeup.set()

    def _evaluate(self, now: datetime) -> _Wait:
        """Every connector's limit at ``now``, and when to look again (pure but for
        dropping expired pending profiles)."""
        clock_now = trio.current_time()
        self._pending = [p for p in self._pending if p.expires > clock_now]
        wait = _Wait()
        boundaries: list[datetime] = []
        profiles = self.profiles
        for cid in self.cp.station.connector_ids:
            run = self._running.get(cid)
            if run is not None:
                start, tx_id = self._tx_start(run), run.transaction_id
                limit = profiles.limit_at(now, cid, start, tx_id)
                tx_only = _tx_profiles(profiles, cid)
                in_effect = tx_only.limit_at(now, cid, start, tx_id) is not None
                change = profiles.next_change(now, cid, start, tx_id)
            else:
                view, pending = profiles, self._pending_for(cid)
                change = profiles.next_change(now, cid)
                if pending is not None:
                    trial = profiles.install(
                        cid, pending.profile, now=now, transactions={cid: None}
                    )
                    if trial.accepted:
                        view = trial.profiles
                    if pending.profile.kind is not RELATIVE:
                        change = _earliest(change, profile_next_change(pending.profile, now))
                # As if a transaction started now (see the module docstring).
                limit = view.limit_at(now, cid, now)
                in_effect = (
                    pending is not None
                    and _tx_profiles(view, cid).limit_at(now, cid, now) is not None
                )
            wait.published[cid] = _Published(limit, in_effect)
            if change is not None:
                boundaries.append(change)
        if boundaries:
            wait.boundary = min(boundaries)
            wait.deadline = clock_now + max(0.0, (wait.boundary - now).total_seconds())
        for pending in self._pending:
            if pending.expires < wait.deadline:
                wait.deadline, wait.boundary = pending.expires, None
        return wait

    def _pending_for(self, connector_id: int) -> _Pending | None:
        return next((p for p in self._pending if p.connector_id in (connector_id, None)), None)

    def _refresh(self, now: datetime) -> _Wait:
        """Evaluate and publish; tell the station when a published value changed."""
        wait = self._evaluate(now)
        changed = [
            (cid, value)
            for cid, value in wait.published.items()
            if value != self._published.get(cid, _Published())
        ]
        self._published = wait.published
        if changed:
            for cid, value in changed:
                log.info(
                    "smart-charging limit of connector %d: %s%s",
                    cid,
                    "none" if value.limit is None else f"{value.limit:g} A",
                    " (TxProfile)" if value.tx_profile else "",
                )
            self.limits_changed()
        return wait

    async def run_limits(self) -> None:
        """Publish each connector's limit, re-evaluated at every boundary on trio's
        clock and whenever profiles, transactions or the clock change."""
        while True:
            try:
                await self._ensure_loaded()
                break
            except OcppError as exc:
                log.error(
                    "stored charging profiles not loaded (retry in %g s): %s", LOAD_RETRY, exc
                )
                await trio.sleep(LOAD_RETRY)
        boundary: datetime | None = None
        while True:
            async with trio.open_nursery() as nursery:
                # Parked before the evaluation: no clock step between the two is lost.
                await nursery.start(self._clock_stepped, nursery.cancel_scope)
                self._wakeup = trio.Event()
                now = self.cp.now()
                if boundary is not None and now < boundary:
                    # Woken by the boundary's deadline: the wall clock may read a
                    # hair earlier; the boundary has come.
                    now = boundary
                boundary = None
                wait = self._refresh(now)
                with trio.move_on_at(wait.deadline) as timer:
                    await self._wakeup.wait()
                if timer.cancelled_caught:
                    boundary = wait.boundary
                nursery.cancel_scope.cancel()

    async def _clock_stepped(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # The charge point's timing inputs changed (its clock stepped): convert again.
        task_status.started()
        await self.cp.timing.park()
        scope.cancel()


def _tx_profiles(profiles: ProfileSet, connector_id: int) -> ProfileSet:
    """Only the connector's TxProfiles: is one of them in effect?"""
    return ProfileSet(
        profiles.config,
        tuple(
            e
            for e in profiles.entries
            if e.profile.purpose is TX_PROFILE and e.connector_id == connector_id
        ),
    )


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
