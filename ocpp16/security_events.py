"""Security events: the security log and SecurityEventNotification (OCPP 1.6 Security
Whitepaper ed. 3, "Security events").

The whitepaper has the charge point keep a security log and tell the central
system about security events with SecurityEventNotification {type, timestamp,
techInfo}; its table of events marks each one critical or not ("critical"
events are the ones the central system must be told about). ``EVENTS`` is
that table. ``SecurityEvents.emit(type, tech_info)`` is the one way to raise
an event, from any thread, before trio runs or inside it:

1. a record on the ``evse.security`` logger (``ops.logs`` writes it to
   ``security.log`` as well as to the main log), at once;
2. the notification queued persistently (``ocpp16.queue.SecurityEventQueue``,
   in the station's SQLite file), by a writer thread of its own, so the caller
   never waits for an fsync or for another connection's write lock (the trio
   thread also runs the station's safety lanes). ``flush()`` waits until what
   was emitted is on disk (before a reset or a restart into new firmware);
   ``close()`` writes what is left and stops the thread;
3. delivered, oldest first, by the sender (``task(cp)``: a connection task,
   started once BootNotification is Accepted, so events raised offline or
   before the boot are sent in order after each reconnect). The central system
   answers with an empty payload (the whitepaper's
   SecurityEventNotification.conf); a lost connection leaves the event at the
   head, sent again with the same message id on the next connection.

Critical events are never dropped; past ``cap`` queued events the oldest
non-critical ones are (a flood of InvalidMessages must not push out a
FirmwareUpdated), with a warning naming each. A CALLERROR or a timeout while
connected counts an attempt (TransactionMessageAttempts, spaced by
TransactionMessageRetryInterval as transaction messages are); NotImplemented or
NotSupported (a central system without the security extension) gives up at
once, since asking again cannot help. A given-up event stays in the security
log and in the queue's given-up table, for diagnostics.

Timestamps: an event's time is the station's clock, turned into the central
system's time by ``clock`` (``ocpp16.clock.CentralClock``) once it is known;
before that (or before the charge point exists) the payload is marked and
``CentralClock.prepare`` corrects it when it is sent, as queued transaction
messages are.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

import trio

from ocpp16.channel import CallFailed
from ocpp16.clock import BOOT_ID, UNSYNCED, CentralClock
from ocpp16.errors import ConnectionLost, QueueError
from ocpp16.metering import format_time
from ocpp16.profiles import Lifetime, Task
from ocpp16.queue import SecurityEventQueue

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint
    from ocpp16.config import Configuration

log = logging.getLogger(__name__)

#: The security log's logger (``ops.logs.SECURITY_LOGGER``; ocpp16 does not import ops).
SECURITY_LOGGER: Final = "evse.security"
security_log = logging.getLogger(SECURITY_LOGGER)

ACTION: Final = "SecurityEventNotification"
#: SecurityEventNotification.req: type is string(50), techInfo string(255).
MAX_TYPE_LENGTH: Final = 50
MAX_TECH_INFO_LENGTH: Final = 255
#: Queued events kept at most (non-critical ones make room); about 200 bytes each.
DEFAULT_CAP: Final = 1000
#: Refusals after which asking again cannot help (OCPP-J 1.6 §4.2.3).
_HOPELESS: Final = frozenset({"NotImplemented", "NotSupported"})
#: How often the writer tries to queue an event before giving up on the disk.
_WRITE_TRIES: Final = 3
_WRITE_RETRY_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class EventType:
    """One row of the whitepaper's table (the description in our words)."""

    name: str
    critical: bool
    description: str
    #: The security log's level: WARNING for a failure or an attack, INFO otherwise.
    level: int = logging.INFO


_W = logging.WARNING

#: The Security Whitepaper ed. 3's security events, in its table's order, with its
#: "critical" column (FirmwareUpdated, SettingSystemTime, StartupOfTheDevice,
#: ResetOrReboot, SecurityLogWasCleared, MemoryExhaustion, TamperDetectionActivated).
#: This station's own events are in ``STATION_EVENTS``.
EVENTS: Final[Mapping[str, EventType]] = {
    e.name: e
    for e in (
        EventType("FirmwareUpdated", True, "the firmware was updated"),
        EventType(
            "FailedToAuthenticateAtCentralSystem",
            False,
            "the central system refused the charge point's credentials",
            _W,
        ),
        EventType(
            "CentralSystemFailedToAuthenticate",
            False,
            "the charge point refused the central system's credentials",
            _W,
        ),
        EventType("SettingSystemTime", True, "the station's time was set"),
        EventType("StartupOfTheDevice", True, "the station started"),
        EventType("ResetOrReboot", True, "the station was reset or rebooted"),
        EventType("SecurityLogWasCleared", True, "the security log was cleared", _W),
        EventType("ReconfigurationOfSecurityParameters", False, "a security parameter was changed"),
        EventType("MemoryExhaustion", True, "memory or storage ran out", _W),
        EventType("InvalidMessages", False, "messages that are not valid OCPP were received", _W),
        EventType("AttemptedReplayAttacks", False, "a replayed message was received", _W),
        EventType("TamperDetectionActivated", True, "the enclosure was opened", _W),
        EventType("InvalidFirmwareSignature", False, "a firmware signature did not verify", _W),
        EventType(
            "InvalidFirmwareSigningCertificate",
            False,
            "a firmware signing certificate was not valid",
            _W,
        ),
        EventType(
            "InvalidCentralSystemCertificate",
            False,
            "the central system's TLS certificate was not valid",
            _W,
        ),
        EventType(
            "InvalidChargePointCertificate", False, "a charge point certificate was not valid", _W
        ),
        EventType("InvalidTLSVersion", False, "the central system offered no TLS >= 1.2", _W),
        EventType(
            "InvalidTLSCipherSuite", False, "the central system offered no allowed cipher", _W
        ),
    )
}

