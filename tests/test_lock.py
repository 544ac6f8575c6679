"""One station per data directory and per board: ops/lock.py, and two real ``evse run``."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ops import lock
from ops.control import query
from ops.httpjson import HTTPError
from ops.lock import Claim, LockHeld, LockUnusable, acquire, lock_dir, station_claims
from ops.systemd import EXIT_CONFIG, EXIT_LOCKED
from tests.conftest import SimFactory
from tests.sim_control import control

# --- the locks, in this process -------------------------------------------------------
# flock belongs to the open file: a second open in the same process conflicts
# with the first exactly as another process would.


def test_a_second_holder_is_refused_with_pid_and_file(tmp_path: Path) -> None:
    claim = Claim("data directory x", tmp_path / "station.lock")
    with acquire([claim]):
        assert (tmp_path / "station.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockHeld) as refused:
            acquire([claim])
    assert refused.value.pid == os.getpid()
    assert refused.value.path == tmp_path / "station.lock"
    assert str(refused.value) == (
        f"data directory x is in use by another station (pid {os.getpid()}; "
        f"lock file {tmp_path / 'station.lock'})"
    )
    # Released: free again, and the holder deleted its file on the way out.
    assert not (tmp_path / "station.lock").exists()
    with acquire([claim]):
        pass


def test_a_stale_file_is_no_lock(tmp_path: Path) -> None:
    """What kill -9 leaves: a file with a dead pid, and no flock on it."""
    (tmp_path / "station.lock").write_text("999999\n")
    with acquire([Claim("data directory x", tmp_path / "station.lock")]):
        assert (tmp_path / "station.lock").read_text() == f"{os.getpid()}\n"


def test_a_lock_on_a_deleted_file_is_no_lock(tmp_path: Path) -> None:
    """A process that locked the file its holder was just deleting does not own it."""
    path = tmp_path / "station.lock"
    path.touch()
    late = os.open(path, os.O_RDWR)
    try:
        path.unlink()  # the holder let go: file deleted, then closed
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the late one locks the old file
        with acquire([Claim("data directory x", path)]):  # the path is free all the same
            assert path.exists()
    finally:
        os.close(late)


def test_all_or_nothing(tmp_path: Path) -> None:
    first = Claim("data directory", tmp_path / "a.lock")
    board = Claim("board", tmp_path / "b.lock")
    with acquire([board]), pytest.raises(LockHeld):
        acquire([first, board])
    # The refused attempt let go of what it had taken before the conflict.
    with acquire([first]):
        pass


def test_a_missing_lock_directory_is_unusable_not_a_traceback(tmp_path: Path) -> None:
    claim = Claim("board tcp://h:1 unit 1", tmp_path / "missing" / "b.lock")
    with pytest.raises(LockUnusable, match=r"cannot lock board tcp://h:1 unit 1: .*missing"):
        acquire([claim])


def test_claims_are_keyed_by_port_and_unit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    locks = tmp_path / "locks"
    a = station_claims(data, "tcp://127.0.0.1:502", 1, "tcp://127.0.0.1:502", locks)
    assert [c.what for c in a] == [f"data directory {data}", "board tcp://127.0.0.1:502 unit 1"]
    assert a[0].path == data / "station.lock"
    assert a[1].path.parent == locks
    # Same board written the same way: same file; another unit or port: another.
    again = station_claims(tmp_path / "other", "tcp://127.0.0.1:502", 1, "tcp://h:1", locks)
    assert again[1].path == a[1].path
    unit2 = station_claims(data, "tcp://127.0.0.1:502", 2, "tcp://127.0.0.1:502", locks)
    port2 = station_claims(data, "tcp://127.0.0.1:503", 1, "tcp://127.0.0.1:502", locks)
    assert len({a[1].path, unit2[1].path, port2[1].path}) == 3


def test_a_serial_line_is_locked_whole_and_through_its_symlinks(tmp_path: Path) -> None:
    device = tmp_path / "ttyUSB0"
    device.touch()
    alias = tmp_path / "by-id-adapter"
    alias.symlink_to(device)
    locks = tmp_path / "locks"
    board = station_claims(tmp_path, f"rtu://{device}?baud=9600", 1, f"rtu://{device}", locks)
    # Board and meter on one line: the board, and the line once.
    assert [c.what for c in board[1:]] == [
        f"board rtu://{device}?baud=9600&parity=N&stopbits=1&bytesize=8 unit 1",
        f"serial line {device}",
    ]
    # Another station with another board unit on the same line (through a
    # symlink, at another baud rate) needs the same line lock.
    other = station_claims(tmp_path / "b", f"rtu://{alias}?baud=19200", 5, "tcp://m:502", locks)
    assert other[-1].path == board[-1].path
    assert other[1].path != board[1].path


def test_lock_directory(tmp_path: Path) -> None:
    assert lock_dir({"EVSE_LOCK_DIR": str(tmp_path)}) == tmp_path
    default = lock_dir({})
    assert default in (lock.SYSTEM_LOCK_DIR, Path(tempfile.gettempdir()))


# --- two real stations ------------------------------------------------------------------

CONFIG = """\
[station]
serial = "LOCK-0001"
data_dir = "{data_dir}"

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


