"""The running simulator: physical model + Modbus TCP + RTU on a pty + HTTP control.

Endpoints are reported once ready (``Simulator.run`` task status, and a JSON
line on stdout from ``evse sim``) so tests, benchmarks and the demo find the
ports it bound. Every write the firmware makes and every fault injected is
recorded with a sequence number, the simulator's clock (``t``, trio's clock,
seconds) and UTC wall time (``at``).
"""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio
from pymodbus.pdu import ModbusPDU

from fieldbus.boards import BOARD_MODELS
from fieldbus.meters import METER_MODELS
from fieldbus.ports import check_unit
from fieldbus.server import ModbusServer, UnitStore
from ops import httpjson
from ops.httpjson import HTTPError, Request, Router
from ops.sim.devices import BoardSim, MeterSim
from ops.sim.model import FAULTS, Station

#: Events kept for the control interface (oldest dropped first).
MAX_EVENTS = 100_000


class SimulatorError(Exception):
    """The simulator cannot serve as configured: ``str()`` names what, where and why
    (a port in use, a host that does not resolve, a link path that cannot be made)."""


def _oserror(exc: BaseException) -> OSError | None:
    """The OSError in ``exc``, which may be an exception group of one."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _oserror(exc.exceptions[0])
    return None


@contextlib.contextmanager
def _serving(what: str, host: str, port: int) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        error = _oserror(exc)
        if error is None:
            raise
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        hint = f" ({error.strerror or error})"
        raise SimulatorError(f"the simulator's {what} cannot listen on {where}{hint}") from None


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    unit: int

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """``KIND[:UNIT]``, e.g. ``sdm630:2``; the unit defaults to the model's."""
        kind, _, unit_text = text.partition(":")
        if kind in METER_MODELS:
            default = METER_MODELS[kind].default_unit
        elif kind in BOARD_MODELS:
            default = BOARD_MODELS[kind].default_unit
        else:
            known = ", ".join(sorted([*METER_MODELS, *BOARD_MODELS]))
            raise ValueError(f"unknown device kind {kind!r} (known: {known})")
        try:
            unit = int(unit_text) if unit_text else default
        except ValueError:
            raise ValueError(f"unit {unit_text!r} in {text!r} is not a number") from None
        check_unit(unit)
        return cls(kind, unit)


@dataclass
class SimConfig:
    devices: list[DeviceSpec] = field(
        default_factory=lambda: [DeviceSpec("evse-din", 1), DeviceSpec("sdm630", 2)]
    )
    host: str = "127.0.0.1"
    #: Modbus TCP port (0 = any free port, None = no TCP).
    tcp_port: int | None = 0
    #: Serve RTU on a pseudo-terminal.
    rtu: bool = True
    #: Also make a symlink to the pty's slave end here.
    rtu_link: str | None = None
    #: HTTP control port (0 = any free port, None = none).
    control_port: int | None = 0


