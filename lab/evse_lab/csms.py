"""A local OCPP 1.6J central system for bench work, the demo and integration tests.

Run it as its own process (it is asyncio code, and asyncio never runs in the
firmware's process)::

    python -m evse_lab.csms [--port 0] [--control-port 0] [--tls-cert C --tls-key K]
                       [--client-ca CA] [--basic-auth KEY] [--boot-status Pending] ...

When both listeners are up it prints one JSON line on stdout and nothing else
there afterwards::

    {"ready": {"ws": "ws://127.0.0.1:PORT/ocpp/", "control": "http://127.0.0.1:CPORT"}}

Charge points connect to ``<ws>/<chargePointId>`` (the charge point id is the one
path segment after ``/ocpp/``, as the reference station appends it to an address
ending in "/") and must offer the ``ocpp1.6`` subprotocol: websockets answers a
handshake without it with HTTP 400.

The OCPP side is deliberately not our code: every message goes through the
``ocpp`` package's own asyncio runtime (``ocpp.v16.ChargePoint``, ``@on`` handlers,
its schema validation and its ``call()``), served by ``websockets``. This module
adds only what a test bench needs around it: a record of every message with
monotonic timestamps, duplicate detection, configurable answers, delays and
refusals, and an HTTP+JSON control interface on localhost (documented at
``Central.control``). ``tests/csms_peer.py`` starts and drives it from tests.

Two liberties are taken with the package's output, both toward OCPP 1.6J:
outgoing CALLERRORs use the 1.6 spellings ``FormationViolation`` and
``OccurenceConstraintViolation`` (sic) where the package writes the 2.0 ones, and
a transaction message (StartTransaction, StopTransaction, MeterValues) that
repeats an earlier one exactly, uniqueId, action and payload (our queue resending
after a crash), is answered with the response the first one got, without running
the handler again: a resent StartTransaction keeps its transactionId.

Every CALL whose uniqueId this charge point used before, on any connection, is
recorded with ``"duplicate": true`` (and ``"identical"``: same action and
payload). OCPP-J 1.6 section 4.1.3 asks uniqueIds to be unique only within one
connection, so a charge point that restarts a counter at boot produces
duplicates that are no resends: only identical transaction messages are replayed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TextIO, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

from ocpp.charge_point import (
    camel_to_snake_case,
    remove_nones,
    serialize_as_dict,
    snake_to_camel_case,
)
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallError, validate_payload
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result, datatypes
from ocpp.v16.enums import Action
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

LOG = logging.getLogger("evse_lab.csms")

BOOT_STATUSES = ("Accepted", "Pending", "Rejected")
AUTH_STATUSES = ("Accepted", "Blocked", "Expired", "Invalid", "ConcurrentTx")
#: Tag prefixes the default authorization rule answers with something other than Accepted.
PREFIX_RULES = (("BLOCKED", "Blocked"), ("EXPIRED", "Expired"), ("INVALID", "Invalid"))
PATH_PREFIX = "/ocpp/"
#: The ocpp package writes OCPP 2.0 error codes; OCPP-J 1.6 section 4.2.3 spells these so.
ERROR_CODES_16 = {
    "FormatViolation": "FormationViolation",
    "OccurrenceConstraintViolation": "OccurenceConstraintViolation",
}
MAX_BODY = 1 << 20
#: Transaction messages (OCPP 1.6 section 4.8): an identical resend gets the first answer.
REPLAYED = frozenset({"StartTransaction", "StopTransaction", "MeterValues"})

_F = TypeVar("_F", bound=Callable[..., Any])


def handles(action: Action) -> Callable[[_F], _F]:
    """``ocpp.routing.on`` (untyped upstream) with a type mypy can follow."""
    return cast(Callable[[_F], _F], on(action))


def utc_now() -> str:
    """UTC, ISO 8601 with milliseconds and a ``Z`` (OCPP 1.6 dateTime)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cp_id_from_path(path: str) -> str | None:
    """The charge point id: the single segment after ``/ocpp/`` (None if malformed)."""
    parts = urlsplit(path).path
    if not parts.startswith(PATH_PREFIX):
        return None
    rest = parts[len(PATH_PREFIX) :]
    if not rest or "/" in rest:
        return None
    return unquote(rest)


def basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    """(username, password bytes) from an ``Authorization: Basic ...`` header, if any.

    The password is bytes: under the Security Whitepaper the AuthorizationKey is
    hex and the password is the bytes it encodes, which need not be UTF-8.
    """
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except binascii.Error:
        return None
    user, sep, password = decoded.partition(b":")
    try:
        name = user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return (name, password) if sep else None


def expected_password(key: str, form: str) -> bytes:
    """The password bytes a charge point with AuthorizationKey ``key`` sends: the
    bytes the hex encodes (``form`` "hex", the whitepaper's; a key that is not
    hex is sent as its text), or the key's text itself ("literal")."""
    if form == "hex":
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return key.encode("utf-8")


_NAME_ABBREVIATIONS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


def format_name(name: Any) -> str | None:
    """An ``ssl.getpeercert()`` subject/issuer as ``CN=...,O=...``."""
    if not name:
        return None
    parts = []
    for rdn in name:
        for key, value in rdn:
            parts.append(f"{_NAME_ABBREVIATIONS.get(key, key)}={value}")
    return ",".join(parts)


