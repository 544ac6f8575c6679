"""``evse config get|set|list`` and ``evse queue``: one registry, station running or not."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evse.store import Store
from ocpp16.config import Configuration

pytestmark = pytest.mark.slow

KEY32 = "0123456789abcdef0123456789ABCDEF"


def evse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    Store.open(tmp_path / "station.sqlite").close()
    return tmp_path


def test_set_and_get_without_a_running_station(data_dir: Path) -> None:
    where = ("--data-dir", str(data_dir))
    assert evse("config", "get", "HeartbeatInterval", *where).stdout == "3600\n"
    result = evse("config", "set", "HeartbeatInterval", "120", *where)
    assert (result.returncode, result.stdout) == (0, "Accepted\n")
    # The installer name and the OCPP name are one value.
    result = evse("config", "set", "metering.interval", "60", *where)
    assert result.returncode == 0
    assert evse("config", "get", "MeterValueSampleInterval", *where).stdout == "60\n"
    result = evse("config", "set", "HeartbeatInterval", "5", *where)  # below 60
    assert result.returncode == 2
    assert "Rejected" in result.stderr
    assert evse("config", "get", "HeartbeatInterval", *where).stdout == "120\n"
    assert evse("config", "set", "NumberOfConnectors", "2", *where).returncode == 2
    assert evse("config", "set", "NoSuchKey", "2", *where).returncode == 2
    assert evse("config", "set", "security.access_key", KEY32, *where).returncode == 0
    listing = evse("config", "list", *where).stdout
    assert KEY32 not in listing
    assert evse("config", "get", "AuthorizationKey", *where).stdout.strip() == "set"


def test_set_refuses_a_fallback_above_the_station_maximum(data_dir: Path) -> None:
    # The station opened its registry with installer maximum 16 A (it keeps it);
    # evse config set without a running station refuses what the station would.
    with Store.open(data_dir / "station.sqlite") as store:
        Configuration(store, maxima={"FallbackLimit": 16.0})
    where = ("--data-dir", str(data_dir))
    result = evse("config", "set", "monitoring.fallback_limit", "20", *where)
    assert result.returncode == 2
    assert "Rejected" in result.stderr and "20 A is above 16 A" in result.stderr
    assert evse("config", "get", "FallbackLimit", *where).stdout == "6\n"
    result = evse("config", "set", "monitoring.fallback_limit", "16", *where)
    assert (result.returncode, result.stdout) == (0, "Accepted\n")


def test_set_on_a_running_station_goes_through_it(tmp_path: Path) -> None:
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
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())["ready"]
        socket = ready["control_socket"]
        deadline = time.monotonic() + 15
        while not Path(socket).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        result = evse("config", "set", "ConnectionTimeOut", "30", "--socket", socket)
        assert (result.returncode, result.stdout) == (0, "Accepted\n")
        assert evse("config", "get", "ConnectionTimeOut", "--socket", socket).stdout == "30\n"
        queue = json.loads(evse("queue", "--socket", socket, "--json").stdout)
        assert queue == {"pending": [], "dead_letters": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    # Stored in the station's file: visible without the station.
    assert evse("config", "get", "ConnectionTimeOut", "--data-dir", str(tmp_path)).stdout == "30\n"
