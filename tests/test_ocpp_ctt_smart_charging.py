"""OCPP 1.6 Smart Charging, end to end: the station as a process against ops/csms.py.

As in tests/test_ocpp_ctt.py, the station runs as ``evse run --sim`` (its
board and meter are the built-in simulator, installer maximum 16 A) and the
central system is ops/csms.py on the ``ocpp`` package's own runtime, each in
a process of its own, over real sockets. What reaches the board is read from
the simulator's write log (``GET /events``: every holding-register write with
its wall-clock time ``at``); what the central system received from its own
record (``time``: wall clock, milliseconds). Both run on this machine's clock.

First the end-to-end checks of issue 8 (limit latency, a boundary on time,
persistence across a restart), then one test per OCA compliance test case of
the Smart Charging profile (OCTT 1.6, the "_CS" charge-point cases), named
after it; each docstring says what the case checks.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.csms_peer import (
    Csms,
    call_result,
    configure,
    disconnect,
    messages,
    running_csms,
    wait_for,
)
from tests.ocpp_harness import CP, StationProcess, booted, calls, station, until
from tests.sim_control import control

pytestmark = pytest.mark.slow

#: The simulated station's installer maximum (ops/run.py ``sim_config``).
INSTALLER_MAX = 16.0
#: Its fallback limit (the same), applied offline.
FALLBACK = 6.0
#: A limit change must be on the board within this (issue 8).
LATENCY_BUDGET = 1.0


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms() as cs:
        yield cs


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def text(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def profile(
    profile_id: int,
    *,
    purpose: str = "TxDefaultProfile",
    stack: int = 0,
    kind: str = "Relative",
    periods: tuple[tuple[int, float], ...] = ((0, 10.0),),
    start: datetime | None = None,
    duration: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "chargingRateUnit": "A",
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    if start is not None:
        schedule["startSchedule"] = text(start)
    if duration is not None:
        schedule["duration"] = duration
    return {
        "chargingProfileId": profile_id,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
        **extra,
    }


def set_profile(csms: Csms, connector_id: int, cs_profile: dict[str, Any]) -> dict[str, Any]:
    return call_result(
        csms,
        CP,
        "SetChargingProfile",
        {"connectorId": connector_id, "csChargingProfiles": cs_profile},
    )


def board_writes(st: StationProcess) -> list[tuple[datetime, float]]:
    """(wall time, amps) of every current command the board received, in order."""
    events = control(st.sim, "GET", "/events")["events"]
    return [
        (utc(e["at"]), float(e["fields"]["command"]))
        for e in events
        if e["event"] == "write" and "command" in e.get("fields", {})
    ]


def board_gets(st: StationProcess, amps: float, after: datetime, within: float = 5.0) -> datetime:
    """When the board was first commanded ``amps`` at or after ``after``."""
    found: datetime = until(
        lambda: next((at for at, a in board_writes(st) if a == amps and at >= after), None),
        within,
        f"{amps:g} A on the board",
    )
    return found


def command_now(st: StationProcess) -> float:
    return board_writes(st)[-1][1]


def last_result(csms: Csms, action: str) -> dict[str, Any]:
    """The central system's record of the last CALLRESULT of ``action`` it received."""
    results = [
        m for m in messages(csms, CP, action=action) if m["type"] in ("CALLRESULT", "CALLERROR")
    ]
    return results[-1]


def charging(csms: Csms, st: StationProcess) -> dict[str, Any]:
    """Plug in, present the tag: the StartTransaction once the station charges."""
    st.plug()
    st.present()
    start = wait_for(csms, CP, "StartTransaction")
    st.wait_status("Charging")
    board_gets(st, INSTALLER_MAX, utc(start["time"]) - timedelta(seconds=5))
    return start


def composite(csms: Csms, connector_id: int, duration: int) -> dict[str, Any]:
    return call_result(
        csms,
        CP,
        "GetCompositeSchedule",
        {"connectorId": connector_id, "duration": duration, "chargingRateUnit": "A"},
    )


def periods(answer: dict[str, Any]) -> list[tuple[int, float]]:
    return [
        (p["startPeriod"], p["limit"]) for p in answer["chargingSchedule"]["chargingSchedulePeriod"]
    ]


