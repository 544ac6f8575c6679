"""The OCPP-J RPC session, sans-I/O: two sessions joined by a fake link.

Times are explicit numbers; no event loop, no sockets.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from jsonschema import Draft4Validator
from ocpp.v16.enums import Action

from ocpp16 import errors
from ocpp16.errors import (
    CALL_ERROR_CODES,
    CallError,
    CallInProgress,
    OcppError,
    OutgoingPayloadInvalid,
)
from ocpp16.rpc import (
    CallErrorReceived,
    CallResultReceived,
    CallTimedOut,
    Event,
    IncomingCall,
    ProtocolProblem,
    RpcSession,
)
from ocpp16.schemas import (
    ACTIONS,
    format_date_time,
    parse_date_time,
    validate_request,
    validate_response,
)

BOOT = {"chargePointVendor": "Vendor", "chargePointModel": "Model"}
BOOT_OK = {"status": "Accepted", "currentTime": "2024-05-01T12:00:00Z", "interval": 300}


def counter(prefix: str) -> Any:
    numbers = itertools.count(1)
    return lambda: f"{prefix}-{next(numbers)}"


class Pair:
    """A charge point and a central system session joined by a link the test drives."""

    def __init__(self, *, call_timeout: float = 30.0, max_payload_chars: int = 65536) -> None:
        self.cp = RpcSession(
            call_timeout=call_timeout, id_factory=counter("cp"), max_payload_chars=max_payload_chars
        )
        self.cs = RpcSession(
            call_timeout=call_timeout, id_factory=counter("cs"), max_payload_chars=max_payload_chars
        )

    def to_cs(self, text: str, now: float = 0.0) -> tuple[list[str], list[Event]]:
        return self.cs.receive(text, now)

    def to_cp(self, text: str, now: float = 0.0) -> tuple[list[str], list[Event]]:
        return self.cp.receive(text, now)


def deadline(session: RpcSession) -> float | None:
    """next_deadline through a call, so mypy does not narrow it between assertions."""
    return session.next_deadline


def only(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def refused(frames: list[str], events: list[Event]) -> list[Any]:
    """The one CALLERROR frame a refused CALL produced, decoded."""
    assert len(frames) == 1, (frames, events)
    assert all(isinstance(e, ProtocolProblem) for e in events)
    frame: list[Any] = json.loads(frames[0])
    assert frame[0] == 4 and len(frame) == 5
    assert frame[2] in CALL_ERROR_CODES
    return frame


def charging_profile(limit: float, min_rate: float | None = None) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "chargingRateUnit": "A",
        "startSchedule": "2024-05-01T00:00:00Z",
        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}],
    }
    if min_rate is not None:
        schedule["minChargingRate"] = min_rate
    return {
        "chargingProfileId": 7,
        "stackLevel": 0,
        "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": schedule,
    }


# ------------------------------------------------------------ round trips


def test_cp_call_answered_by_cs() -> None:
    link = Pair()
    text = link.cp.send_call("BootNotification", BOOT, 0.0)
    assert text == (
        '[2,"cp-1","BootNotification",{"chargePointVendor":"Vendor","chargePointModel":"Model"}]'
    )
    assert deadline(link.cp) == 30.0
    frames, events = link.to_cs(text)
    assert frames == []
    assert events == [IncomingCall("cp-1", "BootNotification", BOOT)]
    assert list(link.cs.unanswered) == [("cp-1", "BootNotification")]
    answer = link.cs.reply("cp-1", BOOT_OK)
    assert answer.startswith('[3,"cp-1",{"status":"Accepted"')
    assert not link.cs.unanswered
    frames, events = link.to_cp(answer, 1.0)
    assert frames == []
    assert events == [CallResultReceived("cp-1", "BootNotification", BOOT_OK, BOOT)]
    assert not link.cp.call_outstanding and deadline(link.cp) is None


def test_cs_call_answered_by_cp() -> None:
    link = Pair()
    payload = {"idTag": "TAG1", "connectorId": 1, "chargingProfile": charging_profile(16)}
    text = link.cs.send_call("RemoteStartTransaction", payload, 5.0)
    _, events = link.to_cp(text, 5.0)
    assert events == [IncomingCall("cs-1", "RemoteStartTransaction", payload)]
    _, events = link.to_cs(link.cp.reply("cs-1", {"status": "Accepted"}), 6.0)
    assert events == [
        CallResultReceived("cs-1", "RemoteStartTransaction", {"status": "Accepted"}, payload)
    ]


def test_calls_cross_in_both_directions() -> None:
    """One outstanding CALL per direction: both sides may have theirs at once."""
    link = Pair()
    up = link.cp.send_call("Heartbeat", {}, 0.0)
    down = link.cs.send_call("ClearCache", {}, 0.0)
    (cs_in,) = link.to_cs(up)[1]
    (cp_in,) = link.to_cp(down)[1]
    assert isinstance(cs_in, IncomingCall) and isinstance(cp_in, IncomingCall)
    heartbeat = {"currentTime": "2024-05-01T12:00:00Z"}
    result_cp = only(link.to_cp(link.cs.reply(cs_in.unique_id, heartbeat))[1])
    result_cs = only(link.to_cs(link.cp.reply(cp_in.unique_id, {"status": "Accepted"}))[1])
    assert isinstance(result_cp, CallResultReceived) and result_cp.action == "Heartbeat"
    assert isinstance(result_cs, CallResultReceived) and result_cs.action == "ClearCache"


def test_call_error_reply_reaches_the_caller() -> None:
    link = Pair()
    _, events = link.to_cs(link.cp.send_call("Authorize", {"idTag": "X"}, 0.0))
    call = only(events)
    assert isinstance(call, IncomingCall)
    text = link.cs.reply_error(call.unique_id, "NotSupported", "no", {"why": ["a", 1]})
    assert text == '[4,"cp-1","NotSupported","no",{"why":["a",1]}]'
    _, events = link.to_cp(text)
    assert events == [
        CallErrorReceived(
            "cp-1", "Authorize", "NotSupported", "no", {"why": ["a", 1]}, {"idTag": "X"}
        )
    ]
    assert not link.cp.call_outstanding


@pytest.mark.parametrize("code", CALL_ERROR_CODES)
def test_every_error_code_can_be_sent_and_received(code: str) -> None:
    link = Pair()
    link.to_cs(link.cp.send_call("Heartbeat", {}, 0.0))
    text = link.cs.reply_error("cp-1", code)
    assert text == f'[4,"cp-1","{code}","",{{}}]'
    (event,) = link.to_cp(text)[1]
    assert isinstance(event, CallErrorReceived) and event.code == code


def test_peer_error_code_outside_the_table_is_passed_through() -> None:
    """A 2.0-speaking peer's "FormatViolation" still ends our call as an error."""
    link = Pair()
    link.cp.send_call("Heartbeat", {}, 0.0)
    (event,) = link.to_cp('[4,"cp-1","FormatViolation","bad",{}]')[1]
    assert isinstance(event, CallErrorReceived) and event.code == "FormatViolation"


