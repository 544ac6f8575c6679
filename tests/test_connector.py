"""The connector state machine, table-driven: no I/O, exact effects."""

from __future__ import annotations

import pytest

from evse.connector import (
    CONNECTION_TIMER,
    RESERVATION_TIMER,
    TRANSITIONS,
    Authorized,
    AvailabilityChanged,
    BeginTransaction,
    CancelTimer,
    Connector,
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
    StartTimer,
    State,
    Status,
    StatusChanged,
    StopReason,
    StopRequested,
    TimerExpired,
)
from evse.errors import IllegalTransition
from fieldbus.boards import PilotState as P


def ready(limit: float = 16.0, energy: float = 1000.0) -> Connector:
    c = Connector(connection_timeout=60)
    c.start()
    c.handle(MeterSample(energy), 0)
    c.handle(LimitChanged(limit), 0)
    return c


def charging(tag: str = "TAG1") -> Connector:
    c = ready()
    c.handle(PilotChanged(P.B), 1)
    c.handle(Authorized(tag), 2)
    c.handle(PilotChanged(P.C), 3)
    assert c.state is State.CHARGING
    return c


def test_start_switches_off_and_reports_available() -> None:
    c = Connector()
    assert c.start() == [SetCurrent(0.0), StatusChanged(Status.AVAILABLE, ErrorCode.NO_ERROR)]


def test_plug_in_first_then_authorize_tc_003() -> None:
    c = ready()
    assert c.handle(PilotChanged(P.B), 1) == [StatusChanged(Status.PREPARING, ErrorCode.NO_ERROR)]
    # The record comes before the current that lets the board close the contactor.
    assert c.handle(Authorized("TAG1"), 2) == [
        CancelTimer(CONNECTION_TIMER),
        BeginTransaction("TAG1", 1000.0),
        SetCurrent(16.0),
        StatusChanged(Status.SUSPENDED_EV, ErrorCode.NO_ERROR),
    ]
    assert c.handle(PilotChanged(P.C), 3) == [StatusChanged(Status.CHARGING, ErrorCode.NO_ERROR)]


def test_authorize_first_then_plug_in_tc_004() -> None:
    c = ready()
    assert c.handle(Authorized("TAG1"), 10) == [
        StartTimer(CONNECTION_TIMER, 70),
        StatusChanged(Status.PREPARING, ErrorCode.NO_ERROR),
    ]
    effects = c.handle(PilotChanged(P.B), 20)
    assert effects[:3] == [
        CancelTimer(CONNECTION_TIMER),
        BeginTransaction("TAG1", 1000.0),
        SetCurrent(16.0),
    ]
    assert c.state is State.SUSPENDED_EV


def test_connection_timeout_drops_the_authorization() -> None:
    c = ready()
    c.handle(Authorized("TAG1"), 10)
    assert c.handle(TimerExpired(CONNECTION_TIMER), 70) == [
        StatusChanged(Status.AVAILABLE, ErrorCode.NO_ERROR)
    ]
    # Plugging in afterwards does not start a transaction.
    c.handle(PilotChanged(P.B), 80)
    assert c.state is State.PLUGGED


def test_a_second_card_while_waiting_restarts_the_wait() -> None:
    c = ready()
    c.handle(Authorized("TAG1"), 10)
    assert c.handle(Authorized("TAG2"), 30) == [StartTimer(CONNECTION_TIMER, 90)]
    effects = c.handle(PilotChanged(P.B), 40)
    assert BeginTransaction("TAG2", 1000.0) in effects