#: This station's own events, beside the whitepaper's table (which has no event for
#: a failed update; SecurityEventNotification.req's type is any string(50)):
#: FirmwareRolledBack, a new release did not reach its trial's goal and the
#: previous one runs again (ops/release.py, ``ocpp16.firmware.FIRMWARE_ROLLED_BACK``;
#: techInfo: from, to and why). Critical, as FirmwareUpdated is: the central system
#: must learn that the firmware it installed is not the one running, and the event
#: must not be pushed out of a full queue.
STATION_EVENTS: Final[Mapping[str, EventType]] = {
    e.name: e
    for e in (
        EventType(
            "FirmwareRolledBack",
            True,
            "a firmware update was rolled back to the previous release",
            _W,
        ),
    )
}


#: The settings whose change is a ReconfigurationOfSecurityParameters
#: (``SecurityEvents.watch_configuration``).
SECURITY_PARAMETERS: Final = frozenset(
    {
        "SecurityProfile",
        "AuthorizationKey",
        "CentralSystemRootCertificate",
        "ChargePointCertificate",
        "ChargePointPrivateKey",
        "CpoName",
    }
)


def event_type_of(name: str) -> EventType | None:
    """The whitepaper's row of an event, or this station's own (``STATION_EVENTS``)."""
    return EVENTS.get(name) or STATION_EVENTS.get(name)


def is_critical(event_type: str) -> bool:
    """The whitepaper's "critical" flag (or this station's own event's); an event
    neither lists is not critical."""
    known = event_type_of(event_type)
    return known is not None and known.critical


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Emit(Protocol):
    """What the other parts are given to raise an event (default: ``no_emit``)."""

    def __call__(self, event_type: str, tech_info: str | None = None, /) -> None: ...


def no_emit(event_type: str, tech_info: str | None = None, /) -> None:
    """The default ``emit`` of a part that was given none."""


@dataclass(frozen=True, slots=True)
class _Pending:
    event_type: str
    payload: dict[str, Any]
    critical: bool


Call = Callable[..., Awaitable[dict[str, Any]]]


