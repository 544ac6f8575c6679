"""``evse status``, ``transactions`` and ``queue`` for people: units, rounding, words, tables;
and the station commands' one-line errors when no station runs (issue 9)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ops.cli import (
    central_system_in_words,
    energy,
    format_queue,
    format_status,
    format_transactions,
    limit_in_words,
    main,
)

NOW = datetime(2026, 12, 2, 7, 12, 9, tzinfo=UTC)

#: A charging station's GET /status, as ops/control.py answers it (trimmed of the
#: board and meter blocks, which the summary does not read).
CHARGING: dict[str, Any] = {
    "connector": 1,
    "state": "charging",
    "status": "Charging",
    "error_code": "NoError",
    "faults": {},
    "status_since": "2026-12-02T07:10:04.152003Z",
    "pilot": "C",
    "offered_a": 16.0,
    "limit": {"amps": 32.0, "bound_by": "installer"},
    "power_w": 11040.123456,
    "energy_wh": 1234567.891,
    "current_a": [16.00001, 15.98, 16.0],
    "operative": True,
    "lock": None,
    "central_system": {
        "state": "online",
        "link": "connected",
        "reason": "",
        "registration": "registered",
        "address": "ws://127.0.0.1:9000/ocpp/",
        "charge_point_id": "CP-1",
        "security_profile": 0,
        "queued_messages": 1,
    },
    "transaction": {
        "id": 3,
        "id_tag": "04A2B3C4",
        "started_at": "2026-12-02T07:10:04.100000Z",
        "meter_start_wh": 1234563.79,
        "energy_wh": 4.10059979185462,
    },
    "recovered": [
        {
            "id": 2,
            "id_tag": "DEMOTAG1",
            "started_at": "2026-12-01T22:00:00.000000Z",
            "stopped_at": "2026-12-02T07:09:58.500000Z",
            "stop_reason": "PowerLoss",
            "meter_start_wh": 1224563.79,
            "meter_stop_wh": 1234563.79,
            "energy_wh": 10000.0,
        }
    ],
    "recovered_transactions": [2],
    "queue": {"pending": 1, "dead_letters": 2},
    "transfers": [],
    "rfid_reader": None,
    "version": "0.1.0",
}


def test_status_reads_as_units_and_words_not_python() -> None:
    assert format_status(CHARGING, now=NOW) == "\n".join(
        [
            "connector 1: Charging since 2026-12-02 07:10:04 UTC (2 min 04 s ago)",
            "  pilot C, offered 16.0 A (limit 32.0 A, set by the installer's maximum)",
            "  power 11.04 kW, current 16.0 / 16.0 / 16.0 A, meter 1234.568 kWh",
            "  transaction 3 for 04A2B3C4 since 2026-12-02 07:10:04 UTC (2 min 04 s ago): 4.1 Wh",
            "  recovered at start: transaction 2 for DEMOTAG1, started 2026-12-01 22:00:00 UTC,"
            " ended PowerLoss at 2026-12-02 07:09:58 UTC: 10.000 kWh",
            "  central system: connected, registered (ws://127.0.0.1:9000/ocpp/CP-1)",
            "  queue: 1 message waiting, 2 dead letters (evse queue lists them)",
            "  operative: yes",
        ]
    )


def test_the_issues_examples_are_gone() -> None:
    """`limit {'amps': 32.0, 'bound_by': 'installer'}` and `4.10059979185462 Wh`."""
    text = format_status(CHARGING, now=NOW)
    assert "{" not in text and "'amps'" not in text
    assert "4.10059979185462" not in text and "4.1 Wh" in text


@pytest.mark.parametrize(
    ("wh", "text"),
    [
        (0.0, "0.0 Wh"),
        (4.10059979185462, "4.1 Wh"),
        (999.94, "999.9 Wh"),
        (1000.0, "1.000 kWh"),
        (12345.6789, "12.346 kWh"),
        (None, "unknown"),
    ],
)
def test_energy_has_fixed_decimals(wh: float | None, text: str) -> None:
    assert energy(wh) == text


@pytest.mark.parametrize(
    ("limit", "text"),
    [
        ({"amps": 16.0, "bound_by": "hardware"}, "16.0 A, set by the board's maximum"),
        ({"amps": 13.0, "bound_by": "cable"}, "13.0 A, set by the cable's capacity"),
        (
            {"amps": 10.0, "bound_by": "smart_charging"},
            "10.0 A, set by the central system's charging profile",
        ),
        (
            {"amps": 8.0, "bound_by": "fallback"},
            "8.0 A, set by the fallback limit (the central system is unreachable)",
        ),
        (
            {"amps": 0.0, "bound_by": "fallback (below 6 A)"},
            "0 A: the fallback limit (the central system is unreachable) is below 6 A,"
            " the least a pilot can offer (no charging)",
        ),
        ({"amps": 0.0, "bound_by": "mains lost (below 6 A)"}, "0 A: mains power is lost"),
        ({"amps": 0.0, "bound_by": "starting"}, "0 A: the station is starting"),
        ({"amps": 0.0, "bound_by": "deauthorized"}, "0 A: the tag was deauthorized"),
        ({"amps": 20.0, "bound_by": "something new"}, "20.0 A, set by something new"),
    ],
)
def test_what_bounds_the_offer_in_words(limit: dict[str, Any], text: str) -> None:
    assert limit_in_words(limit) == text


@pytest.mark.parametrize(
    ("cs", "text"),
    [
        ({"state": "not_configured"}, "none (standalone)"),
        (
            {
                "state": "not_configured",
                "link": "disabled",
                "reason": "no central system configured",
            },
            "disabled: no central system configured",
        ),
        (
            {
                "state": "offline",
                "link": "disconnected",
                "reason": "TLS: certificate verify failed",
                "registration": "registered",
                "address": "wss://cs.example.com/ocpp/",
                "charge_point_id": "CP-9",
            },
            "disconnected: TLS: certificate verify failed (wss://cs.example.com/ocpp/CP-9)",
        ),
        (
            {
                "state": "offline",
                "link": "connected",
                "reason": "",
                "registration": "registration pending",
                "address": "ws://h/ocpp/",
                "charge_point_id": "A",
            },
            "connected, registration pending (ws://h/ocpp/A)",
        ),
    ],
)
def test_the_central_system_connection_with_its_reason(cs: dict[str, Any], text: str) -> None:
    assert central_system_in_words(cs) == text


def test_faults_transfers_reader_and_a_partial_view() -> None:
    view = {
        "connector": 1,
        "status": "Faulted",
        "error_code": "GroundFailure",
        "faults": {"rcd_trip": "the board reports an RCD trip"},
        "transfers": [
            {
                "name": "firmware download",
                "state": "running",
                "bytes": 1_500_000,
                "total": 12_000_000,
                "percent": 12.5,
                "rate_bps": 48_200.0,
                "reason": None,
            }
        ],
        "rfid_reader": {"status": "disconnected", "reason": "/dev/ttyUSB1: no such device"},
        "operative": False,
    }
    assert format_status(view, now=NOW).splitlines() == [
        "connector 1: Faulted (GroundFailure)",
        "  faults: rcd_trip (the board reports an RCD trip)",
        "  transfer firmware download: 1.5 MB of 12.0 MB (12 %), 48.2 kB/s",
        "  rfid reader: disconnected (/dev/ttyUSB1: no such device)",
        "  operative: no",
    ]


def test_transactions_are_a_table() -> None:
    records = [
        {
            "id": 12,
            "id_tag": "04A2B3C4",
            "started_at": "2026-12-02T07:10:04.1Z",
            "stopped_at": None,
            "energy_wh": 4.10059979185462,
            "stop_reason": None,
        },
        {
            "id": 9,
            "id_tag": "DEMOTAG1",
            "started_at": "2026-12-01T22:00:00Z",
            "stopped_at": "2026-12-02T07:09:58.5Z",
            "energy_wh": 10000.0,
            "stop_reason": "PowerLoss",
        },
    ]
    assert format_transactions(records).splitlines() == [
        "id  id tag    started (UTC)        ended (UTC)              energy  reason",
        "12  04A2B3C4  2026-12-02 07:10:04  running                  4.1 Wh",
        " 9  DEMOTAG1  2026-12-01 22:00:00  2026-12-02 07:09:58  10.000 kWh  PowerLoss",
    ]
    assert format_transactions([]) == "no transactions"


def test_the_queue_is_a_table() -> None:
    answer = {
        "pending": [
            {"seq": 7, "action": "MeterValues", "transaction": 3, "attempts": 2, "last_error": "x"}
        ],
        "dead_letters": [
            {
                "seq": 5,
                "action": "StartTransaction",
                "transaction": 2,
                "attempts": 3,
                "reason": "CALLERROR InternalError",
                "died_at": "2026-12-02T07:00:00Z",
                "payload": {},
            }
        ],
    }
    assert format_queue(answer).splitlines() == [
        "waiting for the central system (1, oldest first):",
        "seq  action       transaction  attempts  last error",
        "  7  MeterValues            3         2  x",
        "dead letters (1, given up):",
        "seq  action            transaction  attempts  given up (UTC)       reason",
        "  5  StartTransaction            2         3  2026-12-02 07:00:00"
        "  CALLERROR InternalError",
    ]
    assert format_queue({"pending": [], "dead_letters": []}) == (
        "no messages waiting\nno dead letters"
    )


# --- the station commands without a station: one line, exit 1 --------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--watch", "0.1"],
        ["authorize", "04A2B3C4"],
        ["stop"],
        ["stop", "--reason", "EmergencyStop"],
        ["transactions"],
        ["transactions", "--json"],
    ],
)
def test_no_station_is_one_line_and_exit_1(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = tmp_path / "control.sock"
    assert main([*args, "--socket", str(socket)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"evse {args[0]}: error: no station at {socket} (No such file or directory)\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["authorize", ""], "id tag '' is empty"),
        (["authorize", "X" * 21], "has 21 characters; OCPP allows at most 20"),
        (["stop", "--reason", "PowerLoss"], "invalid choice: 'PowerLoss'"),
        (["transactions", "--limit", "0"], "0 is outside 1..1000"),
        (["transactions", "--limit", "many"], "'many' is not a whole number"),
        (["status", "--watch", "0"], "'0' is not a positive number of seconds"),
        (["status", "--watch", "--json"], "not allowed with argument"),
        (["run", "--sim", "--log-format", "xml"], "log format 'xml' is not one of auto"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
