"""Simulated devices: the physical model seen through a model's register table.

Each simulated device reads and writes the same ``MeterModel`` / ``BoardModel``
tables the drivers use, so the simulator serves exactly the maps the firmware
reads; what a model's registers *mean* physically is the only per-model data
here (which raw pilot code stands for "B, charging allowed", say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pymodbus.constants import ExcCodes

from fieldbus.boards import BoardFault, BoardModel, LockError, PilotState
from fieldbus.meters import PHASES, MeterModel
from fieldbus.registers import Field, Table
from fieldbus.server import SparseStore
from ops.sim.model import Station

#: Clusters of fields closer than this share one readable address range.
_RANGE_SLACK = 64

Recorder = Callable[[dict[str, Any]], None]


def _ranges(fields: Sequence[Field], slack: int = _RANGE_SLACK) -> dict[Table, list[range]]:
    out: dict[Table, list[range]] = {}
    for table in Table:
        spans = sorted((f.address, f.address + f.width) for f in fields if f.table is table)
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start - merged[-1][1] <= slack:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        if merged:
            out[table] = [range(s, e) for s, e in merged]
    return out


class MeterSim:
    role = "meter"

    def __init__(self, model: MeterModel, unit: int, station: Station) -> None:
        self.model = model
        self.unit = unit
        self.station = station
        fields = list(model.fields.values())
        if model.identity is not None:
            fields.append(model.identity)
        self.store = SparseStore(_ranges(fields))
        if model.identity is not None:
            # Serve the model code the real device reports (EM24: register 0x000B).
            code = min(model.identity_codes)
            self.store.put(
                model.identity.table, model.identity.address, model.identity.encode(code)
            )

    def refresh(self) -> None:
        s = self.station
        currents = s.phase_currents
        powers = s.phase_powers
        values: dict[str, float] = {"energy_import": s.energy_wh, "frequency": s.frequency}
        for i, p in enumerate(PHASES[: self.model.phases]):
            values[f"voltage_{p}"] = s.voltage
            values[f"current_{p}"] = currents[i]
            values[f"power_{p}"] = powers[i]
        # A single-phase meter measures L1 only; its total is what it sees.
        values["power_total"] = sum(powers[: self.model.phases])
        for name, f in self.model.fields.items():
            if name in values:
                self.store.put(f.table, f.address, f.encode(values[name]))


def _basic_status(state: PilotState, offered: bool) -> int:
    """EV Charge Control Basic IR 24000: the letter in the high byte, a digit in
    the low one: 1 = PWM off, 2 = PWM on; E0, F0 [phx-basic]."""
    digit = "0" if state in (PilotState.E, PilotState.F) else "2" if offered else "1"
    return ord(state.value) << 8 | ord(digit)


#: Raw pilot code per (state, charging allowed) where a model has several codes
#: for one state. Heidelberg: X1 = no charging permission, X2 = permission.
_PILOT_PREFERENCE: Mapping[str, Mapping[tuple[PilotState, bool], int]] = {
    "heidelberg": {
        (PilotState.A, False): 2,
        (PilotState.A, True): 3,
        (PilotState.B, False): 4,
        (PilotState.B, True): 5,
        (PilotState.C, False): 6,
        (PilotState.C, True): 7,
        (PilotState.D, False): 6,
        (PilotState.D, True): 7,
        (PilotState.E, False): 9,
        (PilotState.E, True): 9,
        (PilotState.F, False): 10,
        (PilotState.F, True): 10,
    },
    "ev-cc-basic": {
        (state, offered): _basic_status(state, offered)
        for state in PilotState
        for offered in (False, True)
    },
}

#: Where a model's lock actuator follows its lock coil: the setting (register,
#: value) that hands it to the coil; otherwise the board locks by itself while
#: an EV is plugged in. EV Charge Control Basic: HR 4002 = 3 [phx-basic].
_LOCK_BY_COIL: Mapping[str, tuple[int, int]] = {"ev-cc-basic": (4002, 3)}


class BoardSim:
    role = "board"

    def __init__(self, model: BoardModel, unit: int, station: Station, record: Recorder) -> None:
        self.model = model
        self.unit = unit
        self.station = station
        self.record = record
        m = model
        fields = list(m.status_fields().values())
        fields += [f for f in (m.failsafe_timeout, m.failsafe_current) if f is not None]
        self.writable: dict[str, Field] = {"command": m.current_command}
        if m.enable is not None:
            self.writable["enable"] = m.enable.field
        if m.lock is not None:
            self.writable["lock"] = m.lock.field
        if m.failsafe_timeout is not None and m.failsafe_current is not None:
            self.writable["failsafe_timeout"] = m.failsafe_timeout
            self.writable["failsafe_current"] = m.failsafe_current
        # Registers the driver sets once at start-up (Heidelberg 258: standby
        # off); accepted and recorded, no physics behind them.
        for f, _ in m.init_writes:
            self.writable[f"setup_{f.address}"] = f
            fields.append(f)
        self.store = SparseStore(
            _ranges(fields),
            writable=_ranges(list(self.writable.values()), slack=0),
            on_write=self.on_write,
        )
        station.board.hardware_max = m.max_current
        self._publish_writable()

    def _publish_writable(self) -> None:
        b = self.station.board
        m = self.model
        self.store.put(
            m.current_command.table, m.current_command.address, m.current_command.encode(b.command)
        )
        if m.enable is not None:
            level = b.enabled if m.enable.active_high else not b.enabled
            word = (1 << m.enable.bit) if level else 0
            self.store.put(m.enable.field.table, m.enable.field.address, [word])
        if m.lock is not None:
            level = b.lock_coil if m.lock.active_high else not b.lock_coil
            word = (1 << m.lock.bit) if level else 0
            self.store.put(m.lock.field.table, m.lock.field.address, [word])

    def pilot_code(self) -> int:
        s = self.station
        m = self.model
        state = s.pilot
        faulted = s.faults.rcd_trip and m.faults is None and bool(m.pilot_faults)
        if faulted:
            # A board without fault flags shows a trip as its error state.
            return next(iter(m.pilot_faults))
        preferred = _PILOT_PREFERENCE.get(m.kind, {}).get((state, s.offered > 0))
        if preferred is not None:
            return preferred
        for code, st in m.pilot_codes.items():
            if st is state:
                return code
        # No code for this state (e.g. E on a board that reports only "failure").
        return next(iter(m.pilot_faults)) if m.pilot_faults else next(iter(m.pilot_codes))

    def refresh(self) -> None:
        s = self.station
        m = self.model
        self.store.put(m.pilot.table, m.pilot.address, m.pilot.encode(self.pilot_code()))
        if m.cable_limit is not None:
            limit = s.board.cable_limit if s.ev.plugged else 0.0
            self.store.put(m.cable_limit.table, m.cable_limit.address, m.cable_limit.encode(limit))
        if m.offered is not None:
            self.store.put(m.offered.table, m.offered.address, m.offered.encode(s.offered))
        # Flags may share a register (EVSE DIN 1007: relay bit and fault bits),
        # so the words are composed bit by bit before they are stored. A model
        # reports what its board can know: a drive bit shows the drive (a
        # welded contact reads "off"), only an auxiliary-contact input shows
        # the contacts themselves; a model with neither shows nothing.
        words: dict[tuple[Table, int], int] = {}
        flags = ((m.relay, s.relay_on), (m.contactor, s.contactor_closed))
        for bit, state in flags:
            if bit is None:
                continue
            level = state if bit.active_high else not state
            key = (bit.field.table, bit.field.address)
            words[key] = words.get(key, 0) | ((1 << bit.bit) if level else 0)
        if m.faults is not None:
            key = (m.faults.table, m.faults.address)
            word = words.get(key, 0)
            for bit_index, fault in m.fault_bits.items():
                if fault is BoardFault.RCD_TRIP and s.faults.rcd_trip:
                    word |= 1 << bit_index
            # The board's lock detection: the last move of the actuator failed.
            lock_errors = {
                LockError.LOCKING: s.board.locking_error,
                LockError.UNLOCKING: s.board.unlocking_error,
            }
            for bit_index, error in m.lock_error_bits.items():
                if lock_errors.get(error, False):
                    word |= 1 << bit_index
            words[key] = word
        for (table, address), word in words.items():
            self.store.put(table, address, [word])

    def on_write(self, table: Table, address: int, values: Sequence[int]) -> ExcCodes | None:
        """Apply the firmware's write to the physical model, or refuse it."""
        m = self.model
        b = self.station.board
        changes: dict[str, float] = {}
        for name, f in self.writable.items():
            if f.table is not table or not address <= f.address < address + len(values):
                continue
            offset = f.address - address
            words = list(values[offset : offset + f.width])
            if len(words) != f.width:
                return ExcCodes.ILLEGAL_ADDRESS
            value = f.decode(words)
            if value is None:
                return ExcCodes.ILLEGAL_VALUE
            changes[name] = value
        if "command" in changes:
            amps = changes["command"]
            if amps != 0 and not m.min_current <= amps <= m.max_current:
                return ExcCodes.ILLEGAL_VALUE
            if amps == 0 and self.station.faults.refuse_zero:
                return ExcCodes.ILLEGAL_VALUE
        if "failsafe_current" in changes:
            amps = changes["failsafe_current"]
            if amps != 0 and not m.min_current <= amps <= m.max_current:
                return ExcCodes.ILLEGAL_VALUE
        for name, value in changes.items():
            if name == "command":
                b.command = value
            elif name == "enable":
                assert m.enable is not None
                level = bool(int(value) >> m.enable.bit & 1)
                b.enabled = level if m.enable.active_high else not level
            elif name == "failsafe_timeout":
                b.failsafe_timeout = value
            elif name == "failsafe_current":
                b.failsafe_current = value
            elif name == "lock":
                assert m.lock is not None
                level = bool(int(value) >> m.lock.bit & 1)
                self.station.command_lock(level if m.lock.active_high else not level)
            elif name.startswith("setup_") and m.kind in _LOCK_BY_COIL:
                register, by_coil = _LOCK_BY_COIL[m.kind]
                if name == f"setup_{register}":
                    b.lock_by_coil = int(value) == by_coil
                    self.station.command_lock(b.lock_coil)
        self.record(
            {
                "event": "write",
                "unit": self.unit,
                "device": m.kind,
                "table": table.name.lower(),
                "address": address,
                "values": list(values),
                "fields": changes,
            }
        )
        return None
