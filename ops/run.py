"""``evse run``: the station from a config file, or on the built-in simulator.

Maps the validated ``ops.config.Config`` onto the supervisor's ``Plan``,
refuses a second station on the same data directory or board (ops/lock.py)
before touching store or bus, adds the ops tasks around the supervisor
(control socket; systemd READY=1 once board and meter answered, STATUS= that
follows the station, the watchdog, and the liveness probe that aborts a
wedged station loop), handles SIGTERM/SIGINT (the first stops the
transaction with reason Reboot and switches off, exit 0; later ones are
logged) and turns failures into the documented exit codes (ops/systemd.py).

Issue 10 (firmware, diagnostics, security) adds, in this order at start: the
station's own log files (``ops.logs.install_file_logs``: the QueueHandler's
thread writes them, never the trio thread), the releases' start check
(``Releases.at_start``, only when the station runs from a release: a trial
that failed here exits 1 at once, before the store or the bus is touched, so
that the unit starts the previous release), the security event queue and
StartupOfTheDevice, and the OCPP port with its extensions (the Firmware
Management and certificate profiles, ``ops/firmware_wiring.py``, built at the
first connection only). While a new release is on trial the task "release
trial" confirms it once BootNotification is Accepted (no central system: once
the station loop answers) or, at the trial's deadline, lets ``check_trial``
roll it back. A restart into another release (an installed update, a rollback)
is an orderly stop (transaction ended with Reboot, board off) that exits 1,
the code the unit restarts on: never the re-exec of an OCPP Reset, whose
``sys.executable`` is the release that is being left.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from evse.auth import AuthStatus, AuthStep, FreeCharging, LocalTagList
from evse.connector import StopReason
from evse.errors import HardwareUnavailable, StoreError, find_in_group
from evse.limits import CentralSystem
from evse.ocpp_port import CertificateSlot, OcppPort
from evse.rfid import RfidConfig as ReaderConfig
from evse.safety import SafetySettings
from evse.station import Station, StationSettings
from evse.store import Store
from evse.supervisor import DeviceSpec, Plan, Service, Supervisor
from ocpp16.chargepoint import Identity
from ocpp16.config import Configuration
from ocpp16.errors import ConfigRejected
from ocpp16.local_auth import AuthSettings, LocalAuth
from ocpp16.profile_store import ProfileStore
from ocpp16.queue import SecurityEventQueue, TransactionQueue
from ocpp16.security_events import SecurityEvents
from ops import firmware_wiring, lock, logs, resources, systemd
from ops.config import (
    BOARD_RETRIES,
    METER_RETRIES,
    Config,
    ConfigError,
    config_from_dict,
    registry_maxima,
    seed_registry,
)
from ops.control import control_service
from ops.errors import ReleaseError
from ops.firmware_wiring import ReleaseContext
from ops.progress import Transfers

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("evse-firmware")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
    VERSION = "0+unknown"

#: The liveness probe: the station loop must answer a no-op request within
#: this time, or the run is aborted (switched off, exit 70) while the systemd
#: watchdog (WatchdogSec=10) still has time to spare.
PROBE_TIMEOUT = 5.0
#: Seconds between two liveness probes.
PROBE_INTERVAL = 1.0
#: How often STATUS= is compared with the station's state (at most this many
#: notifications per second: 1 / STATUS_INTERVAL).
STATUS_INTERVAL = 0.25
#: How often a release on trial looks again whether a central system is configured
#: (its goal: BootNotification Accepted with one, an answering loop without).
TRIAL_LOOK = 5.0


def auth_steps(config: Config) -> list[AuthStep]:
    auth = config.authorization
    if auth.mode == "free":
        return [FreeCharging(auth.free_id_tag)]
    statuses = dict.fromkeys(auth.tags, AuthStatus.ACCEPTED)
    statuses.update(dict.fromkeys(auth.blocked, AuthStatus.BLOCKED))
    return [LocalTagList(statuses)]


def store_path(config: Config) -> Path:
    return config.station.data_dir / "station.sqlite"


@dataclass
class Central:
    """The OCPP side of a station: registry, queue and port, on the station's file."""

    registry: Configuration
    queue: TransactionQueue
    port: OcppPort
    settings_store: Store
    #: The local authorization list and the authorization cache (OCPP 1.6 3.5).
    local_auth: LocalAuth | None = None
    #: The ChargePointMax and TxDefault charging profiles (OCPP 1.6 3.13).
    charging_profiles: ProfileStore | None = None
    #: SecurityEventNotifications waiting (same file, own tables), and the security
    #: log with its sender (Security Whitepaper ed. 3).
    security_queue: SecurityEventQueue | None = None
    events: SecurityEvents | None = None
    #: Long transfers (firmware download, diagnostics upload): evse status shows them.
    transfers: Transfers = field(default_factory=Transfers)
    #: The releases of this run (issue 10).
    releases: ReleaseContext = field(default_factory=ReleaseContext)

    def close(self) -> None:
        # The security events first: close writes what is still waiting, into the
        # queue it shares the file with (the flush before a restart or a reset).
        if self.events is not None:
            self.events.close()
        if self.security_queue is not None:
            self.security_queue.close()
        if self.charging_profiles is not None:
            self.charging_profiles.close()
        if self.local_auth is not None:
            self.local_auth.close()
        self.queue.close()
        self.settings_store.close()


