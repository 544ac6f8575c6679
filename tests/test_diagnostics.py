"""Diagnostics and log archives (ops/diagnostics.py): what GetDiagnostics and GetLog
upload. Real files: the station's store, registry, transaction and security event
queues on one SQLite file, log files written by ``ops.logs``; every archive opened
and every member read back.

The secrets test plants the AuthorizationKey, a private key PEM and a URL password
where a careless log line or an error text would put them, and looks for them in
every byte of the archive, compressed and decompressed.
"""

from __future__ import annotations

import json
import logging
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evse.store import Store
from ocpp16.config import Configuration
from ocpp16.queue import SecurityEventQueue, TransactionQueue
from ops import diagnostics, logs

T0 = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
#: The AuthorizationKey: hex, mixed case (the redaction ignores case).
KEY = "0123456789abcdef0123456789ABCDEF01234567"
FTP_PASSWORD = "s3cr3t-ftp-pw"


@dataclass
class Station:
    data_dir: Path
    out: Path
    store: Store
    registry: Configuration
    queue: TransactionQueue
    security: SecurityEventQueue

    def build(self, start: datetime | None, stop: datetime | None, **kw: Any) -> Path | None:
        return diagnostics.build_diagnostics(
            self.out,
            start=start,
            stop=stop,
            data_dir=self.data_dir,
            registry=self.registry,
            queue=self.queue,
            store=self.store,
            version="1.2.3",
            security_queue=self.security,
            now=T0,
            **kw,
        )


@pytest.fixture
def station(tmp_path: Path) -> Iterator[Station]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    path = data_dir / "station.sqlite"
    store = Store.open(path)
    registry = Configuration(store)
    assert registry.change("AuthorizationKey", KEY, source="installer").ok
    assert registry.change("ChargePointId", "CP-1", source="installer").ok
    queue = TransactionQueue.open(path)
    security = SecurityEventQueue.open(path)
    try:
        yield Station(data_dir, out, store, registry, queue, security)
    finally:
        security.close()
        queue.close()
        store.close()


def private_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def entry(at: datetime, message: str, logger: str = "evse.station") -> str:
    record = logging.LogRecord(logger, logging.INFO, __file__, 1, message, None, None)
    record.created = at.timestamp()
    return logs.JsonFormatter().format(record)


def write_log(data_dir: Path, name: str, lines: list[str]) -> None:
    directory = data_dir / "log"
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def transaction(station: Station, start: datetime, minutes: int, tag: str) -> int:
    record = station.store.begin_transaction(
        connector_id=1, id_tag=tag, meter_start_wh=1000.0, started_at=start
    )
    station.store.end_transaction(
        record.id,
        reason="Local",
        meter_stop_wh=2000.0,
        stopped_at=start + timedelta(minutes=minutes),
    )
    return record.id


# -- GetDiagnostics --------------------------------------------------------------------