@pytest.mark.parametrize(
    ("events", "state", "status"),
    [
        ([PilotChanged(P.C)], State.CHARGING, Status.CHARGING),
        ([PilotChanged(P.D)], State.CHARGING, Status.CHARGING),
        ([PilotChanged(P.B)], State.SUSPENDED_EV, Status.SUSPENDED_EV),
        ([LimitChanged(0.0)], State.SUSPENDED_EVSE, Status.SUSPENDED_EVSE),
        ([LimitChanged(0.0), LimitChanged(10.0)], State.CHARGING, Status.CHARGING),
        ([StopRequested(StopReason.REMOTE)], State.FINISHING, Status.FINISHING),
        ([PilotChanged(P.A)], State.IDLE, Status.AVAILABLE),
        ([StopRequested(StopReason.LOCAL), PilotChanged(P.A)], State.IDLE, Status.AVAILABLE),
        ([FaultRaised(Fault.RCD_TRIP)], State.FAULTED, Status.FAULTED),
        ([PilotChanged(P.E)], State.FAULTED, Status.FAULTED),
        ([AvailabilityChanged(False)], State.CHARGING, Status.CHARGING),
        ([AvailabilityChanged(False), PilotChanged(P.A)], State.UNAVAILABLE, Status.UNAVAILABLE),
        ([TimerExpired(CONNECTION_TIMER)], State.CHARGING, Status.CHARGING),
        ([Authorized("SOMEONE ELSE")], State.CHARGING, Status.CHARGING),
        ([Authorized("TAG1")], State.FINISHING, Status.FINISHING),
    ],
)
def test_from_charging(events: list[Event], state: State, status: Status) -> None:
    c = charging()
    for i, event in enumerate(events):
        c.handle(event, 10 + i)
    assert c.state is state
    assert c.status is status


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (PilotChanged(P.A), StopReason.EV_DISCONNECTED),
        (StopRequested(StopReason.REMOTE), StopReason.REMOTE),
        (StopRequested(StopReason.REBOOT), StopReason.REBOOT),
        (StopRequested(StopReason.SOFT_RESET), StopReason.SOFT_RESET),
        (StopRequested(StopReason.HARD_RESET), StopReason.HARD_RESET),
        (StopRequested(StopReason.EMERGENCY_STOP), StopReason.EMERGENCY_STOP),
        (StopRequested(StopReason.UNLOCK_COMMAND), StopReason.UNLOCK_COMMAND),
        (StopRequested(StopReason.DE_AUTHORIZED), StopReason.DE_AUTHORIZED),
        (Authorized("TAG1"), StopReason.LOCAL),
        (FaultRaised(Fault.OVER_CURRENT), StopReason.OTHER),
    ],
)
def test_every_stop_switches_off_before_the_record(event: Event, reason: StopReason) -> None:
    c = charging()
    c.handle(MeterSample(1500.0), 9)
    effects = c.handle(event, 10)
    ends = [e for e in effects if isinstance(e, EndTransaction)]
    assert len(ends) == 1
    assert ends[0].reason is reason
    assert ends[0].meter_stop_wh == 1500.0
    assert effects.index(SetCurrent(0.0)) < effects.index(ends[0])


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.RCD_TRIP, ErrorCode.GROUND_FAILURE),
        (Fault.PILOT_ERROR, ErrorCode.EV_COMMUNICATION_ERROR),
        (Fault.OVER_CURRENT, ErrorCode.OVER_CURRENT_FAILURE),
        (Fault.WELDED, ErrorCode.POWER_SWITCH_FAILURE),
        (Fault.BOARD_SILENT, ErrorCode.INTERNAL_ERROR),
        (Fault.METER_SILENT, ErrorCode.POWER_METER_FAILURE),
        (Fault.BOARD_ERROR, ErrorCode.OTHER_ERROR),
        (Fault.INTERNAL, ErrorCode.INTERNAL_ERROR),
    ],
)
def test_faults_map_to_ocpp_error_codes(fault: Fault, code: ErrorCode) -> None:
    for c in (ready(), charging()):
        effects = c.handle(FaultRaised(fault, "detail"), 10)
        assert effects[0] == SetCurrent(0.0)
        assert effects[-1] == StatusChanged(Status.FAULTED, code, f"{fault.value}: detail")


def test_fault_clears_back_to_finishing_or_available() -> None:
    c = charging()
    c.handle(FaultRaised(Fault.RCD_TRIP), 10)
    c.handle(FaultRaised(Fault.OVER_CURRENT), 11)
    c.handle(FaultCleared(Fault.RCD_TRIP), 12)
    assert c.state is State.FAULTED
    assert c.error_code is ErrorCode.OVER_CURRENT_FAILURE
    assert c.handle(FaultCleared(Fault.OVER_CURRENT), 13) == [
        StatusChanged(Status.FINISHING, ErrorCode.NO_ERROR)
    ]
    c.handle(PilotChanged(P.A), 14)
    assert c.status is Status.AVAILABLE


