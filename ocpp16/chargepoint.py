"""The OCPP 1.6J charge point: the Core profile on top of link, RPC and queue.

Layers (each testable alone): ``transport.Link`` keeps a WebSocket up
(security profiles, back-off, pings); ``rpc.RpcSession`` turns text into
validated calls, results and errors (sans-I/O); ``queue.TransactionQueue``
holds StartTransaction / StopTransaction / transaction MeterValues on disk
until the central system has answered them; ``config.Configuration`` is the
one registry of configuration keys. This module is the application: the
boot sequence, heartbeats, status notifications, meter values, the queue
sender and the handlers of the central system's calls.

It never reaches into the station: it talks to a ``StationControl`` (the
evse side implements it) and is told about transactions and status changes
through its own methods. Failure here never stops charging: the supervisor
runs ``run()`` in an isolated slot and restarts it.

Registration (OCPP 1.6 section 4.2): until BootNotification is Accepted the
charge point sends nothing else; while Pending it answers the central
system's configuration requests (GetConfiguration, ChangeConfiguration,
TriggerMessage, DataTransfer) and refuses the rest with SecurityError;
Rejected, it answers nothing but retries the boot after the interval.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ocpp16.config import Configuration
from ocpp16.errors import CallError, ConnectionLost, OcppError, TransportError
from ocpp16.metering import MeterSnapshot, format_time, meter_value, next_aligned, parse_measurands
from ocpp16.queue import QueuedMessage, TransactionQueue
from ocpp16.status import LinkState, LinkStatus

if TYPE_CHECKING:
    # Loaded when a connection is first made (rpc: jsonschema and the ocpp
    # package's schemas; transport: WebSocket and TLS), not by a station that
    # has no central system configured.
    from ocpp16.rpc import IncomingCall, RpcSession
    from ocpp16.transport import Connection, ConnectionSettings, Link

log = logging.getLogger(__name__)

#: Seconds before a BootNotification is retried when the answer gave no interval.
DEFAULT_BOOT_RETRY = 30.0
#: CALL timeout (OCPP-J leaves it to the implementation).
CALL_TIMEOUT = 30.0

#: Statuses that belong to a running transaction.
_IN_TRANSACTION = frozenset({"Charging", "SuspendedEV", "SuspendedEVSE"})
#: How long a transaction status waits for its StartTransaction to be answered.
START_ORDER_PATIENCE = 10.0

#: What may be answered before BootNotification is Accepted (OCPP 1.6 4.2.1).
ALLOWED_WHILE_PENDING = frozenset(
    {"GetConfiguration", "ChangeConfiguration", "TriggerMessage", "DataTransfer"}
)


#: A queued payload's private marker: its timestamps were taken before the
#: central system set our clock, in the boot named by the value. Stripped
#: before sending (it is not part of any OCPP schema).
UNSYNCED = "_clockNotSet"
BOOT_ID = uuid.uuid4().hex


def _shifted(text: object, offset: timedelta) -> object:
    if not isinstance(text, str):
        return text
    return format_time(datetime.fromisoformat(text.replace("Z", "+00:00")) + offset)


class Registration(StrEnum):
    NONE = "not registered"
    PENDING = "registration pending"
    ACCEPTED = "registered"
    REJECTED = "registration rejected"


@dataclass(frozen=True)
class Identity:
    vendor: str
    model: str
    serial: str
    firmware_version: str
    meter_type: str | None = None


class StationControl(Protocol):
    """What the charge point asks of the station (evse/ocpp_port.py implements it)."""

    connector_ids: tuple[int, ...]

    def status_of(self, connector_id: int) -> tuple[str, str, str]:
        """(ChargePointStatus, ChargePointErrorCode, info) of a connector; 0 = the station."""
        ...

    def meter_snapshot(self, connector_id: int) -> MeterSnapshot | None: ...

    def running_transaction(self, connector_id: int) -> int | None:
        """The local id of the transaction running on a connector."""
        ...

    async def remote_start(self, id_tag: str, connector_id: int | None) -> bool: ...

    async def remote_stop(self, local_tx_id: int) -> bool: ...

    async def change_availability(self, connector_id: int, operative: bool) -> str: ...

    async def unlock(self, connector_id: int) -> str: ...

    async def reset(self, hard: bool) -> None:
        """Stop transactions (SoftReset/HardReset) and restart the firmware."""
        ...

    async def deauthorize(self, local_tx_id: int) -> None:
        """StartTransaction was answered with a non-Accepted idTagInfo."""
        ...

    async def clear_cache(self) -> bool: ...

    def link_changed(self) -> None:
        """Online/offline changed: the station recomputes its limits (fallback)."""
        ...


class CallFailed(OcppError):
    """An outgoing CALL got a CALLERROR, timed out or lost its connection."""

    def __init__(self, action: str, reason: str, *, counts: bool = True) -> None:
        super().__init__(f"{action}: {reason}")
        self.action = action
        self.reason = reason
        #: False when the connection dropped: offline time never costs attempts.
        self.counts = counts


@dataclass
class _TxSamples:
    """StopTxnSampledData collected during one transaction (OCPP 1.6 9.1.21)."""

    values: list[dict[str, Any]] = field(default_factory=list)


class ChargePoint:
    def __init__(
        self,
        *,
        config: Configuration,
        queue: TransactionQueue,
        station: StationControl,
        identity: Identity,
        connection_settings: Callable[[], ConnectionSettings | None],
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.queue = queue
        self.station = station
        self.identity = identity
        self._settings = connection_settings
        #: The system clock (a seam for tests); timestamps convert from it.
        self.wall_clock = wall_clock
        self.registration = Registration.NONE
        self.link_status = LinkStatus(LinkState.DISABLED, "not started", 0.0)
        #: Offset of the central system's clock from ours (set from its answers).
        self.clock_offset: timedelta | None = None
        #: The offset when the clock was first set in this boot: timestamps taken
        #: before that are moved by it when they are sent.
        self.synced_offset: timedelta | None = None
        self._rpc: RpcSession | None = None
        self._conn: Connection | None = None
        self._call_lock = trio.Lock()
        self._call_ended = trio.Event()
        self._waiting: dict[str, trio.MemorySendChannel[object]] = {}
        self._queue_wakeup = trio.Event()
        self._status_wakeup = trio.Event()
        self._sent_status: dict[int, tuple[str, str, str]] = {}
        self._status_seen: dict[int, tuple[tuple[str, str, str], float]] = {}
        self._samples: dict[int, _TxSamples] = {}
        self._link: Link | None = None
        self._link_scope = trio.CancelScope()
        self._booted_once = False
        self._heartbeat_interval: float | None = None
        self._start_wait_since: float | None = None
        #: Woken when a timing input changes (interval keys, transactions).
        self._timing = trio.lowlevel.ParkingLot()
        #: trio time each running transaction started: sampling counts from it.
        self._tx_started: dict[int, float] = {}
        self._last_aligned: datetime | None = None
        self.config.subscribe(self._config_changed)
        self.on_link_change: Callable[[], None] | None = None
        #: Where a transaction's MeterValues go instead of ``queue.enqueue``:
        #: (local id, payload, energy Wh, station time) -> queued? (evse's store).
        self.meter_values_sink: (
            Callable[[int, dict[str, Any], float | None, datetime], Awaitable[bool]] | None
        ) = None

    # -- what the station tells us ------------------------------------------------------

    @property
    def online(self) -> bool:
        return self._conn is not None and self.registration is Registration.ACCEPTED

    def now(self) -> datetime:
        """Our best idea of the time: the central system's, once it told us."""
        now = self.wall_clock()
        return now + self.clock_offset if self.clock_offset is not None else now

    def status_changed(self) -> None:
        self._status_wakeup.set()

    def _stamp(self, at: datetime, holder: dict[str, Any]) -> str:
        """A station (system clock) time for a message, in the central system's time.

        OCPP 1.6 has no field for "this time is unreliable", so a time taken
        before the central system set the clock is never sent as it is: the
        holder (a payload or a MeterValue) is marked, and ``_prepare`` corrects
        it by the offset learned when the clock gets set in this same boot. One
        from an earlier boot is sent as recorded, and logged as such.
        """
        if self.clock_offset is not None:
            return format_time(at + self.clock_offset)
        holder[UNSYNCED] = BOOT_ID
        return format_time(at)

    def _prepare(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Strip the private clock markers, correcting what can be corrected."""
        holders = [payload]
        for key in ("meterValue", "transactionData"):
            holders += [v for v in payload.get(key) or () if isinstance(v, dict)]
        for holder in holders:
            boot = holder.pop(UNSYNCED, None)
            if boot is None:
                continue
            if boot == BOOT_ID and self.synced_offset is not None:
                holder["timestamp"] = _shifted(holder.get("timestamp"), self.synced_offset)
            else:
                log.warning(
                    "%s: a timestamp taken before the clock was set in an earlier "
                    "boot is sent as recorded",
                    action,
                )
        return payload

    # The station writes a transaction's record and its message in one SQLite
    # transaction (rule 2): it asks for the payloads (``start_message``,
    # ``stop_message``, pure), queues them through the store's connection, and
    # then tells us (``begin_transaction``, ``end_transaction``). The two
    # coroutines below do it all here, for a station without such a store.

    def start_message(
        self, *, connector_id: int, id_tag: str, meter_start_wh: float, timestamp: datetime
    ) -> dict[str, Any]:
        """The StartTransaction.req payload."""
        payload: dict[str, Any] = {
            "connectorId": connector_id,
            "idTag": id_tag,
            "meterStart": round(meter_start_wh),
        }
        payload["timestamp"] = self._stamp(timestamp, payload)
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
        stop["timestamp"] = self._stamp(stopped_at, stop)
        if stop_id_tag:
            stop["idTag"] = stop_id_tag
        if samples:
            stop["transactionData"] = samples
        return stop

    def begin_transaction(
        self, *, local_id: int, timestamp: datetime, begin: MeterSnapshot | None = None
    ) -> None:
        """A transaction started (its StartTransaction is queued): sample it."""
        samples = _TxSamples()
        if begin is not None:
            measurands = parse_measurands(str(self.config.text("StopTxnSampledData")))
            value = meter_value(begin, measurands, "Transaction.Begin", at=timestamp)
            if value is not None:
                value["timestamp"] = self._stamp(timestamp, value)
                samples.values.append(value)
        self._samples[local_id] = samples
        self._tx_started[local_id] = trio.current_time()
        self._timing.unpark_all()
        self._queue_wakeup.set()

    def take_samples(
        self, local_id: int, *, end: MeterSnapshot | None = None, stopped_at: datetime
    ) -> list[dict[str, Any]]:
        """The transaction's StopTxnSampledData (OCPP 1.6 9.1.21), its end value
        last; its sampling stops."""
        samples = self._samples.pop(local_id, _TxSamples())
        self._tx_started.pop(local_id, None)
        self._timing.unpark_all()
        if end is not None:
            measurands = parse_measurands(str(self.config.text("StopTxnSampledData")))
            value = meter_value(end, measurands, "Transaction.End", at=stopped_at)
            if value is not None:
                value["timestamp"] = self._stamp(stopped_at, value)
                samples.values.append(value)
        return samples.values

    def end_transaction(self) -> None:
        """A StopTransaction was queued: send it."""
        self._queue_wakeup.set()

    async def transaction_started(
        self,
        *,
        local_id: int,
        connector_id: int,
        id_tag: str,
        meter_start_wh: float,
        timestamp: datetime,
        begin: MeterSnapshot | None = None,
    ) -> None:
        payload = self.start_message(
            connector_id=connector_id,
            id_tag=id_tag,
            meter_start_wh=meter_start_wh,
            timestamp=timestamp,
        )
        await trio.to_thread.run_sync(
            lambda: self.queue.enqueue(
                "StartTransaction", payload, local_tx_id=local_id, dedupe_key=f"start:{local_id}"
            )
        )
        self.begin_transaction(local_id=local_id, timestamp=timestamp, begin=begin)

    async def transaction_ended(
        self,
        *,
        local_id: int,
        connector_id: int,
        id_tag: str,
        meter_start_wh: float,
        started_at: datetime,
        meter_stop_wh: float,
        stopped_at: datetime,
        reason: str,
        stop_id_tag: str | None,
        end: MeterSnapshot | None = None,
    ) -> None:
        """Queue StopTransaction; first StartTransaction if it never was (crash in between)."""
        samples = self.take_samples(local_id, end=end, stopped_at=stopped_at)
        stop = self.stop_message(
            local_id=local_id,
            meter_stop_wh=meter_stop_wh,
            stopped_at=stopped_at,
            reason=reason,
            stop_id_tag=stop_id_tag,
            samples=samples,
        )
        start = self.start_message(
            connector_id=connector_id,
            id_tag=id_tag,
            meter_start_wh=meter_start_wh,
            timestamp=started_at,
        )

        def enqueue() -> None:
            self.queue.enqueue(
                "StartTransaction", start, local_tx_id=local_id, dedupe_key=f"start:{local_id}"
            )
            self.queue.enqueue(
                "StopTransaction", stop, local_tx_id=local_id, dedupe_key=f"stop:{local_id}"
            )

        await trio.to_thread.run_sync(enqueue)
        self.end_transaction()

    async def authorize(self, id_tag: str) -> dict[str, Any] | None:
        """Authorize.req while online; None when offline (no opinion)."""
        if not self.online:
            return None
        try:
            result = await self.call("Authorize", {"idTag": id_tag})
        except CallFailed as exc:
            log.warning("Authorize %s failed: %s", id_tag, exc)
            return None
        info = result.get("idTagInfo")
        return info if isinstance(info, dict) else None

    # -- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection to the central system while one is configured."""
        async with trio.open_nursery() as background:
            # Work that must outlive one connection: a Reset in progress, and
            # meter values, which are taken (and queued) online or not.
            self._nursery_for_background = background
            background.start_soon(self._sampler, name="meter values")
            background.start_soon(self._aligned_sampler, name="clock-aligned meter values")
            await self._connect_forever()

    async def _connect_forever(self) -> None:
        while True:
            settings = self._settings()
            if settings is None:
                self._set_link(
                    LinkStatus(
                        LinkState.DISABLED, "no central system configured", trio.current_time()
                    )
                )
                await self._wait_for_config_change()
                continue
            from ocpp16.transport import Link  # noqa: PLC0415 - see the imports

            self._link = Link(settings, on_status=self._set_link)
            try:
                with trio.CancelScope() as self._link_scope:
                    await self._link.run(self._session)
            finally:
                self._link = None

    async def _wait_for_config_change(self) -> None:
        changed = trio.Event()
        unsubscribe = self.config.subscribe(lambda name, value: changed.set())
        try:
            await changed.wait()
        finally:
            unsubscribe()

    def _config_changed(self, name: str, value: object) -> None:
        if name == "HeartbeatInterval":
            # A ChangeConfiguration overrides the interval the boot answer gave.
            self._heartbeat_interval = None
        if name in ("HeartbeatInterval", "MeterValueSampleInterval", "ClockAlignedDataInterval"):
            self._timing.unpark_all()
        link = self._link
        if link is None:
            return
        if name in {
            "SecurityProfile",
            "AuthorizationKey",
            "CentralSystemAddress",
            "ChargePointId",
            "CentralSystemRootCertificate",
            "WebSocketPingInterval",
            "ReconnectFrequency",
            "ConnectionEnabled",
        }:
            settings = self._settings()
            if settings is None:
                # Connection disabled or address removed: close and stay closed.
                self._link_scope.cancel(reason=f"{name} changed")
                return
            link.update_settings(settings)
            link.reconnect(f"{name} changed")

    def _set_link(self, status: LinkStatus) -> None:
        self.link_status = status
        log.debug("central system link: %s %s", status.state.value, status.reason)
        if self.on_link_change is not None:
            self.on_link_change()

    async def _session(self, conn: Connection) -> None:
        from ocpp16.rpc import IncomingCall, RpcSession  # noqa: PLC0415 - see the imports

        rpc = RpcSession(call_timeout=CALL_TIMEOUT)
        self._rpc, self._conn = rpc, conn
        incoming_send, incoming_receive = trio.open_memory_channel[IncomingCall](16)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, conn, rpc, incoming_send, name="ocpp reader")
                nursery.start_soon(self._answerer, incoming_receive, name="ocpp answerer")
                nursery.start_soon(self._ticker, rpc, name="ocpp call timer")
                await self._register()
                self.station.link_changed()
                self._sent_status.clear()
                self._status_wakeup.set()
                nursery.start_soon(self._heartbeats, name="heartbeat")
                nursery.start_soon(self._status_sender, name="status notifications")
                nursery.start_soon(self._queue_sender, name="transaction queue")
        finally:
            self._rpc, self._conn = None, None
            for event in rpc.connection_lost(trio.current_time()):
                self._dispatch_result(event)
            self._call_ended.set()
            was = self.registration
            if was is Registration.ACCEPTED:
                self.station.link_changed()

    # -- RPC plumbing -----------------------------------------------------------------

    async def _reader(
        self,
        conn: Connection,
        rpc: RpcSession,
        incoming: trio.MemorySendChannel[IncomingCall],
    ) -> None:
        from ocpp16 import rpc as rpc_module  # noqa: PLC0415 - see the imports

        async with incoming:
            while True:
                text = await conn.receive()
                replies, events = rpc.receive(text, trio.current_time())
                for reply in replies:
                    await conn.send(reply)
                for event in events:
                    if isinstance(event, rpc_module.IncomingCall):
                        await incoming.send(event)
                    elif isinstance(event, rpc_module.ProtocolProblem):
                        log.warning("OCPP protocol problem: %s", event.description)
                    else:
                        self._dispatch_result(event)

    def _dispatch_result(self, event: object) -> None:
        unique_id = getattr(event, "unique_id", None)
        if unique_id is None:
            return
        waiter = self._waiting.pop(unique_id, None)
        if waiter is not None:
            waiter.send_nowait(event)
        self._call_ended.set()

    async def _ticker(self, rpc: RpcSession) -> None:
        while True:
            deadline = rpc.next_deadline
            if deadline is None:
                await trio.sleep(0.5)
                continue
            await trio.sleep_until(deadline)
            for event in rpc.tick(trio.current_time()):
                self._dispatch_result(event)

    async def call(
        self, action: str, payload: dict[str, Any], *, unique_id: str | None = None
    ) -> dict[str, Any]:
        """One CALL, answered by its CALLRESULT payload; CallFailed otherwise."""
        async with self._call_lock:
            rpc, conn = self._rpc, self._conn
            if rpc is None or conn is None:
                raise CallFailed(action, "not connected", counts=False)
            while rpc.call_outstanding:
                # A caller gave up waiting (cancelled: an authorization step
                # timed out), but its CALL is still out: one at a time (OCPP-J
                # 4.1.1), so wait for its answer, timeout or the connection's end.
                self._call_ended = trio.Event()
                await self._call_ended.wait()
                if self._rpc is not rpc:
                    raise CallFailed(action, "connection lost", counts=False)
            send, receive = trio.open_memory_channel[object](1)
            sent_id = unique_id or str(uuid.uuid4())
            frame = rpc.send_call(action, payload, trio.current_time(), unique_id=sent_id)
            self._waiting[sent_id] = send
            try:
                await conn.send(frame)
            except (ConnectionLost, TransportError) as exc:
                self._waiting.pop(sent_id, None)
                raise CallFailed(action, f"connection lost: {exc}", counts=False) from None
            event = await receive.receive()
        from ocpp16.rpc import (  # noqa: PLC0415 - see the imports
            CallErrorReceived,
            CallResultReceived,
            CallTimedOut,
        )

        if isinstance(event, CallResultReceived):
            return event.payload
        if isinstance(event, CallErrorReceived):
            raise CallFailed(action, f"{event.code}: {event.description}")
        if isinstance(event, CallTimedOut):
            connected = self._conn is conn
            raise CallFailed(
                action, "no answer" if connected else "connection lost", counts=connected
            )
        raise CallFailed(action, f"unexpected {event!r}")

    async def _answerer(self, incoming: trio.MemoryReceiveChannel[IncomingCall]) -> None:
        async for call in incoming:
            rpc, conn = self._rpc, self._conn
            if rpc is None or conn is None:
                return
            if self.registration is Registration.REJECTED:
                # OCPP 1.6 4.2.1: while Rejected the charge point does not respond.
                log.info("%s ignored: registration rejected", call.action)
                continue
            frame = await self._answer(rpc, call)
            if frame is None or rpc is not self._rpc:
                # The connection this call came on is gone: nobody to answer.
                continue
            await conn.send(frame)

    async def _answer(self, rpc: RpcSession, call: IncomingCall) -> str | None:
        """The reply frame for one incoming call: its result, or the right CALLERROR."""
        try:
            try:
                payload = await self._handle(call)
                return rpc.reply(call.unique_id, payload)
            except CallError as exc:
                return rpc.reply_error(call.unique_id, exc.code, exc.description, exc.details)
            except OcppError as exc:
                log.error("answering %s failed: %s", call.action, exc)
                return rpc.reply_error(call.unique_id, "InternalError", str(exc)[:255])
            except Exception as exc:
                log.exception("handler for %s failed", call.action)
                return rpc.reply_error(call.unique_id, "InternalError", type(exc).__name__)
        except OcppError as exc:
            # reply_error itself refused: the call was forgotten (connection lost).
            log.info("no answer to %s: %s", call.action, exc)
            return None

    # -- registration, heartbeat, clock -----------------------------------------------

    async def _register(self) -> None:
        if self._booted_once and self.registration is Registration.ACCEPTED:
            return
        ident = self.identity
        payload: dict[str, Any] = {
            "chargePointVendor": ident.vendor,
            "chargePointModel": ident.model,
            "chargePointSerialNumber": ident.serial,
            "firmwareVersion": ident.firmware_version,
        }
        if ident.meter_type:
            payload["meterType"] = ident.meter_type[:25]
        while True:
            try:
                answer = await self.call("BootNotification", payload)
            except CallFailed as exc:
                if not exc.counts:
                    raise ConnectionLost(exc.reason) from None
                log.warning("BootNotification failed: %s", exc)
                await trio.sleep(DEFAULT_BOOT_RETRY)
                continue
            self._set_clock(answer.get("currentTime"))
            interval = float(answer.get("interval", 0) or 0)
            status = answer.get("status")
            if status == "Accepted":
                self.registration = Registration.ACCEPTED
                self._booted_once = True
                if interval > 0:
                    # OCPP 1.6 4.2: the interval the central system gives is the
                    # heartbeat interval, even outside the key's own range; the key
                    # follows where its range allows.
                    # Written in a worker thread: never an fsync on the trio thread.
                    await self.config.change_async(
                        "HeartbeatInterval", str(int(interval)), source="boot"
                    )
                    self._heartbeat_interval = interval
                log.info("BootNotification accepted; heartbeat every %.0f s", interval)
                return
            self.registration = (
                Registration.PENDING if status == "Pending" else Registration.REJECTED
            )
            self._set_link(self.link_status)
            wait = interval if interval > 0 else DEFAULT_BOOT_RETRY
            log.warning("BootNotification %s; retrying in %.0f s", status, wait)
            await trio.sleep(wait)

    def _set_clock(self, current_time: object) -> None:
        if not isinstance(current_time, str):
            return
        try:
            theirs = datetime.fromisoformat(current_time.replace("Z", "+00:00"))
        except ValueError:
            return
        if theirs.tzinfo is None:
            return
        previous = self.clock_offset
        self.clock_offset = theirs - self.wall_clock()
        if previous is None or abs(self.clock_offset - previous) > timedelta(seconds=1):
            # Clock-aligned readings follow the central system's time: recompute.
            self._timing.unpark_all()
        if self.synced_offset is None:
            self.synced_offset = self.clock_offset
            log.info(
                "clock set by the central system (offset %.3f s)", self.clock_offset.total_seconds()
            )

    async def _heartbeats(self) -> None:
        last = trio.current_time()
        while True:
            interval = self._heartbeat_interval or float(self.config.get_int("HeartbeatInterval"))
            with trio.move_on_at(last + max(1.0, interval)):
                # A new HeartbeatInterval applies from the last heartbeat, not
                # after the old interval has run out.
                await self._timing.park()
                continue
            last = trio.current_time()
            try:
                answer = await self.call("Heartbeat", {})
                self._set_clock(answer.get("currentTime"))
            except CallFailed as exc:
                log.warning("Heartbeat failed: %s", exc)

    # -- status notifications -----------------------------------------------------------

    async def _status_sender(self) -> None:
        """Every connector's status, on (re)connect and on every change.

        MinimumStatusDuration (OCPP 1.6 9.1.17): a status is reported only
        once it has lasted that long, so short flickers are not sent; a fault
        is reported at once.
        """
        while True:
            self._status_wakeup = trio.Event()
            wait = math.inf
            now = trio.current_time()
            minimum = self.config.get_float("MinimumStatusDuration")
            for cid in (0, *self.station.connector_ids):
                current = self.station.status_of(cid)
                seen = self._status_seen.get(cid)
                if seen is None or seen[0] != current:
                    self._status_seen[cid] = (current, now)
                    seen = (current, now)
                if self._sent_status.get(cid) == current:
                    continue
                held = now - seen[1]
                if current[0] != "Faulted" and held < minimum:
                    wait = min(wait, minimum - held)
                    continue
                status, error, info = current
                if status in _IN_TRANSACTION and await self._start_not_delivered():
                    # Charging is reported after its StartTransaction (the
                    # order a central system and the CTT expect): the queue
                    # sender wakes us when the Start is answered; never wait
                    # longer than the patience allows.
                    since = self._start_wait_since or now
                    wait = min(wait, max(0.0, since + START_ORDER_PATIENCE - now))
                    continue
                payload: dict[str, Any] = {
                    "connectorId": cid,
                    "status": status,
                    "errorCode": error,
                    "timestamp": format_time(self.now()),
                }
                if info:
                    payload["info"] = info[:50]
                try:
                    await self.call("StatusNotification", payload)
                    self._sent_status[cid] = current
                except CallFailed as exc:
                    log.warning("StatusNotification failed: %s", exc)
                    wait = min(wait, 5.0)
            with trio.move_on_after(wait):
                await self._status_wakeup.wait()

    # -- the transaction queue -------------------------------------------------------------

    async def _start_not_delivered(self) -> bool:
        """A StartTransaction is next in the queue (not yet answered)."""
        if self._start_wait_since is None:
            self._start_wait_since = trio.current_time()
        elif trio.current_time() - self._start_wait_since >= START_ORDER_PATIENCE:
            # The queue is stuck (errors, retries): status must not wait for it.
            self._start_wait_since = None
            return False
        head = await trio.to_thread.run_sync(self.queue.head)
        pending = head is not None and head.action == "StartTransaction"
        if not pending:
            self._start_wait_since = None
        return pending

    async def _queue_sender(self) -> None:
        """Deliver queued transaction messages, oldest first, each until answered.

        TransactionMessageAttempts / TransactionMessageRetryInterval count
        CALLERRORs and timeouts while connected only (OCPP 1.6 4.10); a lost
        connection ends this task and the message is sent again after the
        reconnect, with the same message id.
        """
        message, payload = await trio.to_thread.run_sync(self._advance, None)
        while True:
            if message is None or payload is None:
                self._queue_wakeup = trio.Event()
                message, payload = await trio.to_thread.run_sync(self._advance, None)
                if message is None:
                    await self._queue_wakeup.wait()
                continue
            payload = self._prepare(message.action, payload)
            try:
                answer = await self.call(message.action, payload, unique_id=message.unique_id)
            except CallFailed as exc:
                if not exc.counts:
                    raise ConnectionLost(exc.reason) from None
                attempts = self.config.get_int("TransactionMessageAttempts")
                dead = await trio.to_thread.run_sync(
                    partial(self.queue.failed, message.seq, exc.reason, max_attempts=attempts)
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
                    retry = self.config.get_float("TransactionMessageRetryInterval")
                    await trio.sleep(retry * (message.attempts + 1))
                message, payload = await trio.to_thread.run_sync(self._advance, None)
                continue
            done = message
            # One trip to the disk per message: the answer is recorded (with its
            # id mapping, in one SQLite transaction) and the next message fetched,
            # whose transactionId that mapping may fill in. A worker thread is not
            # cancellable, so a recorded answer is never half-written.
            message, payload = await trio.to_thread.run_sync(self._advance, (done.seq, answer))
            if done.action == "StartTransaction":
                self._status_wakeup.set()  # a Charging status may wait for this
                await self._check_start_answer(done.local_tx_id, answer)

    def _advance(
        self, delivered: tuple[int, dict[str, Any]] | None
    ) -> tuple[QueuedMessage | None, dict[str, Any] | None]:
        """(In a worker thread.) Record an answer, then the next message and its payload."""
        if delivered is not None:
            self.queue.delivered(*delivered)
        message = self.queue.head()
        if message is None:
            return None, None
        return message, self.queue.payload_for_sending(message)

    async def _check_start_answer(self, local_id: int, answer: dict[str, Any]) -> None:
        info = answer.get("idTagInfo")
        status = info.get("status") if isinstance(info, dict) else None
        if status != "Accepted" and self.config.get_bool("StopTransactionOnInvalidId"):
            log.warning(
                "transaction %d: idTag %s at the central system: stopping", local_id, status
            )
            await self.station.deauthorize(local_id)

    # -- meter values ----------------------------------------------------------------------

    async def _sampler(self) -> None:
        """Transaction MeterValues every MeterValueSampleInterval, counted from each
        transaction's start (OCPP 1.6 9.1.16), online or not: they are queued.

        The interval is read again every cycle and a change wakes the wait, so a
        ChangeConfiguration applies at once.
        """
        while True:
            interval = self.config.get_int("MeterValueSampleInterval")
            now = trio.current_time()
            due: list[tuple[float, int]] = []
            if interval > 0:
                for local, started in self._tx_started.items():
                    periods = int((now - started) // interval) + 1
                    due.append((started + periods * interval, local))
            if not due:
                await self._timing.park()
                continue
            at, local = min(due)
            with trio.move_on_at(at):
                await self._timing.park()
                continue
            for cid in self.station.connector_ids:
                if self.station.running_transaction(cid) == local:
                    await self._sample(cid, "Sample.Periodic", "MeterValuesSampledData")

    async def _aligned_sampler(self) -> None:
        """MeterValues exactly on ClockAlignedDataInterval boundaries (OCPP 1.6 9.1.2).

        Each boundary is read once: if our clock steps back (the central
        system's currentTime), the same boundary is not read again.
        """
        while True:
            interval = self.config.get_int("ClockAlignedDataInterval")
            if interval <= 0:
                await self._timing.park()
                continue
            now = self.now()
            after = max(now, self._last_aligned) if self._last_aligned else now
            boundary = next_aligned(after, interval)
            # Waited on trio's clock; a clock correction wakes us to recompute.
            with trio.move_on_after((boundary - now).total_seconds()):
                await self._timing.park()
                continue
            self._last_aligned = boundary
            for cid in self.station.connector_ids:
                await self._sample(cid, "Sample.Clock", "MeterValuesAlignedData", at=boundary)

    async def _sample(
        self, connector_id: int, context: str, key: str, *, at: datetime | None = None
    ) -> None:
        snapshot = self.station.meter_snapshot(connector_id)
        if snapshot is None:
            return
        stamp = at or self.now()
        local = self.station.running_transaction(connector_id)
        if local is not None and context == "Sample.Periodic":
            # StopTxnSampledData, collected whatever MeterValuesSampledData says.
            stop_measurands = parse_measurands(str(self.config.text("StopTxnSampledData")))
            stop_value = meter_value(snapshot, stop_measurands, context, at=stamp)
            if stop_value is not None:
                self._samples.setdefault(local, _TxSamples()).values.append(stop_value)
        measurands = parse_measurands(str(self.config.text(key)))
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
            sink = self.meter_values_sink
            if sink is None:
                await trio.to_thread.run_sync(
                    lambda: self.queue.enqueue("MeterValues", payload, local_tx_id=local)
                )
            else:
                # The station records the reading it reports in the same commit,
                # so no stop of this transaction can report less (rule 2).
                at_station = (stamp - self.clock_offset) if self.clock_offset else stamp
                if not await sink(local, payload, snapshot.energy_wh, at_station):
                    return
            self._queue_wakeup.set()
        elif self.online:
            try:
                await self.call("MeterValues", {"connectorId": connector_id, "meterValue": [value]})
            except CallFailed as exc:
                log.info("MeterValues (no transaction) not sent: %s", exc)

    # -- the central system's calls (OCPP 1.6 section 5) ------------------------------------

    async def _handle(self, call: IncomingCall) -> dict[str, Any]:
        if self.registration is not Registration.ACCEPTED and (
            self.registration is Registration.REJECTED or call.action not in ALLOWED_WHILE_PENDING
        ):
            raise CallError(
                "SecurityError",
                f"{call.action} refused: charge point is {self.registration.value}",
            )
        handler = _HANDLERS.get(call.action)
        if handler is None:
            raise CallError("NotSupported", f"{call.action} is not supported")
        return await handler(self, call.payload)

    async def _get_configuration(self, p: dict[str, Any]) -> dict[str, Any]:
        keys = p.get("key") or None
        # More than GetConfigurationMaxKeys names: the registry raises the CallError.
        known, unknown = self.config.get_configuration(keys)
        answer: dict[str, Any] = {"configurationKey": known}
        if unknown:
            answer["unknownKey"] = unknown
        return answer

    async def _change_configuration(self, p: dict[str, Any]) -> dict[str, Any]:
        # The write (fsync) in a worker thread: the loop serves the rest meanwhile.
        result = await self.config.change_async(p["key"], p["value"], source="ocpp")
        if result.status != "Accepted":
            log.info("ChangeConfiguration %s: %s (%s)", p["key"], result.status, result.reason)
        return {"status": result.status}

    async def _remote_start(self, p: dict[str, Any]) -> dict[str, Any]:
        id_tag = p["idTag"]
        connector_id = p.get("connectorId")
        if connector_id is not None and connector_id not in self.station.connector_ids:
            return {"status": "Rejected"}
        if self.config.get_bool("AuthorizeRemoteTxRequests"):
            info = await self.authorize(id_tag)
            if info is None or info.get("status") != "Accepted":
                return {"status": "Rejected"}
        accepted = await self.station.remote_start(id_tag, connector_id)
        return {"status": "Accepted" if accepted else "Rejected"}

    async def _remote_stop(self, p: dict[str, Any]) -> dict[str, Any]:
        wanted = p["transactionId"]
        for cid in self.station.connector_ids:
            local = self.station.running_transaction(cid)
            if local is None:
                continue
            real = await trio.to_thread.run_sync(self.queue.real_transaction_id, local)
            if real is not None and wanted == real:
                stopped = await self.station.remote_stop(local)
                return {"status": "Accepted" if stopped else "Rejected"}
        return {"status": "Rejected"}

    async def _change_availability(self, p: dict[str, Any]) -> dict[str, Any]:
        cid = p["connectorId"]
        if cid != 0 and cid not in self.station.connector_ids:
            return {"status": "Rejected"}
        status = await self.station.change_availability(cid, p["type"] == "Operative")
        return {"status": status}

    async def _reset(self, p: dict[str, Any]) -> dict[str, Any]:
        hard = p["type"] == "Hard"

        async def later() -> None:
            # Answer first (the central system must see Accepted), then reset.
            await trio.sleep(0.5)
            await self.station.reset(hard)

        nursery = self._nursery_for_background
        if nursery is None:
            return {"status": "Rejected"}
        nursery.start_soon(later, name="reset")
        return {"status": "Accepted"}

    _nursery_for_background: trio.Nursery | None = None

    async def _unlock(self, p: dict[str, Any]) -> dict[str, Any]:
        cid = p["connectorId"]
        if cid not in self.station.connector_ids:
            return {"status": "NotSupported"}
        return {"status": await self.station.unlock(cid)}

    async def _clear_cache(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"status": "Accepted" if await self.station.clear_cache() else "Rejected"}

    async def _data_transfer(self, p: dict[str, Any]) -> dict[str, Any]:
        # No vendor extensions on this station (station-spec section 1).
        return {"status": "UnknownVendorId"}


_Handler = Callable[[ChargePoint, dict[str, Any]], Awaitable[dict[str, Any]]]

_HANDLERS: dict[str, _Handler] = {
    "GetConfiguration": ChargePoint._get_configuration,
    "ChangeConfiguration": ChargePoint._change_configuration,
    "RemoteStartTransaction": ChargePoint._remote_start,
    "RemoteStopTransaction": ChargePoint._remote_stop,
    "ChangeAvailability": ChargePoint._change_availability,
    "Reset": ChargePoint._reset,
    "UnlockConnector": ChargePoint._unlock,
    "ClearCache": ChargePoint._clear_cache,
    "DataTransfer": ChargePoint._data_transfer,
}
