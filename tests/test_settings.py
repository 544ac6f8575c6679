"""One settings model (issue 9): one declaration type for the file and the registry,
the file's seats and the seeding rule, the command line for one run, sources and
access in every listing, secrets read alike, and path settings that name real PEM
files. On the real store (SQLite files), real PEM files (trustme), the real
OcppPort; no mocks.

Each operator error of the issue has a test here that fails on the code before:

* an edit of ``limits.fallback`` / ``authorization.connection_timeout`` after
  the first start was silently ignored: ``test_a_changed_file_wins_and_says_so``;
* ``station.id`` was only logged: ``test_station_id_is_the_charge_point_id``;
* ``--id`` was stored for good: ``test_the_command_line_is_for_one_run``
  (and the process test in test_settings_cli.py);
* ``evse config list`` had no units, ranges, access or source:
  ``test_every_row_has_value_unit_range_source_access``;
* a secret read ``(not set)`` in one place and ``(hidden)`` in another:
  ``test_a_secret_reads_the_same_everywhere``;
* ``security.certificate /nonexistent.pem`` was accepted:
  ``test_a_missing_certificate_is_rejected_and_changes_nothing``, and then broke
  profile 1 connections: ``test_a_broken_certificate_fails_only_tls``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from evse.store import Store
from ocpp16.config import KEYS, OCPP, SECRET_SET, SECRET_UNSET, Configuration
from ocpp16.settings import Key, Owner
from ops import settings_view
from ops.config import (
    SEATS,
    SECTIONS,
    SETTINGS,
    Config,
    ConfigError,
    config_from_dict,
    example_toml,
    file_seeds,
)
from ops.run import Central, open_central

KEY32 = "0123456789abcdef0123456789ABCDEF"


def document(data_dir: Path, **dotted: Any) -> dict[str, Any]:
    """A station's file on the simulator's ports (never connected here)."""
    data: dict[str, Any] = {
        "station": {"serial": "SN-42", "data_dir": str(data_dir)},
        "limits": {"installer_max": 16.0},
        "board": {"kind": "evse-din", "port": "tcp://127.0.0.1:1", "unit": 1},
        "meter": {"kind": "sdm630", "port": "tcp://127.0.0.1:1", "unit": 2},
    }
    for key, value in dotted.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return data


def config_of(data_dir: Path, **dotted: Any) -> Config:
    return config_from_dict(document(data_dir, **dotted), source=data_dir / "evse.toml")


@pytest.fixture
def opened() -> Iterator[list[Central]]:
    """Every station side opened by a test, closed at its end."""
    centrals: list[Central] = []
    yield centrals
    for central in centrals:
        central.close()


def start(opened: list[Central], config: Config) -> Configuration:
    """What ``evse run`` does with the file before anything else: open the registry
    on the station's store and apply the file (``open_central``)."""
    for central in opened:
        central.close()
    opened.clear()
    central = open_central(config)
    opened.append(central)
    return central.registry


# --- one declaration ------------------------------------------------------------


def test_one_declaration_type_for_the_file_and_the_registry() -> None:
    assert all(type(k) is Key for k in KEYS)
    assert all(type(s) is Key for s in SETTINGS.values())
    assert all(k.owner is Owner.REGISTRY for k in KEYS)
    assert all(s.owner is Owner.FILE and s.readonly for s in SETTINGS.values())


def test_the_file_seats_are_made_from_their_registry_keys() -> None:
    keys = {k.name: k for k in KEYS}
    assert dict(SEATS) == {
        "station.id": "ChargePointId",
        "limits.fallback": "FallbackLimit",
        "authorization.connection_timeout": "ConnectionTimeOut",
        "connection.central_system_address": "CentralSystemAddress",
    }
    for dotted, name in SEATS.items():
        seat, key = SETTINGS[dotted], keys[name]
        assert key.file == dotted
        assert (seat.kind, seat.unit, seat.hi) == (key.kind, key.unit, key.hi)
        if dotted != "station.id":  # says "empty: the serial"; the file says so otherwise
            assert key.description in seat.description
    # The range is the registry's: the file refuses what the registry would.
    assert SETTINGS["limits.fallback"].lo == 0 and SETTINGS["limits.fallback"].hi == 80


def test_the_example_file_documents_the_seats() -> None:
    text = example_toml()
    assert "[connection]" in text
    assert "# central_system_address = " in text
    flat = " ".join(line.removeprefix("# ") for line in text.splitlines())
    assert flat.count("At start this seeds") == len(SEATS)