@dataclass
class Endpoints:
    tcp: str | None = None
    rtu: str | None = None
    control: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.station = Station()
        self.events: list[dict[str, Any]] = []
        self._seq = 0
        self.devices: dict[int, MeterSim | BoardSim] = {}
        boards = 0
        for spec in self.config.devices:
            if spec.unit in self.devices:
                raise ValueError(f"unit {spec.unit} is used twice")
            if spec.kind in BOARD_MODELS:
                boards += 1
                self.devices[spec.unit] = BoardSim(
                    BOARD_MODELS[spec.kind], spec.unit, self.station, self.record
                )
            else:
                self.devices[spec.unit] = MeterSim(METER_MODELS[spec.kind], spec.unit, self.station)
        if boards > 1:
            raise ValueError("the simulator models one charging point: at most one board")
        stores: dict[int, UnitStore] = {u: d.store for u, d in self.devices.items()}
        self.server = ModbusServer(stores, responding=self.responding, on_request=self.on_request)
        self.endpoints = Endpoints(
            devices=[
                {"kind": d.model.kind, "unit": u, "role": d.role} for u, d in self.devices.items()
            ]
        )

    # -- model access --------------------------------------------------------

    def now(self) -> float:
        return trio.current_time()

    def record(self, event: dict[str, Any]) -> None:
        self._seq += 1
        event = {
            "seq": self._seq,
            "t": self.now(),
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            **event,
        }
        self.events.append(event)
        if len(self.events) > MAX_EVENTS:
            del self.events[: len(self.events) - MAX_EVENTS]

    def responding(self, unit: int) -> bool:
        device = self.devices.get(unit)
        if device is None:
            return False
        faults = self.station.faults
        return not (faults.board_silent if device.role == "board" else faults.meter_silent)

    def on_request(self, unit: int, request: ModbusPDU) -> None:
        device = self.devices[unit]
        now = self.now()
        if device.role == "board":
            self.station.board_contacted(now)
        else:
            self.station.advance(now)
        device.refresh()

    def state(self) -> dict[str, Any]:
        self.station.advance(self.now())
        return {
            "t": self.now(),
            "station": self.station.to_json(),
            "endpoints": self.endpoints.to_json(),
            "requests": self.server.requests,
            "events": self.events[-1000:],
        }

    def set_ev(self, changes: dict[str, Any]) -> None:
        ev = self.station.ev
        self.station.advance(self.now())
        allowed = {"plugged": bool, "wants": str, "phases": int, "max_current": float}
        for key, value in changes.items():
            if key not in allowed:
                raise ValueError(f"unknown EV setting {key!r} (known: {', '.join(allowed)})")
            kind = allowed[key]
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (isinstance(value, kind) or (kind is float and number)):
                raise ValueError(f"EV setting {key!r} must be {kind.__name__}, not {value!r}")
        if "max_current" in changes:
            changes = {**changes, "max_current": float(changes["max_current"])}
        if "wants" in changes and changes["wants"] not in ("B", "C", "D"):
            raise ValueError(f"wants must be B, C or D, not {changes['wants']!r}")
        if "phases" in changes and changes["phases"] not in (1, 3):
            raise ValueError(f"phases must be 1 or 3, not {changes['phases']!r}")
        if "max_current" in changes and not 0 <= changes["max_current"] <= 80:
            raise ValueError(f"max_current must be within 0..80 A, not {changes['max_current']}")
        for key, value in changes.items():
            setattr(ev, key, value)
        self.record({"event": "ev", **changes})

    def set_fault(self, name: str, active: bool, params: dict[str, Any] | None = None) -> None:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")
        params = params or {}
        faults = self.station.faults
        self.station.advance(self.now())
        if name == "pilot_error":
            state = params.get("state", "E") if active else None
            if state not in (None, "E", "F"):
                raise ValueError(f"pilot_error state must be E or F, not {state!r}")
            faults.pilot_error = state
        elif name == "overdraw":
            amps = params.get("amps", 5.0) if active else 0.0
            if not isinstance(amps, int | float) or isinstance(amps, bool) or not 0 <= amps <= 80:
                raise ValueError(f"overdraw amps must be a number within 0..80, not {amps!r}")
            faults.overdraw = float(amps)
        else:
            setattr(faults, name, active)
        self.record({"event": "fault", "fault": name, "active": active, **params})

    def clear_faults(self) -> None:
        for name in FAULTS:
            self.set_fault(name, False)

    # -- serving ----------------------------------------------------------------

    def router(self) -> Router:
        router = Router()

        async def get_state(req: Request) -> Any:
            return self.state()

        async def get_events(req: Request) -> Any:
            try:
                since = int(req.query.get("since", "0"))
            except ValueError:
                raise HTTPError(400, "since must be a whole number") from None
            return {"events": [e for e in self.events if e["seq"] > since]}

        async def post_ev(req: Request) -> Any:
            if not isinstance(req.body, dict):
                raise HTTPError(400, "body must be a JSON object of EV settings")
            with _as_http_error():
                self.set_ev(req.body)
            return self.state()["station"]

        async def plug(req: Request) -> Any:
            body = req.body if isinstance(req.body, dict) else {}
            with _as_http_error():
                self.set_ev({"plugged": True, **body})
            return self.state()["station"]

        async def unplug(req: Request) -> Any:
            with _as_http_error():
                self.set_ev({"plugged": False})
            return self.state()["station"]

        async def inject(req: Request) -> Any:
            params = req.body if isinstance(req.body, dict) else {}
            with _as_http_error():
                self.set_fault(req.params["name"], True, params)
            return self.state()["station"]

        async def clear(req: Request) -> Any:
            with _as_http_error():
                self.set_fault(req.params["name"], False)
            return self.state()["station"]

        async def clear_all(req: Request) -> Any:
            self.clear_faults()
            return self.state()["station"]

        router.add("GET", "/state", get_state)
        router.add("GET", "/events", get_events)
        router.add("POST", "/ev", post_ev)
        router.add("POST", "/plug", plug)
        router.add("POST", "/unplug", unplug)
        router.add("POST", "/faults/{name}", inject)
        router.add("DELETE", "/faults/{name}", clear)
        router.add("DELETE", "/faults", clear_all)
        return router

    async def _serve_pty(self, master_fd: int) -> None:
        stream = trio.lowlevel.FdStream(master_fd)
        async with stream:
            await self.server.serve_stream(stream, rtu=True)

    async def run(
        self, *, task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        self.station.updated = self.now()
        self.station.board.last_request = self.now()
        async with trio.open_nursery() as nursery:
            if cfg.tcp_port is not None:
                with _serving("Modbus TCP server", cfg.host, cfg.tcp_port):
                    port = await nursery.start(self.server.serve_tcp, cfg.host, cfg.tcp_port)
                self.endpoints.tcp = f"tcp://{cfg.host}:{port}"
            if cfg.control_port is not None:
                with _serving("HTTP control interface", cfg.host, cfg.control_port):
                    port = await nursery.start(
                        httpjson.serve, self.router(), cfg.host, cfg.control_port
                    )
                self.endpoints.control = f"http://{cfg.host}:{port}"
            with contextlib.ExitStack() as stack:
                if cfg.rtu:
                    master_fd, path = stack.enter_context(_pty(cfg.rtu_link))
                    self.endpoints.rtu = f"rtu://{path}?baud=9600&parity=N&stopbits=1"
                    nursery.start_soon(self._serve_pty, master_fd)
                task_status.started(self.endpoints)
                await trio.sleep_forever()


@contextlib.contextmanager
def _as_http_error() -> Iterator[None]:
    try:
        yield
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None


@contextlib.contextmanager
def _pty(link: str | None) -> Iterator[tuple[int, str]]:
    """A pseudo-terminal pair in raw mode: (master fd for the simulator, slave path).

    The simulator keeps its own handle on the slave end open, so the master
    never reads EIO while the firmware closes and re-opens the port.
    """
    master_fd, slave_fd = os.openpty()
    tty.setraw(master_fd)
    tty.setraw(slave_fd)
    path = os.ttyname(slave_fd)
    try:
        if link:
            _make_link(path, link)
    except BaseException:
        for fd in (master_fd, slave_fd):
            os.close(fd)
        raise
    try:
        # The master fd is handed to a trio FdStream, which closes it.
        yield os.dup(master_fd), (link or path)
    finally:
        for fd in (master_fd, slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if link:
            with contextlib.suppress(OSError):
                if os.path.islink(link):
                    os.unlink(link)


def _make_link(target: str, link: str) -> None:
    """Point ``link`` at the pty; a stale symlink is replaced, anything else is refused
    (``--rtu-link`` naming an existing file must never delete it)."""
    if os.path.lexists(link):
        if not os.path.islink(link):
            raise SimulatorError(f"--rtu-link {link}: exists and is not a symlink; not replaced")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
    try:
        os.symlink(target, link)
    except OSError as exc:
        raise SimulatorError(
            f"--rtu-link {link}: cannot make the link ({exc.strerror or exc})"
        ) from None


__all__ = ["DeviceSpec", "Endpoints", "SimConfig", "Simulator", "SimulatorError"]
