"""The whole station on a virtual clock: supervisor, station, drivers, simulator, SQLite.

``vclock_rig`` is ``tests/station_harness.py``'s ``station_rig`` without
sockets or wall time. One trio run holds everything:

* the simulator (``ops.sim.app.Simulator``: the physics of ``ops/sim/model.py``
  and every model's register map), its ``ModbusServer`` used directly (no TCP
  listener, pty or HTTP: ``Simulator.run`` is never called);
* the byte link between them, ``fieldbus.memory.MemoryLink``, with the wire
  timing of the transport (RTU: 9600 baud 8N1, 2 ms device turnaround; TCP:
  0.2 ms each way), one link per port as the supervisor asks for it;
* ``evse.supervisor.Supervisor`` with the real ``Station``, ``Board`` and
  ``Meter`` drivers and a real SQLite file under ``tmp_path``; its blocking
  SQLite work runs inline (``inline``) so that the clock never jumps while
  the disk works.

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` (the test takes
pytest-trio's ``autojump_clock`` fixture): a sleep of any length costs only
the scheduling of what happens meanwhile, so the defaults of
``StationSettings`` (board polled every 0.1 s, meter every 1 s, 5 s
over-current allowance, 120 s ConnectionTimeOut) are used as they are, and
every time the simulator records (``sim.events``, ``t`` = trio time) is an
exact virtual time.

What a test has on ``VRig``:

* drive the physics: ``plug``, ``unplug``, ``ev(...)``, ``fault(name, params)``,
  ``clear(name)``, ``crash()`` (an exception in a supervisor task, with
  ``crashable=True``); ``mark(what)`` puts a marker in the simulator's log;
* break the bus: ``link.drop()``, ``link.refuse``, ``link.unreachable``,
  ``link.reply_delay`` (``fieldbus.memory``);
* wait without wall time: ``until(predicate)``, ``status(name)`` (returns the
  exact time of the change), ``next_read(field)`` (returns just after a board
  read covering that register, the pilot by default, was served: the worst
  moment to inject a fault), ``next_request(match)``, ``next_off(after_seq)``;
  every wait has a virtual-time limit and fails with the station's state;
* look: ``writes()``, ``commands()``, ``off_writes(after_seq)``, ``statuses``
  (connector status changes with their times), ``central.reports`` (what the
  central system was told, with times), ``meter_readings`` / ``board_readings``
  (every successful reading, with ``read_at``), ``requests`` (every request
  the simulator served), ``db_rows(sql)``;
* inject and measure (module functions, used by the matrix): ``enter(rig,
  state)``, ``inject(rig, kind, stop_off)``, ``measure(rig, injection)``, with
  ``KINDS`` (fault kind -> the states where it can happen);
* bounds: ``off_bound()`` (the issue's target for this board and transport),
  ``off_ideal()`` (what the wire and the board's gaps allow, the station adding
  nothing), ``sent_at(write)`` / ``ack_time(write)`` (when the master sent a
  current command / had its reply).

For a Hypothesis state machine or a latency benchmark, open one rig per
example (``vclock_rig`` is cheap: a fresh SQLite file and about 15 ms of wall
time to the first readings) or keep one open and inject repeatedly, clearing
faults in between; a virtual second of charging costs about 10-15 ms of wall
time. Runs are deterministic: the rig seeds the generator with which trio
orders simultaneous wake-ups (``seed``; pass None under Hypothesis, which
seeds it itself per example). The rig starts at virtual time ``START`` (1 s),
not 0 (see ``vclock_rig``).
"""

from __future__ import annotations

import importlib
import math
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing
from pymodbus.pdu import ModbusPDU

