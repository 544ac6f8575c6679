"""The station's central-system port, spoken in OCPP 1.6J.

``OcppPort`` sits between the two packages that must not know each other:
towards evse it is a ``CentralSystemPort`` (the station reports status and
transactions, asks for the link state and smart-charging limit); towards
ocpp16 it is the ``StationControl`` the charge point asks to start, stop,
change availability, unlock or reset. Translating between the station's
records and OCPP's payloads happens here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio

from evse.auth import AuthResult, AuthStatus, AuthStep
from evse.connector import ErrorCode, Status, StopReason
from evse.errors import StoreError
from evse.limits import CentralSystem
from evse.station import Station
from evse.store import Journal, TransactionRecord
from ocpp16.chargepoint import ChargePoint, Identity
from ocpp16.config import Configuration
from ocpp16.errors import OcppError
from ocpp16.local_auth import CacheStep, ClearCacheStatus, LocalAnswer, LocalAuth, LocalListStep
from ocpp16.metering import MeterSnapshot
from ocpp16.profiles.remote_trigger import RemoteTriggerProfile
from ocpp16.profiles.reservation import ReservationProfile
from ocpp16.queue import TransactionQueue

if TYPE_CHECKING:
    from ocpp16.profile_store import ProfileStore
    from ocpp16.transport import ConnectionSettings

log = logging.getLogger(__name__)


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
    ) -> None:
        self.config = config
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
        )
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
        self.chargepoint.register(RemoteTriggerProfile(self.chargepoint))
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
        key = c.get_str("AuthorizationKey")
        return ConnectionSettings(
            central_system_url=address,
            charge_point_id=cp_id,
            security_profile=c.get_int("SecurityProfile"),
            authorization_key=str(key) if key else None,
            authorization_key_form=c.get_str("BasicAuthPasswordForm"),
            ca_certificates=ca,
            client_certificate=cert,
            client_key=private_key,
            ping_interval=c.get_float("WebSocketPingInterval"),
            reconnect_max=c.get_float("ReconnectFrequency"),
        )

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
