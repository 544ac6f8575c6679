"""The settings model as an operator meets it: ``evse run`` and ``evse config`` as
processes, on the device simulator (``evse sim``) and real SQLite files.

The operator errors of issue 9, each failing on the code before: an edit of the
file after the first start was silently ignored; ``--id`` was stored for good;
``security.certificate /nonexistent.pem`` was accepted; ``evse config list``
had no units, ranges, sources or access and printed a secret as ``(hidden)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SimFactory

pytestmark = pytest.mark.slow

CONFIG = """\
[station]
serial = "TEST-0001"
data_dir = "{data_dir}"

[limits]
installer_max = 16
fallback = {fallback}

[board]
kind = "evse-din"
port = "{port}"
unit = 1
timeout = 0.3

[meter]
kind = "sdm630"
port = "{port}"
unit = 2
timeout = 0.3
"""

#: Waiting for a station process to come up (2 shared cores, other tests running).
START_WITHIN = 30.0


def evse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(tmp_path: Path, port: str, fallback: float) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    path = tmp_path / "evse.toml"
    path.write_text(CONFIG.format(data_dir=data_dir, port=port, fallback=fallback))
    return path


class Process:
    """``evse run ...`` until stopped; its standard error is kept."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def wait_socket(self, socket: Path) -> None:
        """Until the control socket answers (the station is running)."""
        deadline = time.monotonic() + START_WITHIN
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"station exited: {self.proc.communicate()[1]}")
            if socket.exists() and evse("status", "--socket", str(socket)).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"no station at {socket} within {START_WITHIN} s")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()


def test_a_file_edit_after_the_first_start_wins_and_is_logged(
    tmp_path: Path, sim_process: SimFactory, processes: list[Process]
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    config = write_config(tmp_path, ready["tcp"], fallback=6)
    socket = tmp_path / "data" / "control.sock"
    env = {"EVSE_LOCK_DIR": str(tmp_path)}
    first = Process("--config", str(config), env=env)
    processes.append(first)
    first.wait_socket(socket)
    # The installer changes it on the running station: it applies and is stored.
    result = evse("config", "set", "monitoring.fallback_limit", "10", "--socket", str(socket))
    assert (result.returncode, result.stdout) == (0, "Accepted\n"), result.stderr
    # A path setting is validated on the control socket's way too.
    refused = evse(
        "config", "set", "security.certificate", "/nonexistent.pem", "--socket", str(socket)
    )
    assert refused.returncode == 2 and "no such file" in refused.stderr
    first.stop()
    # Unchanged file: the change made at run time stays.
    second = Process("--config", str(config), env=env)
    processes.append(second)
    second.wait_socket(socket)
    assert evse("config", "get", "FallbackLimit", "--socket", str(socket)).stdout == "10\n"
    second.stop()
    # The installer edits the file: it wins at the next start, and says so.
    write_config(tmp_path, ready["tcp"], fallback=8)
    third = Process("--config", str(config), env=env)
    processes.append(third)
    third.wait_socket(socket)
    assert evse("config", "get", "FallbackLimit", "--socket", str(socket)).stdout == "8\n"
    err = third.stop()
    line = next(line for line in err.splitlines() if "limits.fallback changed" in line)
    assert "'6'" in line and "'8'" in line and "FallbackLimit '10' -> '8'" in line


def test_run_sim_id_and_csms_url_are_for_that_run_only(
    tmp_path: Path, processes: list[Process]
) -> None:
    station = Process(
        "--sim",
        "--sim-control-port",
        "0",
        "--data-dir",
        str(tmp_path),
        "--id",
        "CP-X",
        "--csms-url",
        "ws://127.0.0.1:9/ocpp/",
    )
    processes.append(station)
    assert station.proc.stdout is not None
    ready = json.loads(station.proc.stdout.readline())["ready"]
    socket = Path(ready["control_socket"])
    station.wait_socket(socket)
    # In force while it runs...
    assert evse("config", "get", "ChargePointId", "--socket", str(socket)).stdout == "CP-X\n"
    station.stop()
    # ...and not stored: the station's own id (station.id of the built-in
    # configuration) and no central system, as before the run.
    where = ("--data-dir", str(tmp_path))
    assert evse("config", "get", "ChargePointId", *where).stdout == "CP-1\n"
    assert evse("config", "get", "CentralSystemAddress", *where).stdout == "\n"


def test_evse_config_set_refuses_a_missing_certificate(tmp_path: Path) -> None:
    where = ("--data-dir", str(tmp_path))
    result = evse("config", "set", "security.certificate", "/nonexistent.pem", *where)
    assert result.returncode == 2
    assert "Rejected" in result.stderr and "/nonexistent.pem: no such file" in result.stderr
    assert evse("config", "get", "security.certificate", *where).stdout == "\n"


def test_evse_config_list_shows_units_ranges_source_and_access(tmp_path: Path) -> None:
    config = write_config(tmp_path, "tcp://127.0.0.1:1", fallback=6)
    key = "0123456789abcdef0123456789ABCDEF"
    assert (
        evse("config", "set", "security.access_key", key, "--config", str(config)).returncode == 0
    )
    result = evse("config", "list", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ["NAME", "VALUE", "UNIT", "SOURCE", "ACCESS", "RANGE"]
    assert header in [line.split() for line in lines]
    fallback = next(line for line in lines if line.startswith("monitoring.fallback_limit "))
    assert fallback.split()[:4] == ["monitoring.fallback_limit", "6", "A", "file"]
    assert "0..16 A" in fallback
    board = next(line for line in lines if line.startswith("board.kind "))
    assert board.split()[1:4] == ["evse-din", "file", "read-only"]
    secret = next(line for line in lines if line.startswith("security.access_key "))
    assert secret.split()[1] == "set" and key not in result.stdout
    assert "(hidden)" not in result.stdout and "AuthorizationKey" not in result.stdout


def test_evse_config_set_refuses_a_file_setting(tmp_path: Path) -> None:
    config = write_config(tmp_path, "tcp://127.0.0.1:1", fallback=6)
    result = evse("config", "set", "board.kind", "heidelberg", "--config", str(config))
    assert result.returncode == 2
    assert "read-only at run time" in result.stderr and str(config) in result.stderr
    get = evse("config", "get", "board.kind", "--config", str(config))
    assert (get.returncode, get.stdout) == (0, "evse-din\n")