from evse.auth import AuthStatus, FreeCharging, LocalTagList
from evse.central import CentralSystemPort, Standalone
from evse.connector import ErrorCode, Event, Status, StopReason
from evse.limits import CentralSystem
from evse.safety import CURRENT_NOISE
from evse.station import Station, StationSettings
from evse.store import TransactionRecord
from evse.supervisor import DeviceSpec, Plan, Service, Supervisor
from fieldbus.boards import BOARD_MODELS, BoardModel, BoardStatus, PilotState
from fieldbus.memory import MemoryLink, WireTiming, pdu_sizes
from fieldbus.meters import LineTurn, MeterReading
from fieldbus.ports import PortSpec, RtuPort, parse_port
from fieldbus.registers import Field, Table
from ops.sim.app import DeviceSpec as SimDevice
from ops.sim.app import SimConfig, Simulator

T = TypeVar("T")

TAG = "04A2B3C4"
FREE_TAG = "FREECHARGING"
BOARDS = ("evse-din", "heidelberg", "ev-cc", "ev-cc-basic")
TRANSPORTS = ("tcp", "rtu")
#: The ports the station is configured with; nothing is opened at these names.
PORTS = {
    "tcp": "tcp://sim.invalid:502",
    "rtu": "rtu:///dev/ttySIM0?baud=9600&parity=N&stopbits=1",
}
BOARD_UNIT = 1
METER_UNIT = 2
#: Slack the issue's latency target allows on top of poll + one request.
TARGET_SLACK = 0.010
#: The longest a rig wait may take by default, in virtual seconds.
WAIT = 30.0
#: Virtual time at which a rig starts (see vclock_rig).
START = 1.0

_READ_FUNCTIONS = {Table.COIL: 1, Table.DISCRETE_INPUT: 2, Table.HOLDING: 3, Table.INPUT: 4}


async def inline(fn: Callable[..., T], *args: Any) -> T:
    """The station's ``offload``: blocking work in the trio thread, no clock jump meanwhile."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


@dataclass(frozen=True, slots=True)
class Report:
    t: float
    kind: str
    detail: tuple[Any, ...]


class RecordingCentral(Standalone):
    """A central-system port that records what it is told, with trio time."""

    def __init__(self) -> None:
        self.reports: list[Report] = []

    @property
    def link(self) -> CentralSystem:
        return CentralSystem.NOT_CONFIGURED

    def smart_charging_limit(self) -> float | None:
        return None

    async def status_changed(
        self, connector_id: int, status: Status, error_code: ErrorCode, info: str
    ) -> None:
        self.reports.append(Report(trio.current_time(), "status", (status, error_code, info)))
        await trio.lowlevel.checkpoint()

    async def transaction_started(self, record: TransactionRecord) -> None:
        self.reports.append(Report(trio.current_time(), "started", (record.id,)))
        await trio.lowlevel.checkpoint()

    async def transaction_ended(self, record: TransactionRecord) -> None:
        self.reports.append(Report(trio.current_time(), "ended", (record.id, record.stop_reason)))
        await trio.lowlevel.checkpoint()

    async def run(self) -> None:
        await trio.sleep_forever()

    def describe(self) -> dict[str, object]:
        return {"state": "recording"}

    def statuses(self, since: float = -math.inf) -> list[tuple[float, Status, ErrorCode]]:
        return [
            (r.t, r.detail[0], r.detail[1])
            for r in self.reports
            if r.kind == "status" and r.t >= since
        ]


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """A request as it reached the simulator (before it was executed)."""

    t: float
    unit: int
    function: int
    address: int
    count: int

    def reads(self, f: Field) -> bool:
        return (
            self.function == _READ_FUNCTIONS[f.table]
            and self.address <= f.address < self.address + self.count
        )


# -- bounds -----------------------------------------------------------------------------


def board_exchanges(model: BoardModel) -> list[tuple[int, int]]:
    """(request, reply) PDU sizes of the requests every status poll makes (the
    safety requests, ``BoardModel.poll_plan``), then the off-write."""
    sizes = [pdu_sizes(_READ_FUNCTIONS[b.table], b.count) for b in model.poll_plan().every_poll]
    command = model.current_command
    write = 16 if model.write_multiple or command.width > 1 else 6
    sizes.append(pdu_sizes(write, command.width))
    return sizes


def readback_exchanges(model: BoardModel) -> list[tuple[int, int]]:
    """(request, reply) PDU sizes of the read-back requests (every Nth poll)."""
    return [pdu_sizes(_READ_FUNCTIONS[b.table], b.count) for b in model.poll_plan().readbacks]


def request_gap(model: BoardModel, port: PortSpec) -> float:
    """The silence the master keeps before a request to the board."""
    frame_gap = port.frame_gap if isinstance(port, RtuPort) else 0.0
    return max(model.request_gap, frame_gap)


def one_request(model: BoardModel, timing: WireTiming, port: PortSpec) -> float:
    """One request to the board, gap included: its gap + its slowest exchange on the
    wire (any of its requests: poll, read-back or off-write)."""
    exchanges = board_exchanges(model) + readback_exchanges(model)
    slowest = max(timing.exchange_time(*s) for s in exchanges)
    return request_gap(model, port) + slowest


def off_bound(
    model: BoardModel, timing: WireTiming, port: PortSpec, settings: StationSettings
) -> float:
    """The issue's target: poll interval + one request (gap included) + 10 ms."""
    return settings.board_poll + one_request(model, timing, port) + TARGET_SLACK


