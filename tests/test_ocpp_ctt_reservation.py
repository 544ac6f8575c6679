"""OCPP 1.6 Reservation profile, end to end, named after the OCA compliance cases.

The station runs as a process (``evse run --sim``), the central system is
ops/csms.py (the ocpp package's own asyncio runtime) in a process of its own,
over real sockets, as in tests/test_ocpp_ctt.py. Each docstring says what the
OCTT 1.6 case checks and what is judged here (from the central system's
record of the frames it received, in their order). Expiry times are the
central system's clock (the same machine's: the offset is about 0).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ocpp16.metering import format_time
from tests.csms_peer import Csms, call_result, configure, messages, running_csms, wait_for
from tests.ocpp_harness import CP, TAG, StationProcess, booted, calls, station, until
from tests.sim_control import control

pytestmark = pytest.mark.slow


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms() as cs:
        yield cs


def expiry(seconds: float) -> str:
    return format_time(datetime.now(UTC) + timedelta(seconds=seconds))


def reserve(
    csms: Csms, connector: int = 1, rid: int = 7, tag: str = TAG, seconds: float = 600, **extra: Any
) -> str:
    payload = {
        "connectorId": connector,
        "expiryDate": expiry(seconds),
        "idTag": tag,
        "reservationId": rid,
        **extra,
    }
    status: str = call_result(csms, CP, "ReserveNow", payload)["status"]
    return status


def last_seq(csms: Csms) -> int:
    received = messages(csms, CP)
    return int(received[-1]["seq"]) if received else 0


def statuses_since(csms: Csms, since: int, connector: int = 1) -> list[str]:
    return [
        m["payload"]["status"]
        for m in calls(csms, "StatusNotification")
        if m["seq"] > since and m["payload"]["connectorId"] == connector
    ]


def wait_status_notified(csms: Csms, status: str, since: int, connector: int = 1) -> None:
    until(
        lambda: status in statuses_since(csms, since, connector),
        20,
        f"StatusNotification {status} on connector {connector}",
    )


def start_with_reservation(st: StationProcess, csms: Csms, tag: str = TAG) -> dict[str, Any]:
    """The reserved tag, then the EV: the StartTransaction it leads to."""
    assert st.present(tag)["status"] == "Accepted"
    st.plug()
    start = wait_for(csms, CP, "StartTransaction", within=20)
    st.wait_status("Charging")
    return start


def test_tc_046_reserve_now_accepted_and_used_by_its_tag(csms: Csms, tmp_path: Path) -> None:
    """TC_046 Reservation of a Connector - Local start transaction: ReserveNow for
    connector 1 is Accepted, the connector reports Reserved; the reserved idTag
    is presented and the EV plugged in; the StartTransaction carries that idTag
    and the reservationId, and the connector goes Charging."""
    with station(csms, tmp_path) as st:
        booted(csms)
        since = last_seq(csms)
        assert reserve(csms, rid=46) == "Accepted"
        wait_status_notified(csms, "Reserved", since)
        st.wait_status("Reserved")
        start = start_with_reservation(st, csms)
        assert start["payload"]["idTag"] == TAG
        assert start["payload"]["reservationId"] == 46
        assert start["payload"]["connectorId"] == 1
        seq = statuses_since(csms, since)
        assert seq[0] == "Reserved" and "Charging" in seq


def test_reserved_connector_refuses_another_tag(csms: Csms, tmp_path: Path) -> None:
    """A reservation refused to another tag: a tag the central system accepts, but
    not the reserved one, neither starts a transaction locally nor remotely; the
    connector stays Reserved and the reserved tag can still use it."""
    with station(csms, tmp_path) as st:
        booted(csms)
        assert reserve(csms, rid=5) == "Accepted"
        st.wait_status("Reserved")
        st.plug()
        st.present("OTHER123")  # Accepted by the central system, not this reservation's
        answer = call_result(csms, CP, "RemoteStartTransaction", {"idTag": "OTHER456"})
        assert answer == {"status": "Rejected"}
        time.sleep(2)
        assert st.status()["status"] == "Reserved"
        assert calls(csms, "StartTransaction") == []
        st.present(TAG)
        start = wait_for(csms, CP, "StartTransaction", within=20)
        assert (start["payload"]["idTag"], start["payload"]["reservationId"]) == (TAG, 5)


def test_tc_047_reservation_expires(csms: Csms, tmp_path: Path) -> None:
    """TC_047 Reservation of a Connector - Expire: a reservation whose expiryDate
    passes without being used ends; the connector reports Available (at the
    expiry, on the station's clock) and no transaction starts."""
    with station(csms, tmp_path) as st:
        booted(csms)
        since = last_seq(csms)
        ends = datetime.now(UTC) + timedelta(seconds=4)
        payload = {
            "connectorId": 1,
            "expiryDate": format_time(ends),
            "idTag": TAG,
            "reservationId": 47,
        }
        assert call_result(csms, CP, "ReserveNow", payload) == {"status": "Accepted"}
        wait_status_notified(csms, "Reserved", since)
        wait_status_notified(csms, "Available", since)
        available = next(
            m
            for m in calls(csms, "StatusNotification")
            if m["seq"] > since
            and m["payload"]["connectorId"] == 1
            and m["payload"]["status"] == "Available"
        )
        at = datetime.fromisoformat(available["payload"]["timestamp"].replace("Z", "+00:00"))
        assert ends - timedelta(seconds=0.3) <= at <= ends + timedelta(seconds=2)
        assert st.status()["status"] == "Available"
        assert calls(csms, "StartTransaction") == []


def test_tc_048_1_reserve_now_faulted(csms: Csms, tmp_path: Path) -> None:
    """TC_048_1 Reservation of a Connector - Faulted: with the connector Faulted,
    ReserveNow is answered Faulted and nothing is reserved."""
    with station(csms, tmp_path) as st:
        booted(csms)
        control(st.sim, "POST", "/faults/rcd_trip")
        st.wait_status("Faulted")
        assert reserve(csms) == "Faulted"
        control(st.sim, "DELETE", "/faults/rcd_trip")
        st.wait_status("Available")


def test_tc_048_2_reserve_now_occupied(csms: Csms, tmp_path: Path) -> None:
    """TC_048_2 Reservation of a Connector - Occupied: with a transaction on the
    connector (and with an EV plugged in, Preparing), ReserveNow is Occupied;
    so is a second reservation with another reservationId."""
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        assert reserve(csms) == "Occupied"
        st.present()
        st.wait_status("Charging")
        assert reserve(csms) == "Occupied"
        st.present()  # stop
        st.unplug()
        st.wait_status("Available")
        assert reserve(csms, rid=1) == "Accepted"
        assert reserve(csms, rid=2) == "Occupied"


def test_tc_048_3_reserve_now_unavailable(csms: Csms, tmp_path: Path) -> None:
    """TC_048_3 Reservation of a Connector - Unavailable: after ChangeAvailability
    Inoperative, ReserveNow is Unavailable."""
    with station(csms, tmp_path) as st:
        booted(csms)
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"}
        )
        assert answer == {"status": "Accepted"}
        st.wait_status("Unavailable")
        assert reserve(csms) == "Unavailable"


