"""The Remote Trigger profile (ocpp16/profiles/remote_trigger.py) in the charge
point's session: TriggerMessage answered first and the triggered message after
the CALLRESULT on the wire, every connector when none is named, an unknown
connector Rejected, triggered MeterValues with context Trigger, BootNotification
Rejected once registered (sent at once while Pending), the status
notifications Idle.

No sockets: tests/chargepoint_rig.py, virtual time. The order on the wire is
the order in which the charge point wrote frames to its connection
(``FakeConnection.send``, recorded).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ocpp16.metering import format_time
from ocpp16.profiles.remote_trigger import RemoteTriggerProfile
from ocpp16.rpc import IncomingCall
from tests.chargepoint_rig import (
    CentralSystem,
    FakeConnection,
    FakeStation,
    Rig,
    boot_answer,
    open_rig,
    settle,
    snapshot,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """Every frame the charge point writes to its connection, in order."""
    frames: list[list[Any]] = []
    original = FakeConnection.send

    async def send(self: FakeConnection, text: str) -> None:
        await original(self, text)
        frames.append(json.loads(text))

    monkeypatch.setattr(FakeConnection, "send", send)
    return frames


async def up(rig: Rig, **auto: Any) -> CentralSystem:
    """Registered, the first status notifications (0 and 1) sent."""
    rig.cp.register(RemoteTriggerProfile(rig.cp))
    cs = await rig.connect(**auto)
    await settle(lambda: len(cs.payloads("StatusNotification")) >= 2, "first statuses")
    return cs


async def trigger(cs: CentralSystem, message: str, connector: int | None = None) -> str:
    """Send TriggerMessage (the answer is not waited for): its uniqueId."""
    payload: dict[str, Any] = {"requestedMessage": message}
    if connector is not None:
        payload["connectorId"] = connector
    return cs.send_call("TriggerMessage", payload)


def position(frames: list[list[Any]], unique_id: str) -> int:
    """Where the answer to ``unique_id`` is on the wire."""
    return next(i for i, f in enumerate(frames) if f[0] in (3, 4) and f[1] == unique_id)


def calls_after(frames: list[list[Any]], index: int, action: str) -> list[dict[str, Any]]:
    return [f[3] for f in frames[index + 1 :] if f[0] == 2 and f[2] == action]


def calls_before(frames: list[list[Any]], index: int, action: str) -> list[dict[str, Any]]:
    return [f[3] for f in frames[:index] if f[0] == 2 and f[2] == action]


async def test_status_notification_follows_the_answer_for_every_connector(
    tmp_path: Path, clock: trio.testing.MockClock, wire: list[list[Any]]
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await up(rig)
        before = len(cs.payloads("StatusNotification"))
        rig.station.statuses[1] = ("Preparing", "NoError", "")  # not told: only triggered
        uid = await trigger(cs, "StatusNotification")
        answer = await cs.answer_to_call()
        assert answer.unique_id == uid and answer.payload == {"status": "Accepted"}  # type: ignore[union-attr]
        await settle(lambda: len(cs.payloads("StatusNotification")) == before + 2, "both")
        at = position(wire, uid)
        triggered = calls_after(wire, at, "StatusNotification")
        assert [(p["connectorId"], p["status"]) for p in triggered] == [
            (0, "Available"),
            (1, "Preparing"),
        ]
        assert len(calls_before(wire, at, "StatusNotification")) == before
        # It counts as reported: the status task does not send it again.
        rig.cp.status_changed()
        await trio.sleep(10)
        assert len(cs.payloads("StatusNotification")) == before + 2


async def test_a_named_connector_only_and_an_unknown_one_rejected(
    tmp_path: Path, clock: trio.testing.MockClock, wire: list[list[Any]]
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await up(rig)
        before = len(cs.payloads("StatusNotification"))
        payload = {"requestedMessage": "StatusNotification", "connectorId": 1}
        assert await cs.result("TriggerMessage", payload) == {"status": "Accepted"}
        await settle(lambda: len(cs.payloads("StatusNotification")) == before + 1, "one")
        assert cs.payloads("StatusNotification")[-1]["connectorId"] == 1
        sent = len(wire)
        for message in ("StatusNotification", "MeterValues", "Heartbeat", "BootNotification"):
            payload = {"requestedMessage": message, "connectorId": 2}
            assert await cs.result("TriggerMessage", payload) == {"status": "Rejected"}
        await trio.sleep(60)
        # Nothing but the four answers (no triggered message, no heartbeat yet).
        assert [f[0] for f in wire[sent:]] == [3, 3, 3, 3]


async def test_triggered_meter_values_carry_the_sampled_measurands_with_context_trigger(
    tmp_path: Path, clock: trio.testing.MockClock, wire: list[list[Any]]
) -> None:
    station = FakeStation(snapshots={1: snapshot(1234.0)})
    settings = {"MeterValuesSampledData": "Energy.Active.Import.Register,Current.Import"}
    async with open_rig(tmp_path, clock, station=station, settings=settings) as rig:
        cs = await up(
            rig,
            StartTransaction=lambda call: {
                "transactionId": 42,
                "idTagInfo": {"status": "Accepted"},
            },
            MeterValues=lambda call: {},
        )
        uid = await trigger(cs, "MeterValues")
        await settle(lambda: len(cs.payloads("MeterValues")) == 1, "MeterValues")
        (payload,) = calls_after(wire, position(wire, uid), "MeterValues")
        assert payload["connectorId"] == 1 and "transactionId" not in payload
        (value,) = payload["meterValue"]
        samples = value["sampledValue"]
        assert [s["measurand"] for s in samples] == [
            "Energy.Active.Import.Register",
            "Current.Import",
        ]
        assert {s["context"] for s in samples} == {"Trigger"}
        assert samples[0]["value"] == "1234"
        # During a transaction the central system knows: its transactionId.
        await rig.start_transaction(1)
        await settle(lambda: cs.payloads("StartTransaction"), "StartTransaction")
        await trio.sleep(1)
        station.running[1] = 1
        await cs.result("TriggerMessage", {"requestedMessage": "MeterValues", "connectorId": 1})
        await settle(lambda: len(cs.payloads("MeterValues")) == 2, "second MeterValues")
        assert cs.payloads("MeterValues")[-1]["transactionId"] == 42


async def test_meter_values_fall_back_to_the_register_and_need_a_reading(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    station = FakeStation(snapshots={1: snapshot(99.0)})
    async with open_rig(
        tmp_path, clock, station=station, settings={"MeterValuesSampledData": ""}
    ) as rig:
        cs = await up(rig, MeterValues=lambda call: {})
        await cs.result("TriggerMessage", {"requestedMessage": "MeterValues"})
        await settle(lambda: len(cs.payloads("MeterValues")) == 1, "MeterValues")
        (sample,) = cs.payloads("MeterValues")[0]["meterValue"][0]["sampledValue"]
        assert (sample["measurand"], sample["context"]) == (
            "Energy.Active.Import.Register",
            "Trigger",
        )
        station.snapshots.clear()  # no reading: Accepted, but nothing to send
        answer = await cs.result("TriggerMessage", {"requestedMessage": "MeterValues"})
        assert answer == {"status": "Accepted"}
        await trio.sleep(10)
        assert len(cs.payloads("MeterValues")) == 1


async def test_heartbeat_and_the_idle_status_notifications(
    tmp_path: Path, clock: trio.testing.MockClock, wire: list[list[Any]]
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await up(
            rig,
            DiagnosticsStatusNotification=lambda call: {},
            FirmwareStatusNotification=lambda call: {},
        )
        for message in ("Heartbeat", "DiagnosticsStatusNotification", "FirmwareStatusNotification"):
            uid = await trigger(cs, message)
            await settle(lambda m=message: cs.payloads(m), message)  # type: ignore[misc]
            assert calls_after(wire, position(wire, uid), message)
        assert cs.payloads("DiagnosticsStatusNotification") == [{"status": "Idle"}]
        assert cs.payloads("FirmwareStatusNotification") == [{"status": "Idle"}]
        assert trio.current_time() < 1.0  # at once, not at the heartbeat interval


async def test_a_triggered_heartbeat_that_steps_the_clock_is_a_setting_system_time(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """The triggered Heartbeat's currentTime goes the way of every other answer's:
    a step of more than a second tells ``on_clock_set`` (evse.ocpp_port raises the
    whitepaper's SettingSystemTime from it); the same time again does not."""
    ahead = [0.0]

    def heartbeat(call: IncomingCall) -> dict[str, Any]:
        at = datetime.now(UTC) + timedelta(seconds=ahead[0])
        return {"currentTime": format_time(at)}

    async with open_rig(tmp_path, clock) as rig:
        told: list[float] = []
        rig.cp.on_clock_set = lambda: told.append(rig.cp.clock.offset.total_seconds())  # type: ignore[union-attr]
        cs = await up(rig, Heartbeat=heartbeat)
        told.clear()  # BootNotification's currentTime set it first
        ahead[0] = 3600.0
        await trigger(cs, "Heartbeat")
        await settle(lambda: cs.payloads("Heartbeat"), "the triggered heartbeat")
        await settle(lambda: told, "the clock hook")
        assert len(told) == 1 and told[0] == pytest.approx(3600.0, abs=5.0)
        await trigger(cs, "Heartbeat")
        await settle(lambda: len(cs.payloads("Heartbeat")) == 2, "the second heartbeat")
        await trio.sleep(1)
        assert len(told) == 1


async def test_the_firmware_profile_supplies_what_is_in_progress(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        rig.cp.register(
            RemoteTriggerProfile(
                rig.cp, diagnostics_status=lambda: "Uploading", firmware_status=lambda: "Installing"
            )
        )
        cs = await rig.connect(
            DiagnosticsStatusNotification=lambda call: {},
            FirmwareStatusNotification=lambda call: {},
        )
        await settle(lambda: rig.cp.online, "registered")
        await cs.result("TriggerMessage", {"requestedMessage": "DiagnosticsStatusNotification"})
        await cs.result("TriggerMessage", {"requestedMessage": "FirmwareStatusNotification"})
        await settle(lambda: cs.payloads("FirmwareStatusNotification"), "sent")
        assert cs.payloads("DiagnosticsStatusNotification") == [{"status": "Uploading"}]
        assert cs.payloads("FirmwareStatusNotification") == [{"status": "Installing"}]


async def test_boot_notification_rejected_once_registered_sent_at_once_while_pending(
    tmp_path: Path, clock: trio.testing.MockClock, wire: list[list[Any]]
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await up(rig)
        answer = await cs.result("TriggerMessage", {"requestedMessage": "BootNotification"})
        assert answer == {"status": "Rejected"}
        assert len(cs.payloads("BootNotification")) == 1

    pending: list[float] = []

    def boot(call: IncomingCall) -> dict[str, Any]:
        pending.append(trio.current_time())
        status = "Pending" if len(pending) == 1 else "Accepted"
        return {"status": status, "currentTime": format_time(datetime.now(UTC)), "interval": 900}

    (tmp_path / "pending").mkdir()
    async with open_rig(tmp_path / "pending", clock) as rig:
        rig.cp.register(RemoteTriggerProfile(rig.cp))
        cs = await rig.connect(BootNotification=boot)
        await settle(lambda: pending, "first boot")
        await trio.sleep(100)  # Pending: the next boot would come at 900 s
        uid = await trigger(cs, "BootNotification")
        await settle(lambda: len(pending) == 2, "triggered boot")
        assert pending[1] == pending[0] + 100  # at once, not after the interval
        assert calls_after(wire, position(wire, uid), "BootNotification")
        await settle(lambda: rig.cp.online, "registered")


async def test_a_requested_message_outside_the_enum_is_a_schema_error(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        cs = await up(rig, BootNotification=boot_answer())
        cs.send_raw(json.dumps([2, "t-1", "TriggerMessage", {"requestedMessage": "Authorize"}]))
        frame = await cs.stray()
        assert frame[0] == 4 and frame[1] == "t-1"
        assert frame[2] in {"PropertyConstraintViolation", "FormationViolation"}