def test_serialization_is_compact_utf8_text() -> None:
    link = Pair()
    text = link.cp.send_call("DataTransfer", {"vendorId": "Ä", "data": "€ ✓"}, 0.0)
    assert text == '[2,"cp-1","DataTransfer",{"vendorId":"Ä","data":"€ ✓"}]'
    _, events = link.to_cs(text)
    assert only(events) == IncomingCall("cp-1", "DataTransfer", {"vendorId": "Ä", "data": "€ ✓"})


def test_request_is_a_copy_of_what_was_sent() -> None:
    link = Pair()
    payload: dict[str, Any] = {"idTag": "A"}
    link.cp.send_call("Authorize", payload, 0.0)
    payload["idTag"] = "changed later"
    (event,) = link.to_cp('[3,"cp-1",{"idTagInfo":{"status":"Accepted"}}]')[1]
    assert isinstance(event, CallResultReceived) and event.request == {"idTag": "A"}


def test_explicit_unique_id() -> None:
    link = Pair()
    text = link.cp.send_call("Heartbeat", {}, 0.0, unique_id="mine")
    assert text == '[2,"mine","Heartbeat",{}]'


# ------------------------------------------------- one outstanding call


def test_only_one_outstanding_call() -> None:
    link = Pair()
    link.cp.send_call("Heartbeat", {}, 0.0)
    with pytest.raises(CallInProgress) as info:
        link.cp.send_call("Authorize", {"idTag": "A"}, 1.0)
    assert (info.value.unique_id, info.value.action) == ("cp-1", "Heartbeat")
    assert deadline(link.cp) == 30.0  # the refused call changed nothing
    link.to_cp('[3,"cp-1",{"currentTime":"2024-05-01T12:00:00Z"}]', 2.0)
    assert link.cp.send_call("Authorize", {"idTag": "A"}, 3.0).startswith('[2,"cp-2"')


def test_answer_with_another_id_is_ignored() -> None:
    link = Pair()
    link.cp.send_call("Heartbeat", {}, 0.0)
    for stray in (
        '[3,"cp-9",{"currentTime":"2024-05-01T12:00:00Z"}]',
        '[4,"x","GenericError","",{}]',
    ):
        frames, events = link.to_cp(stray, 1.0)
        assert frames == []
        problem = only(events)
        assert (
            isinstance(problem, ProtocolProblem) and "'cp-1' is outstanding" in problem.description
        )
        assert link.cp.call_outstanding
    (event,) = link.to_cp('[3,"cp-1",{"currentTime":"2024-05-01T12:00:00Z"}]', 2.0)[1]
    assert isinstance(event, CallResultReceived)


def test_answer_when_nothing_is_outstanding_is_ignored() -> None:
    link = Pair()
    frames, events = link.to_cp('[3,"cp-1",{}]')
    assert frames == []
    problem = only(events)
    assert isinstance(problem, ProtocolProblem) and "no CALL is outstanding" in problem.description


