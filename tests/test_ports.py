"""Port URLs and unit ids: every accepted form, and every refusal names what is wrong."""

from __future__ import annotations

import pytest

from fieldbus.errors import FieldbusError, PortConfigError
from fieldbus.ports import (
    DEFAULT_TCP_PORT,
    STANDARD_BAUDS,
    PortSpec,
    RtuPort,
    TcpPort,
    check_unit,
    parse_port,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://192.168.1.20:502", TcpPort("192.168.1.20", 502)),
        ("tcp://192.168.1.20:1502", TcpPort("192.168.1.20", 1502)),
        ("tcp://192.168.1.20", TcpPort("192.168.1.20", DEFAULT_TCP_PORT)),
        ("tcp://192.168.1.20:502/", TcpPort("192.168.1.20", 502)),
        ("tcp://meter.local:502", TcpPort("meter.local", 502)),
        ("tcp://[::1]:5020", TcpPort("::1", 5020)),
        ("tcp://[fe80::1]", TcpPort("fe80::1", DEFAULT_TCP_PORT)),
        ("tcp://127.0.0.1:65535", TcpPort("127.0.0.1", 65535)),
        ("rtu:///dev/ttyUSB0", RtuPort("/dev/ttyUSB0", 9600, "N", 1, 8)),
        ("rtu:/dev/ttyUSB0", RtuPort("/dev/ttyUSB0")),
        ("rtu:///dev/ttyUSB0?baud=19200", RtuPort("/dev/ttyUSB0", 19200)),
        ("rtu:///dev/ttyS1?baud=9600&parity=E", RtuPort("/dev/ttyS1", 9600, "E")),
        ("rtu:///dev/ttyS1?parity=e", RtuPort("/dev/ttyS1", 9600, "E")),
        ("rtu:///dev/ttyS1?parity=o&stopbits=1", RtuPort("/dev/ttyS1", 9600, "O", 1)),
        ("rtu:///dev/ttyS1?parity=N&stopbits=2", RtuPort("/dev/ttyS1", 9600, "N", 2)),
        (
            "rtu:///dev/serial/by-id/usb-FTDI-if00?bytesize=8&stopbits=2&parity=N&baud=115200",
            RtuPort("/dev/serial/by-id/usb-FTDI-if00", 115200, "N", 2, 8),
        ),
    ],
)
def test_accepted_forms(url: str, expected: PortSpec) -> None:
    assert parse_port(url) == expected


@pytest.mark.parametrize("baud", STANDARD_BAUDS)
def test_every_standard_baud_is_accepted(baud: int) -> None:
    port = parse_port(f"rtu:///dev/ttyUSB0?baud={baud}")
    assert isinstance(port, RtuPort)
    assert port.baud == baud


@pytest.mark.parametrize(
    "url",
    [
        "tcp://10.0.0.7:502",
        "tcp://[::1]:5020",
        "rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1&bytesize=8",
        "rtu:///dev/ttyAMA0?baud=38400&parity=E&stopbits=2&bytesize=8",
    ],
)
def test_url_round_trips(url: str) -> None:
    port = parse_port(url)
    assert port.url == url
    assert parse_port(port.url) == port


def test_rtu_timing() -> None:
    slow = RtuPort("/dev/ttyUSB0", baud=9600, parity="E", stopbits=1)
    # 1 start + 8 data + 1 parity + 1 stop = 11 bits per character.
    assert slow.char_time == pytest.approx(11 / 9600)
    assert slow.frame_gap == pytest.approx(3.5 * 11 / 9600)
    plain = RtuPort("/dev/ttyUSB0", baud=19200)
    assert plain.frame_gap == pytest.approx(3.5 * 10 / 19200)
    # Above 19200 baud, t3.5 is fixed at 1.75 ms.
    assert RtuPort("/dev/ttyUSB0", baud=38400).frame_gap == pytest.approx(0.00175)
    assert RtuPort("/dev/ttyUSB0", baud=115200).frame_gap == pytest.approx(0.00175)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        # Each refusal must name the offending part (and carry the URL as "where").
        ("udp://10.0.0.1:502", "'udp'"),
        ("/dev/ttyUSB0", "''"),
        ("modbus://10.0.0.1", "'modbus'"),
        ("tcp://", "no host"),
        ("tcp://:502", "no host"),
        ("tcp://10.0.0.1:abc", "abc"),
        ("tcp://10.0.0.1:99999", "out of range"),
        ("tcp://10.0.0.1:502/unit/3", "only host and port"),
        ("tcp://10.0.0.1:502?timeout=3", "only host and port"),
        ("tcp://[::1:502", "malformed"),
        ("rtu://dev/ttyUSB0", "'dev'"),
        ("rtu://", "no serial device"),
        ("rtu:///", "no serial device"),
        ("rtu:///dev/ttyUSB0?speed=9600", "'speed'"),
        ("rtu:///dev/ttyUSB0?baud=9600&baud=19200", "'baud' given 2 times"),
        ("rtu:///dev/ttyUSB0?baud", "'baud'"),
        ("rtu:///dev/ttyUSB0?baud=9600&&parity=E", "malformed query"),
        ("rtu:///dev/ttyUSB0?baud=", "baud=''"),
        ("rtu:///dev/ttyUSB0?baud=fast", "baud='fast'"),
        ("rtu:///dev/ttyUSB0?baud=12345", "baud=12345"),
        ("rtu:///dev/ttyUSB0?baud=0", "baud=0"),
        ("rtu:///dev/ttyUSB0?baud=-9600", "baud=-9600"),
        ("rtu:///dev/ttyUSB0?parity=X", "parity='X'"),
        ("rtu:///dev/ttyUSB0?parity=even", "parity='EVEN'"),
        ("rtu:///dev/ttyUSB0?stopbits=3", "stopbits=3"),
        ("rtu:///dev/ttyUSB0?stopbits=1.5", "stopbits='1.5'"),
        ("rtu:///dev/ttyUSB0?bytesize=7", "bytesize=7"),
        ("rtu:///dev/ttyUSB0?bytesize=x", "bytesize='x'"),
    ],
)
def test_refusals_name_the_offending_value(url: str, names: str) -> None:
    with pytest.raises(PortConfigError) as info:
        parse_port(url)
    message = str(info.value)
    assert names in message
    assert info.value.where == url
    assert message.startswith(f"{url}: ")
    # One family of errors: callers catch FieldbusError, never ValueError.
    assert isinstance(info.value, FieldbusError)


def test_tcp_port_zero_is_refused() -> None:
    with pytest.raises(PortConfigError, match="0"):
        parse_port("tcp://127.0.0.1:0")


@pytest.mark.parametrize("unit", [1, 2, 100, 246, 247])
def test_check_unit_accepts_1_to_247(unit: int) -> None:
    assert check_unit(unit) == unit


@pytest.mark.parametrize("unit", [-1, 0, 248, 255, 256, 1000])
def test_check_unit_refusal_names_the_unit(unit: int) -> None:
    with pytest.raises(PortConfigError, match=rf"unit id {unit} is outside 1\.\.247"):
        check_unit(unit)
