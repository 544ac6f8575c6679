"""The OCPP 1.6J charge point: the session that the feature profiles plug into.

Layers (each testable alone): ``transport.Link`` keeps a WebSocket up
(security profiles, back-off, pings); ``rpc.RpcSession`` turns text into
validated calls, results and errors (sans-I/O); ``channel.CallChannel`` is
its I/O (our calls with timeouts, the answers to the central system's);
``queue.TransactionQueue`` holds StartTransaction / StopTransaction /
transaction MeterValues on disk until the central system has answered them;
``config.Configuration`` is the one registry of configuration keys;
``clock.CentralClock`` the central system's time; ``policy`` the pure
decisions. This module is the session: the connection loop, the
registration (BootNotification), heartbeats, and the feature profiles
(``ocpp16.profiles``): each registers its handlers and its tasks here, and
the GetConfiguration answer's SupportedFeatureProfiles lists exactly them.
Core (``profiles.core``) is always registered; LocalAuthListManagement
(``profiles.local_auth``) when the station keeps a local list and cache;
SmartCharging (``profiles.smart_charging``) when it keeps charging profiles.
Reservation (``profiles.reservation``) and RemoteTrigger
(``profiles.remote_trigger``) are registered by ``evse.ocpp_port.OcppPort``
(a reservation is the station's Reserved state). FirmwareManagement
(``profiles.firmware``) and the Security Whitepaper's certificate messages
(``profiles.security``) are ``extensions``: built (in a worker thread) when
the first connection is about to be made, not before, so that a station
with no central system never loads what they need (cryptography, httpx:
about 11 MB resident).

SupportedFeatureProfiles (OCPP 1.6 section 9.1) names the OCPP 1.6 feature
profiles of section 3.1 that are registered, and nothing else: the Security
Whitepaper (ed. 3) adds messages, not a feature profile name, so a profile
registered under another name (the certificate messages, "Security"; the
security event sender) answers its calls but is not advertised
(``AdvertisedProfiles``).

It never reaches into the station: it talks to a ``StationControl`` (the
evse side implements it) and is told about transactions and status changes
through its own methods. Failure here never stops charging: the supervisor
runs ``run()`` in an isolated slot and restarts it.

Registration (OCPP 1.6 section 4.2): until BootNotification is Accepted the
charge point sends nothing else; while Pending it answers the central
system's configuration requests (GetConfiguration, ChangeConfiguration,
TriggerMessage, ExtendedTriggerMessage, DataTransfer) and refuses the rest
with SecurityError; Rejected, it answers nothing but retries the boot after
the interval.

Tasks, by name (ARCHITECTURE.md draws the tree): ``run`` starts the
profiles' charge-point-lifetime tasks (Core: "meter values", "clock-aligned
meter values"; SmartCharging: "smart charging limit") and a "reset" when one
is asked for; each connection's
session starts "ocpp reader", "ocpp answerer", "ocpp call timer" (the
channel) and, once registered, "heartbeat" and the profiles' connection
tasks (Core: "status notifications", "transaction queue").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ocpp16.channel import CallChannel, CallFailed
from ocpp16.clock import CentralClock
from ocpp16.config import Configuration
from ocpp16.errors import CallError, ConnectionLost
from ocpp16.metering import MeterSnapshot
from ocpp16.profiles import FEATURE_PROFILES, Lifetime, Profile, Profiles
from ocpp16.profiles.core import CoreProfile
from ocpp16.profiles.local_auth import LocalAuthListProfile
from ocpp16.profiles.smart_charging import SmartChargingProfile
from ocpp16.queue import TransactionQueue
from ocpp16.status import LinkState, LinkStatus

if TYPE_CHECKING:
    from ocpp16.local_auth import LocalAuth
    from ocpp16.profile_store import ProfileStore

    # Loaded when a connection is first made (rpc: jsonschema and the ocpp
    # package's schemas; transport: WebSocket and TLS), not by a station that
    # has no central system configured.
    from ocpp16.rpc import IncomingCall
    from ocpp16.transport import Connection, ConnectionSettings, Link

log = logging.getLogger(__name__)

#: Seconds before a BootNotification is retried when the answer gave no interval.
DEFAULT_BOOT_RETRY = 30.0

#: At most one InvalidMessages security event per this many seconds (``_invalid_message``).
INVALID_MESSAGES_EVERY = 60.0

#: What may be answered before BootNotification is Accepted (OCPP 1.6 4.2.1).
#: ExtendedTriggerMessage is the Security Whitepaper's TriggerMessage (ed. 3,
#: "for the other values the behaviour matches TriggerMessage"): a central system
#: that keeps a station Pending may trigger its BootNotification either way.
ALLOWED_WHILE_PENDING = frozenset(
    {
        "GetConfiguration",
        "ChangeConfiguration",
        "TriggerMessage",
        "ExtendedTriggerMessage",
        "DataTransfer",
    }
)

#: Configuration keys the connection is made with: a change reconnects.
_CONNECTION_KEYS = frozenset(
    {
        "SecurityProfile",
        "AuthorizationKey",
        "BasicAuthPasswordForm",
        "CentralSystemAddress",
        "ChargePointId",
        "CentralSystemRootCertificate",
        "ChargePointCertificate",
        "ChargePointPrivateKey",
        "WebSocketPingInterval",
        "ReconnectFrequency",
        "ConnectionEnabled",
    }
)
#: Security Whitepaper ed. 3, appendix "Security events": a security parameter
#: was changed. Raised for these keys (whoever changes them: the central
#: system, the installer; techInfo names the key, never a secret value), and
#: when a raised SecurityProfile is taken back because it did not connect. The
#: certificate store's own changes (InstallCertificate, CertificateSigned) are
#: raised by ``profiles.security``.
RECONFIGURATION_OF_SECURITY_PARAMETERS = "ReconfigurationOfSecurityParameters"
_SECURITY_PARAMETERS = frozenset(
    {
        "SecurityProfile",
        "AuthorizationKey",
        "BasicAuthPasswordForm",
        "CentralSystemRootCertificate",
        "ChargePointCertificate",
        "ChargePointPrivateKey",
        "CpoName",
    }
)

#: ``emit(event_type, tech_info)``: raises a security event (the security log and
#: SecurityEventNotification; ``ocpp16.security_events``). Sync, never blocks.
Emit = Callable[[str, str | None], None]


def _no_event(event_type: str, tech_info: str | None) -> None:
    log.debug("security event %s (%s): no security log wired", event_type, tech_info)


#: Profiles built when the first connection is about to be made (blocking: run in
#: a worker thread; ``evse.ocpp_port`` and ``ops/firmware_wiring.py`` build them).
Extensions = Callable[[], Sequence[Profile]]


class AdvertisedProfiles(Profiles):
    """The charge point's profiles: SupportedFeatureProfiles lists only OCPP 1.6's.

    OCPP 1.6 section 9.1: SupportedFeatureProfiles is a list of the feature
    profiles of section 3.1. The Security Whitepaper (ed. 3) defines messages
    and keys but no profile name, and a central system may compare the list
    with the six names it knows; so a profile registered under another name
    (the certificate messages, the security event sender) answers its calls
    and runs its tasks, and is not advertised.
    """

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in super().names if n in FEATURE_PROFILES)


#: Configuration keys a waiting task times itself by.
_TIMING_KEYS = frozenset(
    {"HeartbeatInterval", "MeterValueSampleInterval", "ClockAlignedDataInterval"}
)


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
        """StartTransaction was answered with a non-Accepted idTagInfo and
        StopTransactionOnInvalidId is true: stop the transaction (DeAuthorized)."""
        ...

    async def suspend_transaction(self, local_tx_id: int) -> None:
        """StartTransaction was answered with a non-Accepted idTagInfo and
        StopTransactionOnInvalidId is false: keep the transaction, but deliver no
        energy for the rest of it (offer 0 A, SuspendedEVSE)."""
        ...

    async def clear_cache(self) -> bool: ...

    def link_changed(self) -> None:
        """Online/offline changed: the station recomputes its limits (fallback)."""
        ...


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
        local_auth: LocalAuth | None = None,
        charging_profiles: ProfileStore | None = None,
        emit: Emit | None = None,
        extensions: Extensions | None = None,
    ) -> None:
        self.config = config
        #: Profiles that load only once a central system is configured (module docstring).
        self._extensions = extensions
        #: Set at the first BootNotification Accepted of this process (a new release's
        #: trial waits for it: ops/run.py).
        self.registered = trio.Event()
        #: Called with each new connection before anything is sent on it (the
        #: certificate store learns whether TLS is in use: M04.FR.06).
        self.on_connection: Callable[[Connection], None] | None = None
        #: Called when the central system's currentTime set the clock in this boot,
        #: or stepped it (``CentralClock.set``): the station raises SettingSystemTime.
        self.on_clock_set: Callable[[], None] | None = None
        #: Security events: the transport's (certificate, TLS version, cipher,
        #: refused credentials) and this module's (security parameters changed,
        #: a profile raise taken back).
        self.emit: Emit = emit if emit is not None else _no_event
        #: Woken when the SecurityProfile trial begins or ends (``_profile_trials``).
        self._trial_changed = trio.Event()
        #: True while a trial's fallback writes the previous profile back.
        self._restoring = False
        self.queue = queue
        self.station = station
        self.identity = identity
        self._settings = connection_settings
        #: The central system's time; station times convert through it.
        self.clock = CentralClock(wall_clock)
        self.registration = Registration.NONE
        self.link_status = LinkStatus(LinkState.DISABLED, "not started", 0.0)
        self.channel = CallChannel(self._answer)
        self.channel.on_problem = self._invalid_message
        #: InvalidMessages: when the last was raised (trio time), and how many since.
        self._invalid_at: float | None = None
        self._invalid_since = 0
        self._link: Link | None = None
        self._link_scope = trio.CancelScope()
        self._booted_once = False
        self._heartbeat_interval: float | None = None
        #: Set by a TriggerMessage BootNotification: the next one goes out at once.
        self._boot_wakeup = trio.Event()
        #: Woken when a timing input changes (interval keys, transactions, the
        #: clock): the heartbeat and the samplers recompute their waits.
        self.timing = trio.lowlevel.ParkingLot()
        #: Where work that outlives one connection runs (set by ``run``).
        self._nursery_for_background: trio.Nursery | None = None
        self._answering_change = False
        self._deferred_reconnect: str | None = None
        self.config.subscribe(self._config_changed)
        self.on_link_change: Callable[[], None] | None = None
        #: Where a transaction's MeterValues go instead of ``queue.enqueue``:
        #: (local id, payload, energy Wh, station time) -> queued? (evse's store).
        self.meter_values_sink: (
            Callable[[int, dict[str, Any], float | None, datetime], Awaitable[bool]] | None
        ) = None
        #: The feature profiles: who answers which call, what runs, what is advertised.
        self.profiles: Profiles = AdvertisedProfiles()
        self.core = CoreProfile(self)
        self.register(self.core)
        #: The local list and the authorization cache, when the station keeps them
        #: (``local_auth``): LocalAuthListManagement is registered, every IdTagInfo
        #: the central system answers is cached, ClearCache empties the cache.
        self.local_auth: LocalAuthListProfile | None = None
        if local_auth is not None:
            self.local_auth = LocalAuthListProfile(self, local_auth)
            self.register(self.local_auth)
        #: Smart Charging, when the station keeps charging profiles
        #: (``charging_profiles``: ChargePointMax and TxDefault survive a restart
        #: there): SmartCharging is registered, takes RemoteStart's TxProfile and is
        #: told about transactions (their TxProfiles end with them).
        self.smart_charging: SmartChargingProfile | None = None
        if charging_profiles is not None:
            self.smart_charging = SmartChargingProfile(self, charging_profiles)
            self.register(self.smart_charging)
            self.core.remote_start_profiles = self.smart_charging

    def register(self, profile: Profile) -> None:
        """Add a feature profile (before ``run``, or as an extension before the
        first connection): its handlers answer the central system's calls from
        now on, its tasks run with the next connection (or the next ``run``),
        and SupportedFeatureProfiles lists it if it is an OCPP 1.6 profile."""
        self.profiles.register(profile)

    async def _load_extensions(self) -> None:
        """Build and register the extensions, once (a failure is logged, and the
        station goes on without them: charging never depends on them)."""
        build, self._extensions = self._extensions, None
        if build is None:
            return
        try:
            profiles = await trio.to_thread.run_sync(build)
        except Exception as exc:
            log.critical(
                "firmware management and certificates are not available: %s", exc, exc_info=True
            )
            return
        background = self._nursery_for_background
        for profile in profiles:
            try:
                self.register(profile)
            except ValueError as exc:  # a programming error: said, not fatal
                log.critical("profile %s not registered: %s", profile.name, exc)
                continue
            for task in profile.tasks():
                if task.lifetime is Lifetime.CHARGE_POINT and background is not None:
                    background.start_soon(task.run, name=task.name)

    def reconnect(self, reason: str) -> None:
        """Close the connection and connect again at once, with settings built anew
        (a change of a key they are made of; a new client certificate in force)."""
        link = self._link
        if link is None:
            return
        settings = self._settings()
        if settings is None:
            # Connection disabled or address removed: close and stay closed.
            self._link_scope.cancel(reason=reason)
            return
        link.update_settings(settings)
        link.reconnect(reason)

    # -- what the station tells us ------------------------------------------------------

    @property
    def online(self) -> bool:
        return self.channel.connected and self.registration is Registration.ACCEPTED

    @property
    def wall_clock(self) -> Callable[[], datetime]:
        """The system clock (a seam for tests); timestamps convert from it."""
        return self.clock.wall_clock

    @property
    def clock_offset(self) -> timedelta | None:
        """Offset of the central system's clock from ours (set from its answers)."""
        return self.clock.offset

    @property
    def synced_offset(self) -> timedelta | None:
        """The offset when the clock was first set in this boot."""
        return self.clock.synced_offset

    def now(self) -> datetime:
        """Our best idea of the time: the central system's, once it told us."""
        return self.clock.now()

    def status_changed(self) -> None:
        self.core.status_changed()

    def _prepare(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Strip the private clock markers, correcting what can be corrected."""
        return self.clock.prepare(action, payload)

    # The station writes a transaction's record and its message in one SQLite
    # transaction (rule 2): it asks for the payloads (``start_message``,
    # ``stop_message``, pure), queues them through the store's connection, and
    # then tells us (``begin_transaction``, ``end_transaction``). The two
    # coroutines below do it all here, for a station without such a store.

    def start_message(
        self,
        *,
        connector_id: int,
        id_tag: str,
        meter_start_wh: float,
        timestamp: datetime,
        reservation_id: int | None = None,
    ) -> dict[str, Any]:
        """The StartTransaction.req payload."""
        return self.core.start_message(
            connector_id=connector_id,
            id_tag=id_tag,
            meter_start_wh=meter_start_wh,
            timestamp=timestamp,
            reservation_id=reservation_id,
        )

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
        return self.core.stop_message(
            local_id=local_id,
            meter_stop_wh=meter_stop_wh,
            stopped_at=stopped_at,
            reason=reason,
            stop_id_tag=stop_id_tag,
            samples=samples,
        )

    def begin_transaction(
        self,
        *,
        local_id: int,
        timestamp: datetime,
        begin: MeterSnapshot | None = None,
        connector_id: int | None = None,
    ) -> None:
        """A transaction started (its StartTransaction is queued): sample it; its
        TxProfiles apply (``connector_id`` None: the station's only connector)."""
        self.core.begin_transaction(local_id=local_id, timestamp=timestamp, begin=begin)
        if self.smart_charging is not None:
            self.smart_charging.transaction_began(
                local_id=local_id, connector_id=connector_id, started_at=timestamp
            )

    def transaction_identified(self, local_id: int, transaction_id: object) -> None:
        """Its StartTransaction was answered: the central system's transactionId."""
        if self.smart_charging is not None:
            self.smart_charging.transaction_identified(local_id, transaction_id)

    def take_samples(
        self, local_id: int, *, end: MeterSnapshot | None = None, stopped_at: datetime
    ) -> list[dict[str, Any]]:
        """The transaction's StopTxnSampledData (OCPP 1.6 section 9.1), its end value
        last; its sampling stops, and its TxProfiles are removed."""
        if self.smart_charging is not None:
            self.smart_charging.transaction_ending(local_id)
        return self.core.take_samples(local_id, end=end, stopped_at=stopped_at)

    def end_transaction(self) -> None:
        """A StopTransaction was queued: send it."""
        self.core.end_transaction()

    async def transaction_started(
        self,
        *,
        local_id: int,
        connector_id: int,
        id_tag: str,
        meter_start_wh: float,
        timestamp: datetime,
        begin: MeterSnapshot | None = None,
        reservation_id: int | None = None,
    ) -> None:
        payload = self.start_message(
            connector_id=connector_id,
            id_tag=id_tag,
            meter_start_wh=meter_start_wh,
            timestamp=timestamp,
            reservation_id=reservation_id,
        )
        await trio.to_thread.run_sync(
            lambda: self.queue.enqueue(
                "StartTransaction", payload, local_tx_id=local_id, dedupe_key=f"start:{local_id}"
            )
        )
        self.begin_transaction(
            local_id=local_id, timestamp=timestamp, begin=begin, connector_id=connector_id
        )

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
        """Authorize.req while online; None when offline (no opinion). The answer's
        idTagInfo is cached (``id_tag_info_received``) before it is returned."""
        if not self.online:
            return None
        try:
            result = await self.call("Authorize", {"idTag": id_tag})
        except CallFailed as exc:
            log.warning("Authorize %s failed: %s", id_tag, exc)
            return None
        info = result.get("idTagInfo")
        if not isinstance(info, dict):
            return None
        await self.id_tag_info_received("Authorize", id_tag, info)
        return info

    async def id_tag_info_received(self, action: str, id_tag: str, info: dict[str, Any]) -> None:
        """The central system answered ``info`` (an IdTagInfo) for ``id_tag`` in an
        Authorize, StartTransaction or StopTransaction answer: into the
        authorization cache and checked against the local list (OCPP 1.6 3.5.1,
        3.5.3), when the station keeps them. Shielded: a cancelled caller (the
        chain's step timeout, a lost connection) never leaves it half done."""
        if self.local_auth is None:
            return
        with trio.CancelScope(shield=True):
            await self.local_auth.record_answer(id_tag, info, action=action)

    async def call(
        self, action: str, payload: dict[str, Any], *, unique_id: str | None = None
    ) -> dict[str, Any]:
        """One CALL, answered by its CALLRESULT payload; CallFailed otherwise."""
        return await self.channel.call(action, payload, unique_id=unique_id)

    def start_background(self, work: Callable[[], Awaitable[None]], *, name: str) -> bool:
        """Run ``work`` beyond the current connection and call (a Reset that must be
        answered first); False when ``run`` is not running."""
        nursery = self._nursery_for_background
        if nursery is None:
            return False
        nursery.start_soon(work, name=name)
        return True

    # -- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection to the central system while one is configured."""
        async with trio.open_nursery() as background:
            # Work that must outlive one connection: a Reset in progress, and
            # the profiles' own (meter values are taken and queued online or not).
            self._nursery_for_background = background
            for task in self.profiles.tasks(Lifetime.CHARGE_POINT):
                background.start_soon(task.run, name=task.name)
            background.start_soon(self._profile_trials, name="security profile trial")
            await self._connect_forever()

    # What run() starts for Core, by the names the test rig (tests/chargepoint_rig.py)
    # starts them with itself, around ``_session``.

    async def _sampler(self) -> None:
        await self.core.sample_periodically()

    async def _aligned_sampler(self) -> None:
        await self.core.sample_aligned()

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
            if self._extensions is not None:
                # A central system is configured: what only a connection needs
                # loads now, and the settings are built again with it (the
                # certificate store's roots and client certificate).
                await self._load_extensions()
                settings = self._settings()
                if settings is None:
                    continue
            from ocpp16.transport import Link  # noqa: PLC0415 - see the imports

            self._link = Link(
                settings, on_status=self._set_link, on_security_event=self._security_event
            )
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

    def _security_event(self, event_type: str, tech_info: str | None) -> None:
        try:
            self.emit(event_type, tech_info)
        except Exception:
            log.exception("security event %s not raised", event_type)

    def _config_changed(self, name: str, value: object) -> None:
        if name in _SECURITY_PARAMETERS and not self._restoring:
            shown = "changed" if name == "AuthorizationKey" else f"set to {value}"
            self._security_event(RECONFIGURATION_OF_SECURITY_PARAMETERS, f"{name} {shown}")
        if name == "SecurityProfile":
            self._poke_trial()
        if name == "HeartbeatInterval":
            # A ChangeConfiguration overrides the interval the boot answer gave.
            self._heartbeat_interval = None
        if name in _TIMING_KEYS:
            self.timing.unpark_all()
        if name in _CONNECTION_KEYS:
            if self._answering_change:
                # The central system's ChangeConfiguration: its answer goes out
                # on this connection first, then the station reconnects.
                self._deferred_reconnect = name
                return
            self._reconnect_for(name)

    def _reconnect_for(self, name: str) -> None:
        self.reconnect(f"{name} changed")

    @contextlib.contextmanager
    def answering_change(self) -> Iterator[None]:
        """Around a ChangeConfiguration from the central system: a change that makes
        the station reconnect (AuthorizationKey, SecurityProfile, the address)
        takes effect once the answer has been written, so the central system
        sees Accepted, not a closed connection."""
        self._answering_change = True
        try:
            yield
        finally:
            self._answering_change = False
            name, self._deferred_reconnect = self._deferred_reconnect, None
            if name is not None:

                async def reconnect() -> None:
                    self._reconnect_for(name)
                    await trio.lowlevel.checkpoint()

                self.channel.after_answer(f"reconnect ({name} changed)", reconnect)

    # -- security profile raises on trial (Security Whitepaper ed. 3, security profiles) ---

    def _poke_trial(self) -> None:
        self._trial_changed.set()
        self._trial_changed = trio.Event()

    async def _profile_trials(self) -> None:
        """Take back a SecurityProfile raise that does not connect in time.

        The central system raised the profile (``Configuration.central_system_change``
        put it on trial, kept in the store: a restart meanwhile, such as the
        Reset the OCTT sends after the change, starts the wait again). If no
        WebSocket with the new profile opens within SecurityProfileFallbackTime,
        the previous profile and address are restored and persisted, a security
        event says so, and the station reconnects with them. Once one opens,
        the raise stands for good: it is never taken back later (OCTT TC_083:
        no return to profile 1 after an upgrade to 2).
        """
        while True:
            trial = self.config.profile_trial()
            if trial is None:
                await self._trial_changed.wait()
                continue
            wait = float(self.config.get_int("SecurityProfileFallbackTime"))
            with trio.move_on_after(wait):
                while self.config.profile_trial() is trial:
                    await self._trial_changed.wait()
                continue  # proven, replaced or voided in time
            if self.config.profile_trial() is not trial:
                continue
            if (
                self.config.get_int("SecurityProfile") != trial.profile
                or self.config.get_str("CentralSystemAddress") != trial.address
            ):
                # Changed since by the installer: theirs to keep, not ours to undo.
                log.info("security profile trial void: the profile or address changed since")
                await self.config.end_profile_trial_async(restore=False)
                continue
            self._restoring = True
            try:
                await self.config.end_profile_trial_async(restore=True)
            finally:
                self._restoring = False
            self._security_event(
                RECONFIGURATION_OF_SECURITY_PARAMETERS,
                f"SecurityProfile {trial.profile} did not connect within {wait:g} s:"
                f" back to {trial.previous_profile}",
            )

    async def _prove_trial(self, conn: Connection) -> None:
        """A connection opened: if it uses the profile on trial, the raise stands."""
        trial = self.config.profile_trial()
        settings = getattr(conn, "settings", None)  # test rigs' connections have none
        if trial is None or settings is None:
            return
        if settings.security_profile != trial.profile or (
            trial.address and settings.central_system_url != trial.address
        ):
            return
        # The WebSocket is open: TLS verified the server (profiles 2, 3), the
        # central system accepted our credentials (Basic auth, client
        # certificate). That is what a security profile is; BootNotification is
        # registration, and a registered station does not send it again here.
        with trio.CancelScope(shield=True):
            await self.config.end_profile_trial_async(restore=False)
        log.info("security profile %d connected: the raise stands", trial.profile)
        self._poke_trial()

    def _set_link(self, status: LinkStatus) -> None:
        self.link_status = status
        log.debug("central system link: %s %s", status.state.value, status.reason)
        if self.on_link_change is not None:
            self.on_link_change()

    async def _session(self, conn: Connection) -> None:
        """One connection: the channel's tasks, the registration, then the rest."""
        await self._prove_trial(conn)
        if self.on_connection is not None:
            try:
                self.on_connection(conn)
            except Exception:
                log.exception("connection hook failed")
        self.channel.open(conn)
        try:
            async with trio.open_nursery() as nursery:
                self.channel.start(nursery)
                await self._register()
                self.station.link_changed()
                nursery.start_soon(self._heartbeats, name="heartbeat")
                for task in self.profiles.tasks(Lifetime.CONNECTION):
                    nursery.start_soon(task.run, name=task.name)
        finally:
            self.channel.close()
            if self.registration is Registration.ACCEPTED:
                self.station.link_changed()

    # -- the central system's calls (OCPP 1.6 section 5) --------------------------------

    async def _answer(self, call: IncomingCall) -> dict[str, Any] | None:
        """The answer to one incoming call, by the profile that handles it."""
        if self.registration is Registration.REJECTED:
            # OCPP 1.6 4.2.1: while Rejected the charge point does not respond.
            log.info("%s ignored: registration rejected", call.action)
            return None
        if (
            self.registration is not Registration.ACCEPTED
            and call.action not in ALLOWED_WHILE_PENDING
        ):
            raise CallError(
                "SecurityError",
                f"{call.action} refused: charge point is {self.registration.value}",
            )
        handler = self.profiles.handler(call.action)
        if handler is None:
            # An action OCPP 1.6 does not define never gets here (rpc answers it
            # NotImplemented); one that no registered profile handles is known
            # but not supported (OCPP-J 1.6 section 4.2.3).
            raise CallError("NotSupported", f"{call.action} is not supported")
        return await handler(call.payload)

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
            self._boot_wakeup = trio.Event()
            try:
                answer = await self.call("BootNotification", payload)
            except CallFailed as exc:
                if not exc.counts:
                    raise ConnectionLost(exc.reason) from None
                log.warning("BootNotification failed: %s", exc)
                await trio.sleep(DEFAULT_BOOT_RETRY)
                continue
            self.set_clock(answer.get("currentTime"))
            interval = float(answer.get("interval", 0) or 0)
            status = answer.get("status")
            if status == "Accepted":
                self.registration = Registration.ACCEPTED
                self._booted_once = True
                self.registered.set()
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
            with trio.move_on_after(wait):
                await self._boot_wakeup.wait()

    def trigger_boot(self) -> None:
        """TriggerMessage BootNotification (OCPP 1.6 5.17) while not registered: the
        registration sends its next BootNotification now, not after the interval."""
        self._boot_wakeup.set()

    def _invalid_message(self, description: str) -> None:
        """Whitepaper ed. 3 InvalidMessages (not critical): a frame from the central
        system refused or not understood (it got its CALLERROR where it could). At
        most one event per ``INVALID_MESSAGES_EVERY`` seconds, the next one
        counting those in between: a peer sending garbage must not fill the
        security log and the queue (whose cap drops non-critical events anyway)."""
        now = trio.current_time()
        if self._invalid_at is not None and now - self._invalid_at < INVALID_MESSAGES_EVERY:
            self._invalid_since += 1
            return
        more = (
            f" (and {self._invalid_since} more since the last event)" if self._invalid_since else ""
        )
        self._invalid_at, self._invalid_since = now, 0
        self.emit("InvalidMessages", f"{description}{more}")

    def set_clock(self, current_time: object) -> None:
        """Take a ``currentTime`` from any answer (BootNotification, Heartbeat, a
        triggered Heartbeat): when it set the clock or stepped it, the timers
        recompute and ``on_clock_set`` is told (the SettingSystemTime event)."""
        if self.clock.set(current_time):
            # Clock-aligned readings follow the central system's time: recompute.
            self.timing.unpark_all()
            if self.on_clock_set is not None:
                try:
                    self.on_clock_set()
                except Exception:
                    log.exception("clock hook failed")

    async def _heartbeats(self) -> None:
        last = trio.current_time()
        while True:
            interval = self._heartbeat_interval or float(self.config.get_int("HeartbeatInterval"))
            with trio.move_on_at(last + max(1.0, interval)):
                # A new HeartbeatInterval applies from the last heartbeat, not
                # after the old interval has run out.
                await self.timing.park()
                continue
            last = trio.current_time()
            try:
                answer = await self.call("Heartbeat", {})
                self.set_clock(answer.get("currentTime"))
            except CallFailed as exc:
                log.warning("Heartbeat failed: %s", exc)