class SecurityEvents:
    """The security log and the SecurityEventNotification queue (module docstring)."""

    def __init__(
        self,
        queue: SecurityEventQueue,
        *,
        cap: int = DEFAULT_CAP,
        wall_clock: Callable[[], datetime] = _utc_now,
        clock: CentralClock | None = None,
    ) -> None:
        if cap < 1:
            raise ValueError(f"cap {cap} must be at least 1")
        self.queue = queue
        self.cap = cap
        self.wall_clock = wall_clock
        #: The central system's clock, once a charge point exists (``task`` sets it).
        self.clock = clock
        #: Events removed by the cap (this run), and events given up on.
        self.dropped = 0
        self.given_up = 0
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._emitted = 0
        self._written = 0
        self._closing = False
        self._closed = False
        self._writer: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._wakeup: trio.Event | None = None

    # -- raising an event -----------------------------------------------------------------

    def emit(self, event_type: str, tech_info: str | None = None) -> None:
        """Log the event and queue its notification; returns at once (any thread).

        ``tech_info`` is cut to the 255 characters the message allows. A type that
        is not 1..50 characters is a programming error: ValueError.
        """
        if not isinstance(event_type, str) or not 1 <= len(event_type) <= MAX_TYPE_LENGTH:
            raise ValueError(f"security event type {event_type!r}: 1..50 characters")
        known = event_type_of(event_type)
        critical = known is not None and known.critical
        payload: dict[str, Any] = {"type": event_type}
        now = self.wall_clock()
        clock = self.clock
        if clock is not None:
            payload["timestamp"] = clock.stamp(now, payload)
        else:
            # No charge point yet: marked like CentralClock.stamp before the clock is
            # set, corrected by CentralClock.prepare when sent.
            payload["timestamp"] = format_time(now)
            payload[UNSYNCED] = BOOT_ID
        if tech_info:
            payload["techInfo"] = tech_info[:MAX_TECH_INFO_LENGTH]
        security_log.log(
            known.level if known is not None else logging.WARNING,
            "%s%s%s",
            event_type,
            " (critical)" if critical else "",
            f": {tech_info}" if tech_info else "",
        )
        with self._cond:
            if self._closed:
                log.error("security event %s raised after close: not queued", event_type)
                return
            self._pending.append(_Pending(event_type, payload, critical))
            self._emitted += 1
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="security events", daemon=True
                )
                self._writer.start()
            self._cond.notify_all()

    __call__ = emit

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far is queued on disk (or given up on);
        False on timeout. Blocking: from trio, in a worker thread."""
        with self._cond:
            target = self._emitted
            return self._cond.wait_for(lambda: self._written >= target, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Queue what is left, stop the writer; later events are only logged."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join(timeout)
        with self._cond:
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch_configuration(self, config: Configuration) -> Callable[[], None]:
        """Raise ReconfigurationOfSecurityParameters on every change of a
        ``SECURITY_PARAMETERS`` key, whoever makes it (central system, installer);
        techInfo names the key, never the value. Returns the unsubscribe function."""

        def changed(name: str, value: object) -> None:
            if name in SECURITY_PARAMETERS:
                self.emit("ReconfigurationOfSecurityParameters", f"{name} changed")

        return config.subscribe(changed)

    # -- the writer thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                item = self._pending[0]
            self._write(item)
            with self._cond:
                self._pending.popleft()
                self._written += 1
                self._cond.notify_all()
            self._wake_sender()

    def _write(self, item: _Pending) -> None:
        for attempt in range(1, _WRITE_TRIES + 1):
            try:
                result = self.queue.enqueue(
                    item.event_type, item.payload, critical=item.critical, cap=self.cap
                )
            except QueueError as exc:
                if attempt == _WRITE_TRIES:
                    # The security log has it; the central system will not hear of it.
                    log.error("security event %s not queued: %s", item.event_type, exc)
                    return
                with self._cond:
                    self._cond.wait(_WRITE_RETRY_S)
                continue
            for gone in result.dropped:
                self.dropped += 1
                log.warning(
                    "security event queue over %d events: %s of %s dropped (not critical)",
                    self.cap,
                    gone.event_type,
                    gone.payload.get("timestamp"),
                )
            if result.queued is None:
                self.dropped += 1
                log.warning(
                    "security event queue holds %d critical events: %s not queued",
                    self.cap,
                    item.event_type,
                )
            return

    def _wake_sender(self) -> None:
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._set_wakeup)
        except trio.RunFinishedError:
            self._token = None

    def _set_wakeup(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # -- the sender ---------------------------------------------------------------------------

    def task(self, cp: ChargePoint, name: str = "security events") -> Task:
        """The sender as a connection task of ``cp`` (to be returned by a registered
        profile's ``tasks()``); events are stamped in ``cp``'s clock from now on."""
        self.clock = cp.clock

        async def run() -> None:
            await self.send(
                cp.call,
                prepare=cp.clock.prepare,
                attempts=lambda: cp.config.get_int("TransactionMessageAttempts"),
                retry_interval=lambda: cp.config.get_float("TransactionMessageRetryInterval"),
            )

        return Task(name, run, Lifetime.CONNECTION)

    async def send(
        self,
        call: Call,
        *,
        prepare: Callable[[str, dict[str, Any]], dict[str, Any]] = lambda action, p: p,
        attempts: Callable[[], int] = lambda: 3,
        retry_interval: Callable[[], float] = lambda: 20.0,
    ) -> None:
        """Deliver the queued events, oldest first, each until answered, for as long
        as the connection lasts (``call(action, payload, unique_id=)`` is the charge
        point's). A lost connection raises ConnectionLost, as the transaction queue's
        sender does; the event stays at the head."""
        self._token = trio.lowlevel.current_trio_token()
        queue = self.queue
        try:
            while True:
                # A fresh event before each look: a write committed after the look
                # sets it (run_sync_soon runs after this task yields).
                self._wakeup = trio.Event()
                head = await trio.to_thread.run_sync(queue.head)
                if head is None:
                    await self._wakeup.wait()
                    continue
                payload = prepare(ACTION, dict(head.payload))
                try:
                    await call(ACTION, payload, unique_id=head.unique_id)
                except CallFailed as exc:
                    if not exc.counts:
                        raise ConnectionLost(exc.reason) from None
                    hopeless = exc.reason.partition(":")[0] in _HOPELESS
                    limit = 1 if hopeless else attempts()
                    gone = await trio.to_thread.run_sync(
                        partial(queue.failed, head.seq, exc.reason, max_attempts=limit)
                    )
                    if gone:
                        self.given_up += 1
                        log.error(
                            "%s %s given up after %d attempt(s): %s",
                            ACTION,
                            head.event_type,
                            head.attempts + 1,
                            exc.reason,
                        )
                    else:
                        await trio.sleep(retry_interval() * (head.attempts + 1))
                    continue
                await trio.to_thread.run_sync(queue.delivered, head.seq)
        finally:
            self._wakeup = None


__all__ = [
    "ACTION",
    "DEFAULT_CAP",
    "EVENTS",
    "SECURITY_LOGGER",
    "SECURITY_PARAMETERS",
    "STATION_EVENTS",
    "Emit",
    "EventType",
    "SecurityEvents",
    "event_type_of",
    "is_critical",
    "no_emit",
]
