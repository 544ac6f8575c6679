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
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

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
    others = [h for h in root.handlers if not isinstance(h, StderrHandler)]
    if others and not force and not ours:
        return concrete
    for handler in ours:
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(formatter(concrete))
    root.addHandler(handler)
    return concrete