# -- end to end (issue 8) ----------------------------------------------------------------------


def test_a_profile_that_lowers_the_limit_reaches_the_board_within_1_s(
    csms: Csms, tmp_path: Path
) -> None:
    """SetChargingProfile (TxDefault 10 A) during a session at 16 A: the board has
    10 A within 1 s of the CALLRESULT (the central system's receipt of it)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        charging(csms, st)
        assert set_profile(csms, 1, profile(1, periods=((0, 10.0),))) == {"status": "Accepted"}
        answered = utc(last_result(csms, "SetChargingProfile")["time"])
        written = board_gets(st, 10.0, answered - timedelta(seconds=1))
        latency = (written - answered).total_seconds()
        print(f"limit-change latency: CALLRESULT -> board write {latency * 1000:.0f} ms")
        assert latency < LATENCY_BUDGET
        assert st.status()["limit"] == {"amps": 10.0, "bound_by": "smart_charging"}


def test_a_period_boundary_changes_the_board_current_at_the_boundary(
    csms: Csms, tmp_path: Path
) -> None:
    """An Absolute TxDefault whose schedule starts 3 s ahead (12 A), then 8 A from
    4 s into it: the board current changes at each boundary, not before, and
    within 1 s after (the station sleeps until the boundary, it does not poll)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        charging(csms, st)
        begin = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        cs_profile = profile(1, kind="Absolute", start=begin, periods=((0, 12.0), (4, 8.0)))
        assert set_profile(csms, 0, cs_profile) == {"status": "Accepted"}
        assert command_now(st) == INSTALLER_MAX
        for boundary, amps in [(begin, 12.0), (begin + timedelta(seconds=4), 8.0)]:
            written = board_gets(st, amps, boundary - timedelta(seconds=2), within=10)
            # The station's clock is the central system's (offset of a few ms).
            assert boundary - timedelta(seconds=0.05) <= written < boundary + timedelta(seconds=1)


