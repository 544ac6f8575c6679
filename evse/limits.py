"""Current-limit arbitration: the offer is the lowest of every limit that applies.

Pure: inputs in, one ``Limit`` out, with the input that bound it (for the
status view and for tests). Recomputed by the station whenever an input
changes.

* board / hardware maximum (the board model's capability);
* the cable's current capacity, read from the proximity pilot (IEC 61851-1
  annex B: PP resistor coding 13/20/32/63 A) where the board reports it;
* the installer maximum (the supply the station is wired for);
* the smart-charging limit from the central system (OCPP 1.6 section 3.13),
  when a schedule is active;
* the fallback limit while the central system is unreachable, unless a
  TxProfile of the running transaction is in effect (station-spec section 3,
  "fallback limit"; the precedence below).

Offline: smart charging and the fallback limit
----------------------------------------------
The fallback limit is what applies when the central system cannot be
reached "and no limit can be obtained". Only a TxProfile is a limit obtained
for *this* transaction: the central system planned it knowing the
transaction, so it keeps applying offline for the rest of the transaction
and the fallback limit does not (``tx_profile``). A ChargePointMaxProfile or
TxDefaultProfile is a standing policy set before the link was lost, while
the central system could still adjust it (load management): offline it can
no longer, so the fallback limit applies as well and the lower of the two
wins. A stored profile never lifts the offer above the fallback limit
offline; it may lower it. Online, or standalone (no central system
configured: no fallback), the smart-charging limit is one input like the
others. In short, offline the offer is the lowest of the hardware, installer
and cable limits, the smart-charging limit, and the fallback limit unless
``tx_profile``.

IEC 61851-1 (table A.8): the PWM duty cycle cannot offer less than 6 A, so
any result below 6 A is 0 A: charging pauses (SuspendedEVSE), it is not
offered at a current the EV may not obey.

One rule for the fallback limit
-------------------------------
The fallback limit and the board's hardware failsafe current (what the
board's watchdog applies when the firmware stops talking) follow one rule,
``effective_fallback``: never above the installer maximum nor the board's
maximum, and below ``MIN_CURRENT`` it is 0 A. Where a fallback is *set*
(the TOML file, the registry key FallbackLimit, ``evse config set``), a
value above ``fallback_max`` is refused and nothing changes; where one is
*applied* (the offer, arming the failsafe, a live change), it is clamped by
``effective_fallback``, so a value that slipped past a check (a stored value
from before the installer maximum was lowered) still never exceeds a limit.
``MIN_CURRENT`` is the one 6 A constant; other layers import it (ocpp16/ and
fieldbus/ may not import evse/: they keep their own, see their comments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

#: IEC 61851-1: the lowest current a PWM duty cycle can offer.
MIN_CURRENT = 6.0


class CentralSystem(Enum):
    NOT_CONFIGURED = "not_configured"  # standalone: no fallback applies
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class LimitInputs:
    hardware_max: float
    installer_max: float
    fallback: float
    cable: float | None = None
    smart_charging: float | None = None
    central_system: CentralSystem = CentralSystem.NOT_CONFIGURED
    #: ``smart_charging`` includes a TxProfile of the running transaction: offline
    #: it stands instead of the fallback limit (see the module docstring).
    tx_profile: bool = False
    #: Mains power is lost (the station runs on a UPS): nothing to offer.
    mains_lost: bool = False


@dataclass(frozen=True, slots=True)
class Limit:
    amps: float
    #: What bound the offer: "hardware", "cable", "installer", "smart_charging",
    #: "fallback"; with " (below 6 A)" when it was rounded to 0.
    bound_by: str


def arbitrate(inputs: LimitInputs) -> Limit:
    """The offer. A limit that is not a number (NaN) counts as 0: fail closed."""
    candidates: list[tuple[float, str]] = [
        (inputs.hardware_max, "hardware"),
        (inputs.installer_max, "installer"),
    ]
    if inputs.cable is not None:
        candidates.append((inputs.cable, "cable"))
    if inputs.smart_charging is not None:
        candidates.append((inputs.smart_charging, "smart_charging"))
    planned = inputs.tx_profile and inputs.smart_charging is not None
    if inputs.central_system is CentralSystem.OFFLINE and not planned:
        candidates.append((inputs.fallback, "fallback"))
    if inputs.mains_lost:
        candidates.append((0.0, "mains lost"))
    candidates = [(0.0 if math.isnan(a) else a, name) for a, name in candidates]
    amps, bound_by = min(candidates, key=lambda c: c[0])
    if amps < MIN_CURRENT:
        return Limit(0.0, f"{bound_by} (below {MIN_CURRENT:g} A)")
    return Limit(amps, bound_by)


def fallback_max(*, installer_max: float, hardware_max: float) -> tuple[float, str]:
    """The highest fallback limit that may be set, and what bounds it.

    ``(amps, "installer")`` or ``(amps, "hardware")``: the lower of the
    installer maximum and the board model's maximum (on a tie, the installer
    maximum, the setting a person can change). Not a number counts as 0.
    """
    installer = 0.0 if math.isnan(installer_max) else installer_max
    hardware = 0.0 if math.isnan(hardware_max) else hardware_max
    if installer <= hardware:
        return installer, "installer"
    return hardware, "hardware"


def effective_fallback(fallback: float, *, installer_max: float, hardware_max: float) -> float:
    """The fallback limit in force: ``fallback`` clamped to both maxima, 0 below 6 A.

    For every place a fallback is applied: the offer while the central system
    is unreachable, the board's failsafe current, a live change of
    FallbackLimit. Not a number is 0 A (fail closed).
    """
    highest, _ = fallback_max(installer_max=installer_max, hardware_max=hardware_max)
    amps = 0.0 if math.isnan(fallback) else min(fallback, highest)
    return amps if amps >= MIN_CURRENT else 0.0


def failsafe_current(fallback: float, *, installer_max: float, hardware_max: float) -> float:
    """The current a board's hardware watchdog falls back to: the fallback in force.

    A dead firmware is the ultimate loss of the central system, so the board
    applies what the station would apply offline: ``effective_fallback``
    (never above the installer or board maximum; 0 when below 6 A).
    """
    return effective_fallback(fallback, installer_max=installer_max, hardware_max=hardware_max)