def open_central(
    config: Config,
    *,
    releases: ReleaseContext | None = None,
    flush_logs: Callable[[], object] | None = None,
    security_log_cleared: str | None = None,
) -> Central:
    """Open the configuration registry and the transaction queue; build the port.

    The file's values of the registry keys it seeds (``ops.config.SEATS``:
    station.id is the charge point id, the central system address, the
    fallback limit, ConnectionTimeOut) go through the registry's one rule
    (``Configuration.seed``): a file changed since the last start wins, and a
    warning names the key and both values; while the file is unchanged, a
    value changed since by the central system or the installer stays. A file
    value the registry refuses is a ConfigError naming both values (exit 78).

    The security event queue is opened too and StartupOfTheDevice raised
    (whitepaper ed. 3: critical, sent once registered). ``releases``: this
    run's (``ops.firmware_wiring.release_context``, after ``at_start``); the
    port's extensions (firmware management, certificates) load at its first
    connection. ``flush_logs`` writes out the log files before GetDiagnostics
    or GetLog reads them. ``security_log_cleared`` (``FileLogs``'s finding at
    start) raises SecurityLogWasCleared, critical, after StartupOfTheDevice.
    """
    context = releases if releases is not None else firmware_wiring.release_context(config)
    path = store_path(config)
    settings_store = Store.open(path)
    # The certificate store is opened with the extensions; a SecurityProfile raise
    # asks it for an installed root or client certificate (whitepaper prerequisites).
    certificates = CertificateSlot()
    try:
        registry = Configuration(
            settings_store, maxima=registry_maxima(config), credentials=certificates.credentials()
        )
        seed_registry(registry, config)
    except BaseException:
        settings_store.close()
        raise
    queue = TransactionQueue.open(path)
    security_queue = SecurityEventQueue.open(path)
    events = SecurityEvents(security_queue)
    events.emit("StartupOfTheDevice", f"evse-firmware {VERSION}")
    if security_log_cleared is not None:
        events.emit("SecurityLogWasCleared", security_log_cleared)
    transfers = Transfers()
    # The list's and the cache's policy keys are read at every use (live).
    local_auth = LocalAuth.open(path, settings=lambda: AuthSettings.from_keys(registry.get_bool))
    charging_profiles = ProfileStore.open(path)
    identity = Identity(
        vendor="evse-firmware",
        model=charge_point_model(config.station.phases, config.board.kind),
        serial=config.station.serial,
        firmware_version=VERSION,
        meter_type=config.meter.kind,
    )
    port = OcppPort(
        config=registry,
        queue=queue,
        identity=identity,
        connector=config.station.connector,
        local_auth=local_auth,
        charging_profiles=charging_profiles,
        security_events=events,
        certificates=certificates,
        extensions=firmware_wiring.extensions(
            config=config,
            registry=registry,
            queue=queue,
            settings_store=settings_store,
            security_queue=security_queue,
            events=events,
            context=context,
            transfers=transfers,
            version=VERSION,
            flush_logs=flush_logs,
        ),
    )
    return Central(
        registry,
        queue,
        port,
        settings_store,
        local_auth,
        charging_profiles,
        security_queue=security_queue,
        events=events,
        transfers=transfers,
        releases=context,
    )


