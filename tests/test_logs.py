"""ops/logs.py: journald lines (priority prefix, no timestamp) when stderr is the journal,
timestamped text otherwise, JSON lines when asked (issue 9: two timestamps, no severity);
the station's own rotating JSON log files and their time windows (issue 10)."""

from __future__ import annotations

import json
import logging
import os
import queue as queue_module
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ops import logs

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def record(
    level: int, message: str, *args: object, exc: bool = False, name: str = "evse.station"
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("the store is gone")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, message, args, exc_info)


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.INFO + 5, 6),  # a custom level between INFO and WARNING
        (1, 7),
    ],
)
def test_priorities_are_sd_daemons(level: int, prio: int) -> None:
    assert logs.priority(level) == prio
    assert logs.JournalFormatter().format(record(level, "x")) == f"<{prio}>evse.station: x"


def test_every_line_of_a_traceback_keeps_the_priority() -> None:
    text = logs.JournalFormatter().format(record(logging.ERROR, "store %s", "failed", exc=True))
    lines = text.splitlines()
    assert lines[0] == "<3>evse.station: store failed"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>RuntimeError: the store is gone"
    assert all(line.startswith("<3>") for line in lines)
    # No timestamp: journald stamps each entry itself.
    assert not re.search(r"\d\d:\d\d:\d\d", text)


