"""The OCPP-J 1.6 RPC session, sans-I/O.

Theory of operation
-------------------
``RpcSession`` holds the state of one side of an OCPP-J connection and does
no I/O, in the manner of h11: the transport hands it each websocket text
message with ``receive(text, now)`` and gets back the frames to send and the
events for the application; the application sends with ``send_call``,
``reply`` and ``reply_error``, which return frame texts. Time is an argument,
so tests run on explicit numbers.

Frames (OCPP-J 1.6 §4.2)::

    CALL       [2, "<UniqueId>", "<Action>", {<payload>}]
    CALLRESULT [3, "<UniqueId>", {<payload>}]
    CALLERROR  [4, "<UniqueId>", "<errorCode>", "<errorDescription>", {<errorDetails>}]

State is small: at most one outstanding CALL of ours (§4.1.1: a sender has
one CALL unanswered at a time; ``send_call`` raises ``CallInProgress``
otherwise), with its deadline, and the incoming CALLs not yet answered. What
comes in:

=========================  ==================================================
frame                      outcome
=========================  ==================================================
valid CALL                 ``IncomingCall``; the application must answer it
                           with ``reply`` or ``reply_error``
bad CALL                   a CALLERROR frame at once, plus a ProtocolProblem
                           for the log; the application never sees the call
CALLRESULT / CALLERROR     ``CallResultReceived`` / ``CallErrorReceived``; an
for the outstanding CALL   invalid one (bad shape, payload failing the
                           response schema) becomes ``CallErrorReceived`` with
                           a description starting "invalid response:", so the
                           application handles it like an error reply
any other CALLRESULT /     ``ProtocolProblem``, no other effect (a late answer
CALLERROR                  to a timed-out call lands here)
anything else              a CALLERROR if a UniqueId can be extracted and the
                           frame is not a response, else ``ProtocolProblem``
=========================  ==================================================

``receive`` never raises. The frames it returns are never CALLRESULTs.

Which CALLERROR code (OCPP-J 1.6 §4.2.3) a bad incoming frame gets:

* not JSON, oversized (``max_payload_chars``, measured on the whole frame
  text), UniqueId over 36 characters, Action not a string, MessageTypeId not
  an integer, duplicate object keys, NaN/Infinity literals, nesting deeper
  than any OCPP 1.6 PDU, payload not an object, field not in the schema:
  FormationViolation. An oversized frame is not parsed at all (its UniqueId is
  read from its first characters); the frame is refused as a PDU, so
  FormationViolation ("not conform the PDU structure") tells the peer more
  than GenericError would.
* wrong element count, unknown MessageTypeId: ProtocolError.
* unknown Action: NotImplemented.
* schema faults: see ``ocpp16.schemas``; numbers a double cannot hold
  (``1e400``, integers of more than 64 digits): PropertyConstraintViolation.

Time: ``receive`` and ``tick`` first expire the outstanding CALL if ``now`` is
at or past its deadline, so the outcome depends only on the times given, never
on how often ``tick`` is called: an answer that arrives late is a stray.

Everything sent is compact JSON (``separators=(",", ":")``, UTF-8 text, no
NaN). Payloads are plain JSON values: dicts with camelCase keys, lists,
strings, ints, finite floats, bools; ``None`` is refused (leave an optional
field out instead).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from ocpp16.errors import (
    CALL_ERROR_CODES,
    CallError,
    CallInProgress,
    OcppError,
    OutgoingPayloadInvalid,
)
from ocpp16.schemas import ACTIONS, validate_request, validate_response

CALL = 2
CALLRESULT = 3
CALLERROR = 4

#: OCPP-J 1.6 §4.2.1: UniqueId is a string of at most 36 characters.
MAX_UNIQUE_ID = 36
# The deepest OCPP 1.6 PDU (SetChargingProfile, MeterValues) nests 5 levels.
MAX_DEPTH = 16
# Integers beyond this many digits are no OCPP value (and int() of thousands
# of digits costs time and hits Python's int_max_str_digits).
_MAX_INT_DIGITS = 64
# How much of an unparsable or oversized frame is searched for its UniqueId.
_PREFIX_SCAN = 512
_PREFIX = re.compile(
    r'[ \t\n\r]*\[[ \t\n\r]*([0-9]{1,3})[ \t\n\r]*,[ \t\n\r]*"'
    r'((?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*)"'
)


@dataclass(frozen=True)
class IncomingCall:
    """A valid CALL from the peer: answer it with ``reply`` or ``reply_error``."""

    unique_id: str
    action: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class CallResultReceived:
    """The peer answered our outstanding CALL; ``request`` is what we sent."""

    unique_id: str
    action: str
    payload: dict[str, Any]
    request: dict[str, Any]


@dataclass(frozen=True)
class CallErrorReceived:
    """The peer refused our outstanding CALL, or its answer was invalid.

    ``code`` is the peer's errorCode as sent (a 2.0-speaking peer may send
    codes outside ``CALL_ERROR_CODES``); for an invalid answer it is ours and
    ``description`` starts with "invalid response:".
    """

    unique_id: str
    action: str
    code: str
    description: str
    details: dict[str, Any]
    request: dict[str, Any]


@dataclass(frozen=True)
class CallTimedOut:
    """Our outstanding CALL got no answer by its deadline, or the link was lost."""

    unique_id: str
    action: str
    request: dict[str, Any]


@dataclass(frozen=True)
class ProtocolProblem:
    """Something for the log: unparsable frames, stray answers, refused CALLs."""

    description: str


Event = IncomingCall | CallResultReceived | CallErrorReceived | CallTimedOut | ProtocolProblem


@dataclass(frozen=True)
class _Outstanding:
    unique_id: str
    action: str
    request: dict[str, Any]
    deadline: float


class _BadNumber:
    """Stands in, after parsing, for a number we cannot accept."""

    __slots__ = ("code", "reason")

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason


class _DuplicateKeys(dict[str, Any]):
    """An object whose text repeated a key (RFC 8259 §4: names SHOULD be unique)."""

    key: str = ""


def _parse_float(text: str) -> float | _BadNumber:
    value = float(text)
    if math.isfinite(value):
        return value
    return _BadNumber("PropertyConstraintViolation", f"{text[:20]} is out of range")


def _parse_int(text: str) -> int | _BadNumber:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        return _BadNumber("PropertyConstraintViolation", f"integer of {len(text)} digits")
    return int(text)


def _parse_constant(text: str) -> _BadNumber:
    return _BadNumber("FormationViolation", f"{text} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    dup = _DuplicateKeys(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            dup.key = key
            break
        seen.add(key)
    return dup


def _loads(text: str) -> Any:
    return json.loads(
        text,
        parse_float=_parse_float,
        parse_int=_parse_int,
        parse_constant=_parse_constant,
        object_pairs_hook=_object,
    )


def _dumps(frame: list[Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates, which no UTF-8 websocket can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(parts: tuple[str | int, ...]) -> str:
    out = "payload"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{_clean(part, 40)}"
    return out


def _clean(text: str, limit: int = 200) -> str:
    """Bounded and encodable, for descriptions."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _excerpt(text: str) -> str:
    return _clean(repr(text[:80]) + ("..." if len(text) > 80 else ""))