def test_answer_to_an_incoming_call_only_once() -> None:
    link = Pair()
    link.to_cs(link.cp.send_call("Heartbeat", {}, 0.0))
    link.cs.reply("cp-1", {"currentTime": "2024-05-01T12:00:00Z"})
    with pytest.raises(OcppError):
        link.cs.reply("cp-1", {"currentTime": "2024-05-01T12:00:00Z"})
    with pytest.raises(OcppError):
        link.cs.reply_error("cp-1", "InternalError")
    with pytest.raises(OcppError):
        link.cs.reply("never-seen", {})


def test_incoming_calls_while_one_is_unanswered_are_accepted_and_noted() -> None:
    link = Pair()
    _, first = link.to_cp('[2,"a","ClearCache",{}]')
    assert first == [IncomingCall("a", "ClearCache", {})]
    _, second = link.to_cp('[2,"b","Reset",{"type":"Soft"}]')
    assert isinstance(second[0], ProtocolProblem) and "1 earlier" in second[0].description
    assert second[1] == IncomingCall("b", "Reset", {"type": "Soft"})
    # A peer retrying with the same UniqueId: both calls can be answered, oldest first.
    _, third = link.to_cp('[2,"a","ClearCache",{}]')
    assert third[-1] == IncomingCall("a", "ClearCache", {})
    assert link.cp.unanswered == (("a", "ClearCache"), ("b", "Reset"), ("a", "ClearCache"))
    link.cp.reply("b", {"status": "Accepted"})
    link.cp.reply("a", {"status": "Accepted"})
    link.cp.reply("a", {"status": "Rejected"})
    assert not link.cp.unanswered


# ------------------------------------------------------------- timeouts


def test_timeout_is_reported_by_tick_at_the_deadline() -> None:
    link = Pair(call_timeout=30.0)
    link.cp.send_call("Heartbeat", {}, 10.0)
    assert deadline(link.cp) == 40.0
    assert link.cp.tick(39.999) == []
    assert link.cp.tick(40.0) == [CallTimedOut("cp-1", "Heartbeat", {})]
    assert link.cp.tick(41.0) == []
    assert not link.cp.call_outstanding and deadline(link.cp) is None
    # The late answer is a stray.
    frames, events = link.to_cp('[3,"cp-1",{"currentTime":"2024-05-01T12:00:00Z"}]', 41.0)
    assert frames == [] and isinstance(only(events), ProtocolProblem)
    # And a new call may go.
    assert link.cp.send_call("Heartbeat", {}, 42.0).startswith('[2,"cp-2"')


def test_receive_expires_first_so_late_answers_do_not_depend_on_tick() -> None:
    link = Pair(call_timeout=5.0)
    link.cp.send_call("Heartbeat", {}, 0.0)
    answer = '[3,"cp-1",{"currentTime":"2024-05-01T12:00:00Z"}]'
    _, events = link.to_cp(answer, 5.0)
    assert events[0] == CallTimedOut("cp-1", "Heartbeat", {})
    assert isinstance(events[1], ProtocolProblem)
    link.cp.send_call("Heartbeat", {}, 10.0)
    _, events = link.to_cp(answer.replace("cp-1", "cp-2"), 14.999)
    assert isinstance(only(events), CallResultReceived)


def test_timeout_while_receiving_an_incoming_call() -> None:
    link = Pair(call_timeout=5.0)
    link.cp.send_call("Heartbeat", {}, 0.0)
    _, events = link.to_cp('[2,"x","ClearCache",{}]', 6.0)
    assert events == [CallTimedOut("cp-1", "Heartbeat", {}), IncomingCall("x", "ClearCache", {})]


def test_connection_lost_reports_the_outstanding_call_and_forgets_incoming() -> None:
    link = Pair()
    link.cp.send_call("Authorize", {"idTag": "A"}, 0.0)
    link.to_cp('[2,"x","ClearCache",{}]')
    assert link.cp.connection_lost(3.0) == [CallTimedOut("cp-1", "Authorize", {"idTag": "A"})]
    assert not link.cp.call_outstanding and not link.cp.unanswered
    with pytest.raises(OcppError):
        link.cp.reply("x", {"status": "Accepted"})
    assert link.cp.connection_lost(4.0) == []
    # Usable on the next connection.
    text = link.cp.send_call("Authorize", {"idTag": "A"}, 5.0)
    _, events = link.to_cs(text)
    _, events = link.to_cp(link.cs.reply("cp-2", {"idTagInfo": {"status": "Accepted"}}))
    assert isinstance(only(events), CallResultReceived)


# --------------------------------------- refused incoming CALLs: every code path

