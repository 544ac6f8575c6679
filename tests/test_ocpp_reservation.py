"""The Reservation profile (ocpp16/profiles/reservation.py) in the charge point's
session: ReserveNow / CancelReservation answered for the station, connector 0
per ReserveConnectorZeroSupported, the expiry turned into the station's clock,
the parent of a tag (local list or cache, else Authorize), the reservationId in
StartTransaction, and what the product's port registers.

No sockets: tests/chargepoint_rig.py (a central system on a second RpcSession
that checks every frame against the OCPP 1.6 schemas), virtual time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ocpp16.chargepoint import Identity
from ocpp16.metering import format_time
from ocpp16.profiles.reservation import ReservationProfile, parse_time
from ocpp16.rpc import IncomingCall
from tests.chargepoint_rig import EPOCH, CentralSystem, FakeStation, Rig, open_rig, settle


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


@dataclass
class ReservingStation(FakeStation):
    """FakeStation with the profile's ``ReservationControl``."""

    reserve_result: str = "Accepted"
    held: set[int] = field(default_factory=set)

    async def reserve(
        self,
        connector_id: int,
        reservation_id: int,
        id_tag: str,
        expiry: datetime,
        parent_id_tag: str | None,
    ) -> str:
        await trio.lowlevel.checkpoint()
        self._record("reserve", connector_id, reservation_id, id_tag, expiry, parent_id_tag)
        if self.reserve_result == "Accepted":
            self.held.add(reservation_id)
        return self.reserve_result

    async def cancel_reservation(self, reservation_id: int) -> bool:
        await trio.lowlevel.checkpoint()
        self._record("cancel_reservation", reservation_id)
        if reservation_id in self.held:
            self.held.discard(reservation_id)
            return True
        return False


async def up(rig: Rig, **auto: Any) -> CentralSystem:
    """Connected and registered."""
    cs = await rig.connect(**auto)
    await settle(lambda: rig.cp.online, "registered")
    return cs


def with_profile(rig: Rig, **kwargs: Any) -> ReservationProfile:
    assert isinstance(rig.station, ReservingStation)
    profile = ReservationProfile(rig.cp, rig.station, **kwargs)
    rig.cp.register(profile)
    return profile


def ahead(hours: float) -> str:
    """A central-system time ``hours`` from now."""
    return format_time(datetime.now(UTC) + timedelta(hours=hours))


def reserve_now(cid: int, rid: int = 7, tag: str = "TAG1", **extra: Any) -> dict[str, Any]:
    return {"connectorId": cid, "expiryDate": ahead(1), "idTag": tag, "reservationId": rid, **extra}


def shifted_boot(offset: timedelta) -> Any:
    """A BootNotification answer whose currentTime is ``offset`` ahead of the station."""

    def answer(call: IncomingCall) -> dict[str, Any]:
        now = format_time(datetime.now(UTC) + offset)
        return {"status": "Accepted", "currentTime": now, "interval": 3600}

    return answer


