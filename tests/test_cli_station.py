"""The operator's commands against a running station (``evse run --sim``, a process of its own):
status for people and ``--watch``, authorize, stop, transactions, queue with its dead letters,
and the PowerLoss transaction a restart after kill -9 recovered (issue 9)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sim_control import control

pytestmark = pytest.mark.slow

ENERGY = r"\d+\.\d Wh|\d+\.\d{3} kWh"


def evse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err.rstrip("\n")


class SimStation:
    """``evse run --sim --data-dir DIR``: the simulator and the station in one process."""

    def __init__(self, data_dir: Path, lock_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", "--sim", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "error", "EVSE_LOCK_DIR": str(lock_dir)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"evse run --sim did not start: {self.proc.communicate()[1]}")
        self.ready: dict[str, Any] = json.loads(line)["ready"]
        self.socket = self.ready["control_socket"]
        self.sim = self.ready["simulator"]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return evse(*args, "--socket", self.socket)

    def view(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        view: dict[str, Any] = json.loads(result.stdout)
        return view

    def wait(
        self,
        status: str,
        within: float = 20.0,
        until: Callable[[dict[str, Any]], object] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            result = self.cli("status", "--json")
            if result.returncode == 0:
                last = json.loads(result.stdout)
                if last.get("status") == status and (until is None or until(last)):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"never {status}: {last}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err


@pytest.fixture
def stations(tmp_path: Path) -> Iterator[list[SimStation]]:
    started: list[SimStation] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
        s.proc.communicate()


def start(stations: list[SimStation], data_dir: Path) -> SimStation:
    data_dir.mkdir(exist_ok=True)
    station = SimStation(data_dir, data_dir.parent)
    stations.append(station)
    return station


def test_authorize_charge_watch_stop_and_list_without_curl(
    tmp_path: Path, stations: list[SimStation]
) -> None:
    station = start(stations, tmp_path / "data")
    station.wait("Available")
    result = station.cli("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("connector 1: Available since ")
    assert lines[1] == "  pilot A, offered 0.0 A (limit 16.0 A, set by the installer's maximum)"
    assert "  central system: disabled: no central system configured" in lines
    assert "  queue: 0 messages waiting, 0 dead letters" in lines
    assert "{" not in result.stdout

    # A tag no one knows: refused in one line, exit 1, nothing starts.
    control(station.sim, "POST", "/plug", {"phases": 3})
    station.wait("Preparing")
    result = station.cli("authorize", "NOBODY")
    assert result.returncode == 1
    assert (
        one_line(result.stderr)
        == "evse authorize: error: id tag NOBODY not accepted: Invalid (none)"
    )
    # The installer's tag, written as a person would: normalized, accepted.
    result = station.cli("authorize", "04a2b3c4")
    assert (result.returncode, result.stdout) == (0, "id tag 04A2B3C4: Accepted (local)\n")
    view = station.wait("Charging")
    tx_id = view["transaction"]["id"]
    # Charging is reported before the meter's next poll shows the current flowing
    # (the meter is polled once a second): wait for that reading, not for luck.
    station.wait(
        "Charging",
        until=lambda v: (
            v.get("power_w")
            and [round(a, 1) for a in v.get("current_a") or []] == [16.0, 16.0, 16.0]
        ),
    )

    result = station.cli("status")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "  pilot C, offered 16.0 A (limit 16.0 A, set by the installer's maximum)" in text
    assert re.search(r"^  power \d+\.\d\d kW, current 16\.0 / 16\.0 / 16\.0 A, meter ", text, re.M)
    assert re.search(
        rf"^  transaction {tx_id} for 04A2B3C4 since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
        rf"\([^)]* ago\): ({ENERGY})$",
        text,
        re.M,
    ), text
    assert "queue: 1 message waiting" in text

    # --watch redraws until Ctrl-C, then exits 0 without a traceback.
    watch = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "status", "--watch", "0.2", "--socket", station.socket],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        time.sleep(2.0)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err
    assert err == ""
    frames = out.count("evse status, every 0.2 s (Ctrl-C to stop)")
    assert frames >= 3, out
    assert out.count("connector 1: Charging") == frames

    result = station.cli("transactions")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == [
        *("id", "id", "tag", "started", "(UTC)", "ended", "(UTC)", "energy", "reason")
    ]
    assert re.fullmatch(
        rf"\s*{tx_id}  04A2B3C4  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d  running\s+({ENERGY})", row
    ), row

    result = station.cli("stop", "--reason", "EmergencyStop")
    assert (result.returncode, result.stdout) == (
        0,
        f"transaction {tx_id} stopped (EmergencyStop); the current is off\n",
    )
    station.wait("Finishing")
    result = station.cli("stop")
    assert result.returncode == 1
    assert one_line(result.stderr) == "evse stop: error: no transaction is running; nothing stopped"

    result = station.cli("transactions", "--json")
    (record,) = json.loads(result.stdout)["transactions"]
    assert record["stop_reason"] == "EmergencyStop"
    assert record["energy_wh"] == pytest.approx(record["meter_stop_wh"] - record["meter_start_wh"])
    assert record["energy_wh"] > 0

    # No central system: both messages wait, shown as a table.
    result = station.cli("queue")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == [
        "waiting for the central system (2, oldest first):",
        "seq  action            transaction  attempts  last error",
        f"  1  StartTransaction  {tx_id:>11}         0",
        f"  2  StopTransaction   {tx_id:>11}         0",
    ]
    assert result.stdout.splitlines()[4] == "no dead letters"
    station.terminate()


def test_a_recovered_power_loss_and_dead_letters_show_in_status_and_queue(
    tmp_path: Path, stations: list[SimStation]
) -> None:
    from ocpp16.queue import TransactionQueue  # noqa: PLC0415

    data = tmp_path / "data"
    first = start(stations, data)
    first.wait("Available")
    control(first.sim, "POST", "/plug")
    first.wait("Preparing")
    assert first.cli("authorize", "DEMOTAG1").returncode == 0
    tx_id = first.wait("Charging")["transaction"]["id"]
    first.proc.kill()  # SIGKILL: the transaction stays "running" on disk
    first.proc.communicate()

    second = start(stations, data)
    view = second.wait("Available")
    (recovered,) = view["recovered"]
    assert (recovered["id"], recovered["id_tag"], recovered["stop_reason"]) == (
        tx_id,
        "DEMOTAG1",
        "PowerLoss",
    )
    result = second.cli("status")
    assert re.search(
        rf"^  recovered at start: transaction {tx_id} for DEMOTAG1, started \S+ \S+ UTC, "
        rf"ended PowerLoss at \S+ \S+ UTC: ({ENERGY})$",
        result.stdout,
        re.M,
    ), result.stdout
    second.terminate()

    # The central system refused the StartTransaction for good: it and its
    # transaction's StopTransaction are dead letters.
    with TransactionQueue.open(data / "station.sqlite") as queue:
        (start_msg, _) = queue.pending()
        assert queue.failed(start_msg.seq, "CALLERROR InternalError: no", max_attempts=1)
    # No station running: read from the store.
    result = evse("queue", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "no messages waiting"
    assert lines[1] == "dead letters (2, given up):"
    assert lines[2].split() == [
        *("seq", "action", "transaction", "attempts", "given", "up", "(UTC)", "reason")
    ]
    assert re.match(
        rf"\s+1  StartTransaction\s+{tx_id}\s+1  \S+ \S+  CALLERROR InternalError", lines[3]
    )

    third = start(stations, data)
    third.wait("Available")
    result = third.cli("status")
    assert "  queue: 0 messages waiting, 2 dead letters (evse queue lists them)" in result.stdout
    # This start found nothing running: no recovered line any more.
    assert "recovered" not in result.stdout
    assert third.cli("queue").stdout == result_queue_offline(lines)
    # A watch outlives the station it watches (a restart): it says so and asks again.
    watch = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "status", "--watch", "0.2", "--socket", third.socket],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        time.sleep(1.0)
        third.terminate()
        time.sleep(1.0)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert (watch.returncode, err) == (0, "")
    assert "connector 1: Available" in out
    assert f"evse status: no station at {third.socket} (" in out
    assert out.rstrip().endswith("asking again every 0.2 s"), out[-300:]


def result_queue_offline(lines: list[str]) -> str:
    """The same table through the socket as from the store."""
    return "\n".join(lines) + "\n"