def _inspect(value: object) -> CallError | None:
    """Faults of a parsed value that its schema cannot see (iterative: no recursion)."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if len(where) > MAX_DEPTH:
            return CallError("FormationViolation", f"{_path(where)}: nested too deeply")
        if isinstance(item, _BadNumber):
            return CallError(item.code, f"{_path(where)}: {item.reason}")
        if isinstance(item, str):
            if not _encodable(item):
                return CallError("FormationViolation", f"{_path(where)}: lone surrogate")
        elif isinstance(item, dict):
            if isinstance(item, _DuplicateKeys):
                return CallError(
                    "FormationViolation", f"{_path((*where, item.key))}: duplicate key"
                )
            for key, sub in item.items():
                if not _encodable(key):
                    return CallError("FormationViolation", f"{_path(where)}: lone surrogate")
                stack.append((sub, (*where, key)))
        elif isinstance(item, list):
            stack.extend((sub, (*where, i)) for i, sub in enumerate(item))
    return None


def _outgoing_fault(value: object) -> str | None:
    """Why a payload we are about to send is not plain JSON, or None."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if len(where) > MAX_DEPTH:
            return f"{_path(where)}: nested too deeply (a cycle?)"
        if item is None:
            return f"{_path(where)}: None (leave an optional field out instead)"
        if isinstance(item, str):
            if not _encodable(item):
                return f"{_path(where)}: string with a lone surrogate"
        elif isinstance(item, bool | int):
            pass
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_path(where)}: {item} is not a JSON number"
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str) or not _encodable(key):
                    return f"{_path(where)}: key {key!r} is not a JSON string"
                stack.append((sub, (*where, key)))
        elif isinstance(item, list):
            stack.extend((sub, (*where, i)) for i, sub in enumerate(item))
        else:
            return f"{_path(where)}: {type(item).__name__} is not a JSON value"
    return None