def test_charge_point_max_and_tx_default_survive_a_restart_a_tx_profile_does_not(
    csms: Csms, tmp_path: Path
) -> None:
    """ChargePointMax (connector 0) and TxDefault (connector 1) are in the station's
    SQLite file after a restart; the TxProfile of the transaction the restart
    ended is not (OCPP 1.6 3.13: it belongs to that transaction)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        now = datetime.now(UTC)
        cp_max = profile(
            1, purpose="ChargePointMaxProfile", kind="Absolute", start=now, periods=((0, 14.0),)
        )
        assert set_profile(csms, 0, cp_max) == {"status": "Accepted"}
        assert set_profile(csms, 1, profile(2, periods=((0, 12.0),))) == {"status": "Accepted"}
        start = charging_at(csms, st, 12.0)
        tx = profile(
            3,
            purpose="TxProfile",
            stack=1,
            periods=((0, 8.0),),
            transactionId=start["response"]["payload"]["transactionId"],
        )
        assert set_profile(csms, 1, tx) == {"status": "Accepted"}
        board_gets(st, 8.0, utc(start["time"]))
        assert periods(composite(csms, 1, 60)) == [(0, 8.0)]
        assert st.stop()[0] == 0
    rows = _profile_rows(tmp_path / "station.sqlite")
    assert rows == [(1, 0, "ChargePointMaxProfile"), (2, 1, "TxDefaultProfile")]
    with station(csms, tmp_path) as st:
        booted(csms, 2)
        # No transaction: ChargePointMax alone (the Relative TxDefault counts from a
        # transaction's start); the TxProfile is gone.
        assert periods(composite(csms, 1, 60)) == [(0, 14.0)]
        answer = call_result(csms, CP, "ClearChargingProfile", {"id": 3})
        assert answer == {"status": "Unknown"}
        # A new transaction: the restored TxDefault (12 A) under ChargePointMax (14 A).
        charging_at(csms, st, 12.0, since=messages(csms, CP)[-1]["seq"])
        assert periods(composite(csms, 1, 60)) == [(0, 12.0)]
        assert periods(composite(csms, 0, 60)) == [(0, 12.0)]


def test_offline_a_tx_profile_keeps_applying_a_tx_default_gives_way_to_the_fallback(
    csms: Csms, tmp_path: Path
) -> None:
    """The offline precedence (evse/limits.py): with the central system unreachable,
    a TxDefault above the fallback limit (6 A here) no longer lifts the offer
    above it; a TxProfile of the running transaction keeps applying for the rest
    of the transaction, instead of the fallback."""
    with station(csms, tmp_path) as st:
        booted(csms)
        assert set_profile(csms, 1, profile(1, periods=((0, 12.0),))) == {"status": "Accepted"}
        start = charging_at(csms, st, 12.0)
        configure(csms, refuse_for=4)
        lost = datetime.now(UTC)
        disconnect(csms, CP, abort=True)
        board_gets(st, FALLBACK, lost, within=15)  # offline: the fallback binds
        booted(csms, 2, within=30)
        board_gets(st, 12.0, lost, within=15)  # online again: the TxDefault
        tx_id = start["response"]["payload"]["transactionId"]
        tx = profile(2, purpose="TxProfile", stack=1, periods=((0, 10.0),), transactionId=tx_id)
        assert set_profile(csms, 1, tx) == {"status": "Accepted"}
        board_gets(st, 10.0, lost, within=5)
        configure(csms, refuse_for=6)
        lost = datetime.now(UTC)
        disconnect(csms, CP, abort=True)
        until(lambda: st.status()["central_system"]["state"] == "offline", 10, "station offline")
        time.sleep(1.0)
        assert [a for at, a in board_writes(st) if at >= lost] in ([], [10.0])
        assert st.status()["limit"] == {"amps": 10.0, "bound_by": "smart_charging"}


def charging_at(csms: Csms, st: StationProcess, amps: float, since: int = 0) -> dict[str, Any]:
    """Plug in, present the tag; the StartTransaction once the board has ``amps``."""
    st.plug()
    st.present()
    start = wait_for(csms, CP, "StartTransaction", since=since)
    st.wait_status("Charging")
    board_gets(st, amps, utc(start["time"]) - timedelta(seconds=5))
    return start


def _profile_rows(db: Path) -> list[tuple[int, int, str]]:
    conn = sqlite3.connect(db)
    try:
        return [
            (int(a), int(b), str(c))
            for a, b, c in conn.execute(
                "SELECT charging_profile_id, connector_id, purpose FROM ocpp_charging_profiles"
                " ORDER BY charging_profile_id"
            )
        ]
    finally:
        conn.close()


# -- the OCA compliance test cases (OCTT 1.6, Smart Charging) ------------------------------------


def test_tc_056_central_smart_charging_tx_default_profile(csms: Csms, tmp_path: Path) -> None:
    """TC_056_CS, Central Smart Charging - TxDefaultProfile: the central system sets a
    TxDefaultProfile on connector 0 (every connector) before any transaction; the
    charge point answers Accepted, and the transaction started afterwards is
    charged within the profile's limit (the offer on the board, and the composite
    schedule the central system can read back)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        answer = set_profile(csms, 0, profile(1, stack=0, periods=((0, 10.0),)))
        assert answer == {"status": "Accepted"}
        start = charging_at(csms, st, 10.0)
        # Never more than the profile once the transaction runs.
        after = [a for at, a in board_writes(st) if at >= utc(start["time"])]
        assert after and max(after) == 10.0
        assert periods(composite(csms, 1, 300)) == [(0, 10.0)]


def test_tc_057_central_smart_charging_tx_profile(csms: Csms, tmp_path: Path) -> None:
    """TC_057_CS, Central Smart Charging - TxProfile: with a transaction running the
    central system sends a TxProfile for it (connectorId 1, its transactionId);
    Accepted, and the charge point limits the transaction to it. Also the
    negative halves (TC_058_CS, no ongoing transaction): a TxProfile without a
    transaction on the connector, or for another transactionId, is Rejected."""
    with station(csms, tmp_path) as st:
        booted(csms)
        tx = profile(7, purpose="TxProfile", stack=1, periods=((0, 6.0),))
        assert set_profile(csms, 1, tx) == {"status": "Rejected"}  # nothing running
        start = charging(csms, st)
        tx_id = start["response"]["payload"]["transactionId"]
        wrong = tx | {"transactionId": tx_id + 1}
        assert set_profile(csms, 1, wrong) == {"status": "Rejected"}
        assert command_now(st) == INSTALLER_MAX
        right = tx | {"transactionId": tx_id}
        assert set_profile(csms, 1, right) == {"status": "Accepted"}
        answered = utc(last_result(csms, "SetChargingProfile")["time"])
        written = board_gets(st, 6.0, answered - timedelta(seconds=1))
        assert (written - answered).total_seconds() < LATENCY_BUDGET
        st.present()  # the session ends: so does its TxProfile
        wait_for(csms, CP, "StopTransaction")
        assert call_result(csms, CP, "ClearChargingProfile", {"id": 7}) == {"status": "Unknown"}


