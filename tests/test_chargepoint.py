"""ChargePoint (ocpp16/chargepoint.py) in process: registration, heartbeats, status
notifications, the transaction-queue sender, meter values and the handlers of
the central system's calls.

No sockets: ``ChargePoint._session`` runs on a fake connection against a
central system built on a second ``RpcSession`` (tests/chargepoint_rig.py),
with the real Configuration and TransactionQueue on a SQLite file. Time is a
MockClock advanced only when everything waits and no worker thread runs, so
every time asserted below is exact: the charge point boots at 0.0.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ocpp16.channel import CALL_TIMEOUT
from ocpp16.chargepoint import DEFAULT_BOOT_RETRY
from ocpp16.metering import format_time
from ocpp16.profiles import Handler, Task
from ocpp16.rpc import CallErrorReceived, CallResultReceived, IncomingCall
from tests.chargepoint_rig import (
    EPOCH,
    CentralSystem,
    FakeStation,
    Responder,
    Rig,
    WallClockChargePoint,
    boot_answer,
    open_rig,
    settle,
    snapshot,
    wall,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # pytest-trio runs the test on the Clock among its fixtures; the rig's
    # autojump moves it (trio's own autojump would jump during SQLite threads).
    return trio.testing.MockClock()


def now_text() -> str:
    return format_time(datetime.now(UTC))


def started(tx_id: int, status: str = "Accepted") -> Responder:
    def answer(call: IncomingCall) -> dict[str, Any]:
        return {"transactionId": tx_id, "idTagInfo": {"status": status}}

    return answer


def empty(call: IncomingCall) -> dict[str, Any]:
    return {}


def near(text: str, expected: datetime, within: float = 1.0) -> bool:
    """A timestamp the charge point shifted by its clock offset (a few ms of real time)."""
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return abs(at - expected) < timedelta(seconds=within)


def online(rig: Rig) -> bool:
    return rig.cp.online


async def answer_payload(cs: CentralSystem) -> dict[str, Any]:
    answer = await cs.answer_to_call()
    assert isinstance(answer, CallResultReceived), answer
    return answer.payload


def statuses(cs: CentralSystem) -> list[tuple[int, str]]:
    return [(p["connectorId"], p["status"]) for p in cs.payloads("StatusNotification")]


async def statuses_sent(cs: CentralSystem, count: int) -> None:
    await settle(lambda: len(cs.payloads("StatusNotification")) >= count, "StatusNotifications")


async def registered(rig: Rig, **auto: Responder | None) -> CentralSystem:
    cs = await rig.connect(**auto)
    await statuses_sent(cs, 2)
    return cs


async def error_code(cs: CentralSystem, action: str, payload: dict[str, Any]) -> str:
    answer = await cs.call(action, payload)
    assert isinstance(answer, CallErrorReceived), answer
    return answer.code


# ------------------------------------------------------------------ registration


async def test_pending_answers_configuration_refuses_the_rest_and_retries_the_boot(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=None)
        boot = await cs.expect("BootNotification")
        assert trio.current_time() == 0.0
        assert boot.payload == {
            "chargePointVendor": "Example",
            "chargePointModel": "AC-22",
            "chargePointSerialNumber": "SN-0001",
            "firmwareVersion": "1.2.3",
            "meterType": "MID meter with a very lon",  # CiString25Type
        }
        cs.answer(boot, {"status": "Pending", "currentTime": now_text(), "interval": 40})
        # A transaction that starts meanwhile waits in the queue.
        await rig.start_transaction()

        got = await cs.result("GetConfiguration", {"key": ["HeartbeatInterval", "NoSuchKey"]})
        assert got == {
            "configurationKey": [{"key": "HeartbeatInterval", "readonly": False, "value": "3600"}],
            "unknownKey": ["NoSuchKey"],
        }
        changed = await cs.result(
            "ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "60"}
        )
        assert changed == {"status": "Accepted"}
        assert rig.config.get_int("MeterValueSampleInterval") == 60
        assert await error_code(cs, "RemoteStartTransaction", {"idTag": "TAG1"}) == "SecurityError"
        assert await error_code(cs, "Reset", {"type": "Soft"}) == "SecurityError"
        assert await error_code(cs, "UnlockConnector", {"connectorId": 1}) == "SecurityError"
        assert rig.station.calls == []
        assert not online(rig)
        assert await rig.cp.authorize("TAG1") is None  # offline: no opinion, nothing sent

        again = await cs.expect("BootNotification")
        assert trio.current_time() == 40.0
        assert cs.actions() == ["BootNotification", "BootNotification"]
        cs.answer(again, {"status": "Accepted", "currentTime": now_text(), "interval": 300})

        start = await cs.expect("StartTransaction")
        assert trio.current_time() == 40.0
        cs.answer(start, {"transactionId": 7, "idTagInfo": {"status": "Accepted"}})
        await statuses_sent(cs, 2)
        assert statuses(cs) == [(0, "Available"), (1, "Available")]
        assert set(cs.times("StatusNotification")) == {40.0}
        assert online(rig)
        assert rig.station.link_changes == [40.0]


async def test_rejected_carries_out_no_call_and_retries_after_the_interval(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=None)
        boot = await cs.expect("BootNotification")
        cs.answer(boot, {"status": "Rejected", "currentTime": now_text(), "interval": 50})
        await trio.sleep(1)
        cs.send_call("ChangeConfiguration", {"key": "HeartbeatInterval", "value": "60"})
        await rig.start_transaction()

        again = await cs.expect("BootNotification")
        assert trio.current_time() == 50.0
        assert cs.actions() == ["BootNotification"] * 2
        assert rig.config.get_int("HeartbeatInterval") == 3600
        cs.answer(again, {"status": "Accepted", "currentTime": now_text(), "interval": 300})
        start = await cs.expect("StartTransaction")
        # One CALL at a time (OCPP-J 4.1.1): the statuses may wait for this answer.
        cs.answer(start, {"transactionId": 7, "idTagInfo": {"status": "Accepted"}})
        await statuses_sent(cs, 2)
        assert cs.times("StatusNotification") == [50.0, 50.0]
        assert cs.times("StartTransaction") == [50.0]


async def test_rejected_answers_nothing(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=None)
        boot = await cs.expect("BootNotification")
        cs.answer(boot, {"status": "Rejected", "currentTime": now_text(), "interval": 50})
        await trio.sleep(1)
        cs.send_call("GetConfiguration", {})
        with trio.move_on_after(40):
            answer = await cs.answer_to_call()
            raise AssertionError(f"answered while Rejected: {answer}")


async def test_boot_retry_without_interval_after_callerror_and_after_timeout(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=None)
        first = await cs.expect("BootNotification")
        cs.answer(first, {"status": "Pending", "currentTime": now_text(), "interval": 0})
        second = await cs.expect("BootNotification")
        assert trio.current_time() == DEFAULT_BOOT_RETRY == 30.0
        cs.error(second, "InternalError", "database down")
        await cs.expect("BootNotification")  # not answered: times out after CALL_TIMEOUT
        assert trio.current_time() == 60.0
        last = await cs.expect("BootNotification")
        assert trio.current_time() == 60.0 + CALL_TIMEOUT + DEFAULT_BOOT_RETRY == 120.0
        cs.answer(last, {"status": "Accepted", "currentTime": now_text(), "interval": 300})
        await statuses_sent(cs, 2)
        assert cs.times("StatusNotification") == [120.0, 120.0]


async def test_accepted_reports_the_station_and_every_connector(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = FakeStation(
        statuses={0: ("Available", "NoError", ""), 1: ("Preparing", "NoError", "cable in")}
    )
    async with open_rig(tmp_path, clock, station=station) as rig:
        cs = await rig.connect()
        await statuses_sent(cs, 2)
        sent = cs.payloads("StatusNotification")
        assert [{k: v for k, v in p.items() if k != "timestamp"} for p in sent] == [
            {"connectorId": 0, "status": "Available", "errorCode": "NoError"},
            {"connectorId": 1, "status": "Preparing", "errorCode": "NoError", "info": "cable in"},
        ]
        assert all(near(p["timestamp"], datetime.now(UTC), within=5) for p in sent)
        assert online(rig)


# -------------------------------------------------------------- heartbeat, clock


async def test_heartbeat_every_boot_interval_and_clock_offset_from_current_time(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    theirs = datetime(2030, 1, 1, tzinfo=UTC)

    def boot(call: IncomingCall) -> dict[str, Any]:
        return {"status": "Accepted", "currentTime": format_time(theirs), "interval": 300}

    async with open_rig(tmp_path, clock) as rig:
        await rig.connect(BootNotification=boot, Heartbeat=None)
        cs = rig.sessions[0]
        await statuses_sent(cs, 2)
        offset = rig.cp.clock_offset
        assert offset is not None
        assert abs(offset - (theirs - datetime.now(UTC))) < timedelta(seconds=5)
        assert abs(rig.cp.now() - theirs) < timedelta(seconds=5)
        assert rig.config.get_int("HeartbeatInterval") == 300

        later = theirs + timedelta(days=1)
        for expected in (300.0, 600.0, 900.0):
            beat = await cs.expect("Heartbeat")
            assert trio.current_time() == expected
            assert beat.payload == {}
            cs.answer(beat, {"currentTime": format_time(later)})
        await settle(lambda: abs(rig.cp.now() - later) < timedelta(seconds=5), "offset moved")


async def test_boot_interval_below_the_key_range_is_the_heartbeat_interval(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=boot_answer(interval=10))
        await trio.sleep_until(35)
        assert cs.times("Heartbeat") == [10.0, 20.0, 30.0]
        # The key keeps a value its range allows (60..86400).
        assert rig.config.get_int("HeartbeatInterval") == 3600


async def test_heartbeat_follows_a_changed_heartbeat_interval(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=boot_answer(interval=300))
        await trio.sleep_until(350)
        assert cs.times("Heartbeat") == [300.0]
        change = {"key": "HeartbeatInterval", "value": "120"}
        assert await cs.result("ChangeConfiguration", change) == {"status": "Accepted"}
        await trio.sleep_until(1000)
        after = [t for t in cs.times("Heartbeat") if t > 350]
        assert len(after) >= 3
        assert {b - a for a, b in itertools.pairwise(after)} == {120.0}


async def test_a_shorter_heartbeat_interval_applies_at_once(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect(BootNotification=boot_answer(interval=300))
        await trio.sleep_until(350)
        change = {"key": "HeartbeatInterval", "value": "120"}
        assert await cs.result("ChangeConfiguration", change) == {"status": "Accepted"}
        await trio.sleep_until(1000)
        first = min(t for t in cs.times("Heartbeat") if t > 350)
        assert first <= 350 + 120  # the new interval, counted at the latest from the change


# ------------------------------------------------------------ status notifications


async def test_minimum_status_duration_hides_flicker_but_not_faults(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, settings={"MinimumStatusDuration": "10"}) as rig:
        cs = await rig.connect()
        await trio.sleep_until(15)
        assert statuses(cs) == [(0, "Available"), (1, "Available")]
        assert max(cs.times("StatusNotification")) <= 10.0

        await trio.sleep_until(20)
        rig.set_status(1, "Preparing")
        await trio.sleep_until(25)
        rig.set_status(1, "Available")  # lasted 5 s < 10 s: never reported
        await trio.sleep_until(30)
        rig.set_status(1, "Preparing")  # lasts: reported when it has held 10 s
        await trio.sleep_until(50)
        rig.set_status(1, "Faulted", "GroundFailure")  # at once
        await trio.sleep_until(51)
        rig.set_status(1, "Available")
        await trio.sleep_until(100)

        reported = [
            (t, c.payload["connectorId"], c.payload["status"], c.payload["errorCode"])
            for t, c in cs.log
            if c.action == "StatusNotification" and t > 10
        ]
        assert reported == [
            (40.0, 1, "Preparing", "NoError"),
            (50.0, 1, "Faulted", "GroundFailure"),
            (61.0, 1, "Available", "NoError"),
        ]


# ------------------------------------------------------------- transaction queue


def status_times(cs: CentralSystem, status: str) -> list[float]:
    return [
        t for t, c in cs.log if c.action == "StatusNotification" and c.payload["status"] == status
    ]


async def test_a_charging_status_waits_for_the_start_transaction_answer(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        await trio.sleep_until(5)
        await rig.start_transaction(local_id=1)
        rig.set_status(1, "Charging")
        start = await cs.expect("StartTransaction")
        assert trio.current_time() == 5.0
        await trio.sleep_until(8)
        assert status_times(cs, "Charging") == []
        cs.answer(start, {"transactionId": 42, "idTagInfo": {"status": "Accepted"}})
        await trio.sleep_until(9)
        (charging,) = status_times(cs, "Charging")
        assert 8.0 <= charging <= 8.2 + 1e-9  # the next look, every 0.2 s
        # With the Start answered, a transaction status goes at once.
        rig.set_status(1, "SuspendedEV")
        await trio.sleep_until(10)
        assert status_times(cs, "SuspendedEV") == [9.0]


async def test_a_charging_status_waits_for_a_failing_start_only_so_long(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:  # TransactionMessageRetryInterval 20
        cs = await registered(rig)
        await trio.sleep_until(5)
        await rig.start_transaction(local_id=1)
        rig.set_status(1, "Charging")
        start = await cs.expect("StartTransaction")
        cs.error(start, "InternalError")
        await trio.sleep_until(20)
        (charging,) = status_times(cs, "Charging")
        assert 15.0 <= charging <= 15.2 + 1e-9  # START_ORDER_PATIENCE after the first look
        again = await cs.expect("StartTransaction")
        assert trio.current_time() == 25.0
        cs.answer(again, {"transactionId": 42, "idTagInfo": {"status": "Accepted"}})


async def test_start_is_sent_its_id_mapped_and_stop_carries_the_real_id(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect()
        await trio.sleep_until(5)
        await rig.start_transaction(local_id=1, id_tag="TAG1")
        queued = rig.queue.pending()
        start = await cs.expect("StartTransaction")
        assert trio.current_time() == 5.0
        assert start.unique_id == queued[0].unique_id
        assert near(start.payload.pop("timestamp"), EPOCH)
        assert start.payload == {"connectorId": 1, "idTag": "TAG1", "meterStart": 1000}
        cs.answer(start, {"transactionId": 42, "idTagInfo": {"status": "Accepted"}})
        await trio.sleep_until(10)
        await rig.end_transaction(local_id=1, reason="EVDisconnected")
        stop = await cs.expect("StopTransaction")
        assert trio.current_time() == 10.0
        assert rig.queue.real_transaction_id(1) == 42
        assert near(stop.payload.pop("timestamp"), EPOCH + timedelta(hours=1))
        assert stop.payload == {"transactionId": 42, "meterStop": 2501, "reason": "EVDisconnected"}
        cs.answer(stop, {"idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.pending_count() == 0, "Stop delivered")
        assert rig.queue.dead_letters() == []
        assert rig.station.called("deauthorize") == []


async def test_callerrors_cost_attempts_with_growing_waits_then_the_next_message_goes(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"TransactionMessageAttempts": "3", "TransactionMessageRetryInterval": "10"}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        cs = await rig.connect()
        await rig.start_transaction(local_id=1, id_tag="TAG1")
        await rig.start_transaction(local_id=2, id_tag="TAG2")
        first = rig.queue.pending()[0]
        sent: list[float] = []
        for _ in range(3):
            start = await cs.expect("StartTransaction")
            sent.append(trio.current_time())
            assert start.unique_id == first.unique_id  # every attempt: the same message id
            assert start.payload["idTag"] == "TAG1"
            cs.error(start, "InternalError", "try later")
        # Waits of RetryInterval x attempts so far: 10 after the first, 20 after the second.
        assert sent == [0.0, 10.0, 30.0]

        other = await cs.expect("StartTransaction")
        assert trio.current_time() == 30.0  # the dead one does not hold up the next
        assert other.payload["idTag"] == "TAG2"
        cs.answer(other, {"transactionId": 43, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.pending_count() == 0, "second Start delivered")
        (dead,) = rig.queue.dead_letters()
        assert (dead.action, dead.local_tx_id, dead.attempts) == ("StartTransaction", 1, 3)
        assert dead.unique_id == first.unique_id
        assert "InternalError" in dead.reason
        assert rig.queue.real_transaction_id(1) is None
        assert rig.queue.real_transaction_id(2) == 43


async def test_timeouts_count_as_attempts(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    settings = {"TransactionMessageAttempts": "2", "TransactionMessageRetryInterval": "10"}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        cs = await rig.connect()
        await rig.start_transaction(local_id=1, id_tag="TAG1")
        await rig.start_transaction(local_id=2, id_tag="TAG2")
        await cs.expect("StartTransaction")  # never answered
        assert trio.current_time() == 0.0
        again = await cs.expect("StartTransaction")
        assert trio.current_time() == CALL_TIMEOUT + 10 == 40.0
        assert again.payload["idTag"] == "TAG1"
        (pending, _) = rig.queue.pending()
        assert pending.attempts == 1
        assert pending.last_error is not None and "no answer" in pending.last_error

        other = await cs.expect("StartTransaction")  # second timeout: TAG1 is dead
        assert trio.current_time() == 40.0 + CALL_TIMEOUT == 70.0
        assert other.payload["idTag"] == "TAG2"
        cs.answer(other, {"transactionId": 43, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.pending_count() == 0, "second Start delivered")
        (dead,) = rig.queue.dead_letters()
        assert (dead.local_tx_id, dead.attempts) == (1, 2)


async def test_a_connection_lost_mid_call_costs_no_attempt_and_resends_the_same_id(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await rig.connect()
        await rig.start_transaction(local_id=1)
        start = await cs.expect("StartTransaction")
        await trio.sleep_until(5)
        cs.conn.drop()
        await settle(lambda: rig.session_ends, "session ended")
        assert rig.session_ends[0][0] == 5.0
        assert rig.session_ends[0][1].startswith("lost")
        assert not online(rig)
        assert rig.station.link_changes == [0.0, 5.0]
        (pending,) = rig.queue.pending()
        assert (pending.attempts, pending.last_error) == (0, None)

        await trio.sleep_until(100)  # offline time never costs attempts either
        cs2 = await rig.connect()
        again = await cs2.expect("StartTransaction")
        assert trio.current_time() == 100.0
        assert again.unique_id == start.unique_id
        assert again.payload == start.payload
        cs2.answer(again, {"transactionId": 42, "idTagInfo": {"status": "Accepted"}})
        await statuses_sent(cs2, 2)
        # Registered once: a new connection is no new boot, but every status again.
        assert "BootNotification" not in cs2.actions()
        assert statuses(cs2) == [(0, "Available"), (1, "Available")]
        await settle(lambda: rig.queue.real_transaction_id(1) == 42, "id mapped")
        assert rig.queue.dead_letters() == []


@pytest.mark.parametrize(("stop_on_invalid", "deauthorized"), [("true", [(1,)]), ("false", [])])
async def test_start_answered_blocked_deauthorizes_if_stop_transaction_on_invalid_id(
    tmp_path: Path, clock: trio.testing.MockClock, stop_on_invalid: str, deauthorized: list[Any]
) -> None:
    settings = {"StopTransactionOnInvalidId": stop_on_invalid}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        cs = await rig.connect()
        await rig.start_transaction(local_id=1)
        start = await cs.expect("StartTransaction")
        cs.answer(start, {"transactionId": 42, "idTagInfo": {"status": "Blocked"}})
        # The sender handles each answer before it takes the next message.
        await rig.start_transaction(local_id=2, id_tag="TAG2")
        second = await cs.expect("StartTransaction")
        assert rig.station.called("deauthorize") == deauthorized
        cs.answer(second, {"transactionId": 43, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.pending_count() == 0, "delivered")
        assert rig.station.called("deauthorize") == deauthorized
        assert rig.queue.real_transaction_id(1) == 42


# ------------------------------------------------------------------- meter values

SAMPLED = "Energy.Active.Import.Register,Power.Active.Import,Voltage"


def sample(measurand: str, value: str, unit: str, context: str, **extra: str) -> dict[str, str]:
    return {
        "value": value,
        "context": context,
        "format": "Raw",
        "measurand": measurand,
        "location": "Outlet",
        "unit": unit,
        **extra,
    }


def energy(value: str, context: str) -> dict[str, str]:
    return sample("Energy.Active.Import.Register", value, "Wh", context)


def contexts(meter_values: list[dict[str, Any]]) -> list[str]:
    return [mv["sampledValue"][0]["context"] for mv in meter_values]


def transaction_meter_values(cs: CentralSystem) -> list[tuple[float, dict[str, Any]]]:
    return [
        (t, c.payload)
        for t, c in cs.log
        if c.action == "MeterValues" and "transactionId" in c.payload
    ]


async def test_sampled_meter_values_during_a_transaction_and_stop_transaction_data(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {
        "MeterValueSampleInterval": "10",
        "MeterValuesSampledData": SAMPLED,
        "StopTxnSampledData": "Energy.Active.Import.Register",
        "ClockAlignedDataInterval": "0",
    }
    station = FakeStation(snapshots={1: snapshot(1500.0)}, running={1: 1})
    async with open_rig(
        tmp_path, clock, settings=settings, station=station, cp_class=WallClockChargePoint
    ) as rig:
        # Started before the connection: queued, stamped before the clock was set.
        await rig.start_transaction(local_id=1, begin=snapshot(1000.4))
        cs = await rig.connect(
            StartTransaction=started(42), MeterValues=empty, StopTransaction=empty
        )
        await trio.sleep_until(25)
        station.running.clear()
        await rig.end_transaction(local_id=1, end=snapshot(2500.6))
        await settle(lambda: cs.payloads("StopTransaction"), "StopTransaction sent")

        periodic = "Sample.Periodic"
        assert transaction_meter_values(cs) == [
            (
                t,
                {
                    "connectorId": 1,
                    "transactionId": 42,  # the queue's placeholder replaced by the real id
                    "meterValue": [
                        {
                            "timestamp": wall(t),
                            "sampledValue": [
                                energy("1500", periodic),
                                sample("Power.Active.Import", "7200", "W", periodic),
                                sample("Voltage", "230.1", "V", periodic, phase="L1-N"),
                            ],
                        }
                    ],
                },
            )
            for t in (10.0, 20.0)
        ]
        assert cs.actions().index("StartTransaction") < cs.actions().index("MeterValues")

        (stop,) = cs.payloads("StopTransaction")
        assert stop["transactionId"] == 42
        data = stop["transactionData"]
        assert contexts(data) == [
            "Transaction.Begin",
            "Sample.Periodic",
            "Sample.Periodic",
            "Transaction.End",
        ]
        assert [mv["sampledValue"] for mv in data] == [
            [energy("1000.4", "Transaction.Begin")],
            [energy("1500", periodic)],
            [energy("1500", periodic)],
            [energy("2500.6", "Transaction.End")],
        ]
        assert [mv["timestamp"] for mv in data[1:3]] == [wall(10), wall(20)]
        assert near(data[0]["timestamp"], EPOCH)
        assert near(data[3]["timestamp"], EPOCH + timedelta(hours=1))
        assert all("_clockNotSet" not in str(p) for p in cs.payloads("StopTransaction"))


async def test_sampling_counts_from_the_start_of_the_transaction(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"MeterValueSampleInterval": "10", "ClockAlignedDataInterval": "0"}
    station = FakeStation(snapshots={1: snapshot()})
    async with open_rig(
        tmp_path, clock, settings=settings, station=station, cp_class=WallClockChargePoint
    ) as rig:
        cs = await rig.connect(StartTransaction=started(42), MeterValues=empty)
        await trio.sleep_until(3)
        station.running[1] = 1
        await rig.start_transaction(local_id=1)
        await trio.sleep_until(35)
        assert [t for t, _ in transaction_meter_values(cs)] == [13.0, 23.0, 33.0]


async def test_a_changed_sample_interval_applies_to_the_next_transaction(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = FakeStation(snapshots={1: snapshot()})
    async with open_rig(
        tmp_path, clock, station=station, settings={"ClockAlignedDataInterval": "0"}
    ) as rig:
        cs = await registered(rig, StartTransaction=started(42), MeterValues=empty)
        change = {"key": "MeterValueSampleInterval", "value": "10"}
        assert await cs.result("ChangeConfiguration", change) == {"status": "Accepted"}
        await trio.sleep_until(2)
        station.running[1] = 1
        await rig.start_transaction(local_id=1)
        await trio.sleep_until(30)
        assert [t for t, _ in transaction_meter_values(cs)][:1] == [12.0]


async def test_stop_txn_sampled_data_without_meter_values_sampled_data(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {
        "MeterValueSampleInterval": "10",
        "MeterValuesSampledData": "",
        "StopTxnSampledData": "Energy.Active.Import.Register",
        "ClockAlignedDataInterval": "0",
    }
    station = FakeStation(snapshots={1: snapshot(1500.0)}, running={1: 1})
    async with open_rig(tmp_path, clock, settings=settings, station=station) as rig:
        cs = await rig.connect(StartTransaction=started(42), StopTransaction=empty)
        await rig.start_transaction(local_id=1, begin=snapshot(1000.4))
        await trio.sleep_until(25)
        station.running.clear()
        await rig.end_transaction(local_id=1, end=snapshot(2500.6))
        await settle(lambda: cs.payloads("StopTransaction"), "StopTransaction sent")
        assert "MeterValues" not in cs.actions()  # nothing configured to send
        (stop,) = cs.payloads("StopTransaction")
        assert contexts(stop["transactionData"]) == [
            "Transaction.Begin",
            "Sample.Periodic",
            "Sample.Periodic",
            "Transaction.End",
        ]


async def test_meter_values_are_sampled_and_queued_while_offline(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"MeterValueSampleInterval": "10", "ClockAlignedDataInterval": "0"}
    station = FakeStation(snapshots={1: snapshot()}, running={1: 1})
    async with open_rig(tmp_path, clock, settings=settings, station=station) as rig:
        cs = await rig.connect(StartTransaction=started(42))
        await rig.start_transaction(local_id=1)
        await trio.sleep_until(5)
        cs.conn.drop()
        await trio.sleep_until(99)
        assert len([m for m in rig.queue.pending() if m.action == "MeterValues"]) >= 9


async def test_clock_aligned_meter_values_exactly_on_the_boundaries(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {
        "ClockAlignedDataInterval": "300",
        "MeterValuesAlignedData": "Energy.Active.Import.Register",
    }
    station = FakeStation(snapshots={1: snapshot(1500.0)})
    async with open_rig(
        tmp_path, clock, settings=settings, station=station, cp_class=WallClockChargePoint
    ) as rig:
        # Wall time 08:58:20 at 0: the boundaries of 300 s from midnight fall at 100, 400, ...
        cs = await rig.connect(StartTransaction=started(42), MeterValues=empty)
        await trio.sleep_until(750)
        assert cs.times("MeterValues") == [100.0, 400.0, 700.0]
        assert wall(100) == "2026-05-01T09:00:00.000Z"
        assert cs.payloads("MeterValues") == [
            {
                "connectorId": 1,  # no transaction: sent at once, no transactionId
                "meterValue": [
                    {"timestamp": wall(t), "sampledValue": [energy("1500", "Sample.Clock")]}
                ],
            }
            for t in (100, 400, 700)
        ]

        station.running[1] = 1
        await rig.start_transaction(local_id=1)
        await trio.sleep_until(1050)
        assert transaction_meter_values(cs) == [
            (
                1000.0,
                {
                    "connectorId": 1,
                    "transactionId": 42,
                    "meterValue": [
                        {
                            "timestamp": "2026-05-01T09:15:00.000Z",
                            "sampledValue": [energy("1500", "Sample.Clock")],
                        }
                    ],
                },
            )
        ]


async def test_stop_transaction_carries_the_stop_txn_aligned_data(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """StopTxnAlignedData (OCPP 1.6 9.1.28, RW): the clock-aligned values of those
    measurands taken during the transaction go into StopTransaction's
    transactionData (with the Sample.Clock context), whatever
    MeterValuesAlignedData says; no sampled data with MeterValueSampleInterval 0."""
    settings = {
        "ClockAlignedDataInterval": "300",
        "MeterValuesAlignedData": "",
        "StopTxnAlignedData": "Energy.Active.Import.Register",
        "MeterValueSampleInterval": "0",
        "StopTxnSampledData": "Energy.Active.Import.Register",
    }
    station = FakeStation(snapshots={1: snapshot(1500.0)}, running={1: 1})
    async with open_rig(
        tmp_path, clock, settings=settings, station=station, cp_class=WallClockChargePoint
    ) as rig:
        cs = await rig.connect(
            StartTransaction=started(42), MeterValues=empty, StopTransaction=empty
        )
        await rig.start_transaction(local_id=1, begin=snapshot(1000.0))
        await trio.sleep_until(750)
        station.running.clear()
        await rig.end_transaction(local_id=1, end=snapshot(2500.0))
        await settle(lambda: cs.payloads("StopTransaction"), "StopTransaction sent")
        (stop,) = cs.payloads("StopTransaction")
        data = stop["transactionData"]
        assert contexts(data) == [
            "Transaction.Begin",
            "Sample.Clock",
            "Sample.Clock",
            "Sample.Clock",
            "Transaction.End",
        ]
        assert [mv["timestamp"] for mv in data[1:4]] == [wall(100), wall(400), wall(700)]
        # MeterValuesAlignedData is empty, MeterValueSampleInterval 0: no MeterValues.
        assert cs.payloads("MeterValues") == []


async def test_clock_aligned_boundary_from_the_central_systems_current_time(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """No wall-clock override: the clock offset from BootNotification's currentTime
    alone puts the boundary at a known virtual time (less the real time elapsed)."""
    settings = {
        "ClockAlignedDataInterval": "300",
        "MeterValuesAlignedData": "Energy.Active.Import.Register",
    }

    def boot(call: IncomingCall) -> dict[str, Any]:
        return {"status": "Accepted", "currentTime": "2026-05-01T08:58:20.000Z", "interval": 3600}

    station = FakeStation(snapshots={1: snapshot(1500.0)})
    async with open_rig(tmp_path, clock, settings=settings, station=station) as rig:
        cs = await rig.connect(BootNotification=boot, MeterValues=empty)
        await trio.sleep_until(150)
        (at,) = cs.times("MeterValues")
        assert 99.5 < at <= 100.0
        (payload,) = cs.payloads("MeterValues")
        assert payload["meterValue"][0]["timestamp"] == "2026-05-01T09:00:00.000Z"


async def test_clock_aligned_reading_once_per_boundary_when_the_clock_moves_back(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {
        "ClockAlignedDataInterval": "300",
        "MeterValuesAlignedData": "Energy.Active.Import.Register",
    }
    station = FakeStation(snapshots={1: snapshot(1500.0)})
    async with open_rig(
        tmp_path, clock, settings=settings, station=station, cp_class=WallClockChargePoint
    ) as rig:
        cp = rig.cp
        assert isinstance(cp, WallClockChargePoint)
        cs = await rig.connect(MeterValues=empty)
        await trio.sleep_until(200)
        cp.wall_step = timedelta(seconds=-2)
        await trio.sleep_until(750)
        stamps = [p["meterValue"][0]["timestamp"] for p in cs.payloads("MeterValues")]
        assert stamps == [
            "2026-05-01T09:00:00.000Z",
            "2026-05-01T09:05:00.000Z",
            "2026-05-01T09:10:00.000Z",
        ]


# ----------------------------------------------------- the central system's calls


async def test_remote_start_authorizes_the_tag_first(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        cs.send_call("RemoteStartTransaction", {"idTag": "TAG1", "connectorId": 1})
        auth = await cs.expect("Authorize")
        assert auth.payload == {"idTag": "TAG1"}
        assert rig.station.called("remote_start") == []  # not before the answer
        cs.answer(auth, {"idTagInfo": {"status": "Accepted"}})
        assert await answer_payload(cs) == {"status": "Accepted"}
        assert rig.station.called("remote_start") == [("TAG1", 1)]

        cs.send_call("RemoteStartTransaction", {"idTag": "TAG2"})
        auth = await cs.expect("Authorize")
        cs.answer(auth, {"idTagInfo": {"status": "Blocked"}})
        assert await answer_payload(cs) == {"status": "Rejected"}
        assert rig.station.called("remote_start") == [("TAG1", 1)]

        cs.send_call("RemoteStartTransaction", {"idTag": "TAG3"})
        auth = await cs.expect("Authorize")
        cs.error(auth, "InternalError")  # no verdict: no start
        assert await answer_payload(cs) == {"status": "Rejected"}
        assert len(rig.station.called("remote_start")) == 1


async def test_remote_start_without_authorize_remote_tx_requests(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"AuthorizeRemoteTxRequests": "false"}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        cs = await registered(rig)
        assert await cs.result("RemoteStartTransaction", {"idTag": "TAG1"}) == {
            "status": "Accepted"
        }
        assert rig.station.called("remote_start") == [("TAG1", None)]
        rig.station.remote_start_result = False
        assert await cs.result("RemoteStartTransaction", {"idTag": "TAG2"}) == {
            "status": "Rejected"
        }
        unknown_connector = {"idTag": "TAG3", "connectorId": 2}
        assert await cs.result("RemoteStartTransaction", unknown_connector) == {
            "status": "Rejected"
        }
        assert rig.station.called("remote_start") == [("TAG1", None), ("TAG2", None)]
        assert "Authorize" not in cs.actions()


async def test_remote_stop_of_the_running_transaction_only(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = FakeStation(running={1: 1})
    async with open_rig(tmp_path, clock, station=station) as rig:
        cs = await registered(rig, StartTransaction=started(42))
        await rig.start_transaction(local_id=1)
        await settle(lambda: rig.queue.real_transaction_id(1) == 42, "id mapped")
        rejected = await cs.result("RemoteStopTransaction", {"transactionId": 43})
        assert rejected == {"status": "Rejected"}
        assert rig.station.called("remote_stop") == []
        assert await cs.result("RemoteStopTransaction", {"transactionId": 42}) == {
            "status": "Accepted"
        }
        assert rig.station.called("remote_stop") == [(1,)]
        rig.station.remote_stop_result = False
        again = await cs.result("RemoteStopTransaction", {"transactionId": 42})
        assert again == {"status": "Rejected"}
        # The local id is no central-system id.
        assert await cs.result("RemoteStopTransaction", {"transactionId": 1}) == {
            "status": "Rejected"
        }


async def test_change_availability_unlock_clear_cache_data_transfer(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        station = rig.station
        station.availability_result = "Scheduled"
        inoperative = {"connectorId": 1, "type": "Inoperative"}
        assert await cs.result("ChangeAvailability", inoperative) == {"status": "Scheduled"}
        station.availability_result = "Accepted"
        operative = {"connectorId": 0, "type": "Operative"}
        assert await cs.result("ChangeAvailability", operative) == {"status": "Accepted"}
        unknown = {"connectorId": 2, "type": "Operative"}
        assert await cs.result("ChangeAvailability", unknown) == {"status": "Rejected"}
        assert station.called("change_availability") == [(1, False), (0, True)]

        assert await cs.result("UnlockConnector", {"connectorId": 1}) == {"status": "Unlocked"}
        station.unlock_result = "UnlockFailed"
        assert await cs.result("UnlockConnector", {"connectorId": 1}) == {"status": "UnlockFailed"}
        assert await cs.result("UnlockConnector", {"connectorId": 2}) == {"status": "NotSupported"}
        assert station.called("unlock") == [(1,), (1,)]

        assert await cs.result("ClearCache", {}) == {"status": "Accepted"}
        station.clear_cache_result = False
        assert await cs.result("ClearCache", {}) == {"status": "Rejected"}

        transfer = {"vendorId": "com.example", "messageId": "hello", "data": "x"}
        assert await cs.result("DataTransfer", transfer) == {"status": "UnknownVendorId"}


@pytest.mark.parametrize(("kind", "hard"), [("Soft", False), ("Hard", True)])
async def test_reset_is_answered_before_the_station_resets(
    tmp_path: Path, clock: trio.testing.MockClock, kind: str, hard: bool
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        await trio.sleep_until(10)
        assert await cs.result("Reset", {"type": kind}) == {"status": "Accepted"}
        assert rig.station.called("reset") == []
        await trio.sleep_until(20)
        assert [(t, args) for t, what, args in rig.station.calls if what == "reset"] == [
            (10.5, (hard,))
        ]


async def test_unsupported_actions_and_too_many_configuration_keys(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        reserve = {
            "connectorId": 1,
            "expiryDate": "2030-01-01T00:00:00Z",
            "idTag": "TAG1",
            "reservationId": 1,
        }
        assert await error_code(cs, "ReserveNow", reserve) == "NotSupported"
        trigger = {"requestedMessage": "Heartbeat"}
        assert await error_code(cs, "TriggerMessage", trigger) == "NotSupported"

        sixty = [f"Key{i}" for i in range(59)] + ["HeartbeatInterval"]
        got = await cs.result("GetConfiguration", {"key": sixty})
        assert [k["key"] for k in got["configurationKey"]] == ["HeartbeatInterval"]
        assert len(got["unknownKey"]) == 59
        too_many = {"key": [*sixty, "Key60"]}
        assert await error_code(cs, "GetConfiguration", too_many) == "OccurenceConstraintViolation"

        everything = await cs.result("GetConfiguration", {})
        names = [k["key"] for k in everything["configurationKey"]]
        assert {"HeartbeatInterval", "MeterValueSampleInterval", "AuthorizationKey"} <= set(names)
        (key,) = [k for k in everything["configurationKey"] if k["key"] == "AuthorizationKey"]
        assert "value" not in key  # write-only


async def test_change_configuration_answers(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        cases = [
            ({"key": "MeterValueSampleInterval", "value": "30"}, "Accepted"),
            ({"key": "MeterValueSampleInterval", "value": "4"}, "Rejected"),
            ({"key": "NumberOfConnectors", "value": "2"}, "Rejected"),
            ({"key": "NoSuchKey", "value": "1"}, "NotSupported"),
            ({"key": "ChargePointId", "value": "CP-9"}, "NotSupported"),  # installer only
        ]
        for payload, status in cases:
            assert await cs.result("ChangeConfiguration", payload) == {"status": status}
        assert rig.config.get_int("MeterValueSampleInterval") == 30


# ------------------------------------------------------------ feature profiles

#: The central system's calls of each OCPP 1.6 feature profile (section 3.1).
PROFILE_CALLS: dict[str, tuple[str, ...]] = {
    "Core": (
        "ChangeAvailability",
        "ChangeConfiguration",
        "ClearCache",
        "DataTransfer",
        "GetConfiguration",
        "RemoteStartTransaction",
        "RemoteStopTransaction",
        "Reset",
        "UnlockConnector",
    ),
    "FirmwareManagement": ("GetDiagnostics", "UpdateFirmware"),
    "LocalAuthListManagement": ("GetLocalListVersion", "SendLocalList"),
    "Reservation": ("CancelReservation", "ReserveNow"),
    "SmartCharging": ("ClearChargingProfile", "GetCompositeSchedule", "SetChargingProfile"),
    "RemoteTrigger": ("TriggerMessage",),
}
#: One valid call of each profile but Core.
PROFILE_SAMPLE_CALL: dict[str, tuple[str, dict[str, Any]]] = {
    "FirmwareManagement": ("GetDiagnostics", {"location": "ftp://example.com/logs/"}),
    "LocalAuthListManagement": ("GetLocalListVersion", {}),
    "Reservation": ("CancelReservation", {"reservationId": 1}),
    "SmartCharging": ("ClearChargingProfile", {}),
    "RemoteTrigger": ("TriggerMessage", {"requestedMessage": "Heartbeat"}),
}


async def supported_profiles(cs: CentralSystem) -> list[str]:
    got = await cs.result("GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
    (entry,) = got["configurationKey"]
    assert entry["readonly"] is True
    value: str = entry["value"]
    return value.split(",")


def task_names() -> set[str]:
    """The names of every task running now."""
    names: set[str] = set()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        names.add(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


async def test_supported_feature_profiles_never_lists_a_profile_that_is_not_registered(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        advertised = await supported_profiles(cs)
        assert advertised == ["Core"]  # the only profile registered today
        assert advertised == list(rig.cp.profiles.names)
        # An advertised profile answers every call of its own; one not advertised
        # answers none (NotSupported), so the list names no NotSupported profile.
        for profile, actions in PROFILE_CALLS.items():
            handled = [a for a in actions if rig.cp.profiles.handler(a) is not None]
            assert handled == (list(actions) if profile in advertised else []), profile
        for profile, (action, payload) in PROFILE_SAMPLE_CALL.items():
            if profile not in advertised:
                assert await error_code(cs, action, payload) == "NotSupported", profile
        # The full list says the same.
        everything = await cs.result("GetConfiguration", {})
        (entry,) = [
            k for k in everything["configurationKey"] if k["key"] == "SupportedFeatureProfiles"
        ]
        assert entry["value"] == ",".join(advertised)


class ReservationStub:
    """A feature profile as a later module registers one: a name, handlers, a task."""

    name = "Reservation"

    def __init__(self) -> None:
        self.reserved: list[dict[str, Any]] = []
        self.task_started: list[float] = []
        self.handlers: dict[str, Handler] = {
            "ReserveNow": self.reserve_now,
            "CancelReservation": self.cancel_reservation,
        }

    def tasks(self) -> tuple[Task, ...]:
        return (Task("reservation expiry", self.expire),)

    async def expire(self) -> None:
        self.task_started.append(trio.current_time())
        await trio.sleep_forever()

    async def reserve_now(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.reserved.append(payload)
        return {"status": "Accepted"}

    async def cancel_reservation(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"status": "Rejected"}


async def test_a_registered_profile_answers_its_calls_runs_its_task_and_is_advertised(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        reservation = ReservationStub()
        rig.cp.register(reservation)
        with pytest.raises(ValueError, match="registered twice"):
            rig.cp.register(ReservationStub())
        cs = await registered(rig)
        assert await supported_profiles(cs) == ["Core", "Reservation"]
        reserve = {
            "connectorId": 1,
            "expiryDate": "2030-01-01T00:00:00Z",
            "idTag": "TAG1",
            "reservationId": 1,
        }
        assert await cs.result("ReserveNow", reserve) == {"status": "Accepted"}
        assert reservation.reserved == [reserve]
        assert await cs.result("CancelReservation", {"reservationId": 1}) == {"status": "Rejected"}
        # Its task started with the session, once registered, by its name, with
        # the session's own.
        assert reservation.task_started == [0.0]
        assert {
            "ocpp reader",
            "ocpp answerer",
            "ocpp call timer",
            "heartbeat",
            "status notifications",
            "transaction queue",
            "reservation expiry",
        } <= task_names()
        # Another profile's calls stay NotSupported.
        trigger = {"requestedMessage": "Heartbeat"}
        assert await error_code(cs, "TriggerMessage", trigger) == "NotSupported"


# ---------------------------------------------------------------------- robustness


async def test_garbage_and_bad_calls_get_the_right_callerror_and_the_session_lives(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, settings={"HeartbeatInterval": "60"}) as rig:
        cs = await registered(rig, BootNotification=boot_answer(interval=60))
        frames = [
            ('[2,"g-1","RemoteStopTransaction",{"transactionId":', "FormationViolation"),
            ('[2,"g-2","RemoteStartTransaction",{"idTag":5}]', "TypeConstraintViolation"),
            ('[2,"g-3","RemoteStartTransaction",{}]', "OccurenceConstraintViolation"),
            ('[2,"g-4","RemoteStartTransaction",{"idTag":"T","x":1}]', "FormationViolation"),
            (
                '[2,"g-5","ChangeAvailability",{"connectorId":1,"type":"Later"}]',
                "PropertyConstraintViolation",
            ),
            ('[2,"g-6","NoSuchAction",{}]', "NotImplemented"),
            ('[2,"g-7","RemoteStartTransaction",{"idTag":"T"},1]', "ProtocolError"),
            ('[9,"g-8"]', "ProtocolError"),
        ]
        for text, code in frames:
            cs.send_raw(text)
            frame = await cs.stray()
            assert frame[:3] == [4, text.split('"')[1], code], (text, frame)
        # Nothing to answer: no UniqueId, a stray CALLRESULT, a stray CALLERROR, not an array.
        for text in ("hello", '[3,"nobody",{}]', '[4,"nobody","GenericError","",{}]', "{}"):
            cs.send_raw(text)
        assert await cs.result("GetConfiguration", {"key": ["HeartbeatInterval"]}) == {
            "configurationKey": [{"key": "HeartbeatInterval", "readonly": False, "value": "60"}]
        }
        assert rig.station.calls == []
        await trio.sleep_until(130)
        assert cs.times("Heartbeat") == [60.0, 120.0]
        assert rig.session_ends == []


async def test_a_failing_handler_answers_internal_error_and_the_session_lives(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, station=FakeStation(unlock_raises=True)) as rig:
        cs = await registered(rig)
        assert await error_code(cs, "UnlockConnector", {"connectorId": 1}) == "InternalError"
        assert await cs.result("ClearCache", {}) == {"status": "Accepted"}
        assert rig.session_ends == []


async def test_a_stray_answer_does_not_end_the_charge_points_call(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        await rig.start_transaction(local_id=1)
        start = await cs.expect("StartTransaction")
        cs.send_raw('[3,"not-the-start",{"transactionId":1,"idTagInfo":{"status":"Accepted"}}]')
        await trio.sleep(5)
        assert rig.queue.real_transaction_id(1) is None
        cs.answer(start, {"transactionId": 42, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.real_transaction_id(1) == 42, "id mapped")


async def test_an_invalid_answer_counts_as_a_failed_attempt(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"TransactionMessageRetryInterval": "10"}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        cs = await registered(rig)
        await rig.start_transaction(local_id=1)
        start = await cs.expect("StartTransaction")
        # No transactionId: the response schema refuses it; the queue must not lose the Start.
        cs.send_raw(f'[3,"{start.unique_id}",{{"idTagInfo":{{"status":"Accepted"}}}}]')
        again = await cs.expect("StartTransaction")
        assert trio.current_time() == 10.0
        (pending,) = rig.queue.pending()
        assert pending.attempts == 1
        assert pending.last_error is not None and "invalid response" in pending.last_error
        cs.answer(again, {"transactionId": 42, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.real_transaction_id(1) == 42, "id mapped")


async def test_a_cancelled_authorize_does_not_break_the_session(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await registered(rig)
        with trio.move_on_after(5):
            await rig.cp.authorize("TAG1")  # the central system is slow to answer
        await cs.expect("Authorize")
        rig.set_status(1, "Preparing")
        await trio.sleep_until(60)
        assert rig.session_ends == []
        assert statuses(cs)[-1] == (1, "Preparing")


# ------------------------------------------------------------ station timestamps


async def test_station_timestamps_are_sent_in_the_central_systems_time(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    ahead = timedelta(hours=1)

    def boot(call: IncomingCall) -> dict[str, Any]:
        theirs = format_time(datetime.now(UTC) + ahead)
        return {"status": "Accepted", "currentTime": theirs, "interval": 3600}

    async with open_rig(tmp_path, clock) as rig:
        # Taken before the central system set the clock: corrected when it is set.
        await rig.start_transaction(local_id=1)
        cs = await rig.connect(
            BootNotification=boot, StartTransaction=started(42), StopTransaction=empty
        )
        await statuses_sent(cs, 2)
        await rig.end_transaction(local_id=1)  # taken after: shifted at once
        await settle(lambda: cs.payloads("StopTransaction"), "StopTransaction sent")
        (start,) = cs.payloads("StartTransaction")
        (stop,) = cs.payloads("StopTransaction")
        assert near(start["timestamp"], EPOCH + ahead)
        assert near(stop["timestamp"], EPOCH + timedelta(hours=1) + ahead)
        for payload in cs.payloads("StatusNotification"):
            assert near(payload["timestamp"], datetime.now(UTC) + ahead, within=5)


async def test_a_timestamp_unset_in_an_earlier_boot_is_sent_as_recorded(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        recorded = format_time(EPOCH)
        payload = {
            "connectorId": 1,
            "idTag": "TAG1",
            "meterStart": 1000,
            "timestamp": recorded,
            "_clockNotSet": "an-earlier-boot",
        }
        rig.queue.enqueue("StartTransaction", payload, local_tx_id=1, dedupe_key="start:1")
        cs = await rig.connect(StartTransaction=started(42))
        await settle(lambda: cs.payloads("StartTransaction"), "StartTransaction sent")
        (start,) = cs.payloads("StartTransaction")
        assert start == {
            "connectorId": 1,
            "idTag": "TAG1",
            "meterStart": 1000,
            "timestamp": recorded,
        }
