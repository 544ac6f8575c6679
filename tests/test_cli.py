"""``evse probe`` against ``evse sim`` (two processes), over TCP and RTU on a pty; every
CLI error as one line with its exit code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fieldbus.boards import BOARD_MODELS
from fieldbus.meters import METER_MODELS
from ops.cli import main
from ops.httpjson import HTTPError
from tests.conftest import SimFactory

METER_KINDS = sorted(METER_MODELS)


def probe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(["probe", *args, "--timeout", "0.5"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def rtu_url(ready: dict[str, Any]) -> str:
    url = ready["rtu"]
    assert isinstance(url, str)
    return url


@pytest.mark.slow
@pytest.mark.parametrize("board", sorted(BOARD_MODELS))
def test_probe_reads_every_model_over_tcp_and_rtu(
    board: str, sim_process: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = [f"{board}:1"] + [f"{kind}:{10 + i}" for i, kind in enumerate(METER_KINDS)]
    ready = sim_process(*devices)
    for port in (ready["tcp"], rtu_url(ready)):
        code, result, err = probe(capsys, board, port, "--unit", "1")
        assert code == 0, err
        assert result["kind"] == board
        # Nothing plugged in: state A, no offer, no faults.
        assert result["status"]["pilot"] == "A"
        assert result["status"]["faults"] == []
        assert result["capabilities"]["failsafe"] == (board == "heidelberg")
        for i, kind in enumerate(METER_KINDS):
            code, result, err = probe(capsys, kind, port, "--unit", str(10 + i))
            assert code == 0, f"{kind} over {port}: {err}"
            reading = result["reading"]
            assert reading["power_total"] == 0.0
            if METER_MODELS[kind].fields.get("voltage_l1"):
                assert reading["voltage"][0] == pytest.approx(230.0)


@pytest.mark.slow
def test_probe_sees_a_charging_ev(
    sim_process: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.sim_control import control  # noqa: PLC0415

    ready = sim_process("evse-din:1", "sdm630:2")
    control(ready, "POST", "/plug", {"phases": 3, "max_current": 10})
    # The firmware's job, done by hand: allow 16 A on the board.
    code = main(["probe", "evse-din", ready["tcp"], "--unit", "1"])
    assert code == 0
    capsys.readouterr()
    from tests.sim_control import write_board_current  # noqa: PLC0415

    write_board_current(ready["tcp"], 1, 16)
    code, result, err = probe(capsys, "sdm630", ready["tcp"], "--unit", "2")
    assert code == 0, err
    # The EV takes its own 10 A limit of the 16 A offered, on three phases.
    assert result["reading"]["current"] == pytest.approx([10.0, 10.0, 10.0])
    assert result["reading"]["power_total"] == pytest.approx(3 * 230.0 * 10.0)
    code, result, err = probe(capsys, "evse-din", rtu_url(ready), "--unit", "1")
    assert code == 0, err
    assert result["status"]["pilot"] == "C"
    assert result["status"]["offered_a"] == 16.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nosuchmeter", "tcp://127.0.0.1:1"], "'nosuchmeter'"),
        (["sdm630", "udp://127.0.0.1:502"], "'udp'"),
        (["sdm630", "tcp://127.0.0.1:99999"], "tcp://127.0.0.1:99999"),
        (["sdm630", "rtu:///dev/ttyS0?baud=12345"], "baud=12345"),
        (["sdm630", "rtu:///dev/ttyS0?parity=X"], "'X'"),
        (["sdm630", "tcp://127.0.0.1:502", "--unit", "0"], "unit id 0"),
        (["sdm630", "tcp://127.0.0.1:502", "--unit", "248"], "unit id 248"),
        (["sdm630", "tcp://127.0.0.1:502", "--unit", "x"], "'x'"),
    ],
)
def test_probe_refuses_bad_input_with_the_value_named(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["probe", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_probe_of_a_silent_device_is_one_line_and_exit_1(
    sim_process: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.sim_control import control  # noqa: PLC0415

    ready = sim_process("evse-din:1", "sdm630:2")
    control(ready, "POST", "/faults/meter_silent")
    code, _, err = probe(capsys, "sdm630", ready["tcp"], "--unit", "2")
    assert code == 1
    assert err.count("\n") == 1
    assert "ModbusTimeout" in err and "unit 2" in err
    # A unit nobody answers for on the RTU line: the same, and the port named.
    code, _, err = probe(capsys, "sdm630", rtu_url(ready), "--unit", "7")
    assert code == 1
    assert "ModbusTimeout" in err and ready["rtu"].split("?")[0] in err


@pytest.mark.slow
def test_probe_of_an_exception_reply_names_the_code(
    sim_process: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    # An SDM630 table read from the board's unit: the board has no such registers.
    code, _, err = probe(capsys, "sdm630", ready["tcp"], "--unit", "1")
    assert code == 1
    assert "ExceptionReply" in err and "ILLEGAL DATA ADDRESS" in err


def test_probe_of_a_closed_port_and_a_missing_serial_device(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = probe(capsys, "sdm630", "tcp://127.0.0.1:1")
    assert code == 1
    assert "Disconnected" in err and "tcp://127.0.0.1:1" in err
    code, _, err = probe(capsys, "sdm630", "rtu:///dev/does-not-exist")
    assert code == 1
    assert "/dev/does-not-exist" in err and "cannot open serial port" in err


@pytest.mark.slow
def test_probe_as_a_process_prints_no_traceback() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "probe",
            "sdm630",
            "tcp://127.0.0.1:1",
            "--timeout",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("evse probe: Disconnected: tcp://127.0.0.1:1")
    assert "Traceback" not in result.stderr


# --- every error is one line with its exit code, never a traceback ----------------------


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err.rstrip("\n")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([], 2, "evse: error: the following arguments are required: COMMAND (see evse --help)"),
        (["run"], 2, "evse run: error: one of the arguments --config --sim is required"),
        (["run", "--sim", "--sim-transport", "udp"], 2, "invalid choice: 'udp'"),
        (["config", "frobnicate"], 2, "evse config: error: argument action: invalid choice"),
        (["demo", "--seconds", "nan"], 2, "'nan' is not a positive number of seconds"),
        (["demo", "--seconds", "-4"], 2, "'-4' is not a positive number of seconds"),
        (["probe", "sdm630", "tcp://127.0.0.1:1", "--timeout", "0"], 2, "'0' is not a positive"),
        (["sim", "--tcp-port", "70000"], 2, "port 70000 is outside 0..65535"),
    ],
)
def test_usage_errors_are_one_line(
    args: list[str], code: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == code
    assert needle in one_line(capsys.readouterr().err)


def test_help_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "evse run" in out and "evse sim" in out
    assert main(["run", "--help"]) == 0
    assert "--sim-control-port" in capsys.readouterr().out


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error", **(env or {})},
    )


BAD_DATA_DIR = """\
[station]
serial = "X-1"
data_dir = "{tmp}/missing"