def plan_from_config(
    config: Config,
    *,
    services: Sequence[Service] = (),
    registry: Configuration | None = None,
    online: AuthStep | None = None,
    central_steps: Sequence[AuthStep] = (),
) -> Plan:
    s = config.safety
    rfid = None
    if config.rfid is not None:
        r = config.rfid
        rfid = ReaderConfig(
            device=str(r.device),
            baud=r.baud,
            pattern=r.pattern,
            reverse_bytes=r.reverse_bytes,
            debounce=r.debounce,
        )
    # A device on a shared line gets one retry: a silent one must not hold the
    # bus past the board's staleness budget (the config checks the budget).
    return Plan(
        board=DeviceSpec(
            config.board.kind,
            config.board.port.url,
            config.board.unit,
            config.board.timeout,
            BOARD_RETRIES,
        ),
        meter=DeviceSpec(
            config.meter.kind,
            config.meter.port.url,
            config.meter.unit,
            config.meter.timeout,
            METER_RETRIES,
        ),
        store_path=config.station.data_dir / "station.sqlite",
        station=StationSettings(
            installer_max=config.limits.installer_max,
            fallback=registry.get_float("FallbackLimit")
            if registry is not None
            else config.limits.fallback,
            connection_timeout=float(registry.get_int("ConnectionTimeOut"))
            if registry is not None
            else float(config.authorization.connection_timeout),
            free_id_tag=config.authorization.free_id_tag
            if config.authorization.mode == "free"
            else None,
            board_poll=config.board.poll_interval,
            meter_poll=config.meter.poll_interval,
            persist_interval=s.persist_interval,
            failsafe_watchdog=config.board.failsafe_watchdog,
            mains_lost_voltage=s.mains_lost_voltage,
            connector=config.station.connector,
            safety=SafetySettings(
                board_timeout=s.board_timeout,
                meter_timeout=s.meter_timeout,
                overcurrent_margin=s.overcurrent_margin,
                overcurrent_time=s.overcurrent_time,
                welded_time=s.welded_time,
            ),
        ),
        # OCPP 1.6 3.5: the installer's tags (or free charging) first, then the
        # central system's side: local list, cache, Authorize, offline unknown id.
        auth_steps=[
            *auth_steps(config),
            *central_steps,
            *([online] if online is not None else []),
        ],
        rfid=rfid,
        off_deadline=s.off_deadline,
        start_timeout=s.start_timeout,
        services=services,
    )


def status_text(view: Mapping[str, Any]) -> str:
    """The one-line ``STATUS=`` of ``systemctl status``, from ``Station.view()``.

    ``Charging 16 A, transaction 3``, ``Faulted: rcd_trip``, ``Preparing``...
    """
    status = str(view.get("status"))
    if status == "Faulted":
        faults = view.get("faults")
        names = ", ".join(faults) if isinstance(faults, dict) and faults else None
        text = f"Faulted: {names or view.get('error_code')}"
    elif status == "Charging":
        offered = view.get("offered_a")
        amps = f"{offered:g}" if isinstance(offered, int | float) else "?"
        text = f"Charging {amps} A"
    else:
        text = status
    tx = view.get("transaction")
    if isinstance(tx, dict):
        text += f", transaction {tx.get('id')}"
    return text


def waiting_text(supervisor: Supervisor) -> str:
    """What the start is waiting for, until board and meter have answered."""
    station = supervisor.station
    missing = [
        name
        for name, answered in (
            ("board", station is not None and station.board_status is not None),
            ("meter", station is not None and station.meter_reading is not None),
        )
        if not answered
    ]
    return "waiting for " + " and ".join(missing or ["board and meter"])


@dataclass
class RunState:
    """What the ops tasks around one supervisor know about its run."""

    #: Why the orderly stop began (a signal, a Reset, the demo), once it has.
    stopping: str | None = None
    #: Why the run was aborted (the liveness probe failed), if it was.
    aborted: str | None = None
    #: When the liveness probe now waiting for the station loop was sent.
    probe_sent: float | None = None
    probe_timeout: float = PROBE_TIMEOUT

    def healthy(self) -> bool:
        """For the systemd watchdog: pings go on until the probe has failed.

        A probe that fails aborts the run (which switches off) at once, while
        the watchdog still has at least half of WatchdogSec= to run; only a
        process too stuck to abort, or to end after aborting, is left to
        systemd's kill.
        """
        if self.aborted is not None:
            return False
        sent = self.probe_sent
        return sent is None or trio.current_time() - sent < self.probe_timeout