def test_tc_048_4_reserve_now_rejected(csms: Csms, tmp_path: Path) -> None:
    """TC_048_4 Reservation of a Connector - Rejected: the charge point rejects a
    reservation it cannot make. Here: a connector it does not have, and an
    expiryDate already past; the connector stays Available."""
    with station(csms, tmp_path) as st:
        booted(csms)
        assert reserve(csms, connector=2) == "Rejected"
        assert reserve(csms, seconds=-60) == "Rejected"
        assert st.status()["status"] == "Available"


def test_tc_049_reserve_connector_zero(csms: Csms, tmp_path: Path) -> None:
    """TC_049 Reservation of a Charge Point - Transaction: ReserveConnectorZeroSupported
    is true (R) on this one-connector station, so ReserveNow for connector 0 is
    Accepted and its one connector reports Reserved (connector 0, the charge
    point, stays Available); the reserved tag starts on connector 1 with the
    reservationId."""
    with station(csms, tmp_path) as st:
        booted(csms)
        got = call_result(csms, CP, "GetConfiguration", {"key": ["ReserveConnectorZeroSupported"]})
        assert got["configurationKey"] == [
            {"key": "ReserveConnectorZeroSupported", "readonly": True, "value": "true"}
        ]
        since = last_seq(csms)
        assert reserve(csms, connector=0, rid=49) == "Accepted"
        wait_status_notified(csms, "Reserved", since)
        assert statuses_since(csms, since, connector=0) == []
        start = start_with_reservation(st, csms)
        assert (start["payload"]["connectorId"], start["payload"]["reservationId"]) == (1, 49)


