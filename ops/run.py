"""``evse run``: the station from a config file, or on the built-in simulator.

Maps the validated ``ops.config.Config`` onto the supervisor's ``Plan``,
adds the ops services (control socket, systemd readiness and watchdog),
handles SIGTERM/SIGINT (stop the transaction with reason Reboot, switch off,
exit 0) and turns failures into the documented exit codes.
"""

from __future__ import annotations

import logging
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from evse.auth import AuthStatus, AuthStep, FreeCharging, LocalTagList
from evse.connector import StopReason
from evse.errors import StoreError
from evse.rfid import RfidConfig as ReaderConfig
from evse.safety import SafetySettings
from evse.station import StationSettings
from evse.supervisor import DeviceSpec, Plan, Service, Supervisor
from ops import systemd
from ops.config import Config, config_from_dict
from ops.control import control_service

log = logging.getLogger(__name__)

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


def plan_from_config(config: Config, *, services: Sequence[Service] = ()) -> Plan:
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
            fallback=config.limits.fallback,
            connection_timeout=float(config.authorization.connection_timeout),
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
        auth_steps=auth_steps(config),
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
    on_started: Callable[[Supervisor], None] | None = None,
    notifier: systemd.Notifier | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    notifier = notifier or systemd.Notifier()
    socket_path = str(config.control.socket)
    plan = plan_from_config(
        config, services=[control_service(socket_path), systemd_service(notifier)]
    )
    supervisor = Supervisor(plan)
    code = systemd.EXIT_OK
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run, name="supervisor")
            log.info("station %s running; control socket %s", config.station.id, socket_path)
            if on_started is not None:
                on_started(supervisor)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    await notifier.stopping()
                    await supervisor.shutdown(StopReason.REBOOT)
                    break
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
    return code


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
