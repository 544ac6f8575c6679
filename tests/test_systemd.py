"""sd_notify over a real unix datagram socket, the watchdog loop, the unit file."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ops.systemd import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_HARDWARE,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    Notifier,
    watchdog_loop,
)
from tests.conftest import SimFactory
from tests.sim_control import control

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


async def test_concurrent_first_sends_share_one_socket(
    path_socket: tuple[str, socket.socket],
) -> None:
    """The watchdog and a status change racing to connect: no second socket leaks."""
    address, receiver = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(notifier.status, f"s{i}")
    notifier.close()
    gc.collect()  # a leaked socket would warn (an error here) when collected
    assert sorted(await wait_for(receiver, 5)) == [f"STATUS=s{i}".encode() for i in range(5)]


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
    assert (EXIT_CONFIG, EXIT_HARDWARE, EXIT_SOFTWARE, EXIT_LOCKED) == (78, 69, 70, 75)


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
    assert s["Service.ExecStart"] == ["/opt/evse/current/bin/evse run --config /etc/evse/evse.toml"]
    assert s["Service.WatchdogSec"] == ["10"]
    assert s["Service.Restart"] == ["on-failure"]
    # Back within 2 s of a crash: the restart delay, plus a start that is READY
    # once board and meter answer.
    assert float(s["Service.RestartSec"][0]) <= 1
    assert s["Service.RestartPreventExitStatus"][0].split() == [str(EXIT_USAGE), str(EXIT_CONFIG)]
    for code in (EXIT_FAILURE, EXIT_HARDWARE, EXIT_SOFTWARE, EXIT_LOCKED):
        assert str(code) not in s["Service.RestartPreventExitStatus"][0].split()
    assert s["Service.KillSignal"] == ["SIGTERM"]
    assert s["Service.TimeoutStopSec"] == ["15"]
    assert s["Service.StateDirectory"] == ["evse"]
    # /run/lock/evse: the board locks (ops/lock.py's default directory), kept
    # while a hand-started station may hold one.
    assert s["Service.RuntimeDirectory"] == ["evse lock/evse"]
    assert s["Service.RuntimeDirectoryPreserve"] == ["yes"]
    assert s["Service.NoNewPrivileges"] == ["yes"]
    assert s["Service.ProtectSystem"] == ["strict"]
    assert s["Service.ReadWritePaths"] == ["/var/lib/evse"]
    assert s["Service.PrivateTmp"] == ["yes"]
    assert s["Service.SupplementaryGroups"] == ["dialout"]
    # These would hide or block the serial ports.
    assert "Service.PrivateDevices" not in s
    assert "Service.ProtectClock" not in s
    assert "Service.DeviceAllow" not in s


@pytest.mark.slow
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
        if line.strip() and "/opt/evse/current/bin/" not in line
    ]
    assert problems == []


# --- a real station and the notify socket ---------------------------------------------

STATION_CONFIG = """\
[station]
serial = "SD-0001"
data_dir = "{data_dir}"

[limits]
installer_max = 16

[board]
kind = "evse-din"
port = "{board}"
unit = 1
timeout = 0.3

[meter]
kind = "sdm630"
port = "{meter}"
unit = 2
timeout = 0.3

[authorization]
tags = ["04A2B3C4"]
"""


class Listener:
    """The service manager's side of NOTIFY_SOCKET: every datagram, as it arrives."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path
        self.got: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.got

    def wait_for(self, message: str, within: float = 20.0) -> int:
        """Index of the first datagram equal to ``message``."""
        return self.got.index(self.wait_start(message, within, exact=True))

    def wait_start(self, prefix: str, within: float = 20.0, *, exact: bool = False) -> str:
        """The first datagram that starts with ``prefix`` (or is it)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for m in self.poll():
                if m == prefix or (not exact and m.startswith(prefix)):
                    return m
        raise AssertionError(f"never got {prefix!r}: {self.got}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    receiver = Listener(tmp_path / "notify")
    yield receiver
    receiver.close()


def write_station(
    tmp_path: Path, board: str, meter: str | None = None, *, start_timeout: float | None = None
) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    config = tmp_path / "evse.toml"
    text = STATION_CONFIG.format(data_dir=data_dir, board=board, meter=meter or board)
    if start_timeout is not None:
        text += f"\n[safety]\nstart_timeout = {start_timeout}\n"
    config.write_text(text)
    return config


def start_station(config: Path, notify: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "NOTIFY_SOCKET": str(notify),
            "EVSE_LOCK_DIR": str(config.parent),
            "PYTHONWARNINGS": "error",
        },
    )


def ask(config: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from ops.control import query  # noqa: PLC0415

    return trio.run(query, str(config.parent / "data" / "control.sock"), method, path, body)


@pytest.mark.slow
def test_ready_only_once_board_and_meter_answer_and_status_follows_the_station(
    tmp_path: Path, sim_process: SimFactory, listener: Listener
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    # The board is silent when the station starts: it waits, not READY.
    control(ready, "POST", "/faults/board_silent")
    config = write_station(tmp_path, ready["tcp"])
    proc = start_station(config, listener.path)
    try:
        waiting = listener.wait_for("STATUS=waiting for board and meter")
        time.sleep(1.5)
        assert proc.poll() is None
        assert not any(m.startswith("READY=1") for m in listener.poll()), listener.got
        control(ready, "DELETE", "/faults/board_silent")

        ready_at = listener.wait_for("READY=1\nSTATUS=Available")
        assert waiting < ready_at
        assert sum(m.startswith("READY=1") for m in listener.got) == 1

        control(ready, "POST", "/plug", {"phases": 3})
        listener.wait_for("STATUS=Preparing")
        assert ask(config, "POST", "/authorize", {"id_tag": "04A2B3C4"})["status"] == "Accepted"
        listener.wait_for("STATUS=Charging 16 A, transaction 1")
        control(ready, "POST", "/faults/rcd_trip")
        assert listener.wait_start("STATUS=Faulted").startswith("STATUS=Faulted: rcd_trip")

        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        listener.wait_for("STOPPING=1\nSTATUS=stopping")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # The log says "running" once, when READY=1 went out, not before.
    assert err.count("running") == 1
    assert "Traceback" not in err


def closed_port() -> str:
    """A TCP port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tcp", "serial"])
