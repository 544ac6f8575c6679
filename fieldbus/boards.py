"""EVSE controller / contactor boards: one table per model, one driver.

The driver knows nothing of IEC 61851 sessions (EVerest's EvseManager split):
it reports the raw control-pilot state A..F, the cable (PP) limit, the
offered current, the relay drive or the contactor's auxiliary-contact
feedback and the fault flags where the board has them, and executes "allow
this current" (0 = off), enable/disable and "arm the hardware failsafe". What
a model can do is explicit in ``BoardCapabilities``, so the charging core asks
instead of guessing.

Each field is named for what the device actually gives (docs/device-maps.md,
"What each safety decision relies on"): *feedback* is only a reading of an
auxiliary contact of the contactor; a bit that says what the board drives its
relay to is ``relay_on``, which says nothing about whether the contacts opened;
registers the station writes itself (current, enable) read back as commands
the board holds, not as measured states.

A poll reads only what a safety decision rests on every time (``SAFETY_FIELDS``:
pilot, fault flags, contactor feedback, cable limit, and whatever read-back
shares their requests); a read-back that needs a request of its own (the
Heidelberg's HR 261, the EV-CC's HR 528 and coil 400) is read every
``READBACK_EVERY``-th poll (``BoardModel.poll_plan``, ``Board.read_readbacks``):
on a 9600-baud line each such request holds the bus ~20 ms, which an off-write
would otherwise wait behind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import trio

from fieldbus.devices import FieldReader, write_field
from fieldbus.errors import DeviceDataError, Unsupported
from fieldbus.master import ModbusMaster, Wanted
from fieldbus.registers import Block, DType, Field, Table, decode_fields, plan_reads

# Re-exported: the pilot state and fault flags live in fieldbus.signals (no
# trio, no pymodbus) so the sans-I/O charging core can import them.
from fieldbus.signals import BoardFault as BoardFault  # noqa: PLC0414
from fieldbus.signals import PilotState as PilotState  # noqa: PLC0414

#: The status fields a safety decision rests on (evse/station.py, evse/safety.py):
#: read on every poll. The pilot and the fault flags switch off; contactor
#: feedback judges a weld (``SafetyMonitor.board_reading``); the cable (PP)
#: limit bounds the offer at the plug-in itself (``Station.limit_inputs``), so
#: it must never lag the pilot change.
SAFETY_FIELDS = frozenset({"pilot", "faults", "contactor", "cable_limit"})

#: A read-back block that is not part of a safety request (the current command,
#: the enable switch, the offer and relay drive where they sit apart) is read on
#: every READBACK_EVERY-th poll only: 1 s at the default 0.1 s board poll. Its
#: fields in ``BoardStatus`` are then up to READBACK_EVERY polls older than the
#: safety fields (``BoardStatus.readback_at``); no decision of the station uses
#: them. 10 keeps their share of a 9600-baud line at ~2 % (one ~20 ms request a
#: second each) while an operator still sees a command within about a second.
READBACK_EVERY = 10

#: Planning of one poll: fields of one table this close (unused registers
#: between them) share a request, as for the meters. A read-back that falls
#: within a safety request this way is read with it on every poll: registers
#: cost ~2 ms each at 9600 baud, a request of its own ~20 ms (and on the EVSE
#: DIN another 100 ms request gap), so riding along is the cheaper way.
POLL_MAX_GAP = 8


@dataclass(frozen=True, slots=True)
class PollPlan:
    """The requests of a board's status poll (``BoardModel.poll_plan``)."""

    #: Read on every poll: each holds at least one of SAFETY_FIELDS.
    every_poll: tuple[Block, ...]
    #: Read-backs only: block i is read on the polls where ``n % every == i % every``.
    readbacks: tuple[Block, ...]
    every: int = READBACK_EVERY

    @property
    def every_poll_fields(self) -> frozenset[str]:
        return frozenset(n for b in self.every_poll for n in b.names)


@dataclass(frozen=True, slots=True)
class Bit:
    """A flag: bit ``bit`` of a register field (0 for a coil / discrete input)."""

    field: Field
    bit: int = 0
    #: The flag reads as "true" when the bit is set.
    active_high: bool = True


class LockError(StrEnum):
    """What a board's own lock detection reports about the socket's lock actuator
    (``BoardStatus.lock_errors``; docs/device-maps.md 6b)."""

    #: The lock did not engage (the board's lock detection does not read "locked").
    LOCKING = "locking_error"
    #: The lock did not release.
    UNLOCKING = "unlocking_error"
    #: The lock detection input gave no reading while locking: the lock is not confirmed.
    NO_DETECTION = "lock_detection_unavailable"


#: Lock errors that mean the lock is not (or no longer) engaged.
NOT_LOCKED = frozenset({LockError.LOCKING, LockError.NO_DETECTION})


@dataclass(frozen=True, slots=True)
class BoardCapabilities:
    failsafe: bool
    #: The board reads an auxiliary contact of the contactor (the physical state).
    contactor_feedback: bool
    #: The board reports what it drives its relay / contactor coil to (not the contacts).
    relay_drive: bool
    fault_flags: bool
    cable_limit: bool
    offered_current: bool
    enable_switch: bool
    #: An off must also disable the board (see BoardModel.stop_by_disable).
    stop_by_disable: bool
    #: Smallest step of the current command, in A.
    current_step: float
    #: IEC 61851-1: 6 A is the lowest PWM duty a vehicle must accept.
    min_current: float
    max_current: float
    #: The station drives the socket's lock actuator (``Board.set_lock``) and the
    #: board reports the outcome of its own lock detection (``BoardStatus.lock_errors``).
    lock: bool = False