async def serve_systemd(
    supervisor: Supervisor,
    notifier: systemd.Notifier,
    run: RunState,
    *,
    on_ready: Callable[[], None] | None = None,
    probe_interval: float = PROBE_INTERVAL,
    status_interval: float = STATUS_INTERVAL,
) -> None:
    """READY=1 once board and meter answered; STATUS= as the station changes;
    the watchdog; the liveness probe that aborts a wedged station loop."""
    async with trio.open_nursery() as nursery:
        # From the start: the start is bounded by Plan.start_timeout anyway.
        nursery.start_soon(systemd.watchdog_loop, notifier, run.healthy, name="systemd watchdog")
        shown = ""
        while not supervisor.hardware_ready.is_set():
            text = waiting_text(supervisor)
            if text != shown and run.stopping is None:
                await notifier.status(text)
                shown = text
            with trio.move_on_after(status_interval):
                await supervisor.hardware_ready.wait()
        # The station loop serves requests (the probe needs it), in whichever
        # order the supervisor sets the two.
        await supervisor.started.wait()
        station = supervisor.station
        assert station is not None
        if on_ready is not None:
            on_ready()
        shown = status_text(station.view())
        await notifier.ready(shown)
        nursery.start_soon(_probe, supervisor, notifier, run, probe_interval, name="liveness probe")
        while notifier.enabled:
            await trio.sleep(status_interval)
            if run.stopping is not None or run.aborted is not None:
                continue
            text = status_text(station.view())
            if text != shown:
                await notifier.status(text)
                shown = text


async def _probe(
    supervisor: Supervisor, notifier: systemd.Notifier, run: RunState, interval: float
) -> None:
    """Ask the station loop for a no-op every ``interval``; abort if it does not answer."""
    station = supervisor.station
    assert station is not None
    while run.stopping is None:
        run.probe_sent = trio.current_time()
        try:
            with trio.move_on_after(run.probe_timeout) as scope:
                await station.call(_noop)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the loop has ended: so is the supervisor
        finally:
            run.probe_sent = None
        if scope.cancelled_caught and run.stopping is None:
            reason = (
                f"the station loop did not answer its liveness probe within {run.probe_timeout:g} s"
            )
            log.critical("%s: switching off and exiting", reason)
            run.aborted = reason
            supervisor.abort(reason)
            await notifier.status(f"aborting: {reason}")
            return
        await trio.sleep(interval)


async def _noop() -> None:
    return


@dataclass
class RunResult:
    code: int
    supervisor: Supervisor | None = None


