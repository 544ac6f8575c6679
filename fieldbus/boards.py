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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import trio

from fieldbus.devices import FieldReader, write_field
from fieldbus.errors import DeviceDataError, Unsupported
from fieldbus.master import ModbusMaster, Wanted
from fieldbus.registers import DType, Field, Table

# Re-exported: the pilot state and fault flags live in fieldbus.signals (no
# trio, no pymodbus) so the sans-I/O charging core can import them.
from fieldbus.signals import BoardFault as BoardFault  # noqa: PLC0414
from fieldbus.signals import PilotState as PilotState  # noqa: PLC0414


@dataclass(frozen=True, slots=True)
class Bit:
    """A flag: bit ``bit`` of a register field (0 for a coil / discrete input)."""

    field: Field
    bit: int = 0
    #: The flag reads as "true" when the bit is set.
    active_high: bool = True


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
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields


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
    read_at: float
    timestamp: datetime = field(compare=False)

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
        }


def _flag(bit: Bit, value: float | None) -> bool | None:
    if value is None:
        return None
    is_set = bool(int(value) >> bit.bit & 1)
    return is_set if bit.active_high else not is_set


class Board:
    """Driver for one board on a bus."""

    def __init__(self, master: ModbusMaster, unit: int, model: BoardModel) -> None:
        self.master = master
        self.unit = unit
        self.model = model
        self.capabilities = model.capabilities
        if model.request_gap:
            master.set_unit_gap(unit, model.request_gap)
        self._reader = FieldReader(master, unit, model.status_fields())

    async def initialize(self) -> None:
        """Bring the board into the state the driver expects (model's init writes)."""
        for f, value in self.model.init_writes:
            await write_field(self.master, self.unit, f, value, multiple=self.model.write_multiple)

    async def read_status(self) -> BoardStatus:
        m = self.model
        values = await self._reader.read()
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
        return BoardStatus(
            pilot=m.pilot_codes[code],
            cable_limit_a=values.get("cable_limit"),
            offered_a=values.get("offered"),
            command_a=values["command"] or 0.0,
            contactor_closed=_flag(m.contactor, values.get("contactor")) if m.contactor else None,
            relay_on=_flag(m.relay, values.get("relay")) if m.relay else None,
            enabled=_flag(m.enable, values.get("enable")) if m.enable else None,
            faults=frozenset(faults),
            read_at=trio.current_time(),
            timestamp=datetime.now(UTC),
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
    # evcc and the HA integration use unit 255 for EV-CC-ETH, but our unit-id
    # checks (fieldbus.ports.check_unit) allow only 1..247; 180 is evcc's
    # default for the sibling EM-CP-PP-ETH and is what this default uses.
    # Configure the unit explicitly for a real EV-CC.
    default_unit=180,
)

BOARD_MODELS: Mapping[str, BoardModel] = MappingProxyType(
    {m.kind: m for m in (EVSE_DIN, HEIDELBERG, EV_CC)}
)
