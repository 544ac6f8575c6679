"""The connector, the safety monitor and the limit arbitration together, stateful.

Hypothesis drives random sequences of what the world does to a station (an
EV plugging in, asking for charge and pausing, pilot errors, board fault
flags, bus silences, an EV drawing more than offered, a contactor welding,
cards, reservations, stop requests, limit and availability changes, timers,
restarts) and feeds them to the *pure* objects, composed the way
``evse/station.py`` composes them:

* every event goes through ``Connector.handle`` and its effects are carried
  out in order, as ``Station._execute`` does: ``SetCurrent`` is reported to
  the ``SafetyMonitor`` (``command``, then ``command_written`` once the fake
  board has it), timers are kept, the last ``StatusChanged`` is what the
  central system was told;
* the fake board reports the EV's pilot (only changes, as the poller does)
  and its fault flags (through ``station.BOARD_FAULTS``; PILOT comes with
  E/F, as the EV-CC and Heidelberg tables report it), and its contactor
  follows the simulator's physics: closed only in C/D with an offer of at
  least 6 A, unless it welded (then it stays closed);
* the fake meter integrates energy and reports the EV's current: an EV that
  obeys draws at most the offer, an unruly one draws above offer + margin
  (and keeps drawing with no offer at all);
* ``SafetyMonitor.check`` runs after every step and every tick of simulated
  time (the station runs it every 50 ms), its changes fed to the connector as
  events, and the physical invariants are checked after each tick too;
* limits come from ``evse.limits.arbitrate`` over random inputs and reach the
  connector only when the amps change (``Station._recompute_limit``);
* ``Authorized`` is sent only when the state accepts it
  (``Station.present_id_tag``), reservations only as ``Station.reserve`` and
  ``Station.cancel_reservation`` send them; free charging authorizes on
  plug-in (``Station._handle``); everything else is always sent, so an
  ``IllegalTransition`` fails the test.

Each run enables a random subset of the kinds of trouble (swarm testing), so
that some runs charge for long with one kind of trouble and others mix them
all. The invariants are the safety rules of ``evse/connector.py``'s docstring
and their physical consequences.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from evse.connector import (
    CONNECTION_TIMER,
    RESERVATION_TIMER,
    TRANSITIONS,
    Authorized,
    AvailabilityChanged,
    BeginTransaction,
    CancelTimer,
    Connector,
    Effect,
    EndTransaction,
    ErrorCode,
    Event,
    Fault,
    FaultCleared,
    FaultRaised,
    LimitChanged,
    MeterSample,
    PilotChanged,
    ReservationCancelled,
    ReservationMade,
    ResetFaults,
    SetCurrent,
    Snapshot,
    StartTimer,
    State,
    Status,
    StatusChanged,
    StopReason,
    StopRequested,
    TimerExpired,
)
from evse.limits import MIN_CURRENT, CentralSystem, Limit, LimitInputs, arbitrate
from evse.safety import SafetyMonitor, SafetySettings
from evse.station import BOARD_FAULTS
from fieldbus.boards import BoardFault
from fieldbus.boards import PilotState as P

SAFETY = SafetySettings(
    board_timeout=1.0,
    meter_timeout=5.0,
    overcurrent_margin=2.0,
    overcurrent_time=5.0,
    welded_time=1.0,
)
PHASES = 3
VOLTS = 230.0
#: Accepted tags and their parents (IdTagInfo.parentIdTag).
PARENTS: dict[str, str | None] = {"TAG1": "GROUP", "TAG2": "GROUP", "TAG3": None}
TAGS = tuple(PARENTS)
FREE_TAG = "FREE"
CHARGING_PILOTS = (P.C, P.D)
ERROR_PILOTS = (P.E, P.F)
#: Board flags that come and go on their own (PILOT comes with pilot E/F).
FLAGS = tuple(f for f in BoardFault if f is not BoardFault.PILOT)
RESTARTS = frozenset(
    {StopReason.HARD_RESET, StopReason.SOFT_RESET, StopReason.REBOOT, StopReason.POWER_LOSS}
)
#: The kinds of trouble a run may enable.
TROUBLE = (
    "pilot_errors",
    "board_faults",
    "other_sources",
    "stops",
    "silences",
    "welds",
    "unruly_ev",
    "availability",
    "reservations",
    "late_timers",
)

amps = st.one_of(
    st.sampled_from([0.0, 5.9, 6.0, 10.0, 13.0, 16.0, 32.0]),
    st.floats(min_value=0.0, max_value=80.0, allow_nan=False),
)

limit_inputs = st.builds(
    LimitInputs,
    hardware_max=st.one_of(st.sampled_from([16.0, 32.0]), amps),
    installer_max=st.one_of(st.sampled_from([16.0, 32.0]), amps),
    fallback=st.one_of(st.sampled_from([0.0, 6.0, 8.0]), amps),
    cable=st.one_of(st.none(), st.sampled_from([13.0, 20.0, 32.0, 63.0])),
    smart_charging=st.one_of(st.none(), amps),
    central_system=st.sampled_from(CentralSystem),
)

#: A station as installed: hardware and installer maxima, maybe a cable, no schedule.
installed = st.builds(
    LimitInputs,
    hardware_max=st.sampled_from([16.0, 32.0]),
    installer_max=st.sampled_from([10.0, 16.0, 32.0]),
    fallback=st.sampled_from([0.0, 6.0, 8.0]),
    cable=st.one_of(st.none(), st.sampled_from([13.0, 20.0, 32.0])),
    central_system=st.sampled_from([CentralSystem.NOT_CONFIGURED, CentralSystem.ONLINE]),
)

durations = st.one_of(
    st.sampled_from([0.05, 0.5, 1.0, 1.5, 4.0, 5.0, 6.0]),
    st.floats(min_value=0.01, max_value=10.0, allow_nan=False),
)


def applicable_limits(inputs: LimitInputs) -> list[float]:
    """Every limit that binds, independently of ``arbitrate``."""
    limits = [inputs.hardware_max, inputs.installer_max]
    if inputs.cable is not None:
        limits.append(inputs.cable)
    if inputs.smart_charging is not None:
        limits.append(inputs.smart_charging)
    # Offline the fallback binds too, unless the running transaction's own
    # TxProfile gives its limit (evse/limits.py, issue 8).
    tx_profile_limit = inputs.tx_profile and inputs.smart_charging is not None
    if inputs.central_system is CentralSystem.OFFLINE and not tx_profile_limit:
        limits.append(inputs.fallback)
    return limits


def expected_limit(inputs: LimitInputs) -> float:
    """The lowest limit that binds; below 6 A, 0 (IEC 61851-1 table A.8)."""
    lowest = min(applicable_limits(inputs))
    return lowest if lowest >= MIN_CURRENT else 0.0


def enabled(kind: str) -> Callable[[StationModel], bool]:
    """A precondition: this run's swarm includes ``kind``."""
    return lambda self: kind in self.swarm