# -- configuration that the control interface can change ---------------------------


@dataclass
class Authorization:
    """How Authorize and StartTransaction/StopTransaction judge an idTag.

    In order: an exact entry in ``tags``; then, if ``accepted`` is a list, Accepted
    for its members and Invalid for everything else; then (if ``prefix_rules``)
    BLOCKED*/EXPIRED*/INVALID* (case-insensitive); then ``default``. ``parents``
    gives an idTag the parentIdTag its IdTagInfo carries.
    """

    tags: dict[str, str] = field(default_factory=dict)
    accepted: list[str] | None = None
    prefix_rules: bool = True
    default: str = "Accepted"
    parents: dict[str, str] = field(default_factory=dict)

    def info(self, id_tag: str | None) -> Any:
        """The IdTagInfo for ``id_tag``."""
        parent = self.parents.get(id_tag) if id_tag is not None else None
        return datatypes.IdTagInfo(status=self.status(id_tag), parent_id_tag=parent)

    def status(self, id_tag: str | None) -> str:
        if id_tag is None:
            return self.default
        if id_tag in self.tags:
            return self.tags[id_tag]
        if self.accepted is not None:
            return "Accepted" if id_tag in self.accepted else "Invalid"
        if self.prefix_rules:
            upper = id_tag.upper()
            for prefix, status in PREFIX_RULES:
                if upper.startswith(prefix):
                    return status
        return self.default

    def as_json(self) -> dict[str, Any]:
        return {
            "tags": dict(self.tags),
            "accepted": None if self.accepted is None else list(self.accepted),
            "prefix_rules": self.prefix_rules,
            "default": self.default,
            "parents": dict(self.parents),
        }

    def updated(self, change: Any) -> Authorization:
        """A copy with ``change`` (a JSON object) applied; ValueError if malformed."""
        if not isinstance(change, dict):
            raise ValueError("authorize must be an object")
        unknown = set(change) - {"tags", "accepted", "prefix_rules", "default", "parents"}
        if unknown:
            raise ValueError(f"unknown authorize keys: {sorted(unknown)}")
        new = Authorization(
            dict(self.tags), self.accepted, self.prefix_rules, self.default, dict(self.parents)
        )
        if "parents" in change:
            parents = change["parents"]
            if not isinstance(parents, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in parents.items()
            ):
                raise ValueError("authorize.parents maps idTag to its parentIdTag")
            new.parents = dict(parents)
        if "tags" in change:
            tags = change["tags"]
            if not isinstance(tags, dict) or not all(
                isinstance(k, str) and v in AUTH_STATUSES for k, v in tags.items()
            ):
                raise ValueError(f"authorize.tags maps idTag to one of {AUTH_STATUSES}")
            new.tags = dict(tags)
        if "accepted" in change:
            accepted = change["accepted"]
            if accepted is not None and (
                not isinstance(accepted, list) or not all(isinstance(t, str) for t in accepted)
            ):
                raise ValueError("authorize.accepted is a list of idTags or null")
            new.accepted = None if accepted is None else list(accepted)
        if "prefix_rules" in change:
            if not isinstance(change["prefix_rules"], bool):
                raise ValueError("authorize.prefix_rules is a boolean")
            new.prefix_rules = change["prefix_rules"]
        if "default" in change:
            if change["default"] not in AUTH_STATUSES:
                raise ValueError(f"authorize.default is one of {AUTH_STATUSES}")
            new.default = change["default"]
        return new


@dataclass
class Settings:
    boot_status: str = "Accepted"
    boot_interval: int = 300
    rtt_ms: float = 0.0
    authorize: Authorization = field(default_factory=Authorization)
    #: Monotonic time until which handshakes are answered 503.
    refuse_until: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "boot_status": self.boot_status,
            "boot_interval": self.boot_interval,
            "rtt_ms": self.rtt_ms,
            "authorize": self.authorize.as_json(),
            "refusing_for": max(0.0, round(self.refuse_until - time.monotonic(), 3)),
        }

    def update(self, change: Any) -> None:
        """Apply a POST /config body, all or nothing; ValueError if malformed."""
        if not isinstance(change, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(change) - {
            "boot_status",
            "boot_interval",
            "rtt_ms",
            "authorize",
            "refuse_for",
        }
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        boot_status = change.get("boot_status", self.boot_status)
        if boot_status not in BOOT_STATUSES:
            raise ValueError(f"boot_status is one of {BOOT_STATUSES}")
        boot_interval = change.get("boot_interval", self.boot_interval)
        if (
            not isinstance(boot_interval, int)
            or isinstance(boot_interval, bool)
            or boot_interval < 0
        ):
            raise ValueError("boot_interval is a non-negative integer (seconds)")
        rtt_ms = change.get("rtt_ms", self.rtt_ms)
        if not _non_negative_number(rtt_ms):
            raise ValueError("rtt_ms is a non-negative number")
        refuse_for = change.get("refuse_for", None)
        if refuse_for is not None and not _non_negative_number(refuse_for):
            raise ValueError("refuse_for is a non-negative number (seconds from now)")
        authorize = (
            self.authorize.updated(change["authorize"]) if "authorize" in change else self.authorize
        )
        self.boot_status = boot_status
        self.boot_interval = boot_interval
        self.rtt_ms = float(rtt_ms)
        self.authorize = authorize
        if refuse_for is not None:
            self.refuse_until = time.monotonic() + float(refuse_for)


def _non_negative_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


# -- per charge point state (survives reconnects) ----------------------------------


@dataclass
class CpState:
    id: str
    connections: int = 0
    connection: ServerConnection | None = None
    charge_point: CentralChargePoint | None = None
    transport: dict[str, Any] | None = None
    registration: str | None = None
    last_boot: dict[str, Any] | None = None
    connectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: uniqueId of every CALL received -> the (latest) record of it.
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: uniqueId -> (action, payload, the raw response frame we sent), for replays.
    responses: dict[str, tuple[str, Any, str]] = field(default_factory=dict)
    disconnects: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    unauthorized: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "connected": self.connection is not None,
            "connections": self.connections,
            "registration": self.registration,
            "last_boot": self.last_boot,
            "connectors": self.connectors,
            "transport": self.transport,
            "unique_calls": len(self.calls),
            "disconnects": self.disconnects,
            "refused": self.refused,
            "unauthorized": self.unauthorized,
        }