def test_a_device_unreachable_at_start_exits_69_without_ready(
    where: str, tmp_path: Path, sim_process: SimFactory, listener: Listener
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    if where == "tcp":
        board, meter, named = closed_port(), ready["tcp"], "board"
    else:
        board, meter, named = ready["tcp"], f"rtu://{tmp_path}/ttyUSB9", "meter"
    unreachable = board if named == "board" else meter
    proc = start_station(write_station(tmp_path, board, meter, start_timeout=2), listener.path)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_HARDWARE, err
    assert "Traceback" not in err
    assert "running" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"evse run: error: {named}: ")
    assert unreachable.split("?")[0].removeprefix("rtu://") in last
    messages = listener.poll()
    assert not any(m.startswith("READY=1") for m in messages), messages
    assert any(m.startswith("STATUS=waiting for") for m in messages)


# --- liveness: a wedged station loop ----------------------------------------------------


async def test_a_wedged_station_loop_is_switched_off_before_the_watchdog_starves(
    tmp_path: Path,
    path_socket: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from evse.supervisor import Supervisor  # noqa: PLC0415
    from ops.run import Central, run_station, sim_config  # noqa: PLC0415
    from ops.sim.app import SimConfig, Simulator  # noqa: PLC0415

    monkeypatch.setenv("EVSE_LOCK_DIR", str(tmp_path))
    address, receiver = path_socket
    # WatchdogSec=2: pings every second while the station is healthy.
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    sim = Simulator(SimConfig(rtu=False, control_port=None))
    heard: list[tuple[float, bytes]] = []
    wedged: dict[str, float] = {}

    async def listen() -> None:
        while True:
            await trio.lowlevel.wait_readable(receiver)
            heard.extend((trio.current_time(), m) for m in drain(receiver))

    async def until(predicate: Any) -> None:
        with trio.fail_after(15):
            while not predicate():  # noqa: ASYNC110
                await trio.sleep(0.02)

    async def driver(supervisor: Supervisor, central: Central) -> None:
        station = supervisor.station
        assert station is not None
        await until(lambda: station.meter_reading is not None)
        sim.set_ev({"plugged": True, "wants": "C", "phases": 3, "max_current": 16.0})
        await until(lambda: station.connector.status.value == "Preparing")
        await station.present_id_tag("04A2B3C4", source="test")
        await until(lambda: station.connector.status.value == "Charging")
        await until(lambda: sim.station.to_json()["contactor_closed"])
        wedged["at"] = trio.current_time()
        wedged["seq"] = sim.events[-1]["seq"]
        await station.call(trio.sleep_forever)  # the loop never answers again

    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(sim.run)
        nursery.start_soon(listen)
        assert endpoints.tcp is not None
        code = await run_station(
            sim_config(endpoints.tcp, tmp_path), driver=driver, notifier=notifier, probe_timeout=0.5
        )
        ended = trio.current_time()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    assert code == EXIT_SOFTWARE
    aborted = [t for t, m in heard if m.startswith(b"STATUS=aborting:")]
    assert len(aborted) == 1
    # Aborted one probe timeout (+ the probe interval) after the wedge...
    assert aborted[0] - wedged["at"] < 0.5 + 1.0 + 0.5
    # ...while the watchdog was still fed: a ping within its 1 s interval
    # before the abort, none after (systemd would kill a process that hangs on).
    pings = [t for t, m in heard if m == b"WATCHDOG=1"]
    assert [t for t in pings if aborted[0] - 1.2 < t <= aborted[0]]
    assert not [t for t in pings if t > aborted[0]]
    # The off-write reached the board, after the wedge, before the process ended.
    offs = [
        e
        for e in sim.events
        if e["seq"] > wedged["seq"] and e["event"] == "write" and e["fields"] == {"command": 0.0}
    ]
    assert offs
    assert offs[0]["t"] <= ended
    assert sim.station.to_json()["contactor_closed"] is False
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("liveness probe" in m for m in critical), critical