LONG_ID = "x" * 37
DEEP = "[" * 20 + "]" * 20
CASES: list[tuple[str, str, str]] = [
    # (frame, code, words in the description)
    ('[2,"id","Authorize",{"idTag":"A"}', "FormationViolation", "not valid JSON"),
    ('[2,"id","Authorize",{"idTag":NaN}]', "FormationViolation", "NaN is not JSON"),
    ('[2,"id","Authorize",{"idTag":"A","idTag":"B"}]', "FormationViolation", "duplicate key"),
    (f'[2,"id","DataTransfer",{{"vendorId":"v","data":{DEEP}}}]', "FormationViolation", "deeply"),
    (f'[2,"{LONG_ID}","Heartbeat",{{}}]', "FormationViolation", "at most 36"),
    ('[2,"id",7,{}]', "FormationViolation", "Action is not a string"),
    ('[2.0,"id","Heartbeat",{}]', "FormationViolation", "not an integer"),
    ('["2","id","Heartbeat",{}]', "FormationViolation", "not an integer"),
    ('[true,"id","Heartbeat",{}]', "FormationViolation", "not an integer"),
    ('[2,"id","Heartbeat",[]]', "FormationViolation", "payload is an array, not a JSON object"),
    ('[2,"id","Heartbeat",null]', "FormationViolation", "not a JSON object"),
    ('[2,"id","Authorize",{"idTag":"A","x":1}]', "FormationViolation", "payload.x: field not"),
    ('[2,"id","Heartbeat"]', "ProtocolError", "3 elements, 4 expected"),
    ('[2,"id","Heartbeat",{},{}]', "ProtocolError", "5 elements"),
    ('[2,"id"]', "ProtocolError", "2 elements"),
    ('[7,"id","Heartbeat",{}]', "ProtocolError", "unknown MessageTypeId 7"),
    ('[0,"id"]', "ProtocolError", "unknown MessageTypeId 0"),
    ('[2,"id","heartbeat",{}]', "NotImplemented", "heartbeat"),
    ('[2,"id","Fly",{}]', "NotImplemented", "Fly"),
    ('[2,"id","Authorize",{"idTag":5}]', "TypeConstraintViolation", "payload.idTag: integer"),
    ('[2,"id","Reset",{"type":["Soft"]}]', "TypeConstraintViolation", "payload.type: array"),
    ('[2,"id","UnlockConnector",{"connectorId":1.0}]', "TypeConstraintViolation", "connectorId"),
    ('[2,"id","UnlockConnector",{"connectorId":true}]', "TypeConstraintViolation", "boolean"),
    ('[2,"id","Authorize",{}]', "OccurenceConstraintViolation", "payload.idTag: required"),
    (
        '[2,"id","MeterValues",{"connectorId":1,"meterValue":[]}]',
        "OccurenceConstraintViolation",
        "payload.meterValue: 0 items",
    ),
    (
        '[2,"id","StartTransaction",{"connectorId":1,"idTag":"A","meterStart":0}]',
        "OccurenceConstraintViolation",
        "payload.timestamp: required",
    ),
    ('[2,"id","Authorize",{"idTag":"123456789012345678901"}]', "PropertyConstraintViolation", "21"),
    ('[2,"id","Reset",{"type":"Warm"}]', "PropertyConstraintViolation", "not one of Hard, Soft"),
    (
        '[2,"id","UnlockConnector",{"connectorId":1e400}]',
        "PropertyConstraintViolation",
        "out of range",
    ),
    (
        '[2,"id","UnlockConnector",{"connectorId":' + "9" * 70 + "}]",
        "PropertyConstraintViolation",
        "integer of 70 digits",
    ),
    (
        '[2,"id","StartTransaction",{"connectorId":1,"idTag":"A","meterStart":0,'
        '"timestamp":"2024-05-01 12:00:00"}]',
        "PropertyConstraintViolation",
        "payload.timestamp",
    ),
]


@pytest.mark.parametrize(("frame", "code", "words"), CASES)
def test_bad_call_is_refused_with_its_code(frame: str, code: str, words: str) -> None:
    link = Pair()
    frames, events = link.to_cp(frame)
    reply = refused(frames, events)
    assert reply[2] == code, reply
    assert words in reply[3], reply
    assert reply[1] == (LONG_ID if LONG_ID in frame else "id")
    assert reply[4] == {}
    assert not link.cp.unanswered
    assert any(isinstance(e, ProtocolProblem) for e in events)


def test_all_ten_codes_are_produced_somewhere() -> None:
    """Six come from receive(); the others only from the application's reply_error."""
    made = {c for _, c, _ in CASES}
    assert made == {
        "FormationViolation",
        "ProtocolError",
        "NotImplemented",
        "TypeConstraintViolation",
        "OccurenceConstraintViolation",
        "PropertyConstraintViolation",
    }
    assert made | {"NotSupported", "InternalError", "SecurityError", "GenericError"} == set(
        CALL_ERROR_CODES
    )


