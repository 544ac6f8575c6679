"""``evse run``: the station from a config file, or on the built-in simulator.

Maps the validated ``ops.config.Config`` onto the supervisor's ``Plan``,
adds the ops services (control socket, systemd readiness and watchdog),
handles SIGTERM/SIGINT (stop the transaction with reason Reboot, switch off,
exit 0) and turns failures into the documented exit codes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import signal
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from evse.auth import AuthStatus, AuthStep, FreeCharging, LocalTagList
from evse.connector import StopReason
from evse.errors import StoreError
from evse.ocpp_port import OcppPort, OnlineAuthorize
from evse.rfid import RfidConfig as ReaderConfig
from evse.safety import SafetySettings
from evse.station import Station, StationSettings
from evse.store import Store
from evse.supervisor import DeviceSpec, Plan, Service, Supervisor
from ocpp16.chargepoint import Identity
from ocpp16.config import Configuration
from ocpp16.errors import ConfigRejected
from ocpp16.queue import TransactionQueue
from ops import systemd
from ops.config import Config, config_from_dict
from ops.control import control_service

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("evse-firmware")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
    VERSION = "0+unknown"

#: The systemd watchdog's liveness probe: the station loop must answer a
#: request within this time, or the pings stop and systemd restarts us.
PROBE_TIMEOUT = 5.0


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

    def close(self) -> None:
        self.queue.close()
        self.settings_store.close()


def open_central(config: Config) -> Central:
    """Open the configuration registry and the transaction queue; build the port.

    The TOML file's ConnectionTimeOut and fallback limit seed the registry
    only while it has no value of its own: after that, the value an operator
    (ChangeConfiguration) or installer (``evse config set``) wrote persists.
    """
    path = store_path(config)
    settings_store = Store.open(path)
    registry = Configuration(settings_store)
    seeds = {
        "ConnectionTimeOut": str(config.authorization.connection_timeout),
        "FallbackLimit": f"{config.limits.fallback:g}",
    }
    for key, value in seeds.items():
        if settings_store.get_setting(f"ocpp.{key}") is None:
            registry.change(key, value, source="config file").raise_for_status()
    queue = TransactionQueue.open(path)
    identity = Identity(
        vendor="evse-firmware",
        model=f"AC {config.station.phases}-phase {config.board.kind}",
        serial=config.station.serial,
        firmware_version=VERSION,
        meter_type=config.meter.kind,
    )
    port = OcppPort(
        config=registry, queue=queue, identity=identity, connector=config.station.connector
    )
    return Central(registry, queue, port, settings_store)


def plan_from_config(
    config: Config,
    *,
    services: Sequence[Service] = (),
    registry: Configuration | None = None,
    online: AuthStep | None = None,
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
            config.board.kind, config.board.port.url, config.board.unit, config.board.timeout, 1
        ),
        meter=DeviceSpec(
            config.meter.kind, config.meter.port.url, config.meter.unit, config.meter.timeout, 0
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
            safety=SafetySettings(
                board_timeout=s.board_timeout,
                meter_timeout=s.meter_timeout,
                overcurrent_margin=s.overcurrent_margin,
                overcurrent_time=s.overcurrent_time,
                welded_time=s.welded_time,
            ),
        ),
        auth_steps=[*auth_steps(config), *([online] if online is not None else [])],
        rfid=rfid,
        off_deadline=s.off_deadline,
        services=services,
    )


def systemd_service(notifier: systemd.Notifier) -> Service:
    """READY=1 once serving; WATCHDOG=1 only while the station loop answers."""

    async def run(supervisor: Supervisor) -> None:
        await supervisor.started.wait()
        await notifier.ready("charging station running")
        answered = trio.current_time()

        def healthy() -> bool:
            return trio.current_time() - answered < 2 * PROBE_TIMEOUT

        async def probe() -> None:
            nonlocal answered
            while True:
                station = supervisor.station
                if station is not None:
                    with trio.move_on_after(PROBE_TIMEOUT):
                        await station.call(_noop)
                        answered = trio.current_time()
                await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe, name="liveness probe")
            nursery.start_soon(systemd.watchdog_loop, notifier, healthy, name="systemd watchdog")

    return Service("systemd", run)


async def _noop() -> None:
    return


@dataclass
class RunResult:
    code: int
    supervisor: Supervisor | None = None


async def run_station(
    config: Config,
    *,
    driver: Callable[[Supervisor, Central], Awaitable[None]] | None = None,
    notifier: systemd.Notifier | None = None,
    settings: Mapping[str, str] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code.

    ``settings`` are installer settings given on the command line (central
    system address, charge point id): validated and stored like ``evse config
    set`` would, before anything starts; a refused one raises ConfigRejected.
    ``driver`` (the demo) runs once the station is up; when it returns, the
    station shuts down as on SIGTERM.
    """
    notifier = notifier or systemd.Notifier()
    socket_path = str(config.control.socket)
    central = await trio.to_thread.run_sync(open_central, config)
    if settings:
        result = central.registry.change_many(dict(settings), source="command line")
        if not result.ok:
            await trio.to_thread.run_sync(central.close)
            raise ConfigRejected(", ".join(settings), result.reason)
    port = central.port
    online = None if config.authorization.mode == "free" else OnlineAuthorize(port)
    plan = plan_from_config(
        config,
        services=[
            control_service(socket_path, central.registry, central.queue),
            systemd_service(notifier),
        ],
        registry=central.registry,
        online=online,
    )
    supervisor = Supervisor(plan, central=port)
    restart = RestartRequest()

    async def on_reset(hard: bool) -> None:
        # OCPP 1.6 5.15: stop transactions with SoftReset/HardReset, then restart.
        restart.requested = True
        await supervisor.shutdown(StopReason.HARD_RESET if hard else StopReason.SOFT_RESET)

    port.on_reset = on_reset
    code = systemd.EXIT_OK
    try:
        async with trio.open_nursery() as nursery:
            station = await nursery.start(supervisor.run, name="supervisor")
            port.attach(station)
            central.registry.subscribe(_live_settings(station, nursery))
            log.info("station %s running; control socket %s", config.station.id, socket_path)
            if driver is not None:

                async def drive() -> None:
                    assert driver is not None
                    await driver(supervisor, central)
                    await supervisor.shutdown(StopReason.LOCAL)

                nursery.start_soon(drive, name="driver")

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        await notifier.stopping()
                        await supervisor.shutdown(StopReason.REBOOT)
                        return

            nursery.start_soon(on_signals, name="signals")
            # Until the supervisor ends: a signal, an OCPP Reset, or a failure.
            await supervisor.stopped.wait()
            nursery.cancel_scope.cancel()
    except Exception as exc:
        # The supervisor has switched off already (its finally); say why we died.
        store = _find(exc, StoreError)
        if store is not None:
            log.critical("store: %s", store)
            code = systemd.EXIT_FAILURE
        else:
            log.critical("station failed", exc_info=True)
            code = systemd.EXIT_SOFTWARE
    finally:
        notifier.close()
        await trio.to_thread.run_sync(central.close)
    if restart.requested and code == systemd.EXIT_OK:
        return EXIT_RESTART
    return code


