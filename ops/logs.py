"""Log lines for whoever reads them: the journal, a person at a terminal, or a program.

Three formats, one handler on the root logger, written to stderr:

* ``journal``: ``<N>logger: message``, where ``<N>`` is the syslog priority
  prefix of sd-daemon(3) (``<2>`` critical, ``<3>`` error, ``<4>`` warning,
  ``<6>`` info, ``<7>`` debug). journald reads the prefix as the entry's
  priority and stamps the entry itself, so the line carries no timestamp of
  its own (two timestamps per line, one of them not journald's, is what the
  plain format gave under systemd). Every line of a multi-line record (a
  traceback) carries the prefix: journald makes one entry per line, and an
  unprefixed line would be filed at the default priority, info.
* ``text``: ``2026-12-02 07:10:04,152 INFO evse.station: message``, for a
  terminal or a file.
* ``json``: one object per record and line, ``{"ts", "level", "logger",
  "message", "exc"}`` (``ts`` UTC ISO 8601 with milliseconds, ``exc`` the
  formatted traceback or null), for log shippers.

``auto`` (the default) is ``journal`` when stderr is the journal and ``text``
otherwise. systemd tells a service its stderr is a journal stream by setting
``$JOURNAL_STREAM`` to ``DEVICE:INODE`` of that stream (systemd.exec(5)); the
variable is inherited by children whose stderr may be something else (a pipe
to ``less``, a file), so it counts only when it names fd 2 itself.

The station's own log files
---------------------------
Besides stderr, ``install_file_logs`` keeps the station's log in its data
directory, for GetDiagnostics and GetLog (OCPP 1.6 §6.27, Security Whitepaper
ed. 3 "GetLog"), which must send the entries of a time window whatever
journald kept:

* ``<data_dir>/log/evse.log``: every record, JSON lines (``ts`` UTC, so a
  window is selected by comparing times, never by parsing local text);
* ``<data_dir>/log/security.log``: the ``evse.security`` logger's records
  alone, i.e. every security event (``ocpp16.security_events``), kept apart so
  that a busy main log never rotates the security history away.

Rotation is by size (``RotatingFileHandler``): ``evse.log`` 2 MiB x 5 files,
``security.log`` 1 MiB x 3 files, 13 MiB at most on the gateway's flash. A
JSON line is about 150 bytes; an idle station logs a few lines an hour and a
charging session a few dozen, so the main log covers months of ordinary use,
and about 18 hours of a fault that logs a line every second (the case where the
window matters most). A security event is one line; 3 MiB hold some 20 000.
Compressed for an upload, 10 MiB of JSON lines is about 1 MB. Files are 0640
(the directory 0750): the log names id tags and addresses.

A security log that was cleared between two runs (the whitepaper's critical
SecurityLogWasCleared) is noticed at the next start: ``security.log``'s inode
and size are kept in ``<data_dir>/security-log.mark`` (outside ``log/``, so
that removing the directory is noticed too) at every start, rotation and
close; at start the file the mark names must still be ``security.log`` or one
of its backups (a rotation we made), at least as long as it was. A missing or
shorter file is ``FileLogs.security_log_cleared`` (the reason, for the
event's techInfo). A kill -9 only leaves the mark older, never longer than
the file, so it raises nothing.

Writes never block the caller for long: the root logger gets a
``QueueHandler`` whose queue a ``QueueListener`` thread drains into the two
files, so the trio thread only formats the message and puts it on a bounded
queue. When the queue is full (a disk that stalls), ordinary records are
dropped and counted (the count is logged once there is room again); a
security record waits for room up to ``SECURITY_WAIT`` seconds first.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

Format = Literal["auto", "journal", "text", "json"]
FORMATS: tuple[Format, ...] = ("auto", "journal", "text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: sd-daemon(3) priorities (syslog's LOG_CRIT .. LOG_DEBUG).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


class LogFormatError(ValueError):
    """An unknown log format (a command-line or configuration value)."""


def parse_format(text: str) -> Format:
    """``text`` as a log format; LogFormatError naming the choices otherwise."""
    value = text.strip().lower()
    if value not in FORMATS:
        raise LogFormatError(f"log format {text!r} is not one of {', '.join(FORMATS)}")
    return value


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level maps to the next one down)."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return _DEBUG_PRIORITY


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the journal stream systemd announced in ``$JOURNAL_STREAM``."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        announced = (int(device), int(inode))
        st = os.fstat(fd)
    except (ValueError, OSError):
        # A malformed variable or a closed stderr: not the journal.
        return False
    return (st.st_dev, st.st_ino) == announced


def resolve(fmt: Format, environ: Mapping[str, str] | None = None, fd: int = 2) -> Format:
    """``auto`` made concrete: journal under systemd's journal, text otherwise."""
    if fmt != "auto":
        return fmt
    return "journal" if stderr_is_journal(environ, fd) else "text"


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` on every line, no timestamp (journald stamps entries)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        exc = None
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        if record.stack_info:
            stack = self.formatStack(record.stack_info)
            exc = stack if exc is None else f"{exc}\n{stack}"
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "exc": exc,
        }
        # default=str: a message argument that is not JSON (a path, an enum) must not
        # lose the record.
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(fmt: Format) -> logging.Formatter:
    """The formatter of a concrete format (``auto`` is resolved first)."""
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise LogFormatError(f"log format {fmt!r} must be resolved first")


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes.

    Not a StreamHandler holding the stream it started with: a test's captured
    stderr is closed after the test, and the handler must not outlive it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the station down
            self.handleError(record)


def configure(
    level: int | str,
    fmt: Format = "auto",
    *,
    environ: Mapping[str, str] | None = None,
    force: bool = False,
) -> Format:
    """Set the root logger's level and its one stderr handler; the format in force.

    Called again (``evse run --config`` learns the format from the file), it
    replaces the handler it installed, never adds a second one. Like
    ``logging.basicConfig``, it leaves a root logger configured by someone
    else (pytest's capture, an embedding program) alone unless ``force``:
    only the level is set then.
    """
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    concrete = resolve(fmt, environ)
    ours = [h for h in root.handlers if isinstance(h, StderrHandler)]
    # The log files' handler (``install_file_logs``) is ours too: it does not make
    # the root logger "configured by someone else".
    others = [h for h in root.handlers if not isinstance(h, StderrHandler | FileLogHandler)]
    if others and not force and not ours:
        return concrete
    for handler in ours:
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(formatter(concrete))
    root.addHandler(handler)
    return concrete


# --- the station's own log files -----------------------------------------------------

#: The logger every security event is written to (``ocpp16.security_events``).
SECURITY_LOGGER = "evse.security"
#: Under the data directory.
LOG_DIR = "log"
MAIN_LOG = "evse.log"
SECURITY_LOG = "security.log"
#: Sizes and counts (see the module docstring for why).
MAIN_MAX_BYTES = 2 * 1024 * 1024
MAIN_BACKUPS = 4
SECURITY_MAX_BYTES = 1024 * 1024
SECURITY_BACKUPS = 2
FILE_MODE = 0o640
DIR_MODE = 0o750
#: Records waiting for the writer thread; past this, records are dropped.
QUEUE_SIZE = 10_000
#: How long a security record waits for room in a full queue (seconds).
SECURITY_WAIT = 0.5

LogKind = Literal["main", "security"]


def log_dir(data_dir: Path) -> Path:
    return Path(data_dir) / LOG_DIR


def log_files(data_dir: Path, kind: LogKind = "main") -> list[Path]:
    """The files of one log that exist, oldest first (``evse.log.4`` .. ``evse.log``)."""
    name = MAIN_LOG if kind == "main" else SECURITY_LOG
    directory = log_dir(data_dir)
    backups: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for path in directory.glob(name + ".*"):
            suffix = path.name[len(name) + 1 :]
            if suffix.isdigit():
                backups.append((int(suffix), path))
    files = [path for _, path in sorted(backups, reverse=True)]
    current = directory / name
    if current.is_file():
        files.append(current)
    return files


def is_security_record(record: logging.LogRecord) -> bool:
    return record.name == SECURITY_LOGGER or record.name.startswith(SECURITY_LOGGER + ".")


#: Where the security log's inode and size are kept between runs (in the data dir).
SECURITY_MARK = "security-log.mark"


def _write_mark(mark: Path, log_file: Path) -> None:
    """Record ``log_file``'s inode and size in ``mark`` (replaced atomically)."""
    try:
        st = log_file.stat()
        tmp = mark.with_name(mark.name + ".tmp")
        tmp.write_text(json.dumps({"ino": st.st_ino, "size": st.st_size}), encoding="utf-8")
        os.replace(tmp, mark)
    except OSError as exc:
        logging.getLogger(__name__).warning("security log mark %s not written: %s", mark, exc)


def security_log_cleared(data_dir: Path) -> str | None:
    """Why the security log counts as cleared since the last run, or None (module
    docstring). No mark (a first start, or one before this rule) is no finding."""
    mark = Path(data_dir) / SECURITY_MARK
    try:
        recorded = json.loads(mark.read_text(encoding="utf-8"))
        ino, size = int(recorded["ino"]), int(recorded["size"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return (
            f"{mark} unreadable ({exc.__class__.__name__}): the security log cannot be vouched for"
        )
    for path in reversed(log_files(data_dir, "security")):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_ino == ino:
            if st.st_size < size:
                return f"{path.name} shrank from {size} to {st.st_size} bytes since the last run"
            return None
    return f"{SECURITY_LOG} of the last run ({size} bytes) is gone from {log_dir(data_dir)}"


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file created (and kept) with ``FILE_MODE``, whatever the umask;
    with ``mark``, the file's inode and size recorded after every rotation."""

    mark: Path | None = None

    def doRollover(self) -> None:  # noqa: N802 - logging's name
        super().doRollover()
        if self.mark is not None:
            _write_mark(self.mark, Path(self.baseFilename))

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(
            self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
        )
        try:
            # A file left by an older firmware or another umask: the mode is ours.
            os.fchmod(fd, FILE_MODE)
            return open(fd, "a", encoding="utf-8", errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


class FileLogHandler(logging.handlers.QueueHandler):
    """The root logger's side of the log files: format the message, queue the record.

    Unlike ``QueueHandler.prepare``, the traceback is kept apart (``exc_text``), so
    the file's JSON line has it in ``exc`` as the stderr JSON format does.
    """

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.records = records
        self._exc_formatter = logging.Formatter()
        #: Records dropped because the queue was full, not yet reported.
        self._unreported = 0
        #: Every record dropped since install.
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exc_formatter.formatException(record.exc_info)
        record.message = message
        record.msg = message
        record.args = None
        record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        # Called under the handler's lock (Handler.handle): the counters are safe.
        if self._unreported:
            note = logging.LogRecord(
                __name__,
                logging.WARNING,
                __file__,
                0,
                f"{self._unreported} log record(s) not written to the log files (queue full)",
                None,
                None,
            )
            try:
                self.records.put_nowait(note)
                self._unreported = 0
            except queue.Full:
                pass
        try:
            self.records.put_nowait(record)
            return
        except queue.Full:
            if is_security_record(record):
                try:
                    self.records.put(record, timeout=SECURITY_WAIT)
                    return
                except queue.Full:
                    pass
        self.dropped += 1
        self._unreported += 1


@dataclass
class FileLogs:
    """The log files in force (``install_file_logs``); ``close()`` stops them."""

    directory: Path
    main: Path
    security: Path
    handler: FileLogHandler
    listener: logging.handlers.QueueListener
    _security_level: int
    #: Why the security log counts as cleared since the last run (None: it does not).
    security_log_cleared: str | None = None
    _mark: Path | None = None
    _closed: bool = False

    @property
    def dropped(self) -> int:
        """Records dropped because the writer could not keep up."""
        return self.handler.dropped

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is in the files; False on timeout."""
        done = threading.Event()
        marker = logging.LogRecord(__name__, logging.DEBUG, __file__, 0, "", None, None)
        marker.flush_event = done
        try:
            self.handler.records.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self) -> None:
        """Remove the handler, write what is queued, close the files. Twice is harmless."""
        if self._closed:
            return
        self._closed = True
        _current[:] = [logs for logs in _current if logs is not self]
        logging.getLogger().removeHandler(self.handler)
        self.listener.stop()
        for handler in self.listener.handlers:
            handler.close()
        if self._mark is not None:
            _write_mark(self._mark, self.security)
        logging.getLogger(SECURITY_LOGGER).setLevel(self._security_level)

    def __enter__(self) -> FileLogs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Listener(logging.handlers.QueueListener):
    """Hands records to the files; a flush marker (``FileLogs.flush``) is answered."""

    def __init__(self, records: queue.Queue[logging.LogRecord], *handlers: logging.Handler) -> None:
        super().__init__(records, *handlers, respect_handler_level=True)
        self._records: queue.Queue[Any] = records

    def enqueue_sentinel(self) -> None:
        # QueueListener's put_nowait would raise on a full queue: wait for room
        # instead (the handler is already removed, so only this thread drains it).
        # Its sentinel is None (logging.handlers.QueueListener._sentinel).
        self._records.put(None)

    def handle(self, record: logging.LogRecord) -> None:
        event = getattr(record, "flush_event", None)
        if event is not None:
            for handler in self.handlers:
                handler.flush()
            event.set()
            return
        super().handle(record)


#: The FileLogs in force (one at a time: installing again replaces it).
_current: list[FileLogs] = []


def install_file_logs(
    data_dir: Path,
    *,
    max_bytes: int = MAIN_MAX_BYTES,
    backups: int = MAIN_BACKUPS,
    security_max_bytes: int = SECURITY_MAX_BYTES,
    security_backups: int = SECURITY_BACKUPS,
    queue_size: int = QUEUE_SIZE,
) -> FileLogs:
    """Start the station's log files under ``<data_dir>/log/`` (see the module docstring).

    Every record of the root logger goes to ``evse.log``; the ``evse.security``
    records also go to ``security.log``. The ``evse.security`` logger is set to
    INFO (when it would filter more) so that no security event is ever left out
    by a quieter root level. Called again, it replaces the files it started.
    OSError when the directory cannot be made or a file opened.
    """
    while _current:
        _current[0].close()
    cleared = security_log_cleared(data_dir)
    directory = log_dir(data_dir)
    directory.mkdir(mode=DIR_MODE, exist_ok=True)
    mark = Path(data_dir) / SECURITY_MARK
    formatter = JsonFormatter()
    main = _PrivateRotatingFileHandler(
        directory / MAIN_LOG, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    try:
        security = _PrivateRotatingFileHandler(
            directory / SECURITY_LOG,
            maxBytes=security_max_bytes,
            backupCount=security_backups,
            encoding="utf-8",
        )
    except BaseException:
        main.close()
        raise
    # The file is open (created if it was not there): its inode is the one to follow.
    _write_mark(mark, directory / SECURITY_LOG)
    security.mark = mark
    main.setFormatter(formatter)
    security.setFormatter(formatter)
    security.addFilter(is_security_record)
    records: queue.Queue[logging.LogRecord] = queue.Queue(queue_size)
    handler = FileLogHandler(records)
    listener = _Listener(records, main, security)
    security_logger = logging.getLogger(SECURITY_LOGGER)
    level = security_logger.level
    if security_logger.getEffectiveLevel() > logging.INFO:
        security_logger.setLevel(logging.INFO)
    listener.start()
    logging.getLogger().addHandler(handler)
    logs = FileLogs(
        directory=directory,
        main=directory / MAIN_LOG,
        security=directory / SECURITY_LOG,
        handler=handler,
        listener=listener,
        _security_level=level,
        security_log_cleared=cleared,
        _mark=mark,
    )
    _current.append(logs)
    return logs


# --- reading a time window ---------------------------------------------------------------


def entry_time(line: str) -> datetime | None:
    """The UTC time of one JSON log line (its ``ts``), None if it is not one."""
    try:
        entry: Any = json.loads(line)
    except ValueError:
        return None
    ts = entry.get("ts") if isinstance(entry, dict) else None
    if not isinstance(ts, str):
        return None
    try:
        at = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def select_lines(
    paths: Sequence[Path], start: datetime | None = None, stop: datetime | None = None
) -> Iterator[str]:
    """The JSON lines of ``paths`` (oldest file first) whose time is within
    ``start``..``stop`` (both inclusive; None: open), in file order.

    Every line is compared (no search by position): the system clock may have
    been stepped, so a file's times are not always in order. A line that is not a
    JSON entry (torn by a power loss) is left out. Every file is opened before
    any is read, so a rotation meanwhile neither skips nor repeats a file.
    """
    for at in (start, stop):
        if at is not None and at.utcoffset() is None:
            raise ValueError(f"naive datetime {at.isoformat()} (a timezone is required)")
    files: list[IO[str]] = []
    try:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                files.append(path.open(encoding="utf-8", errors="replace"))
        for file in files:
            for raw in file:
                line = raw.rstrip("\n")
                at = entry_time(line)
                if at is None:
                    continue
                if start is not None and at < start:
                    continue
                if stop is not None and at > stop:
                    continue
                yield line
    finally:
        for file in files:
            file.close()
