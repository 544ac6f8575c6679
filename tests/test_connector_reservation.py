"""The connector's Reserved state, beyond tests/test_connector.py: whose the
reservation is, its id in the transaction it leads to, replacement by the
same id, and what a lapsed authorization gives back (OCPP 1.6 5.13).

Pure: no I/O, exact effects.
"""

from __future__ import annotations

from collections.abc import Sequence

from evse.connector import (
    CONNECTION_TIMER,
    RESERVATION_TIMER,
    Authorized,
    AvailabilityChanged,
    BeginTransaction,
    CancelTimer,
    Connector,
    ErrorCode,
    Fault,
    FaultRaised,
    LimitChanged,
    MeterSample,
    PilotChanged,
    Reservation,
    ReservationMade,
    StartTimer,
    State,
    Status,
    StatusChanged,
    StopReason,
    StopRequested,
    TimerExpired,
)
from fieldbus.boards import PilotState as P


def reserved(
    tag: str = "TAG1", parent: str | None = None, deadline: float = 100.0, rid: int = 7
) -> Connector:
    c = Connector(connection_timeout=60)
    c.start()
    c.handle(MeterSample(1000.0), 0)
    c.handle(LimitChanged(16.0), 0)
    c.handle(ReservationMade(rid, tag, deadline, parent), 1)
    assert c.state is State.RESERVED
    return c


def begins(effects: Sequence[object]) -> list[BeginTransaction]:
    return [e for e in effects if isinstance(e, BeginTransaction)]


def test_the_reservation_id_goes_with_a_claim_made_before_plug_in() -> None:
    c = reserved()
    c.handle(Authorized("TAG1"), 2)
    assert c.state is State.AUTHORIZED
    assert c.snapshot.reservation is None
    assert c.snapshot.claimed == Reservation(7, "TAG1", None, 100.0)
    assert begins(c.handle(PilotChanged(P.B), 3)) == [
        BeginTransaction("TAG1", 1000.0, reservation_id=7)
    ]
    assert c.snapshot.claimed is None


def test_a_transaction_without_a_reservation_has_no_reservation_id() -> None:
    c = reserved()
    c.handle(PilotChanged(P.B), 2)
    c.handle(Authorized("TAG1"), 3)
    assert c.snapshot.in_transaction
    c.handle(StopRequested(StopReason.LOCAL), 4)
    c.handle(PilotChanged(P.A), 5)
    c.handle(PilotChanged(P.B), 6)
    assert begins(c.handle(Authorized("TAG1"), 7)) == [BeginTransaction("TAG1", 1000.0)]


def test_id_tags_claim_case_insensitively_and_through_the_parent() -> None:
    c = reserved("abc123")
    c.handle(Authorized("ABC123"), 2)
    assert c.snapshot.claimed is not None
    c = reserved("CARD1", parent="fleet")
    c.handle(Authorized("CARD9", parent_id_tag="FLEET"), 2)
    assert c.snapshot.claimed is not None
    # A tag without a parent never matches a reservation's parent.
    assert Reservation(1, "CARD1", "FLEET", 1.0).claimed_by(Authorized("CARD9")) is False
    assert Reservation(1, "CARD1", None, 1.0).claimed_by(Authorized("X", "FLEET")) is False


def test_another_tag_can_take_over_neither_the_reservation_nor_its_claim() -> None:
    c = reserved()
    assert c.handle(Authorized("OTHER"), 2) == []
    c.handle(Authorized("TAG1"), 3)
    assert c.handle(Authorized("OTHER"), 4) == []
    assert c.snapshot.id_tag == "TAG1"
    # The same tag again restarts the wait for the EV.
    assert c.handle(Authorized("TAG1"), 5) == [StartTimer(CONNECTION_TIMER, 65)]


def test_a_lapsed_authorization_gives_the_reservation_back_until_its_expiry() -> None:
    c = reserved(deadline=100.0)
    c.handle(Authorized("TAG1"), 2)  # ConnectionTimeOut 60 s: lapses at 62
    assert c.handle(TimerExpired(CONNECTION_TIMER), 62) == [
        StartTimer(RESERVATION_TIMER, 100.0),
        StatusChanged(Status.RESERVED, ErrorCode.NO_ERROR),
    ]
    assert c.snapshot.reservation == Reservation(7, "TAG1", None, 100.0)
    assert c.snapshot.claimed is None
    assert c.handle(TimerExpired(RESERVATION_TIMER), 100) == [
        CancelTimer(RESERVATION_TIMER),
        StatusChanged(Status.AVAILABLE, ErrorCode.NO_ERROR),
    ]


def test_a_lapse_after_the_expiry_leaves_the_connector_available() -> None:
    c = reserved(deadline=30.0)
    c.handle(Authorized("TAG1"), 2)
    assert c.handle(TimerExpired(CONNECTION_TIMER), 62) == [
        StatusChanged(Status.AVAILABLE, ErrorCode.NO_ERROR)
    ]
    assert c.snapshot.reservation is None and c.snapshot.claimed is None


def test_a_fault_or_unavailability_ends_a_claimed_reservation() -> None:
    c = reserved()
    c.handle(Authorized("TAG1"), 2)
    c.handle(FaultRaised(Fault.RCD_TRIP), 3)
    assert c.snapshot.claimed is None and c.snapshot.reservation is None
    c = reserved()
    c.handle(Authorized("TAG1"), 2)
    c.handle(AvailabilityChanged(False), 3)
    assert c.state is State.UNAVAILABLE
    assert c.snapshot.claimed is None


def test_the_same_reservation_id_replaces_it_an_ev_plugged_in_or_not() -> None:
    c = reserved("TAG1", deadline=100.0)
    c.handle(PilotChanged(P.B), 2)
    assert c.handle(ReservationMade(7, "TAG2", 500.0, "FLEET"), 3) == [
        StartTimer(RESERVATION_TIMER, 500.0)
    ]
    assert c.snapshot.reservation == Reservation(7, "TAG2", "FLEET", 500.0)
    assert c.status is Status.RESERVED
    # Another id changes nothing (the station answers Occupied).
    assert c.handle(ReservationMade(8, "TAG3", 900.0), 4) == []
    assert c.snapshot.reservation == Reservation(7, "TAG2", "FLEET", 500.0)
    # The replaced tag no longer claims it; the new one does.
    assert c.handle(Authorized("TAG1"), 5) == []
    assert begins(c.handle(Authorized("TAG2"), 6)) == [
        BeginTransaction("TAG2", 1000.0, reservation_id=7)
    ]
