"""The Core profile (OCPP 1.6 section 3.1): its handlers, transaction messages,
status notifications and meter values.

BootNotification and Heartbeat are Core too, but every profile depends on
the registration and the clock they keep, so the charge point's session runs
them (``ocpp16.chargepoint``). The rest of Core is here:

* the central system's Core calls (section 5): GetConfiguration,
  ChangeConfiguration, RemoteStartTransaction, RemoteStopTransaction,
  ChangeAvailability, Reset, UnlockConnector, ClearCache, DataTransfer;
* transaction messages (section 4.10): the StartTransaction and
  StopTransaction payloads (``start_message``, ``stop_message``), queued by the
  station in its own commit, and the task that delivers the queue;
* StatusNotification (section 4.9), decided by ``policy.StatusPolicy``;
* MeterValues (section 4.7), sampled and clock-aligned, scheduled by
  ``policy.TransactionSampling`` and ``policy.AlignedSchedule``.

The station is reached only through the charge point's ``StationControl``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ocpp16.channel import CallFailed
from ocpp16.errors import ConnectionLost
from ocpp16.metering import MeterSnapshot, format_time, meter_value, parse_measurands
from ocpp16.policy import AlignedSchedule, StatusPolicy, TransactionSampling, status_notification
from ocpp16.profiles import Handler, Lifetime, Task
from ocpp16.queue import QueuedMessage

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint

log = logging.getLogger(__name__)

#: How soon a StatusNotification that failed is tried again (s).
STATUS_RETRY = 5.0
#: Reset.conf goes out before the station resets (the central system must see
#: Accepted, OCPP 1.6 5.14).
RESET_DELAY = 0.5


class RemoteStartProfiles(Protocol):
    """Smart Charging's part in RemoteStartTransaction (5.11): its chargingProfile."""

    async def check(self, connector_id: int | None, profile: dict[str, Any]) -> bool:
        """Whether the profile can apply (a TxProfile); False: the start is Rejected."""
        ...

    def expect(self, connector_id: int | None, id_tag: str, profile: dict[str, Any]) -> None:
        """The start goes ahead: the profile applies to the transaction it starts."""
        ...

    def forget(self, id_tag: str) -> None:
        """The station refused the start."""
        ...