class RpcSession:
    """One side of an OCPP-J 1.6 RPC connection: text in, frames and events out.

    The same object serves successive websocket connections: after
    ``connection_lost`` it is empty and ready.
    """

    def __init__(
        self,
        *,
        call_timeout: float = 30.0,
        id_factory: Callable[[], str] = lambda: str(uuid4()),
        max_payload_chars: int = 65536,
    ) -> None:
        self._call_timeout = call_timeout
        self._id_factory = id_factory
        self._max_chars = max_payload_chars
        self._outstanding: _Outstanding | None = None
        # Incoming CALLs not yet answered, oldest first. A list of pairs, not a
        # dict: a peer that retries with the same UniqueId gets both answered.
        self._unanswered: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ state

    @property
    def call_outstanding(self) -> bool:
        """True while our CALL awaits its answer (no other CALL may be sent)."""
        return self._outstanding is not None

    @property
    def next_deadline(self) -> float | None:
        """When ``tick`` will report the outstanding CALL as timed out."""
        return None if self._outstanding is None else self._outstanding.deadline

    @property
    def unanswered(self) -> tuple[tuple[str, str], ...]:
        """Incoming CALLs still to be answered, as (unique_id, action), oldest first."""
        return tuple(self._unanswered)

    # --------------------------------------------------------------- outgoing

    def send_call(
        self, action: str, payload: dict[str, Any], now: float, *, unique_id: str | None = None
    ) -> str:
        """The CALL frame for ``action``; the call is outstanding until answered.

        Raises ``CallInProgress`` while another CALL is outstanding and
        ``OutgoingPayloadInvalid`` if the payload fails the request schema,
        is not plain JSON, or the UniqueId is not 1..36 characters.
        """
        if self._outstanding is not None:
            raise CallInProgress(self._outstanding.unique_id, self._outstanding.action)
        if action not in ACTIONS:
            raise OutgoingPayloadInvalid(action, "unknown action")
        self._check_outgoing(action, payload, validate_request)
        uid = self._id_factory() if unique_id is None else unique_id
        if not (isinstance(uid, str) and 0 < len(uid) <= MAX_UNIQUE_ID and _encodable(uid)):
            raise OutgoingPayloadInvalid(
                action, f"UniqueId {uid!r} is not a string of 1..{MAX_UNIQUE_ID} characters"
            )
        text = _dumps([CALL, uid, action, payload])
        self._outstanding = _Outstanding(
            uid, action, copy.deepcopy(payload), now + self._call_timeout
        )
        return text

    def reply(self, unique_id: str, payload: dict[str, Any]) -> str:
        """The CALLRESULT frame answering the IncomingCall ``unique_id``.

        ``OutgoingPayloadInvalid`` if the payload fails the response schema:
        the call stays unanswered and the caller should ``reply_error`` it
        with InternalError. ``OcppError`` if no such call awaits an answer.
        """
        index, action = self._find(unique_id)
        self._check_outgoing(action, payload, validate_response)
        del self._unanswered[index]
        return _dumps([CALLRESULT, unique_id, payload])

    def reply_error(
        self,
        unique_id: str,
        code: str,
        description: str = "",
        details: dict[str, Any] | None = None,
    ) -> str:
        """The CALLERROR frame answering the IncomingCall ``unique_id``.

        ``code`` must be one of the ten OCPP-J 1.6 codes and ``details`` plain
        JSON, else ``OutgoingPayloadInvalid`` (the call stays unanswered).
        ``OcppError`` if no such call awaits an answer.
        """
        index, action = self._find(unique_id)
        if code not in CALL_ERROR_CODES:
            raise OutgoingPayloadInvalid(
                action, f"{code!r} is not an OCPP-J 1.6 CALLERROR code (§4.2.3)"
            )
        if not isinstance(description, str) or not _encodable(description):
            raise OutgoingPayloadInvalid(action, "errorDescription is not a valid string")
        details = {} if details is None else details
        fault = _outgoing_fault(details) if isinstance(details, dict) else "not an object"
        if fault is not None:
            raise OutgoingPayloadInvalid(action, f"errorDetails: {fault}")
        del self._unanswered[index]
        return _dumps([CALLERROR, unique_id, code, description, details])

    def _find(self, unique_id: str) -> tuple[int, str]:
        for index, (uid, action) in enumerate(self._unanswered):
            if uid == unique_id:
                return index, action
        raise OcppError(f"no unanswered incoming CALL has UniqueId {unique_id!r}")

    @staticmethod
    def _check_outgoing(
        action: str, payload: object, validate: Callable[[str, object], None]
    ) -> None:
        if not isinstance(payload, dict):
            raise OutgoingPayloadInvalid(action, "payload is not a dict")
        fault = _outgoing_fault(payload)
        if fault is not None:
            raise OutgoingPayloadInvalid(action, fault)
        try:
            validate(action, payload)
        except CallError as exc:
            raise OutgoingPayloadInvalid(action, f"{exc.code}: {exc.description}") from exc

    # ------------------------------------------------------------------- time

    def tick(self, now: float) -> list[Event]:
        """``CallTimedOut`` if the outstanding CALL's deadline is at or before ``now``."""
        out = self._outstanding
        if out is None or now < out.deadline:
            return []
        self._outstanding = None
        return [CallTimedOut(out.unique_id, out.action, out.request)]

    def connection_lost(self, now: float) -> list[Event]:
        """The link is gone: report the outstanding CALL as timed out, forget the rest.

        Unanswered incoming CALLs are dropped: an answer on a new connection
        would reach nobody (the peer's call died with the old one).
        """
        out = self._outstanding
        self._outstanding = None
        self._unanswered.clear()
        if out is None:
            return []
        return [CallTimedOut(out.unique_id, out.action, out.request)]

    # --------------------------------------------------------------- incoming

    def receive(self, text: str, now: float) -> tuple[list[str], list[Event]]:
        """Frames to send back (CALLERRORs only) and events, for one text message.

        Never raises, whatever ``text`` is.
        """
        events = self.tick(now)
        try:
            frames, more = self._receive(text)
        except Exception as exc:  # the contract: a peer cannot crash us
            return [], [*events, ProtocolProblem(f"internal error on a frame: {exc!r}")]
        return frames, events + more

    def _receive(self, text: object) -> tuple[list[str], list[Event]]:
        if not isinstance(text, str):
            return [], [ProtocolProblem(f"not a text frame: {type(text).__name__}")]
        if len(text) > self._max_chars:
            return self._unparsed(
                text, f"frame of {len(text)} characters exceeds the limit of {self._max_chars}"
            )
        try:
            msg = _loads(text)
        except (ValueError, RecursionError) as exc:
            return self._unparsed(text, f"not valid JSON ({_clean(str(exc), 80)})")
        if not isinstance(msg, list):
            return [], [ProtocolProblem(f"frame is not a JSON array: {_excerpt(text)}")]
        if len(msg) < 2 or not isinstance(msg[1], str) or not _encodable(msg[1]):
            return [], [ProtocolProblem(f"frame without a UniqueId: {_excerpt(text)}")]
        uid: str = msg[1]
        kind = msg[0]
        if type(kind) is not int:
            return self._refuse(
                uid, CallError("FormationViolation", "MessageTypeId is not an integer")
            )
        if kind == CALL:
            return self._on_call(uid, msg)
        if kind in (CALLRESULT, CALLERROR):
            return self._on_answer(uid, kind, msg)
        return self._refuse(uid, CallError("ProtocolError", f"unknown MessageTypeId {kind}"))

    def _unparsed(self, text: str, reason: str) -> tuple[list[str], list[Event]]:
        """A frame we will not or cannot parse: answer it if its start names a UniqueId."""
        m = _PREFIX.match(text, 0, _PREFIX_SCAN)
        if m is not None:
            kind = int(m.group(1))
            uid = json.loads(f'"{m.group(2)}"')
            if _encodable(uid):
                if kind not in (CALLRESULT, CALLERROR):
                    return self._refuse(uid, CallError("FormationViolation", reason))
                out = self._outstanding
                if out is not None and out.unique_id == uid:
                    return [], [self._invalid_answer(out, "FormationViolation", reason)]
        return [], [ProtocolProblem(f"{reason}: {_excerpt(text)}")]

    def _refuse(self, uid: str, error: CallError) -> tuple[list[str], list[Event]]:
        frame = _dumps([CALLERROR, uid, error.code, error.description, error.details])
        problem = ProtocolProblem(
            f"refused frame {_clean(uid, 60)!r}: {error.code}: {error.description}"
        )
        return [frame], [problem]

    def _on_call(self, uid: str, msg: list[Any]) -> tuple[list[str], list[Event]]:
        if len(msg) != 4:
            return self._refuse(
                uid, CallError("ProtocolError", f"CALL has {len(msg)} elements, 4 expected")
            )
        if len(uid) > MAX_UNIQUE_ID:
            return self._refuse(
                uid,
                CallError(
                    "FormationViolation",
                    f"UniqueId of {len(uid)} characters, at most {MAX_UNIQUE_ID} allowed",
                ),
            )
        _, _, action, payload = msg
        if not isinstance(action, str):
            return self._refuse(uid, CallError("FormationViolation", "Action is not a string"))
        if action not in ACTIONS:
            return self._refuse(
                uid, CallError("NotImplemented", f"unknown action {_clean(repr(action), 60)}")
            )
        try:
            fault = _inspect(payload)
            if fault is not None:
                raise CallError(fault.code, f"{action}: {fault.description}")
            validate_request(action, payload)
        except CallError as exc:
            return self._refuse(uid, exc)
        events: list[Event] = []
        if self._unanswered:
            events.append(
                ProtocolProblem(
                    f"CALL {action} ({_clean(uid, 60)}) arrived while {len(self._unanswered)}"
                    " earlier CALL(s) are unanswered (OCPP-J 1.6 §4.1.1)"
                )
            )
        self._unanswered.append((uid, action))
        events.append(IncomingCall(uid, action, payload))
        return [], events

    def _on_answer(self, uid: str, kind: int, msg: list[Any]) -> tuple[list[str], list[Event]]:
        name = "CALLRESULT" if kind == CALLRESULT else "CALLERROR"
        out = self._outstanding
        if out is None or out.unique_id != uid:
            expected = f"{out.unique_id!r} is" if out is not None else "no CALL is"
            return [], [
                ProtocolProblem(f"{name} for {_clean(uid, 60)!r} ignored: {expected} outstanding")
            ]
        if kind == CALLRESULT:
            if len(msg) != 3:
                reason = f"CALLRESULT has {len(msg)} elements, 3 expected"
                return [], [self._invalid_answer(out, "ProtocolError", reason)]
            payload = msg[2]
            try:
                fault = _inspect(payload)
                if fault is not None:
                    raise fault
                validate_response(out.action, payload)
            except CallError as exc:
                return [], [self._invalid_answer(out, exc.code, exc.description)]
            self._outstanding = None
            return [], [CallResultReceived(uid, out.action, payload, out.request)]
        if len(msg) != 5:
            reason = f"CALLERROR has {len(msg)} elements, 5 expected"
            return [], [self._invalid_answer(out, "ProtocolError", reason)]
        _, _, code, description, details = msg
        shape = isinstance(code, str) and isinstance(description, str) and isinstance(details, dict)
        if not shape or _inspect([code, description, details]) is not None:
            reason = "CALLERROR elements are not string, string, object"
            return [], [self._invalid_answer(out, "FormationViolation", reason)]
        self._outstanding = None
        return [], [CallErrorReceived(uid, out.action, code, description, details, out.request)]

    def _invalid_answer(self, out: _Outstanding, code: str, reason: str) -> CallErrorReceived:
        """An answer to our CALL that we cannot use ends the CALL as an error."""
        self._outstanding = None
        return CallErrorReceived(
            out.unique_id, out.action, code, f"invalid response: {reason}", {}, out.request
        )