def test_oversized_frame_is_refused_unparsed() -> None:
    link = Pair(max_payload_chars=200)
    frame = '[2,"big","DataTransfer",{"vendorId":"v","data":"' + "x" * 300 + '"}]'
    reply = refused(*link.to_cp(frame))
    assert reply[1:3] == ["big", "FormationViolation"]
    assert "exceeds the limit of 200" in reply[3]
    # Exactly at the limit is fine.
    ok = '[2,"ok","DataTransfer",{"vendorId":"v","data":"' + "x" * 100 + '"}]'
    ok = ok.replace("x" * 100, "x" * (100 + 200 - len(ok)))
    assert len(ok) == 200
    assert isinstance(only(link.to_cp(ok)[1]), IncomingCall)


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "not json",
        "{}",
        '{"a":1}',
        "2",
        '"text"',
        "null",
        "[]",
        "[2]",
        '[2,5,"Heartbeat",{}]',
        '[2,null,"Heartbeat",{}]',
        '[2,"\\ud800","Heartbeat",{}]',
        "[" * 5000,
        "[2, 5, garbage",
    ],
)
def test_frames_without_a_usable_unique_id_get_no_reply(frame: str) -> None:
    link = Pair()
    frames, events = link.to_cp(frame)
    assert frames == []
    assert isinstance(only(events), ProtocolProblem)


def test_unique_id_is_read_from_the_start_of_broken_text() -> None:
    link = Pair()
    reply = refused(*link.to_cp('  [ 2 , "a\\u0041\\"b" , garbage'))
    assert reply[1:3] == ['aA"b', "FormationViolation"]
    # Broken answers are not replied to.
    assert link.to_cp('[3,"a", garbage')[0] == []


def test_non_text_input_is_a_problem_not_a_crash() -> None:
    link = Pair()
    frames, events = link.cp.receive(b'[2,"a","Heartbeat",{}]', 0.0)  # type: ignore[arg-type]
    assert frames == [] and isinstance(only(events), ProtocolProblem)


def test_description_of_a_huge_bad_value_stays_short() -> None:
    link = Pair()
    frame = '[2,"id","Reset",{"type":"' + "W" * 50000 + '"}]'
    reply = refused(*link.to_cp(frame))
    assert reply[2] == "PropertyConstraintViolation"
    assert len(reply[3]) < 200


def test_reply_to_bad_action_with_a_lone_surrogate_is_encodable() -> None:
    link = Pair()
    frames, _ = link.to_cp('[2,"id","\\ud800",{}]')
    frames[0].encode("utf-8")


def test_descriptions_from_the_validators_are_encodable() -> None:
    """validate_request is public: a surrogate in a bad key or value must not leak out."""
    for payload in ({"idTag": "A", "\ud800": 1}, {"idTag": "\ud800" * 30}):
        with pytest.raises(CallError) as info:
            validate_request("Authorize", payload)
        info.value.description.encode("utf-8")


def test_lone_surrogate_in_a_payload_is_refused() -> None:
    link = Pair()
    reply = refused(*link.to_cp('[2,"id","Authorize",{"idTag":"\\udc00"}]'))
    assert reply[2] == "FormationViolation" and "surrogate" in reply[3]


# ------------------------------------------------------------ date-times

GOOD_TIMES = [
    "2024-05-01T12:00:00Z",
    "2024-05-01T12:00:00z",
    "2024-05-01t12:00:00Z",
    "2024-05-01T12:00:00.5Z",
    "2024-05-01T12:00:00.123456789Z",
    "2024-05-01T12:00:00+02:00",
    "2024-05-01T12:00:00-00:00",
    "2024-02-29T23:59:59.999+23:59",
    "0001-01-01T00:00:00Z",
]
BAD_TIMES = [
    "2024-05-01T12:00:00",  # naive
    "2024-05-01 12:00:00Z",
    "2024-05-01",
    "12:00:00Z",
    "2024-05-01T12:00Z",
    "2024-05-01T12:00:00+0200",
    "2024-05-01T12:00:00+02",
    "2024-05-01T12:00:00+24:00",
    "2024-05-01T12:00:00+01:60",
    "2023-02-29T12:00:00Z",
    "2024-13-01T12:00:00Z",
    "2024-05-01T24:00:00Z",
    "2024-05-01T12:00:60Z",  # leap second: refused, see ocpp16.schemas
    "2024-05-01T12:00:00.Z",
    "0000-01-01T00:00:00Z",
    "２０２４-05-01T12:00:00Z",  # full-width digits  # noqa: RUF001
    "not-a-date",
    "",
]


@pytest.mark.parametrize("stamp", GOOD_TIMES)
def test_good_date_times_pass(stamp: str) -> None:
    link = Pair()
    link.cp.send_call("Heartbeat", {}, 0.0)
    (event,) = link.to_cp(f'[3,"cp-1",{{"currentTime":"{stamp}"}}]')[1]
    assert isinstance(event, CallResultReceived)
    assert parse_date_time(stamp).tzinfo is not None


