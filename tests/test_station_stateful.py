"""The whole station, stateful: random sequences of what the world does, checked on a virtual clock.

Hypothesis draws a list of steps and one trio run plays them against the rig
of ``tests/vclock_rig.py`` (supervisor, station, drivers, the simulator's
physics and register maps, a real SQLite file, the in-memory Modbus link with
the wire's timing) under ``MockClock(autojump_threshold=0)``; every example
ends with SIGTERM (``supervisor.shutdown()``). The steps: plug in (wanting
B/C/D, with a 13/20/32 A cable), unplug, the EV's state (wants, phases, max
current), a tag (accepted, unknown), ``Charge`` (plug in wanting C, the
accepted tag, a wait: the primitives in the order that charges, so that
faults meet charging often), every fault of the simulator (RCD trip, pilot E
and F, board silent, meter silent, welded, overdraw with amps) and its
clearing, a bus drop, the bus refused or unreachable for a while, slow
replies (one of them slower than the request timeout), a central-system stop,
availability, virtual time passing. Each example enables one or two kinds of
fault and up to three other kinds of step (swarm testing), and draws the
installer maximum (32, 25, 10 A) and the seed of trio's scheduler.

Why a list and one ``trio.run`` per example, not ``RuleBasedStateMachine``:
the station is a tree of trio tasks that must live across steps, and under an
autojump clock any moment the test body is not running trio code is idle time
the clock jumps over. Rules run between trio steps (a guest run, a thread
portal) would let the clock run away while Hypothesis picks the next rule. A
list drawn up front and played inside one run keeps virtual time exactly where
the steps put it; Hypothesis still shrinks it as it would a state machine's
steps (deleting steps, simplifying each: an unneeded step becomes
``Wait(0.01)``), and the run is deterministic (the scheduler is seeded), so a
shrunk example replays exactly.

What is checked. Nothing is sampled on a timer: the checker (``Watch``) looks
at every change of anything it judges (every write and log entry of the
simulator, every request it serves, every event the connector handles, every
transaction the store commits, every fresh meter read), wrapping those as
instance attributes only, and after every step; for each condition below it
keeps the instant it became true, and a condition may last only as long as its
allowance. A violation ends the example at once and names the condition, its
start, its allowance, the steps and the trace (steps, commands, statuses,
transactions, the station's log lines, in virtual time).

* ``command without transaction``: the board holds a current above 0 only
  while a transaction is running on disk (the store's commits; every current
  above 0 that reaches the board is checked against the real file, and the
  file against the commits after every step);
* the contactor: closed only in pilot C or D with no RCD trip or pilot error
  (a welded contactor is checked below), never by the board's hardware
  failsafe when no transaction was running; the offer never above the
  installer maximum or the board's maximum, within the cable's capacity once
  the board could have reported it, never between 0 and 6 A;
* the off-write after a fault (the board's command back at 0: a write of 0 in
  the simulator's log, or already 0) within its allowance, and the command
  kept at 0 while the fault lasts: ``board fault`` (RCD trip, pilot E/F: from
  the injection), ``over-current`` (from the first reading that can show it,
  plus ``overcurrent_time``), ``meter silent`` (the last good reading plus
  ``meter_timeout``), ``unplugged``, ``remote stop`` (request_stop), ``outside
  a transaction`` (the connector ended it: stop, fault, unplug);
* welded: with current flowing while the board is off, the safety monitor
  judges a weld at the first meter reading ``max(welded_time,
  overcurrent_time)`` after the off it judges from was acknowledged, the
  connector raises WELDED within an off-write's allowance after that, and then
  no current above 0 is ever commanded; no WELDED without a weld;
* ``the board applies the station's command``: the board's command (while
  enabled) is what the station believes it commands, within an off-write's
  allowance plus one request (a charge that silently never gets its current);
* whenever the board gives no good reading for longer than ``board_timeout``
  (counted from the safety monitor's start), Faulted has been reported to the
  central system by then (+ 10 ms);
* the store: at most one transaction running, meter_stop >= meter_start,
  stopped_at >= started_at, a transaction the connector ended is ended on disk
  within the station's END_DEADLINE (+ a meter exchange that was on the wire);
* SIGTERM: the first current command *sent* afterwards is the off, in time;
  once the supervisor stopped the board is off (and disabled where it can be)
  and no transaction is running on disk.

Allowances. An off-write's is ``test_station_vclock.py``'s: the issue's target
(poll interval + one request + 10 ms) or, where the wire and the board's gaps
cannot meet it, what they allow + the meter's exchange already on the wire +
10 ms (``Watch.strict``). What the example did to the bus adds what it costs on
the wire, no more: slow replies are added to the wire timing; a silent meter
holds the shared bus for its request timeout; a drop costs a retry and a
reconnect; a fresh meter reading (a transaction's start or stop) and every
other write the station makes meanwhile cost their requests. A board that
cannot be reached (silent, refused, unreachable, replies slower than the
request timeout) cannot be switched off at all: the allowance then counts from
the moment it can be reached again, plus one failed request with its retry,
the trip lane's pause, the meter's exchange and the late replies still on the
way (``Watch.outage_slack``). Verdicts from meter readings allow for the meter
poller's back-off after any failed reading.

Running it: the examples are derandomized (the same ones every run, so a
failure reproduces). ``EVSE_STATEFUL_SEED=<n>`` explores others,
``EVSE_STATEFUL_EXAMPLES=<n>`` sets how many, ``EVSE_STATEFUL_ALL=1`` adds the
board and transport combinations left out by default. A failure prints the
shrunk steps (paste them into ``EVERY_KIND`` or a test of their own to debug)
and the trace. The ``test_found_*`` tests at the end are what this test found,
shrunk, kept as regression tests. A finding not fixed yet goes into
``KNOWN_OPEN`` (the property runs tolerate it) with a strict-xfail test; none is
open now.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from evse.connector import Event, Fault, FaultCleared, FaultRaised, Status, StopReason
from evse.safety import CURRENT_NOISE
from evse.station import END_DEADLINE, OFF_RETRY, StationSettings
from evse.store import TransactionRecord
from fieldbus.boards import PilotState
from fieldbus.memory import WireTiming, pdu_sizes
from fieldbus.ports import RtuPort
from tests.vclock_rig import (
    _READ_FUNCTIONS,
    TAG,
    TARGET_SLACK,
    VRig,
    off_bound,
    off_ideal,
    one_request,
    vclock_rig,
)

UNKNOWN_TAG = "DEADBEEF"

# -- the steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Plug:
    wants: str = "C"
    #: The cable's current capacity (PP), A.
    cable: float = 32.0


@dataclass(frozen=True)
class Unplug:
    pass


@dataclass(frozen=True)
class Charge:
    """Plug in wanting C (if not plugged), present the accepted tag, wait: the
    primitives in the order that charges, so that faults meet charging often."""

    cable: float = 32.0
    seconds: float = 2.0


@dataclass(frozen=True)
class SetEv:
    wants: str | None = None
    phases: int | None = None
    max_current: float | None = None


@dataclass(frozen=True)
class Tag:
    tag: str = TAG


@dataclass(frozen=True)
class Inject:
    #: rcd_trip, pilot_E, pilot_F, board_silent, meter_silent, welded, overdraw.
    fault: str
    amps: float | None = None


@dataclass(frozen=True)
class Clear:
    #: A simulator fault name (ops.sim.model.FAULTS).
    fault: str


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class LinkDown:
    #: "refuse" or "unreachable" (fieldbus.memory.MemoryLink), for ``seconds``.
    mode: str
    seconds: float


@dataclass(frozen=True)
class SlowReplies:
    #: Extra seconds on every device reply (MemoryLink.reply_delay); 0 ends it.
    delay: float


@dataclass(frozen=True)
class RemoteStop:
    pass


@dataclass(frozen=True)
class Availability:
    operative: bool


@dataclass(frozen=True)
class Sigterm:
    pass


Step = (
    Wait
    | Charge
    | Plug
    | Unplug
    | SetEv
    | Tag
    | Inject
    | Clear
    | Drop
    | LinkDown
    | SlowReplies
    | RemoteStop
    | Availability
    | Sigterm
)

SHORT_WAITS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0)
#: Above the board request timeout (0.5 s): the board is as good as silent.
DEAD_DELAY = 0.8

#: Mostly short waits; now and then a long one (what the safety monitor's 5 s
#: allowances, the failsafe's 10 s watchdog and the meter's back-off need).
_waits = st.builds(
    Wait,
    st.one_of(*[st.sampled_from(SHORT_WAITS)] * 7, st.integers(5, 12).map(float)),
)

_charges = st.builds(Charge, st.sampled_from((32.0, 20.0, 13.0)), st.sampled_from((2.0, 0.5, 4.0)))

#: Every kind of step but waiting, with its strategy (swarm testing: each
#: example enables a subset, so that some charge long with one kind of trouble
#: and others mix them all).
STEP_KINDS: dict[str, st.SearchStrategy[Step]] = {
    "plug": st.builds(Plug, st.sampled_from(("C", "B", "D")), st.sampled_from((32.0, 20.0, 13.0))),
    "unplug": st.just(Unplug()),
    "ev": st.builds(
        SetEv,
        st.sampled_from((None, "C", "B", "D")),
        st.sampled_from((None, 3, 1)),
        st.sampled_from((None, 16.0, 32.0, 10.0, 6.0)),
    ),
    "tag": st.builds(Tag, st.sampled_from((TAG, UNKNOWN_TAG))),
    # Each fault with its clearing, so that an example that has a fault also
    # clears it now and then.
    "board_fault": st.one_of(
        st.builds(Inject, st.sampled_from(("rcd_trip", "pilot_E", "pilot_F"))),
        st.builds(Clear, st.sampled_from(("rcd_trip", "pilot_error"))),
    ),
    "silence": st.one_of(
        st.builds(Inject, st.sampled_from(("board_silent", "meter_silent"))),
        st.builds(Clear, st.sampled_from(("board_silent", "meter_silent"))),
    ),
    "welded": st.sampled_from((Inject("welded"), Clear("welded"))),
    "overdraw": st.one_of(
        st.builds(Inject, st.just("overdraw"), st.sampled_from((4.0, 12.0, 1.0))),
        st.just(Clear("overdraw")),
    ),
    "drop": st.just(Drop()),
    "link_down": st.builds(
        LinkDown, st.sampled_from(("refuse", "unreachable")), st.sampled_from((0.3, 1.5, 4.0, 11.0))
    ),
    "slow": st.builds(SlowReplies, st.sampled_from((0.0, 0.02, 0.15, DEAD_DELAY))),
    "stop": st.just(RemoteStop()),
    "availability": st.builds(Availability, st.booleans()),
}


FAULT_KINDS = ("board_fault", "silence", "welded", "overdraw")


@st.composite
def step_lists(draw: st.DrawFn, min_steps: int = 5, max_steps: int = 30) -> list[Step]:
    """Steps of the kinds this example enables; every example ends with SIGTERM
    (``play``), so that is not one of them."""
    # One or two kinds of fault, and up to three other kinds of trouble.
    kinds = draw(st.sets(st.sampled_from(FAULT_KINDS), min_size=1, max_size=2))
    others = sorted(set(STEP_KINDS) - set(FAULT_KINDS))
    kinds |= draw(st.sets(st.sampled_from(others), max_size=3))
    # Waiting and charging are always possible: without them nothing happens.
    # Waiting weighs about as much as everything else together, and comes
    # first: a step that does not matter shrinks to Wait(0.01).
    enabled = [_charges, *[STEP_KINDS[k] for k in sorted(kinds)]]
    steps = st.one_of(*[_waits] * len(enabled), *enabled)
    return draw(st.lists(steps, min_size=min_steps, max_size=max_steps))


# -- bounds -------------------------------------------------------------------------------


def _port_gap(rig: VRig) -> float:
    return rig.port.frame_gap if isinstance(rig.port, RtuPort) else 0.0


def meter_exchanges(rig: VRig, timing: WireTiming) -> list[float]:
    """Each request of one meter reading on the shared line (t3.5 included on RTU)."""
    return [
        _port_gap(rig) + timing.exchange_time(*pdu_sizes(_READ_FUNCTIONS[b.table], b.count))
        for b in rig.station.meter._reader.blocks
    ]


@dataclass(frozen=True)
class Span:
    start: float
    end: float = math.inf
    value: float = 0.0


class History:
    """When each kind of disturbance was on (spans of virtual time)."""

    def __init__(self) -> None:
        self.spans: dict[str, list[Span]] = defaultdict(list)

    def set(self, kind: str, on: bool, now: float, value: float = 0.0) -> None:
        spans = self.spans[kind]
        is_open = bool(spans) and math.isinf(spans[-1].end)
        if is_open and (not on or spans[-1].value != value):
            spans[-1] = replace(spans[-1], end=now)
            is_open = False
        if on and not is_open:
            spans.append(Span(now, value=value))

    def instant(self, kind: str, now: float) -> None:
        self.spans[kind].append(Span(now, now))

    def overlapping(self, kind: str, t0: float, t1: float) -> list[Span]:
        return [s for s in self.spans[kind] if s.start <= t1 and s.end >= t0]

    def last_end(self, kinds: Sequence[str], t0: float, t1: float) -> float | None:
        """The end of the last span of ``kinds`` overlapping [t0, t1] (inf: still on)."""
        ends = [s.end for k in kinds for s in self.overlapping(k, t0, t1)]
        return max(ends) if ends else None


# -- the checker --------------------------------------------------------------------------

#: A condition: is it true now, and until when may it last (given its start, now)?
Allowance = Callable[[float, float], float]
#: The allowance of what may never be true, not even for an instant.
NEVER = -math.inf


class Violation(AssertionError):
    """An invariant broken: what, when, the steps and the trace."""


class Watch:
    """Looks at the rig after every change and every step; see the module docstring."""

    def __init__(self, rig: VRig) -> None:
        self.rig = rig
        self.sim = rig.sim
        self.station = rig.station
        self.settings = rig.settings
        self.safety = rig.settings.safety
        plan = rig.supervisor.plan
        self.board_request = plan.board.timeout * (1 + plan.board.retries)
        #: The longest a silent meter holds the shared bus per attempt.
        self.meter_hold = plan.meter.timeout * (1 + plan.meter.retries)
        #: The meter poller's longest back-off after failures (Station._poll_meter).
        self.meter_backoff = max(self.settings.meter_poll, self.safety.meter_timeout / 2)
        self.max_offer = min(self.settings.installer_max, rig.model.max_current)
        self.history = History()
        self.trace: list[str] = []
        self.failure: str | None = None
        self.done = False
        #: SIGTERM given: the pollers stop, silence is no longer a fault.
        self.stopping = False
        self.since: dict[str, float] = {}
        self.allowances: dict[str, Allowance] = {}
        #: The conditions that were true at some point, and the statuses seen.
        self.seen: set[str] = set()
        self.started = self.ended = trio.current_time()
        # The safety monitor's silence clocks start with the pollers, not at the
        # start-up's readings; it is made then, with the command at 0, which
        # ``commanded_at`` keeps until the first current above 0.
        assert self.station.monitor is not None
        self.monitor_started = self.station.monitor.commanded_at
        self.fault_since: dict[str, float] = {}
        self.plugged_at = -math.inf
        self.unplugged_at = -math.inf
        self.stops: list[tuple[float, int]] = []
        self.welded_raised_at: float | None = None
        self.welded_verdict_at: float | None = None
        self.welded_spans: list[Span] = []
        self.tx_at_outage_start: int | None = None
        #: The last time the station was seen commanding a current above 0, and
        #: the board's hardware failsafe seen tripped.
        self.commanded_on = -math.inf
        self.failsafe_at = -math.inf
        self.board_checked_for = -math.inf
        self.last_status: tuple[Status, Any] | None = None
        rows = rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL")
        self.disk: int | None = rows[0][0] if rows else None
        self._in_sample = False
        #: The step being played (cancelled by a violation).
        self.step_scope = trio.CancelScope()
        self._install()

    # -- hooks ------------------------------------------------------------------------

    def _install(self) -> None:
        sim, station = self.sim, self.station
        record = sim.record

        def recorded(event: dict[str, Any]) -> None:
            record(event)
            self._on_event(sim.events[-1])

        sim.record = recorded  # type: ignore[method-assign]
        for device in sim.devices.values():
            if hasattr(device, "record"):
                device.record = recorded
        server = sim.server
        served = server.on_request

        def on_request(unit: int, request: Any) -> None:
            if served is not None:
                served(unit, request)
            self.sample("request")

        server.on_request = on_request
        connector = station.connector
        handle = connector.handle

        def handled(event: Event, now: float) -> Any:
            effects = handle(event, now)
            self._on_handled(event)
            return effects

        connector.handle = handled  # type: ignore[method-assign]
        store = station.store
        begin, end = store.begin_transaction, store.end_transaction

        def begun(**kwargs: Any) -> TransactionRecord:
            record = begin(**kwargs)
            self.disk = record.id
            self.note(f"transaction {record.id} on disk")
            self.sample("begin")
            return record

        def ended(tx_id: int, **kwargs: Any) -> TransactionRecord:
            record = end(tx_id, **kwargs)
            if self.disk == tx_id:
                self.disk = None
            self.note(f"transaction {tx_id} ended on disk ({record.stop_reason})")
            self.sample("end")
            return record

        store.begin_transaction = begun  # type: ignore[method-assign]
        store.end_transaction = ended  # type: ignore[method-assign]
        read_now = station._read_meter_now

        async def fresh_read() -> Any:
            # A transaction's start and stop read the meter afresh (not the last
            # poll): one more meter reading on the shared bus.
            span = Span(trio.current_time())  # open (end inf) while it reads
            self.history.spans["fresh_meter"].append(span)
            try:
                return await read_now()
            finally:
                spans = self.history.spans["fresh_meter"]
                spans[spans.index(span)] = replace(span, end=trio.current_time())

        station._read_meter_now = fresh_read  # type: ignore[method-assign]
        begin_tx = station._begin

        async def begin_on_loop(*args: Any) -> None:
            # A transaction's start (its own task since the fix of FAULTED_LATE):
            # it waits for the previous transaction's end and a fresh meter reading.
            span = Span(trio.current_time())
            self.history.spans["begin"].append(span)
            try:
                await begin_tx(*args)
            finally:
                spans = self.history.spans["begin"]
                spans[spans.index(span)] = replace(span, end=trio.current_time())

        station._begin = begin_on_loop  # type: ignore[method-assign, assignment]
        monitor = station.monitor
        assert monitor is not None
        check = monitor.check

        def checked(now: float) -> list[FaultRaised | FaultCleared]:
            # When the safety monitor itself judged a weld (the connector hears of
            # it through the loop, later).
            changes = check(now)
            if any(isinstance(c, FaultRaised) and c.fault is Fault.WELDED for c in changes):
                self.welded_verdict_at = now
            return changes

        monitor.check = checked  # type: ignore[method-assign]

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "write" and "command" in event.get("fields", {}):
            amps = event["fields"]["command"]
            self.note(f"board command {amps:g} A")
            if self.welded_raised_at is not None and amps > 0:
                self.fail(f"{amps:g} A commanded after the welded contactor was reported")
            if 0 < amps < 6:
                self.fail(f"{amps:g} A commanded: below 6 A is 0")
            if amps > 0 and not self.rig.db_rows(
                "SELECT id FROM transactions WHERE stop_reason IS NULL"
            ):
                self.fail(f"{amps:g} A reached the board with no transaction running in the file")
        self.sample("sim")

    def _on_handled(self, event: Event) -> None:
        snap = self.station.connector.snapshot
        status = (self.station.connector.status, self.station.connector.error_code)
        if status != self.last_status:
            self.last_status = status
            self.seen.add(f"status {status[0].value}")
            self.note(f"connector {status[0].value} {status[1].value} {sorted(snap.faults)}")
        if isinstance(event, FaultRaised) and event.fault is Fault.WELDED:
            now = trio.current_time()
            if self.welded_raised_at is None:
                self.welded_raised_at = now
            recently = [s for s in self.welded_spans if s.end >= now - 10.0]
            if not self.sim.station.faults.welded and not recently:
                if FALSE_WELD in TOLERATED and now - self.failsafe_at <= 10.0:
                    # The failsafe's current after the station's off (KNOWN_OPEN).
                    self.note(f"tolerated: {FALSE_WELD} ({event.info})")
                else:
                    self.fail(f"WELDED raised ({event.info}) but the contactor never welded")
        self.sample("handled")

    # -- recording ----------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.trace.append(f"{trio.current_time():10.4f}  {what}")

    def fail(self, what: str) -> None:
        if self.failure is None:
            self.failure = f"at t={trio.current_time():.4f}: {what}"
            self.note(f"VIOLATION: {what.splitlines()[0]}")
            # The example is decided: end the step under way (a long wait, say)
            # now, which keeps shrinking fast.
            self.step_scope.cancel()

    def report(self) -> str:
        return "\n".join(self.trace[-200:])

    def describe(self) -> str:
        s = self.sim.station
        c = self.station.connector
        return (
            f"{c.status.value} {c.error_code.value} {sorted(c.snapshot.faults)}; board "
            f"{s.board.command:g} A{'' if s.board.enabled else ' disabled'}, pilot "
            f"{s.pilot.value}, contactor {'closed' if s.contactor_closed else 'open'}, "
            f"current {max(s.phase_currents):g} A; on disk {self.disk}"
        )

    # -- bounds -------------------------------------------------------------------------

    @cache  # noqa: B019 (one Watch per example)
    def _strict(self, delay: float) -> tuple[float, float, float]:
        """(the off-write's strict allowance, one board request, one meter reading)
        with ``delay`` on every reply."""
        rig = self.rig
        timing = replace(rig.timing, turnaround=rig.timing.turnaround + delay)
        meter = meter_exchanges(rig, timing)
        ideal = off_ideal(rig.model, timing, rig.port, self.settings)
        bound = max(
            off_bound(rig.model, timing, rig.port, self.settings),
            ideal + max(meter) + TARGET_SLACK,
        )
        return bound, one_request(rig.model, timing, rig.port), sum(meter)

    def delay(self, t0: float, t1: float) -> float:
        spans = self.history.overlapping("delay", t0, t1)
        return max((s.value for s in spans if s.value < DEAD_DELAY), default=0.0)

    def strict(self, t0: float, t1: float) -> float:
        """The off-write's allowance for what happened on the bus in [t0, t1]."""
        delay = self.delay(t0, t1)
        bound, request, meter = self._strict(delay)
        if self.history.overlapping("meter_out", t0, t1):
            # A silent meter's request is on the wire when the fault shows.
            bound += self.meter_hold + delay + _port_gap(self.rig)
        if self.history.overlapping("drop", t0, t1):
            # The exchange on the wire is lost: its retry, after a reconnect.
            bound += request + meter + self.rig.timing.connect + 0.05
        if self.history.overlapping("fresh_meter", t0, t1):
            # A fresh meter reading (a transaction's start or stop) interleaves its
            # requests with the board's.
            bound += meter
        # Other writes the station had to make meanwhile (a current command, an
        # enable) take a request slot each before the poll that shows the fault.
        writes = [e for e in self.rig.board_writes() if t0 - request <= e["t"] <= t1 + bound]
        bound += request * len([w for w in writes if w["fields"].get("command", 1) != 0])
        return bound

    def outage_slack(self, t0: float, t1: float) -> float:
        """Once an unreachable board can be reached again: the request in flight
        fails and is retried, the trip lane pauses before its next attempt, the
        meter may have the bus, and replies sent before are still on the way."""
        late = max((s.value for s in self.history.overlapping("delay", t0, t1)), default=0.0)
        return self.board_request + OFF_RETRY + self.meter_hold + late + 0.1

    def lookback(self) -> float:
        return self.outage_slack(-math.inf, math.inf)

    def deadline(self, t0: float, now: float) -> float:
        """The latest instant of an off-write for something the station could know
        from ``t0`` on."""
        lo = t0 - self.lookback()
        back = self.history.last_end(("board_out",), lo, now)
        if back is None:
            return t0 + self.strict(lo, now)
        return max(t0, back) + self.strict(lo, now) + self.outage_slack(lo, now)

    def meter_wait(self, t0: float, now: float) -> float:
        """Until the next meter reading completes, from ``t0``."""
        # One failed meter read (a silent meter, the bus down, a drop) is enough
        # for the poller to back off.
        trouble = self.history.last_end(("meter_out", "board_out", "drop"), t0 - 10.0, now)
        wait = self.meter_backoff if trouble is not None else self.settings.meter_poll
        return wait + self._strict(self.delay(t0, now))[2]

    def meter_back(self, t0: float, now: float) -> float:
        """``t0``, or when the meter could be read again if it could not meanwhile."""
        back = self.history.last_end(("meter_out", "board_out"), t0 - self.lookback(), now)
        return t0 if back is None else max(t0, back)

    # -- the conditions -----------------------------------------------------------------

    def _outage_only(self, since: float, now: float) -> float:
        """Never, unless the board could not be reached: then until it can be
        reached again plus the allowance of an off-write."""
        back = self.history.last_end(("board_out",), since - self.lookback(), now)
        if back is None:
            return NEVER
        return max(since, back) + self.strict(since, now) + self.outage_slack(since, now)

    def conditions(self, now: float) -> dict[str, tuple[bool, Allowance]]:
        s = self.sim.station
        cmd = s.board.command
        faults = s.faults
        current = max(s.phase_currents)
        snap = self.station.connector.snapshot
        model = self.rig.model
        on = cmd > 0
        board_fault = [
            self.fault_since[f] for f in ("rcd_trip", "pilot_error") if getattr(faults, f)
        ]
        cable = s.ev.plugged and model.cable_limit is not None and cmd > s.board.cable_limit
        stopped = [t for t, tx in self.stops if tx == self.disk]

        fault_from = min(board_fault, default=math.inf)
        silent_from = self.fault_since.get("meter_silent", math.inf)
        stop_from = min(stopped, default=math.inf)
        plugged_at, unplugged_at = self.plugged_at, self.unplugged_at

        def board_fault_allowance(since: float, now: float) -> float:
            return self.deadline(fault_from, now)

        def over_current(since: float, now: float) -> float:
            start = self.meter_back(since, now)
            verdict = start + self.meter_wait(start, now) + self.safety.overcurrent_time
            return self.deadline(verdict, now)

        def meter_silent(since: float, now: float) -> float:
            good = [r.read_at for r in self.rig.meter_readings if r.read_at <= silent_from]
            last = max(good, default=self.started)
            return self.deadline(last + self.safety.meter_timeout, now) + self.meter_hold

        def welded(since: float, now: float) -> float:
            verdict = self.welded_verdict_at
            if verdict is not None and verdict >= since - self.safety.welded_time:
                # The monitor has judged; the connector hears it through the loop.
                if FAULTED_LATE in TOLERATED and self.history.overlapping("begin", verdict, now):
                    return math.inf  # the loop waits in _begin (KNOWN_OPEN)
                return verdict + self.strict(verdict, now)
            acked = self.off_acknowledged(since)
            if math.isinf(acked):
                return math.inf  # no off acknowledged yet: nothing to judge from
            judge = max(since, acked + max(self.safety.welded_time, self.safety.overcurrent_time))
            start = self.meter_back(judge, now)
            return start + self.meter_wait(start, now) + TARGET_SLACK

        def cable_allowance(since: float, now: float) -> float:
            # Seen at the next board poll, the offer recomputed, the lower one written.
            return self.deadline(plugged_at, now) + self.strict(since, now)

        def unplugged(since: float, now: float) -> float:
            return self.deadline(unplugged_at, now)

        def remote_stop(since: float, now: float) -> float:
            return self.deadline(stop_from, now)

        def not_in_transaction(since: float, now: float) -> float:
            return self.deadline(since, now)

        def end_on_disk(since: float, now: float) -> float:
            # The end's waits are bounded by END_DEADLINE; a meter exchange on the
            # wire then is finished, not aborted, before the commit.
            return since + END_DEADLINE + self.meter_hold + TARGET_SLACK

        def follows(since: float, now: float) -> float:
            # A command and, on a board that is disabled with every off, the enable.
            return self.deadline(since, now) + self.strict(since, now)

        # What the board applies: its command, while enabled (the EV-CC is
        # disabled with every off and enabled after the next current is written).
        applied = cmd if s.board.enabled or model.enable is None else 0.0

        failsafe_closed = (
            s.board.failsafe_tripped
            and s.contactor_closed
            and not faults.welded
            and self.disk is None
            and self.tx_at_outage_start is None
        )
        return {
            "command without transaction": (on and self.disk is None, self._outage_only),
            "failsafe closes the contactor with no transaction": (
                failsafe_closed,
                lambda since, now: NEVER,
            ),
            "offer above the installer or board maximum": (
                cmd > self.max_offer,
                lambda since, now: NEVER,
            ),
            "offer above the cable's capacity": (cable, cable_allowance),
            "board fault (RCD trip, pilot E/F) and current offered": (
                on and bool(board_fault),
                board_fault_allowance,
            ),
            "over-current": (on and current > cmd + self.safety.overcurrent_margin, over_current),
            "meter silent and current offered": (on and faults.meter_silent, meter_silent),
            "welded contactor not reported": (
                faults.welded
                and not on
                and current > CURRENT_NOISE
                and Fault.WELDED not in snap.faults,
                welded,
            ),
            "unplugged and current offered": (on and not s.ev.plugged, unplugged),
            "remote stop and current offered": (on and bool(stopped), remote_stop),
            "current offered outside a transaction": (
                on and not snap.in_transaction,
                not_in_transaction,
            ),
            "transaction ended by the connector still running on disk": (
                self.disk is not None and not snap.in_transaction,
                end_on_disk,
            ),
            "the board does not apply the current the station commands": (
                not self.stopping and abs(applied - self.station.commanded) > 1e-6,
                follows,
            ),
        }

    def off_acknowledged(self, since: float) -> float:
        """When the station had the acknowledgement of the off a weld is judged from:
        the first off-write after its last current above 0 (commanded, whether or
        not it reached the board), the start-up's if there was none; inf while that
        off has not been written."""
        writes = self.rig.writes()
        on = [float(w["t"]) for w in writes if w["t"] <= since and w["fields"]["command"] > 0]
        last_on = max([*on, self.commanded_on])
        if math.isinf(last_on):
            return self.started
        offs = [w for w in writes if w["t"] >= last_on and w["fields"]["command"] == 0]
        if not offs:
            return math.inf
        delay = max((s.value for s in self.history.spans["delay"]), default=0.0)
        return self.rig.ack_time(offs[0]) + delay

    # -- sampling -----------------------------------------------------------------------

    def sample(self, why: str) -> None:
        if self.done or self.failure is not None or self._in_sample:
            return
        self._in_sample = True
        try:
            self._sample()
        except Exception:
            self.fail(f"the checker failed ({why}):\n{traceback.format_exc()}")
        finally:
            self._in_sample = False

    def _sample(self) -> None:
        now = trio.current_time()
        rig, s = self.rig, self.sim.station
        s.advance(now)
        rig._adopt()
        if self.station.commanded > 0:
            self.commanded_on = now
        if s.board.failsafe_tripped:
            self.failsafe_at = now
        link = rig.link
        # Replies slower than the request timeout are no replies at all.
        bus_out = link.refuse or link.unreachable or link.reply_delay >= DEAD_DELAY
        board_out = s.faults.board_silent or bus_out
        meter_out = s.faults.meter_silent or bus_out
        was_out = bool(self.history.spans["board_out"]) and math.isinf(
            self.history.spans["board_out"][-1].end
        )
        if board_out and not was_out:
            self.tx_at_outage_start = self.disk
        self.history.set("board_out", board_out, now)
        self.history.set("meter_out", meter_out, now)
        self.history.set("delay", link.reply_delay > 0, now, link.reply_delay)
        for name in ("rcd_trip", "pilot_error", "meter_silent"):
            if getattr(s.faults, name):
                self.fault_since.setdefault(name, now)
            else:
                self.fault_since.pop(name, None)
        if s.faults.welded:
            if not self.welded_spans or not math.isinf(self.welded_spans[-1].end):
                self.welded_spans.append(Span(now))
        elif self.welded_spans and math.isinf(self.welded_spans[-1].end):
            self.welded_spans[-1] = replace(self.welded_spans[-1], end=now)

        # The brief's invariant, literally: a closed contactor that is not welded
        # means a transaction on disk, pilot C/D, no RCD trip or pilot error.
        if s.contactor_closed and not s.faults.welded:
            if s.pilot not in (PilotState.C, PilotState.D):
                self.fail(f"contactor closed in pilot state {s.pilot.value}")
            if s.faults.rcd_trip or s.faults.pilot_error:
                self.fail("contactor closed with an RCD trip or a pilot error")

        for name, (active, current) in self.conditions(now).items():
            if active:
                self.seen.add(name)
                since = self.since.setdefault(name, now)
                self.allowances[name] = allowance = current
            elif name in self.since:
                # It lasted until now; its allowance is the one from while it held.
                since = self.since.pop(name)
                allowance = self.allowances.pop(name)
            else:
                continue
            allowed = allowance(since, now)
            if now > allowed + 1e-9:
                if name in TOLERATED:
                    continue  # a known open finding (KNOWN_OPEN): its own test shows it
                until = "never allowed" if math.isinf(allowed) else f"allowed until {allowed:.4f}"
                self.fail(f"{name}: since {since:.4f}, {until}; {self.describe()}")
                return

        # Faulted reported within board_timeout of the board's last good reading.
        last = max(rig.board_readings[-1].read_at, self.monitor_started)
        due = last + self.safety.board_timeout + TARGET_SLACK
        if now > due and last > self.board_checked_for and not self.stopping:
            self.board_checked_for = last
            reported = [st for t, st, _ in rig.central.statuses() if t <= due]
            if not reported or reported[-1] is not Status.FAULTED:
                # The known cause (KNOWN_OPEN): the loop is inside a transaction's
                # start meanwhile, waiting for the previous end or the meter.
                waiting = self.history.overlapping("begin", last, due)
                if FAULTED_LATE in TOLERATED and waiting:
                    self.note(f"tolerated: {FAULTED_LATE} (the loop waits in _begin)")
                else:
                    self.fail(
                        f"no good board reading since {last:.4f}, yet not reported Faulted "
                        f"by {due:.4f} (reported: {reported[-1:]}); {self.describe()}"
                    )

    def check_step(self, step: Step) -> None:
        """After every step: the samples' conditions, and the store's real file."""
        self.sample("step")
        self.note(f"after {step}: {self.describe()}")
        if self.failure is not None:
            return
        rows = self.rig.db_rows(
            "SELECT id, stop_reason, meter_start_wh, meter_stop_wh, started_at, stopped_at "
            "FROM transactions ORDER BY id"
        )
        running = [r[0] for r in rows if r[1] is None]
        if len(running) > 1:
            self.fail(f"{len(running)} transactions running in the file: {running}")
        if running != ([] if self.disk is None else [self.disk]):
            self.fail(f"the file has {running} running; the store's commits say {self.disk}")
        for tx_id, reason, start, stop, started_at, stopped_at in rows:
            if reason is None:
                continue
            if stop < start:
                self.fail(f"transaction {tx_id}: meter_stop {stop} < meter_start {start}")
            if stopped_at < started_at:
                self.fail(f"transaction {tx_id}: stopped_at {stopped_at} < started_at {started_at}")


# -- playing an example -------------------------------------------------------------------


async def play(
    tmp: Path,
    board: str,
    transport: str,
    steps: Sequence[Step],
    seed: int,
    installer_max: float = 32.0,
) -> Watch:
    """Run ``steps`` against a fresh rig; returns the checker with its verdict."""
    watch: Watch | None = None
    settings = StationSettings(installer_max=installer_max)
    logs = _TraceLogs()
    try:
        with logs:
            async with vclock_rig(
                tmp, board=board, transport=transport, seed=seed, settings=settings
            ) as rig:
                watch = logs.watch = Watch(rig)
                watch.note(f"started: {watch.describe()}")
                await _play(rig, watch, steps)
                watch.done = True
                watch.ended = trio.current_time()
    except Exception as exc:  # an exception out of the station's tree is a finding
        if watch is None:
            raise
        watch.fail("the station raised:\n" + "".join(traceback.format_exception(exc)))
    assert watch is not None
    return watch


class _TraceLogs(logging.Handler):
    """The station's and the drivers' log lines go into the example's trace (with
    virtual time), not to pytest's capture, which would keep every example's."""

    LOGGERS = ("evse", "fieldbus", "ops")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.watch: Watch | None = None
        self._saved: list[tuple[logging.Logger, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.watch is not None:
            self.watch.note(f"log {record.levelname} {record.name}: {record.getMessage()}")

    def __enter__(self) -> _TraceLogs:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.propagate))
            logger.propagate = False
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, propagate in self._saved:
            logger.removeHandler(self)
            logger.propagate = propagate


def _background(rig: VRig, watch: Watch, what: str, fn: Callable[[], Awaitable[object]]) -> None:
    async def run() -> None:
        try:
            result = await fn()
        except Exception as exc:
            watch.fail(f"{what} raised {exc!r}")
        else:
            watch.note(f"{what} -> {result!r}")

    rig.nursery.start_soon(run)


async def _play(rig: VRig, watch: Watch, steps: Sequence[Step]) -> None:
    for step in [*steps, Sigterm()]:
        if watch.failure is not None:
            return
        with trio.CancelScope() as watch.step_scope:
            await _play_step(rig, watch, step)
        if watch.failure is not None or isinstance(step, Sigterm):
            return
        watch.check_step(step)


async def _play_step(rig: VRig, watch: Watch, step: Step) -> None:
    sim, station, link = rig.sim, rig.station, rig.link
    now = trio.current_time()
    watch.note(f"step {step}")
    match step:
        case Wait(seconds=seconds):
            await trio.sleep(seconds)
        case Plug(wants=wants, cable=cable):
            if not sim.station.ev.plugged:
                sim.station.board.cable_limit = cable
                watch.plugged_at = now
            rig.plug(wants)
        case Charge(cable=cable, seconds=seconds):
            if not sim.station.ev.plugged:
                sim.station.board.cable_limit = cable
                watch.plugged_at = now
            rig.plug("C")
            _background(rig, watch, f"tag {TAG}", partial(station.present_id_tag, TAG))
            await trio.sleep(seconds)
        case Unplug():
            if sim.station.ev.plugged:
                watch.unplugged_at = now
            rig.unplug()
        case SetEv(wants=wants, phases=phases, max_current=max_current):
            changes = {"wants": wants, "phases": phases, "max_current": max_current}
            rig.ev(**{k: v for k, v in changes.items() if v is not None})
        case Tag(tag=tag):
            _background(rig, watch, f"tag {tag}", partial(station.present_id_tag, tag))
        case Inject(fault=fault, amps=amps):
            if fault.startswith("pilot_"):
                rig.fault("pilot_error", {"state": fault[-1]})
            elif fault == "overdraw":
                rig.fault("overdraw", {"amps": amps})
            else:
                rig.fault(fault)
        case Clear(fault=fault):
            rig.clear(fault)
        case Drop():
            watch.history.instant("drop", now)
            link.drop()
        case LinkDown(mode=mode, seconds=seconds):
            setattr(link, mode, True)
            watch.sample("link down")
            try:
                await trio.sleep(seconds)
            finally:
                setattr(link, mode, False)
        case SlowReplies(delay=delay):
            link.reply_delay = delay
        case RemoteStop():
            if station.connector.snapshot.in_transaction and watch.disk is not None:
                watch.stops.append((now, watch.disk))
            _background(rig, watch, "request_stop", lambda: station.request_stop(StopReason.REMOTE))
        case Availability(operative=operative):
            _background(
                rig,
                watch,
                f"set_availability({operative})",
                partial(station.set_availability, operative),
            )
        case Sigterm():
            await _sigterm(rig, watch)


async def _sigterm(rig: VRig, watch: Watch) -> None:
    """SIGTERM: the orderly stop, then the switch-off; ends the example."""
    watch.stopping = True
    marker = rig.mark("SIGTERM")
    asked = float(marker["t"])
    await rig.supervisor.shutdown()
    with trio.move_on_after(60.0) as waiting:
        await rig.supervisor.stopped.wait()
    watch.check_step(Sigterm())
    if waiting.cancelled_caught:
        watch.fail("the supervisor did not stop within 60 virtual s of SIGTERM")
        return
    watch.done = True
    if watch.failure is not None:
        return
    s = rig.sim.station
    now = trio.current_time()
    reachable = watch.history.last_end(("board_out",), asked, now) is None
    # A command already on the wire at SIGTERM arrives after it; the first one
    # *sent* afterwards must be the off.
    first = next((w for w in rig.writes() if rig.sent_at(w) >= asked), None)
    if first is not None and first["fields"]["command"] != 0:
        watch.fail(f"the first command after SIGTERM was {first['fields']}")
    if reachable:
        if first is None and s.board.command != 0:
            watch.fail("no off-write after SIGTERM")
        elif first is not None and first["t"] > watch.deadline(asked, now):
            watch.fail(
                f"the off-write came {(first['t'] - asked) * 1000:.1f} ms after SIGTERM "
                f"(allowed {(watch.deadline(asked, now) - asked) * 1000:.1f} ms)"
            )
        if s.board.command != 0:
            watch.fail(f"the board holds {s.board.command:g} A after the switch-off")
        if rig.model.enable is not None and s.board.enabled:
            watch.fail("the board is still enabled after the switch-off")
    running = rig.db_rows("SELECT id FROM transactions WHERE stop_reason IS NULL")
    if running:
        watch.fail(f"transaction {running} still running on disk after the switch-off")
    watch.note(f"stopped: {watch.describe()}")


#: Findings of this test that are not fixed yet. The property runs tolerate them,
#: so that a run stays green whether or not Hypothesis meets them; each has a
#: ``test_found_...`` below that shows it deterministically, marked
#: xfail(strict=True) until it is fixed.
FAILSAFE_WITHOUT_TX = "failsafe closes the contactor with no transaction"
#: Tolerated only while the loop was inside a transaction's start (_begin).
FAULTED_LATE = "Faulted reported late"
#: The failsafe's current flowing after the station's acknowledged off is taken
#: for a welded contactor (tolerated only while the failsafe was tripped).
FALSE_WELD = "WELDED raised without a weld"
#: All three were fixed: the failsafe is armed with 0 outside a transaction (and a
#: transaction stays open while a silent board's failsafe may deliver current),
#: the monitor does not judge a weld while the failsafe may apply current, and a
#: transaction's start is written by a task of its own, not on the loop.
KNOWN_OPEN: frozenset[str] = frozenset()
TOLERATED: frozenset[str] = KNOWN_OPEN


def run_example(
    tmp_path_factory: pytest.TempPathFactory,
    board: str,
    transport: str,
    steps: Sequence[Step],
    seed: int,
    installer_max: float = 32.0,
    *,
    statistics: bool = False,
    tolerate: frozenset[str] = KNOWN_OPEN,
) -> None:
    global TOLERATED  # noqa: PLW0603 - one example at a time in this process
    TOLERATED = tolerate
    tmp = tmp_path_factory.mktemp("stateful")
    clock = trio.testing.MockClock(autojump_threshold=0)
    watch = trio.run(play, tmp, board, transport, steps, seed, installer_max, clock=clock)
    if statistics:
        # What this example exercised (pytest --hypothesis-show-statistics).
        for what in sorted(watch.seen):
            event(what)
        lasted = watch.ended - watch.started
        event(
            f"virtual time {next(b for b in (10, 30, 60, 120, math.inf) if lasted < b):g} s or less"
        )
    if watch.failure is not None:
        raise Violation(
            f"{board}/{transport}, installer maximum {installer_max:g} A, scheduler seed "
            f"{seed}: {watch.failure}\n"
            f"steps: {list(steps)!r}\n--- trace ---\n{watch.report()}"
        )


# -- the tests ----------------------------------------------------------------------------

_ALL = bool(os.environ.get("EVSE_STATEFUL_ALL"))

TestFn = Callable[[pytest.TempPathFactory, list[Step], int, float], None]


def stateful(examples: int, *, extra: bool = False) -> Callable[[TestFn], Callable[..., None]]:
    """Make a Hypothesis test of a step list (with the scheduler's seed and the
    installer maximum): derandomized, so that every run tries the same examples
    and a failure reproduces, unless EVSE_STATEFUL_SEED asks for others;
    EVSE_STATEFUL_EXAMPLES overrides ``examples``; no example database.
    ``extra``: run only with EVSE_STATEFUL_ALL=1."""

    def wrap(test: TestFn) -> Callable[..., None]:
        chosen = settings(
            max_examples=int(os.environ.get("EVSE_STATEFUL_EXAMPLES", examples)),
            deadline=None,
            derandomize="EVSE_STATEFUL_SEED" not in os.environ,
            database=None,
            print_blob=True,
            # No explain phase: it replays the failure hundreds of times to say
            # which parts vary freely; the shrunk steps and the trace say more.
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(
            given(
                steps=step_lists(),
                seed=st.integers(0, 2**16),
                installer_max=st.sampled_from((32.0, 25.0, 10.0)),
            )(test)
        )
        if "EVSE_STATEFUL_SEED" in os.environ:
            chosen = hypothesis_seed(int(os.environ["EVSE_STATEFUL_SEED"]))(chosen)
        # Shrinking a failure replays hundreds of examples.
        marked = pytest.mark.timeout(900)(chosen)
        if extra:
            marked = pytest.mark.skipif(not _ALL, reason="EVSE_STATEFUL_ALL=1 runs it")(marked)
        return cast("Callable[..., None]", marked)

    return wrap


# The two combinations the issue asks for at least, and the Heidelberg (the one
# board with a hardware failsafe) over TCP; EVSE_STATEFUL_ALL=1 adds the rest.


@stateful(50)
def test_stateful_evse_din_rtu(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Step], seed: int, installer_max: float
) -> None:
    run_example(tmp_path_factory, "evse-din", "rtu", steps, seed, installer_max, statistics=True)


@stateful(40)
def test_stateful_ev_cc_tcp(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Step], seed: int, installer_max: float
) -> None:
    run_example(tmp_path_factory, "ev-cc", "tcp", steps, seed, installer_max, statistics=True)


