"""Property tests of the RPC session: whatever arrives, it answers correctly and survives.

Payloads for the 39 actions are built from the ocpp package's own schemas by a
small generator (``example``), then mutated at random places; random JSON
values, random arrays and random text are thrown at the session too.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpp16.errors import CALL_ERROR_CODES, CallError
from ocpp16.rpc import (
    CallErrorReceived,
    CallResultReceived,
    Event,
    IncomingCall,
    RpcSession,
)
from ocpp16.schemas import ACTIONS, validate_request, validate_response

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OUR_ID = "cp-1"
ACTION_LIST = sorted(ACTIONS)


def load(action: str, direction: str) -> dict[str, Any]:
    name = f"{action}Response" if direction == "response" else action
    path = resources.files("ocpp.v16") / "schemas" / f"{name}.json"
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8-sig"))
    return schema


SCHEMAS = {(a, d): load(a, d) for a in ACTION_LIST for d in ("request", "response")}


def example(schema: dict[str, Any], root: dict[str, Any], *, full: bool) -> Any:
    """A valid instance of ``schema``: required properties only, or all when ``full``."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return example(root["definitions"][name], root, full=full)
    if "enum" in schema:
        return schema["enum"][-1 if full else 0]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        keys = props if full else schema.get("required", [])
        return {k: example(props[k], root, full=full) for k in keys}
    if kind == "array":
        count = max(schema.get("minItems", 0), 2 if full else 1)
        return [example(schema["items"], root, full=full) for _ in range(count)]
    if kind == "string":
        if schema.get("format") == "date-time":
            return "2024-05-01T12:00:00.5+02:00" if full else "2024-05-01T12:00:00Z"
        return "é" * schema.get("maxLength", 8) if full else "x"
    if kind == "integer":
        return 2_147_483_647 if full else 0
    if kind == "number":
        return 31.9 if full else 6.1
    if kind == "boolean":
        return full
    raise AssertionError(f"no example for {schema}")


def examples(action: str, direction: str) -> list[dict[str, Any]]:
    schema = SCHEMAS[(action, direction)]
    return [example(schema, schema, full=False), example(schema, schema, full=True)]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for key, sub in value.items():
            out += paths(sub, (*prefix, key))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            out += paths(sub, (*prefix, index))
    return out


def replaced(value: Any, where: tuple[Any, ...], new: Any) -> Any:
    if not where:
        return new
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[where[0]] = replaced(copy[where[0]], where[1:], new)
    return copy


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["2024-05-01T12:00:00Z", "Accepted", "", "x" * 51, 6.1, 0.1, -0.0])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.sampled_from([OUR_ID, "a", "", "x" * 36, "x" * 37]) | st.text(max_size=40)
message_types = st.sampled_from([2, 3, 4]) | st.sampled_from([0, 1, 5, -2, 2.0, "2", True, None])
element = json_values | ids | message_types | st.sampled_from(ACTION_LIST)


# ------------------------------------------------------------------ oracle