@pytest.mark.parametrize("stamp", BAD_TIMES)
def test_bad_date_times_are_refused(stamp: str) -> None:
    link = Pair()
    # In a CALL...
    frame = json.dumps(
        [
            2,
            "id",
            "StatusNotification",
            {"connectorId": 1, "errorCode": "NoError", "status": "Available", "timestamp": stamp},
        ]
    )
    reply = refused(*link.to_cp(frame))
    assert reply[2] == "PropertyConstraintViolation" and "payload.timestamp" in reply[3]
    # ...in an answer...
    link.cp.send_call("Heartbeat", {}, 0.0)
    (event,) = link.to_cp(json.dumps([3, "cp-1", {"currentTime": stamp}]))[1]
    assert isinstance(event, CallErrorReceived)
    assert event.code == "PropertyConstraintViolation"
    assert event.description.startswith("invalid response:")
    # ...and in what we send.
    with pytest.raises(OutgoingPayloadInvalid):
        link.cp.send_call(
            "StatusNotification",
            {"connectorId": 1, "errorCode": "NoError", "status": "Available", "timestamp": stamp},
            0.0,
        )
    with pytest.raises(ValueError, match=r"\S"):
        parse_date_time(stamp)


def test_parse_and_format_date_time() -> None:
    moment = parse_date_time("2024-05-01T14:00:00.250+02:00")
    assert moment == datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    assert format_date_time(moment) == "2024-05-01T12:00:00.250Z"
    assert format_date_time(datetime(2024, 5, 1, 13, tzinfo=timezone(timedelta(hours=1)))) == (
        "2024-05-01T12:00:00Z"
    )
    with pytest.raises(ValueError, match="naive"):
        format_date_time(datetime(2024, 5, 1))


# ------------------------------------------------------ multipleOf 0.1


def test_why_plain_jsonschema_fails_multiple_of() -> None:
    """Binary floats: 6.1 / 0.1 == 60.99999999999999, so the stock validator refuses 6.1."""
    stock = Draft4Validator({"type": "number", "multipleOf": 0.1})
    assert not stock.is_valid(6.1)
    validate_request(
        "SetChargingProfile", {"connectorId": 1, "csChargingProfiles": charging_profile(6.1)}
    )


def test_every_tenth_from_0_to_80_amps_is_a_valid_limit() -> None:
    for tenths in range(801):
        limit = round(tenths / 10, 1)
        payload = {"connectorId": 1, "csChargingProfiles": charging_profile(limit, limit)}
        validate_request("SetChargingProfile", payload)


def test_set_charging_profile_limit_6_1_travels_as_a_float() -> None:
    link = Pair()
    payload = {"connectorId": 1, "csChargingProfiles": charging_profile(6.1, 6.0)}
    text = link.cs.send_call("SetChargingProfile", payload, 0.0)
    assert '"limit":6.1' in text
    call = only(link.to_cp(text)[1])
    assert isinstance(call, IncomingCall)
    limit = call.payload["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0][
        "limit"
    ]
    assert limit == 6.1 and type(limit) is float


@pytest.mark.parametrize("limit", ["6.15", "0.05", "16.01", "6.1000001"])
def test_limits_not_a_multiple_of_a_tenth_are_refused(limit: str) -> None:
    link = Pair()
    body = json.dumps({"connectorId": 1, "csChargingProfiles": charging_profile(0.0)})
    frame = (
        '[2,"id","SetChargingProfile",' + body.replace('"limit": 0.0', f'"limit": {limit}') + "]"
    )
    reply = refused(*link.to_cp(frame))
    assert reply[2] == "PropertyConstraintViolation"
    assert "chargingSchedulePeriod[0].limit" in reply[3]


def test_remote_start_transaction_charging_profile() -> None:
    link = Pair()
    good: dict[str, Any] = {"idTag": "T", "chargingProfile": charging_profile(10.7, 0.3)}
    good["chargingProfile"]["chargingProfilePurpose"] = "TxProfile"
    call = only(link.to_cp(link.cs.send_call("RemoteStartTransaction", good, 0.0))[1])
    assert isinstance(call, IncomingCall) and call.payload == good
    # 0.1 + 0.2 is 0.30000000000000004: not a tenth; senders must round.
    bad = {"idTag": "T", "chargingProfile": charging_profile(10.7, 0.1 + 0.2)}
    with pytest.raises(OutgoingPayloadInvalid, match="minChargingRate"):
        RpcSession().send_call("RemoteStartTransaction", bad, 0.0)
    frame = json.dumps([2, "rs", "RemoteStartTransaction", bad])
    assert refused(*link.to_cp(frame))[2] == "PropertyConstraintViolation"


def test_composite_schedule_response_limits() -> None:
    link = Pair()
    text = link.cs.send_call("GetCompositeSchedule", {"connectorId": 1, "duration": 3600}, 0.0)
    link.to_cp(text)
    schedule = {
        "chargingRateUnit": "A",
        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 13.8}],
    }
    with pytest.raises(OutgoingPayloadInvalid):
        link.cp.reply(
            "cs-1",
            {
                "status": "Accepted",
                "chargingSchedule": {**schedule, "minChargingRate": 13.799999999999999},
            },
        )
    answer = link.cp.reply(
        "cs-1", {"status": "Accepted", "connectorId": 1, "chargingSchedule": schedule}
    )
    (event,) = link.to_cs(answer)[1]
    assert isinstance(event, CallResultReceived)