def test_the_file_refuses_a_fallback_the_registry_could_not_store() -> None:
    # Before, 6.12345 passed the file and was refused by the registry at start.
    with pytest.raises(ConfigError) as info:
        config_from_dict(document(Path("/d"), limits__fallback=6.12345), source="/f.toml")
    assert info.value.key == "limits.fallback"
    assert "more than 3 decimals" in info.value.reason


def test_the_file_refuses_a_central_system_address_the_registry_refuses() -> None:
    for bad, reason in [("http://cs/", "ws:// or wss://"), ("ws://cs/ocpp", "end with '/'")]:
        with pytest.raises(ConfigError) as info:
            config_from_dict(
                document(Path("/d"), connection__central_system_address=bad), source="/f.toml"
            )
        assert info.value.key == "connection.central_system_address"
        assert reason in info.value.reason
    good = config_from_dict(
        document(Path("/d"), connection__central_system_address="WSS://cs.example.com/ocpp/")
    )
    assert good.connection.central_system_address == "wss://cs.example.com/ocpp/"


def test_file_seeds_are_the_canonical_texts() -> None:
    config = config_of(
        Path("/d"),
        station__id="CP-7",
        limits__fallback=10.5,
        authorization__connection_timeout=30,
    )
    assert file_seeds(config) == {
        "ChargePointId": "CP-7",
        "CentralSystemAddress": "",
        "FallbackLimit": "10.5",
        "ConnectionTimeOut": "30",
    }


# --- the seeding rule --------------------------------------------------------------


def test_the_first_start_takes_the_file(tmp_path: Path, opened: list[Central]) -> None:
    registry = start(opened, config_of(tmp_path, limits__fallback=10.0))
    assert registry.get_float("FallbackLimit") == 10.0
    assert registry.source("FallbackLimit") == "file"
    assert registry.source("ConnectionTimeOut") == "file"
    assert registry.source("HeartbeatInterval") == "default"


def test_a_change_at_run_time_stays_while_the_file_is_unchanged(
    tmp_path: Path, opened: list[Central]
) -> None:
    config = config_of(tmp_path, limits__fallback=10.0)
    registry = start(opened, config)
    assert registry.change("monitoring.fallback_limit", "12", source="installer").ok
    assert registry.change("ConnectionTimeOut", "30", source=OCPP).ok
    registry = start(opened, config)
    assert registry.get_float("FallbackLimit") == 12.0
    assert registry.get_int("ConnectionTimeOut") == 30
    assert registry.source("FallbackLimit") == "registry"


def test_a_changed_file_wins_and_says_so(
    tmp_path: Path, opened: list[Central], caplog: pytest.LogCaptureFixture
) -> None:
    registry = start(opened, config_of(tmp_path, limits__fallback=10.0))
    assert registry.change("monitoring.fallback_limit", "12", source="installer").ok
    assert registry.change("ConnectionTimeOut", "30", source=OCPP).ok
    caplog.set_level(logging.INFO)
    # The installer edits the file after the first start: it must not be ignored.
    edited = config_of(tmp_path, limits__fallback=8.0, authorization__connection_timeout=90)
    registry = start(opened, edited)
    assert registry.get_float("FallbackLimit") == 8.0
    assert registry.get_int("ConnectionTimeOut") == 90
    assert registry.source("FallbackLimit") == "file"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    fallback = next(line for line in lines if "limits.fallback" in line)
    # the key, the old and the new value, in one line
    assert "FallbackLimit" in fallback and "'12'" in fallback and "'8'" in fallback
    timeout = next(line for line in lines if "authorization.connection_timeout" in line)
    assert "'30'" in timeout and "'90'" in timeout
    # and the value in force is the one the running station uses
    assert start(opened, edited).get_float("FallbackLimit") == 8.0


def test_a_value_stored_before_the_file_was_known_stays_and_is_logged(
    tmp_path: Path, opened: list[Central], caplog: pytest.LogCaptureFixture
) -> None:
    # An older firmware (or evse config set before the first start) stored a
    # value and no seed: it stays, and the log says the file does not override it.
    with Store.open(tmp_path / "station.sqlite") as store:
        assert Configuration(store).change("FallbackLimit", "9", source="installer").ok
    caplog.set_level(logging.INFO)
    registry = start(opened, config_of(tmp_path, limits__fallback=6.0))
    assert registry.get_float("FallbackLimit") == 9.0
    warning = next(
        r.getMessage() for r in caplog.records if "FallbackLimit stays" in r.getMessage()
    )
    assert "'9'" in warning and "'6'" in warning and "limits.fallback" in warning
    # From now on the file is known: changing it makes it win.
    registry = start(opened, config_of(tmp_path, limits__fallback=7.0))
    assert registry.get_float("FallbackLimit") == 7.0