@stateful(20)
def test_stateful_heidelberg_tcp(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Step], seed: int, installer_max: float
) -> None:
    run_example(tmp_path_factory, "heidelberg", "tcp", steps, seed, installer_max, statistics=True)


@stateful(30, extra=True)
def test_stateful_evse_din_tcp(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Step], seed: int, installer_max: float
) -> None:
    run_example(tmp_path_factory, "evse-din", "tcp", steps, seed, installer_max, statistics=True)


@stateful(30, extra=True)
def test_stateful_ev_cc_rtu(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Step], seed: int, installer_max: float
) -> None:
    run_example(tmp_path_factory, "ev-cc", "rtu", steps, seed, installer_max, statistics=True)


@stateful(30, extra=True)
def test_stateful_heidelberg_rtu(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Step], seed: int, installer_max: float
) -> None:
    run_example(tmp_path_factory, "heidelberg", "rtu", steps, seed, installer_max, statistics=True)


EVERY_KIND: list[Step] = [
    Charge(20.0),
    SetEv(max_current=32.0),
    Inject("overdraw", 12.0),
    Wait(8.0),
    Clear("overdraw"),
    Tag(UNKNOWN_TAG),
    Wait(1.0),
    Tag(TAG),
    Wait(2.0),
    SlowReplies(0.02),
    Inject("rcd_trip"),
    Wait(1.0),
    Clear("rcd_trip"),
    SlowReplies(0.0),
    Wait(1.0),
    Charge(32.0),
    Inject("pilot_E"),
    Wait(0.5),
    Clear("pilot_error"),
    Wait(1.0),
    Tag(TAG),
    Wait(2.0),
    Inject("welded"),
    RemoteStop(),
    Wait(8.0),
    Clear("welded"),
    Drop(),
    LinkDown("refuse", 1.5),
    LinkDown("unreachable", 0.3),
    Availability(False),
    Unplug(),
    Wait(2.0),
    Availability(True),
    Inject("meter_silent"),
    Wait(6.0),
    Clear("meter_silent"),
    Inject("board_silent"),
    Wait(2.0),
    Clear("board_silent"),
    # Inert on the boards this machine runs (none drives a socket lock): the
    # lock's faults at the station are tests/test_connector_lock.py's.
    Inject("lock_fail"),
    Inject("unlock_fail"),
    Inject("refuse_zero"),
    Wait(0.5),
    Clear("lock_fail"),
    Clear("unlock_fail"),
    Clear("refuse_zero"),
    Wait(1.0),
]


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
@pytest.mark.parametrize("board", ["evse-din", "heidelberg", "ev-cc"])
def test_every_kind_of_step(
    tmp_path_factory: pytest.TempPathFactory, board: str, transport: str
) -> None:
    """A fixed sequence through every kind of step; paste a shrunk one here to debug."""
    run_example(tmp_path_factory, board, transport, EVERY_KIND, 0)


