"""Diagnostics and log archives: what GetDiagnostics and GetLog upload.

GetDiagnostics (OCPP 1.6 §4.4 / §6.27) asks for "diagnostic information"
between an optional startTime and stopTime; GetLog (Security Whitepaper ed. 3,
"GetLog") for the DiagnosticsLog or the SecurityLog between oldestTimestamp
and latestTimestamp. Both are answered with a file name and the file is
uploaded afterwards; both omit the name when there is nothing to send. This
module makes the files; the firmware profile uploads them.

``build_diagnostics`` makes one zip archive (a central system's operator opens
it anywhere; Python writes it without a dependency):

* ``manifest.json``: station, firmware version, Python, when it was made, the
  window, what each member holds;
* ``evse.log``: the station's log entries within the window (JSON lines from
  the rotating files of ``ops.logs``, security events included);
* ``configuration.json``: every configuration key and installer setting as
  ``Configuration.row`` shows it: a secret (``Access.W``: the AuthorizationKey)
  reads only "set" or "not set"; certificate and key settings are paths, and
  no key or certificate file is read;
* ``queue.json``: the transaction queue (count, the first messages, dead
  letters) and, when given, the security event queue; actions, times,
  attempts and errors, not payloads;
* ``transactions.json``: the latest transactions that overlap the window.

``build_log`` makes a zip of one log (``evse.log`` or ``security.log``) within
the window.

Nothing secret leaves the device: besides what is never included, every text
put in an archive goes through ``redact``: the value of every secret key (the
AuthorizationKey, in any letter case: it is hex), any PEM private key block,
and the password of any URL (``ftp://user:pass@...``) are replaced, so even a
log line that quoted one by mistake is sent without it.

"Nothing to send" (None): no log entry in the window and no transaction
overlapping it (GetDiagnostics), no entry of the log in the window (GetLog),
or a window that ends before it starts.

File names say what they are to the person who sees them in a central
system: ``<station id>-<what>-<UTC time>.zip``, e.g.
``CP-1-diagnostics-20261202T153245Z.zip`` (the station id with anything but
letters, digits, ``.``, ``-`` and ``_`` replaced, the whole within the 255
characters of GetDiagnostics.conf fileName).

Blocking (file and SQLite reads, compression): call in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from ops import logs

if TYPE_CHECKING:
    from evse.store import Store, TransactionRecord
    from ocpp16.config import Configuration
    from ocpp16.queue import SecurityEventQueue, TransactionQueue

LogType = Literal["DiagnosticsLog", "SecurityLog"]
LOG_TYPES: Final[tuple[LogType, ...]] = ("DiagnosticsLog", "SecurityLog")

#: What replaces a secret in an archive.
REDACTED: Final = "[redacted]"
#: The latest transactions included (those overlapping the window).
RECENT_TRANSACTIONS: Final = 20
#: Queued messages and dead letters listed (the counts are always complete).
QUEUE_LISTED: Final = 50
#: GetDiagnostics.conf / GetLog.conf fileName is string(255).
MAX_FILE_NAME: Final = 255
FILE_MODE: Final = 0o640

_PRIVATE_KEY: Final = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|$)",
    re.DOTALL,
)
#: scheme://user:password@ (RFC 3986 userinfo): the password goes.
_URL_PASSWORD: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"']*:)[^\s/@\"']*@")
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the secrets, private keys and URL passwords (module docstring)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    text = _PRIVATE_KEY.sub(f"-----{REDACTED} PRIVATE KEY-----", text)
    return _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)


def secrets_of(registry: Configuration) -> list[str]:
    """The values of the registry's secret (write-only) keys, by its own flags."""
    found: list[str] = []
    for key in registry.keys:
        if key.secret:
            value = registry.value(key.name)
            if isinstance(value, str) and value:
                found.append(value)
    return found


def archive_name(station_id: str, what: str, at: datetime) -> str:
    """``<station id>-<what>-<YYYYmmddTHHMMSSZ>.zip``, at most 255 characters."""
    stamp = at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    station = _UNSAFE.sub("_", station_id) or "station"
    tail = f"-{what}-{stamp}.zip"
    return station[: MAX_FILE_NAME - len(tail)] + tail


def _utc(at: datetime | None) -> str | None:
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n"


def _empty_window(start: datetime | None, stop: datetime | None) -> bool:
    return start is not None and stop is not None and stop < start


def _overlaps(record: TransactionRecord, start: datetime | None, stop: datetime | None) -> bool:
    if stop is not None and record.started_at > stop:
        return False
    end = record.stopped_at
    return not (start is not None and end is not None and end < start)


def _transaction(record: TransactionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "connectorId": record.connector_id,
        "idTag": record.id_tag,
        "startedAt": _utc(record.started_at),
        "meterStartWh": record.meter_start_wh,
        "lastMeterAt": _utc(record.last_meter_at),
        "lastMeterWh": record.last_meter_wh,
        "stoppedAt": _utc(record.stopped_at),
        "meterStopWh": record.meter_stop_wh,
        "stopReason": record.stop_reason,
        "stopIdTag": record.stop_id_tag,
        "reservationId": record.reservation_id,
    }


def _configuration(registry: Configuration) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key in registry.keys:
        # Configuration.row: a secret's value and default read "set" / "not set".
        row = registry.row(key)
        rows.append(
            {
                "key": row["key"],
                "name": row["name"],
                "ocpp": row["ocpp"] is not None,
                "value": row["value"],
                "default": row["default"],
                "source": row["source"],
                "readonly": row["readonly"],
                "secret": row["secret"],
            }
        )
    return rows