def test_welded_contactor_latches_until_an_installer_resets_it() -> None:
    c = charging()
    c.handle(StopRequested(StopReason.LOCAL), 10)
    c.handle(FaultRaised(Fault.WELDED, "feedback closed while off"), 11)
    c.handle(FaultCleared(Fault.WELDED), 12)
    assert c.state is State.FAULTED
    c.handle(PilotChanged(P.A), 13)
    # Nothing closes the contactor again: no authorization is even accepted.
    with pytest.raises(IllegalTransition, match=r"Authorized.*faulted"):
        c.handle(Authorized("TAG1"), 14)
    assert c.handle(ResetFaults(), 15) == [StatusChanged(Status.AVAILABLE, ErrorCode.NO_ERROR)]


def test_pilot_error_clears_when_the_pilot_is_back() -> None:
    c = ready()
    c.handle(PilotChanged(P.F), 1)
    assert c.status is Status.FAULTED
    c.handle(PilotChanged(P.B), 2)
    assert c.state is State.FINISHING


def test_no_meter_reading_holds_the_start_until_the_first_one() -> None:
    c = Connector(connection_timeout=60)
    c.start()
    c.handle(LimitChanged(16), 0)
    c.handle(PilotChanged(P.B), 1)
    effects = c.handle(Authorized("TAG1"), 2)
    # No meterStart yet: no transaction, no current, no fault; the wait is bounded.
    assert not any(isinstance(e, BeginTransaction | SetCurrent) for e in effects)
    assert StartTimer(CONNECTION_TIMER, 62) in effects
    assert c.status is Status.PREPARING
    assert c.error_code is ErrorCode.NO_ERROR
    effects = c.handle(MeterSample(500.0), 3)
    assert effects[:3] == [
        CancelTimer(CONNECTION_TIMER),
        BeginTransaction("TAG1", 500.0),
        SetCurrent(16.0),
    ]


def test_limit_below_six_amps_is_off_and_back() -> None:
    c = charging()
    assert c.handle(LimitChanged(0.0), 10) == [
        SetCurrent(0.0),
        StatusChanged(Status.SUSPENDED_EVSE, ErrorCode.NO_ERROR),
    ]
    assert c.handle(LimitChanged(8.0), 11) == [
        SetCurrent(8.0),
        StatusChanged(Status.CHARGING, ErrorCode.NO_ERROR),
    ]
    assert c.handle(LimitChanged(8.0), 12) == []


def test_availability() -> None:
    c = ready()
    assert c.handle(AvailabilityChanged(False), 1) == [
        SetCurrent(0.0),
        StatusChanged(Status.UNAVAILABLE, ErrorCode.NO_ERROR),
    ]
    with pytest.raises(IllegalTransition, match="unavailable"):
        c.handle(Authorized("TAG1"), 2)
    c.handle(PilotChanged(P.B), 3)
    assert c.handle(AvailabilityChanged(True), 4) == [
        StatusChanged(Status.PREPARING, ErrorCode.NO_ERROR)
    ]


def test_unavailable_while_faulted_applies_after_the_fault() -> None:
    c = ready()
    c.handle(FaultRaised(Fault.RCD_TRIP), 1)
    c.handle(AvailabilityChanged(False), 2)
    c.handle(FaultCleared(Fault.RCD_TRIP), 3)
    assert c.status is Status.UNAVAILABLE


def test_every_state_lists_every_event_it_accepts() -> None:
    # The table is explicit: each state names its events; the ones it leaves
    # out are refused, never silently ignored.
    events = (
        PilotChanged,
        Authorized,
        StopRequested,
        LimitChanged,
        FaultRaised,
        FaultCleared,
        ResetFaults,
        AvailabilityChanged,
        TimerExpired,
        MeterSample,
        ReservationMade,
        ReservationCancelled,
    )
    refused = {
        (state.value, event.__name__)
        for state in State
        for event in events
        if event not in TRANSITIONS[state]
    }
    assert refused == {("unavailable", "Authorized"), ("faulted", "Authorized")} | {
        # Reserved takes ReserveNow again: the same reservationId replaces it.
        (state.value, "ReservationMade")
        for state in State
        if state not in (State.IDLE, State.RESERVED)
    } | {(state.value, "ReservationCancelled") for state in State if state is not State.RESERVED}