def test_tc_059_remote_start_transaction_with_charging_profile(csms: Csms, tmp_path: Path) -> None:
    """TC_059_CS, Remote Start Transaction with Charging Profile: RemoteStartTransaction
    carries a TxProfile (connectorId 1); the charge point answers Accepted,
    authorizes the tag (AuthorizeRemoteTxRequests), starts the transaction and
    charges it within the TxProfile from its first ampere: the board never gets
    more than the profile's 7 A during that transaction."""
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        tx = profile(11, purpose="TxProfile", stack=2, periods=((0, 7.0),))
        answer = call_result(
            csms,
            CP,
            "RemoteStartTransaction",
            {"idTag": "REMOTE01", "connectorId": 1, "chargingProfile": tx},
        )
        assert answer == {"status": "Accepted"}
        answered = utc(last_result(csms, "RemoteStartTransaction")["time"])
        wait_for(csms, CP, "Authorize")
        start = wait_for(csms, CP, "StartTransaction")
        assert start["payload"]["idTag"] == "REMOTE01"
        st.wait_status("Charging")
        board_gets(st, 7.0, answered)
        # The first current of the transaction is the TxProfile's, and no more after.
        offered = [a for at, a in board_writes(st) if at >= answered and a > 0]
        assert offered[0] == 7.0 and max(offered) == 7.0
        assert periods(composite(csms, 1, 120)) == [(0, 7.0)]
        # The TxProfile is bound to that transaction.
        tx_id = start["response"]["payload"]["transactionId"]
        stop = call_result(csms, CP, "RemoteStopTransaction", {"transactionId": tx_id})
        assert stop == {"status": "Accepted"}
        wait_for(csms, CP, "StopTransaction")
        assert call_result(csms, CP, "ClearChargingProfile", {"id": 11}) == {"status": "Unknown"}


def test_tc_060_remote_start_transaction_with_a_tx_default_profile_is_rejected(
    csms: Csms, tmp_path: Path
) -> None:
    """TC_060_CS, Remote Start Transaction with Charging Profile - Rejected: the
    chargingProfile of a RemoteStartTransaction has purpose TxDefaultProfile (5.11:
    it SHALL be a TxProfile); the charge point answers Rejected, starts nothing
    (no Authorize, no StartTransaction) and installs no profile."""
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        default = profile(12, purpose="TxDefaultProfile", periods=((0, 7.0),))
        answer = call_result(
            csms,
            CP,
            "RemoteStartTransaction",
            {"idTag": "REMOTE01", "connectorId": 1, "chargingProfile": default},
        )
        assert answer == {"status": "Rejected"}
        time.sleep(1.0)
        assert calls(csms, "Authorize") == [] and calls(csms, "StartTransaction") == []
        assert st.status()["status"] == "Preparing"
        assert call_result(csms, CP, "ClearChargingProfile", {"id": 12}) == {"status": "Unknown"}


