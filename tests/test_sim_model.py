"""The simulator's physics, without I/O: time is an argument."""

from __future__ import annotations

import pytest

from fieldbus.boards import PilotState
from ops.sim.model import Station


def pilot(s: Station) -> PilotState:
    """The pilot state, read through a call so the type checker does not narrow it."""
    return s.pilot


def drive_and_contacts(s: Station) -> tuple[bool, bool]:
    """(relay drive, physical contacts), read through a call for the same reason."""
    return s.relay_on, s.contactor_closed


def charging_station(command: float = 16.0, phases: int = 3) -> Station:
    s = Station()
    s.ev.plugged = True
    s.ev.phases = phases
    s.board.command = command
    return s


def test_no_ev_is_state_a_and_nothing_flows() -> None:
    s = Station()
    s.board.command = 16
    assert pilot(s) is PilotState.A
    assert not s.contactor_closed
    assert s.phase_currents == (0.0, 0.0, 0.0)


def test_ev_charges_only_with_an_offer_of_at_least_6_a() -> None:
    s = charging_station(command=0)
    assert pilot(s) is PilotState.B
    s.board.command = 5
    assert s.offered == 0.0
    assert pilot(s) is PilotState.B
    s.board.command = 6
    assert pilot(s) is PilotState.C
    assert s.contactor_closed


def test_ev_draws_the_lower_of_offer_and_its_own_limit_on_its_phases() -> None:
    s = charging_station(command=32, phases=1)
    s.ev.max_current = 13
    assert s.phase_currents == (13.0, 0.0, 0.0)
    s.ev.phases = 3
    s.board.command = 10
    assert s.phase_currents == (10.0, 10.0, 10.0)
    assert s.phase_powers == pytest.approx((2300.0, 2300.0, 2300.0))


def test_offer_is_capped_by_cable_and_hardware() -> None:
    s = charging_station(command=32)
    s.board.cable_limit = 20
    s.board.hardware_max = 25
    assert s.offered == 20
    s.board.cable_limit = 63
    assert s.offered == 25


def test_paused_ev_stays_in_b_and_ventilation_is_d() -> None:
    s = charging_station()
    s.ev.wants = "B"
    assert pilot(s) is PilotState.B and not s.contactor_closed
    s.ev.wants = "D"
    assert pilot(s) is PilotState.D and s.contactor_closed


def test_energy_integrates_power_over_time_exactly() -> None:
    s = charging_station(command=16)
    s.advance(0.0)
    s.advance(3600.0)
    assert s.energy_wh == pytest.approx(3 * 230 * 16)
    s.board.command = 0
    s.advance(7200.0)
    assert s.energy_wh == pytest.approx(3 * 230 * 16)


def test_relay_drive_follows_what_the_board_commands() -> None:
    s = charging_station(command=0)
    assert drive_and_contacts(s) == (False, False)
    s.board.command = 16
    assert drive_and_contacts(s) == (True, True)
    s.board.enabled = False
    assert drive_and_contacts(s) == (False, False)
    s.board.enabled = True
    s.faults.rcd_trip = True
    assert drive_and_contacts(s) == (False, False)
    s.faults.rcd_trip = False
    s.ev.wants = "B"
    assert drive_and_contacts(s) == (False, False)


def test_faults() -> None:
    s = charging_station()
    s.faults.rcd_trip = True
    assert s.offered == 0 and not s.contactor_closed
    s.faults.rcd_trip = False
    s.faults.pilot_error = "F"
    assert pilot(s) is PilotState.F and not s.contactor_closed
    s.faults.pilot_error = None
    s.faults.overdraw = 4
    assert s.phase_currents == (20.0, 20.0, 20.0)


def test_welded_contacts_stay_closed_and_current_flows_while_the_drive_is_off() -> None:
    s = charging_station(command=10)
    s.ev.max_current = 13
    s.board.cable_limit = 20
    s.faults.welded = True
    assert s.phase_currents == (10.0, 10.0, 10.0)  # driven: the EV follows the offer
    s.board.command = 0
    assert pilot(s) is PilotState.B
    # The board drops the coil (the EVSE DIN's relay bit reads off) ...
    assert not s.relay_on
    # ... but the contacts stay closed, and the EV, with no offer left to
    # follow, draws up to its own and the cable's limit.
    assert s.contactor_closed
    assert s.phase_currents == (13.0, 13.0, 13.0)
    s.advance(0.0)
    s.advance(3600.0)
    assert s.energy_wh == pytest.approx(3 * 230 * 13)
    assert s.to_json()["relay_on"] is False
    assert s.to_json()["contactor_closed"] is True


def test_welded_but_the_ev_paused_draws_only_an_overdraw() -> None:
    s = charging_station(command=0)
    s.faults.welded = True
    s.ev.wants = "B"
    assert s.contactor_closed and not s.relay_on
    assert s.phase_currents == (0.0, 0.0, 0.0)
    s.faults.overdraw = 2
    assert s.phase_currents == (2.0, 2.0, 2.0)


def test_failsafe_watchdog_applies_the_failsafe_current() -> None:
    s = charging_station(command=16)
    s.board.failsafe_timeout = 2.0
    s.board.failsafe_current = 8.0
    s.board_contacted(10.0)
    s.advance(11.9)
    assert s.offered == 16
    s.advance(12.0)
    assert s.board.failsafe_tripped
    assert s.offered == 8
    s.board_contacted(12.5)
    assert s.offered == 16
