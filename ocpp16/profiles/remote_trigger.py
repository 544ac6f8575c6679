"""The Remote Trigger profile (OCPP 1.6 section 3.1): TriggerMessage (section 5.17),
and the Security Whitepaper's ExtendedTriggerMessage (ed. 3).

The central system asks for one of six messages; the answer goes out first
and the triggered message after it: the handler hands the sending to
``CallChannel.after_answer``, which starts it once the CALLRESULT has been
written to the connection (section 5.17: "the Charge Point SHALL first send
the TriggerMessage response, before sending the requested message").

Rules (where OCPP 1.6 leaves room, the decision and why):

* ``connectorId`` absent: every connector the message can be about
  (StatusNotification: 0, the charge point, and 1; MeterValues: 1, the one
  metered connector). Present: that connector; one this station does not
  have is Rejected, whatever the message ("an unknown connector Rejected"),
  so that a central system never waits for a message that cannot come.
  Messages not about a connector (BootNotification, Heartbeat, the two
  status notifications) ignore a valid ``connectorId``.
* **BootNotification** is Rejected once registered (Accepted on this
  connection): a second registration would restart the session's state
  (heartbeat interval, the pending/accepted gate) for nothing; OCPP 2.0.1
  makes the same rule explicit (F06.FR.17), and issue 8 asks for it. While
  Pending it is Accepted and the registration sends its BootNotification at
  once instead of at the end of the interval (section 4.2.1).
* **Heartbeat**: a Heartbeat, whose currentTime sets the clock like any.
* **StatusNotification**: the connector's status as it is now, without
  MinimumStatusDuration (it was asked for); it counts as reported, so the
  status task does not send it again (if it fails, the status task reports
  every connector again).
* **MeterValues**: the MeterValuesSampledData measurands, context
  ``Trigger``, read now (Energy.Active.Import.Register if that key is
  empty: Accepted promised a MeterValues); with the transactionId when a
  transaction runs on the connector and the central system has given its
  id. Sent directly, not through the transaction queue: it is a reading on
  request, not a transaction record.
* **DiagnosticsStatusNotification / FirmwareStatusNotification**: the status
  of the upload / download or installation in progress, Idle when there is
  none, as it is when the message is sent. The Firmware Management profile
  (``ocpp16.profiles.firmware``, given as ``transfers``) is the source;
  without one nothing is ever in progress. During a signed update the 1.6
  FirmwareStatusNotification carries the nearest 1.6 status
  (``ocpp16.firmware.as_plain_status``).
* **ExtendedTriggerMessage** (whitepaper): BootNotification, Heartbeat,
  MeterValues and StatusNotification exactly as TriggerMessage (the same
  connector rules); FirmwareStatusNotification triggers a
  SignedFirmwareStatusNotification and LogStatusNotification a
  LogStatusNotification, each with the status in progress and its
  requestId, or Idle without one (there is no request to name);
  SignChargePointCertificate is delegated to ``sign_certificate`` (the
  certificate part answers Accepted or Rejected and hands its
  SignCertificate.req to ``after_answer``), Rejected when none is wired.
* A ``requestedMessage`` outside the six never reaches the handler: the
  schema refuses it (a CALLERROR), so NotImplemented is not answered by this
  station, which implements every message of the enum.

A triggered message that fails (no answer, a CALLERROR) is logged and not
retried: the central system can trigger it again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ocpp16.channel import CallFailed
from ocpp16.chargepoint import Registration
from ocpp16.metering import format_time, meter_value, parse_measurands
from ocpp16.policy import status_notification
from ocpp16.profiles import Handler, Task

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint

log = logging.getLogger(__name__)

#: The MeterValues measurand when MeterValuesSampledData names none.
FALLBACK_MEASURAND = "Energy.Active.Import.Register"

#: MessageTrigger (OCPP 1.6 section 7.38), the schema's enum.
MESSAGES = (
    "BootNotification",
    "DiagnosticsStatusNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "StatusNotification",
)
#: ExtendedTriggerMessage's MessageTriggerEnumType (whitepaper ed. 3), the schema's enum.
EXTENDED_MESSAGES = (
    "BootNotification",
    "LogStatusNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "SignChargePointCertificate",
    "StatusNotification",
)
#: The ones both triggers send alike.
_COMMON = frozenset({"BootNotification", "Heartbeat", "MeterValues", "StatusNotification"})

#: SignChargePointCertificate (``ocpp16.profiles.security``'s
#: ``sign_charge_point_certificate``): called from the handler, before it returns;
#: "Accepted" or "Rejected". An Accepted one hands its SignCertificate.req to
#: ``CallChannel.after_answer`` itself, so it follows the answer.
SignCertificateTrigger = Callable[[], str]


class TransferStatus(Protocol):
    """What is in progress (``ocpp16.profiles.firmware.FirmwareProfile``)."""

    def firmware_status(self) -> str:
        """FirmwareStatus (OCPP 1.6 7.25) of the update in progress, Idle for none."""
        ...

    def signed_firmware_status(self) -> tuple[str, int | None]:
        """The whitepaper's FirmwareStatusEnumType and requestId, ("Idle", None) for none."""
        ...

    def diagnostics_status(self) -> str:
        """DiagnosticsStatus (7.24) of the upload in progress, Idle for none."""
        ...

    def log_status(self) -> tuple[str, int | None]:
        """UploadLogStatusEnumType and requestId of the log upload, ("Idle", None)."""
        ...