def test_a_file_value_the_registry_refuses_is_refused_naming_both_values(
    tmp_path: Path, opened: list[Central]
) -> None:
    wss = "wss://cs.example.com/ocpp/"
    registry = start(opened, config_of(tmp_path, connection__central_system_address=wss))
    assert registry.change("AuthorizationKey", KEY32, source="installer").ok
    # Profile 2 is TLS: its root certificate first (the whitepaper's prerequisite,
    # checked since `evse run` gives the registry its credentials).
    root = Pki(tmp_path).ca_pem
    assert registry.change("CentralSystemRootCertificate", str(root), source="installer").ok
    assert registry.change("SecurityProfile", "2", source="installer").ok
    opened[0].close()
    opened.clear()
    before = Store.open(tmp_path / "station.sqlite")
    stored = before.settings()
    before.close()
    downgrade = config_of(tmp_path, connection__central_system_address="ws://cs.example.com/ocpp/")
    with pytest.raises(ConfigError) as info:
        open_central(downgrade)
    err = info.value
    assert err.key == "connection.central_system_address"
    assert "'ws://cs.example.com/ocpp/'" in err.reason and repr(wss) in err.reason
    assert "wss://" in err.reason and str(tmp_path / "evse.toml") in str(err)
    with Store.open(tmp_path / "station.sqlite") as after:
        assert after.settings() == stored


def test_station_id_is_the_charge_point_id(tmp_path: Path, opened: list[Central]) -> None:
    config = config_of(
        tmp_path, station__id="CP-7", connection__central_system_address="ws://127.0.0.1:9/"
    )
    central = open_central(config)
    opened.append(central)
    assert central.registry.get_str("ChargePointId") == "CP-7"
    assert central.port.describe()["charge_point_id"] == "CP-7"
    settings = central.port.connection_settings()
    assert settings is not None and settings.url == "ws://127.0.0.1:9/CP-7"


def test_station_id_defaults_to_the_serial(tmp_path: Path, opened: list[Central]) -> None:
    registry = start(opened, config_of(tmp_path))
    assert registry.get_str("ChargePointId") == "SN-42"


def test_the_command_line_is_for_one_run(tmp_path: Path, opened: list[Central]) -> None:
    registry = start(opened, config_of(tmp_path, station__id="CP-1"))
    result = registry.override(
        {"ChargePointId": "CP-X", "CentralSystemAddress": "ws://127.0.0.1:9/"}
    )
    assert result.ok
    assert registry.get_str("ChargePointId") == "CP-X"
    assert registry.source("ChargePointId") == "command line"
    # Not stored: the next start has the file's value again.
    registry = start(opened, config_of(tmp_path, station__id="CP-1"))
    assert registry.get_str("ChargePointId") == "CP-1"
    assert registry.get_str("CentralSystemAddress") == ""


def test_a_refused_command_line_value_changes_nothing(
    tmp_path: Path, opened: list[Central]
) -> None:
    registry = start(opened, config_of(tmp_path))
    result = registry.override({"ChargePointId": "CP-X", "CentralSystemAddress": "http://x/"})
    assert not result.ok and result.key == "CentralSystemAddress"
    assert registry.get_str("ChargePointId") == "SN-42"


def test_a_change_during_the_run_replaces_the_command_line_value(
    tmp_path: Path, opened: list[Central]
) -> None:
    registry = start(opened, config_of(tmp_path))
    assert registry.override({"ChargePointId": "CP-X"}).ok
    assert registry.change("connection.charge_point_id", "CP-Y", source="installer").ok
    assert registry.source("ChargePointId") == "registry"
    assert start(opened, config_of(tmp_path)).get_str("ChargePointId") == "CP-Y"


# --- what people are shown ---------------------------------------------------------------