def test_secrets_never_reach_any_byte_of_the_archive(station: Station) -> None:
    pem = private_key_pem()
    key_file = station.data_dir / "cp.key"
    key_file.write_text(pem)
    body = [line for line in pem.splitlines() if "-----" not in line]
    leak = logging.getLogger("evse.test_diagnostics")
    leak.setLevel(logging.INFO)
    try:
        with logs.install_file_logs(station.data_dir) as files:
            # What a careless line or error text could carry.
            leak.info("connecting with password %s", KEY)
            leak.info("the same, shouted: %s", KEY.upper())
            leak.error("loaded key %s:\n%s", key_file, pem)
            leak.info("upload to ftp://diag:%s@192.0.2.1:21/in/", FTP_PASSWORD)
            leak.info("an ordinary line")
            logging.getLogger("evse.security").warning("InvalidMessages: key was %s", KEY)
            assert files.flush()
    finally:
        leak.setLevel(logging.NOTSET)
    # An error text in the queue: a dead letter whose reason quotes the key.
    transaction(station, datetime.now(UTC) - timedelta(minutes=5), 2, "TAG-1")
    station.queue.enqueue(
        "StartTransaction",
        {
            "connectorId": 1,
            "idTag": "TAG-1",
            "meterStart": 1000,
            "timestamp": "2026-04-01T09:00:00Z",
        },
        local_tx_id=1,
    )
    (head,) = station.queue.pending()
    station.queue.failed(head.seq, f"InternalError: bad key {KEY}", max_attempts=1)
    station.security.enqueue("InvalidMessages", {"type": "InvalidMessages"}, critical=False, cap=10)

    path = station.build(None, None)
    assert path is not None
    raw = path.read_bytes()
    contents = members(path)
    assert set(contents) == {
        "manifest.json",
        "evse.log",
        "configuration.json",
        "queue.json",
        "transactions.json",
    }
    forbidden = [KEY, KEY.lower(), KEY.upper(), FTP_PASSWORD, *body]
    for blob_name, blob in [("the archive", raw), *contents.items()]:
        text = blob.decode("utf-8", errors="replace")
        for secret in forbidden:
            assert secret not in text, f"{secret[:12]}... in {blob_name}"
        assert "BEGIN PRIVATE KEY" not in text, blob_name
    # The lines are there, with the secrets replaced.
    log_text = contents["evse.log"].decode()
    entries = [json.loads(line) for line in log_text.splitlines()]
    messages = [e["message"] for e in entries]
    assert "connecting with password [redacted]" in messages
    assert "the same, shouted: [redacted]" in messages
    assert "upload to ftp://diag:[redacted]@192.0.2.1:21/in/" in messages
    assert "an ordinary line" in messages
    assert any(
        m.startswith(f"loaded key {key_file}:\n-----[redacted] PRIVATE KEY") for m in messages
    )
    configuration = json.loads(contents["configuration.json"])
    by_key = {row["key"]: row for row in configuration}
    assert by_key["AuthorizationKey"]["value"] == "set"
    assert by_key["AuthorizationKey"]["secret"] is True
    assert by_key["ChargePointId"]["value"] == "CP-1"
    queue = json.loads(contents["queue.json"])
    (dead,) = queue["transactionMessages"]["deadLetters"]
    assert dead["reason"] == "InternalError: bad key [redacted]"
    assert queue["securityEvents"]["pending"] == 1
    # The key file itself was never read into the archive.
    assert station.registry.value("AuthorizationKey") == KEY  # unchanged on the device


def test_the_archive_holds_the_window_the_configuration_the_queues_and_the_version(
    station: Station,
) -> None:
    write_log(
        station.data_dir,
        "evse.log.1",
        [entry(T0 - timedelta(hours=2), "long before"), entry(T0 - timedelta(minutes=30), "in 1")],
    )
    write_log(
        station.data_dir,
        "evse.log",
        [
            entry(T0 - timedelta(minutes=10), "in 2"),
            entry(T0 + timedelta(minutes=10), "in 3", "evse.security"),
            entry(T0 + timedelta(hours=2), "long after"),
        ],
    )
    before = transaction(station, T0 - timedelta(hours=5), 30, "OLD")
    inside = transaction(station, T0 - timedelta(minutes=20), 60, "IN")
    start, stop = T0 - timedelta(hours=1), T0 + timedelta(hours=1)
    path = station.build(start, stop)
    assert path is not None
    assert path.name == "CP-1-diagnostics-20260401T090000Z.zip"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in station.out.iterdir()) == [path.name]  # no .part left
    contents = members(path)
    lines = contents["evse.log"].decode().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["in 1", "in 2", "in 3"]
    manifest = json.loads(contents["manifest.json"])
    assert manifest["station"] == "CP-1"
    assert manifest["firmwareVersion"] == "1.2.3"
    assert manifest["window"] == {
        "start": "2026-04-01T08:00:00.000Z",
        "stop": "2026-04-01T10:00:00.000Z",
    }
    assert manifest["createdAt"] == "2026-04-01T09:00:00.000Z"
    transactions = json.loads(contents["transactions.json"])
    assert [t["id"] for t in transactions] == [inside]
    assert before not in [t["id"] for t in transactions]
    assert transactions[0]["idTag"] == "IN" and transactions[0]["stopReason"] == "Local"
    configuration = json.loads(contents["configuration.json"])
    assert {row["key"] for row in configuration} == {k.name for k in station.registry.keys}
    queue = json.loads(contents["queue.json"])
    assert queue["transactionMessages"]["pending"] == 0
    assert queue["securityEvents"] == {"pending": 0, "first": [], "givenUp": []}


