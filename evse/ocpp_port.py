"""The station's central-system port, spoken in OCPP 1.6J.

``OcppPort`` sits between the two packages that must not know each other:
towards evse it is a ``CentralSystemPort`` (the station reports status and
transactions, asks for the link state and smart-charging limit); towards
ocpp16 it is the ``StationControl`` the charge point asks to start, stop,
change availability, unlock or reset. Translating between the station's
records and OCPP's payloads happens here and nowhere else.

It is also what a firmware update needs of the station (the Firmware
Management profile's ``StationHooks``: ``transactions_running``,
``make_unavailable`` / ``restore_availability`` for this run only, and
``restart``, which the run sets as ``on_restart``), and it keeps the
charge point's certificate store once the central-system extensions have
loaded it (``CertificateSlot``): its installed CentralSystemRootCertificates
are trust anchors beside the installer's file, its client certificate (the
CSR flow's) is what security profile 3 presents.

Extensions (``extensions``, built by ``ops/firmware_wiring.py``): the
Firmware Management and certificate profiles and what they bring, built in a
worker thread just before the first connection (``ChargePoint`` calls
``_load_extensions``), never by a station without a central system.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from evse.auth import AuthResult, AuthStatus, AuthStep
from evse.connector import ErrorCode, Status, StopReason
from evse.errors import StoreError
from evse.limits import CentralSystem
from evse.station import Station
from evse.store import Journal, TransactionRecord
from ocpp16.chargepoint import ChargePoint, Identity
from ocpp16.config import Configuration, InstalledCredentials
from ocpp16.errors import OcppError
from ocpp16.local_auth import CacheStep, ClearCacheStatus, LocalAnswer, LocalAuth, LocalListStep
from ocpp16.metering import MeterSnapshot
from ocpp16.profiles import Handler, Profile, Task
from ocpp16.profiles.remote_trigger import RemoteTriggerProfile, TransferStatus
from ocpp16.profiles.reservation import ReservationProfile
from ocpp16.queue import TransactionQueue

if TYPE_CHECKING:
    from ocpp16.certificates import CertificateStore
    from ocpp16.profile_store import ProfileStore
    from ocpp16.security_events import SecurityEvents
    from ocpp16.transport import Connection, ConnectionSettings

log = logging.getLogger(__name__)


class CertificateSlot:
    """The charge point's certificate store, once the extensions have opened it.

    Made before the store exists (the registry asks it when SecurityProfile is
    raised: ``credentials``), filled at the first connection. Until then, and
    when the store could not be opened, only the installer's files count.
    """

    def __init__(self) -> None:
        self.store: CertificateStore | None = None

    def central_system_root(self) -> bool:
        """A CentralSystemRootCertificate is installed (InstallCertificate)."""
        store = self.store
        return store is not None and bool(store.central_system_roots())

    def client_certificate(self) -> bool:
        """A charge point certificate and key from the CSR flow are valid now."""
        store = self.store
        return store is not None and store.client_certificate(datetime.now(UTC)) is not None

    def credentials(self) -> InstalledCredentials:
        """The registry's prerequisites of a SecurityProfile raise (whitepaper ed. 3)."""
        return InstalledCredentials(
            central_system_root=self.central_system_root,
            client_certificate=self.client_certificate,
        )


@dataclass
class Extensions:
    """What the extensions builder (``ops/firmware_wiring.py``) hands the port."""

    #: Registered with the charge point, in this order.
    profiles: Sequence[Profile] = ()
    #: The certificate store (trust anchors, the client certificate).
    certificates: CertificateStore | None = None
    #: What the status triggers report (the Firmware Management profile).
    transfers: TransferStatus | None = None
    #: ExtendedTriggerMessage SignChargePointCertificate (the certificate profile).
    sign_certificate: Callable[[], str] | None = None


#: Builds the extensions for a port; blocking (a worker thread).
ExtensionsBuilder = Callable[["OcppPort"], Extensions]


