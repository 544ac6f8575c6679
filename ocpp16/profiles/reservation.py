"""The Reservation profile (OCPP 1.6 section 3.1): ReserveNow and CancelReservation.

The reservation itself lives in the station: the connector's Reserved state
(``evse.connector``) holds it, its expiry runs on trio's clock (the
station's timers), and the station keeps it in its SQLite file so that it
holds the connector again after a restart, until its expiry
(``evse.station.Station.reserve``). This module is the OCPP side:

* **ReserveNow** (section 5.13). ``connectorId`` 0 is "any connector of the
  charge point": accepted only with ReserveConnectorZeroSupported (true on
  this one-connector station, see ``ocpp16.config``), and then the station's
  one connector is reserved. An unknown connector is Rejected. The station
  answers for the connector: Accepted (a reservation with the same
  reservationId is replaced), Occupied (a transaction, an EV or an
  authorization, or another reservation), Faulted, Unavailable, or Rejected
  for an expiryDate already past. ``expiryDate`` is the central system's time
  and is turned into the station's clock here (``CentralClock.to_station``).
* **CancelReservation** (section 5.2): Accepted when a reservation with that
  id was held (the connector is Available again), else Rejected.
* **Whose reservation.** A reservation is used by its idTag or, when it has
  a parentIdTag, by any idTag with that parent (section 5.13), compared
  case-insensitively (CiString20Type). The station asks ``parent_of`` for
  the parent of a tag when the authorization did not give one: first
  ``local_parent`` (the local list or the authorization cache:
  ``ocpp16.local_auth.LocalAuth.parent_of``, injected by whoever wires it),
  then, online, an Authorize.req ("If it is not found in the Local
  Authorization List or Authorization Cache, then the Charge Point SHALL
  send an Authorize for the incoming idTag").
* **Its transaction.** The StartTransaction of a transaction that uses a
  reservation carries its ``reservationId``: the station's record keeps it
  (``evse.store.TransactionRecord.reservation_id``), and the payload is built
  from the record (``CoreProfile.start_message``).

A reservation ends with that transaction, at its expiry (the connector
reports Available), with CancelReservation, or when the connector becomes
Faulted or Unavailable (section 5.13). An authorization that claimed it and
lapses before the transaction (ConnectionTimeOut) gives it back until its
expiry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from ocpp16.errors import CallError
from ocpp16.profiles import Handler, Task

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint

log = logging.getLogger(__name__)


class ReservationControl(Protocol):
    """What the profile asks of the station (``evse.ocpp_port.OcppPort``)."""

    async def reserve(
        self,
        connector_id: int,
        reservation_id: int,
        id_tag: str,
        expiry: datetime,
        parent_id_tag: str | None,
    ) -> str:
        """ReserveNow on ``connector_id`` (0: any connector): the ReservationStatus.

        ``expiry`` is on the station's clock."""
        ...

    async def cancel_reservation(self, reservation_id: int) -> bool:
        """CancelReservation: whether a reservation with this id was held."""
        ...


def parse_time(text: object) -> datetime:
    """An OCPP dateTime (RFC 3339); one without a zone is taken as UTC."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a date-time")
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class ReservationProfile:
    name = "Reservation"

    def __init__(
        self,
        cp: ChargePoint,
        control: ReservationControl,
        *,
        local_parent: Callable[[str], str | None] | None = None,
    ) -> None:
        self.cp = cp
        self.control = control
        #: The parentIdTag the local list or the cache gives a tag (None: unknown).
        self.local_parent = local_parent
        self.handlers: dict[str, Handler] = {
            "ReserveNow": self.reserve_now,
            "CancelReservation": self.cancel_reservation,
        }

    def tasks(self) -> Sequence[Task]:
        # The expiry runs on the station's timers; nothing runs here.
        return ()

    async def reserve_now(self, p: dict[str, Any]) -> dict[str, Any]:
        """ReserveNow (5.13)."""
        cp = self.cp
        cid = p["connectorId"]
        reservation_id = p["reservationId"]
        if cid == 0:
            if not cp.config.get_bool("ReserveConnectorZeroSupported"):
                log.info("ReserveNow %d on connector 0: not supported", reservation_id)
                return {"status": "Rejected"}
        elif cid not in cp.station.connector_ids:
            log.info("ReserveNow %d on connector %d: no such connector", reservation_id, cid)
            return {"status": "Rejected"}
        try:
            expiry = parse_time(p["expiryDate"])
        except ValueError as exc:
            raise CallError("PropertyConstraintViolation", f"expiryDate: {exc}") from None
        id_tag = str(p["idTag"]).strip()
        parent = p.get("parentIdTag")
        parent = (str(parent).strip() or None) if parent is not None else None
        status = await self.control.reserve(
            cid, reservation_id, id_tag, cp.clock.to_station(expiry), parent
        )
        log.info(
            "ReserveNow %d for %s (parent %s) on connector %d until %s: %s",
            reservation_id,
            id_tag,
            parent,
            cid,
            p["expiryDate"],
            status,
        )
        return {"status": status}

    async def cancel_reservation(self, p: dict[str, Any]) -> dict[str, Any]:
        """CancelReservation (5.2)."""
        reservation_id = p["reservationId"]
        held = await self.control.cancel_reservation(reservation_id)
        log.info("CancelReservation %d: %s", reservation_id, "held" if held else "unknown")
        return {"status": "Accepted" if held else "Rejected"}

    async def parent_of(self, id_tag: str) -> str | None:
        """The parentIdTag of ``id_tag`` (5.13): the local list's or the cache's,
        else the central system's answer to an Authorize.req (online only)."""
        if self.local_parent is not None:
            parent = self.local_parent(id_tag)
            if parent:
                return parent
        info = await self.cp.authorize(id_tag)
        parent = info.get("parentIdTag") if info is not None else None
        return parent if isinstance(parent, str) and parent else None