[board]
kind = "evse-din"
port = "tcp://127.0.0.1:1"

[meter]
kind = "sdm630"
port = "tcp://127.0.0.1:1"
unit = 2
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([], 2, "evse: error: the following arguments are required: COMMAND"),
        (["run", "--sim", "--data-dir", "/nonexistent"], 2, "--data-dir /nonexistent: no such"),
        (["run", "--sim", "--data-dir", "{tmp}/file"], 2, "--data-dir {tmp}/file: not a directory"),
        (["run", "--config", "{tmp}/evse.toml", "--data-dir", "{tmp}"], 2, "only with --sim"),
        (["run", "--config", "/nonexistent.toml"], 78, "/nonexistent.toml: no such file"),
        (
            ["run", "--config", "{tmp}/evse.toml"],
            78,
            "{tmp}/evse.toml: station.data_dir: ",
        ),
        (["status"], 1, "evse status: error: no station at {tmp}/none.sock"),
        (["status", "--socket", "{tmp}/file"], 1, "no station at {tmp}/file"),
        (["config", "get", "UnknownKey", "--data-dir", "{tmp}"], 2, "unknown setting 'UnknownKey'"),
        (["config", "get", "HeartbeatInterval", "--data-dir", "/nonexistent"], 2, "no such dir"),
        (["config", "get", "HeartbeatInterval"], 1, "no running station; give --config or"),
        (["config", "get"], 2, "evse config: error: config get needs a KEY"),
        (["queue", "--data-dir", "/nonexistent"], 2, "--data-dir /nonexistent: no such directory"),
        (["demo", "--seconds", "nan"], 2, "'nan' is not a positive number of seconds"),
        (["sim", "--device", "nosuch"], 2, "unknown device kind 'nosuch'"),
        (
            ["sim", "--rtu-link", "{tmp}/missing/link", "--tcp-port", "0", "--control-port", "0"],
            1,
            "evse sim: error: --rtu-link {tmp}/missing/link: cannot make the link",
        ),
        (
            ["sim", "--rtu-link", "{tmp}/file", "--tcp-port", "0", "--control-port", "0"],
            1,
            "--rtu-link {tmp}/file: exists and is not a symlink; not replaced",
        ),
        (
            ["sim", "--host", "192.0.2.1", "--no-rtu", "--control-port", "0", "--tcp-port", "0"],
            1,
            "the simulator's Modbus TCP server cannot listen on 192.0.2.1:0",
        ),
    ],
)
def test_cli_errors_are_one_line_and_their_exit_code(
    args: list[str], code: int, needle: str, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("an installer's file\n")
    (tmp_path / "evse.toml").write_text(BAD_DATA_DIR.format(tmp=tmp_path))
    env = {"EVSE_CONTROL_SOCKET": str(tmp_path / "none.sock"), "EVSE_LOCK_DIR": str(tmp_path)}
    result = run_cli(*(a.format(tmp=tmp_path) for a in args), env=env)
    assert result.returncode == code, result.stderr
    line = one_line(result.stderr)
    assert needle.format(tmp=tmp_path) in line
    if "station.data_dir" in needle:
        assert f"{tmp_path}/missing" in line
    # Nothing was created or deleted on the way.
    assert (tmp_path / "file").read_text() == "an installer's file\n"
    assert not (tmp_path / "station.sqlite").exists() or args[:2] == ["config", "get"]


def listening(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.slow
def test_a_second_sim_on_the_same_ports_is_one_line(sim_process: SimFactory) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    tcp_port = ready["tcp"].rsplit(":", 1)[1]
    control_port = ready["control"].rsplit(":", 1)[1]
    result = run_cli("sim", "--tcp-port", tcp_port, "--control-port", control_port)
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"evse sim: error: the simulator's Modbus TCP server cannot listen on "
        f"127.0.0.1:{tcp_port} (Address already in use)"
    )
    result = run_cli("sim", "--tcp-port", "0", "--control-port", control_port)
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"evse sim: error: the simulator's HTTP control interface cannot listen on "
        f"127.0.0.1:{control_port} (Address already in use)"
    )