def test_steps_cover_every_fault() -> None:
    from ops.sim.model import FAULTS  # noqa: PLC0415

    injected = {s.fault for s in EVERY_KIND if isinstance(s, Inject)}
    assert {"pilot_error" if f.startswith("pilot_") else f for f in injected} == set(FAULTS)
    assert {s.fault for s in EVERY_KIND if isinstance(s, Clear)} == set(FAULTS)


# -- what the stateful test found, shrunk: regression tests (an open one would be a strict
# -- xfail, listed in KNOWN_OPEN) ---------------------------------------------------------------


def test_found_bus_lock_released_twice(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGTERM while the board was silent and the bus refused: the station died of
    ``RuntimeError: the bus is not held`` (fixed in 8cdb765).

    ``ModbusMaster._transact``: a request that failed stepped aside for an urgent
    one in its retry path (``release()``, then ``_take()``); cancelled while
    waiting to take the bus again, its ``finally`` released the bus a second
    time, which handed the bus away from its real holder (the trip lane's
    off-write) to the next waiter (two requests held the bus), and the holder's
    own release then raised.
    """
    steps: list[Step] = [Inject("board_silent"), LinkDown("refuse", 5.0)]
    run_example(tmp_path_factory, "ev-cc", "rtu", steps, 0)


def test_found_failsafe_offers_current_without_transaction(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A Heidelberg that hears nothing for ``failsafe_watchdog`` (10 s) applies its
    failsafe current, armed at start with the fallback limit (6 A) whatever the
    station is doing: an EV plugged in with no transaction (not authorized,
    the station Faulted or Unavailable) is charged at 6 A, energy on no record.
    """
    steps: list[Step] = [Inject("board_silent"), Wait(11.0), Plug("C")]
    run_example(tmp_path_factory, "heidelberg", "tcp", steps, 0, tolerate=frozenset())


def test_found_failsafe_current_latches_a_false_weld(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The same failsafe, on an idle Heidelberg with an EV plugged in: about 4 s after
    the failsafe's 6 A start flowing (the board silent for ``failsafe_watchdog``),
    the safety monitor, which has the off acknowledged since the start, judges
    the current a weld and raises WELDED: PowerSwitchFailure, latched and
    persisted across restarts, so the station stays Faulted until an installer
    resets it, although no contactor welded.
    """
    steps: list[Step] = [Plug("C"), Inject("board_silent"), Wait(16.0)]
    tolerate = frozenset({FAILSAFE_WITHOUT_TX})
    run_example(tmp_path_factory, "heidelberg", "tcp", steps, 0, tolerate=tolerate)


def test_found_faulted_reported_late_while_a_start_waits_for_the_meter(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The bus stops answering (replies slower than the request timeout) and a tag
    starts a transaction: the station loop waits in ``_begin`` for its fresh meter
    reading, on the bus, so the BOARD_SILENT verdict (whose off-write the trip
    lane did send) is reported as Faulted only once that read gives up: up to
    2.7 s after the board's last answer on RTU instead of ``board_timeout``
    (1 s); the transaction's own status waits as long. ``_begin`` also waits, on
    the loop, for the previous transaction's end, which waits up to
    ``board_timeout`` for a silent board's off acknowledgement: a tag right after
    a stop does the same (``test_found_faulted_reported_late_after_a_quick_restart``).
    """
    steps: list[Step] = [Plug("C"), Wait(1.0), SlowReplies(DEAD_DELAY), Tag(TAG), Wait(3.0)]
    run_example(tmp_path_factory, "evse-din", "rtu", steps, 0, tolerate=frozenset())


def test_found_cable_limit_ignored_after_a_pilot_error(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A 20 A cable plugged in while the pilot read E: once the pilot error
    cleared, the transaction was offered 32 A, for the whole session (fixed in
    73d2733: a pilot change recomputes the offer).

    The board poller asked for a new limit only when the cable value changed,
    and ``limit_inputs`` takes the cable only while the connector counts as
    plugged (pilot B/C/D). The cable was first seen with the pilot at E, so it
    was ignored, and the pilot's later change to B asked for no new limit. A
    socket outlet reads the cable's PP before the car is connected (pilot A), so
    the ordinary plug-in order could do the same (the simulator reports the
    cable only with the EV, hence the pilot error here).
    """
    steps: list[Step] = [
        Inject("pilot_E"),
        Plug("C", 20.0),
        Wait(0.5),
        Clear("pilot_error"),
        Wait(0.5),
        Tag(TAG),
        Wait(1.0),
    ]
    run_example(tmp_path_factory, "evse-din", "tcp", steps, 0)


def test_found_transaction_end_abandoned_after_a_board_silence(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The board went silent while charging (EV-CC or Heidelberg over RTU): the
    transaction's end was never written, and once the board answered again
    every later session failed (Faulted, InternalError: "transaction 1 is still
    running there") until a restart; its StopTransaction was queued only at
    shutdown (fixed in 3ef70d8: only the waits are bounded, not the commit).

    ``_write_end`` waited up to ``board_timeout`` for the off acknowledgement,
    then for a fresh meter reading, all under one ``END_DEADLINE`` (5 s) scope.
    The trip lane's urgent off-writes to the silent board (two 0.5 s attempts, a
    0.2 s pause, again) and the board poller's timeouts left the meter's
    requests a slot now and then, the reading did not complete in time, and the
    scope's deadline cancelled the store commit along with it.
    """
    steps: list[Step] = [Charge(20.0, 0.5), Inject("board_silent"), Wait(9.0)]
    run_example(tmp_path_factory, "ev-cc", "rtu", steps, 0)


def test_found_faulted_reported_late_after_a_quick_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The board goes silent while charging; the card ends the session and, at once,
    starts the next: ``_begin`` waits on the station loop for the first
    transaction's end, which waits ``board_timeout`` for the off acknowledgement
    that cannot come, so BOARD_SILENT is reported as Faulted late (and the
    connector shows Charging meanwhile).
    """
    steps: list[Step] = [Charge(13.0, 0.5), Inject("board_silent"), Tag(TAG), Wait(0.01), Tag(TAG)]
    steps += [Wait(1.0)]
    run_example(tmp_path_factory, "ev-cc", "tcp", steps, 0, tolerate=frozenset())