#: ``run_station``'s answer to an OCPP Reset: the caller re-executes the firmware.
EXIT_RESTART = -1


@dataclass
class RestartRequest:
    requested: bool = False


def _live_settings(station: Station, nursery: trio.Nursery) -> Callable[[str, object], None]:
    """Registry changes that the running station applies at once."""

    def changed(name: str, value: object) -> None:
        if name == "ConnectionTimeOut" and isinstance(value, int | float):
            station.connector.connection_timeout = float(value)
        elif name == "FallbackLimit" and isinstance(value, int | float):
            nursery.start_soon(station.set_fallback, float(value), name="fallback change")

    return changed


_E = TypeVar("_E", bound=BaseException)


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` inside ``exc`` (which may be an exception group)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def sim_config(
    endpoints_port: str, data_dir: Path, *, board: str = "evse-din", meter: str = "sdm630"
) -> Config:
    """The station's config for the built-in simulator (``evse run --sim``, ``evse demo``)."""
    data: dict[str, Any] = {
        "station": {"serial": "SIM-0001", "id": "CP-1", "data_dir": str(data_dir)},
        "limits": {"installer_max": 16.0, "fallback": 6.0},
        "board": {"kind": board, "port": endpoints_port, "unit": 1, "timeout": 0.3},
        "meter": {"kind": meter, "port": endpoints_port, "unit": 2, "timeout": 0.3},
        "authorization": {"mode": "local", "tags": ["04A2B3C4", "DEMOTAG1"]},
        "safety": {"persist_interval": 2.0},
    }
    return config_from_dict(data, source="<simulator>")


def default_sim_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="evse-sim-"))


def with_socket(config: Config, path: Path) -> Config:
    return replace(config, control=replace(config.control, socket=path))