def check_data_dir(config: Config) -> None:
    """The data directory and the control socket's directory exist and are ours.

    Checked before anything starts, so a missing directory is one line naming
    the setting (exit 78) instead of a failure deep in the store.
    """
    source = config.source or "<configuration>"
    data_dir = config.station.data_dir
    if not data_dir.exists():
        raise ConfigError(source, "station.data_dir", f"directory {data_dir} does not exist")
    if not data_dir.is_dir():
        raise ConfigError(source, "station.data_dir", f"{data_dir} is not a directory")
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(source, "station.data_dir", f"directory {data_dir} is not writable")
    # The store and SQLite's journal files beside it: one made by another user
    # (an `evse` command run as root before the first start) would otherwise
    # fail deep in SQLite as "attempt to write a readonly database".
    store = store_path(config)
    for path in (store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(
                source,
                "station.data_dir",
                f"{path} is not readable and writable by this user (owner uid "
                f"{path.stat().st_uid}): give it to the station's user (chown)",
            )
    parent = config.control.socket.parent
    if not parent.is_dir():
        raise ConfigError(source, "control.socket", f"directory {parent} does not exist")


def station_claims(config: Config, directory: Path | None = None) -> list[lock.Claim]:
    """The locks ``evse run`` holds for its life: data directory, board, serial lines."""
    return lock.station_claims(
        config.station.data_dir,
        config.board.port.url,
        config.board.unit,
        config.meter.port.url,
        lock.lock_dir() if directory is None else directory,
    )


#: SIGPWR: a UPS daemon says mains power changed (its default action kills the
#: process, so it is received, never left to the default).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGPWR)


def mains_from_status_file(path: Path) -> tuple[bool, str]:
    """What a SIGPWR means, from the UPS daemon's power status file (the sysvinit
    convention: ``O`` power OK, ``F`` failing, ``L`` battery low); (mains ok?, why).
    A missing or unreadable file is "lost": SIGPWR alone means a power problem."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        return False, f"SIGPWR, {path}: {exc.strerror or exc}"
    if text[:1].upper() == "O":
        return True, f"SIGPWR, {path} says O (power back)"
    return False, f"SIGPWR, {path} says {text[:1] or 'nothing'}"


@contextlib.contextmanager
def _signals_ignored_around() -> Iterator[None]:
    """SIGTERM/SIGINT ignored while ``trio.open_signal_receiver`` is not open.

    The receiver restores the handlers it found and re-raises signals still
    queued when it closes; with SIG_IGN found, a signal that arrives in the
    last instants of the run is dropped instead of killing the process (or
    raising KeyboardInterrupt) after its orderly stop. The process's own
    handlers come back when the run has ended.
    """
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def run_station(
    config: Config,
    *,
    driver: Callable[[Supervisor, Central], Awaitable[None]] | None = None,
    notifier: systemd.Notifier | None = None,
    settings: Mapping[str, str] | None = None,
    probe_timeout: float = PROBE_TIMEOUT,
    on_web_ready: Callable[[str], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code.

    Refused before the store or the bus is touched, by exception: a data
    directory that is missing (``ConfigError``), another station on the same
    data directory or board (``ops.lock.LockHeld``). ``HardwareUnavailable``
    (a device silent at start) is raised as itself, after the switch-off,
    never in a group, and without READY=1.

    ``settings`` are installer settings given on the command line (central
    system address, charge point id): validated like ``evse config set``, in
    force for this run only and never stored (``Configuration.override``: the
    next start without them has the file's or the stored values again); a
    refused one raises ConfigRejected before anything starts.
    ``driver`` (the demo) runs once the station is up; when it returns, the
    station shuts down as on SIGTERM.

    Signals: the receiver is open from the first line to the last, so the
    first SIGTERM or SIGINT starts the orderly stop and every later one is
    logged and never interrupts it (no KeyboardInterrupt in the switch-off).
    """
    notifier = notifier or systemd.Notifier()
    with _signals_ignored_around(), trio.open_signal_receiver(*SIGNALS) as signals:
        try:
            await trio.to_thread.run_sync(check_data_dir, config)
            held = await trio.to_thread.run_sync(lock.acquire, station_claims(config))
            file_logs = None
            try:
                file_logs = await _start_file_logs(config)
                context = await _releases_at_start(config)
                if context.report.restart:
                    # The trial failed and `current` went back: this process runs the
                    # failed release's code. Exit so the unit starts the previous one
                    # (nothing was switched on: store and bus are not touched yet).
                    return systemd.EXIT_FAILURE
                return await _run_locked(
                    config,
                    signals=signals,
                    driver=driver,
                    notifier=notifier,
                    settings=settings,
                    probe_timeout=probe_timeout,
                    on_web_ready=on_web_ready,
                    releases=context,
                    flush_logs=file_logs.flush if file_logs is not None else None,
                    security_log_cleared=(
                        file_logs.security_log_cleared if file_logs is not None else None
                    ),
                )
            finally:
                if file_logs is not None:
                    file_logs.close()
                held.release()
        finally:
            notifier.close()


async def _start_file_logs(config: Config) -> logs.FileLogs | None:
    """The station's own log files (GetDiagnostics, GetLog); None when they cannot be
    kept (said once: the station charges without them)."""
    try:
        return await trio.to_thread.run_sync(logs.install_file_logs, config.station.data_dir)
    except OSError as exc:
        log.error("station log files not kept in %s: %s", config.station.data_dir, exc)
        return None


async def _releases_at_start(config: Config) -> ReleaseContext:
    """This run's releases; when the station runs from one, its start counted
    (``Releases.at_start``) and what it found in ``report``."""
    context = firmware_wiring.release_context(config)
    releases = context.releases
    if releases is None or not context.running:
        return context
    try:
        report = await trio.to_thread.run_sync(releases.at_start)
    except (ReleaseError, OSError) as exc:
        log.error("releases in %s not checked at start: %s", releases.root, exc)
        return context
    if report.rolled_back is not None:
        # Kept until the firmware profile has reported it (its restart_reported).
        failed, to, why = report.rolled_back
        log.error("release %s was rolled back to %s: %s", failed, to, why)
    elif report.installed is not None:
        # A confirm whose record was not cleared (a crash in between): the
        # firmware profile reports an update from its own state.
        with contextlib.suppress(ReleaseError, OSError):
            await trio.to_thread.run_sync(releases.report_delivered)
    if report.restart:
        log.critical("restarting into release %s (exit 1: the unit starts it)", releases.current())
    elif report.on_trial is not None:
        log.warning("release %s is on trial: it must register to stay", report.on_trial)
    return replace(context, report=report)


def _web_service(
    config: Config, central: Central, on_ready: Callable[[str], None] | None
) -> Service:
    """The installer's page (ops/web), imported only when it is enabled: its server
    and the certificate checks cost about 10 MB a station without it does not pay."""
    from ops.web.server import WebSettings, web_service  # noqa: PLC0415

    web = config.web
    settings = WebSettings(
        enabled=True,
        host=web.host,
        port=web.port,
        certificate=web.certificate,
        key=web.key,
        session_lifetime=web.session_lifetime,
    )

    return web_service(
        settings,
        registry=central.registry,
        queue=central.queue,
        data_dir=config.station.data_dir,
        on_ready=on_ready,
    )


async def _run_locked(
    config: Config,
    *,
    signals: AsyncIterator[int],
    driver: Callable[[Supervisor, Central], Awaitable[None]] | None,
    notifier: systemd.Notifier,
    settings: Mapping[str, str] | None,
    probe_timeout: float,
    on_web_ready: Callable[[str], None] | None = None,
    releases: ReleaseContext | None = None,
    flush_logs: Callable[[], object] | None = None,
    security_log_cleared: str | None = None,
) -> int:
    central = await trio.to_thread.run_sync(
        partial(
            open_central,
            config,
            releases=releases,
            flush_logs=flush_logs,
            security_log_cleared=security_log_cleared,
        )
    )
    try:
        if settings:
            # For this run only: a flag on one command line must not change
            # what the next start (systemd's, without it) connects to.
            result = central.registry.override(dict(settings), source="command line")
            if not result.ok:
                raise ConfigRejected(", ".join(settings), result.reason)
        return await _supervise(
            config,
            central,
            signals=signals,
            driver=driver,
            notifier=notifier,
            probe_timeout=probe_timeout,
            on_web_ready=on_web_ready,
        )
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(central.close)


async def _supervise(
    config: Config,
    central: Central,
    *,
    signals: AsyncIterator[int],
    driver: Callable[[Supervisor, Central], Awaitable[None]] | None,
    notifier: systemd.Notifier,
    probe_timeout: float,
    on_web_ready: Callable[[str], None] | None = None,
) -> int:
    socket_path = str(config.control.socket)
    port = central.port
    central_steps = [] if config.authorization.mode == "free" else port.auth_steps()
    # Long transfers (firmware download, diagnostics upload) report here; evse status shows them.
    transfers = central.transfers
    services = [
        control_service(socket_path, central.registry, central.queue, transfers, config=config)
    ]
    if config.web.enabled:
        services.append(_web_service(config, central, on_web_ready))
    plan = plan_from_config(
        config,
        services=services,
        registry=central.registry,
        central_steps=central_steps,
    )
    supervisor = Supervisor(plan, central=port)
    run = RunState(probe_timeout=probe_timeout)
    restart = RestartRequest()

    async def stop(reason: StopReason, why: str) -> None:
        run.stopping = why
        await notifier.stopping("stopping")
        await supervisor.shutdown(reason)

    def security_event(event_type: str, tech_info: str) -> None:
        if central.events is not None:
            central.events.emit(event_type, tech_info)

    async def on_reset(hard: bool) -> None:
        # OCPP 1.6 5.15: stop transactions with SoftReset/HardReset, then restart.
        restart.requested = True
        # Whitepaper ed. 3 ResetOrReboot (critical); written out by central.close().
        security_event("ResetOrReboot", f"{'Hard' if hard else 'Soft'} Reset by the central system")
        if run.stopping is None:
            await stop(StopReason.HARD_RESET if hard else StopReason.SOFT_RESET, "OCPP Reset")

    port.on_reset = on_reset

    async def restart_into_release(why: str) -> None:
        # Exit 1 once stopped (transaction ended with Reboot, board off): the unit
        # restarts through `current`, i.e. into the release now switched to.
        restart.release = why
        security_event("ResetOrReboot", why)
        if run.stopping is None:
            await stop(StopReason.REBOOT, why)

    async def restart_for_update() -> None:
        releases = central.releases.releases
        version = await trio.to_thread.run_sync(releases.current) if releases else None
        await restart_into_release(f"restart into firmware release {version}")

    port.on_restart = restart_for_update

    def running() -> None:
        # The identity the central system sees: station.id as seeded, or what
        # the installer or the command line set since.
        cp_id = central.registry.get_str("ChargePointId") or config.station.serial
        log.info("station %s running; control socket %s", cp_id, socket_path)

    code = systemd.EXIT_OK
    try:
        async with trio.open_nursery() as nursery:

            async def mains_changed() -> None:
                station = supervisor.station
                ok, why = mains_from_status_file(config.safety.power_status_file)
                if station is None:
                    log.warning("%s: the station is not running yet", why)
                    return
                await station.mains_power(ok, why)

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGPWR:
                        nursery.start_soon(mains_changed, name="mains power")
                        continue
                    if run.stopping is None:
                        log.info("%s: stopping", name)
                        run.stopping = name
                        security_event("ResetOrReboot", f"{name}: the station stops")
                        nursery.start_soon(stop, StopReason.REBOOT, name, name="orderly stop")
                    else:
                        log.warning(
                            "%s: already stopping (%s); the switch-off goes on",
                            name,
                            run.stopping,
                        )

            async def attach() -> None:
                await supervisor.started.wait()
                station = supervisor.station
                assert station is not None
                port.attach(station)
                central.registry.subscribe(_live_settings(station, nursery))
                if driver is not None:
                    await driver(supervisor, central)
                    if run.stopping is None:
                        await stop(StopReason.LOCAL, "driver finished")

            nursery.start_soon(on_signals, name="signals")
            if central.releases.running and central.releases.report.on_trial is not None:
                nursery.start_soon(
                    partial(
                        _release_trial,
                        supervisor,
                        central,
                        lambda why: nursery.start_soon(
                            restart_into_release, why, name="rollback restart"
                        ),
                    ),
                    name="release trial",
                )
            nursery.start_soon(supervisor.run, name="supervisor")
            nursery.start_soon(attach, name="attach")
            # Whitepaper ed. 3 MemoryExhaustion: the data directory's disk or RAM low.
            nursery.start_soon(
                partial(resources.watch, resources.reader(config.station.data_dir), security_event),
                name="resources",
            )
            nursery.start_soon(
                partial(serve_systemd, supervisor, notifier, run, on_ready=running),
                name="systemd",
            )
            # Until the supervisor ends: a signal, an OCPP Reset, an abort, a failure.
            await supervisor.stopped.wait()
            nursery.cancel_scope.cancel()
    except Exception as exc:
        # The supervisor has switched off already (its finally); say why we died.
        hardware = find_in_group(exc, HardwareUnavailable)
        if hardware is not None:
            raise hardware from None
        store = find_in_group(exc, StoreError)
        if store is not None:
            log.critical("store: %s", store)
            code = systemd.EXIT_FAILURE
        else:
            log.critical("station failed", exc_info=True)
            code = systemd.EXIT_SOFTWARE
    if run.aborted is not None and code == systemd.EXIT_OK:
        code = systemd.EXIT_SOFTWARE
    if restart.release is not None and code == systemd.EXIT_OK:
        log.warning("%s: exit %d, the unit restarts it", restart.release, systemd.EXIT_FAILURE)
        return systemd.EXIT_FAILURE
    if restart.requested and code == systemd.EXIT_OK:
        return EXIT_RESTART
    return code


#: ``run_station``'s answer to an OCPP Reset: the caller re-executes the firmware.
EXIT_RESTART = -1


@dataclass
class RestartRequest:
    #: An OCPP Reset: the same firmware again (EXIT_RESTART, re-executed).
    requested: bool = False
    #: Why the run restarts into another release (an update, a rollback): exit 1,
    #: the code the unit restarts on (ops/systemd.py), through `current`.
    release: str | None = None


async def _release_trial(
    supervisor: Supervisor, central: Central, restart: Callable[[str], object]
) -> None:
    """The release on trial: confirmed once it reaches its goal, else rolled back at
    the trial's deadline (``Releases.check_trial``), with a restart into the previous one.

    The goal (issue 10): BootNotification Accepted; with no central system
    configured, a station loop that answers. The deadline is the trial
    record's wall-clock time, waited for on trio's clock from now.
    """
    releases = central.releases.releases
    assert releases is not None
    while True:
        trial = await trio.to_thread.run_sync(releases.trial)
        if trial is None:
            return  # confirmed (the firmware profile) or ended meanwhile
        left = max(0.0, trial.deadline - time.time())
        with trio.move_on_after(left):
            await _trial_goal(supervisor, central)
            await trio.to_thread.run_sync(firmware_wiring.confirm_release, releases)
            log.info("release %s confirmed: its trial is over", trial.version)
            return
        report = await trio.to_thread.run_sync(releases.check_trial)
        if report.restart and report.rolled_back is not None:
            failed, to, why = report.rolled_back
            log.error("release %s rolled back to %s: %s", failed, to, why)
            restart(f"rollback from firmware release {failed} to {to}")
            return


async def _trial_goal(supervisor: Supervisor, central: Central) -> None:
    await supervisor.started.wait()
    station = supervisor.station
    assert station is not None
    await station.call(_noop)  # the loop answers
    registered = central.port.chargepoint.registered
    while not registered.is_set():
        if central.port.link is CentralSystem.NOT_CONFIGURED:
            return
        with trio.move_on_after(TRIAL_LOOK):
            await registered.wait()


def _live_settings(station: Station, nursery: trio.Nursery) -> Callable[[str, object], None]:
    """Registry changes that the running station applies at once."""

    def changed(name: str, value: object) -> None:
        if name == "ConnectionTimeOut" and isinstance(value, int | float):
            station.connection_timeout_changed(float(value))
        elif name == "FallbackLimit" and isinstance(value, int | float):
            nursery.start_soon(station.set_fallback, float(value), name="fallback change")

    return changed


def sim_config(
    endpoints_port: str,
    data_dir: Path,
    *,
    board: str = "evse-din",
    meter: str = "sdm630",
    web_port: int = 0,
) -> Config:
    """The station's config for the built-in simulator (``evse run --sim``, ``evse demo``):
    the installer's page on localhost, on a free port unless told."""
    data: dict[str, Any] = {
        "station": {"serial": "SIM-0001", "id": "CP-1", "data_dir": str(data_dir)},
        "limits": {"installer_max": 16.0, "fallback": 6.0},
        "board": {"kind": board, "port": endpoints_port, "unit": 1, "timeout": 0.3},
        "meter": {"kind": meter, "port": endpoints_port, "unit": 2, "timeout": 0.3},
        "authorization": {"mode": "local", "tags": ["04A2B3C4", "DEMOTAG1"]},
        "safety": {"persist_interval": 2.0},
        "web": {"port": web_port},
    }
    config = config_from_dict(data, source="<simulator>")
    # No releases on the simulator: the station runs as from a checkout, and an
    # update ends InstallationFailed after its download and manifest check.
    return replace(config, firmware=replace(config.firmware, releases=None))


#: OCPP 1.6 BootNotification.req chargePointModel: CiString20Type.
MODEL_MAX_LENGTH = 20


def charge_point_model(phases: int, board: str) -> str:
    """The BootNotification's chargePointModel: at most 20 characters, whatever the
    board ("AC 3-phase heidelberg", 21, was refused by our own schema check, so a
    Heidelberg station never registered)."""
    return f"AC {phases}ph {board}"[:MODEL_MAX_LENGTH]


def default_sim_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="evse-sim-"))


def with_socket(config: Config, path: Path) -> Config:
    return replace(config, control=replace(config.control, socket=path))