class StationModel(RuleBasedStateMachine):
    """The pure objects, and a fake board, meter, EV and station loop around them."""

    def __init__(self) -> None:
        super().__init__()
        self.swarm: frozenset[str] = frozenset(TROUBLE)
        self.now = 0.0
        self.connection_timeout = 120.0
        self.connector = Connector(connection_timeout=self.connection_timeout)
        self.monitor = SafetyMonitor(SAFETY, now=self.now)
        # The station's own records.
        self.free_tag: str | None = None
        self.limit_inputs = LimitInputs(hardware_max=32.0, installer_max=32.0, fallback=6.0)
        self.limit = Limit(0.0, "starting")
        self.commanded = 0.0
        self.tx_tag: str | None = None
        self.reported: tuple[Status, ErrorCode] | None = None
        self.timers: dict[str, float] = {}
        self.welded_latched = False
        self.persisted_latched = False
        self.persisted_operative = True
        # What the board poller last passed on (None: nothing yet, as after a start).
        self.seen_pilot: P | None = None
        self.seen_faults: set[Fault] = set()
        #: Faults raised by sources the model does not otherwise know.
        self.elsewhere: set[Fault] = set()
        # The world: EV, board, contactor, meter, buses.
        self.pilot = P.A
        self.board_flags: set[BoardFault] = set()
        self.board_offered = 0.0
        self.feedback = True
        self.contactor = False
        self.welded = False
        self.weld_on_close = False
        self.ev_demand = 16.0
        #: None: the EV keeps to the offer; else it draws this much above offer + margin.
        self.ev_excess: float | None = None
        self.energy_wh = 1000.0
        self.board_alive = True
        self.meter_alive = True
        self.over_since: float | None = None

    # -- the station's loop, mirrored -------------------------------------------------

    def startup(self) -> None:
        """``Station.run`` / ``_startup``: a fresh connector and monitor."""
        self.connector = Connector(connection_timeout=self.connection_timeout)
        self.monitor = SafetyMonitor(SAFETY, now=self.now)
        self.tx_tag = None  # a running one is ended as PowerLoss by the store
        self.reported = None
        self.timers = {}
        self.welded_latched = False
        self.seen_pilot = None
        self.seen_faults = set()
        self.elsewhere = set()
        self.over_since = None
        self.execute(self.connector.start())
        if self.persisted_latched:
            self.handle(FaultRaised(Fault.WELDED, "latched before the restart"))
        if not self.persisted_operative:
            self.handle(AvailabilityChanged(False))
        self.limit = Limit(0.0, "starting")
        self.recompute_limit()

    def handle(self, event: Event) -> None:
        """``Station._handle``."""
        before = self.connector.snapshot
        effects = self.connector.handle(event, self.now)
        self.check_effects(event, before, effects)
        if isinstance(event, FaultRaised) and event.fault is Fault.WELDED:
            self.welded_latched = True
        if isinstance(event, ResetFaults):
            self.welded_latched = False
        self.execute(effects)
        if isinstance(event, FaultRaised) and event.fault is Fault.WELDED:
            self.persisted_latched = Fault.WELDED in self.connector.snapshot.faults
        if (
            isinstance(event, PilotChanged)
            and self.free_tag is not None
            and self.connector.state is State.PLUGGED
        ):
            self.handle(Authorized(self.free_tag))

    def execute(self, effects: list[Effect]) -> None:
        """``Station._execute``, with the fake board and the safety monitor."""
        for effect in effects:
            match effect:
                case SetCurrent(amps=a):
                    self.monitor.command(self.now, a)
                    self.commanded = a
                    self.board_offered = a
                    self.monitor.command_written(self.now, a)
                    self.update_contactor()
                case BeginTransaction(id_tag=tag, meter_start_wh=start):
                    # Invariant 3: never two begins without an end.
                    assert self.tx_tag is None, "BeginTransaction while one is running"
                    # A transaction needs its meterStart, the latest reading.
                    assert isinstance(start, float), start
                    assert start == self.connector.snapshot.energy_wh
                    self.tx_tag = tag
                case EndTransaction():
                    assert self.tx_tag is not None, "EndTransaction without a transaction"
                    self.tx_tag = None
                case StatusChanged(status=status, error_code=code):
                    self.reported = (status, code)
                case StartTimer(name=name, deadline=deadline):
                    if name == CONNECTION_TIMER:
                        assert deadline == self.now + self.connection_timeout
                    else:
                        reservation = self.connector.snapshot.reservation
                        assert reservation is not None
                        assert (name, deadline) == (RESERVATION_TIMER, reservation.deadline)
                    self.timers[name] = deadline
                case CancelTimer(name=name):
                    self.timers.pop(name, None)

    def check_effects(self, event: Event, before: Snapshot, effects: list[Effect]) -> None:
        """Invariants 2 and 3, on each effect list as the connector returns it."""
        after = self.connector.snapshot
        currents = [(i, e.amps) for i, e in enumerate(effects) if isinstance(e, SetCurrent)]
        ends = [i for i, e in enumerate(effects) if isinstance(e, EndTransaction)]
        begins = [i for i, e in enumerate(effects) if isinstance(e, BeginTransaction)]
        # 2. A fault (sent, or raised by the machine itself: pilot E/F, no meter
        # reading at a start) switches off first, or the current was and stays 0.
        if isinstance(event, FaultRaised) or set(after.faults) - set(before.faults):
            offs = [i for i, a in currents if a == 0.0]
            if offs:
                assert all(a == 0.0 for i, a in currents if i > offs[0]), effects
                assert all(i > offs[0] for i in ends), effects
            else:
                assert before.commanded == 0.0, effects
                assert not currents, effects
                assert not ends, effects
            assert after.commanded == 0.0
        # 3. Off before the stop record; the start record before any current.
        for end in ends:
            earlier = [a for i, a in currents if i < end]
            assert earlier, f"EndTransaction without SetCurrent(0) before it: {effects}"
            assert earlier[-1] == 0.0, effects
        for begin in begins:
            assert all(a == 0.0 for i, a in currents if i < begin), effects
        assert len(begins) <= 1, effects
        assert len(ends) <= 1, effects

    def update_contactor(self) -> None:
        """The board's rule: closed only in C/D with at least 6 A offered, unless welded."""
        if not self.welded:
            self.contactor = self.pilot in CHARGING_PILOTS and self.board_offered >= MIN_CURRENT
            # A contactor that welds stays closed whatever the board commands.
            self.welded = self.contactor and self.weld_on_close

    def draw(self) -> float:
        """The current the EV draws per phase (with no offer, an unruly EV still draws)."""
        if not self.contactor or self.pilot not in CHARGING_PILOTS:
            return 0.0
        if self.ev_excess is None:
            return min(self.ev_demand, self.board_offered)
        if self.board_offered == 0:
            return self.ev_demand
        return self.board_offered + SAFETY.overcurrent_margin + self.ev_excess

    def poll_board(self) -> None:
        """``Station._poll_board``: one reading, if the board answers."""
        if not self.board_alive:
            return
        self.monitor.board_reading(
            self.now, contactor_closed=self.contactor if self.feedback else None
        )
        if self.pilot is not self.seen_pilot:
            self.seen_pilot = self.pilot
            self.handle(PilotChanged(self.pilot))
        flags = self.board_flags | ({BoardFault.PILOT} if self.pilot in ERROR_PILOTS else set())
        now_faults = {BOARD_FAULTS[f] for f in flags}
        for fault in sorted(now_faults - self.seen_faults):
            self.handle(FaultRaised(fault, "reported by the board"))
        for fault in sorted(self.seen_faults - now_faults):
            self.handle(FaultCleared(fault))
        self.seen_faults = now_faults

    def poll_meter(self) -> None:
        """``Station._poll_meter``: one reading, if the meter answers."""
        if not self.meter_alive:
            return
        current = self.draw()
        self.monitor.meter_reading(self.now, [current] * PHASES)
        if self.commanded > 0 and current > self.commanded + SAFETY.overcurrent_margin:
            if self.over_since is None:
                self.over_since = self.now
        else:
            self.over_since = None
        self.handle(MeterSample(self.energy_wh))

    def safety_check(self) -> None:
        """``Station._watch_safety``: one round."""
        changes = self.monitor.check(self.now)
        # A welded contactor is never cleared by the monitor itself.
        assert FaultCleared(Fault.WELDED) not in changes
        for change in changes:
            self.handle(change)

    def recompute_limit(self) -> None:
        """``Station._recompute_limit``."""
        limit = arbitrate(self.limit_inputs)
        if limit != self.limit:
            changed = limit.amps != self.limit.amps
            self.limit = limit
            if changed:
                self.handle(LimitChanged(limit.amps))

    def fire_timers(self) -> None:
        """``Station._run_timers``: every timer whose deadline has passed."""
        for name, deadline in sorted(self.timers.items(), key=lambda item: item[1]):
            if deadline <= self.now and self.timers.get(name) == deadline:
                del self.timers[name]
                self.handle(TimerExpired(name))

    def settle(self) -> None:
        self.safety_check()

    def asserted_elsewhere(self) -> set[Fault]:
        """The faults the modelled sources (board, pilot, monitor) still assert."""
        faults = self.seen_faults | set(self.monitor.active)
        if self.seen_pilot in ERROR_PILOTS:
            faults.add(Fault.PILOT_ERROR)
        return faults

    # -- helpers for the rules -----------------------------------------------------------

    def set_pilot(self, pilot: P) -> None:
        self.pilot = pilot
        self.update_contactor()
        self.poll_board()
        self.settle()

    def authorize(self, tag: str) -> None:
        """``Station.present_id_tag`` with an accepted tag."""
        if Authorized in TRANSITIONS[self.connector.state]:
            self.handle(Authorized(tag, PARENTS.get(tag)))
        self.settle()

    def remote_start(self, tag: str) -> None:
        """``Station.remote_start``."""
        snap = self.connector.snapshot
        if snap.in_transaction or Authorized not in TRANSITIONS[self.connector.state]:
            return
        if snap.reservation is not None and not snap.reservation.claimed_by(Authorized(tag)):
            return
        self.handle(Authorized(tag))
        self.settle()

    def poll(self) -> None:
        self.poll_board()
        self.poll_meter()
        self.settle()

    def advance(self, dt: float) -> None:
        self.energy_wh += self.draw() * PHASES * VOLTS * dt / 3600.0
        self.now += dt
        self.poll()
        self.fire_timers()
        self.settle()
        self.the_hardware_is_safe()

    def clear_other_sources(self) -> None:
        """Other sources clear what they raised, if no modelled source still asserts it.

        A welded contactor's clear is sent regardless, and a stray one too when the
        connector holds it: the connector must ignore it.
        """
        asserted = self.asserted_elsewhere()
        welded = {Fault.WELDED} & set(self.connector.snapshot.faults)
        for fault in sorted(self.elsewhere | welded):
            if fault is Fault.WELDED or fault not in asserted:
                self.handle(FaultCleared(fault))
        self.elsewhere.clear()
        self.settle()

    # -- the world ----------------------------------------------------------------------

    @initialize(
        swarm=st.lists(st.booleans(), min_size=len(TROUBLE), max_size=len(TROUBLE)),
        connection_timeout=st.sampled_from([3.0, 30.0, 120.0]),
        feedback=st.booleans(),
        free=st.booleans(),
        inputs=installed,
        first_reading=st.sampled_from([True, True, True, True, False]),
    )
    def start(
        self,
        swarm: list[bool],
        connection_timeout: float,
        feedback: bool,
        free: bool,
        inputs: LimitInputs,
        first_reading: bool,
    ) -> None:
        """A station starts; the pollers may or may not have read before the first event."""
        self.swarm = frozenset(kind for kind, on in zip(TROUBLE, swarm, strict=True) if on)
        self.connection_timeout = connection_timeout
        self.feedback = feedback
        self.free_tag = FREE_TAG if free else None
        self.limit_inputs = inputs
        self.startup()
        if first_reading:
            self.poll()

    @rule(pilot=st.sampled_from([P.A, P.B, P.B, P.C, P.C, P.D]))
    def ev_pilot(self, pilot: P) -> None:
        """Plug in or out, the EV asks for charge (C/D) or pauses (B)."""
        self.set_pilot(pilot)

    @rule(tag=st.sampled_from(TAGS), pilot=st.sampled_from(CHARGING_PILOTS))
    def driver_starts_a_session(self, tag: str, pilot: P) -> None:
        """Plug in, present a card, and the EV asks for charge: the common case."""
        self.poll()
        if self.pilot is P.A:
            self.set_pilot(P.B)
        self.authorize(tag)
        self.set_pilot(pilot)

    @rule(tag=st.sampled_from([*TAGS, "same"]), remote=st.booleans())
    def present_id_tag(self, tag: str, remote: bool) -> None:
        """A card (accepted ones, the running transaction's again, another one), or a
        RemoteStartTransaction."""
        if tag == "same":
            tag = self.connector.snapshot.id_tag or TAGS[0]
        if remote:
            self.remote_start(tag)
        else:
            self.authorize(tag)

    @rule(demand=st.sampled_from([0.0, 6.0, 16.0, 40.0]))
    def ev_load(self, demand: float) -> None:
        """What the EV wants."""
        self.ev_demand = demand

    @rule(dt=st.one_of(st.none(), durations))
    def time_passes(self, dt: float | None) -> None:
        """The pollers read (None: at once), the monitor and the timers follow."""
        if dt is None:
            self.poll()
        else:
            self.advance(dt)

    @precondition(lambda self: bool(self.timers))
    @rule()
    def timer_expires(self) -> None:
        """Straight to the next timer's deadline (ConnectionTimeOut, reservation expiry)."""
        self.advance(max(min(self.timers.values()) - self.now, 0.0) + 0.001)

    @rule()
    def world_recovers(self) -> None:
        """Every source of trouble goes away at once (faults are rare, charging is not)."""
        self.board_flags.clear()
        self.board_alive = self.meter_alive = True
        if self.pilot in ERROR_PILOTS:
            self.pilot = P.B
        self.update_contactor()
        self.poll()
        self.clear_other_sources()

    @rule(replace_contactor=st.booleans())
    def installer_resets_faults(self, replace_contactor: bool) -> None:
        """``Station.reset_faults``, with or without a new contactor."""
        if replace_contactor:
            self.welded = self.weld_on_close = False
            self.update_contactor()
            self.poll()  # the new contactor reads open: the monitor's latch holds anyway
        self.monitor.reset_latched()
        self.handle(ResetFaults())
        assert Fault.WELDED not in self.connector.snapshot.faults
        self.persisted_latched = False
        self.settle()

    # -- trouble, enabled per run ------------------------------------------------------

    @precondition(enabled("pilot_errors"))
    @rule(pilot=st.sampled_from(ERROR_PILOTS))
    def pilot_error(self, pilot: P) -> None:
        self.set_pilot(pilot)

    @precondition(enabled("board_faults"))
    @rule(flag=st.one_of(st.none(), st.sampled_from(FLAGS)), on=st.booleans())
    def board_flag(self, flag: BoardFault | None, on: bool) -> None:
        """A board fault flag comes or goes (None: all of them go)."""
        if flag is None:
            self.board_flags.clear()
        elif on:
            self.board_flags.add(flag)
        else:
            self.board_flags.discard(flag)
        self.poll_board()
        self.settle()

    @precondition(enabled("other_sources"))
    @rule(fault=st.one_of(st.none(), st.sampled_from(Fault)))
    def another_source(self, fault: Fault | None) -> None:
        """Any fault from elsewhere (a failed board write, the store, a restored
        latch); None: that source clears what it raised."""
        if fault is None:
            self.clear_other_sources()
            return
        self.elsewhere.add(fault)
        self.handle(FaultRaised(fault, "raised elsewhere"))
        self.settle()

    @precondition(enabled("stops"))
    @rule(reason=st.sampled_from(StopReason), id_tag=st.one_of(st.none(), st.sampled_from(TAGS)))
    def stop(self, reason: StopReason, id_tag: str | None) -> None:
        """Every stop reason, in every state (the connector must accept it anywhere).

        Resets and power losses are followed by a restart: fresh objects, the
        latched faults and the availability restored from the store.
        """
        self.handle(StopRequested(reason, id_tag))
        self.settle()
        if reason in RESTARTS:
            self.startup()
            self.poll()

    @precondition(enabled("silences"))
    @rule(board=st.booleans(), meter=st.booleans())
    def buses(self, board: bool, meter: bool) -> None:
        """The board or the meter stops answering, or answers again (time passing tells)."""
        self.board_alive = board
        self.meter_alive = meter

    @rule(bus=st.sampled_from(["board", "meter", "both"]), ticks=st.sampled_from([1, 2, 3, 11, 16]))
    def silence_for_a_while(self, bus: str, ticks: int) -> None:
        """A bus falls silent for ticks x 0.5 s while time passes, then answers again."""
        self.board_alive = bus == "meter"
        self.meter_alive = bus == "board"
        for _ in range(ticks):
            self.advance(0.5)
        self.board_alive = self.meter_alive = True
        self.poll()

    @precondition(enabled("welds"))
    @rule()
    def contactor_welds(self) -> None:
        """Its contacts weld: now if closed, else the next time it closes."""
        self.weld_on_close = True
        self.update_contactor()

    @precondition(enabled("unruly_ev"))
    @rule(excess=st.one_of(st.none(), st.sampled_from([0.0, 0.5, 8.0])), seconds=st.integers(0, 8))
    def ev_ignores_the_offer(self, excess: float | None, seconds: int) -> None:
        """From now on the EV draws above offer + margin (0: exactly at the margin;
        None: it behaves again); then ``seconds`` go by."""
        self.ev_excess = excess
        self.poll()
        self.charging_goes_on(seconds)

    @rule(seconds=st.integers(1, 8))
    def charging_goes_on(self, seconds: int) -> None:
        """Time passes in 1 s steps, the pollers reading each time."""
        for _ in range(seconds):
            self.advance(1.0)

    @precondition(enabled("availability"))
    @rule(operative=st.sampled_from([True, True, False]))
    def change_availability(self, operative: bool) -> None:
        """``Station.set_availability``."""
        self.persisted_operative = operative
        self.handle(AvailabilityChanged(operative))
        self.settle()

    @precondition(enabled("reservations"))
    @rule(
        reservation_id=st.sampled_from([1, 2]),
        tag=st.sampled_from(TAGS),
        parent=st.sampled_from([None, "GROUP"]),
        left=st.sampled_from([-1.0, 2.0, 10.0, 60.0]),
    )
    def reserve(self, reservation_id: int, tag: str, parent: str | None, left: float) -> None:
        """``Station.reserve``: its answers decide what reaches the connector."""
        state = self.connector.state
        held = self.connector.snapshot.reservation
        if state in (State.FAULTED, State.UNAVAILABLE):
            return
        if state is State.RESERVED and held is not None:
            if held.reservation_id != reservation_id:
                return
            # The same id again: ReservationMade replaces it (EV plugged in or not).
        elif state is not State.IDLE:
            return
        if left > 0:
            self.handle(ReservationMade(reservation_id, tag, self.now + left, parent))
        self.settle()

    @precondition(enabled("reservations"))
    @rule(held=st.sampled_from([True, True, False]))
    def cancel_reservation(self, held: bool) -> None:
        """``Station.cancel_reservation``: the one held, or one that is not."""
        reservation = self.connector.snapshot.reservation
        reservation_id = 1 if reservation is None else reservation.reservation_id
        if not held:
            reservation_id += 1
        if reservation is not None and reservation.reservation_id == reservation_id:
            self.handle(ReservationCancelled(reservation_id))
        self.settle()

    @rule(every=st.sampled_from([1.0, 2.0, 4.0]), times=st.integers(2, 8))
    def central_link_flaps(self, every: float, times: int) -> None:
        """The central system's link drops and comes back every few seconds, so the
        fallback limit comes and goes (or a schedule changes as often)."""
        for _ in range(times):
            online = self.limit_inputs.central_system is CentralSystem.ONLINE
            link = CentralSystem.OFFLINE if online else CentralSystem.ONLINE
            self.limit_inputs = replace(self.limit_inputs, central_system=link)
            self.recompute_limit()
            self.settle()
            self.advance(every)

    @rule(inputs=limit_inputs)
    def limit_inputs_change(self, inputs: LimitInputs) -> None:
        """Cable, schedule, central system online or offline (fallback) ..."""
        self.limit_inputs = inputs
        self.recompute_limit()
        self.settle()

    @precondition(enabled("late_timers"))
    @rule(name=st.sampled_from([CONNECTION_TIMER, RESERVATION_TIMER, "other"]))
    def late_timer(self, name: str) -> None:
        """A TimerExpired already in the channel when its timer was cancelled."""
        self.handle(TimerExpired(name))
        self.settle()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def current_only_in_a_clean_transaction(self) -> None:
        """1. > 0 only in a transaction, authorized, no fault, limit >= 6; <= the limit."""
        snap = self.connector.snapshot
        assert snap.commanded == self.commanded == self.monitor.commanded
        assert snap.limit == self.limit.amps
        assert self.commanded <= self.limit.amps
        # The arbitration, checked against its specification.
        assert self.limit.amps == expected_limit(self.limit_inputs)
        assert all(self.commanded <= limit for limit in applicable_limits(self.limit_inputs))
        if self.commanded > 0:
            assert self.tx_tag is not None
            assert snap.id_tag == self.tx_tag
            assert not snap.faults
            assert snap.limit >= MIN_CURRENT
            assert self.limit.amps >= MIN_CURRENT

    @invariant()
    def transactions_alternate(self) -> None:
        """3. the station's record and the machine agree on a running transaction."""
        snap = self.connector.snapshot
        assert (self.tx_tag is not None) == snap.in_transaction
        # StopTransactionOnEVSideDisconnect: no transaction without an EV.
        if snap.pilot is P.A:
            assert not snap.in_transaction

    @invariant()
    def faults_mean_faulted(self) -> None:
        """4. any fault -> Faulted; a welded contactor stays until ResetFaults."""
        snap = self.connector.snapshot
        assert bool(snap.faults) == (self.connector.status is Status.FAULTED)
        assert (Fault.WELDED in snap.faults) == self.welded_latched
        # IEC 61851-1 A.3: pilot E/F is an error in every state.
        if snap.pilot in ERROR_PILOTS:
            assert Fault.PILOT_ERROR in snap.faults

    @invariant()
    def reported_status_is_the_status(self) -> None:
        """6. what the central system was told last is the connector's status."""
        assert self.reported == (self.connector.status, self.connector.error_code)

    @invariant()
    def waits_end_by_a_timer(self) -> None:
        """An authorization waits for the EV, a reservation for its tag, never forever."""
        snap = self.connector.snapshot
        if snap.state is State.AUTHORIZED:
            assert CONNECTION_TIMER in self.timers
        assert (snap.state is State.RESERVED) == (snap.reservation is not None)
        assert (snap.state is State.RESERVED) == (RESERVATION_TIMER in self.timers)
        if snap.reservation is not None:
            assert self.timers.get(RESERVATION_TIMER) == snap.reservation.deadline

    @invariant()
    def the_hardware_is_safe(self) -> None:  # also after each tick of time
        """The physical consequences, after the monitor has had its round."""
        # A contactor that is not welded is closed only with an offer.
        if self.contactor and not self.welded:
            assert self.commanded >= MIN_CURRENT
        # Silence switches off.
        if self.now - self.monitor.board_seen > SAFETY.board_timeout:
            assert self.commanded == 0.0
        if self.now - self.monitor.meter_seen > SAFETY.meter_timeout:
            assert self.commanded == 0.0
        # Over-current (every reading above offer + margin) is never tolerated
        # for the whole allowance, however often the offer changes meanwhile
        # (with no offer, a current is the welded check's business).
        if self.over_since is not None and self.commanded > 0:
            assert self.now - self.over_since < SAFETY.overcurrent_time