def _queues(queue: TransactionQueue, security: SecurityEventQueue | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "transactionMessages": {
            "pending": queue.pending_count(),
            "first": [
                {
                    "seq": m.seq,
                    "action": m.action,
                    "localTransactionId": m.local_tx_id,
                    "attempts": m.attempts,
                    "createdAt": _utc(m.created_at),
                    "lastError": m.last_error,
                }
                for m in queue.pending(QUEUE_LISTED)
            ],
            "deadLetters": [
                {
                    "seq": d.seq,
                    "action": d.action,
                    "localTransactionId": d.local_tx_id,
                    "attempts": d.attempts,
                    "reason": d.reason,
                    "createdAt": _utc(d.created_at),
                    "diedAt": _utc(d.died_at),
                }
                for d in queue.dead_letters(QUEUE_LISTED)
            ],
        }
    }
    if security is not None:
        summary["securityEvents"] = {
            "pending": security.pending_count(),
            "first": [
                {
                    "seq": e.seq,
                    "type": e.event_type,
                    "critical": e.critical,
                    "attempts": e.attempts,
                    "createdAt": _utc(e.created_at),
                    "lastError": e.last_error,
                }
                for e in security.pending(QUEUE_LISTED)
            ],
            "givenUp": [
                {
                    "seq": d.seq,
                    "type": d.event_type,
                    "critical": d.critical,
                    "attempts": d.attempts,
                    "reason": d.reason,
                    "createdAt": _utc(d.created_at),
                    "diedAt": _utc(d.died_at),
                }
                for d in security.dead()
            ],
        }
    return summary


def _write_zip(path: Path, members: Sequence[tuple[str, str]], at: datetime) -> None:
    """The archive at ``path``, written beside it and renamed, mode ``FILE_MODE``."""
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as file:
            with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                stamp = at.astimezone(UTC).timetuple()[:6]
                for name, text in members:
                    info = zipfile.ZipInfo(name, date_time=stamp)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = (0o100000 | FILE_MODE) << 16
                    archive.writestr(info, text.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        part.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def _lines(
    data_dir: Path,
    kind: logs.LogKind,
    start: datetime | None,
    stop: datetime | None,
    secrets: Sequence[str],
) -> list[str]:
    return [
        redact(line, secrets)
        for line in logs.select_lines(logs.log_files(data_dir, kind), start, stop)
    ]


def build_diagnostics(
    out_dir: Path,
    *,
    start: datetime | None,
    stop: datetime | None,
    data_dir: Path,
    registry: Configuration,
    queue: TransactionQueue,
    store: Store,
    version: str,
    security_queue: SecurityEventQueue | None = None,
    station_id: str | None = None,
    now: datetime | None = None,
) -> Path | None:
    """The GetDiagnostics archive in ``out_dir`` (module docstring), or None when
    there is nothing to send. ``station_id`` defaults to the ChargePointId key."""
    if _empty_window(start, stop):
        return None
    at = now or datetime.now(UTC)
    secrets = secrets_of(registry)
    lines = _lines(data_dir, "main", start, stop, secrets)
    transactions = [
        _transaction(r)
        for r in store.transactions(limit=RECENT_TRANSACTIONS * 10)
        if _overlaps(r, start, stop)
    ][:RECENT_TRANSACTIONS]
    if not lines and not transactions:
        return None
    station = station_id if station_id is not None else registry.get_str("ChargePointId")
    manifest = {
        "station": station,
        "firmwareVersion": version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "createdAt": _utc(at),
        "window": {"start": _utc(start), "stop": _utc(stop)},
        "members": {
            "evse.log": f"{len(lines)} log entries (JSON lines, ts in UTC) within the window",
            "configuration.json": "every setting; secrets read only 'set' or 'not set'",
            "queue.json": "queued and dead transaction messages and security events",
            "transactions.json": f"the latest {len(transactions)} transactions in the window",
        },
    }
    members = [
        ("manifest.json", _json(manifest)),
        ("evse.log", "".join(line + "\n" for line in lines)),
        ("configuration.json", _json(_configuration(registry))),
        ("queue.json", _json(_queues(queue, security_queue))),
        ("transactions.json", _json(transactions)),
    ]
    path = Path(out_dir) / archive_name(station or "station", "diagnostics", at)
    _write_zip(path, [(name, redact(text, secrets)) for name, text in members], at)
    return path


def build_log(
    out_dir: Path,
    kind: LogType,
    *,
    start: datetime | None,
    stop: datetime | None,
    data_dir: Path,
    station_id: str = "station",
    secrets: Sequence[str] = (),
    now: datetime | None = None,
) -> Path | None:
    """The GetLog archive of ``kind`` (DiagnosticsLog: the main log; SecurityLog: the
    security log) within the window, or None when it holds no entry. ``secrets``:
    values to redact besides private keys and URL passwords (``secrets_of``)."""
    if kind not in LOG_TYPES:
        raise ValueError(f"log type {kind!r} is not one of {', '.join(LOG_TYPES)}")
    if _empty_window(start, stop):
        return None
    file_kind: logs.LogKind = "security" if kind == "SecurityLog" else "main"
    lines = _lines(data_dir, file_kind, start, stop, secrets)
    if not lines:
        return None
    at = now or datetime.now(UTC)
    member = logs.SECURITY_LOG if kind == "SecurityLog" else logs.MAIN_LOG
    path = Path(out_dir) / archive_name(station_id, kind, at)
    _write_zip(path, [(member, "".join(line + "\n" for line in lines))], at)
    return path


__all__ = [
    "LOG_TYPES",
    "REDACTED",
    "LogType",
    "archive_name",
    "build_diagnostics",
    "build_log",
    "redact",
    "secrets_of",
]