@dataclass(frozen=True, slots=True)
class BoardModel:
    kind: str
    title: str
    pilot: Field
    #: Raw pilot register value -> state. Unlisted values are a DeviceDataError.
    pilot_codes: Mapping[int, PilotState]
    #: Current command register; its scale is A per raw unit; 0 = charging off.
    current_command: Field
    max_current: float
    min_current: float = 6.0
    current_step: float = 1.0
    #: Raw pilot values that are also a fault (e.g. "failure" states).
    pilot_faults: Mapping[int, BoardFault] = field(default_factory=dict)
    cable_limit: Field | None = None
    offered: Field | None = None
    #: Contactor feedback: ONLY a reading of an auxiliary contact (the physical
    #: state, which shows a welded contactor). A drive bit is ``relay``.
    contactor: Bit | None = None
    #: The relay / contactor-coil drive state the board commands. It does not
    #: show a welded contactor (the coil is off, the contacts stay closed).
    relay: Bit | None = None
    #: The enable switch, a register the station writes: reading it back gives
    #: the command the board holds, not a measured state.
    enable: Bit | None = None
    #: Fault register and the meaning of its bits.
    faults: Field | None = None
    fault_bits: Mapping[int, BoardFault] = field(default_factory=dict)
    #: The socket's lock actuator command (1 = locked), a register the station
    #: writes: its read-back is the command the board holds, not the lock's state.
    lock: Bit | None = None
    #: Bits of ``faults`` in which the board's own lock detection reports a lock
    #: that did not engage or release. Without them a lock is not declared.
    lock_error_bits: Mapping[int, LockError] = field(default_factory=dict)
    #: Hardware failsafe: watchdog timeout (scale: seconds per raw unit) and
    #: the current applied when it expires (scale: A per raw unit).
    failsafe_timeout: Field | None = None
    failsafe_current: Field | None = None
    #: Writes made once when the driver starts (e.g. Heidelberg: standby off).
    init_writes: tuple[tuple[Field, float], ...] = ()
    #: Write single registers with function 16 (device lacks function 06).
    write_multiple: bool = False
    #: Pause the bus this long between requests (slow device firmware).
    request_gap: float = 0.0
    #: Current 0 is not a confirmed stop on this model: every off also disables
    #: it (enable switch off), and a current above 0 enables it again first.
    stop_by_disable: bool = False
    default_unit: int = 1
    notes: str = ""

    @property
    def capabilities(self) -> BoardCapabilities:
        return BoardCapabilities(
            failsafe=self.failsafe_timeout is not None and self.failsafe_current is not None,
            contactor_feedback=self.contactor is not None,
            relay_drive=self.relay is not None,
            fault_flags=self.faults is not None or bool(self.pilot_faults),
            cable_limit=self.cable_limit is not None,
            offered_current=self.offered is not None,
            enable_switch=self.enable is not None,
            stop_by_disable=self.stop_by_disable and self.enable is not None,
            current_step=self.current_step,
            min_current=self.min_current,
            max_current=self.max_current,
            lock=self.lock is not None and self.faults is not None and bool(self.lock_error_bits),
        )

    def status_fields(self) -> dict[str, Field]:
        fields = {"pilot": self.pilot, "command": self.current_command}
        optional = {
            "cable_limit": self.cable_limit,
            "offered": self.offered,
            "contactor": self.contactor.field if self.contactor else None,
            "relay": self.relay.field if self.relay else None,
            "enable": self.enable.field if self.enable else None,
            "faults": self.faults,
            "lock": self.lock.field if self.lock else None,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields

    def poll_plan(self) -> PollPlan:
        """Which status requests go out on every poll, and which every READBACK_EVERY-th.

        The status fields are planned into as few requests as usual; a request
        holding any of SAFETY_FIELDS is read on every poll (with whatever else
        it holds), the others are read-backs.
        """
        blocks = plan_reads(self.status_fields(), max_count=125, max_gap=POLL_MAX_GAP)
        every = tuple(b for b in blocks if SAFETY_FIELDS.intersection(b.names))
        rest = tuple(b for b in blocks if not SAFETY_FIELDS.intersection(b.names))
        return PollPlan(every, rest, max(READBACK_EVERY, len(rest)))


@dataclass(frozen=True, slots=True)
class BoardStatus:
    pilot: PilotState
    #: Cable (PP) current limit in A; None where the board has no PP input.
    cable_limit_a: float | None
    #: Current offered to the vehicle (PWM) in A, where the board reports it.
    offered_a: float | None
    #: The current command the board holds, in A (0 = off): a read-back of the
    #: station's own write, which shows that the board has it, not what flows.
    command_a: float
    #: Auxiliary-contact feedback (the contacts themselves); None where the
    #: board has none. Only this can show a welded contactor directly.
    contactor_closed: bool | None
    #: The relay drive the board reports (coil energised); None where it has
    #: none. Not feedback: it reads off while welded contacts stay closed.
    relay_on: bool | None
    #: The enable command the board holds (a read-back of the station's write).
    enabled: bool | None
    faults: frozenset[BoardFault]
    #: trio clock when the safety fields (pilot, faults, contactor, cable limit)
    #: were read: every poll.
    read_at: float
    timestamp: datetime = field(compare=False)
    #: trio clock of the oldest read-back in this status. ``command_a``,
    #: ``enabled``, ``offered_a`` and ``relay_on`` keep the value of their last
    #: read where their register needs a request of its own (READBACK_EVERY):
    #: the Heidelberg's ``command_a`` (HR 261), the EV-CC's ``command_a`` (HR 528)
    #: and ``enabled`` (coil 400) can be up to READBACK_EVERY polls old; the
    #: EVSE DIN reads them all with its one status request, every poll.
    #: ``read_at`` itself where every field was read at ``read_at``.
    readback_at: float = field(default=-math.inf, compare=False)
    #: The lock command the board holds (a read-back of the station's write, as
    #: old as ``readback_at``); None where the board has no lock actuator.
    lock_commanded: bool | None = None
    #: What the board's own lock detection reports (read with the fault flags,
    #: every poll); empty where the board has none.
    lock_errors: frozenset[LockError] = frozenset()

    @property
    def lock_error(self) -> str | None:
        """The lock failure the board reports, if any (the first in LockError order)."""
        return next((e.value for e in LockError if e in self.lock_errors), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "pilot": self.pilot.value,
            "cable_limit_a": self.cable_limit_a,
            "offered_a": self.offered_a,
            "command_a": self.command_a,
            "contactor_closed": self.contactor_closed,
            "relay_on": self.relay_on,
            "enabled": self.enabled,
            "faults": sorted(f.value for f in self.faults),
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            "lock_commanded": self.lock_commanded,
            "lock_errors": sorted(e.value for e in self.lock_errors),
        }


def _flag(bit: Bit, value: float | None) -> bool | None:
    if value is None:
        return None
    is_set = bool(int(value) >> bit.bit & 1)
    return is_set if bit.active_high else not is_set


#: A line share the board's poller has not renewed for this long is void: the
#: other devices on the line go request by request again (a silent board, an
#: off-write under way, a poller that stopped). Above the longest normal
#: interval between two verdicts (EVSE DIN on RTU, an off-write and the poll
#: after it: about 0.3 s).
LINE_SHARE_STALE = 0.5
#: How late a trio timer may wake (epoll's timeout is whole milliseconds, rounded up).
TIMER_SLACK = 0.001


class LineShare:
    """The time the board's poller leaves its line to the other devices on it.

    The bus serves one request at a time, and a request on the wire cannot be
    taken back: a meter request that starts just before the board's next poll,
    or is handed the bus as the board's reply comes in (before the poller can
    have decided on it), makes the poll or the fault's off-write wait for it. So
    the station's board poller opens a share after each verdict, when no
    off-write is waiting or on its way, until its own next request
    (``Board.share_line``); the meter's poller waits (``wait``) until each of its
    requests fits into an open share. A share not renewed for LINE_SHARE_STALE
    holds nobody back.

    On a serial line each request must also wait the line's silence (t3.5)
    after the last one. The master sleeps it on a timer descriptor and waits
    the wake-up's own latency (at most ``fieldbus.timer.MAX_LEAD``, 0.3 ms) by
    yielding to the scheduler, a short busy wait per request; a request
    waiting for the share does not need that precision, so ``wait`` waits out
    the silence with trio's timer and the master finds it over.
    """

    __slots__ = ("_lot", "free_from", "opened", "until")

    def __init__(self) -> None:
        #: The share ends at this trio time (when the board's next request may go).
        self.until = -math.inf
        #: The line's silence after the board's last request ends here.
        self.free_from = -math.inf
        self.opened = -math.inf
        self._lot = trio.lowlevel.ParkingLot()

    def open(self, until: float, free_from: float = -math.inf) -> None:
        self.opened = trio.current_time()
        self.until = until
        self.free_from = free_from
        self._lot.unpark_all()

    def close(self) -> None:
        """End the share now (an off-write takes the line); a request waiting
        for it waits for the next one (or LINE_SHARE_STALE)."""
        self.until = -math.inf

    def fits(self, duration: float) -> bool:
        """Whether a request that holds the line ``duration`` s still fits now:
        the master asks once the bus is the request's (``wanted``), so one that
        had to wait for the bus, or whose share an off-write closed, is dropped
        and waits for the next share."""
        return trio.current_time() + duration <= self.until

    async def wait(self, duration: float, not_before: float = -math.inf) -> bool:
        """Until a request that holds the line ``duration`` s, sent once the
        line's silence is over (after the board's request, and ``not_before``
        after the caller's own last one), fits into an open share; returns at
        its start, True. False (go, unchecked) at once when no share was opened
        for LINE_SHARE_STALE (the master then keeps the silence itself), or at
        the next share's start when the request has not fitted for that long (a
        slow device, longer than any share: late, never starved)."""
        give_up = trio.current_time() + LINE_SHARE_STALE
        while True:
            now = trio.current_time()
            start = max(now, not_before, self.free_from)
            slack = TIMER_SLACK if start > now else 0.0
            fits = start + slack + duration <= self.until
            if fits or self.opened >= give_up:
                if start > now:
                    await trio.sleep_until(start)
                return fits
            void_at = self.opened + LINE_SHARE_STALE
            if now >= void_at:
                return False
            with trio.move_on_at(void_at):
                await self._lot.park()


class Board:
    """Driver for one board on a bus."""

    def __init__(self, master: ModbusMaster, unit: int, model: BoardModel) -> None:
        self.master = master
        self.unit = unit
        self.model = model
        self.capabilities = model.capabilities
        if model.request_gap:
            master.set_unit_gap(unit, model.request_gap)
        self._fields = model.status_fields()
        self._reader = FieldReader(master, unit, self._fields)
        self.plan = model.poll_plan()
        #: Polls so far (read_status calls that got their safety requests through).
        self._polls = 0
        #: Read-back blocks (indexes into plan.readbacks) due and not read yet: all
        #: of them until each has been read once.
        self._due: list[int] = list(range(len(self.plan.readbacks)))
        self._unread: set[int] = set(self._due)
        #: The latest value of every status field (read-backs: of their last read).
        self._values: dict[str, float | None] = {}
        self._readback_at = [-math.inf] * len(self.plan.readbacks)
        self._last: BoardStatus | None = None
        #: The poller's share of the line with the other devices on the bus.
        self.line = LineShare()

    async def initialize(self) -> None:
        """Bring the board into the state the driver expects (model's init writes)."""
        for f, value in self.model.init_writes:
            await write_field(self.master, self.unit, f, value, multiple=self.model.write_multiple)

    async def read_status(self, *, readbacks: bool = True) -> BoardStatus:
        """One poll: the safety requests (``plan.every_poll``), then, with
        ``readbacks``, the read-back requests due (``read_readbacks``).

        The station's poller passes ``readbacks=False`` and reads them itself
        once it has acted on the safety fields, so that a fault's off-write never
        waits behind a read-back. The first poll reads every read-back.
        """
        results = [(b, await self._reader.read_block(b)) for b in self.plan.every_poll]
        values = decode_fields(self._fields, results)
        read_at = trio.current_time()
        pilot, faults = self._decode_safety(values)
        self._values.update(values)
        poll, every = self._polls, self.plan.every
        self._polls += 1
        for i in range(len(self.plan.readbacks)):
            if poll % every == i % every and i not in self._due:
                self._due.append(i)
        self._last = self._compose(pilot, faults, read_at, datetime.now(UTC))
        if readbacks:
            return await self.read_readbacks() or self._last
        return self._last

    @property
    def readbacks_due(self) -> bool:
        return bool(self._due) and self._last is not None

    async def read_readbacks(self) -> BoardStatus | None:
        """Read the read-back requests due at this poll; returns the latest status
        with them (the safety fields and ``read_at`` of the last poll), or None
        when none was due (or no poll has succeeded yet).

        A request that fails is not retried before its next turn, unless it has
        never been read: until then it is due on every poll.
        """
        last = self._last
        if last is None or not self._due:
            return None
        due, self._due = self._due, []
        try:
            for i in due:
                block = self.plan.readbacks[i]
                words = await self._reader.read_block(block)
                self._values.update(decode_fields(self._fields, [(block, words)]))
                self._readback_at[i] = trio.current_time()
                self._unread.discard(i)
        finally:
            self._due.extend(i for i in sorted(self._unread) if i not in self._due)
        self._last = self._compose(last.pilot, last.faults, last.read_at, last.timestamp)
        return self._last

    def ready_at(self) -> float:
        """When the board's own request gap lets its next request go (trio time;
        -inf on a board without one): a poller should not wake before it."""
        return self.master.unit_ready_at(self.unit)

    def share_line(self, next_poll: float) -> None:
        """Leave the line to the other devices on it until this board's next
        request: the poll at ``next_poll``, or later where the board's own
        request gap holds it back, less the line's silence before it (t3.5).
        Call right after the board's last request of a poll."""
        now = trio.current_time()
        start = max(next_poll, now + self.model.request_gap)
        gap = self.master.gap
        self.line.open(start - gap, now + gap)

    def _decode_safety(
        self, values: Mapping[str, float | None]
    ) -> tuple[PilotState, frozenset[BoardFault]]:
        m = self.model
        raw_pilot = values["pilot"]
        code = None if raw_pilot is None else int(raw_pilot)
        if code is None or code not in m.pilot_codes:
            raise DeviceDataError(
                f"unknown pilot state value {code!r} from {m.title}",
                where=f"{self.master.where} unit {self.unit}",
            )
        faults: set[BoardFault] = set()
        if code in m.pilot_faults:
            faults.add(m.pilot_faults[code])
        fault_word = values.get("faults")
        if fault_word is not None:
            faults.update(f for bit, f in m.fault_bits.items() if int(fault_word) >> bit & 1)
        return m.pilot_codes[code], frozenset(faults)

    def _compose(
        self,
        pilot: PilotState,
        faults: frozenset[BoardFault],
        read_at: float,
        timestamp: datetime,
    ) -> BoardStatus:
        m, values = self.model, self._values
        return BoardStatus(
            pilot=pilot,
            cable_limit_a=values.get("cable_limit"),
            offered_a=values.get("offered"),
            command_a=values.get("command") or 0.0,
            contactor_closed=_flag(m.contactor, values.get("contactor")) if m.contactor else None,
            relay_on=_flag(m.relay, values.get("relay")) if m.relay else None,
            enabled=_flag(m.enable, values.get("enable")) if m.enable else None,
            faults=faults,
            read_at=read_at,
            timestamp=timestamp,
            readback_at=min(self._readback_at, default=read_at),
            lock_commanded=_flag(m.lock, values.get("lock")) if m.lock else None,
            lock_errors=self._lock_errors(values.get("faults")),
        )

    def command_value(self, amps: float) -> float:
        """The current the board will actually apply for a request of ``amps``.

        0 (or less) is off. Otherwise it must lie within the board's range; it
        is rounded down to the board's step, never up.
        """
        caps = self.capabilities
        if amps <= 0:
            return 0.0
        if not caps.min_current <= amps <= caps.max_current:
            raise ValueError(
                f"{amps:g} A is outside {caps.min_current:g}..{caps.max_current:g} A for "
                f"{self.model.title} (0 switches off)"
            )
        steps = math.floor(amps / caps.current_step + 1e-9)
        return steps * caps.current_step

    async def set_current(self, amps: float, *, wanted: Wanted = None) -> float:
        """Command the allowed current (0 = off); returns the value written, in A.

        Off goes to the bus master as urgent: ahead of every waiting request.
        ``wanted`` (for a current above 0) is asked just before the write goes on
        the wire; False drops it (Superseded), so a command overtaken by an
        off-write can never follow it.
        """
        value = self.command_value(amps)
        if value == 0:
            # An off takes the line back: no meter request starts until the
            # poller's next verdict (a stop_by_disable board's disable follows).
            self.line.close()
        await write_field(
            self.master,
            self.unit,
            self.model.current_command,
            value,
            multiple=self.model.write_multiple,
            urgent=value == 0,
            wanted=wanted,
        )
        return value

    async def set_enabled(self, enabled: bool, *, wanted: Wanted = None) -> None:
        """Enable or disable charging. Disabling is urgent on the bus (part of an
        off); ``wanted`` as for ``set_current``."""
        bit = self.model.enable
        if bit is None:
            raise Unsupported(f"{self.model.title} has no enable switch")
        if not enabled:
            self.line.close()  # part of an off: see set_current
        level = enabled if bit.active_high else not enabled
        f = bit.field
        if f.table is Table.COIL:
            await self.master.write_coil(
                self.unit, f.address, level, urgent=not enabled, wanted=wanted
            )
            return
        # A bit inside a holding register: read-modify-write, keep the other bits.
        current = int(
            f.decode(await self.master.read_holding_registers(self.unit, f.address, f.width)) or 0
        )
        new = current | (1 << bit.bit) if level else current & ~(1 << bit.bit)
        await write_field(
            self.master,
            self.unit,
            f,
            new,
            multiple=self.model.write_multiple,
            urgent=not enabled,
            wanted=wanted,
        )

    async def arm_failsafe(self, watchdog: float, current: float) -> None:
        """Arm the board's watchdog: no request for ``watchdog`` s -> apply ``current`` A.

        The current is written before the watchdog period, so the watchdog is
        never armed with a stale failsafe current.
        """
        m = self.model
        if m.failsafe_timeout is None or m.failsafe_current is None:
            raise Unsupported(f"{m.title} has no hardware failsafe")
        if watchdog <= 0:
            raise ValueError(f"failsafe watchdog period must be positive, not {watchdog}")
        amps = self.command_value(current)
        mp = m.write_multiple
        await write_field(self.master, self.unit, m.failsafe_current, amps, multiple=mp)
        await write_field(self.master, self.unit, m.failsafe_timeout, watchdog, multiple=mp)

    async def set_failsafe_current(self, current: float) -> None:
        """Change the failsafe current of a watchdog already armed: one write."""
        m = self.model
        if m.failsafe_current is None:
            raise Unsupported(f"{m.title} has no hardware failsafe")
        amps = self.command_value(current)
        await write_field(
            self.master, self.unit, m.failsafe_current, amps, multiple=m.write_multiple
        )

    async def set_lock(self, locked: bool, *, wanted: Wanted = None) -> None:
        """Command the socket's lock actuator: locked or released.

        An ordinary write (never urgent: an off-write always goes first). Its
        acknowledgement says only that the board has the command; whether the
        lock moved, the board's lock detection reports in ``lock_errors`` once
        the actuator has run (``BoardStatus``). ``wanted`` as for ``set_current``.
        """
        bit = self.model.lock
        if bit is None:
            raise Unsupported(f"{self.model.title} has no lock actuator the station drives")
        if bit.field.table is not Table.COIL:
            raise Unsupported(f"{self.model.title}: a lock bit in a register is not supported")
        level = locked if bit.active_high else not locked
        await self.master.write_coil(self.unit, bit.field.address, level, wanted=wanted)

    def _lock_errors(self, fault_word: float | None) -> frozenset[LockError]:
        """The lock errors in the fault register (``BoardModel.lock_error_bits``)."""
        if fault_word is None:
            return frozenset()
        bits = self.model.lock_error_bits
        return frozenset(e for bit, e in bits.items() if int(fault_word) >> bit & 1)


# --- EVSE DIN / EVSE-WB / SimpleEVSE (evracing) -----------------------------
# Holding registers 1000..1009, read with function 03 and written with 16
# only: evcc charger/simpleevse.go, openWB/core packages/modules/common/evse.py
# and syssi/esphome-evse-wallbox all write with FC16 (quantity 1); no driver
# uses 06, so it is unconfirmed whether the board accepts it.
_DIN = {
    n: Field(Table.HOLDING, 1000 + i)
    for i, n in enumerate(
        ("command", "offered", "vehicle", "cable", "control", "firmware", "evse_state", "status")
    )
}

EVSE_DIN = BoardModel(
    kind="evse-din",
    title="EVSE DIN / SimpleEVSE-WB",
    # 1002 vehicle state: 1 ready (A), 2 EV present (B), 3 charging (C),
    # 4 charging with ventilation (D), 5 failure (diode check, RCD ...); there
    # is no separate E/F code, so 5 reads as F plus a device fault
    # [evcc-simpleevse], [owb-evse], [esphome-evse].
    pilot=_DIN["vehicle"],
    pilot_codes=MappingProxyType(
        {1: PilotState.A, 2: PilotState.B, 3: PilotState.C, 4: PilotState.D, 5: PilotState.F}
    ),
    pilot_faults=MappingProxyType({5: BoardFault.DEVICE}),
    # 1000 configured current, A (0 = off). Its read-back is the command the
    # board holds, not a measurement. 2005 b7 switches 1000 to 0.01 A on
    # firmware >= 17 per openWB (PRECISE_CURRENT_BIT) and evcc (evsedin.go sets
    # it itself on firmware >= 17); another list calls b7 "PWM debug" [cn-evse].
    # This table is integer amps and the driver does not read 2005: a board
    # with b7 set (e.g. after evcc) would take 16 as 0.16 A (no charge) and read
    # back 100x: commissioning must check 2005 b7 is clear.
    current_command=_DIN["command"],
    max_current=80.0,
    cable_limit=_DIN["cable"],  # 1003 cable (PP) limit, A [esphome-evse], [owb-lite]
    # 1001 "amps on PWM driver output" [script-evse], [esphome-evse]: the offer
    # the pilot PWM encodes, set by the board, not a current that flows.
    offered=_DIN["offered"],
    # 1007 b0 "relay on/off" [script-evse], [esphome-evse]: the state the board
    # DRIVES its relay (the contactor coil) to, not an auxiliary contact; the
    # board has no feedback input (its inputs are PP, CP, AN, PROG and the RCD
    # input on MCLR, 2005 b4 [script-evse]). So no ``contactor`` here: a welded
    # contactor reads "relay off" while current flows, and only the meter shows
    # it. Polarity is DISPUTED: ESPHome publishes relay = bit set ("Relay on");
    # [cn-evse] says "tentatively 0 = on, 1 = off". Active-high follows ESPHome.
    # Informational only: no safety decision uses it (docs/device-maps.md).
    relay=Bit(_DIN["status"], 0),
    # 1004 b0 = "turn off charging now": enabled while the bit is clear
    # [esphome-evse], [script-evse], [cn-evse]. A command register: reading it
    # back gives the station's own command, not whether the board obeys.
    enable=Bit(_DIN["control"], 0, active_high=False),
    # 1007 status bits per syssi/esphome-evse-wallbox (the current map):
    # b1 diode check failed, b2 ventilation required, b3 waiting for pilot
    # release (a recovery delay, not a fault: not mapped), b4 RCD test in
    # progress, b5 RCD check error. Sources disagree on b4/b5: an older list
    # [cn-evse] has b4 = RCD check error and b5 unused. b4 is therefore a fault
    # either way (the doc: treat b4 as an RCD fault on older firmware); a test
    # in progress also means no charging, so reporting it costs nothing. The
    # RCD flags exist only where an RCD is wired to MCLR and 2005 b4 enables it.
    faults=_DIN["status"],
    fault_bits=MappingProxyType(
        {
            1: BoardFault.DIODE,
            2: BoardFault.VENTILATION,
            4: BoardFault.RCD_SELFTEST,
            5: BoardFault.RCD_TRIP,
        }
    ),
    # No failsafe: no register list has a Modbus timeout, watchdog or
    # "current after communication loss" (ESPHome reads 1000..1009 and
    # 2000..2017, every bit of 1004/1007/2005 described [esphome-evse],
    # [script-evse], [cn-evse], [owb-lite]; evcc evsedin.go for firmware >= 17
    # uses 1000/1002/1005/2005 only). 1008/1009 are the error-recovery and
    # self-test countdowns, 2000 the current after a power-up, 2001 the Modbus
    # address (on old firmware "Modbus on" [owb-lite]): none acts on silence.
    write_multiple=True,
    # openWB sleeps 100 ms before each access [owb-evse].
    request_gap=0.1,
    notes="No hardware failsafe: no firmware's register list has a Modbus timeout, "
    "watchdog or current-on-communication-loss setting, so the board keeps the last "
    "current in register 1000 for as long as nobody writes it. A dead or wedged "
    "station process leaves that current (and the contactor closed) until the "
    "station restarts and writes 0, or the EV stops. No contactor feedback: 1007 b0 "
    "is the relay drive, so welding is judged from the meter's current.",
)

# --- Heidelberg Energy Control (Amperfied) ----------------------------------
# Addresses are the zero-based wire addresses as printed (evcc sends FC04
# address 5 for "register 5"; steff393/wbec uses 257/258/261 directly). Sources:
# evcc charger/heidelberg-ec.go, steff393/wbec src/globalConfig.h, Walther-Werke
# basicEVO manual p. 17, myGEKKO device db, star.ke.st (Amperfied register table).
_HEID_STANDBY = Field(Table.HOLDING, 258)  # 0 = standby enabled, 4 = disabled

HEIDELBERG = BoardModel(
    kind="heidelberg",
    title="Heidelberg Energy Control",
    # IR 5 charging state [walther], [gekko-heid], [evcc-heidelberg]:
    # 2 A1 / 3 A2, 4 B1 / 5 B2, 6 C1 / 7 C2 (X1 = no charging permission),
    # 8 derating (still charging: C; evcc maps it to D, the vendor says
    # derating, not ventilation), 9 E (error), 10 F (locked / not ready),
    # 11 ERR. For 11 the box itself reports an error, i.e. "EVSE not available":
    # that is IEC 61851 state F (the EVSE drives -12 V), not E (which is a CP
    # short / pilot fault seen on the line); so 11 -> F with a device fault.
    # State 10 also appears when the box is locked on purpose (remote lock 259,
    # evcc's wake-up trick), so its PILOT fault may be transient.
    pilot=Field(Table.INPUT, 5),
    pilot_codes=MappingProxyType(
        {
            2: PilotState.A,
            3: PilotState.A,
            4: PilotState.B,
            5: PilotState.B,
            6: PilotState.C,
            7: PilotState.C,
            8: PilotState.C,
            9: PilotState.E,
            10: PilotState.F,
            11: PilotState.F,
        }
    ),
    pilot_faults=MappingProxyType(
        {9: BoardFault.PILOT, 10: BoardFault.PILOT, 11: BoardFault.DEVICE}
    ),
    # HR 261 max current, 0.1 A: 0 (no charging) or 60..160 [deardevices], [wbec].
    # Its read-back is the command the box holds, not a measurement.
    current_command=Field(Table.HOLDING, 261, scale=0.1),
    max_current=16.0,
    current_step=0.1,
    # HR 257 Modbus watchdog timeout in ms (evcc, wbec, star.ke.st, myGEKKO;
    # modbuscloud alone says s); the driver passes seconds, so scale 0.001.
    # 0 switches the watchdog off (evcc issue #5060: a user disabled it so).
    failsafe_timeout=Field(Table.HOLDING, 257, scale=0.001),
    # HR 262 failsafe current, 0.1 A, applied when the watchdog expires
    # [starkest-heid], [evcc-heidelberg].
    failsafe_current=Field(Table.HOLDING, 262, scale=0.1),
    # Disable standby (258 = 4), as evcc does "to prevent comm loss".
    init_writes=((_HEID_STANDBY, 4.0),),
    # Vendor documents function 06 (03/04/06); evcc writes with 16 and that has
    # worked for years: 06 here, 16 would be the fallback on exception 01.
    write_multiple=False,
    # No contactor or relay register: C2 in IR 5 is "charging allowed", a
    # permission, not a contact state; the phase currents the box measures
    # (IR 6..8) are left to the station's meter. No enable switch: 259
    # (remote lock) forces state F and takes ~10 s to recover (evcc).
    notes="Energy registers are VAh per the vendor table (W/Wh per evcc); "
    "current control needs register layout >= V1.0.7 (IR 4). No contactor "
    "feedback: welding is judged from the meter's current.",
)

# --- Phoenix Contact EV-CC-AC1-M3-...-ETH (Modbus TCP) -------------------------
# evcc charger/phoenix-ev-eth.go, marko2276/home-assistant-phoenix-ev-charger,
# Phoenix manual 104924_de_02 table 9.2. (The serial "EV Charge Control Basic"
# uses a different map: coil 20000, HR 22000, IR 24000 with the letter in the
# HIGH byte; it is not this table.)
EV_CC = BoardModel(
    kind="ev-cc",
    title="Phoenix Contact EV-CC-AC1-M3",
    # IR 100: one ASCII character 'A'..'F' in the LOW byte (evcc string(b[1]);
    # the HA integration skips the first byte; manual: "ASCII (8 Bit), A...F").
    pilot=Field(Table.INPUT, 100, DType.CHAR),
    pilot_codes=MappingProxyType({ord(c): PilotState(c) for c in "ABCDEF"}),
    # E (CP error) and F (station not available) are the only faults this table
    # reports. IR 107 holds error bits, but the manual's bit numbering (0- or
    # 1-based) is unclear, so it is left out until checked on a device.
    pilot_faults=MappingProxyType({ord("E"): BoardFault.PILOT, ord("F"): BoardFault.PILOT}),
    # HR 528 max charging current: 1 A on Phoenix OEM firmware, 0.1 A on Wallbe
    # firmware (evcc detects Wallbe by a readback >= 60; the HA integration
    # writes value x 10). This table is the OEM (1 A) variant. UNCONFIRMED that
    # 0 stops charging: evcc and the HA integration never write below 6 A and
    # stop with coil 400 off: so every off here also writes coil 400 off
    # (stop_by_disable), the trip lane's included, not only the switch-off.
    current_command=Field(Table.HOLDING, 528),
    stop_by_disable=True,
    max_current=32.0,
    cable_limit=Field(Table.INPUT, 101),  # IR 101 proximity (PP) current, A
    # Coil 400 charging enable, FC05 (evcc: needs DIP switch 10 ON). Reading
    # it back (evcc's Enabled) gives the station's own command, not a state.
    enable=Bit(Field(Table.COIL, 400, DType.BIT)),
    # No contactor register, no CP-duty register, no watchdog/failsafe found.
    # The controller can monitor an auxiliary contact on a configurable input
    # (input functions 5/6 "contactor monitoring via N/O / N/C auxiliary
    # contact", output function 35 "charging contactor monitoring triggered"
    # [ha-phx] const.py), but it reports the result only in IR 107 or on an
    # output, neither mapped here: so no feedback field.
    # No ``lock``: this controller drives a socket's lock actuator by itself,
    # from its own configuration (input LD "charging connector locking feedback",
    # input ML / input function 4 "locking", output LR "locking active" [ha-phx]
    # const.py; DI 200..207 EN, XR, LD, ML, LR [phx-cc-de]); no source names a
    # Modbus register that commands it (evcc uses coils 400 and 419 only), so the
    # station neither locks nor unlocks here and UnlockConnector is NotSupported.
    # evcc and the HA integration use unit 255 for EV-CC-ETH, but our unit-id
    # checks (fieldbus.ports.check_unit) allow only 1..247; 180 is evcc's
    # default for the sibling EM-CP-PP-ETH and is what this default uses.
    # Configure the unit explicitly for a real EV-CC.
    default_unit=180,
)

# --- Phoenix Contact EV Charge Control Basic (EV-CC-AC1-M3-CBC-SER..., Modbus RTU) ---
# Phoenix user manual 106377_en_04 table 9-2 ("Register assignment", pp. 54-63,
# easymanua.ls/phoenix-contact/ev-charge-control-basic) [phx-basic]; evcc
# charger/phoenix-ev-ser.go [evcc-phx-ser] (coil 20000, HR 22000, IR 24000 b[0]).

#: How the bits of IR 24025 are numbered in table 9-2 ("Bit 2 = rejection of
#: 13 A cable" ... "Bit 16 = EV-RCM selftest error"): read 0-based (printed bit
#: n is 1 << n), as the same table numbers IR 24004/24005 ("Bit 0 - bit 4: EN,
#: XR, ML, CCR, IN"). The list's last entry, bit 16, does not fit a 16-bit
#: register 0-based: either that line is wrong or the list is 1-based (printed
#: n is 1 << (n - 1)). UNCONFIRMED on a device; this one constant moves every
#: bit of the fault and lock mappings below.
BASIC_ERROR_BIT_BASE = 0


def _basic_bit(printed: int) -> int:
    """IR 24025: the wire bit of the bit the manual prints as ``printed``."""
    return printed - BASIC_ERROR_BIT_BASE


def _basic_bits(printed: Mapping[int, Any]) -> dict[int, Any]:
    """The printed bits that exist in a 16-bit register, by wire bit."""
    return {_basic_bit(n): v for n, v in printed.items() if 0 <= _basic_bit(n) < 16}


#: IR 24000: "2 x ASCII", the letter in the high byte, a digit in the low byte
#: ("A1, A2, B1, ... D2, E(0), F(0)"). evcc reads the high byte only; the digit
#: (1 = PWM off, 2 = PWM on) is accepted as 0x00, '0', '1' or '2' whatever the letter.
_BASIC_PILOT_CODES = {
    ord(letter) << 8 | low: PilotState(letter)
    for letter in "ABCDEF"
    for low in (ord("1"), ord("2"), ord("0"), 0)
}

EV_CC_BASIC = BoardModel(
    kind="ev-cc-basic",
    title="Phoenix Contact EV Charge Control Basic",
    pilot=Field(Table.INPUT, 24000),
    pilot_codes=MappingProxyType(_BASIC_PILOT_CODES),
    # E (CP short, mains problem) and F (station not available) are faults.
    pilot_faults=MappingProxyType(
        {
            c: BoardFault.PILOT
            for c, p in _BASIC_PILOT_CODES.items()
            if p in (PilotState.E, PilotState.F)
        }
    ),
    # HR 22000 max permissible charging current, A, volatile (a controller
    # restart forgets it). The manual gives 6..63 A; UNCONFIRMED that 0 is
    # accepted or stops charging: evcc refuses < 6 A and stops with coil 20000
    # off. So every off also writes coil 20000 off (stop_by_disable), as on the
    # EV-CC ETH.
    current_command=Field(Table.HOLDING, 22000),
    stop_by_disable=True,
    max_current=63.0,
    # IR 24001 PP current, A: 13/20/32/63; 0 = PP open (no cable: 0 A offered);
    # 0xFFFF = PP shorted to PE, an error the board also flags as "invalid PP"
    # (24025 bit 3, a device fault below): read raw, it bounds nothing.
    cable_limit=Field(Table.INPUT, 24001),
    # IR 24003 "charging current specification via signal CP in A": the offer
    # the PWM encodes (24002 is the same in % duty).
    offered=Field(Table.INPUT, 24003),
    # IR 24005 b3 CON: the state of the charging-contactor OUTPUT, i.e. what the
    # board drives the coil to, not an auxiliary contact: ``relay``, never
    # ``contactor``. (Contactor monitoring, HR 4006 = 1 with a force-guided N/C
    # contact on CCR, reports only as 24025 bit 12, a device fault below.)
    relay=Bit(Field(Table.INPUT, 24005), 3),
    # Coil 20000 enable charging (PWM on), volatile, "only takes effect if
    # register 4000 is configured for this function": HR 4000 = 3 below.
    enable=Bit(Field(Table.COIL, 20000, DType.BIT)),
    # IR 24025 error status, bit numbering per BASIC_ERROR_BIT_BASE. Bit 2 (13 A
    # cable rejected, S1/DIP 4) is left out: the board then offers nothing by
    # itself. Bits 6/7/8 are the lock's, in ``lock_error_bits``.
    faults=Field(Table.INPUT, 24025),
    fault_bits=MappingProxyType(
        _basic_bits(
            {
                3: BoardFault.DEVICE,  # invalid PP value (incl. PP shorted to PE)
                4: BoardFault.PILOT,  # invalid CP value
                5: BoardFault.PILOT,  # status F: charging station not available
                11: BoardFault.VENTILATION,  # status D, vehicle rejected (HR 4010 = 0)
                12: BoardFault.DEVICE,  # charging contactor error (monitoring, HR 4006)
                13: BoardFault.DIODE,  # no diode in the vehicle's CP circuit
                15: BoardFault.RCD_TRIP,  # EV-RCM residual current detection triggered
                16: BoardFault.RCD_SELFTEST,  # EV-RCM self-test error (1-based only)
            }
        )
    ),
    # Coil 20002 "controlling the locking actuator: 0 = unlocked, 1 = locked",
    # volatile, effective only if HR 4002 = 3 ("locking if value 1 is written to
    # register 20002"). HR 4002 = 3 needs S1/DIP 3 ON: with DIP 3 OFF the board
    # locks by itself in state B and unlocks in A, and other values "have no
    # effect" (then this coil does nothing and the errors below still report
    # the board's own locking). Its read-back is the station's own command.
    lock=Bit(Field(Table.COIL, 20002, DType.BIT)),
    # The board's own lock detection (input LD): 24025 bit 6 "locking" error,
    # bit 7 "unlocking" error, bit 8 "LD unavailable during locking".
    lock_error_bits=MappingProxyType(
        _basic_bits({6: LockError.LOCKING, 7: LockError.UNLOCKING, 8: LockError.NO_DETECTION})
    ),
    # HR 4000 = 3: enable by coil 20000; HR 4002 = 3: lock by coil 20002. Both
    # retentive (written once per start, the value already held).
    init_writes=((Field(Table.HOLDING, 4000), 3.0), (Field(Table.HOLDING, 4002), 3.0)),
    # evcc writes HR 22000 with function 06 (WriteSingleRegister).
    write_multiple=False,
    # The unit is configurable; evcc's default is 1.
    default_unit=1,
    notes="No hardware failsafe found: HR 22000 and coils 20000/20002 are volatile "
    "(a controller restart resets them), none acts on a silent master. No contactor "
    "feedback: 24005 b3 is the contactor drive output. Lock: set S1/DIP 3 ON so that "
    "HR 4002 = 3 hands the lock to coil 20002; the lock is confirmed only by the "
    "absence of a locking error (24025) once the actuator has had its time.",
)

BOARD_MODELS: Mapping[str, BoardModel] = MappingProxyType(
    {m.kind: m for m in (EVSE_DIN, HEIDELBERG, EV_CC, EV_CC_BASIC)}
)