async def test_reserve_now_is_answered_by_the_station_for_its_connector(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = ReservingStation()
    async with open_rig(tmp_path, clock, station=station) as rig:
        with_profile(rig)
        cs = await up(rig)
        for result in ("Accepted", "Occupied", "Faulted", "Unavailable", "Rejected"):
            station.reserve_result = result
            answer = await cs.result("ReserveNow", reserve_now(1, parentIdTag="FLEET"))
            assert answer == {"status": result}
        (first, *_) = station.called("reserve")
        assert first[:3] == (1, 7, "TAG1") and first[4] == "FLEET"


async def test_connector_zero_is_the_charge_point_unknown_connectors_are_rejected(
    tmp_path: Path, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    station = ReservingStation()
    async with open_rig(tmp_path, clock, station=station) as rig:
        with_profile(rig)
        cs = await up(rig)
        assert rig.config.get_bool("ReserveConnectorZeroSupported") is True
        assert await cs.result("ReserveNow", reserve_now(0)) == {"status": "Accepted"}
        assert station.called("reserve")[-1][0] == 0
        assert await cs.result("ReserveNow", reserve_now(2, rid=8)) == {"status": "Rejected"}
        assert await cs.result("ReserveNow", reserve_now(-1, rid=9)) == {"status": "Rejected"}
        # With the key false (a station with several connectors might say so): Rejected.
        real = rig.config.get_bool
        monkeypatch.setattr(
            rig.config,
            "get_bool",
            lambda name: name != "ReserveConnectorZeroSupported" and real(name),
        )
        assert await cs.result("ReserveNow", reserve_now(0, rid=10)) == {"status": "Rejected"}
        assert len(station.called("reserve")) == 1  # the station was asked only once


async def test_the_expiry_is_turned_into_the_stations_clock(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = ReservingStation()
    offset = timedelta(hours=2)
    async with open_rig(tmp_path, clock, station=station) as rig:
        with_profile(rig)
        cs = await up(rig, BootNotification=shifted_boot(offset))
        expiry = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
        payload = {**reserve_now(1), "expiryDate": "2031-01-02T03:04:05Z"}
        assert await cs.result("ReserveNow", payload) == {"status": "Accepted"}
        station_expiry = station.called("reserve")[-1][3]
        assert abs(station_expiry - (expiry - offset)) < timedelta(seconds=1)


async def test_a_malformed_expiry_is_a_call_error_and_asks_nothing(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = ReservingStation()
    async with open_rig(tmp_path, clock, station=station) as rig:
        with_profile(rig)
        cs = await up(rig)
        # Sent raw: the rig's central system would not send it.
        bad = {**reserve_now(1), "expiryDate": "tomorrow"}
        cs.send_raw(json.dumps([2, "bad-expiry", "ReserveNow", bad]))
        frame = await cs.stray()
        assert frame[:3] == [4, "bad-expiry", "PropertyConstraintViolation"]
        assert station.called("reserve") == []
    assert parse_time("2031-01-02T03:04:05").tzinfo is UTC  # no zone: UTC


async def test_cancel_reservation_accepted_only_for_a_held_one(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = ReservingStation()
    async with open_rig(tmp_path, clock, station=station) as rig:
        with_profile(rig)
        cs = await up(rig)
        assert await cs.result("CancelReservation", {"reservationId": 3}) == {"status": "Rejected"}
        assert await cs.result("ReserveNow", reserve_now(1, rid=3)) == {"status": "Accepted"}
        assert await cs.result("CancelReservation", {"reservationId": 3}) == {"status": "Accepted"}
        assert await cs.result("CancelReservation", {"reservationId": 3}) == {"status": "Rejected"}


async def test_the_parent_comes_from_the_local_list_else_from_authorize(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    local = {"CARD1": "FLEET"}
    station = ReservingStation()
    async with open_rig(tmp_path, clock, station=station) as rig:
        profile = with_profile(rig, local_parent=local.get)
        assert await profile.parent_of("CARD2") is None  # offline, unknown locally
        cs = await up(
            rig,
            Authorize=lambda call: {
                "idTagInfo": {"status": "Accepted", "parentIdTag": "OTHERFLEET"}
                if call.payload["idTag"] == "CARD2"
                else {"status": "Accepted"}
            },
        )
        assert await profile.parent_of("CARD1") == "FLEET"
        assert cs.payloads("Authorize") == []  # known locally: no Authorize
        assert await profile.parent_of("CARD2") == "OTHERFLEET"
        assert await profile.parent_of("CARD3") is None
        assert cs.payloads("Authorize") == [{"idTag": "CARD2"}, {"idTag": "CARD3"}]


async def test_start_transaction_carries_the_reservation_id(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await up(
            rig,
            StartTransaction=lambda call: {"transactionId": 5, "idTagInfo": {"status": "Accepted"}},
        )
        await rig.cp.transaction_started(
            local_id=1,
            connector_id=1,
            id_tag="TAG1",
            meter_start_wh=10.0,
            timestamp=EPOCH,
            reservation_id=7,
        )
        await rig.cp.transaction_started(
            local_id=2, connector_id=1, id_tag="TAG1", meter_start_wh=20.0, timestamp=EPOCH
        )
        await settle(lambda: len(cs.payloads("StartTransaction")) == 2, "two starts")
        first, second = cs.payloads("StartTransaction")
        assert first["reservationId"] == 7
        assert "reservationId" not in second


def test_the_port_registers_reservation_and_remote_trigger(tmp_path: Path) -> None:
    from evse.ocpp_port import OcppPort  # noqa: PLC0415
    from evse.store import Store  # noqa: PLC0415
    from ocpp16.config import Configuration  # noqa: PLC0415
    from ocpp16.queue import TransactionQueue  # noqa: PLC0415

    path = tmp_path / "station.db"
    with Store.open(path) as store:
        queue = TransactionQueue.open(path)
        try:
            port = OcppPort(
                config=Configuration(store),
                queue=queue,
                identity=Identity(vendor="v", model="m", serial="s", firmware_version="1"),
            )
            names = port.chargepoint.profiles.names
            assert {"Core", "Reservation", "RemoteTrigger"} <= set(names)
            assert port.chargepoint.profiles.handler("ReserveNow") is not None
            assert port.chargepoint.profiles.handler("TriggerMessage") is not None
        finally:
            queue.close()