def reserved(tag: str = "TAG1", parent: str | None = None) -> Connector:
    c = ready()
    assert c.handle(ReservationMade(7, tag, 100.0, parent), 1) == [
        StartTimer(RESERVATION_TIMER, 100.0),
        StatusChanged(Status.RESERVED, ErrorCode.NO_ERROR),
    ]
    return c


def test_reservation_holds_the_connector_for_its_tag() -> None:
    c = reserved()
    c.handle(PilotChanged(P.B), 2)
    assert c.status is Status.RESERVED  # plugged in, still waiting for the tag
    assert c.handle(Authorized("OTHER"), 3) == []
    effects = c.handle(Authorized("TAG1"), 4)
    assert effects[:3] == [
        CancelTimer(RESERVATION_TIMER),
        CancelTimer(CONNECTION_TIMER),
        BeginTransaction("TAG1", 1000.0, reservation_id=7),  # its StartTransaction says so
    ]
    assert c.state is State.SUSPENDED_EV


def test_reservation_claimed_through_the_parent_tag_before_plug_in() -> None:
    c = reserved("CARD1", parent="FLEET")
    assert c.handle(Authorized("CARD2", parent_id_tag="OTHERFLEET"), 2) == []
    c.handle(Authorized("CARD2", parent_id_tag="FLEET"), 3)
    assert c.state is State.AUTHORIZED
    c.handle(PilotChanged(P.B), 4)
    assert c.snapshot.in_transaction


def test_reservation_expires_or_is_cancelled() -> None:
    c = reserved()
    assert c.handle(ReservationCancelled(99), 2) == []  # not this reservation
    assert c.handle(TimerExpired(RESERVATION_TIMER), 100) == [
        CancelTimer(RESERVATION_TIMER),
        StatusChanged(Status.AVAILABLE, ErrorCode.NO_ERROR),
    ]
    c = reserved()
    c.handle(PilotChanged(P.B), 2)
    c.handle(ReservationCancelled(7), 3)
    assert c.status is Status.PREPARING


def test_a_fault_or_inoperative_ends_the_reservation() -> None:
    c = reserved()
    c.handle(FaultRaised(Fault.RCD_TRIP), 2)
    assert c.snapshot.reservation is None
    c.handle(FaultCleared(Fault.RCD_TRIP), 3)
    assert c.status is Status.AVAILABLE
    c = reserved()
    effects = c.handle(AvailabilityChanged(False), 2)
    assert CancelTimer(RESERVATION_TIMER) in effects
    assert c.status is Status.UNAVAILABLE


def test_stop_transaction_on_ev_side_disconnect_false_suspends_instead() -> None:
    """StopTransactionOnEVSideDisconnect false (OCPP 1.6 9.1.27): unplugging at the EV
    suspends the transaction (SuspendedEV) until it is plugged in again; set to
    true while the EV is away, the transaction ends then."""
    from evse.connector import StopOnEvDisconnect  # noqa: PLC0415

    c = charging()
    c.handle(StopOnEvDisconnect(False), 4)
    effects = c.handle(PilotChanged(P.A), 5)
    assert not [e for e in effects if isinstance(e, EndTransaction)]
    assert c.status is Status.SUSPENDED_EV
    assert c.snapshot.in_transaction
    c.handle(PilotChanged(P.C), 6)
    assert c.state is State.CHARGING
    c.handle(PilotChanged(P.A), 7)
    effects = c.handle(StopOnEvDisconnect(True), 8)
    assert [e.reason for e in effects if isinstance(e, EndTransaction)] == [
        StopReason.EV_DISCONNECTED
    ]
    assert c.snapshot.state is State.IDLE
