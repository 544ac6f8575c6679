"""ops/logs.py: journald lines (priority prefix, no timestamp) when stderr is the journal,
timestamped text otherwise, JSON lines when asked (issue 9: two timestamps, no severity)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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