def no_decimals(value: object) -> bool:
    if isinstance(value, dict):
        return all(no_decimals(v) for v in value.values())
    if isinstance(value, list):
        return all(no_decimals(v) for v in value)
    return not isinstance(value, Decimal)


# ------------------------------------------------- outgoing validation


@pytest.mark.parametrize(
    ("action", "payload", "words"),
    [
        ("Authorize", {"idTag": None}, "None (leave an optional field out instead)"),
        ("Authorize", {"id_tag": "A"}, "id_tag"),
        ("Authorize", {}, "required"),
        ("Authorize", {"idTag": "A" * 21}, "21 characters"),
        (
            "StatusNotification",
            {
                "connectorId": 1,
                "errorCode": "NoError",
                "status": "Busy",
                "timestamp": "2024-05-01T12:00:00Z",
            },
            "Busy",
        ),
        ("MeterValues", {"connectorId": 1, "meterValue": ()}, "tuple"),
        ("MeterValues", {"connectorId": float("nan"), "meterValue": []}, "nan"),
        ("Authorize", {"idTag": Decimal("1")}, "Decimal"),
        ("Authorize", {1: "A"}, "key 1"),
        ("Authorize", {"idTag": "\udc00"}, "surrogate"),
        ("Fly", {}, "unknown action"),
        ("Authorize", ["idTag"], "not a dict"),
    ],
)
def test_invalid_outgoing_call_is_refused_and_nothing_is_outstanding(
    action: str, payload: Any, words: str
) -> None:
    session = RpcSession()
    with pytest.raises(OutgoingPayloadInvalid) as info:
        session.send_call(action, payload, 0.0)
    assert info.value.action == action
    assert words in info.value.reason
    assert not session.call_outstanding


def test_a_cyclic_payload_is_refused() -> None:
    data: dict[str, Any] = {}
    data["self"] = data
    with pytest.raises(OutgoingPayloadInvalid, match="deeply"):
        RpcSession().send_call("DataTransfer", {"vendorId": "v", "data": data}, 0.0)


@pytest.mark.parametrize("uid", ["", "x" * 37])
def test_bad_unique_ids_are_refused(uid: str) -> None:
    with pytest.raises(OutgoingPayloadInvalid, match="UniqueId"):
        RpcSession().send_call("Heartbeat", {}, 0.0, unique_id=uid)
    with pytest.raises(OutgoingPayloadInvalid, match="UniqueId"):
        RpcSession(id_factory=lambda: uid).send_call("Heartbeat", {}, 0.0)


def test_invalid_reply_leaves_the_call_unanswered_for_an_internal_error() -> None:
    link = Pair()
    link.to_cs(link.cp.send_call("BootNotification", BOOT, 0.0))
    with pytest.raises(OutgoingPayloadInvalid, match="interval"):
        link.cs.reply("cp-1", {"status": "Accepted", "currentTime": "2024-05-01T12:00:00Z"})
    assert link.cs.unanswered == (("cp-1", "BootNotification"),)
    text = link.cs.reply_error("cp-1", "InternalError", "our bug")
    (event,) = link.to_cp(text)[1]
    assert isinstance(event, CallErrorReceived) and event.code == "InternalError"


def test_reply_error_refuses_unknown_codes_and_bad_details() -> None:
    link = Pair()
    link.to_cs(link.cp.send_call("Heartbeat", {}, 0.0))
    with pytest.raises(OutgoingPayloadInvalid, match="FormatViolation"):
        link.cs.reply_error("cp-1", "FormatViolation")
    with pytest.raises(OutgoingPayloadInvalid, match="errorDetails"):
        link.cs.reply_error("cp-1", "GenericError", "", {"x": None})
    with pytest.raises(OutgoingPayloadInvalid, match="errorDetails"):
        link.cs.reply_error("cp-1", "GenericError", "", ["x"])  # type: ignore[arg-type]
    with pytest.raises(OutgoingPayloadInvalid, match="errorDescription"):
        link.cs.reply_error("cp-1", "GenericError", "\ud800")
    assert link.cs.unanswered == (("cp-1", "Heartbeat"),)


# --------------------------------------------------- response validation