@pytest.fixture
def run_sim(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[str], Any]]]:
    """``evse run --sim`` processes: each call returns the process and its ready line."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], Any]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", "--sim", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "error", "EVSE_LOCK_DIR": str(tmp_path)},
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"evse run --sim did not start: {proc.communicate()[1]}")
        return proc, json.loads(line)["ready"]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_answering(proc: subprocess.Popen[str], socket_path: str) -> None:
    from ops.control import query  # noqa: PLC0415

    deadline = time.monotonic() + 20
    while True:
        try:
            trio.run(query, socket_path, "GET", "/status")
            return
        except (OSError, HTTPError):
            pass
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the station never answered"
        time.sleep(0.05)


@pytest.mark.slow
def test_run_sim_uses_free_ports_next_to_a_running_sim(
    tmp_path: Path, run_sim: Callable[..., tuple[subprocess.Popen[str], Any]]
) -> None:
    # `evse sim` listens on 5020 and 8020 by default: hold 8020 (unless
    # something on this machine already does, which is the same test).
    try:
        held: socket.socket | None = listening(8020)
    except OSError:
        held = None
    try:
        proc, ready = run_sim("--data-dir", str(tmp_path))
        assert not ready["simulator"]["control"].endswith(":8020")
        wait_answering(proc, ready["control_socket"])
        # And given a port that is in use: one line, exit 1.
        with listening() as busy:
            port = busy.getsockname()[1]
            result = run_cli("run", "--sim", "--sim-control-port", str(port))
        assert result.returncode == 1
        assert one_line(result.stderr) == (
            f"evse run: error: the simulator's HTTP control interface cannot listen on "
            f"127.0.0.1:{port} (Address already in use)"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if held is not None:
            held.close()


@pytest.mark.slow
def test_config_of_an_unknown_key_through_the_running_station(
    tmp_path: Path, run_sim: Callable[..., tuple[subprocess.Popen[str], Any]]
) -> None:
    proc, ready = run_sim("--data-dir", str(tmp_path))
    wait_answering(proc, ready["control_socket"])
    result = run_cli("config", "get", "UnknownKey", "--socket", ready["control_socket"])
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "evse config: error: UnknownKey: unknown setting 'UnknownKey' "
        "(evse config list shows them all)"
    )
    result = run_cli("config", "set", "UnknownKey", "1", "--socket", ready["control_socket"])
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr).startswith("evse config: error: UnknownKey: NotSupported")
    result = run_cli("config", "get", "HeartbeatInterval", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().isdigit()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