def test_every_row_has_value_unit_range_source_access(
    tmp_path: Path, opened: list[Central]
) -> None:
    config = config_of(tmp_path, limits__fallback=10.0)
    registry = start(opened, config)
    rows = settings_view.rows(registry, config)
    by_name = {row["name"]: row for row in rows}
    # every setting of both tables, once (the seats in their registry row)
    assert len(by_name) == len(rows) == len(KEYS) + len(SETTINGS) - len(SEATS)
    for row in rows:
        assert {"value", "unit", "range", "source", "access"} <= set(row), row["name"]
        assert row["source"] in ("file", "registry", "default", "command line"), row
        assert row["access"] in (
            "read-only",
            "installer",
            "installer + central system",
            "write-only, installer + central system",
        ), row
    fallback = by_name["monitoring.fallback_limit"]
    assert (fallback["value"], fallback["unit"], fallback["range"]) == ("10", "A", "0..16 A")
    assert (fallback["source"], fallback["access"], fallback["file"]) == (
        "file",
        "installer + central system",
        "limits.fallback",
    )
    board = by_name["board.kind"]
    assert (board["value"], board["source"], board["access"]) == ("evse-din", "file", "read-only")
    assert by_name["board.poll_interval"]["source"] == "default"
    assert by_name["board.poll_interval"]["unit"] == "s"
    heartbeat = by_name["HeartbeatInterval"]
    assert (heartbeat["range"], heartbeat["access"]) == (
        "60..86400 s",
        "installer + central system",
    )
    assert by_name["NumberOfConnectors"]["access"] == "read-only"
    table = settings_view.format_table(rows)
    header = next(line for line in table.splitlines() if line.startswith("NAME"))
    assert header.split() == ["NAME", "VALUE", "UNIT", "SOURCE", "ACCESS", "RANGE"]
    line = next(line for line in table.splitlines() if line.startswith("monitoring.fallback_limit"))
    assert line.split()[:5] == ["monitoring.fallback_limit", "10", "A", "file", "(limits.fallback)"]


def test_the_listing_tells_what_the_file_will_do(tmp_path: Path, opened: list[Central]) -> None:
    registry = start(opened, config_of(tmp_path, limits__fallback=10.0))
    assert registry.change("FallbackLimit", "12", source="installer").ok
    edited = config_of(tmp_path, limits__fallback=8.0)
    row = settings_view.lookup(registry, edited, "limits.fallback")
    assert row["value"] == "12" and row["source"] == "registry"
    assert "changed (10 -> 8): it wins at the next start" in row["note"]
    same = settings_view.lookup(
        registry, config_of(tmp_path, limits__fallback=10.0), "FallbackLimit"
    )
    assert "stays until the file changes" in same["note"]


def test_a_secret_reads_the_same_everywhere(tmp_path: Path, opened: list[Central]) -> None:
    config = config_of(tmp_path)
    registry = start(opened, config)
    for expected in (SECRET_UNSET, SECRET_SET):
        rows = {r["name"]: r for r in settings_view.rows(registry, config)}
        view = {r["name"]: r for r in registry.installer_view()}
        assert rows["security.access_key"]["value"] == expected
        assert view["security.access_key"]["value"] == expected
        assert registry.text("AuthorizationKey") == registry.text("security.access_key") == expected
        table = settings_view.format_table(list(rows.values()))
        assert "(hidden)" not in table and "(not set)" not in table and KEY32 not in table
        assert table.count("AuthorizationKey") == 0  # listed once, by its installer name
        # OCPP GetConfiguration: write-only, listed without a value (OCPP 1.6 §9).
        entry = registry.get_configuration(["AuthorizationKey"])[0][0]
        assert entry == {"key": "AuthorizationKey", "readonly": False}
        assert registry.change("AuthorizationKey", KEY32, source="installer").ok
    assert (SECRET_SET, SECRET_UNSET) == ("set", "not set")


def test_an_older_stations_answer_lists_the_secret_alike() -> None:
    # The control socket of a station before this change: installer rows and
    # GetConfiguration entries only. The listing still never says "(hidden)".
    answer = {
        "settings": [{"name": "security.access_key", "ocpp": "AuthorizationKey", "value": "set"}],
        "ocpp": [{"key": "AuthorizationKey", "readonly": False}, {"key": "X", "value": "1"}],
    }
    code, out, err = settings_view.render("list", None, answer)
    assert code == 0 and err == ""
    assert "(hidden)" not in out and out.count("AuthorizationKey") == 0


def test_a_file_setting_cannot_be_changed_at_run_time(
    tmp_path: Path, opened: list[Central]
) -> None:
    config = config_of(tmp_path)
    registry = start(opened, config)
    answer = settings_view.change(registry, config, "board.kind", "heidelberg")
    assert answer["status"] == "Rejected"
    assert "read-only at run time" in answer["reason"] and str(config.source) in answer["reason"]
    code, out, err = settings_view.render("set", "board.kind", answer)
    assert (code, out) == (2, "") and err.startswith("evse config: error: board.kind: Rejected")
    # its value reads back from the file, source file
    assert settings_view.lookup(registry, config, "board.kind")["value"] == "evse-din"
    with pytest.raises(settings_view.FileNeeded):
        settings_view.lookup(registry, None, "board.kind")
    with pytest.raises(settings_view.UnknownSetting):
        settings_view.lookup(registry, config, "board.kinds")