def test_a_start_before_the_first_meter_reading_does_not_fault_for_ever() -> None:
    # Free charging, EV plugged in at boot: the board's first reading (and the
    # authorization that follows it at once) beats the meter's first reading.
    connector = Connector()
    monitor = SafetyMonitor(SAFETY, now=0.0)
    connector.start()
    connector.handle(LimitChanged(16.0), 0.0)
    connector.handle(PilotChanged(P.B), 0.1)
    connector.handle(Authorized(FREE_TAG), 0.1)
    # The start waits for the first reading instead of faulting.
    assert not connector.snapshot.faults
    # Then both answer, every second, for a minute.
    for second in range(1, 61):
        now = float(second)
        monitor.board_reading(now, contactor_closed=False)
        monitor.meter_reading(now, [0.0] * PHASES)
        connector.handle(MeterSample(1000.0), now)
        for change in monitor.check(now):
            connector.handle(change, now)
    connector.handle(ResetFaults(), 61.0)
    # No source asserts a fault: none is kept, and the transaction runs.
    assert not monitor.active
    assert Fault.METER_SILENT not in connector.snapshot.faults
    assert connector.snapshot.in_transaction


def test_an_offer_that_keeps_changing_does_not_hide_an_over_current() -> None:
    monitor = SafetyMonitor(SAFETY, now=0.0)
    raised: list[Fault] = []
    offer = 16.0
    for second in range(121):
        now = float(second)
        if second and second % 4 == 0:
            # The offer alternates between 16 and 20 A every 4 s (a flapping
            # central-system link with its fallback, a schedule, a cable reading).
            offer = 20.0 if offer == 16.0 else 16.0
        monitor.command(now, offer)
        monitor.command_written(now, offer)
        monitor.board_reading(now, contactor_closed=True)
        monitor.meter_reading(now, [40.0] * PHASES)  # twice the offer, for two minutes
        raised += [c.fault for c in monitor.check(now) if isinstance(c, FaultRaised)]
    assert Fault.OVER_CURRENT in raised


def test_a_held_start_that_lapses_leaves_the_ev_preparing() -> None:
    connector = Connector(connection_timeout=3.0)
    connector.start()
    connector.handle(LimitChanged(16.0), 0.0)
    connector.handle(PilotChanged(P.B), 0.1)
    connector.handle(Authorized(FREE_TAG), 0.1)
    assert connector.state is State.AUTHORIZED  # held: no meter reading yet
    connector.handle(TimerExpired(CONNECTION_TIMER), 3.1)
    # The authorization lapsed, but the EV is still plugged in: Preparing, not Available.
    assert connector.status is Status.PREPARING


def test_connector_safety_monitor_and_limits_stateful() -> None:
    run_state_machine_as_test(
        StationModel,
        # EVSE_CONNECTOR_EXAMPLES: fewer in the quick lane (noxfile.py), all in the suite.
        settings=settings(
            max_examples=int(os.environ.get("EVSE_CONNECTOR_EXAMPLES", "300")),
            stateful_step_count=50,
            deadline=None,
        ),
    )