def test_nothing_to_send_is_none_and_no_file(station: Station) -> None:
    write_log(station.data_dir, "evse.log", [entry(T0, "the only line")])
    later = T0 + timedelta(days=1)
    assert station.build(later, None) is None
    assert station.build(T0 + timedelta(seconds=1), T0 - timedelta(seconds=1)) is None
    assert list(station.out.iterdir()) == []
    # A transaction in the window is something to send, even without a log line.
    transaction(station, later + timedelta(hours=1), 10, "LATE")
    path = station.build(later, None)
    assert path is not None
    assert members(path)["evse.log"] == b""
    # No log files at all, no window: the transaction alone.
    (station.data_dir / "log" / "evse.log").unlink()
    assert station.build(None, None, station_id="other id") is not None


# -- GetLog ----------------------------------------------------------------------------


def test_getlog_security_and_diagnostics_logs_within_the_window(station: Station) -> None:
    write_log(
        station.data_dir,
        "security.log",
        [
            entry(T0 - timedelta(days=2), "StartupOfTheDevice (critical)", "evse.security"),
            entry(T0, f"FailedToAuthenticateAtCentralSystem: key {KEY}", "evse.security"),
        ],
    )
    write_log(station.data_dir, "evse.log", [entry(T0 - timedelta(days=2), "main line")])
    common: dict[str, Any] = {
        "data_dir": station.data_dir,
        "station_id": "CP-1",
        "secrets": diagnostics.secrets_of(station.registry),
        "now": T0,
    }
    path = diagnostics.build_log(
        station.out, "SecurityLog", start=T0 - timedelta(days=1), stop=None, **common
    )
    assert path is not None and path.name == "CP-1-SecurityLog-20260401T090000Z.zip"
    contents = members(path)
    assert list(contents) == ["security.log"]
    (line,) = contents["security.log"].decode().splitlines()
    assert json.loads(line)["message"] == "FailedToAuthenticateAtCentralSystem: key [redacted]"
    assert KEY.encode() not in path.read_bytes() + contents["security.log"]

    path = diagnostics.build_log(station.out, "DiagnosticsLog", start=None, stop=T0, **common)
    assert path is not None and path.name == "CP-1-DiagnosticsLog-20260401T090000Z.zip"
    assert list(members(path)) == ["evse.log"]
    assert (
        diagnostics.build_log(
            station.out, "DiagnosticsLog", start=T0 - timedelta(days=1), stop=None, **common
        )
        is None
    )
    with pytest.raises(ValueError, match="not one of DiagnosticsLog, SecurityLog"):
        diagnostics.build_log(station.out, "AuditLog", start=None, stop=None, **common)  # type: ignore[arg-type]


# -- names and redaction ---------------------------------------------------------------


def test_file_names_are_safe_and_fit_the_message() -> None:
    assert diagnostics.archive_name("CP 1/ä", "diagnostics", T0) == (
        "CP_1__-diagnostics-20260401T090000Z.zip"
    )
    long = diagnostics.archive_name("x" * 400, "SecurityLog", T0)
    assert len(long) == 255 and long.endswith("-SecurityLog-20260401T090000Z.zip")
    local = datetime(2026, 4, 1, 11, 0, tzinfo=UTC).astimezone()  # any zone: named in UTC
    assert diagnostics.archive_name("", "d", local) == "station-d-20260401T110000Z.zip"


def test_redact_replaces_secrets_keys_and_url_passwords() -> None:
    pem = private_key_pem()
    text = f"a {KEY.lower()} b\n{pem}\nc ftp://u:p%40ss@h/x and http://host/no-user"
    out = diagnostics.redact(text, [KEY, ""])
    assert KEY.lower() not in out and "p%40ss" not in out
    assert "BEGIN PRIVATE KEY" not in out and "END PRIVATE KEY" not in out
    assert out.startswith("a [redacted] b\n-----[redacted] PRIVATE KEY-----\n")
    assert out.endswith("c ftp://u:[redacted]@h/x and http://host/no-user")
    # A key cut short (no END line) is removed to the end.
    assert diagnostics.redact("x -----BEGIN RSA PRIVATE KEY-----\nMIIE") == (
        "x -----[redacted] PRIVATE KEY-----"
    )
    # Inside a JSON line (the log files), where the newlines are escaped.
    escaped = json.dumps({"m": pem})
    assert diagnostics.redact(escaped) == '{"m": "-----[redacted] PRIVATE KEY-----\\n"}'