def off_ideal(
    model: BoardModel, timing: WireTiming, port: PortSpec, settings: StationSettings
) -> float:
    """What a station that adds nothing of its own achieves for a fault that
    appears just after the board's pilot register was read, on a bus with no
    other traffic: the next poll (at the poll interval, or later when the poll
    and its gaps take longer), the rest of that poll, then the off-write's gap
    and request frame. Not a strict floor: a poll that ran late (the meter had
    the bus) is followed by an early one."""
    gap = request_gap(model, port)
    exchanges = board_exchanges(model)
    reads, write = exchanges[:-1], exchanges[-1]
    blocks = model.poll_plan().every_poll
    pilot = next(i for i, b in enumerate(blocks) if "pilot" in b.names)
    times = [timing.exchange_time(*s) for s in reads]
    poll = sum(times) + gap * (len(times) - 1)
    # A poll starts at the interval, but never before the gap after the last one.
    period = max(settings.board_poll, poll + gap)
    request_frame = timing.frame_time(reads[pilot][0] + timing.overhead)
    rest = times[pilot] - request_frame + sum(gap + t for t in times[pilot + 1 :])
    return period + rest + gap + timing.frame_time(write[0] + timing.overhead)


# -- the rig ----------------------------------------------------------------------------


@dataclass
class VRig:
    sim: Simulator
    supervisor: Supervisor
    station: Station
    db: Path
    #: The station's nursery: cancelling it cancels the supervisor (and the test body).
    nursery: trio.Nursery
    central: RecordingCentral
    board_kind: str
    transport: str
    port: PortSpec
    timing: WireTiming
    settings: StationSettings
    links: dict[str, MemoryLink]
    crash_event: trio.Event
    #: Virtual time at which the rig started the station.
    started: float
    requests: list[SeenRequest] = field(default_factory=list)
    statuses: list[tuple[float, Status, ErrorCode]] = field(default_factory=list)
    meter_readings: list[MeterReading] = field(default_factory=list)
    board_readings: list[BoardStatus] = field(default_factory=list)
    _changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    @property
    def model(self) -> BoardModel:
        return BOARD_MODELS[self.board_kind]

    @property
    def link(self) -> MemoryLink:
        """The one link of this rig's bus (board and meter share it)."""
        (link,) = self.links.values()
        return link

    # -- the simulator's log ------------------------------------------------------------

    def writes(self) -> list[dict[str, Any]]:
        """Every current command the board received, in order."""
        return [
            e
            for e in self.sim.events
            if e["event"] == "write"
            and e.get("unit") == BOARD_UNIT
            and "command" in e.get("fields", {})
        ]

    def commands(self) -> list[float]:
        return [w["fields"]["command"] for w in self.writes()]

    def board_writes(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every write the board received (any register) after ``after_seq``."""
        return [
            e
            for e in self.sim.events
            if e["event"] == "write" and e.get("unit") == BOARD_UNIT and e["seq"] > after_seq
        ]

    def off_writes(self, after_seq: int = 0) -> list[dict[str, Any]]:
        return [w for w in self.writes() if w["seq"] > after_seq and w["fields"]["command"] == 0]

    def stop_writes(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """The writes that stop the board after ``after_seq``: current 0, and on a
        board that stops by its disable (``stop_by_disable``) the disable too
        (the station writes it even when the current 0 did not go through)."""
        by_disable = self.station.board.capabilities.stop_by_disable
        return [
            w
            for w in self.board_writes(after_seq)
            if w["fields"].get("command") == 0 or (by_disable and w["fields"].get("enable") == 0)
        ]

    def mark(self, what: str) -> dict[str, Any]:
        """A marker in the simulator's log (seq, t) to measure from."""
        self.sim.record({"event": "marker", "what": what})
        return self.sim.events[-1]

    def sent_at(self, write: dict[str, Any]) -> float:
        """When the master sent the current command ``write`` (its last byte arrived at ``t``)."""
        request = board_exchanges(self.model)[-1][0]
        return float(write["t"]) - self.timing.frame_time(request + self.timing.overhead)

    def ack_time(self, write: dict[str, Any]) -> float:
        """When the master has the reply to ``write`` (the board acknowledged it)."""
        reply = self.timing.frame_time(5 + self.timing.overhead)
        return float(write["t"]) + self.timing.turnaround + self.link.reply_delay + reply

    def off_acknowledged(self, off: dict[str, Any]) -> float | None:
        """When the master has the reply to the last write of the off sequence that
        begins with ``off`` (None: not yet written).

        On a board that stops by its disable (``stop_by_disable``) current 0 is
        not a confirmed stop: the station counts the off from the disable's
        reply, so the welded allowance starts there too.
        """
        if not self.station.board.capabilities.stop_by_disable:
            return self.ack_time(off)
        disable = next(
            (w for w in self.board_writes(int(off["seq"])) if w["fields"].get("enable") == 0),
            None,
        )
        return None if disable is None else self.ack_time(disable)

    def db_rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the store's file through a connection of our own, as another process would."""
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    # -- driving the physics ------------------------------------------------------------

    def ev(self, **changes: Any) -> dict[str, Any]:
        self.sim.set_ev(changes)
        return self.sim.events[-1]

    def plug(self, wants: str = "C") -> dict[str, Any]:
        return self.ev(plugged=True, wants=wants)

    def unplug(self) -> dict[str, Any]:
        return self.ev(plugged=False)

    def fault(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Inject a simulator fault now; returns its log entry (seq, t)."""
        self.sim.set_fault(name, True, params)
        return self.sim.events[-1]

    def clear(self, name: str) -> dict[str, Any]:
        self.sim.set_fault(name, False)
        return self.sim.events[-1]

    def crash(self) -> dict[str, Any]:
        """Make the supervisor's ``crasher`` service raise (rig made with ``crashable``)."""
        marker = self.mark("crash")
        self.crash_event.set()
        return marker

    # -- bounds ---------------------------------------------------------------------------

    def one_request(self) -> float:
        return one_request(self.model, self.timing, self.port)

    def off_bound(self) -> float:
        return off_bound(self.model, self.timing, self.port, self.settings)

    def off_ideal(self) -> float:
        return off_ideal(self.model, self.timing, self.port, self.settings)

    # -- waiting on the virtual clock -----------------------------------------------------

    def _poke(self) -> None:
        self._adopt()
        self._changed.unpark_all()

    def _adopt(self) -> None:
        """Record the station's latest readings if the wrappers missed them (a read
        already on its way when the rig put them in place)."""
        meter, board = self.station.meter_reading, self.station.board_status
        if meter is not None and (
            not self.meter_readings or meter.read_at > self.meter_readings[-1].read_at
        ):
            self.meter_readings.append(meter)
        if board is not None and (
            not self.board_readings or board.read_at > self.board_readings[-1].read_at
        ):
            self.board_readings.append(board)

    async def until(
        self,
        predicate: Callable[[], object],
        within: float = WAIT,
        what: str = "condition",
        step: float = 0.1,
    ) -> float:
        """Wait until ``predicate()`` holds; returns the virtual time it was seen.

        Woken by every request the simulator serves and every change of the
        connector, and at least every ``step`` virtual seconds (for state such as
        the store's file); the time returned is therefore not exact: take exact
        times from the simulator's log, ``statuses`` or the readings.
        """
        deadline = trio.current_time() + within
        while True:
            self._adopt()
            if predicate():
                break
            now = trio.current_time()
            if now >= deadline:
                raise AssertionError(f"no {what} within {within:g} virtual s; {self.describe()}")
            with trio.move_on_at(min(deadline, now + step)):
                await self._changed.park()
        return trio.current_time()

    async def status(self, status: str, within: float = WAIT) -> float:
        """Wait for the connector status; returns the exact time it changed to it."""
        await self.until(
            lambda: self.station.connector.status.value == status, within, f"status {status}"
        )
        return next(t for t, s, _ in reversed(self.statuses) if s.value == status)

    async def next_request(
        self, match: Callable[[SeenRequest], bool], within: float = WAIT, what: str = "request"
    ) -> SeenRequest:
        """The next request the simulator serves that ``match``es.

        Returns just after the simulator executed it (its reply is on the wire),
        at the virtual time it arrived.
        """
        seen = len(self.requests)

        def found() -> SeenRequest | None:
            return next((r for r in self.requests[seen:] if match(r)), None)

        await self.until(lambda: found() is not None, within, what)
        request = found()
        assert request is not None
        return request

    async def next_read(self, f: Field | None = None, within: float = WAIT) -> SeenRequest:
        """Just after the next board read covering ``f`` (default: the pilot) was served."""
        target = f or self.model.pilot
        return await self.next_request(
            lambda r: r.unit == BOARD_UNIT and r.reads(target), within, "board read"
        )

    async def next_off(self, after_seq: int, within: float = WAIT) -> dict[str, Any]:
        """The first off-write (command 0) the board receives after log entry ``after_seq``."""
        await self.until(lambda: self.off_writes(after_seq), within, "off-write")
        return self.off_writes(after_seq)[0]

    async def charge(self, tag: str = TAG) -> float:
        """Plug in, present the tag, wait for Charging; returns when Charging began."""
        self.plug()
        await self.status("Preparing")
        result = await self.station.present_id_tag(tag)
        assert result.accepted, result
        return await self.status("Charging")

    def describe(self) -> str:
        view = self.station.view()
        return (
            f"station {view['status']} {view['error_code']} {view['faults']}, "
            f"commands {self.commands()}, t={trio.current_time():.4f}"
        )

    # -- instrumentation ------------------------------------------------------------------

    def _instrument(self) -> None:
        rig = self
        server = self.sim.server
        served = server.on_request

        def on_request(unit: int, request: ModbusPDU) -> None:
            if served is not None:
                served(unit, request)
            count = getattr(request, "count", 0) or len(getattr(request, "registers", ()) or ())
            rig.requests.append(
                SeenRequest(
                    trio.current_time(),
                    unit,
                    request.function_code,
                    getattr(request, "address", 0),
                    count,
                )
            )
            rig._poke()

        server.on_request = on_request

        connector = self.station.connector
        handle = connector.handle

        def note() -> None:
            status = (connector.status, connector.error_code)
            if not rig.statuses or rig.statuses[-1][1:] != status:
                rig.statuses.append((trio.current_time(), *status))
            rig._poke()

        def handled(event: Event, now: float) -> Any:
            effects = handle(event, now)
            note()
            return effects

        connector.handle = handled  # type: ignore[method-assign]
        note()

        meter = self.station.meter
        read_meter = meter.read

        async def meter_read(*, share: LineTurn | None = None) -> MeterReading:
            reading = await read_meter(share=share)
            rig._adopt()
            rig.meter_readings.append(reading)
            return reading

        meter.read = meter_read  # type: ignore[method-assign]

        board = self.station.board
        read_board = board.read_status

        async def board_read(*, readbacks: bool = True) -> BoardStatus:
            status = await read_board(readbacks=readbacks)
            rig._adopt()
            rig.board_readings.append(status)
            return status

        board.read_status = board_read  # type: ignore[method-assign]


def realistic_plan(
    board: str,
    meter: str,
    port: str,
    db: Path,
    settings: StationSettings,
    *,
    free: bool,
    services: Sequence[Service],
) -> Plan:
    """What ``ops.run.plan_from_config`` makes of the defaults: 0.5 s replies, the
    board with one retry, the meter with none (a silent meter must not hold a
    shared bus past the board's staleness budget)."""
    steps = (
        [FreeCharging(FREE_TAG)]
        if free
        else [LocalTagList({TAG: AuthStatus.ACCEPTED, "BLOCKED1": AuthStatus.BLOCKED})]
    )
    return Plan(
        board=DeviceSpec(board, port, BOARD_UNIT, timeout=0.5, retries=1),
        meter=DeviceSpec(meter, port, METER_UNIT, timeout=0.5, retries=0),
        store_path=db,
        station=replace(settings, free_id_tag=FREE_TAG if free else None),
        auth_steps=steps,
        services=services,
    )


def seed_scheduler(seed: int) -> None:
    """Seed the generator trio's scheduler orders simultaneous wake-ups with."""
    rng = getattr(importlib.import_module("trio._core._run"), "_r", None)
    if isinstance(rng, random.Random):
        rng.seed(seed)


@asynccontextmanager
async def vclock_rig(
    tmp_path: Path,
    *,
    board: str = "evse-din",
    meter: str = "sdm630",
    transport: str = "tcp",
    settings: StationSettings | None = None,
    free: bool = False,
    plugged: bool = False,
    crashable: bool = False,
    services: Sequence[Service] = (),
    central: CentralSystemPort | None = None,
    db: Path | None = None,
    timing: WireTiming | None = None,
    plan: Callable[[Plan], Plan] | None = None,
    seed: int | None = 0,
    offload: Callable[..., Awaitable[Any]] | None = None,
) -> AsyncIterator[VRig]:
    """The station and the simulator in this trio run; see the module docstring.

    ``plugged``: the EV is plugged in (wanting C) before the station starts.
    ``plan`` may adjust the supervisor's plan (timeouts, off deadline).
    ``offload`` replaces ``inline`` (e.g. a slow disk: sleep, then run).
    ``seed``: trio picks the order of tasks that become ready at the same
    instant at random; seeded, a run is the same every time (None leaves the
    generator alone, e.g. under Hypothesis, which seeds it per example).
    Yields once the station has its first board and meter readings.
    """
    if seed is not None:
        seed_scheduler(seed)
    settings = settings or StationSettings()
    if trio.current_time() < START:
        # MockClock starts at 0; the master takes a unit's last request as 0.0
        # before the first one (its real clock is never that small), so the
        # first request to a unit with a gap would wait forever at t < gap.
        await trio.sleep_until(START)
    sim = Simulator(
        SimConfig(
            devices=[SimDevice(board, BOARD_UNIT), SimDevice(meter, METER_UNIT)],
            tcp_port=None,
            rtu=False,
            control_port=None,
        )
    )
    # What Simulator.run does before serving.
    sim.station.updated = trio.current_time()
    sim.station.board.last_request = trio.current_time()
    if plugged:
        sim.set_ev({"plugged": True, "wants": "C"})
    port_spec = parse_port(PORTS[transport])
    wire = timing or WireTiming.for_port(port_spec)
    crash_event = trio.Event()

    async def crasher(supervisor: Supervisor) -> None:
        await crash_event.wait()
        raise RuntimeError("injected failure")

    all_services = [*services, *([Service("crasher", crasher)] if crashable else [])]
    db = db or tmp_path / "station.sqlite"
    the_plan = realistic_plan(
        board, meter, port_spec.url, db, settings, free=free, services=all_services
    )
    if plan is not None:
        the_plan = plan(the_plan)
    recorder = RecordingCentral()
    links: dict[str, MemoryLink] = {}
    started = trio.current_time()
    async with trio.open_nursery() as device_side:

        def make_link(port: PortSpec) -> MemoryLink:
            link = MemoryLink(port, sim.server, device_side, timing=wire)
            links[port.url] = link
            return link

        supervisor = Supervisor(
            the_plan, central=central or recorder, links=make_link, offload=offload or inline
        )
        async with trio.open_nursery() as station_nursery:
            station: Station = await station_nursery.start(supervisor.run)
            rig = VRig(
                sim=sim,
                supervisor=supervisor,
                station=station,
                db=db,
                nursery=station_nursery,
                central=recorder,
                board_kind=board,
                transport=transport,
                port=port_spec,
                timing=wire,
                settings=the_plan.station,
                links=links,
                crash_event=crash_event,
                started=started,
            )
            rig._instrument()
            await rig.until(
                lambda: station.meter_reading is not None and station.board_status is not None,
                what="first board and meter readings",
            )
            rig._adopt()
            yield rig
            # Cancel the station only: the simulator must still answer its last off-write.
            station_nursery.cancel_scope.cancel()
        device_side.cancel_scope.cancel()


# -- fault injection and measurement (the matrix in test_station_vclock.py, benchmarks) --
#
# ``enter(rig, state)`` brings the station into a state and stops at the worst
# moment to inject; ``inject(rig, kind, stop_off)`` injects one fault kind and
# returns an ``Injection``; ``measure(rig, injection)`` gives (the fault's
# instant, the off-write that answers it) once both are known. A benchmark
# repeats: ``enter`` (or ``next_read`` with a random extra delay), ``inject``,
# ``until(lambda: measure(...) is not None)``, clear the fault, wait for the
# state to come back.

ALL_STATES = ("starting", "charging", "suspended", "stopping")
#: Fault kind -> the states where it can happen.
KINDS: dict[str, tuple[str, ...]] = {
    "rcd_trip": ALL_STATES,
    "pilot_E": ALL_STATES,
    "pilot_F": ALL_STATES,
    # Current above the offer needs an offer and a closed contactor.
    "overdraw": ("charging",),
    # Judged only after an acknowledged off: before a start, and after a stop.
    "welded": ("starting", "stopping"),
    "meter_silent": ALL_STATES,
    "board_silent": ALL_STATES,
    # request_stop needs a running transaction.
    "stop": ("charging", "suspended"),
    "exception": ALL_STATES,
    "cancel": ALL_STATES,
    "shutdown": ALL_STATES,
}
CASES = [(kind, state) for kind, states in KINDS.items() for state in states]


@dataclass
class Injection:
    """What was done, and how to find the instants the off-write is measured from."""

    marker: dict[str, Any]
    #: The fault's instant; None while the readings that fix it are still to come.
    reference: Callable[[], float | None]
    what: str
    #: The earliest instant the station can know of the fault (default: the
    #: reference): only an off-write *sent* from then on answers it (a stop's
    #: own off-write still on its way does not).
    known: Callable[[], float | None] | None = None


def measure(rig: VRig, injection: Injection) -> tuple[float, dict[str, Any]] | None:
    """(reference, the first off-write sent once the fault could be known), if any yet."""
    reference = injection.reference()
    known = injection.known() if injection.known is not None else reference
    if reference is None or known is None:
        return None
    offs = [w for w in rig.stop_writes(injection.marker["seq"]) if rig.sent_at(w) >= known - 1e-9]
    return (reference, offs[0]) if offs else None


async def enter(rig: VRig, state: str) -> dict[str, Any] | None:
    """Bring the station into ``state`` and stop at the worst moment to inject.

    Returns the stop's off-write when stopping (the fault comes as it lands).
    """
    match state:
        case "starting":
            # The EV was plugged in before the start (rig made with plugged=True).
            await rig.status("Preparing")
        case "charging":
            await rig.charge()
        case "suspended":
            await rig.charge()
            rig.ev(wants="B")
            await rig.status("SuspendedEV")
        case "stopping":
            await rig.charge()
            marker = rig.mark("stop requested")
            rig.nursery.start_soon(rig.station.request_stop, StopReason.LOCAL)
            return await rig.next_off(marker["seq"])
    await rig.next_read()
    return None


def first_reading_after(
    rig: VRig, after: float, condition: Callable[[float, float], bool]
) -> float | None:
    """``read_at`` of the first meter reading after ``after`` whose (read_at, max
    current) meets ``condition``."""
    for reading in rig.meter_readings:
        current = max((c for c in reading.current if c is not None), default=0.0)
        if reading.read_at > after and condition(reading.read_at, current):
            return reading.read_at
    return None


def board_shows_it(rig: VRig, after: float) -> float | None:
    """``read_at`` of the first board reading after ``after`` with a pilot error or a fault."""
    for status in rig.board_readings:
        if status.read_at > after and (
            status.pilot in (PilotState.E, PilotState.F) or status.faults
        ):
            return status.read_at
    return None


def inject(rig: VRig, kind: str, stop_off: dict[str, Any] | None) -> Injection:
    safety = rig.settings.safety
    match kind:
        case "rcd_trip" | "pilot_E" | "pilot_F":
            if kind == "rcd_trip":
                m = rig.fault("rcd_trip")
            else:
                m = rig.fault("pilot_error", {"state": kind[-1]})
            return Injection(
                m, lambda: float(m["t"]), kind, known=lambda: board_shows_it(rig, m["t"])
            )
        case "overdraw":
            offer = rig.commands()[-1]
            drawn = max(rig.sim.station.phase_currents)
            amps = offer + safety.overcurrent_margin + 3.0 - drawn
            m = rig.fault("overdraw", {"amps": amps})

            def allowance_end() -> float | None:
                start = first_reading_after(
                    rig, m["t"], lambda _, current: current > offer + safety.overcurrent_margin
                )
                return None if start is None else start + safety.overcurrent_time

            return Injection(m, allowance_end, "the end of the over-current allowance")
        case "welded":
            # The acknowledged off the weld is judged against: the stop's, or
            # the one written at start-up.
            off = stop_off or rig.off_writes()[-1]
            # The station may count the off from earlier (from its send, or from
            # its own start): an off-write it sends from the first reading that
            # could decide then on answers the weld.
            earliest = rig.sent_at(stop_off) if stop_off else rig.started
            m = rig.fault("welded")
            wait = max(safety.welded_time, safety.overcurrent_time)

            def shows_current_after(off_since: float) -> float | None:
                return first_reading_after(
                    rig,
                    m["t"],
                    lambda read_at, current: (
                        current > CURRENT_NOISE and read_at - off_since >= wait
                    ),
                )

            def from_acknowledged_off() -> float | None:
                acked = rig.off_acknowledged(off)
                return None if acked is None else shows_current_after(acked)

            return Injection(
                m,
                from_acknowledged_off,
                f"the first reading with current {wait:g} s after the acknowledged off",
                known=lambda: shows_current_after(earliest),
            )
        case "meter_silent":
            m = rig.fault("meter_silent")
            return Injection(
                m,
                lambda: rig.meter_readings[-1].read_at + safety.meter_timeout,
                "the meter timeout",
            )
        case "stop":
            m = rig.mark("stop requested")
            rig.nursery.start_soon(rig.station.request_stop, StopReason.REMOTE)
            return Injection(m, lambda: float(m["t"]), "request_stop")
        case "exception":
            m = rig.crash()
            return Injection(m, lambda: float(m["t"]), "the exception")
        case "cancel":
            m = rig.mark("cancel")
            rig.nursery.cancel_scope.cancel()
            return Injection(m, lambda: float(m["t"]), "the cancellation")
        case "shutdown":
            m = rig.mark("shutdown")
            rig.nursery.start_soon(rig.supervisor.shutdown)
            return Injection(m, lambda: float(m["t"]), "shutdown()")
    raise AssertionError(kind)
