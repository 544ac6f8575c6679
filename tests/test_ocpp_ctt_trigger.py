"""OCPP 1.6 Remote Trigger profile, end to end, named after the OCA compliance cases.

The station runs as a process (``evse run --sim``), the central system is
ops/csms.py (the ocpp package's own asyncio runtime) in a process of its own,
over real sockets, as in tests/test_ocpp_ctt.py. The central system records
every frame it receives with a sequence number in arrival order, the
charge point's CALLRESULT to TriggerMessage included: "the answer before
the triggered message" is judged on those numbers, i.e. on the wire.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.csms_peer import Csms, call_result, messages, running_csms, wait_for
from tests.ocpp_harness import CP, booted, calls, station, until

pytestmark = pytest.mark.slow


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms() as cs:
        yield cs


def last_seq(csms: Csms) -> int:
    received = messages(csms, CP)
    return int(received[-1]["seq"]) if received else 0


def trigger(csms: Csms, message: str, connector: int | None = None) -> tuple[str, int]:
    """TriggerMessage: its status, and the seq of the CALLRESULT as received."""
    since = last_seq(csms)
    payload: dict[str, Any] = {"requestedMessage": message}
    if connector is not None:
        payload["connectorId"] = connector
    status: str = call_result(csms, CP, "TriggerMessage", payload)["status"]
    (answer,) = [
        m for m in messages(csms, CP, since, "TriggerMessage") if m["type"] == "CALLRESULT"
    ]
    return status, int(answer["seq"])


def after(csms: Csms, action: str, seq: int) -> list[dict[str, Any]]:
    return [m for m in calls(csms, action) if m["seq"] > seq]


def test_tc_054_trigger_message(csms: Csms, tmp_path: Path) -> None:
    """TC_054 Trigger Message: the central system triggers each message the
    charge point offers; each TriggerMessage is Accepted and the requested
    message follows its answer: StatusNotification (no connectorId: connector
    0 and 1, the CALLRESULT before both on the wire), MeterValues (the
    MeterValuesSampledData measurands, context Trigger), Heartbeat,
    DiagnosticsStatusNotification and FirmwareStatusNotification (Idle: nothing
    in progress). BootNotification is Rejected here, a deliberate choice
    (registered already; see ocpp16/profiles/remote_trigger.py), where OCTT's
    variant may expect Accepted."""
    with station(csms, tmp_path) as st:
        booted(csms)
        st.wait_status("Available")
        time.sleep(0.5)  # the boot's own status notifications are out

        status, answered = trigger(csms, "StatusNotification")
        assert status == "Accepted"
        until(lambda: len(after(csms, "StatusNotification", answered)) >= 2, 10, "both")
        triggered = after(csms, "StatusNotification", answered)
        assert [m["payload"]["connectorId"] for m in triggered] == [0, 1]
        assert all(m["seq"] > answered for m in triggered)

        status, answered = trigger(csms, "StatusNotification", 1)
        assert status == "Accepted"
        notified = wait_for(csms, CP, "StatusNotification", since=answered)
        assert notified["payload"]["connectorId"] == 1

        sampled = call_result(
            csms,
            CP,
            "ChangeConfiguration",
            {"key": "MeterValuesSampledData", "value": "Energy.Active.Import.Register,Voltage"},
        )
        assert sampled == {"status": "Accepted"}
        status, answered = trigger(csms, "MeterValues", 1)
        assert status == "Accepted"
        meter = wait_for(csms, CP, "MeterValues", since=answered)
        samples = meter["payload"]["meterValue"][0]["sampledValue"]
        assert {s["context"] for s in samples} == {"Trigger"}
        assert {s["measurand"] for s in samples} == {"Energy.Active.Import.Register", "Voltage"}
        assert meter["payload"]["connectorId"] == 1

        for message in ("Heartbeat", "DiagnosticsStatusNotification", "FirmwareStatusNotification"):
            status, answered = trigger(csms, message)
            assert status == "Accepted", message
            sent = wait_for(csms, CP, message, since=answered)
            if message != "Heartbeat":
                assert sent["payload"] == {"status": "Idle"}

        since = last_seq(csms)
        status, _ = trigger(csms, "BootNotification")
        assert status == "Rejected"
        time.sleep(1)
        assert after(csms, "BootNotification", since) == []


def test_tc_055_trigger_message_rejected(csms: Csms, tmp_path: Path) -> None:
    """TC_055 Trigger Message - Rejected: a TriggerMessage for a connector the
    charge point does not have is Rejected, and no message follows."""
    with station(csms, tmp_path):
        booted(csms)
        time.sleep(0.5)
        since = last_seq(csms)
        for message in ("MeterValues", "StatusNotification"):
            status, _ = trigger(csms, message, 2)
            assert status == "Rejected", message
        time.sleep(1.5)
        assert [m for m in calls(csms) if m["seq"] > since and m["action"] != "Heartbeat"] == []