@pytest.mark.parametrize(
    ("answer", "code", "words"),
    [
        (
            '[3,"cp-1",{"status":"Accepted","currentTime":"2024-05-01T12:00:00Z"}]',
            "OccurenceConstraintViolation",
            "interval",
        ),
        (
            '[3,"cp-1",{"status":"OK","currentTime":"2024-05-01T12:00:00Z","interval":1}]',
            "PropertyConstraintViolation",
            "status",
        ),
        (
            '[3,"cp-1",{"status":"Accepted","currentTime":"2024-05-01T12:00:00Z","interval":"1"}]',
            "TypeConstraintViolation",
            "interval",
        ),
        (
            '[3,"cp-1",{"status":"Accepted","currentTime":"2024-05-01T12:00:00Z","interval":1,"x":1}]',
            "FormationViolation",
            "payload.x",
        ),
        ('[3,"cp-1",[]]', "FormationViolation", "not a JSON object"),
        ('[3,"cp-1"]', "ProtocolError", "2 elements"),
        ('[3,"cp-1",{},{}]', "ProtocolError", "4 elements"),
        ('[3,"cp-1",{"status":"Accepted",', "FormationViolation", "not valid JSON"),
        ('[3,"cp-1",{"interval":NaN}]', "FormationViolation", "NaN"),
        ('[4,"cp-1","GenericError"]', "ProtocolError", "3 elements"),
        ('[4,"cp-1","GenericError","",[]]', "FormationViolation", "CALLERROR elements"),
        ('[4,"cp-1",5,"",{}]', "FormationViolation", "CALLERROR elements"),
        ('[4,"cp-1","GenericError","\\udc00",{}]', "FormationViolation", "CALLERROR elements"),
    ],
)
def test_invalid_answer_ends_the_call_as_an_error(answer: str, code: str, words: str) -> None:
    link = Pair()
    link.cp.send_call("BootNotification", BOOT, 0.0)
    frames, events = link.to_cp(answer, 1.0)
    assert frames == []  # an answer is never answered
    event = only(events)
    assert isinstance(event, CallErrorReceived), event
    assert (event.unique_id, event.action, event.code) == ("cp-1", "BootNotification", code)
    assert event.description.startswith("invalid response:") and words in event.description
    assert event.request == BOOT and event.details == {}
    assert not link.cp.call_outstanding


def test_oversized_answer_to_our_call_ends_it() -> None:
    link = Pair(max_payload_chars=100)
    link.cp.send_call("DataTransfer", {"vendorId": "v"}, 0.0)
    (event,) = link.to_cp('[3,"cp-1",{"status":"Accepted","data":"' + "x" * 200 + '"}]')[1]
    assert isinstance(event, CallErrorReceived) and event.code == "FormationViolation"
    assert "exceeds the limit" in event.description


def test_payloads_handed_over_are_plain_python() -> None:
    link = Pair()
    link.cs.send_call("GetCompositeSchedule", {"connectorId": 0, "duration": 60}, 0.0)
    answer = (
        '[3,"cs-1",{"status":"Accepted","chargingSchedule":{"chargingRateUnit":"A",'
        '"minChargingRate":6.1,"chargingSchedulePeriod":[{"startPeriod":0,"limit":7.7}]}}]'
    )
    (event,) = link.to_cs(answer)[1]
    assert isinstance(event, CallResultReceived)
    assert no_decimals(event.payload)
    assert event.payload["chargingSchedule"]["minChargingRate"] == 6.1


# ------------------------------------------------------ schemas and errors


def test_all_39_actions_have_valid_request_and_response_schemas() -> None:
    assert {a.value for a in Action} == ACTIONS and len(ACTIONS) == 39
    for action in sorted(ACTIONS):
        for validate in (validate_request, validate_response):
            with pytest.raises(CallError) as info:
                validate(action, [])
            assert info.value.code == "FormationViolation"


def test_unknown_action_is_not_implemented() -> None:
    for validate in (validate_request, validate_response):
        with pytest.raises(CallError) as info:
            validate("Fly", {})
        assert info.value.code == "NotImplemented"


def test_call_error_refuses_codes_outside_the_table() -> None:
    with pytest.raises(ValueError, match="FormatViolation"):
        CallError("FormatViolation")
    error = CallError("GenericError", "why", {"a": 1})
    assert (error.code, error.description, error.details, str(error)) == (
        "GenericError",
        "why",
        {"a": 1},
        "GenericError: why",
    )
    assert CallError("InternalError").details == {}


def test_error_family() -> None:
    assert errors.CALL_ERROR_CODES == (
        "NotImplemented",
        "NotSupported",
        "InternalError",
        "ProtocolError",
        "SecurityError",
        "FormationViolation",
        "PropertyConstraintViolation",
        "OccurenceConstraintViolation",
        "TypeConstraintViolation",
        "GenericError",
    )
    transport = [
        errors.TlsError,
        errors.AuthenticationFailed,
        errors.SubprotocolRefused,
        errors.ConnectFailed,
        errors.PongTimeout,
        errors.ConnectionLost,
    ]
    for cls in transport:
        error = cls("why")
        assert isinstance(error, errors.TransportError) and error.reason == "why"
        assert cls.__doc__
    for other in (
        errors.OutgoingPayloadInvalid("Authorize", "bad"),
        errors.CallInProgress("id", "Heartbeat"),
        errors.ConfigRejected("HeartbeatInterval", "out of range"),
        errors.QueueError("/var/lib/evse/queue.db", "disk full"),
        CallError("GenericError"),
    ):
        assert isinstance(other, OcppError) and type(other).__doc__
    assert errors.ConfigRejected("K", "r").key == "K"
    assert errors.QueueError("/q", "r").path == "/q"
    assert errors.OutgoingPayloadInvalid("A", "r").reason == "r"