def test_json_lines_have_the_five_fields() -> None:
    fmt = logs.JsonFormatter()
    entry = json.loads(fmt.format(record(logging.WARNING, "meter %s: %s", 2, Path("/dev/x"))))
    assert set(entry) == {"ts", "level", "logger", "message", "exc"}
    assert entry["level"] == "WARNING" and entry["logger"] == "evse.station"
    assert entry["message"] == "meter 2: /dev/x"
    assert entry["exc"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    line = fmt.format(record(logging.ERROR, "multi\nline", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "multi\nline"
    assert (
        entry["exc"].startswith("Traceback") and "RuntimeError: the store is gone" in entry["exc"]
    )


def test_the_journal_is_recognized_only_on_fd_2_itself(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    other = tmp_path / "other"
    with journal.open("w") as j, other.open("w") as o:
        st = os.fstat(j.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.stderr_is_journal(env, j.fileno())
        assert logs.resolve("auto", env, j.fileno()) == "journal"
        # Inherited by a child whose stderr is something else: not the journal.
        assert not logs.stderr_is_journal(env, o.fileno())
        assert logs.resolve("auto", env, o.fileno()) == "text"
        # An explicit format is kept whatever stderr is.
        assert logs.resolve("json", env, j.fileno()) == "json"
        for bad in ("", "12", "x:y", f"{st.st_dev}:", ":"):
            assert not logs.stderr_is_journal({"JOURNAL_STREAM": bad}, j.fileno())
        assert not logs.stderr_is_journal({}, j.fileno())


def test_a_closed_stderr_is_not_the_journal(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    st = os.fstat(fd)
    os.close(fd)
    assert not logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)


def test_formats_are_parsed_with_the_choices_named() -> None:
    assert logs.parse_format(" JSON ") == "json"
    with pytest.raises(logs.LogFormatError, match="'xml' is not one of auto, journal, text, json"):
        logs.parse_format("xml")


@pytest.fixture
def our_handler() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, logs.StderrHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_configure_replaces_its_handler_and_writes_to_the_current_stderr(
    our_handler: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    # Under pytest the root logger has pytest's handlers: left alone without force.
    assert logs.configure("info", "json") == "json"
    assert not any(isinstance(h, logs.StderrHandler) for h in root.handlers)
    assert root.level == logging.INFO
    logs.configure(logging.INFO, "json", force=True)
    logs.configure(logging.DEBUG, "journal", environ={})
    ours = [h for h in root.handlers if isinstance(h, logs.StderrHandler)]
    assert len(ours) == 1
    logging.getLogger("ops.run").debug("station %s running", "CP-1")
    assert capsys.readouterr().err == "<7>ops.run: station CP-1 running\n"
    logs.configure(logging.INFO, "auto", environ={})
    logging.getLogger("ops.run").info("again")
    assert TEXT_LINE.match(capsys.readouterr().err)


# --- evse run as systemd runs it -------------------------------------------------------


def run_sim_with_stderr(
    tmp_path: Path, stderr_path: Path, *args: str, env: dict[str, str] | None = None
) -> list[str]:
    """``evse run --sim`` with stderr on a file, until it logs "running"; its lines."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    with stderr_path.open("w") as err:
        environ = {**os.environ, "PYTHONWARNINGS": "error", "EVSE_LOCK_DIR": str(tmp_path)}
        environ.pop("JOURNAL_STREAM", None)
        if env is not None:
            st = os.fstat(err.fileno())
            environ.update({k: v.format(dev=st.st_dev, ino=st.st_ino) for k, v in env.items()})
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", "--sim", "--data-dir", str(data), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=environ,
        )
        try:
            deadline = time.monotonic() + 30
            while " running; control socket" not in stderr_path.read_text():
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, stderr_path.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, stderr_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return stderr_path.read_text().splitlines()


@pytest.mark.slow
def test_under_the_journal_each_line_has_its_priority_and_no_timestamp(tmp_path: Path) -> None:
    lines = run_sim_with_stderr(
        tmp_path, tmp_path / "journal", env={"JOURNAL_STREAM": "{dev}:{ino}"}
    )
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
    running = [line for line in lines if " running; control socket" in line]
    assert running and running[0].startswith("<6>ops.run: station ")
    assert not any(TEXT_LINE.match(line[3:]) for line in lines)


@pytest.mark.slow
def test_elsewhere_lines_are_timestamped_text(tmp_path: Path) -> None:
    # JOURNAL_STREAM inherited from a unit but naming another stream: not the journal.
    lines = run_sim_with_stderr(tmp_path, tmp_path / "err", env={"JOURNAL_STREAM": "1:{ino}"})
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines


@pytest.mark.slow
def test_log_format_json_is_one_object_per_line(tmp_path: Path) -> None:
    lines = run_sim_with_stderr(
        tmp_path, tmp_path / "err", "--log-format", "json", env={"JOURNAL_STREAM": "{dev}:{ino}"}
    )
    entries: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert all(set(e) == {"ts", "level", "logger", "message", "exc"} for e in entries)
    assert any(
        e["logger"] == "ops.run" and e["level"] == "INFO" and "running" in e["message"]
        for e in entries
    )


# --- the station's own log files (issue 10) ------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def chatty() -> Iterator[logging.Logger]:
    """A logger that passes DEBUG whatever the root level (pytest leaves it at WARNING)."""
    logger = logging.getLogger("evse.test_logs")
    logger.setLevel(logging.DEBUG)
    yield logger
    logger.setLevel(logging.NOTSET)


def test_every_record_goes_to_evse_log_and_security_records_also_to_security_log(
    tmp_path: Path, chatty: logging.Logger
) -> None:
    with logs.install_file_logs(tmp_path) as files:
        chatty.info("meter %d answered", 2)
        logging.getLogger("evse.security").info("StartupOfTheDevice (critical)")
        logging.getLogger("evse.security.sub").warning("InvalidMessages: 3 frames")
        try:
            raise RuntimeError("the board is gone")
        except RuntimeError:
            chatty.exception("poll %s failed", "board")
        assert files.flush()
        assert files.main == tmp_path / "log" / "evse.log"
        main = json_lines(files.main)
        security = json_lines(files.security)
    assert [e["message"] for e in main] == [
        "meter 2 answered",
        "StartupOfTheDevice (critical)",
        "InvalidMessages: 3 frames",
        "poll board failed",
    ]
    assert all(set(e) == {"ts", "level", "logger", "message", "exc"} for e in main)
    # The traceback is kept apart from the message, as on stderr's JSON format.
    assert main[3]["exc"].startswith("Traceback") and "the board is gone" in main[3]["exc"]
    assert [e["message"] for e in security] == [
        "StartupOfTheDevice (critical)",
        "InvalidMessages: 3 frames",
    ]
    assert [e["logger"] for e in security] == ["evse.security", "evse.security.sub"]
    for entry in main:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])


def test_files_are_0640_in_a_0750_directory_whatever_the_umask(
    tmp_path: Path, chatty: logging.Logger
) -> None:
    (tmp_path / "log").mkdir(mode=0o700)
    (tmp_path / "log" / "security.log").write_text("")
    (tmp_path / "log" / "security.log").chmod(0o666)  # left by someone else
    old = os.umask(0)
    try:
        with logs.install_file_logs(tmp_path, max_bytes=300, backups=1) as files:
            for n in range(10):
                chatty.info("line %d of some length to rotate quickly", n)
            assert files.flush()
    finally:
        os.umask(old)
    assert (tmp_path / "log" / "evse.log.1").exists()
    for path in (files.main, files.security, tmp_path / "log" / "evse.log.1"):
        assert mode_of(path) == 0o640, path
    # An existing directory keeps its (stricter) mode; a new one is 0750.
    assert mode_of(tmp_path / "log") == 0o700
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with logs.install_file_logs(fresh):
        pass
    assert mode_of(fresh / "log") == 0o750 & ~old


def test_rotation_keeps_the_count_and_the_size_and_loses_only_the_oldest(
    tmp_path: Path, chatty: logging.Logger
) -> None:
    with logs.install_file_logs(tmp_path, max_bytes=2000, backups=2) as files:
        for n in range(200):
            chatty.info("record %03d", n)
        assert files.flush()
    names = sorted(p.name for p in (tmp_path / "log").iterdir())
    assert names == ["evse.log", "evse.log.1", "evse.log.2", "security.log"]
    paths = logs.log_files(tmp_path)
    assert [p.name for p in paths] == ["evse.log.2", "evse.log.1", "evse.log"]
    kept: list[int] = []
    for path in paths:
        assert path.stat().st_size <= 2000
        kept += [int(e["message"].split()[1]) for e in json_lines(path)]
    # Oldest first across the files, consecutive, ending with the last record.
    assert kept == list(range(kept[0], 200))
    assert kept[0] > 0  # the oldest went
    assert logs.log_files(tmp_path, "security") == [tmp_path / "log" / "security.log"]


def test_the_security_logger_passes_info_while_installed(tmp_path: Path) -> None:
    security = logging.getLogger("evse.security")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with logs.install_file_logs(tmp_path) as files:
            security.info("ResetOrReboot (critical)")
            logging.getLogger("evse.other").info("not at WARNING")
            assert files.flush()
            assert [e["message"] for e in json_lines(files.security)] == [
                "ResetOrReboot (critical)"
            ]
            assert [e["message"] for e in json_lines(files.main)] == ["ResetOrReboot (critical)"]
        assert security.level == logging.NOTSET  # restored
    finally:
        root.setLevel(level)


def test_installing_again_replaces_and_close_removes_the_handler(tmp_path: Path) -> None:
    root = logging.getLogger()
    (tmp_path / "a").mkdir()
    first = logs.install_file_logs(tmp_path / "a")
    second = logs.install_file_logs(tmp_path)
    try:
        ours = [h for h in root.handlers if isinstance(h, logs.FileLogHandler)]
        assert ours == [second.handler]
        assert first.handler not in root.handlers
    finally:
        second.close()
        second.close()  # twice is harmless
        first.close()
    assert not any(isinstance(h, logs.FileLogHandler) for h in root.handlers)


def test_configure_still_installs_stderr_beside_the_file_handler(
    tmp_path: Path, our_handler: None
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # as in `evse run`: no pytest handlers
    try:
        with logs.install_file_logs(tmp_path):
            logs.configure(logging.INFO, "json", environ={})
            assert sum(isinstance(h, logs.StderrHandler) for h in root.handlers) == 1
    finally:
        root.handlers = saved


def test_a_full_queue_drops_ordinary_records_counts_them_and_says_so() -> None:
    records: queue_module.Queue[logging.LogRecord] = queue_module.Queue(1)
    handler = logs.FileLogHandler(records)
    for n in range(3):
        handler.handle(record(logging.INFO, "r%d", n))
    assert handler.dropped == 2
    assert records.get_nowait().getMessage() == "r0"
    handler.handle(record(logging.INFO, "r3"))
    # The note about the lost records goes first; r3 finds no room after it.
    note = records.get_nowait()
    assert note.levelno == logging.WARNING
    assert note.getMessage() == "2 log record(s) not written to the log files (queue full)"
    assert handler.dropped == 3


class RoomAfterWaiting(queue_module.Queue[logging.LogRecord]):
    """A full queue whose writer frees a place while a ``put`` waits."""

    waits: list[float | None]

    def put(
        self, item: logging.LogRecord, block: bool = True, timeout: float | None = None
    ) -> None:
        if block:  # put_nowait is put(block=False): no wait, no room
            self.waits.append(timeout)
            self.get_nowait()
        super().put(item, block, timeout)


def test_a_security_record_waits_for_room_in_a_full_queue() -> None:
    records = RoomAfterWaiting(1)
    records.waits = []
    records.put_nowait(record(logging.INFO, "filler"))
    handler = logs.FileLogHandler(records)
    handler.handle(record(logging.INFO, "ordinary"))
    assert handler.dropped == 1 and records.waits == []  # put_nowait only, then dropped
    handler.handle(record(logging.WARNING, "InvalidMessages", name="evse.security"))
    assert records.waits == [logs.SECURITY_WAIT]
    assert handler.dropped == 1
    assert records.get_nowait().getMessage() == "InvalidMessages"


def entry_line(at: datetime, message: str) -> str:
    rec = record(logging.INFO, message)
    rec.created = at.timestamp()
    return logs.JsonFormatter().format(rec)


def test_window_selection_is_by_time_inclusive_across_files_and_clock_steps(
    tmp_path: Path,
) -> None:
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    directory = tmp_path / "log"
    directory.mkdir()
    older = [entry_line(t0 + timedelta(seconds=s), f"old {s}") for s in (0, 10, 20)]
    (directory / "evse.log.1").write_text("\n".join(older) + "\n")
    newer = [
        entry_line(t0 + timedelta(seconds=30), "new 30"),
        '{"ts": "2026-03-01T12:00:35.000Z", "level": "INFO", "log',  # torn by a power loss
        "plain text, not an entry",
        # The clock was stepped back: this line is in the window though it comes later.
        entry_line(t0 + timedelta(seconds=15), "stepped 15"),
        entry_line(t0 + timedelta(seconds=40), "new 40"),
    ]
    (directory / "evse.log").write_text("\n".join(newer) + "\n")

    def select(start: datetime | None, stop: datetime | None) -> list[str]:
        lines = logs.select_lines(logs.log_files(tmp_path), start, stop)
        return [json.loads(line)["message"] for line in lines]

    assert select(None, None) == ["old 0", "old 10", "old 20", "new 30", "stepped 15", "new 40"]
    # Bounds are inclusive, to the millisecond the line carries.
    assert select(t0 + timedelta(seconds=10), t0 + timedelta(seconds=30)) == [
        "old 10",
        "old 20",
        "new 30",
        "stepped 15",
    ]
    assert select(t0 + timedelta(seconds=10, milliseconds=1), t0 + timedelta(seconds=29)) == [
        "old 20",
        "stepped 15",
    ]
    assert select(t0 + timedelta(seconds=41), None) == []
    with pytest.raises(ValueError, match="naive"):
        list(logs.select_lines([], datetime(2026, 3, 1), None))


def test_closing_waits_for_room_for_the_writers_stop_mark() -> None:
    records = RoomAfterWaiting(1)
    records.waits = []
    records.put_nowait(record(logging.INFO, "the writer is behind"))
    listener = logs._Listener(records)
    listener.enqueue_sentinel()  # QueueListener's own would raise queue.Full here
    assert records.waits == [None]
    assert records.get_nowait() is None  # QueueListener's sentinel


# --- SecurityLogWasCleared: the mark kept between runs -------------------------------------


def security_record(text: str) -> None:
    logging.getLogger("evse.security").info(text)


def test_a_first_start_and_plain_restarts_find_nothing(tmp_path: Path) -> None:
    for run in range(3):
        with logs.install_file_logs(tmp_path) as files:
            assert files.security_log_cleared is None, run
            security_record(f"StartupOfTheDevice (critical) run {run}")
            assert files.flush()


def test_our_own_rotations_are_not_a_clearing(tmp_path: Path) -> None:
    with logs.install_file_logs(tmp_path, security_max_bytes=600, security_backups=2) as files:
        for n in range(40):
            security_record(f"InvalidMessages {n:03d}")
        assert files.flush()
        # Rotated many times, the oldest rotated away (three files kept).
        assert len(logs.log_files(tmp_path, "security")) == 3
    with logs.install_file_logs(tmp_path, security_max_bytes=600, security_backups=2) as files:
        assert files.security_log_cleared is None


def test_a_rotation_seen_from_a_mark_left_before_it_is_not_a_clearing(tmp_path: Path) -> None:
    mark = tmp_path / logs.SECURITY_MARK
    with logs.install_file_logs(tmp_path, security_max_bytes=600, security_backups=3) as files:
        security_record("StartupOfTheDevice (critical)")
        assert files.flush()
        before = mark.read_bytes()
        for n in range(6):
            security_record(f"InvalidMessages {n:03d} " + "x" * 60)
        assert files.flush()
        assert len(logs.log_files(tmp_path, "security")) >= 2
    # As if killed -9 right after the first rotation: the old mark names security.log.N.
    mark.write_bytes(before)
    with logs.install_file_logs(tmp_path, security_max_bytes=600, security_backups=3) as files:
        assert files.security_log_cleared is None


@pytest.mark.parametrize("how", ["deleted", "truncated", "directory removed", "mark garbled"])
def test_a_cleared_security_log_is_found_at_the_next_start(tmp_path: Path, how: str) -> None:
    with logs.install_file_logs(tmp_path) as files:
        for n in range(5):
            security_record(f"ReconfigurationOfSecurityParameters {n}")
        assert files.flush()
    security = tmp_path / "log" / "security.log"
    size = security.stat().st_size
    if how == "deleted":
        security.unlink()
    elif how == "truncated":
        with security.open("r+") as f:
            f.truncate(size // 2)
    elif how == "directory removed":
        for path in (tmp_path / "log").iterdir():
            path.unlink()
        (tmp_path / "log").rmdir()
    else:
        (tmp_path / logs.SECURITY_MARK).write_text("{not json")
    with logs.install_file_logs(tmp_path) as files:
        reason = files.security_log_cleared
        assert reason is not None
        if how == "truncated":
            assert f"from {size} to {size // 2} bytes" in reason
        elif how == "mark garbled":
            assert "cannot be vouched for" in reason
        else:
            assert "is gone" in reason and f"({size} bytes)" in reason
    # Said once: the next start follows the new file.
    with logs.install_file_logs(tmp_path) as files:
        assert files.security_log_cleared is None