class SecurityEventsSender:
    """The SecurityEventNotification sender (``SecurityEvents.task``) as a profile with
    no calls of its own: a connection task, started once BootNotification is
    Accepted. Not an OCPP 1.6 feature profile, so not advertised."""

    name = "SecurityEvents"

    def __init__(self, events: SecurityEvents, cp: ChargePoint) -> None:
        self.handlers: Mapping[str, Handler] = {}
        # From now on events are stamped in the charge point's clock.
        self._task = events.task(cp)

    def tasks(self) -> Sequence[Task]:
        return (self._task,)


class OcppPort:
    def __init__(
        self,
        *,
        config: Configuration,
        queue: TransactionQueue,
        identity: Identity,
        connector: str = "socket",
        local_auth: LocalAuth | None = None,
        charging_profiles: ProfileStore | None = None,
        security_events: SecurityEvents | None = None,
        certificates: CertificateSlot | None = None,
        extensions: ExtensionsBuilder | None = None,
    ) -> None:
        self.config = config
        #: The security log and SecurityEventNotification queue (None: events only logged).
        self.security_events = security_events
        #: The certificate store, once loaded (the registry's credentials read it too).
        self.certificates = certificates if certificates is not None else CertificateSlot()
        self._extensions = extensions
        #: The run's restart into a new release (a firmware update): set by ops/run.py.
        self.on_restart: Callable[[], Awaitable[None]] | None = None
        #: A firmware installation holds the connector Unavailable (this run only).
        self.held_for_update = False
        self.queue = queue
        #: The local authorization list and the authorization cache (None: neither).
        self.local_auth = local_auth
        self.identity = identity
        self.connector_kind = connector
        self.station: Station | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.connector_ids: tuple[int, ...] = (1,)
        self.on_reset: Callable[[bool], Awaitable[None]] | None = None
        #: Why the configured connection cannot be made (shown in status).
        self.config_problem = ""
        self.chargepoint = ChargePoint(
            config=config,
            queue=queue,
            station=self,
            identity=identity,
            # The charge point (its own task, not the station loop) reads the
            # files afresh before each connection attempt.
            connection_settings=self.refresh_connection_settings,
            local_auth=local_auth,
            charging_profiles=charging_profiles,
            emit=security_events.emit if security_events is not None else None,
            extensions=self._load_extensions if extensions is not None else None,
        )
        self.chargepoint.on_connection = self._connected
        self.chargepoint.on_clock_set = self._clock_set
        smart = self.chargepoint.smart_charging
        if smart is not None:
            # A new limit reaches the station's arbitration as a link change does.
            smart.limits_changed = self.link_changed
            smart.local_limit = self._local_limit
        self._link_changed_send, self._link_changed_receive = trio.open_memory_channel[None](1)
        #: The connection the configuration asks for, built once and again only
        #: when a key it depends on changes: ``link`` is read on the station
        #: loop's path, which must never read certificate files.
        self._settings_cache: tuple[ConnectionSettings | None] | None = None
        config.subscribe(self._config_changed)
        self.chargepoint.meter_values_sink = self._queue_meter_values
        #: ReserveNow / CancelReservation on the connector's Reserved state; the
        #: parent of a tag from the local list or cache, else an Authorize.req.
        self.reservations = ReservationProfile(
            self.chargepoint,
            self,
            local_parent=local_auth.parent_of if local_auth is not None else None,
        )
        self.chargepoint.register(self.reservations)
        #: TriggerMessage / ExtendedTriggerMessage; the transfers it reports and the
        #: CSR trigger are plugged in by the extensions.
        self.trigger = RemoteTriggerProfile(self.chargepoint)
        self.chargepoint.register(self.trigger)
        if security_events is not None:
            self.chargepoint.register(SecurityEventsSender(security_events, self.chargepoint))
        #: Messages waiting in the queue, as last counted (``describe``).
        self.queued_messages = 0

    def attach(self, station: Station) -> None:
        self.station = station
        station.parent_lookup = self.reservations.parent_of
        self._trio_token = trio.lowlevel.current_trio_token()
        station.stop_on_ev_disconnect(self.config.get_bool("StopTransactionOnEVSideDisconnect"))

    def _config_changed(self, name: str, value: object) -> None:
        if name in CONNECTION_KEYS:
            self._settings_cache = None
        station, token = self.station, self._trio_token
        if name == "StopTransactionOnEVSideDisconnect" and station is not None and token:
            # Listeners run in whichever thread changed the value: hand it to trio.
            token.run_sync_soon(station.stop_on_ev_disconnect, value is True)

    # -- configuration -> connection ----------------------------------------------------

    def connection_settings(self) -> ConnectionSettings | None:
        """The connection the configuration asks for; None when there is none or it
        cannot be built (a missing or bad certificate file: logged, shown in status).

        Built once, and again after a change of a key it depends on."""
        cached = self._settings_cache
        if cached is None:
            cached = self._settings_cache = (self._build_connection_settings(),)
        return cached[0]

    def refresh_connection_settings(self) -> ConnectionSettings | None:
        """Build the connection settings anew (files read again) and keep them."""
        self._settings_cache = (self._build_connection_settings(),)
        return self._settings_cache[0]

    def _build_connection_settings(self) -> ConnectionSettings | None:
        try:
            settings = self._connection_settings()
        except (OSError, ValueError) as exc:
            if str(exc) != self.config_problem:
                log.error("central system connection not possible: %s", exc)
            self.config_problem = str(exc)
            return None
        self.config_problem = ""
        return settings

    def _connection_settings(self) -> ConnectionSettings | None:
        c = self.config
        address = c.get_str("CentralSystemAddress")
        if not address or not c.get_bool("ConnectionEnabled"):
            return None
        # The TLS/WebSocket stack loads only once a central system is configured.
        from ocpp16.transport import ConnectionSettings  # noqa: PLC0415

        cp_id = c.get_str("ChargePointId") or self.identity.serial
        # Only the files the security profile uses, each checked as when it was
        # set: a certificate gone bad fails only TLS, never a profile 0/1 connection.
        ca, cert, private_key = c.connection_files()
        profile = c.get_int("SecurityProfile")
        store = self.certificates.store
        if store is not None and profile >= 2:
            # The roots the central system installed (InstallCertificate) are trust
            # anchors beside the installer's file (docs/security.md); for profile 3
            # the certificate of the CSR flow in force now is presented, else the
            # installer's files (whitepaper A02.FR.08/09: the newest valid one).
            installed = store.ca_bundle()
            if installed:
                ca = f"{ca.rstrip()}\n{installed}" if ca else installed
            if profile == 3:
                pair = store.client_certificate(self.chargepoint.now())
                if pair is not None:
                    cert = pair[0].read_text(encoding="ascii")
                    private_key = pair[1].read_text(encoding="ascii")
        key = c.get_str("AuthorizationKey")
        return ConnectionSettings(
            central_system_url=address,
            charge_point_id=cp_id,
            security_profile=profile,
            authorization_key=str(key) if key else None,
            authorization_key_form=c.get_str("BasicAuthPasswordForm"),
            ca_certificates=ca,
            client_certificate=cert,
            client_key=private_key,
            ping_interval=c.get_float("WebSocketPingInterval"),
            reconnect_max=c.get_float("ReconnectFrequency"),
        )

    # -- the extensions (worker thread, before the first connection) ----------------------

    def _load_extensions(self) -> Sequence[Profile]:
        """Build the extensions and plug what they bring into the port."""
        assert self._extensions is not None
        loaded = self._extensions(self)
        if loaded.certificates is not None:
            self.certificates.store = loaded.certificates
        transfers = loaded.transfers
        if transfers is not None:
            # RemoteTriggerProfile(transfers=...) does the same at construction; the
            # trigger was registered before this profile existed. No connection
            # yet: nothing reads these meanwhile.
            self.trigger.diagnostics_status = transfers.diagnostics_status
            self.trigger.firmware_status = transfers.firmware_status
            self.trigger.signed_firmware_status = transfers.signed_firmware_status
            self.trigger.log_status = transfers.log_status
        if loaded.sign_certificate is not None:
            self.trigger.sign_certificate = loaded.sign_certificate
        return loaded.profiles

    def _connected(self, conn: Connection) -> None:
        """A new connection: the certificate store learns whether TLS is in use.

        M04.FR.06 (a root in use cannot be deleted): without TLS none is; with TLS
        every installed CentralSystemRootCertificate counts as in use (the store's
        rule for a chain it cannot match), since the transport does not hand out
        the server's chain. CertificateStoreMaxLength is per type and 1: that is
        the one installed root anyway. AdditionalRootCertificateCheck is read-only
        false (station-spec 2), so there is never a fallback root to confirm or
        revert (``CertificateStore.confirm_root`` / ``revert_root``).
        """
        store = self.certificates.store
        settings = getattr(conn, "settings", None)
        if store is None or settings is None:
            return
        store.note_connection(None if settings.security_profile < 2 else [])

    def _clock_set(self) -> None:
        """Whitepaper ed. 3 SettingSystemTime (critical): the central system's
        currentTime set the station's time in this boot, or stepped it by more than
        a second (``CentralClock.set``); a heartbeat's drift is no event."""
        events = self.security_events
        offset = self.chargepoint.clock.offset
        if events is None or offset is None:
            return
        events.emit(
            "SettingSystemTime",
            f"set by the central system's currentTime, {offset.total_seconds():+.3f} s",
        )

    # -- what a firmware update needs of the station (ocpp16.firmware.StationHooks) ----------

    def transactions_running(self) -> bool:
        station = self.station
        return station is not None and station.tx is not None

    async def make_unavailable(self) -> None:
        """The connector Unavailable now if idle, else when its transaction ends (OCPP
        1.6 5.19: installing waits for charging to end); no new transaction starts.
        For this run only: nothing is persisted, so a restart (into the new release,
        or after a power cut) comes back as available as before."""
        await self._hold_for_update(True)

    async def restore_availability(self) -> None:
        """The update ended without a restart: availability as the settings say."""
        await self._hold_for_update(False)

    async def restart(self) -> None:
        """End the run (transaction ended, board off) and restart into the new release."""
        if self.on_restart is None:
            log.error("a restart into a new release was asked for, but no restart hook is set")
            return
        await self.on_restart()

    async def _hold_for_update(self, held: bool) -> None:
        self.held_for_update = held
        await self._station().hold_unavailable(held)

    # -- CentralSystemPort (what the station tells us) --------------------------------------

    @property
    def link(self) -> CentralSystem:
        if self.connection_settings() is None:
            # A configured but unusable connection is as good as offline: the
            # fallback limit applies (station-spec 3).
            if self.config_problem:
                return CentralSystem.OFFLINE
            return CentralSystem.NOT_CONFIGURED
        return CentralSystem.ONLINE if self.chargepoint.online else CentralSystem.OFFLINE

    def _connector_id(self) -> int:
        return self.station.settings.connector_id if self.station is not None else 1

    def smart_charging_limit(self) -> float | None:
        smart = self.chargepoint.smart_charging
        return None if smart is None else smart.limit(self._connector_id())

    def tx_profile_in_effect(self) -> bool:
        smart = self.chargepoint.smart_charging
        return smart is not None and smart.tx_profile_in_effect(self._connector_id())

    def _local_limit(self, connector_id: int) -> float:
        """The station's own maximum (GetCompositeSchedule's local limits): board,
        installer, the cable while one is plugged."""
        if self.station is None:
            return 0.0
        inputs = self.station.limit_inputs()
        return min(
            a for a in (inputs.hardware_max, inputs.installer_max, inputs.cable) if a is not None
        )

    def journal(self, *, ending: int | None = None, stopped_at: datetime | None = None) -> Journal:
        samples: list[dict[str, Any]] = []
        if ending is not None and stopped_at is not None:
            cid = self.station.settings.connector_id if self.station is not None else 1
            samples = self.chargepoint.take_samples(
                ending, end=self.meter_snapshot(cid), stopped_at=stopped_at
            )
        return _Journal(self, samples)

    async def status_changed(
        self, connector_id: int, status: Status, error_code: ErrorCode, info: str
    ) -> None:
        self.chargepoint.status_changed()

    async def transaction_started(self, record: TransactionRecord) -> None:
        """Its StartTransaction is queued already (the journal): sample it."""
        self.chargepoint.begin_transaction(
            local_id=record.id,
            timestamp=record.started_at,
            begin=self.meter_snapshot(record.connector_id),
            connector_id=record.connector_id,
        )
        await trio.lowlevel.checkpoint()

    async def transaction_ended(self, record: TransactionRecord) -> None:
        """Its StopTransaction is queued already (the journal): send it."""
        self.chargepoint.end_transaction()
        await trio.lowlevel.checkpoint()

    async def _queue_meter_values(
        self, local_id: int, payload: dict[str, Any], energy_wh: float | None, at: datetime
    ) -> bool:
        """A transaction's MeterValues, queued in one commit with the reading it
        reports: a stop (even a PowerLoss one) never reports less, nor earlier."""
        station = self.station
        if station is None:
            return False

        def enqueue(conn: sqlite3.Connection) -> None:
            self.queue.enqueue_on(conn, "MeterValues", payload, local_tx_id=local_id)

        energy = energy_wh if energy_wh is not None else 0.0
        try:
            await trio.to_thread.run_sync(
                lambda: station.store.record_meter(local_id, energy, at, then=enqueue)
            )
        except (StoreError, OcppError) as exc:
            # The transaction ended meanwhile (its stop has the later reading).
            log.info("MeterValues of transaction %d not queued: %s", local_id, exc)
            return False
        return True

    def describe(self) -> dict[str, object]:
        """The connection status for operators (station-spec section 3)."""
        link = self.chargepoint.link_status
        return {
            "state": self.link.value,
            "link": link.state.value,
            "reason": self.config_problem or link.reason,
            "registration": self.chargepoint.registration.value,
            "address": self.config.get_str("CentralSystemAddress"),
            "charge_point_id": self.config.get_str("ChargePointId") or self.identity.serial,
            "security_profile": self.config.get_int("SecurityProfile"),
            # "disabled" has two causes the link alone does not tell apart:
            # switched off by the installer, or no address configured.
            "enabled": self.config.get_bool("ConnectionEnabled"),
            # Counted by a task of its own: this is read from the trio thread (the
            # status view, STATUS=), which must never wait on the SQLite lock a
            # worker thread holds through a slow fsync.
            "queued_messages": self.queued_messages,
        }

    async def run(self) -> None:
        self.chargepoint.on_link_change = self.link_changed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward_link_changes, name="limit inputs")
            nursery.start_soon(self._count_queue, name="queue count")
            await self.chargepoint.run()

    async def _count_queue(self) -> None:
        while True:
            try:
                self.queued_messages = await trio.to_thread.run_sync(self.queue.pending_count)
            except OcppError as exc:
                log.warning("queue not counted: %s", exc)
            await trio.sleep(QUEUE_COUNT_INTERVAL)

    async def _forward_link_changes(self) -> None:
        async for _ in self._link_changed_receive:
            if self.station is not None:
                await self.station.inputs_changed()

    # -- StationControl (what the charge point asks of the station) -----------------------

    def _station(self) -> Station:
        if self.station is None:
            raise RuntimeError("the station is not running yet")
        return self.station

    def status_of(self, connector_id: int) -> tuple[str, str, str]:
        station = self.station
        if station is None:
            return ("Unavailable", "NoError", "starting")
        if connector_id == 0:
            # The charge point itself: its own availability and station-wide faults.
            status, code, info = station.station_status()
            return (status.value, code.value, info)
        c = station.connector
        info = ", ".join(f.value for f in c.snapshot.faults)
        return (c.status.value, c.error_code.value, info)

    def meter_snapshot(self, connector_id: int) -> MeterSnapshot | None:
        station = self.station
        if station is None or station.meter_reading is None:
            return None
        r = station.meter_reading
        return MeterSnapshot(
            energy_wh=r.energy_import_wh,
            power_w=r.power_total,
            current_a=r.current,
            voltage_v=r.voltage,
            offered_a=station.commanded,
            timestamp=r.timestamp,
        )

    def running_transaction(self, connector_id: int) -> int | None:
        station = self.station
        tx = station.tx if station is not None else None
        return tx.id if tx is not None else None

    async def remote_start(self, id_tag: str, connector_id: int | None) -> bool:
        return await self._station().remote_start(id_tag)

    async def remote_stop(self, local_tx_id: int) -> bool:
        station = self._station()
        if station.tx is None or station.tx.id != local_tx_id:
            return False
        return await station.request_stop(StopReason.REMOTE)

    async def change_availability(self, connector_id: int, operative: bool) -> str:
        return await self._station().set_availability(operative, connector_id)

    async def unlock(self, connector_id: int) -> str:
        """UnlockConnector (OCPP 1.6 5.18). The cable version has no lock:
        NotSupported. The socket version: the station stops a running transaction
        (UnlockCommand), then releases the lock and answers from the board's lock
        detection (Unlocked / UnlockFailed); NotSupported on a board that drives
        no lock (``Station.unlock_connector``)."""
        if self.connector_kind == "cable":
            return "NotSupported"
        return await self._station().unlock_connector()

    async def reset(self, hard: bool) -> None:
        if self.on_reset is None:
            log.error("reset requested, but no restart hook is installed")
            return
        await self.on_reset(hard)

    async def deauthorize(self, local_tx_id: int) -> None:
        """StopTransactionOnInvalidId true: the transaction stops with DeAuthorized."""
        await self._station().deauthorize(local_tx_id, stop=True)

    async def suspend_transaction(self, local_tx_id: int) -> None:
        """StopTransactionOnInvalidId false: no energy for the rest of the transaction."""
        await self._station().deauthorize(local_tx_id, stop=False)

    async def reserve(
        self,
        connector_id: int,
        reservation_id: int,
        id_tag: str,
        expiry: datetime,
        parent_id_tag: str | None,
    ) -> str:
        """ReserveNow (the profile checked the connector; 0 is the one connector)."""
        return await self._station().reserve(reservation_id, id_tag, expiry, parent_id_tag)

    async def cancel_reservation(self, reservation_id: int) -> bool:
        return await self._station().cancel_reservation(reservation_id)

    async def clear_cache(self) -> bool:
        # Asked only without ``local_auth``: the charge point clears that cache itself.
        if self.local_auth is None:
            return True
        status = await trio.to_thread.run_sync(self.local_auth.clear_cache)
        return status is ClearCacheStatus.ACCEPTED

    def auth_steps(self) -> list[AuthStep]:
        """The chain's steps on the central system's side, after the installer's tags
        (OCPP 1.6 3.5): the local list, the cache, Authorize.req, and offline the
        unknown-id step. The policy keys are read at every request."""

        def online() -> bool:
            return self.chargepoint.online

        steps: list[AuthStep] = []
        if self.local_auth is not None:
            steps += [
                LocalListStep(self.local_auth, online=online, result=local_result),
                CacheStep(self.local_auth, online=online, result=local_result),
            ]
        return [*steps, OnlineAuthorize(self), UnknownIdOffline(self)]

    def link_changed(self) -> None:
        """Online/offline or the smart-charging limit changed: the station recomputes."""
        # One recomputation pending is enough.
        with contextlib.suppress(trio.WouldBlock):
            self._link_changed_send.send_nowait(None)


