"""What a board reports, as the charging core reads it: the control-pilot state
and the board's fault flags.

Kept apart from ``fieldbus.boards`` (the driver, which loads trio and
pymodbus) so that the sans-I/O charging core (``evse.connector``) and the
simulator's physics can name them without the Modbus stack. This module
imports nothing but the standard library; ``fieldbus.boards`` re-exports both
names.
"""

from __future__ import annotations

from enum import StrEnum


class PilotState(StrEnum):
    """Control-pilot states, IEC 61851-1 table A.3 (raw, as the board reports)."""

    A = "A"  # +12 V: no vehicle
    B = "B"  # +9 V: vehicle connected, not ready
    C = "C"  # +6 V: vehicle ready, charging
    D = "D"  # +3 V: ready, ventilation required
    E = "E"  # 0 V: short to PE / pilot error, or EVSE not available
    F = "F"  # -12 V: EVSE not available / fault


class BoardFault(StrEnum):
    RCD_TRIP = "rcd_trip"
    RCD_SELFTEST = "rcd_selftest_failed"
    DIODE = "diode_check_failed"
    VENTILATION = "ventilation_required"
    PILOT = "pilot_error"
    OVERTEMPERATURE = "overtemperature"
    DEVICE = "device_error"