def test_tc_051_cancel_reservation(csms: Csms, tmp_path: Path) -> None:
    """TC_051 Cancel Reservation: a reservation is made (Reserved), then cancelled
    with its reservationId: Accepted, and the connector reports Available."""
    with station(csms, tmp_path) as st:
        booted(csms)
        since = last_seq(csms)
        assert reserve(csms, rid=51) == "Accepted"
        wait_status_notified(csms, "Reserved", since)
        answer = call_result(csms, CP, "CancelReservation", {"reservationId": 51})
        assert answer == {"status": "Accepted"}
        wait_status_notified(csms, "Available", since)
        assert statuses_since(csms, since) == ["Reserved", "Available"]
        assert st.status()["status"] == "Available"


def test_tc_052_cancel_unknown_reservation(csms: Csms, tmp_path: Path) -> None:
    """TC_052 Cancel Reservation - Rejected: CancelReservation for a reservationId
    the charge point does not hold is Rejected (and a held one stays)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        answer = call_result(csms, CP, "CancelReservation", {"reservationId": 52})
        assert answer == {"status": "Rejected"}
        assert reserve(csms, rid=1) == "Accepted"
        answer = call_result(csms, CP, "CancelReservation", {"reservationId": 52})
        assert answer == {"status": "Rejected"}
        assert st.status()["status"] == "Reserved"


def test_tc_053_reserve_with_parent_id_tag(csms: Csms, tmp_path: Path) -> None:
    """TC_053 Use a reserved Connector with parentIdTag: ReserveNow with an idTag
    and a parentIdTag; another idTag whose Authorize.conf gives the same
    parentIdTag may use the reservation (a tag with another parent may not):
    its StartTransaction carries the reservationId."""
    with station(csms, tmp_path) as st:
        booted(csms)
        configure(csms, authorize={"parents": {"CHILD001": "FLEET01", "STRANGER1": "FLEET02"}})
        assert reserve(csms, rid=53, tag="OWNER001", parentIdTag="FLEET01") == "Accepted"
        st.wait_status("Reserved")
        st.present("STRANGER1")
        time.sleep(1)
        assert st.status()["status"] == "Reserved"
        start = start_with_reservation(st, csms, "CHILD001")
        assert start["payload"]["idTag"] == "CHILD001"
        assert start["payload"]["reservationId"] == 53
        authorized = [m["payload"]["idTag"] for m in calls(csms, "Authorize")]
        assert "CHILD001" in authorized  # the parent was learned through Authorize


def test_reservation_survives_a_restart(csms: Csms, tmp_path: Path) -> None:
    """A reservation survives a reboot until its expiry: after a restart the first
    status the connector reports is Reserved, and the reserved tag still starts
    with the reservationId."""
    with station(csms, tmp_path) as st:
        booted(csms)
        assert reserve(csms, rid=77) == "Accepted"
        st.wait_status("Reserved")
        assert st.stop()[0] == 0
    since = last_seq(csms)
    with station(csms, tmp_path) as st:
        booted(csms, 2)
        wait_status_notified(csms, "Reserved", since)
        assert statuses_since(csms, since)[0] == "Reserved"
        start = start_with_reservation(st, csms)
        assert start["payload"]["reservationId"] == 77