class _Journal:
    """Queues a transaction's OCPP messages on the store's connection, inside the
    store's commit (``evse.store.Journal``)."""

    def __init__(self, port: OcppPort, samples: list[dict[str, Any]]) -> None:
        self.port = port
        self.samples = samples

    def _start(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
        cp = self.port.chargepoint
        payload = cp.start_message(
            connector_id=record.connector_id,
            id_tag=record.id_tag,
            meter_start_wh=record.meter_start_wh,
            timestamp=record.started_at,
            reservation_id=record.reservation_id,
        )
        self.port.queue.enqueue_on(
            conn,
            "StartTransaction",
            payload,
            local_tx_id=record.id,
            dedupe_key=f"start:{record.id}",
        )

    def started(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
        self._start(conn, record)

    def ended(self, conn: sqlite3.Connection, record: TransactionRecord) -> None:
        assert record.stop_reason is not None and record.stopped_at is not None
        # Its start first, if it never was queued (a store from before the journal).
        self._start(conn, record)
        stop = self.port.chargepoint.stop_message(
            local_id=record.id,
            meter_stop_wh=record.meter_stop_wh or record.last_meter_wh,
            stopped_at=record.stopped_at,
            reason=record.stop_reason,
            stop_id_tag=record.stop_id_tag,
            samples=self.samples,
        )
        self.port.queue.enqueue_on(
            conn, "StopTransaction", stop, local_tx_id=record.id, dedupe_key=f"stop:{record.id}"
        )

    def unreported(self, conn: sqlite3.Connection, record: TransactionRecord) -> bool:
        queue = self.port.queue
        return queue.has_message_on(conn, f"start:{record.id}") and not queue.has_message_on(
            conn, f"stop:{record.id}"
        )


#: How often the status view's count of queued messages is refreshed (s).
QUEUE_COUNT_INTERVAL = 1.0

#: Configuration keys the connection settings are built from.
CONNECTION_KEYS = frozenset(
    {
        "CentralSystemAddress",
        "ConnectionEnabled",
        "ChargePointId",
        "CentralSystemRootCertificate",
        "ChargePointCertificate",
        "ChargePointPrivateKey",
        "AuthorizationKey",
        "BasicAuthPasswordForm",
        "SecurityProfile",
        "WebSocketPingInterval",
        "ReconnectFrequency",
    }
)


class OnlineAuthorize:
    """The chain's online step: Authorize.req while the central system is reachable.

    Offline it has no opinion (the unknown-id step after it decides); the
    installer's tags, the local list and the cache come before it. Its answer
    is cached by the charge point (``ChargePoint.authorize``).
    """

    name = "online"

    def __init__(self, port: OcppPort) -> None:
        self.port = port

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        cp = self.port.chargepoint
        if not cp.online:
            await trio.lowlevel.checkpoint()
            return None
        info = await cp.authorize(id_tag)
        if info is None:
            return None
        expiry = info.get("expiryDate")
        return AuthResult(
            id_tag=id_tag,
            status=AuthStatus(info.get("status", "Invalid")),
            source="central system",
            parent_id_tag=info.get("parentIdTag"),
            expiry=datetime.fromisoformat(expiry.replace("Z", "+00:00"))
            if isinstance(expiry, str)
            else None,
        )


class UnknownIdOffline:
    """The chain's last step: offline, AllowOfflineTxForUnknownId lets an id tag that
    no step before it decided on charge (OCPP 1.6 3.5.4, 9.1.1).

    "Offline" is a configured central system that is not reachable; without
    one configured the station is standalone and this step has no opinion. A
    tag the list or the cache holds as Blocked, Expired or Invalid never gets
    here: those steps refuse it offline (it is not unknown).
    """

    name = "offline unknown id"

    def __init__(self, port: OcppPort) -> None:
        self.port = port

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        if self.port.link is CentralSystem.OFFLINE and self.port.config.get_bool(
            "AllowOfflineTxForUnknownId"
        ):
            return AuthResult(id_tag=id_tag, status=AuthStatus.ACCEPTED, source="offline")
        return None


def local_result(answer: LocalAnswer) -> AuthResult:
    """A local list or cache step's answer as the chain's ``AuthResult``."""
    return AuthResult(
        answer.id_tag,
        AuthStatus(answer.status.value),
        answer.source,
        parent_id_tag=answer.parent_id_tag,
        expiry=answer.expiry,
    )