def _idle() -> str:
    return "Idle"


def _idle_request() -> tuple[str, int | None]:
    return "Idle", None


class RemoteTriggerProfile:
    name = "RemoteTrigger"

    def __init__(
        self,
        cp: ChargePoint,
        *,
        diagnostics_status: Callable[[], str] = _idle,
        firmware_status: Callable[[], str] = _idle,
        transfers: TransferStatus | None = None,
        sign_certificate: SignCertificateTrigger | None = None,
    ) -> None:
        self.cp = cp
        #: DiagnosticsStatus of the upload in progress (OCPP 1.6 7.24), Idle for none.
        self.diagnostics_status = diagnostics_status
        #: FirmwareStatus of the download or installation in progress (7.25).
        self.firmware_status = firmware_status
        #: The whitepaper's statuses with their requestId.
        self.signed_firmware_status: Callable[[], tuple[str, int | None]] = _idle_request
        self.log_status: Callable[[], tuple[str, int | None]] = _idle_request
        if transfers is not None:
            self.diagnostics_status = transfers.diagnostics_status
            self.firmware_status = transfers.firmware_status
            self.signed_firmware_status = transfers.signed_firmware_status
            self.log_status = transfers.log_status
        self.sign_certificate = sign_certificate
        self.handlers: dict[str, Handler] = {
            "TriggerMessage": self.trigger_message,
            "ExtendedTriggerMessage": self.extended_trigger_message,
        }

    def tasks(self) -> Sequence[Task]:
        return ()

    def _unknown_connector(self, action: str, p: dict[str, Any]) -> bool:
        cid = p.get("connectorId")
        if cid is not None and cid != 0 and cid not in self.cp.station.connector_ids:
            log.info(
                "%s %s for connector %s: no such connector", action, p["requestedMessage"], cid
            )
            return True
        return False

    async def trigger_message(self, p: dict[str, Any]) -> dict[str, Any]:
        """TriggerMessage (5.17): answered first, the message follows."""
        cp = self.cp
        requested = p["requestedMessage"]
        cid = p.get("connectorId")
        if self._unknown_connector("TriggerMessage", p):
            return {"status": "Rejected"}
        work: Callable[[], Awaitable[None]]
        if requested == "BootNotification":
            if cp.registration is Registration.ACCEPTED:
                log.info("TriggerMessage BootNotification: registered already")
                return {"status": "Rejected"}
            work = self._boot
        elif requested == "Heartbeat":
            work = self._heartbeat
        elif requested == "StatusNotification":
            connectors = (cid,) if cid is not None else (0, *cp.station.connector_ids)
            work = partial(self._statuses, connectors)
        elif requested == "MeterValues":
            metered = (cid,) if cid is not None else cp.station.connector_ids
            work = partial(self._meter_values, metered)
        elif requested == "DiagnosticsStatusNotification":
            work = partial(self._status, "DiagnosticsStatusNotification", self.diagnostics_status)
        elif requested == "FirmwareStatusNotification":
            work = partial(self._status, "FirmwareStatusNotification", self.firmware_status)
        else:  # pragma: no cover - the schema's enum is the list above
            return {"status": "NotImplemented"}
        cp.channel.after_answer(f"triggered {requested}", work)
        return {"status": "Accepted"}

    async def extended_trigger_message(self, p: dict[str, Any]) -> dict[str, Any]:
        """ExtendedTriggerMessage (whitepaper ed. 3): answered first, the message follows."""
        requested = p["requestedMessage"]
        if requested in _COMMON:
            return await self.trigger_message(p)
        if self._unknown_connector("ExtendedTriggerMessage", p):
            return {"status": "Rejected"}
        work: Callable[[], Awaitable[None]]
        if requested == "FirmwareStatusNotification":
            work = partial(
                self._request_status,
                "SignedFirmwareStatusNotification",
                self.signed_firmware_status,
            )
        elif requested == "LogStatusNotification":
            work = partial(self._request_status, "LogStatusNotification", self.log_status)
        elif requested == "SignChargePointCertificate":
            status = "Rejected" if self.sign_certificate is None else self.sign_certificate()
            if status != "Accepted":
                log.info("ExtendedTriggerMessage SignChargePointCertificate: %s", status)
                return {"status": "Rejected"}
            return {"status": "Accepted"}
        else:  # pragma: no cover - the schema's enum is EXTENDED_MESSAGES
            return {"status": "NotImplemented"}
        self.cp.channel.after_answer(f"triggered {requested}", work)
        return {"status": "Accepted"}

    # -- the triggered messages, each after the answer is on the wire -------------------------

    async def _request_status(
        self, action: str, status: Callable[[], tuple[str, int | None]]
    ) -> None:
        value, request_id = status()
        payload: dict[str, Any] = {"status": value}
        if request_id is not None:
            payload["requestId"] = request_id
        await self._send(action, payload)

    async def _send(self, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return await self.cp.call(action, payload)
        except CallFailed as exc:
            log.warning("triggered %s failed: %s", action, exc)
            return None

    async def _status(self, action: str, status: Callable[[], str]) -> None:
        await self._send(action, {"status": status()})

    async def _boot(self) -> None:
        await trio.lowlevel.checkpoint()
        self.cp.trigger_boot()

    async def _heartbeat(self) -> None:
        cp = self.cp
        answer = await self._send("Heartbeat", {})
        if answer is not None:
            cp.set_clock(answer.get("currentTime"))

    async def _statuses(self, connectors: Sequence[int]) -> None:
        cp = self.cp
        for cid in connectors:
            current = cp.station.status_of(cid)
            payload = status_notification(cid, current, format_time(cp.now()))
            # Reported from now on: the status task, woken meanwhile, does not send
            # it as well. Should it fail, every status is reported again.
            cp.core.status.reported(cid, current)
            if await self._send("StatusNotification", payload) is None:
                cp.core.status.reconnected()
                cp.core.status_changed()

    async def _meter_values(self, connectors: Sequence[int]) -> None:
        cp = self.cp
        measurands = parse_measurands(str(cp.config.text("MeterValuesSampledData")))
        for cid in connectors:
            snapshot = cp.station.meter_snapshot(cid)
            value = (
                meter_value(snapshot, measurands or [FALLBACK_MEASURAND], "Trigger", at=cp.now())
                if snapshot is not None
                else None
            )
            if value is None:
                log.warning("triggered MeterValues for connector %d: nothing to read", cid)
                continue
            payload: dict[str, Any] = {"connectorId": cid, "meterValue": [value]}
            local = cp.station.running_transaction(cid)
            if local is not None:
                real = await trio.to_thread.run_sync(cp.queue.real_transaction_id, local)
                if real is not None:
                    payload["transactionId"] = real
            await self._send("MeterValues", payload)