def write_config(tmp_path: Path, name: str, port: str) -> Path:
    data_dir = tmp_path / name
    data_dir.mkdir()
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(data_dir=data_dir, port=port))
    return path


@pytest.fixture
def lock_env(tmp_path: Path) -> dict[str, str]:
    locks = tmp_path / "locks"
    locks.mkdir()
    return {**os.environ, "EVSE_LOCK_DIR": str(locks), "PYTHONWARNINGS": "error"}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def start(
    procs: list[subprocess.Popen[str]], env: dict[str, str], *args: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    procs.append(proc)
    return proc


def answers(path: Path) -> bool:
    try:
        trio.run(query, str(path), "GET", "/status")
    except (OSError, HTTPError):
        return False
    return True


def wait_for_socket(proc: subprocess.Popen[str], path: Path, within: float = 20) -> None:
    """Until the station answers on its control socket (it runs)."""
    deadline = time.monotonic() + within
    while not answers(path):
        if proc.poll() is not None:
            raise AssertionError(f"station exited {proc.returncode}: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "the station never answered on its control socket"
        time.sleep(0.05)


def refused(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stderr


@pytest.mark.slow
def test_a_second_station_on_the_same_data_directory_is_refused(
    tmp_path: Path,
    sim_process: SimFactory,
    lock_env: dict[str, str],
    procs: list[subprocess.Popen[str]],
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    config = write_config(tmp_path, "data", ready["tcp"])
    first = start(procs, lock_env, "run", "--config", str(config))
    socket = tmp_path / "data" / "control.sock"
    wait_for_socket(first, socket)
    writes_before = [e for e in control(ready, "GET", "/events")["events"] if e["event"] == "write"]

    code, err = refused(lock_env, "run", "--config", str(config))

    lock_file = tmp_path / "data" / "station.lock"
    assert code == EXIT_LOCKED
    assert err == (
        f"evse run: error: data directory {tmp_path / 'data'} is in use by another station "
        f"(pid {first.pid}; lock file {lock_file})\n"
    )
    # It touched nothing: the first's socket is still there and still answers,
    # the board got no write from it (an off-write would show), the first runs.
    assert answers(socket)
    writes_after = [e for e in control(ready, "GET", "/events")["events"] if e["event"] == "write"]
    assert writes_after == writes_before
    assert first.poll() is None

    # Released when the first ends: the next one starts.
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert not socket.exists()
    second = start(procs, lock_env, "run", "--config", str(config))
    wait_for_socket(second, socket)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0


@pytest.mark.slow
def test_a_second_station_on_the_same_board_is_refused_and_kill_9_frees_it(
    tmp_path: Path,
    sim_process: SimFactory,
    lock_env: dict[str, str],
    procs: list[subprocess.Popen[str]],
) -> None:
    ready = sim_process("evse-din:1", "sdm630:2")
    first_config = write_config(tmp_path, "one", ready["tcp"])
    other_config = write_config(tmp_path, "two", ready["tcp"])
    first = start(procs, lock_env, "run", "--config", str(first_config))
    wait_for_socket(first, tmp_path / "one" / "control.sock")

    code, err = refused(lock_env, "run", "--config", str(other_config))

    assert code == EXIT_LOCKED
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"evse run: error: board {ready['tcp']} unit 1 is in use by another station "
        f"(pid {first.pid}; lock file {lock_env['EVSE_LOCK_DIR']}/"
    )
    assert "Traceback" not in err
    # Refused before the store: the second data directory is still empty.
    assert list((tmp_path / "two").iterdir()) == []

    # kill -9: no code of ours runs, the kernel drops the lock with the process.
    first.kill()
    first.wait(timeout=30)
    second = start(procs, lock_env, "run", "--config", str(other_config))
    wait_for_socket(second, tmp_path / "two" / "control.sock")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0


@pytest.mark.slow
def test_two_run_sim_on_one_data_directory(
    tmp_path: Path, lock_env: dict[str, str], procs: list[subprocess.Popen[str]]
) -> None:
    first = start(procs, lock_env, "run", "--sim", "--data-dir", str(tmp_path))
    wait_for_socket(first, tmp_path / "control.sock")
    code, err = refused(lock_env, "run", "--sim", "--data-dir", str(tmp_path))
    assert code == EXIT_LOCKED
    assert f"(pid {first.pid}; lock file {tmp_path / 'station.lock'})" in err
    assert err.count("\n") == 1, err
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=30) == 0


@pytest.mark.slow
def test_an_unusable_lock_directory_is_one_line_and_exit_78(tmp_path: Path) -> None:
    env = {**os.environ, "EVSE_LOCK_DIR": str(tmp_path / "missing"), "PYTHONWARNINGS": "error"}
    code, err = refused(env, "run", "--sim", "--data-dir", str(tmp_path))
    assert code == EXIT_CONFIG
    assert err.count("\n") == 1, err
    assert err.startswith("evse run: error: cannot lock board tcp://127.0.0.1:")
    assert f"{tmp_path / 'missing'}/evse-board-" in err
    assert "No such file or directory" in err
    # The data directory's own lock was let go again, the store never opened.
    assert list(tmp_path.iterdir()) == []
