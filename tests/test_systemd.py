"""sd_notify over a real unix datagram socket, the watchdog loop, the unit file."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ops.systemd import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_HARDWARE,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    Notifier,
    watchdog_loop,
)

UNIT = Path(__file__).resolve().parent.parent / "ops" / "systemd" / "evse.service"


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without blocking."""
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


def bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = bound(path)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"evse-test-{uuid.uuid4().hex}"
    sock = bound("\0" + name)
    yield "@" + name, sock
    sock.close()


async def wait_for(sock: socket.socket, count: int) -> list[bytes]:
    """Receive ``count`` datagrams (real time, bounded)."""
    got: list[bytes] = []
    with trio.fail_after(5):
        while len(got) < count:
            await trio.lowlevel.wait_readable(sock)
            got += drain(sock)
    return got


# --- notifications ------------------------------------------------------------


@pytest.mark.parametrize("which", ["path", "abstract"])
async def test_messages_received(
    which: str,
    path_socket: tuple[str, socket.socket],
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, receiver = path_socket if which == "path" else abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert await notifier.ready("board and meter answer")
    assert await notifier.ready()
    assert await notifier.status("charging 16 A")
    assert await notifier.watchdog()
    assert await notifier.stopping()
    notifier.close()
    assert await wait_for(receiver, 5) == [
        b"READY=1\nSTATUS=board and meter answer",
        b"READY=1",
        b"STATUS=charging 16 A",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


async def test_status_is_one_line(path_socket: tuple[str, socket.socket]) -> None:
    address, receiver = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    await notifier.status("fault:\nwelded contactor\r\n")
    notifier.close()
    assert await wait_for(receiver, 1) == [b"STATUS=fault: welded contactor"]


async def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not await notifier.ready("x")
    assert not await notifier.status("x")
    assert not await notifier.watchdog()
    assert not await notifier.stopping()
    assert notifier._sock is None


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
async def test_unusable_notify_socket_is_a_no_op(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert not await notifier.ready()


async def test_reads_the_process_environment(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, receiver = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    assert notifier.watchdog_interval == 1.5
    assert await notifier.ready()
    notifier.close()
    assert await wait_for(receiver, 1) == [b"READY=1"]


async def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ops.systemd")
    address = str(tmp_path / "gone")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert not await notifier.ready()
    assert not await notifier.watchdog()
    assert not await notifier.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # One warning per outage, the repeats at debug level.
    assert len(warnings) == 1
    assert "not sent" in warnings[0].getMessage()
    assert address in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2

    receiver = bound(address)
    try:
        assert await notifier.watchdog()
        assert any("delivered again" in r.getMessage() for r in caplog.records)
        notifier.close()
        assert await wait_for(receiver, 1) == [b"WATCHDOG=1"]
    finally:
        receiver.close()


async def test_reconnects_after_the_manager_rebinds(tmp_path: Path) -> None:
    """systemd re-executed: the old socket is gone, a new one has the same path."""
    address = str(tmp_path / "notify")
    first = bound(address)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert await notifier.status("one")
    assert await wait_for(first, 1) == [b"STATUS=one"]
    first.close()
    os.unlink(address)
    assert not await notifier.status("lost")
    second = bound(address)
    try:
        assert await notifier.status("two")
        assert await wait_for(second, 1) == [b"STATUS=two"]
    finally:
        notifier.close()
        second.close()


async def test_full_socket_does_not_hang(
    path_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    address, receiver = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address}, send_timeout=0.05)
    sent = 0
    with trio.fail_after(10):
        while await notifier.watchdog():
            sent += 1
    # The queue filled (nobody reads), the next send gave up after its timeout.
    assert sent >= 1
    assert any("no room" in r.getMessage() for r in caplog.records)
    assert len(drain(receiver)) == sent
    assert await notifier.watchdog()  # room again
    notifier.close()


# --- watchdog -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4242"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env}, pid=4242)
    assert notifier.watchdog_interval == interval


async def test_watchdog_loop_pings_only_while_healthy(
    autojump_clock: trio.testing.MockClock,
    path_socket: tuple[str, socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    address, receiver = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    start = trio.current_time()

    def healthy() -> bool:
        # The station's loops stall from 2.5 s to 5.5 s.
        return not 2.5 <= trio.current_time() - start < 5.5

    per_second: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog_loop, notifier, healthy)
        for second in range(10):
            await trio.sleep_until(start + second + 0.5)
            got = drain(receiver)
            assert set(got) <= {b"WATCHDOG=1"}
            per_second.append(len(got))
        nursery.cancel_scope.cancel()
    notifier.close()
    # Pings at 0, 1, 2; none at 3, 4, 5; again from 6 on, once per interval.
    assert per_second == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    messages = [r.getMessage() for r in caplog.records if r.name == "ops.systemd"]
    assert messages == [
        "station not healthy: withholding systemd watchdog pings",
        "station healthy again: systemd watchdog pings resumed",
    ]


async def test_watchdog_loop_never_pings_a_wedged_station(
    autojump_clock: trio.testing.MockClock, path_socket: tuple[str, socket.socket]
) -> None:
    address, receiver = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"})
    with trio.move_on_after(60):
        await watchdog_loop(notifier, lambda: False)
    assert drain(receiver) == []


async def test_watchdog_loop_returns_when_the_pid_is_another(
    autojump_clock: trio.testing.MockClock, path_socket: tuple[str, socket.socket]
) -> None:
    address, receiver = path_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}
    notifier = Notifier(env, pid=4243)
    assert notifier.watchdog_interval is None
    start = trio.current_time()
    await watchdog_loop(notifier, lambda: True)
    assert trio.current_time() == start
    assert drain(receiver) == []


# --- exit codes and the unit file --------------------------------------------------


def test_exit_codes() -> None:
    assert (EXIT_OK, EXIT_FAILURE, EXIT_USAGE) == (0, 1, 2)
    assert (EXIT_CONFIG, EXIT_HARDWARE, EXIT_SOFTWARE) == (78, 69, 70)


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if match := re.fullmatch(r"\[(\w+)\]", line):
            section = match.group(1)
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def test_unit_file() -> None:
    s = unit_settings()
    assert s["Service.Type"] == ["notify"]
    assert s["Service.NotifyAccess"] == ["main"]
    assert s["Service.ExecStart"] == ["/usr/local/bin/evse run --config /etc/evse/evse.toml"]
    assert s["Service.WatchdogSec"] == ["10"]
    assert s["Service.Restart"] == ["on-failure"]
    assert s["Service.RestartSec"] == ["2"]
    assert str(EXIT_CONFIG) in s["Service.RestartPreventExitStatus"][0].split()
    for code in (EXIT_FAILURE, EXIT_HARDWARE, EXIT_SOFTWARE):
        assert str(code) not in s["Service.RestartPreventExitStatus"][0].split()
    assert s["Service.KillSignal"] == ["SIGTERM"]
    assert s["Service.TimeoutStopSec"] == ["15"]
    assert s["Service.StateDirectory"] == ["evse"]
    assert s["Service.RuntimeDirectory"] == ["evse"]
    assert s["Service.NoNewPrivileges"] == ["yes"]
    assert s["Service.ProtectSystem"] == ["strict"]
    assert s["Service.ReadWritePaths"] == ["/var/lib/evse"]
    assert s["Service.PrivateTmp"] == ["yes"]
    assert s["Service.SupplementaryGroups"] == ["dialout"]
    # These would hide or block the serial ports.
    assert "Service.PrivateDevices" not in s
    assert "Service.ProtectClock" not in s
    assert "Service.DeviceAllow" not in s


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_verifies() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # The only expected complaint: the firmware is not installed here.
        if line.strip() and "/usr/local/bin/evse" not in line
    ]
    assert problems == []