def test_a_seated_key_by_its_file_name_changes_the_registry(
    tmp_path: Path, opened: list[Central]
) -> None:
    config = config_of(tmp_path)
    registry = start(opened, config)
    answer = settings_view.change(registry, config, "limits.fallback", "10")
    assert answer["status"] == "Accepted" and registry.get_float("FallbackLimit") == 10.0
    code, out, err = settings_view.render("set", "limits.fallback", answer)
    assert (code, out) == (0, "Accepted\n")
    assert "wins again only when the file is changed" in err


def test_offline_set_applies_the_file_first(tmp_path: Path) -> None:
    # evse config set with no station running, after the file was edited: the
    # file's new value is applied first, so the next start keeps this change.
    with Store.open(tmp_path / "station.sqlite") as store:
        registry = Configuration(store)
        registry.seed({"FallbackLimit": "6"})
    edited = config_of(tmp_path, limits__fallback=8.0)
    answer = settings_view.offline("set", "monitoring.fallback_limit", "12", tmp_path, edited)
    assert answer["status"] == "Accepted"
    central = open_central(edited)
    try:
        assert central.registry.get_float("FallbackLimit") == 12.0
    finally:
        central.close()
    listing = settings_view.offline("list", None, None, tmp_path, edited)
    assert {r["name"] for r in listing["rows"]} >= {"board.kind", "monitoring.fallback_limit"}
    assert settings_view.offline("get", "FallbackLimit", None, tmp_path, None)["value"] == "12"


@pytest.mark.parametrize(
    ("action", "key", "value", "reason"),
    [
        ("get", None, None, "needs a KEY"),
        ("set", "X", None, "needs a VALUE"),
        ("rm", "X", "1", "the actions are"),
    ],
)
def test_offline_refuses_a_malformed_request(
    tmp_path: Path, action: str, key: str | None, value: str | None, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        settings_view.offline(action, key, value, tmp_path)


# --- path settings -------------------------------------------------------------------


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.ca_pem = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        leaf = self.ca.issue_cert(common_name="CP-1")
        self.cert = tmp / "cp.pem"
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        self.key = tmp / "cp.key"
        leaf.private_key_pem.write_to_path(str(self.key))
        other = self.ca.issue_cert(common_name="CP-2")
        self.other_key = tmp / "other.key"
        other.private_key_pem.write_to_path(str(self.other_key))
        self.text = tmp / "notes.txt"
        self.text.write_text("not a certificate\n")
        self.garbled = tmp / "garbled.pem"
        self.garbled.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.encrypted = tmp / "encrypted.key"
        self.encrypted.write_text(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
        )
        self.directory = tmp / "certs"
        self.directory.mkdir()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Configuration]:
    with Store.open(tmp_path / "station.sqlite") as store:
        yield Configuration(store)


def test_a_missing_certificate_is_rejected_and_changes_nothing(
    registry: Configuration, tmp_path: Path
) -> None:
    for name in ("security.certificate", "CentralSystemRootCertificate"):
        result = registry.change(name, "/nonexistent.pem", source="installer")
        assert (result.status, result.key) == ("Rejected", "CentralSystemRootCertificate")
        assert result.reason == "/nonexistent.pem: no such file"
    assert registry.get_str("CentralSystemRootCertificate") == ""
    assert registry.source("CentralSystemRootCertificate") == "default"
    # all or nothing: a good change beside it is not stored either
    many = registry.change_many(
        {"HeartbeatInterval": "60", "security.certificate": "/nonexistent.pem"}, source="installer"
    )
    assert not many.ok and registry.get_int("HeartbeatInterval") == 3600
    answer = settings_view.offline("set", "security.certificate", "/nonexistent.pem", tmp_path)
    assert answer["status"] == "Rejected" and "no such file" in answer["reason"]