def test_tc_066_get_composite_schedule(csms: Csms, tmp_path: Path) -> None:
    """TC_066_CS, Get Composite Schedule: with a ChargePointMaxProfile and a
    TxDefaultProfile installed, GetCompositeSchedule (connectorId 1, duration,
    chargingRateUnit A) is Accepted with the combined schedule from the moment
    of the request: scheduleStart, duration, unit A, the lower of the two
    profiles in each period. An unknown connector is Rejected."""
    with station(csms, tmp_path):
        booted(csms)
        now = datetime.now(UTC).replace(microsecond=0)
        cp_max = profile(
            1, purpose="ChargePointMaxProfile", kind="Absolute", start=now, periods=((0, 13.0),)
        )
        assert set_profile(csms, 0, cp_max) == {"status": "Accepted"}
        default = profile(
            2, kind="Absolute", start=now, periods=((0, 6.0), (300, 16.0)), duration=900
        )
        assert set_profile(csms, 1, default) == {"status": "Accepted"}
        asked = datetime.now(UTC)
        answer = composite(csms, 1, 600)
        assert answer["status"] == "Accepted" and answer["connectorId"] == 1
        start = utc(answer["scheduleStart"])
        assert abs((start - asked).total_seconds()) < 2
        schedule = answer["chargingSchedule"]
        assert schedule["duration"] == 600 and schedule["chargingRateUnit"] == "A"
        boundary = int((now + timedelta(seconds=300) - start).total_seconds())
        assert periods(answer) == [(0, 6.0), (boundary, 13.0)]
        assert call_result(
            csms, CP, "GetCompositeSchedule", {"connectorId": 7, "duration": 60}
        ) == {"status": "Rejected"}


def test_tc_067_clear_charging_profile(csms: Csms, tmp_path: Path) -> None:
    """TC_067_CS, Clear Charging Profile: a TxDefaultProfile in force during a
    transaction is cleared by its id (Accepted) and the charge point stops
    applying it (the board returns to the station's own maximum); clearing it
    again, or what matches nothing, is Unknown; no field at all clears every
    profile."""
    with station(csms, tmp_path) as st:
        booted(csms)
        assert set_profile(csms, 1, profile(5, periods=((0, 9.0),))) == {"status": "Accepted"}
        station_wide = profile(6, stack=1, periods=((0, 11.0),), duration=86_400)
        assert set_profile(csms, 0, station_wide) == {"status": "Accepted"}
        start = charging_at(csms, st, 9.0)  # connector 1's own default wins over connector 0's
        answer = call_result(csms, CP, "ClearChargingProfile", {"id": 5})
        assert answer == {"status": "Accepted"}
        board_gets(st, 11.0, utc(start["time"]))
        answer = call_result(csms, CP, "ClearChargingProfile", {"id": 5})
        assert answer == {"status": "Unknown"}
        answer = call_result(
            csms, CP, "ClearChargingProfile", {"chargingProfilePurpose": "TxProfile"}
        )
        assert answer == {"status": "Unknown"}
        assert call_result(csms, CP, "ClearChargingProfile", {}) == {"status": "Accepted"}
        board_gets(st, INSTALLER_MAX, utc(start["time"]))


def test_tc_072_stacking_charging_profiles(csms: Csms, tmp_path: Path) -> None:
    """TC_072_CS, Stacking Charging Profiles: two TxDefaultProfiles on the same
    connector, stackLevel 0 (12 A, no end) and stackLevel 1 (8 A for 5 s). The
    higher level applies while its schedule runs, then the lower one takes over:
    the composite schedule says so, and the board follows (8 A, then 12 A at the
    end of level 1's duration)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        start = charging(csms, st)
        now = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        low = profile(21, stack=0, kind="Absolute", start=now, periods=((0, 12.0),))
        high = profile(22, stack=1, kind="Absolute", start=now, periods=((0, 8.0),), duration=5)
        assert set_profile(csms, 1, low) == {"status": "Accepted"}
        assert set_profile(csms, 1, high) == {"status": "Accepted"}
        answer = composite(csms, 1, 60)
        # Both schedules start at ``now``: before it, the station's own 16 A.
        offset = int((now - utc(answer["scheduleStart"])).total_seconds())
        if offset > 0:
            assert periods(answer) == [(0, INSTALLER_MAX), (offset, 8.0), (offset + 5, 12.0)]
        else:
            assert periods(answer) == [(0, 8.0), (offset + 5, 12.0)]
        board_gets(st, 8.0, utc(start["time"]), within=10)
        twelve = board_gets(st, 12.0, now, within=15)
        end = now + timedelta(seconds=5)
        assert end - timedelta(seconds=0.05) <= twelve < end + timedelta(seconds=1)
