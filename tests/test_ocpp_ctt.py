"""OCPP 1.6 charge-point cases, named after the OCA compliance test cases they cover.

The station runs as a process (``evse run --sim``); the central system is
ops/csms.py, built on the ocpp package's own asyncio runtime (code we did not
write) in a process of its own. Each test drives the station from outside
(simulated EV, local tags) and from the central system (its calls), and judges
the messages the central system received.
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.csms_peer import (
    Csms,
    CsmsError,
    call,
    call_result,
    configure,
    disconnect,
    running_csms,
    wait_connected,
    wait_for,
)
from tests.ocpp_harness import CP, TAG, booted, calls, station, statuses, until

pytestmark = pytest.mark.slow


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms() as cs:
        yield cs


def test_tc_001_cold_boot(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        boot = wait_for(csms, CP, "BootNotification")
        assert boot["payload"]["chargePointSerialNumber"] == "SIM-0001"
        assert boot["response"]["payload"]["status"] == "Accepted"
        until(lambda: len(calls(csms, "StatusNotification")) >= 2, 10, "status of 0 and 1")
        first = calls(csms, "StatusNotification")[:2]
        assert {m["payload"]["connectorId"] for m in first} == {0, 1}
        assert all(m["payload"]["status"] == "Available" for m in first)
        # Nothing but BootNotification came before the registration was accepted.
        assert calls(csms)[0]["action"] == "BootNotification"
        assert st.stop()[0] == 0


def test_tc_003_charging_session_plug_in_first(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        assert st.present()["status"] == "Accepted"
        start = wait_for(csms, CP, "StartTransaction")
        assert start["payload"]["idTag"] == TAG
        tx_id = start["response"]["payload"]["transactionId"]
        st.wait_status("Charging")
        until(lambda: "Charging" in statuses(csms), 10, "Charging notified")
        st.present()  # the same card again: local stop
        stop = wait_for(csms, CP, "StopTransaction")
        assert stop["payload"]["transactionId"] == tx_id
        assert stop["payload"]["reason"] == "Local"
        assert stop["payload"]["meterStop"] >= start["payload"]["meterStart"]
        st.unplug()
        until(lambda: statuses(csms)[-1:] == ["Available"], 10, "Available again")
        seq = statuses(csms)
        # Preparing -> (SuspendedEV ->) Charging -> Finishing -> Available.
        assert seq[seq.index("Preparing") :].count("Charging") == 1
        assert seq.index("Charging") < seq.index("Finishing") < len(seq) - 1
        order = [m["action"] for m in calls(csms) if m["action"] != "Heartbeat"]
        assert order.index("StartTransaction") < order.index("StopTransaction")
        # Charging is reported after the StartTransaction it belongs to.
        first_charging = next(
            m["seq"]
            for m in calls(csms, "StatusNotification")
            if m["payload"]["status"] in ("Charging", "SuspendedEV")
        )
        assert start["seq"] < first_charging


def test_tc_004_identification_first(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        assert st.present()["status"] == "Accepted"
        st.wait_status("Preparing")
        st.plug()
        wait_for(csms, CP, "StartTransaction")
        st.wait_status("Charging")


def test_tc_005_1_ev_side_disconnect(csms: Csms, tmp_path: Path) -> None:
    """StopTransactionOnEVSideDisconnect true (the default): unplugging stops the
    transaction with EVDisconnected."""
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.present()
        wait_for(csms, CP, "StartTransaction")
        st.wait_status("Charging")
        st.unplug()
        stop = wait_for(csms, CP, "StopTransaction")
        assert stop["payload"]["reason"] == "EVDisconnected"


def test_tc_005_3_ev_side_disconnect_keeps_the_transaction(csms: Csms, tmp_path: Path) -> None:
    """StopTransactionOnEVSideDisconnect false (RW, OCPP 1.6 9.1.27): unplugged at the
    EV, the transaction stays (SuspendedEV) until the central system stops it."""
    with station(csms, tmp_path) as st:
        booted(csms)
        answer = call_result(
            csms,
            CP,
            "ChangeConfiguration",
            {"key": "StopTransactionOnEVSideDisconnect", "value": "false"},
        )
        assert answer == {"status": "Accepted"}
        st.plug()
        st.present()
        start = wait_for(csms, CP, "StartTransaction")
        tx_id = start["response"]["payload"]["transactionId"]
        st.wait_status("Charging")
        st.unplug()
        st.wait_status("SuspendedEV")
        until(lambda: statuses(csms)[-1:] == ["SuspendedEV"], 10, "SuspendedEV notified")
        assert not calls(csms, "StopTransaction")
        answer = call_result(csms, CP, "RemoteStopTransaction", {"transactionId": tx_id})
        assert answer == {"status": "Accepted"}
        stop = wait_for(csms, CP, "StopTransaction")
        assert stop["payload"]["reason"] == "Remote"
        until(lambda: statuses(csms)[-1:] == ["Available"], 10, "Available")


def test_tc_010_remote_start_and_tc_011_remote_stop(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        answer = call_result(csms, CP, "RemoteStartTransaction", {"idTag": "REMOTE01"})
        assert answer == {"status": "Accepted"}
        # AuthorizeRemoteTxRequests = true: the tag was authorized first.
        authorize = wait_for(csms, CP, "Authorize")
        assert authorize["payload"] == {"idTag": "REMOTE01"}
        start = wait_for(csms, CP, "StartTransaction")
        assert start["payload"]["idTag"] == "REMOTE01"
        tx_id = start["response"]["payload"]["transactionId"]
        st.wait_status("Charging")
        wrong = call_result(csms, CP, "RemoteStopTransaction", {"transactionId": tx_id + 99})
        assert wrong == {"status": "Rejected"}
        right = call_result(csms, CP, "RemoteStopTransaction", {"transactionId": tx_id})
        assert right == {"status": "Accepted"}
        stop = wait_for(csms, CP, "StopTransaction")
        assert stop["payload"]["reason"] == "Remote"


def test_remote_start_of_a_blocked_tag_is_rejected(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        answer = call_result(csms, CP, "RemoteStartTransaction", {"idTag": "BLOCKED9"})
        assert answer == {"status": "Rejected"}


def test_tc_019_get_configuration_and_tc_021_change_configuration(
    csms: Csms, tmp_path: Path
) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        every = call_result(csms, CP, "GetConfiguration", {})
        keys = {k["key"]: k for k in every["configurationKey"]}
        assert keys["NumberOfConnectors"] == {
            "key": "NumberOfConnectors",
            "readonly": True,
            "value": "1",
        }
        assert "value" not in keys["AuthorizationKey"]  # never revealed
        some = call_result(
            csms, CP, "GetConfiguration", {"key": ["MeterValueSampleInterval", "NoSuchKey"]}
        )
        assert some["unknownKey"] == ["NoSuchKey"]
        for key, value, expected in [
            ("MeterValueSampleInterval", "30", "Accepted"),
            ("MeterValueSampleInterval", "2", "Rejected"),  # below 5 s
            ("MeterValueSampleInterval", "abc", "Rejected"),
            ("NumberOfConnectors", "2", "Rejected"),  # read-only
            ("NoSuchKey", "1", "NotSupported"),
        ]:
            answer = call_result(csms, CP, "ChangeConfiguration", {"key": key, "value": value})
            assert answer == {"status": expected}, (key, value)
        now = call_result(csms, CP, "GetConfiguration", {"key": ["MeterValueSampleInterval"]})
        assert now["configurationKey"][0]["value"] == "30"
        # Persisted: the same after a restart.
        assert st.stop()[0] == 0
    with station(csms, tmp_path):
        booted(csms, 2)
        until(lambda: _value(csms, "MeterValueSampleInterval") == "30", 10, "persisted key")


def _value(csms: Csms, key: str) -> str | None:
    try:
        outcome = call(csms, CP, "GetConfiguration", {"key": [key]}, timeout=5)
    except CsmsError:
        return None  # not (yet) connected
    if outcome["kind"] != "result":
        return None
    entries = outcome["result"]["configurationKey"]
    return str(entries[0]["value"]) if entries else None


def test_unknown_vendor_data_transfer_and_unsupported_actions(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path):
        booted(csms)
        answer = call_result(csms, CP, "DataTransfer", {"vendorId": "acme", "messageId": "x"})
        assert answer == {"status": "UnknownVendorId"}
        answer = call_result(csms, CP, "ClearCache", {})
        assert answer == {"status": "Accepted"}


def test_tc_013_change_availability_inoperative_is_persisted(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"}
        )
        assert answer == {"status": "Accepted"}
        until(lambda: statuses(csms)[-1:] == ["Unavailable"], 10, "Unavailable notified")
        st.stop()
    with station(csms, tmp_path) as st:
        st.wait_status("Unavailable")
        booted(csms, 2)
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 1, "type": "Operative"}
        )
        assert answer == {"status": "Accepted"}
        st.wait_status("Available")


def test_change_availability_of_connector_1_leaves_connector_0_available(
    csms: Csms, tmp_path: Path
) -> None:
    """Connector 0 is the charge point: it follows only a ChangeAvailability on
    connector 0 (and station-wide faults), also after a Hard Reset (OCPP 1.6 5.2)."""
    with station(csms, tmp_path):
        booted(csms)
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"}
        )
        assert answer == {"status": "Accepted"}
        until(lambda: statuses(csms)[-1:] == ["Unavailable"], 10, "connector 1 Unavailable")
        assert call_result(csms, CP, "Reset", {"type": "Hard"}) == {"status": "Accepted"}
        # The firmware re-executes itself (ops.cli) and registers again.
        booted(csms, 2)
        until(lambda: statuses(csms)[-1:] == ["Unavailable"], 10, "still Unavailable")
        assert "Unavailable" not in statuses(csms, connector=0)
        assert statuses(csms, connector=0)[-1] == "Available"


def test_tc_013_change_availability_of_connector_0_applies_to_every_connector(
    csms: Csms, tmp_path: Path
) -> None:
    with station(csms, tmp_path):
        booted(csms)
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 0, "type": "Inoperative"}
        )
        assert answer == {"status": "Accepted"}
        until(lambda: statuses(csms, connector=0)[-1:] == ["Unavailable"], 10, "0 Unavailable")
        until(lambda: statuses(csms)[-1:] == ["Unavailable"], 10, "1 Unavailable")
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 0, "type": "Operative"}
        )
        assert answer == {"status": "Accepted"}
        until(lambda: statuses(csms, connector=0)[-1:] == ["Available"], 10, "0 Available")
        until(lambda: statuses(csms)[-1:] == ["Available"], 10, "1 Available")


def test_change_availability_during_a_transaction_is_scheduled(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.present()
        st.wait_status("Charging")
        answer = call_result(
            csms, CP, "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"}
        )
        assert answer == {"status": "Scheduled"}
        st.unplug()
        st.wait_status("Unavailable")


def test_unlock_connector_without_a_lock_is_not_supported(csms: Csms, tmp_path: Path) -> None:
    # The simulator's EVSE DIN drives no socket lock (docs/device-maps.md): nothing
    # to unlock, nothing stopped. With a lock (the EV Charge Control Basic) the
    # stop (UnlockCommand) and the release are tested in tests/test_connector_lock.py.
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.present()
        st.wait_status("Charging")
        answer = call_result(csms, CP, "UnlockConnector", {"connectorId": 1})
        assert answer == {"status": "NotSupported"}
        assert calls(csms, "StopTransaction") == []
        assert st.status()["status"] == "Charging"


def test_tc_032_2_power_failure_stops_with_power_loss_after_the_restart(
    csms: Csms, tmp_path: Path
) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.present()
        start = wait_for(csms, CP, "StartTransaction")
        st.wait_status("Charging")
        db = tmp_path / "station.sqlite"
        until(lambda: _last_meter(db) > start["payload"]["meterStart"], 15, "persisted reading")
        st.kill()  # SIGKILL: power gone, no shutdown code ran
    last = _last_meter(db)
    with station(csms, tmp_path):
        stop = wait_for(csms, CP, "StopTransaction", within=20)
        assert stop["payload"]["reason"] == "PowerLoss"
        assert stop["payload"]["transactionId"] == start["response"]["payload"]["transactionId"]
        assert stop["payload"]["meterStop"] == round(last)


def _last_meter(db: Path) -> float:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT last_meter_wh FROM transactions").fetchall()
    finally:
        conn.close()
    return float(rows[0][0]) if rows else -1.0


def test_tc_036_connection_loss_during_a_transaction(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.present()
        start = wait_for(csms, CP, "StartTransaction")
        st.wait_status("Charging")
        configure(csms, refuse_for=3)
        disconnect(csms, CP, abort=True)
        st.present()  # stopped while offline: charging must not care
        st.wait_status("Finishing")
        stop = wait_for(csms, CP, "StopTransaction", within=30)
        assert stop["payload"]["transactionId"] == start["response"]["payload"]["transactionId"]
        assert stop["payload"]["reason"] == "Local"


def test_offline_transaction_gets_its_real_id_on_reconnect(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        configure(csms, refuse_for=4)
        disconnect(csms, CP, abort=True)
        st.plug()
        st.present()  # local list: accepted offline
        st.wait_status("Charging")
        st.present()
        st.wait_status("Finishing")
        start = wait_for(csms, CP, "StartTransaction", within=30)
        stop = wait_for(csms, CP, "StopTransaction", within=30)
        assert stop["payload"]["transactionId"] == start["response"]["payload"]["transactionId"]
        assert start["seq"] < stop["seq"]


def test_sigterm_during_a_transaction_stops_it_with_reboot(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.present()
        wait_for(csms, CP, "StartTransaction")
        st.wait_status("Charging")
        code, _ = st.stop(signal.SIGTERM)
        assert code == 0
    # Delivered at the next start (the queue kept it).
    with station(csms, tmp_path):
        stop = wait_for(csms, CP, "StopTransaction", within=20)
        assert stop["payload"]["reason"] == "Reboot"


def test_a_change_that_reconnects_is_answered_before_the_reconnect(
    csms: Csms, tmp_path: Path
) -> None:
    """ChangeConfiguration of AuthorizationKey makes the station reconnect with the
    new credentials: the central system gets its Accepted first (it used to see
    the connection closed instead), then the station connects again."""
    with station(csms, tmp_path):
        booted(csms)
        key = "0123456789abcdef0123456789ABCDEF"
        answer = call_result(
            csms, CP, "ChangeConfiguration", {"key": "AuthorizationKey", "value": key}
        )
        assert answer == {"status": "Accepted"}
        wait_connected(csms, CP, 20.0, connections=2)


def _fault(st: object, name: str) -> None:
    from tests.sim_control import control  # noqa: PLC0415

    control(st.sim, "POST", f"/faults/{name}")  # type: ignore[attr-defined]


def test_tc_024_start_charging_session_lock_failure(csms: Csms, tmp_path: Path) -> None:
    """Authorized by RemoteStart (Preparing); the EV plugged in, the socket's lock does
    not engage: Faulted with ConnectorLockFailure and no transaction starts (the
    serial EV Charge Control Basic, the board that drives a lock)."""
    with station(csms, tmp_path, "--sim-board", "ev-cc-basic") as st:
        booted(csms)
        _fault(st, "lock_fail")
        answer = call_result(csms, CP, "RemoteStartTransaction", {"idTag": TAG})
        assert answer == {"status": "Accepted"}
        until(lambda: statuses(csms)[-1:] == ["Preparing"], 10, "Preparing")
        st.plug()
        until(lambda: statuses(csms)[-1:] == ["Faulted"], 10, "Faulted")
        faulted = [
            m["payload"]
            for m in calls(csms, "StatusNotification")
            if m["payload"]["connectorId"] == 1 and m["payload"]["status"] == "Faulted"
        ]
        assert faulted[-1]["errorCode"] == "ConnectorLockFailure"
        assert not calls(csms, "StartTransaction")


def test_tc_030_unlock_connector_unlock_failure(csms: Csms, tmp_path: Path) -> None:
    """UnlockConnector while charging, the lock does not release: the transaction is
    stopped (UnlockCommand) and the answer is UnlockFailed."""
    with station(csms, tmp_path, "--sim-board", "ev-cc-basic") as st:
        booted(csms)
        st.plug()
        st.present()
        wait_for(csms, CP, "StartTransaction")
        st.wait_status("Charging")
        _fault(st, "unlock_fail")
        answer = call_result(csms, CP, "UnlockConnector", {"connectorId": 1})
        assert answer == {"status": "UnlockFailed"}
        stop = wait_for(csms, CP, "StopTransaction")
        assert stop["payload"]["reason"] == "UnlockCommand"


def test_unlock_connector_unlocks_the_socket(csms: Csms, tmp_path: Path) -> None:
    with station(csms, tmp_path, "--sim-board", "ev-cc-basic") as st:
        booted(csms)
        st.plug()
        st.present()
        st.wait_status("Charging")
        answer = call_result(csms, CP, "UnlockConnector", {"connectorId": 1})
        assert answer == {"status": "Unlocked"}
        stop = wait_for(csms, CP, "StopTransaction")
        assert stop["payload"]["reason"] == "UnlockCommand"