def extracted(text: str) -> tuple[Any, str] | None:
    """(MessageTypeId, UniqueId) of a frame that names a usable UniqueId, else None."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(msg, list) or len(msg) < 2 or not isinstance(msg[1], str):
        return None
    try:
        msg[1].encode("utf-8")
    except UnicodeEncodeError:
        return None
    return msg[0], msg[1]


def fresh() -> RpcSession:
    """A session with a CALL of its own outstanding, so answers can hit it."""
    session = RpcSession(id_factory=lambda: OUR_ID, max_payload_chars=20000)
    session.send_call("Heartbeat", {}, 0.0)
    return session


def check(
    session: RpcSession, text: str, action: str = "Heartbeat"
) -> tuple[list[str], list[Event]]:
    """receive() one frame and check every promise that holds for any input."""
    was_outstanding = session.call_outstanding
    frames, events = session.receive(text, 1.0)
    calls = [e for e in events if isinstance(e, IncomingCall)]
    for frame in frames:
        frame.encode("utf-8")
        decoded = json.loads(frame)
        assert frame == json.dumps(decoded, separators=(",", ":"), ensure_ascii=False)
        assert decoded[0] == 4 and len(decoded) == 5, decoded  # never a CALLRESULT
        assert decoded[2] in CALL_ERROR_CODES
        assert isinstance(decoded[3], str) and decoded[4] == {}
    assert len(frames) + len(calls) <= 1
    found = extracted(text)
    if found is not None and len(text) <= 20000:
        kind, uid = found
        if type(kind) is int and kind in (3, 4):
            assert frames == [] and calls == []
        else:
            # A CALL (or anything else naming a UniqueId) gets exactly one answer:
            # a CALLERROR now, or an IncomingCall the application answers.
            assert len(frames) + len(calls) == 1, (text[:200], events)
            if frames:
                assert json.loads(frames[0])[1] == uid
            else:
                assert kind == 2 and calls[0].unique_id == uid
    elif found is None:
        assert calls == []
    for call in calls:
        validate_request(call.action, call.payload)  # accepted means valid
    answers = [e for e in events if isinstance(e, CallResultReceived | CallErrorReceived)]
    assert len(answers) <= 1
    if answers:
        assert was_outstanding and answers[0].unique_id == OUR_ID
        assert not session.call_outstanding
        if isinstance(answers[0], CallResultReceived):
            validate_response(action, answers[0].payload)
    else:
        assert session.call_outstanding == was_outstanding
    return frames, events


def still_usable(session: RpcSession) -> None:
    for uid, _ in session.unanswered:
        session.reply_error(uid, "GenericError")
    assert session.unanswered == ()
    if session.call_outstanding:
        (event,) = session.receive(f'[4,"{OUR_ID}","NotSupported","",{{}}]', 2.0)[1]
        assert isinstance(event, CallErrorReceived) and event.description == ""
    session.send_call("Authorize", {"idTag": "T"}, 3.0, unique_id="next")
    frames, events = session.receive('[2,"in","ClearCache",{}]', 3.0)
    assert frames == [] and events == [IncomingCall("in", "ClearCache", {})]
    session.reply("in", {"status": "Accepted"})
    (event,) = session.receive('[4,"next","NotSupported","",{}]', 4.0)[1]
    assert isinstance(event, CallErrorReceived)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("action", ACTION_LIST)
def test_schema_examples_round_trip_for_every_action(action: str) -> None:
    """The generator is right, and every action travels both ways."""
    for request, response in zip(
        examples(action, "request"), examples(action, "response"), strict=True
    ):
        cs = RpcSession(id_factory=lambda: "cs")
        cp = RpcSession()
        (call,) = cp.receive(cs.send_call(action, request, 0.0), 0.0)[1]
        assert call == IncomingCall("cs", action, request)
        (result,) = cs.receive(cp.reply("cs", response), 1.0)[1]
        assert result == CallResultReceived("cs", action, response, request)


@FAST
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    session = fresh()
    check(session, text)
    still_usable(session)


@FAST
@given(json_values)
def test_random_json_values(value: Any) -> None:
    session = fresh()
    check(session, dumps(value))
    still_usable(session)


@FAST
@given(st.lists(element, max_size=6))
def test_random_arrays(items: list[Any]) -> None:
    session = fresh()
    check(session, dumps(items))
    still_usable(session)


@FAST
@given(
    st.sampled_from(ACTION_LIST),
    st.sampled_from(["request", "response"]),
    st.booleans(),
    st.data(),
)
def test_wrong_value_anywhere_in_a_valid_frame(
    action: str, direction: str, full: bool, data: st.DataObject
) -> None:
    """Replace one place of a valid CALL or CALLRESULT (frame elements included)."""
    payload = examples(action, direction)[int(full)]
    if direction == "request":
        frame: list[Any] = [2, "in", action, payload]
        session = fresh()
    else:
        frame = [3, OUR_ID, payload]
        session = RpcSession(id_factory=lambda: OUR_ID)
        session.send_call(action, examples(action, "request")[0], 0.0)
    where = data.draw(st.sampled_from(paths(frame)[1:]))
    new = data.draw(element)
    mutated = replaced(frame, where, new)
    frames, events = check(session, dumps(mutated), action)
    if where[0] == 3 and direction == "request":
        if frames:
            # Refused: the schema agrees, with the same code (unless the value
            # is nested deeper than any PDU, which only the session checks).
            reply = json.loads(frames[0])
            if "nested too deeply" not in reply[3]:
                with pytest.raises(CallError) as info:
                    validate_request(action, mutated[3])
                assert info.value.code == reply[2]
        else:
            assert events[-1] == IncomingCall("in", action, mutated[3])
    if where[0] == 2 and direction == "response":
        # The answer to our call ends it, one way or the other.
        (event,) = events
        assert isinstance(event, CallResultReceived | CallErrorReceived)
        if isinstance(event, CallErrorReceived):
            assert event.description.startswith("invalid response:")
            assert event.code in CALL_ERROR_CODES
    if not session.call_outstanding:
        session.send_call("Heartbeat", {}, 2.0)
    still_usable(session)


@FAST
@given(st.sampled_from(ACTION_LIST), st.data())
def test_random_payloads_for_every_action(action: str, data: st.DataObject) -> None:
    """Fields of the action's schema (and others) with random values."""
    props = [*sorted(SCHEMAS[action, "request"].get("properties", {})), "extra"]
    payload = data.draw(st.dictionaries(st.sampled_from(props), json_values, max_size=len(props)))
    session = fresh()
    frames, events = check(session, dumps([2, "in", action, payload]))
    if frames:
        with pytest.raises(CallError) as info:
            validate_request(action, payload)
        assert json.loads(frames[0])[2] == info.value.code
    else:
        assert events[-1] == IncomingCall("in", action, payload)
    still_usable(session)


@FAST
@given(st.text(max_size=40).filter(lambda a: a not in ACTIONS), json_values)
def test_unknown_actions(action: str, payload: Any) -> None:
    session = fresh()
    frames, _ = check(session, dumps([2, "in", action, payload]))
    assert json.loads(frames[0])[2] == "NotImplemented"
    still_usable(session)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=1, max_value=60000),
    st.sampled_from(["x", "é", "\\", '"', "\u2028"]),
)
def test_huge_strings(place: int, size: int, char: str) -> None:
    big = char * size
    frame: list[Any] = [2, "in", "DataTransfer", {"vendorId": "v", "data": "d"}]
    if place == 0:
        frame[1] = big
    elif place == 1:
        frame[2] = big
    elif place == 2:
        frame[3]["data"] = big
    else:
        frame[3][big] = 1
    session = fresh()
    text = dumps(frame)
    frames, _ = check(session, text)
    if len(text) > 20000:
        # Oversized: refused unparsed when the UniqueId can be read from the start.
        if place == 0:
            assert frames == []
        else:
            assert json.loads(frames[0])[1:3] == ["in", "FormationViolation"]
    still_usable(session)
