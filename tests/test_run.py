"""``evse run`` as a process: config file, SIGTERM, kill -9 and restart, status, exit codes."""

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

from tests.conftest import SimFactory
from tests.sim_control import control

pytestmark = pytest.mark.slow

CONFIG = """\
[station]
serial = "TEST-0001"
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
persist_interval = 1
"""


def write_config(tmp_path: Path, port: str) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    path = tmp_path / "evse.toml"
    path.write_text(CONFIG.format(data_dir=data_dir, port=port))
    return path


def evse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Station:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "EVSE_LOCK_DIR": str(config.parent)},
        )
        self.socket = config.parent / "data" / "control.sock"

    def status(self) -> dict[str, Any]:
        result = evse("status", "--socket", str(self.socket), "--json")
        assert result.returncode == 0, result.stderr
        view: dict[str, Any] = json.loads(result.stdout)
        return view

    def wait_status(self, status: str, within: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"station exited: {self.proc.communicate()[1]}")
            if self.socket.exists():
                try:
                    last = self.status()
                except AssertionError:
                    last = {}
                if last.get("status") == status:
                    return last
            time.sleep(0.1)
        raise AssertionError(f"station never reached {status}: {last}")

    def authorize(self, tag: str) -> None:
        import trio  # noqa: PLC0415

        from ops.control import query  # noqa: PLC0415

        result = trio.run(query, str(self.socket), "POST", "/authorize", {"id_tag": tag})
        assert result["status"] == "Accepted", result

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
def stations() -> Iterator[list[Station]]:
    started: list[Station] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_sigterm_switches_off_stops_with_reboot_and_exits_0(
    tmp_path: Path, sim_process: SimFactory, stations: list[Station]
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    station = Station(write_config(tmp_path, ready["tcp"]))
    stations.append(station)
    station.wait_status("Available")
    control(ready, "POST", "/plug")
    station.wait_status("Preparing")
    station.authorize("04A2B3C4")
    view = station.wait_status("Charging")
    assert view["offered_a"] == 16.0
    code, err = station.stop(signal.SIGTERM)
    assert code == 0, err
    writes = [e for e in control(ready, "GET", "/events")["events"] if e["event"] == "write"]
    # Off, then the board disabled (EVSE DIN 1004 bit 0 = turn off).
    assert writes[-2]["fields"] == {"command": 0.0}
    assert writes[-1]["fields"] == {"enable": 1.0}
    db = tmp_path / "data" / "station.sqlite"
    assert rows(db, "SELECT stop_reason FROM transactions") == [("Reboot",)]


def test_kill_9_then_restart_ends_the_transaction_with_power_loss(
    tmp_path: Path, sim_process: SimFactory, stations: list[Station]
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    config = write_config(tmp_path, ready["tcp"])
    db = tmp_path / "data" / "station.sqlite"
    station = Station(config)
    stations.append(station)
    station.wait_status("Available")
    control(ready, "POST", "/plug")
    station.wait_status("Preparing")
    station.authorize("04A2B3C4")
    station.wait_status("Charging")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ((start, last),) = rows(db, "SELECT meter_start_wh, last_meter_wh FROM transactions")
        if last > start:
            break
        time.sleep(0.2)
    station.proc.kill()  # SIGKILL: no shutdown code runs at all
    station.proc.communicate()
    ((last_wh, last_at, reason),) = rows(
        db, "SELECT last_meter_wh, last_meter_at, stop_reason FROM transactions"
    )
    assert reason is None
    assert last_wh > start
    since = control(ready, "GET", "/events")["events"][-1]["seq"]
    restarted = Station(config)
    stations.append(restarted)
    # The EV is still plugged in: Finishing, not Preparing (OCPP 1.6 4.9, issue 8).
    view = restarted.wait_status("Finishing")
    assert view["recovered_transactions"] == [1]
    ((reason, stop_wh, stopped_at),) = rows(
        db, "SELECT stop_reason, meter_stop_wh, stopped_at FROM transactions"
    )
    assert reason == "PowerLoss"
    # Ended with the meter's reading at restart: what the EV drew until the
    # restarted station's off-write belongs to this transaction (the EVSE DIN
    # has no failsafe: it went on charging while no process ran).
    state = control(ready, "GET", "/state")["station"]
    # (the meter's registers are float32: a rounding above the model's value)
    assert last_wh < stop_wh <= state["energy_wh"] + 1e-3
    assert stopped_at > last_at
    # The restarted station's first write was the off-write.
    writes = [
        e
        for e in control(ready, "GET", f"/events?since={since}")["events"]
        if e["event"] == "write"
    ]
    assert writes[0]["fields"] == {"command": 0.0}
    assert state["board"]["command"] == 0.0
    code, err = restarted.stop(signal.SIGINT)
    assert code == 0, err


def test_bad_config_is_one_line_with_file_key_reason_and_exit_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, "tcp://127.0.0.1:1502")
    path.write_text(path.read_text().replace("unit = 1\n", "unit = 300\n", 1))
    result = evse("run", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert f"{path}: board.unit:" in result.stderr
    assert "300" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_of_no_station_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = evse("status", "--socket", str(tmp_path / "nothing.sock"))
    assert result.returncode == 1
    assert "no station at" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_prints_a_summary(
    tmp_path: Path, sim_process: SimFactory, stations: list[Station]
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    station = Station(write_config(tmp_path, ready["tcp"]))
    stations.append(station)
    station.wait_status("Available")
    result = evse("status", "--config", str(station.config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("connector 1: Available")
    assert "pilot A" in result.stdout
    code, _ = station.stop()
    assert code == 0


def test_run_sim_starts_and_stops(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "run",
            "--sim",
            "--data-dir",
            str(tmp_path),
            "--sim-control-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())["ready"]
        assert ready["control_socket"] == str(tmp_path / "control.sock")
        assert ready["simulator"]["control"].startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 15
        while not Path(ready["control_socket"]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        result = evse("status", "--socket", ready["control_socket"], "--json")
        assert json.loads(result.stdout)["status"] == "Available"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_dead_process_leaves_a_heidelberg_board_in_its_failsafe(
    tmp_path: Path, sim_process: SimFactory, stations: list[Station]
) -> None:
    """Rule 1 for a process that cannot run its own shutdown: the hardware watchdog."""
    ready = sim_process("heidelberg:1", "sdm630:2")
    config = write_config(tmp_path, ready["tcp"])
    text = config.read_text().replace('kind = "evse-din"', 'kind = "heidelberg"')
    # Failsafe current = the fallback limit; below 6 A it means off.
    text = text.replace("installer_max = 16\n", "installer_max = 16\nfallback = 0\n")
    text = text.replace("timeout = 0.3\n", "timeout = 0.3\nfailsafe_watchdog = 1\n", 1)
    config.write_text(text)
    station = Station(config)
    stations.append(station)
    station.wait_status("Available")
    board = control(ready, "GET", "/state")["station"]["board"]
    assert (board["failsafe_timeout"], board["failsafe_current"]) == (1.0, 0.0)
    control(ready, "POST", "/plug")
    station.wait_status("Preparing")
    station.authorize("04A2B3C4")
    station.wait_status("Charging")
    assert control(ready, "GET", "/state")["station"]["offered_a"] == 16.0
    station.proc.kill()
    station.proc.communicate()
    time.sleep(1.5)
    state = control(ready, "GET", "/state")["station"]
    assert state["board"]["failsafe_tripped"] is True
    assert state["offered_a"] == 0.0
    assert state["contactor_closed"] is False
