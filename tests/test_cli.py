"""``evse probe`` against ``evse sim`` (two processes), over TCP and RTU on a pty."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from fieldbus.boards import BOARD_MODELS
from fieldbus.meters import METER_MODELS
from ops.cli import main
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