# -- the OCPP side: the ocpp package's ChargePoint --------------------------------


class CallFailed(Exception):
    """A /call that could not be made: (HTTP status, JSON body)."""

    def __init__(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _error_json(error: OCPPError) -> dict[str, Any]:
    text = json.dumps(
        {"code": error.code, "description": error.description, "details": error.details},
        default=str,
    )
    return cast(dict[str, Any], json.loads(text))


class CentralChargePoint(ChargePoint):  # type: ignore[misc]  # ocpp ships no type hints
    """One connected charge point, as the ocpp package's runtime sees it.

    The ``@on`` handlers answer; ``route_message`` and ``_send`` are wrapped only to
    record, to replay duplicates, to delay CALLRESULTs and to fix 1.6 spellings.
    """

    def __init__(self, central: Central, state: CpState, connection: ServerConnection) -> None:
        # send_call bounds each call itself (its timeout, or the connection's end).
        super().__init__(state.id, connection, response_timeout=24 * 3600)
        self._central = central
        self._state = state
        #: uniqueId of each CALL we sent -> action, to name the CALLRESULTs.
        self._sent_actions: dict[str, str] = {}
        #: uniqueId -> the raw response frame (list) the charge point sent.
        self._raw_responses: dict[str, list[Any]] = {}
        #: Set when the connection has ended: pending /calls end with it.
        self.gone = asyncio.Event()

    # -- wrapping the runtime ------------------------------------------------------

    async def route_message(self, raw_msg: str | bytes) -> None:
        entry, frame = self._central.record_incoming(self._state, raw_msg, self._sent_actions)
        if frame is not None and frame[0] in (3, 4):
            self._raw_responses[frame[1]] = frame
        if entry is not None and entry.get("identical") and entry["action"] in REPLAYED:
            cached = self._state.responses.get(entry["uniqueId"])
            if cached is not None and cached[:2] == (entry["action"], entry["payload"]):
                entry["replayed"] = True
                await self._send(cached[2])
                return
        await super().route_message(raw_msg)

    async def _send(self, message: str) -> None:
        try:
            frame = json.loads(message)
        except ValueError:  # pragma: no cover - the package only sends JSON
            frame = None
        if isinstance(frame, list) and len(frame) >= 3:
            if frame[0] == 4 and frame[2] in ERROR_CODES_16:
                frame[2] = ERROR_CODES_16[frame[2]]
                message = json.dumps(frame, separators=(",", ":"))
            if frame[0] == 2:
                self._sent_actions[frame[1]] = frame[2]
            if frame[0] == 3 and self._central.settings.rtt_ms > 0:
                await asyncio.sleep(self._central.settings.rtt_ms / 1000)
        await super()._send(message)
        self._central.record_outgoing(self._state, message, frame)

    # -- CS -> CP calls (POST /call) ---------------------------------------------------

    async def send_call(
        self, action: str, payload: dict[str, Any], within: float, validate: bool
    ) -> dict[str, Any]:
        """Send a CALL through ``ChargePoint.call()``; the outcome as /call's JSON.

        Ends with the answer, after ``within`` seconds ("timeout"), or when the
        connection goes ("disconnected"), whichever comes first.
        """
        unique_id = str(uuid.uuid4())
        attempt = asyncio.create_task(self._attempt(action, payload, unique_id, validate))
        gone = asyncio.create_task(self.gone.wait())
        try:
            done, _ = await asyncio.wait(
                {attempt, gone}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
            if not attempt.done():
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await attempt
        if attempt in done:
            return attempt.result()
        sent = unique_id in self._sent_actions
        return {
            "kind": "disconnected" if gone in done else "timeout",
            "uniqueId": unique_id if sent else None,
            "sent": sent,
        }

    async def _attempt(
        self, action: str, payload: dict[str, Any], unique_id: str, validate: bool
    ) -> dict[str, Any]:
        request = self._dataclass_for(action, payload)
        try:
            if request is not None:
                await self.call(
                    request,
                    suppress=False,
                    unique_id=unique_id,
                    skip_schema_validation=not validate,
                )
            else:
                await self._call_raw(action, payload, unique_id, validate)
        except ConnectionClosed:
            return {"kind": "disconnected", "uniqueId": unique_id, "sent": False}
        except OCPPError as error:
            if unique_id not in self._sent_actions:
                raise CallFailed(
                    HTTPStatus.BAD_REQUEST,
                    {"kind": "invalid_request", "violation": _error_json(error)},
                ) from error
            frame = self._raw_responses.pop(unique_id, None)
            if frame is not None and frame[0] == 4:
                return {
                    "kind": "error",
                    "uniqueId": unique_id,
                    "error": {
                        "code": frame[2],
                        "description": frame[3] if len(frame) > 3 else None,
                        "details": frame[4] if len(frame) > 4 else None,
                    },
                }
            return {
                "kind": "invalid_response",
                "uniqueId": unique_id,
                "result": frame[2] if frame is not None else None,
                "violation": _error_json(error),
            }
        except TypeError as error:
            # The package could not build its call_result dataclass (possible
            # only without validation); the raw frame is what we report anyway.
            if unique_id not in self._raw_responses:
                raise CallFailed(
                    HTTPStatus.BAD_REQUEST, {"kind": "invalid_request", "violation": str(error)}
                ) from error
        frame = self._raw_responses.pop(unique_id)
        return {"kind": "result", "uniqueId": unique_id, "result": frame[2]}

    def _dataclass_for(self, action: str, payload: dict[str, Any]) -> Any:
        """The ``ocpp.v16.call`` dataclass for a camelCase payload, or None.

        None when the package's snake_case round trip would not put exactly
        ``payload`` on the wire (unknown or misspelt keys, explicit nulls): those
        go out as given, through ``_call_raw``, and validation judges them.
        """
        cls = getattr(call, action)
        try:
            request = cls(**camel_to_snake_case(payload))
            wire = remove_nones(snake_to_camel_case(serialize_as_dict(request)))
        except TypeError:
            return None
        return request if wire == payload else None

    async def _call_raw(
        self, action: str, payload: dict[str, Any], unique_id: str, validate: bool
    ) -> None:
        """``ChargePoint.call()`` for a payload given verbatim (same lock, same queue)."""
        message = Call(unique_id=unique_id, action=action, payload=payload)
        if validate:
            await validate_payload(message, self._ocpp_version)
        async with self._call_lock:
            await self._send(message.to_json())
            response = await self._get_specific_response(unique_id, self._response_timeout)
        if isinstance(response, CallError):
            raise response.to_exception()
        if validate:
            response.action = action
            await validate_payload(response, self._ocpp_version)

    # -- CP -> CS handlers ---------------------------------------------------------------

    def _entry(self, unique_id: str) -> dict[str, Any] | None:
        return self._state.calls.get(unique_id)

    @handles(Action.boot_notification)
    def on_boot_notification(self, *, call_unique_id: str, **_: Any) -> Any:
        settings = self._central.settings
        entry = self._entry(call_unique_id)
        self._state.registration = settings.boot_status
        self._state.last_boot = {
            "seq": entry["seq"] if entry else None,
            "time": utc_now(),
            "t": time.monotonic(),
            "payload": entry["payload"] if entry else None,
            "status": settings.boot_status,
            "interval": settings.boot_interval,
        }
        return call_result.BootNotification(
            current_time=utc_now(), interval=settings.boot_interval, status=settings.boot_status
        )

    @handles(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> Any:
        return call_result.Heartbeat(current_time=utc_now())

    @handles(Action.status_notification)
    def on_status_notification(self, *, call_unique_id: str, connector_id: int, **_: Any) -> Any:
        entry = self._entry(call_unique_id)
        if entry is not None:
            self._state.connectors[str(connector_id)] = {**entry["payload"], "seq": entry["seq"]}
        return call_result.StatusNotification()

    @handles(Action.authorize)
    def on_authorize(self, *, id_tag: str, **_: Any) -> Any:
        return call_result.Authorize(id_tag_info=self._central.settings.authorize.info(id_tag))

    @handles(Action.start_transaction)
    def on_start_transaction(
        self,
        *,
        call_unique_id: str,
        connector_id: int,
        id_tag: str,
        meter_start: int,
        timestamp: str,
        **rest: Any,
    ) -> Any:
        central = self._central
        status = central.settings.authorize.status(id_tag)
        transaction_id = central.next_transaction_id
        central.next_transaction_id += 1
        central.transactions[transaction_id] = {
            "transactionId": transaction_id,
            "cp": self.id,
            "connectorId": connector_id,
            "idTag": id_tag,
            "idTagStatus": status,
            "meterStart": meter_start,
            "timestamp": timestamp,
            "reservationId": rest.get("reservation_id"),
            "startSeq": (self._entry(call_unique_id) or {}).get("seq"),
            "stop": None,
        }
        return call_result.StartTransaction(
            transaction_id=transaction_id, id_tag_info=central.settings.authorize.info(id_tag)
        )

    @handles(Action.stop_transaction)
    def on_stop_transaction(
        self,
        *,
        call_unique_id: str,
        transaction_id: int,
        meter_stop: int,
        timestamp: str,
        id_tag: str | None = None,
        reason: str | None = None,
        **_: Any,
    ) -> Any:
        # OCPP 1.6 section 4.10: the central system accepts every StopTransaction,
        # known transaction or not.
        known = self._central.transactions.get(transaction_id)
        if known is not None:
            known["stop"] = {
                "meterStop": meter_stop,
                "timestamp": timestamp,
                "reason": reason,
                "idTag": id_tag,
                "seq": (self._entry(call_unique_id) or {}).get("seq"),
            }
        if id_tag is None:
            return call_result.StopTransaction()
        status = self._central.settings.authorize.status(id_tag)
        return call_result.StopTransaction(id_tag_info=datatypes.IdTagInfo(status=status))

    @handles(Action.meter_values)
    def on_meter_values(self, **_: Any) -> Any:
        return call_result.MeterValues()

    @handles(Action.data_transfer)
    def on_data_transfer(self, **_: Any) -> Any:
        return call_result.DataTransfer(status="UnknownVendorId")

    @handles(Action.diagnostics_status_notification)
    def on_diagnostics_status_notification(self, **_: Any) -> Any:
        return call_result.DiagnosticsStatusNotification()

    @handles(Action.firmware_status_notification)
    def on_firmware_status_notification(self, **_: Any) -> Any:
        return call_result.FirmwareStatusNotification()

    @handles(Action.signed_firmware_status_notification)
    def on_signed_firmware_status_notification(self, **_: Any) -> Any:
        return call_result.SignedFirmwareStatusNotification()

    @handles(Action.security_event_notification)
    def on_security_event_notification(self, **_: Any) -> Any:
        return call_result.SecurityEventNotification()

    @handles(Action.sign_certificate)
    def on_sign_certificate(self, **_: Any) -> Any:
        return call_result.SignCertificate(status="Accepted")

    @handles(Action.log_status_notification)
    def on_log_status_notification(self, **_: Any) -> Any:
        return call_result.LogStatusNotification()


# -- the central system: state, websocket server, control server ------------------


class Central:
    """Everything the process holds: settings, charge points, the message record."""

    def __init__(
        self,
        settings: Settings,
        *,
        basic_auth_key: str | None = None,
        basic_auth_form: str = "hex",
        log_file: TextIO | None = None,
        quiet: bool = False,
    ) -> None:
        self.settings = settings
        self.basic_auth_key = basic_auth_key
        self.basic_auth_form = basic_auth_form
        self.log_file = log_file
        self.quiet = quiet
        self.started = time.monotonic()
        self.cps: dict[str, CpState] = {}
        self.messages: list[dict[str, Any]] = []
        self.next_transaction_id = 1
        self.transactions: dict[int, dict[str, Any]] = {}

    def state(self, cp_id: str) -> CpState:
        if cp_id not in self.cps:
            self.cps[cp_id] = CpState(cp_id)
        return self.cps[cp_id]

    # -- the record --------------------------------------------------------------------

    def _log(self, cp_id: str, direction: str, body: Any) -> None:
        now = time.monotonic()
        if self.log_file is not None:
            line = {"t": now, "time": utc_now(), "cp": cp_id, "dir": direction, "message": body}
            self.log_file.write(json.dumps(line, default=str) + "\n")
            self.log_file.flush()
        if not self.quiet:
            text = body if isinstance(body, str) else json.dumps(body, default=str)
            print(f"{now - self.started:10.3f} {cp_id} {direction} {text}", file=sys.stderr)

    def event(self, cp_id: str, what: str, **details: Any) -> None:
        self._log(cp_id, "event", {"event": what, **details})

    def record_incoming(
        self, state: CpState, raw: str | bytes, sent_actions: dict[str, str]
    ) -> tuple[dict[str, Any] | None, list[Any] | None]:
        """Record a received frame; (its record, the parsed frame if well-formed)."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        entry: dict[str, Any] = {
            "seq": len(self.messages) + 1,
            "cp": state.id,
            "t": time.monotonic(),
            "time": utc_now(),
        }
        if isinstance(raw, bytes):
            entry["binary"] = True
        well_formed = (
            isinstance(frame, list)
            and len(frame) >= 3
            and frame[0] in (2, 3, 4)
            and isinstance(frame[1], str)
        )
        if not well_formed:
            entry.update(type="INVALID", raw=text)
            self.messages.append(entry)
            self._log(state.id, "in", text)
            return entry, None
        assert isinstance(frame, list)
        unique_id = frame[1]
        entry["uniqueId"] = unique_id
        if frame[0] == 2:
            entry["type"] = "CALL"
            entry["action"] = frame[2]
            entry["payload"] = frame[3] if len(frame) > 3 else None
            first = state.calls.get(unique_id)
            entry["duplicate"] = first is not None
            entry["connection"] = state.connections
            if first is not None:
                entry["duplicateOf"] = first.get("duplicateOf", first["seq"])
                entry["identical"] = (first["action"], first["payload"]) == (
                    entry["action"],
                    entry["payload"],
                )
            entry["registration"] = state.registration
            state.calls[unique_id] = entry
        elif frame[0] == 3:
            entry.update(type="CALLRESULT", action=sent_actions.get(unique_id), payload=frame[2])
        else:
            entry.update(
                type="CALLERROR",
                action=sent_actions.get(unique_id),
                payload={
                    "errorCode": frame[2],
                    "errorDescription": frame[3] if len(frame) > 3 else None,
                    "errorDetails": frame[4] if len(frame) > 4 else None,
                },
            )
        self.messages.append(entry)
        self._log(state.id, "in", frame)
        return entry, frame

    def record_outgoing(self, state: CpState, message: str, frame: Any) -> None:
        self._log(state.id, "out", frame if frame is not None else message)
        if not (isinstance(frame, list) and len(frame) >= 3 and frame[0] in (3, 4)):
            return
        entry = state.calls.get(frame[1])
        if entry is None:
            return
        if frame[0] == 3:
            entry["response"] = {"type": "CALLRESULT", "payload": frame[2]}
        else:
            entry["response"] = {
                "type": "CALLERROR",
                "payload": {
                    "errorCode": frame[2],
                    "errorDescription": frame[3] if len(frame) > 3 else None,
                    "errorDetails": frame[4] if len(frame) > 4 else None,
                },
            }
        entry["responded_t"] = time.monotonic()
        state.responses.setdefault(frame[1], (entry["action"], entry["payload"], message))

    # -- websocket side ------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake gate: path, refusal window, HTTP Basic auth."""
        cp_id = cp_id_from_path(request.path)
        if cp_id is None:
            return connection.respond(
                HTTPStatus.NOT_FOUND, f"expected {PATH_PREFIX}<chargePointId>\n"
            )
        state = self.state(cp_id)
        now = time.monotonic()
        if now < self.settings.refuse_until:
            state.refused.append({"t": now, "time": utc_now()})
            self.event(cp_id, "refused")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "refusing connections\n")
        if self.basic_auth_key is not None:
            credentials = basic_credentials(request.headers.get("Authorization"))
            ok = credentials is not None and (
                credentials[0] == cp_id
                and hmac.compare_digest(
                    credentials[1], expected_password(self.basic_auth_key, self.basic_auth_form)
                )
            )
            if not ok:
                user = credentials[0] if credentials else None
                state.unauthorized.append({"t": now, "time": utc_now(), "username": user})
                self.event(cp_id, "unauthorized", username=user)
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
                response.headers["WWW-Authenticate"] = 'Basic realm="ocpp", charset="UTF-8"'
                return response
        return None

    def _transport(self, connection: ServerConnection, request: Request) -> dict[str, Any]:
        credentials = basic_credentials(request.headers.get("Authorization"))
        info: dict[str, Any] = {
            "remote": list(connection.remote_address)[:2],
            "path": request.path,
            "subprotocol": connection.subprotocol,
            "tls": False,
            "auth_user": credentials[0] if credentials else None,
            "client_cert_subject": None,
            "client_cert_issuer": None,
            "connected_at": utc_now(),
            "connected_t": time.monotonic(),
        }
        ssl_object = connection.transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            info["tls"] = True
            info["tls_version"] = ssl_object.version()
            peer = ssl_object.getpeercert()
            if peer:
                info["client_cert_subject"] = format_name(peer.get("subject"))
                info["client_cert_issuer"] = format_name(peer.get("issuer"))
        return info

    async def handle_connection(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        cp_id = cp_id_from_path(request.path)
        assert cp_id is not None  # process_request let only these through
        state = self.state(cp_id)
        previous = state.connection
        if previous is not None:
            # A second connection under the same id wins: the first is most
            # likely a half-open one the charge point has already given up.
            await previous.close(1001, "replaced by a new connection")
        charge_point = CentralChargePoint(self, state, connection)
        state.connection = connection
        state.charge_point = charge_point
        state.connections += 1
        state.transport = self._transport(connection, request)
        self.event(cp_id, "connected", transport=state.transport)
        try:
            await charge_point.start()
        except ConnectionClosed:
            pass
        except Exception:
            LOG.exception("%s: the connection failed", cp_id)
        finally:
            charge_point.gone.set()
            if state.connection is connection:
                state.connection = None
                state.charge_point = None
            record = {
                "t": time.monotonic(),
                "time": utc_now(),
                "code": connection.close_code,
                "reason": connection.close_reason,
            }
            state.disconnects.append(record)
            self.event(cp_id, "disconnected", code=record["code"], reason=record["reason"])

    # -- control side ---------------------------------------------------------------

    async def control(
        self, method: str, target: str, body: bytes
    ) -> tuple[HTTPStatus, dict[str, Any]]:
        """One control request -> (status, JSON body).

        GET  /health                        liveness, pid, uptime, counts
        GET  /chargepoints                  connected ids and per charge point state
        GET  /messages?cp=&since=&action=   received frames with seq > since
        GET  /transactions                  transactions started (and stopped)
        GET  /config, POST /config          boot_status, boot_interval, rtt_ms,
                                            authorize, refuse_for (seconds from now)
        POST /call {"cp", "action", "payload", "timeout"=30, "validate"=true}
        POST /disconnect {"cp", "code"=1001, "reason", "abort"=false}
        """
        split = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        routes: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "/health"): self._health,
            ("GET", "/chargepoints"): self._chargepoints,
            ("GET", "/messages"): lambda: self._messages(query),
            ("GET", "/transactions"): self._transactions,
            ("GET", "/config"): lambda: (HTTPStatus.OK, self.settings.as_json()),
            ("POST", "/config"): lambda: self._config(body),
            ("POST", "/call"): lambda: self._call(body),
            ("POST", "/disconnect"): lambda: self._disconnect(body),
        }
        handler = routes.get((method, split.path))
        if handler is None:
            if any(path == split.path for _, path in routes):
                return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{method} not allowed here"}
            return HTTPStatus.NOT_FOUND, {"error": f"no such resource: {split.path}"}
        result = handler()
        if asyncio.iscoroutine(result):
            result = await result
        return cast(tuple[HTTPStatus, dict[str, Any]], result)

    def _health(self) -> tuple[HTTPStatus, dict[str, Any]]:
        return HTTPStatus.OK, {
            "ok": True,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "connected": sum(1 for s in self.cps.values() if s.connection is not None),
            "messages": len(self.messages),
        }

    def _chargepoints(self) -> tuple[HTTPStatus, dict[str, Any]]:
        return HTTPStatus.OK, {
            "connected": sorted(k for k, s in self.cps.items() if s.connection is not None),
            "chargepoints": {k: s.as_json() for k, s in sorted(self.cps.items())},
        }

    def _messages(self, query: dict[str, str]) -> tuple[HTTPStatus, dict[str, Any]]:
        try:
            since = int(query.get("since", "0"))
        except ValueError:
            return HTTPStatus.BAD_REQUEST, {"error": "since is an integer sequence number"}
        cp_id = query.get("cp")
        action = query.get("action")
        selected = [
            m
            for m in self.messages[max(0, since) :]
            if (cp_id is None or m["cp"] == cp_id) and (action is None or m.get("action") == action)
        ]
        return HTTPStatus.OK, {"messages": selected, "last": len(self.messages)}

    def _transactions(self) -> tuple[HTTPStatus, dict[str, Any]]:
        return HTTPStatus.OK, {"transactions": list(self.transactions.values())}

    def _config(self, body: bytes) -> tuple[HTTPStatus, dict[str, Any]]:
        try:
            self.settings.update(json.loads(body or b"{}"))
        except ValueError as error:
            return HTTPStatus.BAD_REQUEST, {"error": str(error)}
        return HTTPStatus.OK, self.settings.as_json()

    def _connected(self, request: Any) -> CpState | tuple[HTTPStatus, dict[str, Any]]:
        if not isinstance(request, dict) or not isinstance(request.get("cp"), str):
            return HTTPStatus.BAD_REQUEST, {"error": 'the body needs "cp": "<chargePointId>"'}
        state = self.cps.get(request["cp"])
        if state is None or state.connection is None or state.charge_point is None:
            return HTTPStatus.NOT_FOUND, {"kind": "not_connected", "cp": request["cp"]}
        return state

    async def _call(self, body: bytes) -> tuple[HTTPStatus, dict[str, Any]]:
        try:
            request = json.loads(body)
        except ValueError:
            return HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"}
        state = self._connected(request)
        if not isinstance(state, CpState):
            return state
        action = request.get("action")
        payload = request.get("payload", {})
        timeout = request.get("timeout", 30)
        validate = request.get("validate", True)
        if action not in {a.value for a in Action} or not hasattr(call, action):
            return HTTPStatus.BAD_REQUEST, {"error": f"unknown OCPP 1.6 action: {action!r}"}
        if not isinstance(payload, dict):
            return HTTPStatus.BAD_REQUEST, {"error": "payload is a JSON object"}
        if not _non_negative_number(timeout) or not isinstance(validate, bool):
            return HTTPStatus.BAD_REQUEST, {"error": "timeout is a number, validate a boolean"}
        assert state.charge_point is not None
        try:
            outcome = await state.charge_point.send_call(action, payload, float(timeout), validate)
        except CallFailed as failed:
            return failed.status, failed.body
        status = HTTPStatus.GATEWAY_TIMEOUT if outcome["kind"] == "timeout" else HTTPStatus.OK
        return status, {"cp": state.id, "action": action, **outcome}

    async def _disconnect(self, body: bytes) -> tuple[HTTPStatus, dict[str, Any]]:
        try:
            request = json.loads(body)
        except ValueError:
            return HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"}
        state = self._connected(request)
        if not isinstance(state, CpState):
            return state
        connection = state.connection
        assert connection is not None
        if request.get("abort"):
            # No closing handshake: the charge point sees the TCP connection drop.
            connection.transport.abort()
        else:
            code = request.get("code", 1001)
            await connection.close(code, request.get("reason", "disconnected by the bench"))
        return HTTPStatus.OK, {"cp": state.id, "disconnected": True}

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.1 server: one request per connection, JSON both ways."""
        try:
            try:
                async with asyncio.timeout(10):
                    method, target, headers = await _read_head(reader)
                    length = int(headers.get("content-length", "0"))
                    if not 0 <= length <= MAX_BODY:
                        raise ValueError("bad Content-Length")
                    body = await reader.readexactly(length) if length else b""
            except (ValueError, asyncio.IncompleteReadError, TimeoutError) as error:
                status, reply = HTTPStatus.BAD_REQUEST, {"error": f"bad request: {error}"}
            else:
                try:
                    status, reply = await self.control(method, target, body)
                except Exception as error:
                    LOG.exception("control request %s %s failed", method, target)
                    status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": repr(error)}
            data = json.dumps(reply, default=str).encode()
            head = (
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + data)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    line = await reader.readline()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("malformed request line")
    headers: dict[str, str] = {}
    for _ in range(100):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            return parts[0].upper(), parts[1], headers
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise ValueError("malformed header")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many headers")


# -- the process ------------------------------------------------------------------------


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # OCPP 1.6 security whitepaper, 4.1
    context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=args.client_ca)
    return context


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m evse_lab.csms",
        description="A local OCPP 1.6J central system (ocpp package + websockets) for the bench.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="websocket listening address")
    parser.add_argument("--port", type=int, default=0, help="websocket port (0: any free one)")
    parser.add_argument("--control-port", type=int, default=0, help="control port (0: any)")
    parser.add_argument(
        "--control-host",
        default="127.0.0.1",
        help="control listening address (it has no authentication: keep it local)",
    )
    parser.add_argument("--tls-cert", help="serve wss:// with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="private key for --tls-cert (PEM)")
    parser.add_argument("--client-ca", help="require client certificates issued by this CA (mTLS)")
    parser.add_argument(
        "--basic-auth",
        metavar="KEY",
        help="require HTTP Basic auth: username = charge point id, password = KEY",
    )
    parser.add_argument(
        "--basic-auth-form",
        choices=("hex", "literal"),
        default="hex",
        help="the password is the bytes KEY's hex encodes (hex, the Security "
        "Whitepaper's) or KEY's text (literal)",
    )
    parser.add_argument("--boot-status", choices=BOOT_STATUSES, default="Accepted")
    parser.add_argument("--boot-interval", type=int, default=300, help="seconds (heartbeat)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="delay every CALLRESULT")
    parser.add_argument(
        "--accepted-tags",
        metavar="A,B,...",
        help="accept only these idTags (others: Invalid); default: the prefix rules",
    )
    parser.add_argument(
        "--refuse-for", type=float, default=0.0, metavar="S", help="refuse connections for S s"
    )
    parser.add_argument(
        "--refuse-mode",
        choices=("http", "tcp"),
        default="http",
        help="http: answer handshakes 503 (attempts are recorded); tcp: do not listen yet",
    )
    parser.add_argument(
        "--ping-interval", type=float, default=20.0, help="websocket pings, s (0: none)"
    )
    parser.add_argument("--log", metavar="FILE", help="append every message as JSON lines")
    parser.add_argument("--quiet", action="store_true", help="no message trace on stderr")
    args = parser.parse_args(argv)
    if args.client_ca is not None and args.tls_cert is None:
        parser.error("--client-ca needs --tls-cert")
    if args.tls_key is not None and args.tls_cert is None:
        parser.error("--tls-key needs --tls-cert")
    if args.boot_interval < 0 or args.rtt_ms < 0 or args.refuse_for < 0:
        parser.error("--boot-interval, --rtt-ms and --refuse-for are non-negative")
    return args


async def run(args: argparse.Namespace, log_file: TextIO | None = None) -> None:
    settings = Settings(boot_status=args.boot_status, boot_interval=args.boot_interval)
    settings.rtt_ms = args.rtt_ms
    if args.accepted_tags is not None:
        settings.authorize.accepted = [t for t in args.accepted_tags.split(",") if t]
    tls = _server_tls(args)
    central = Central(
        settings,
        basic_auth_key=args.basic_auth,
        basic_auth_form=args.basic_auth_form,
        log_file=log_file,
        quiet=args.quiet,
    )

    # Bind now, so the ready line can name the port even if listening waits (--refuse-mode tcp:
    # a bound socket that does not listen yet answers connects with RST, "connection refused").
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    ws_port = sock.getsockname()[1]
    if args.refuse_for > 0 and args.refuse_mode == "http":
        settings.refuse_until = time.monotonic() + args.refuse_for

    ping = args.ping_interval if args.ping_interval > 0 else None

    def start_ws() -> Any:
        return serve(
            central.handle_connection,
            sock=sock,
            ssl=tls,
            subprotocols=[Subprotocol("ocpp1.6")],
            process_request=central.process_request,
            ping_interval=ping,
            ping_timeout=ping,
            close_timeout=5,
        )

    control = await asyncio.start_server(central.handle_http, args.control_host, args.control_port)
    control_port = control.sockets[0].getsockname()[1]
    ws_server: Server | None = None
    if not (args.refuse_for > 0 and args.refuse_mode == "tcp"):
        ws_server = await start_ws()
    scheme = "wss" if tls is not None else "ws"
    ready = {
        "ws": f"{scheme}://{_url_host(args.host)}:{ws_port}{PATH_PREFIX}",
        "control": f"http://{_url_host(args.control_host)}:{control_port}",
    }
    print(json.dumps({"ready": ready}), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if ws_server is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.refuse_for)
            if not stop.is_set():
                ws_server = await start_ws()
        await stop.wait()
    finally:
        control.close()
        if ws_server is not None:
            ws_server.close()
            await ws_server.wait_closed()
        else:
            sock.close()
        await control.wait_closed()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Library deprecation noise is this process's business, not the tests'.
    warnings.simplefilter("ignore", DeprecationWarning)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.quiet:
        # The package logs a traceback for every CALLERROR it answers; the record has them.
        logging.getLogger("ocpp").setLevel(logging.CRITICAL)
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(open(args.log, "a", encoding="utf-8")) if args.log else None
        asyncio.run(run(args, log_file))


if __name__ == "__main__":
    main()
