"""Signals to a real ``evse run``: the first starts the orderly stop, the rest never break it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ops.control import query
from tests.conftest import SimFactory
from tests.sim_control import control

pytestmark = pytest.mark.slow

CONFIG = """\
[station]
serial = "SIG-0001"
data_dir = "{data_dir}"

[limits]
installer_max = 16

[board]
kind = "evse-din"
port = "{port}"
unit = 1
timeout = 0.3

[meter]
kind = "sdm630"
port = "{port}"
unit = 2
poll_interval = 0.5
timeout = 0.3

[authorization]
tags = ["04A2B3C4"]

[safety]
power_status_file = "{power_status}"
"""


@pytest.fixture
def station(tmp_path: Path, sim_process: SimFactory) -> Iterator[tuple[Any, Any]]:
    ready = sim_process("evse-din:1", "sdm630:2")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "evse.toml"
    config.write_text(
        CONFIG.format(data_dir=data_dir, port=ready["tcp"], power_status=tmp_path / "powerstatus")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EVSE_LOCK_DIR": str(tmp_path), "PYTHONWARNINGS": "error"},
    )
    try:
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def ask(socket: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return trio.run(query, str(socket), method, path, body)


def wait_status(proc: subprocess.Popen[str], socket: Path, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"station exited {proc.returncode}: {proc.communicate()[1]}")
        try:
            view = ask(socket, "GET", "/status")
        except OSError:
            view = {}
        if view.get("status") == status:
            return view
        time.sleep(0.05)
    raise AssertionError(f"never {status}: {json.dumps(view)[:300]}")


@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGINT),
        (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGTERM),
    ],
    ids=["term-term-int-int", "int-int-term-term"],
)
def test_later_signals_never_interrupt_the_orderly_stop(
    tmp_path: Path, station: tuple[subprocess.Popen[str], Any], signals: tuple[int, ...]
) -> None:
    proc, ready = station
    socket = tmp_path / "data" / "control.sock"
    wait_status(proc, socket, "Available")
    control(ready, "POST", "/plug", {"phases": 3})
    wait_status(proc, socket, "Preparing")
    assert ask(socket, "POST", "/authorize", {"id_tag": "04A2B3C4"})["status"] == "Accepted"
    assert wait_status(proc, socket, "Charging")["offered_a"] == 16.0
    since = control(ready, "GET", "/events")["events"][-1]["seq"]

    # Four signals in quick succession: the later ones land in the orderly
    # stop and the shielded switch-off.
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.005)
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    assert "already stopping" in err
    # The off-write reached the board, then the disable (EVSE DIN 1004 bit 0).
    writes = [
        e["fields"]
        for e in control(ready, "GET", f"/events?since={since}")["events"]
        if e["event"] == "write"
    ]
    assert {"command": 0.0} in writes
    assert writes[-1] == {"enable": 1.0}
    state = control(ready, "GET", "/state")["station"]
    assert state["board"]["command"] == 0.0
    assert state["contactor_closed"] is False
    conn = sqlite3.connect(tmp_path / "data" / "station.sqlite")
    try:
        rows = conn.execute("SELECT stop_reason, stopped_at FROM transactions").fetchall()
    finally:
        conn.close()
    assert len(rows) == 1
    assert rows[0][0] == "Reboot"
    assert rows[0][1] is not None


def test_tc_032_1_sigpwr_stops_the_transaction_with_power_loss_and_keeps_running(
    tmp_path: Path, station: tuple[subprocess.Popen[str], Any]
) -> None:
    """TC_032_1 (a station on backup power): a UPS daemon's SIGPWR with the power
    status file at F: the transaction ends with PowerLoss at once, the board is off,
    the station stays up (Finishing, 0 A offered); SIGPWR with O: mains back."""
    proc, ready = station
    socket = tmp_path / "data" / "control.sock"
    status_file = tmp_path / "powerstatus"
    wait_status(proc, socket, "Available")
    control(ready, "POST", "/plug", {"phases": 3})
    wait_status(proc, socket, "Preparing")
    assert ask(socket, "POST", "/authorize", {"id_tag": "04A2B3C4"})["status"] == "Accepted"
    wait_status(proc, socket, "Charging")
    status_file.write_text("F\n")
    proc.send_signal(signal.SIGPWR)
    wait_status(proc, socket, "Finishing")
    deadline = time.monotonic() + 2  # the offer is recomputed right after the stop
    while not ask(socket, "GET", "/status")["limit"]["bound_by"].startswith("mains lost"):
        assert time.monotonic() < deadline, "the offer is not bound by mains lost"
        time.sleep(0.02)
    deadline = time.monotonic() + 2
    while control(ready, "GET", "/state")["station"]["board"]["command"] != 0.0:
        assert time.monotonic() < deadline, "the board still offers current"
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while time.monotonic() < deadline and not rows:
        conn = sqlite3.connect(tmp_path / "data" / "station.sqlite")
        try:
            rows = conn.execute(
                "SELECT stop_reason FROM transactions WHERE stop_reason IS NOT NULL"
            ).fetchall()
        finally:
            conn.close()
        time.sleep(0.05)
    assert rows == [("PowerLoss",)]
    status_file.write_text("O\n")
    proc.send_signal(signal.SIGPWR)
    deadline = time.monotonic() + 10
    while "mains" in ask(socket, "GET", "/status")["limit"]["bound_by"]:
        assert time.monotonic() < deadline, "mains never back"
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "mains power lost" in err and "mains power back" in err