@pytest.mark.parametrize(
    ("name", "attribute", "reason"),
    [
        ("security.certificate", "text", "not a PEM certificate"),
        ("security.certificate", "garbled", "not a valid PEM certificate"),
        ("security.certificate", "cert", "is not a CA certificate"),
        ("security.certificate", "key", "not a PEM certificate"),
        ("security.certificate", "directory", "is a directory"),
        ("security.client_certificate", "ca_pem", "is a CA certificate"),
        ("security.client_certificate", "key", "not a PEM certificate"),
        ("security.client_key", "cert", "not a PEM private key"),
        ("security.client_key", "encrypted", "encrypted"),
        ("security.client_key", "text", "not a PEM private key"),
    ],
)
def test_a_file_of_the_wrong_kind_is_rejected(
    registry: Configuration, pki: Pki, name: str, attribute: str, reason: str
) -> None:
    path = str(getattr(pki, attribute))
    result = registry.change(name, path, source="installer")
    assert result.status == "Rejected", result
    assert reason in result.reason and path in result.reason
    assert registry.text(name) == ""


def test_the_right_files_are_accepted(registry: Configuration, pki: Pki) -> None:
    result = registry.change_many(
        {
            "security.certificate": str(pki.ca_pem),
            "security.client_certificate": str(pki.cert),
            "security.client_key": str(pki.key),
        },
        source="installer",
    )
    assert result.ok, result
    assert registry.get_str("ChargePointPrivateKey") == str(pki.key)


def test_a_client_key_that_is_not_the_certificates_is_rejected(
    registry: Configuration, pki: Pki
) -> None:
    assert registry.change("security.client_certificate", str(pki.cert), source="ui").ok
    result = registry.change("security.client_key", str(pki.other_key), source="ui")
    assert result.status == "Rejected" and "is not the private key of" in result.reason
    assert registry.get_str("ChargePointPrivateKey") == ""


async def test_the_control_socket_path_validates_too(registry: Configuration) -> None:
    # POST /config uses change_async (the files are read in a worker thread).
    result = await registry.change_async("security.certificate", "/nonexistent.pem", source="ui")
    assert result.status == "Rejected" and "no such file" in result.reason
    answer = await settings_view.change_async(registry, None, "security.certificate", "/x.pem")
    assert answer["status"] == "Rejected"


def test_a_broken_certificate_fails_only_tls(registry: Configuration, pki: Pki) -> None:
    assert registry.change("security.certificate", str(pki.ca_pem), source="installer").ok
    assert registry.change("AuthorizationKey", KEY32, source="installer").ok
    assert registry.change("SecurityProfile", "1", source="installer").ok
    pki.ca_pem.unlink()  # the file goes away after it was set
    # Profile 1 does not use it: nothing is read, nothing fails.
    assert registry.connection_files() == (None, None, None)
    assert registry.change_many(
        {"SecurityProfile": "2", "CentralSystemAddress": "wss://cs.example.com/"},
        source="installer",
    ).ok
    with pytest.raises(ValueError, match=r"^security.certificate: .*ca.pem: no such file"):
        registry.connection_files()


def test_a_broken_certificate_leaves_a_profile_1_connection_alone(
    tmp_path: Path, opened: list[Central]
) -> None:
    pki = Pki(tmp_path)
    config = config_of(tmp_path, connection__central_system_address="ws://127.0.0.1:9/")
    central = open_central(config)
    opened.append(central)
    registry = central.registry
    assert registry.change("security.certificate", str(pki.ca_pem), source="installer").ok
    assert registry.change("AuthorizationKey", KEY32, source="installer").ok
    assert registry.change("SecurityProfile", "1", source="installer").ok
    pki.ca_pem.unlink()
    settings = central.port.refresh_connection_settings()
    assert settings is not None and settings.security_profile == 1
    assert central.port.config_problem == ""
    # The profile that uses it fails, with the setting, the file and why.
    raised = {"SecurityProfile": "2", "CentralSystemAddress": "wss://127.0.0.1:9/"}
    assert registry.change_many(raised, source="installer").ok
    assert central.port.refresh_connection_settings() is None
    assert central.port.config_problem.startswith("security.certificate: ")
    assert "no such file" in str(central.port.describe()["reason"])


def test_the_registry_table_is_a_dataclass_of_one_type() -> None:
    # Every consumer reads the same fields: the web page, evse config, the file.
    fields = {f.name for f in dataclasses.fields(Key)}
    assert {
        "name",
        "kind",
        "default",
        "description",
        "access",
        "unit",
        "lo",
        "hi",
        "installer",
        "reboot_required",
        "owner",
        "file",
        "seeds",
        "verify",
    } <= fields
    assert [s.name for s in SECTIONS if any(k.seeds for k in s.settings)] == [
        "station",
        "limits",
        "authorization",
        "connection",
    ]