class CoreProfile:
    name = "Core"

    def __init__(self, cp: ChargePoint) -> None:
        self.cp = cp
        self.status = StatusPolicy()
        self.sampling = TransactionSampling()
        self.aligned = AlignedSchedule()
        self._queue_wakeup = trio.Event()
        self._status_wakeup = trio.Event()
        #: Set (and replaced) each time a StatusNotification is accepted.
        self._status_reported = trio.Event()
        #: Who takes a RemoteStartTransaction's chargingProfile (Smart Charging);
        #: None: the profile is ignored.
        self.remote_start_profiles: RemoteStartProfiles | None = None
        self.handlers: dict[str, Handler] = {
            "GetConfiguration": self.get_configuration,
            "ChangeConfiguration": self.change_configuration,
            "RemoteStartTransaction": self.remote_start,
            "RemoteStopTransaction": self.remote_stop,
            "ChangeAvailability": self.change_availability,
            "Reset": self.reset,
            "UnlockConnector": self.unlock,
            "ClearCache": self.clear_cache,
            "DataTransfer": self.data_transfer,
        }

    def tasks(self) -> Sequence[Task]:
        return (
            Task("status notifications", self.send_statuses),
            Task("transaction queue", self.send_queue),
            Task("meter values", self.sample_periodically, Lifetime.CHARGE_POINT),
            Task("clock-aligned meter values", self.sample_aligned, Lifetime.CHARGE_POINT),
        )

    # -- what the station tells us --------------------------------------------------------

    def status_changed(self) -> None:
        self._status_wakeup.set()

    async def status_reported(self) -> None:
        """Return once the next StatusNotification is accepted (any connector)."""
        await self._status_reported.wait()

    def start_message(
        self,
        *,
        connector_id: int,
        id_tag: str,
        meter_start_wh: float,
        timestamp: datetime,
        reservation_id: int | None = None,
    ) -> dict[str, Any]:
        """The StartTransaction.req payload; ``reservation_id``: the reservation
        the transaction uses (OCPP 1.6 5.13)."""
        payload: dict[str, Any] = {
            "connectorId": connector_id,
            "idTag": id_tag,
            "meterStart": round(meter_start_wh),
        }
        if reservation_id is not None:
            payload["reservationId"] = reservation_id
        payload["timestamp"] = self.cp.clock.stamp(timestamp, payload)
        return payload

    def stop_message(
        self,
        *,
        local_id: int,
        meter_stop_wh: float,
        stopped_at: datetime,
        reason: str,
        stop_id_tag: str | None,
        samples: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The StopTransaction.req payload (``samples``: ``take_samples``)."""
        stop: dict[str, Any] = {
            # The queue substitutes the real id once StartTransaction has one.
            "transactionId": -local_id,
            "meterStop": round(meter_stop_wh),
            "reason": reason,
        }
        stop["timestamp"] = self.cp.clock.stamp(stopped_at, stop)
        if stop_id_tag:
            stop["idTag"] = stop_id_tag
        if samples:
            stop["transactionData"] = samples
        return stop

    def _edge_value(
        self, snapshot: MeterSnapshot, context: str, at: datetime
    ) -> dict[str, Any] | None:
        """A transaction's Begin or End StopTxnSampledData value, stamped."""
        measurands = parse_measurands(str(self.cp.config.text("StopTxnSampledData")))
        value = meter_value(snapshot, measurands, context, at=at)
        if value is not None:
            value["timestamp"] = self.cp.clock.stamp(at, value)
        return value

    def begin_transaction(
        self, *, local_id: int, timestamp: datetime, begin: MeterSnapshot | None = None
    ) -> None:
        """A transaction started (its StartTransaction is queued): sample it."""
        first = (
            self._edge_value(begin, "Transaction.Begin", timestamp) if begin is not None else None
        )
        self.sampling.begin(local_id, trio.current_time(), first)
        self.cp.timing.unpark_all()
        self._queue_wakeup.set()

    def take_samples(
        self, local_id: int, *, end: MeterSnapshot | None = None, stopped_at: datetime
    ) -> list[dict[str, Any]]:
        """The transaction's StopTxnSampledData (OCPP 1.6 section 9.1), its end value
        last; its sampling stops."""
        values = self.sampling.end(local_id)
        self.cp.timing.unpark_all()
        last = self._edge_value(end, "Transaction.End", stopped_at) if end is not None else None
        if last is not None:
            values.append(last)
        return values

    def end_transaction(self) -> None:
        """A StopTransaction was queued: send it."""
        self._queue_wakeup.set()

    # -- status notifications (OCPP 1.6 section 4.9) ----------------------------------------

    async def send_statuses(self) -> None:
        """Every connector's status, on (re)connect and on every change, as
        ``StatusPolicy`` decides (MinimumStatusDuration, the start's order)."""
        cp = self.cp
        self.status.reconnected()
        while True:
            self._status_wakeup = trio.Event()
            wait = math.inf
            now = trio.current_time()
            minimum = cp.config.get_float("MinimumStatusDuration")
            for cid in (0, *cp.station.connector_ids):
                current = cp.station.status_of(cid)
                decision = self.status.decide(cid, current, now=now, minimum=minimum)
                if not decision.report:
                    wait = min(wait, decision.wait)
                    continue
                if self.status.follows_start(current) and self.status.ask_queue(
                    trio.current_time()
                ):
                    # Charging is reported after its StartTransaction: the queue
                    # sender wakes us when the Start is answered.
                    hold = self.status.start_wait(now, await self._start_pending())
                    if hold is not None:
                        wait = min(wait, hold)
                        continue
                payload = status_notification(cid, current, format_time(cp.now()))
                try:
                    await cp.call("StatusNotification", payload)
                    self.status.reported(cid, current)
                    self._status_reported.set()
                    self._status_reported = trio.Event()
                except CallFailed as exc:
                    log.warning("StatusNotification failed: %s", exc)
                    wait = min(wait, STATUS_RETRY)
            with trio.move_on_after(wait):
                await self._status_wakeup.wait()

    async def _start_pending(self) -> bool:
        """A StartTransaction is next in the queue (not yet answered)."""
        head = await trio.to_thread.run_sync(self.cp.queue.head)
        return head is not None and head.action == "StartTransaction"

    # -- the transaction queue (OCPP 1.6 section 4.10) ---------------------------------------

    async def send_queue(self) -> None:
        """Deliver queued transaction messages, oldest first, each until answered.

        TransactionMessageAttempts / TransactionMessageRetryInterval count
        CALLERRORs and timeouts while connected only; a lost connection ends
        this task and the message is sent again after the reconnect, with the
        same message id.
        """
        cp = self.cp
        message, payload = await trio.to_thread.run_sync(self._advance, None)
        while True:
            if message is None or payload is None:
                self._queue_wakeup = trio.Event()
                message, payload = await trio.to_thread.run_sync(self._advance, None)
                if message is None:
                    await self._queue_wakeup.wait()
                continue
            payload = cp.clock.prepare(message.action, payload)
            try:
                answer = await cp.call(message.action, payload, unique_id=message.unique_id)
            except CallFailed as exc:
                if not exc.counts:
                    raise ConnectionLost(exc.reason) from None
                attempts = cp.config.get_int("TransactionMessageAttempts")
                dead = await trio.to_thread.run_sync(
                    partial(cp.queue.failed, message.seq, exc.reason, max_attempts=attempts)
                )
                if dead:
                    log.error(
                        "%s (transaction %d) gave up after %d attempts: %s",
                        message.action,
                        message.local_tx_id,
                        attempts,
                        exc.reason,
                    )
                else:
                    retry = cp.config.get_float("TransactionMessageRetryInterval")
                    await trio.sleep(retry * (message.attempts + 1))
                message, payload = await trio.to_thread.run_sync(self._advance, None)
                continue
            done = message
            # One trip to the disk per message: the answer is recorded (with its
            # id mapping, in one SQLite transaction) and the next message fetched,
            # whose transactionId that mapping may fill in. A worker thread is not
            # cancellable, so a recorded answer is never half-written.
            message, payload = await trio.to_thread.run_sync(self._advance, (done.seq, answer))
            await self._record_id_tag_info(done, answer)
            if done.action == "StartTransaction":
                self._status_wakeup.set()  # a Charging status may wait for this
                self.cp.transaction_identified(done.local_tx_id, answer.get("transactionId"))
                await self._check_start_answer(done.local_tx_id, answer)

    def _advance(
        self, delivered: tuple[int, dict[str, Any]] | None
    ) -> tuple[QueuedMessage | None, dict[str, Any] | None]:
        """(In a worker thread.) Record an answer, then the next message and its payload."""
        queue = self.cp.queue
        if delivered is not None:
            queue.delivered(*delivered)
        message = queue.head()
        if message is None:
            return None, None
        return message, queue.payload_for_sending(message)

    async def _record_id_tag_info(self, done: QueuedMessage, answer: dict[str, Any]) -> None:
        """A StartTransaction or StopTransaction answer's idTagInfo, for the idTag its
        request carried, goes into the authorization cache (OCPP 1.6 3.5.1)."""
        id_tag = done.payload.get("idTag")
        info = answer.get("idTagInfo")
        if (
            done.action in ("StartTransaction", "StopTransaction")
            and isinstance(id_tag, str)
            and isinstance(info, dict)
        ):
            await self.cp.id_tag_info_received(done.action, id_tag, info)

    async def _check_start_answer(self, local_id: int, answer: dict[str, Any]) -> None:
        """StopTransactionOnInvalidId (OCPP 1.6 9.1.27): a StartTransaction answered
        not Accepted stops the transaction (DeAuthorized) when true; when false the
        transaction goes on without energy (SuspendedEVSE) until it ends."""
        info = answer.get("idTagInfo")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "Accepted":
            return
        if self.cp.config.get_bool("StopTransactionOnInvalidId"):
            log.warning(
                "transaction %d: idTag %s at the central system: stopping", local_id, status
            )
            await self.cp.station.deauthorize(local_id)
        else:
            log.warning(
                "transaction %d: idTag %s at the central system: no energy for the rest of it",
                local_id,
                status,
            )
            await self.cp.station.suspend_transaction(local_id)

    # -- meter values (OCPP 1.6 section 4.7) ---------------------------------------------------

    async def sample_periodically(self) -> None:
        """Transaction MeterValues every MeterValueSampleInterval, counted from each
        transaction's start, online or not: they are queued.

        The interval is read again every cycle and a change wakes the wait, so a
        ChangeConfiguration applies at once.
        """
        cp = self.cp
        while True:
            interval = cp.config.get_int("MeterValueSampleInterval")
            due = self.sampling.next_due(trio.current_time(), interval)
            if due is None:
                await cp.timing.park()
                continue
            at, local = due
            with trio.move_on_at(at):
                await cp.timing.park()
                continue
            for cid in cp.station.connector_ids:
                if cp.station.running_transaction(cid) == local:
                    await self._sample(cid, "Sample.Periodic", "MeterValuesSampledData")

    async def sample_aligned(self) -> None:
        """MeterValues exactly on ClockAlignedDataInterval boundaries.

        Each boundary is read once: if our clock steps back (the central
        system's currentTime), the same boundary is not read again.
        """
        cp = self.cp
        while True:
            interval = cp.config.get_int("ClockAlignedDataInterval")
            if interval <= 0:
                await cp.timing.park()
                continue
            now = cp.now()
            boundary = self.aligned.next(now, interval)
            # Waited on trio's clock; a clock correction wakes us to recompute.
            with trio.move_on_after((boundary - now).total_seconds()):
                await cp.timing.park()
                continue
            self.aligned.read(boundary)
            for cid in cp.station.connector_ids:
                await self._sample(cid, "Sample.Clock", "MeterValuesAlignedData", at=boundary)

    async def _sample(
        self, connector_id: int, context: str, key: str, *, at: datetime | None = None
    ) -> None:
        cp = self.cp
        snapshot = cp.station.meter_snapshot(connector_id)
        if snapshot is None:
            return
        stamp = at or cp.now()
        local = cp.station.running_transaction(connector_id)
        stop_key = {"Sample.Periodic": "StopTxnSampledData", "Sample.Clock": "StopTxnAlignedData"}
        if local is not None and context in stop_key:
            # StopTxnSampledData / StopTxnAlignedData (OCPP 1.6 9.1.28-29): the
            # transactionData of the StopTransaction, collected whatever
            # MeterValuesSampledData / MeterValuesAlignedData say.
            stop_measurands = parse_measurands(str(cp.config.text(stop_key[context])))
            stop_value = meter_value(snapshot, stop_measurands, context, at=stamp)
            if stop_value is not None:
                self.sampling.add(local, stop_value)
        measurands = parse_measurands(str(cp.config.text(key)))
        value = meter_value(snapshot, measurands, context, at=stamp)
        if value is None:
            return
        if local is not None:
            # Transaction-related: on disk first, delivered in order with the rest.
            payload = {
                "connectorId": connector_id,
                "transactionId": -local,
                "meterValue": [value],
            }
            sink = cp.meter_values_sink
            if sink is None:
                await trio.to_thread.run_sync(
                    lambda: cp.queue.enqueue("MeterValues", payload, local_tx_id=local)
                )
            else:
                # The station records the reading it reports in the same commit,
                # so no stop of this transaction can report less (rule 2).
                at_station = cp.clock.to_station(stamp)
                if not await sink(local, payload, snapshot.energy_wh, at_station):
                    return
            self._queue_wakeup.set()
        elif cp.online:
            try:
                await cp.call("MeterValues", {"connectorId": connector_id, "meterValue": [value]})
            except CallFailed as exc:
                log.info("MeterValues (no transaction) not sent: %s", exc)

    # -- the central system's Core calls (OCPP 1.6 section 5) -----------------------------------

    async def get_configuration(self, p: dict[str, Any]) -> dict[str, Any]:
        """GetConfiguration (5.8); SupportedFeatureProfiles is what is registered."""
        keys = p.get("key") or None
        # More than GetConfigurationMaxKeys names: the registry raises the CallError.
        known, unknown = self.cp.config.get_configuration(keys)
        for entry in known:
            if entry["key"] == "SupportedFeatureProfiles":
                # Derived, never declared: a profile that answers NotSupported is
                # never advertised (the configuration key's default says "Core").
                entry["value"] = self.cp.profiles.supported
        answer: dict[str, Any] = {"configurationKey": known}
        if unknown:
            answer["unknownKey"] = unknown
        return answer

    async def change_configuration(self, p: dict[str, Any]) -> dict[str, Any]:
        """ChangeConfiguration (5.3).

        ``central_system_change``: a SecurityProfile raise also switches the
        address to wss:// where it goes to TLS, and is put on trial (Security
        Whitepaper ed. 3; the charge point takes it back if it does not
        connect). Every change that reconnects does so after this answer.
        """
        # The write (fsync) in a worker thread: the loop serves the rest meanwhile.
        with self.cp.answering_change():
            result = await self.cp.config.central_system_change_async(p["key"], p["value"])
        if result.status != "Accepted":
            log.info("ChangeConfiguration %s: %s (%s)", p["key"], result.status, result.reason)
        return {"status": result.status}

    async def remote_start(self, p: dict[str, Any]) -> dict[str, Any]:
        """RemoteStartTransaction (5.11): AuthorizeRemoteTxRequests asks Authorize first."""
        cp = self.cp
        id_tag = p["idTag"]
        connector_id = p.get("connectorId")
        if connector_id is not None and connector_id not in cp.station.connector_ids:
            return {"status": "Rejected"}
        # A chargingProfile must be a TxProfile Smart Charging can apply to the
        # transaction this starts (without Smart Charging it is ignored).
        profile: dict[str, Any] = p.get("chargingProfile") or {}
        profiles = self.remote_start_profiles if profile else None
        if profiles is not None and not await profiles.check(connector_id, profile):
            return {"status": "Rejected"}
        if cp.config.get_bool("AuthorizeRemoteTxRequests"):
            info = await cp.authorize(id_tag)
            if info is None or info.get("status") != "Accepted":
                return {"status": "Rejected"}
        if profiles is not None:
            # In force before the station starts: the first ampere obeys it.
            profiles.expect(connector_id, id_tag, profile)
        accepted = await cp.station.remote_start(id_tag, connector_id)
        if profiles is not None and not accepted:
            profiles.forget(id_tag)
        return {"status": "Accepted" if accepted else "Rejected"}

    async def remote_stop(self, p: dict[str, Any]) -> dict[str, Any]:
        """RemoteStopTransaction (5.12): only the running transaction, by its real id."""
        cp = self.cp
        wanted = p["transactionId"]
        for cid in cp.station.connector_ids:
            local = cp.station.running_transaction(cid)
            if local is None:
                continue
            real = await trio.to_thread.run_sync(cp.queue.real_transaction_id, local)
            if real is not None and wanted == real:
                stopped = await cp.station.remote_stop(local)
                return {"status": "Accepted" if stopped else "Rejected"}
        return {"status": "Rejected"}

    async def change_availability(self, p: dict[str, Any]) -> dict[str, Any]:
        """ChangeAvailability (5.2); connector 0 is the station."""
        cp = self.cp
        cid = p["connectorId"]
        if cid != 0 and cid not in cp.station.connector_ids:
            return {"status": "Rejected"}
        status = await cp.station.change_availability(cid, p["type"] == "Operative")
        return {"status": status}

    async def reset(self, p: dict[str, Any]) -> dict[str, Any]:
        """Reset (5.14): answered first, then the station resets."""
        hard = p["type"] == "Hard"

        async def later() -> None:
            # Answer first (the central system must see Accepted), then reset.
            await trio.sleep(RESET_DELAY)
            await self.cp.station.reset(hard)

        if not self.cp.start_background(later, name="reset"):
            return {"status": "Rejected"}
        return {"status": "Accepted"}

    async def unlock(self, p: dict[str, Any]) -> dict[str, Any]:
        """UnlockConnector (5.18)."""
        cid = p["connectorId"]
        if cid not in self.cp.station.connector_ids:
            return {"status": "NotSupported"}
        return {"status": await self.cp.station.unlock(cid)}

    async def clear_cache(self, p: dict[str, Any]) -> dict[str, Any]:
        """ClearCache (5.4): the authorization cache (``ocpp16.local_auth``) is emptied
        on disk before the answer; a station without one asks its StationControl."""
        if self.cp.local_auth is not None:
            return {"status": await self.cp.local_auth.clear_cache()}
        return {"status": "Accepted" if await self.cp.station.clear_cache() else "Rejected"}

    async def data_transfer(self, p: dict[str, Any]) -> dict[str, Any]:
        """DataTransfer (5.6)."""
        # No vendor extensions on this station (station-spec section 1).
        return {"status": "UnknownVendorId"}
