"""The configuration registry (ocpp16/config.py) against the reference station's
tables, on the real settings store (evse.store.Store on a SQLite file).

The expected keys, defaults, access and range edges below are copied by hand
from station-spec §2 and §3, not read from ``KEYS``: a wrong row in the
registry must fail here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from evse.store import Store
from ocpp16.config import (
    KEYS,
    OCPP,
    Configuration,
    Key,
    Kind,
    Value,
)
from ocpp16.errors import CallError, ConfigRejected, OcppError

MEASURANDS = (
    "Energy.Active.Import.Register",
    "Current.Import",
    "Current.Offered",
    "Temperature",
    "Voltage",
    "Power.Active.Import",
)
ALL_SIX = ",".join(MEASURANDS)
BOOL_OK = ("0", "1", "true", "false", "True", "FALSE")
BOOL_BAD = ("2", "-1", "yes", "on", "", " true", "true ")
KEY32 = "k" * 32
KEY40 = "0123456789abcdefghijABCDEFGHIJ!#$%&()*+"  # 40 printable ASCII characters
MEAS_OK = (
    "",
    MEASURANDS[0],
    ALL_SIX,
    "Voltage,Current.Import",
    "voltage",
    " Voltage , Temperature",
)
MEAS_BAD = (
    "Power.Reactive.Import",  # an OCPP measurand the station cannot measure
    "Current.Import.L1",
    "Energy",
    "Voltage,",
    ",",
    "Voltage,Foo",
)


# name, default as OCPP reports it, access, accepted texts, rejected texts.
# station-spec §2, row by row; "0"/"1" of the table are OCPP booleans.
SPEC_2: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("AllowOfflineTxForUnknownId", "false", "RW", BOOL_OK, BOOL_BAD),
    ("AuthorizeRemoteTxRequests", "true", "RW", BOOL_OK, BOOL_BAD),
    ("AuthorizationCacheEnabled", "true", "RW", BOOL_OK, BOOL_BAD),
    (
        "ClockAlignedDataInterval",
        "3600",
        "RW",
        ("0", "300", "86400", "900"),
        ("1", "299", "86401", "-1", "", "3600.0", "1e3", " 300", "0x12c"),
    ),
    ("ConnectionTimeOut", "120", "RW", ("1", "3600"), ("0", "3601", "-5", "abc")),
    (
        "ConnectorPhaseRotation",
        "Unknown",
        "RW",
        ("Unknown", "RST", "RTS", "SRT", "STR", "TRS", "TSR", "rst"),
        ("", "RS", "RSTT", "XYZ", "NotApplicable"),
    ),
    ("GetConfigurationMaxKeys", "60", "R", (), ("60", "61")),
    ("HeartbeatInterval", "3600", "RW", ("60", "86400"), ("59", "86401", "0", "")),
    ("LocalAuthorizeOffline", "false", "RW", BOOL_OK, BOOL_BAD),
    ("LocalPreAuthorize", "true", "RW", BOOL_OK, BOOL_BAD),
    ("MeterValuesAlignedData", "", "RW", MEAS_OK, MEAS_BAD),
    ("MeterValuesSampledData", "Energy.Active.Import.Register", "RW", MEAS_OK, MEAS_BAD),
    ("MeterValueSampleInterval", "3600", "RW", ("0", "5", "84600"), ("4", "84601", "86400", "-1")),
    ("NumberOfConnectors", "1", "R", (), ("1", "2")),
    ("ResetRetries", "10", "RW", ("0", "10"), ("-1", "11")),
    ("StopTransactionOnEVSideDisconnect", "true", "RW", BOOL_OK, BOOL_BAD),
    ("StopTransactionOnInvalidId", "false", "RW", BOOL_OK, BOOL_BAD),
    ("StopTxnAlignedData", "", "RW", MEAS_OK, MEAS_BAD),
    ("StopTxnSampledData", "", "RW", MEAS_OK, MEAS_BAD),
    ("TransactionMessageAttempts", "3", "RW", ("1", "100"), ("0", "101")),
    ("TransactionMessageRetryInterval", "20", "RW", ("5", "60"), ("4", "61")),
    ("UnlockConnectorOnEVSideDisconnect", "true", "RW", BOOL_OK, BOOL_BAD),
    ("WebSocketPingInterval", "10", "RW", ("1", "1200"), ("0", "1201")),
    ("LocalAuthListEnabled", "true", "RW", BOOL_OK, BOOL_BAD),
    ("LocalAuthListMaxLength", "50", "R", (), ("50", "51")),
    ("SendLocalListMaxLength", "10", "R", (), ("10",)),
    ("ChargeProfileMaxStackLevel", "5", "R", (), ("5",)),
    ("ChargingScheduleAllowedChargingRateUnit", "Current", "R", (), ("Current", "Power")),
    ("ChargingScheduleMaxPeriods", "5", "R", (), ("5",)),
    ("MaxChargingProfilesInstalled", "9", "R", (), ("9",)),
    ("SupportedFileTransferProtocols", "HTTP,HTTPS,FTP", "R", (), ("HTTP",)),
    # 1..3 need credentials first: see the SecurityProfile tests.
    ("SecurityProfile", "0", "RW", ("0",), ("4", "-1", "", "one")),
    ("CpoName", "", "RW", ("", "x", "x" * 128, "Ladestrom GmbH"), ("x" * 129, "a\nb")),
    ("AdditionalRootCertificateCheck", "false", "R", (), ("false", "true")),
    ("CertificateStoreMaxLength", "1", "R", (), ("1", "2")),
    # write-only: no default shown (None), never a value.
    ("AuthorizationKey", "", "W", (KEY32, KEY40), ("", "k" * 31, "k" * 41, "k" * 31 + "\t")),
    # OCPP 1.6 keys the spec adds where the reference is silent.
    (
        "SupportedFeatureProfiles",
        "Core",
        "R",
        (),
        ("Core",),
    ),
    ("MinimumStatusDuration", "0", "RW", ("0", "3600"), ("-1", "3601")),
    ("ConnectorSwitch3to1PhaseSupported", "false", "R", (), ("true",)),
    ("ReserveConnectorZeroSupported", "true", "R", (), ("false",)),
]
SPEC_NAMES = [row[0] for row in SPEC_2]

# station-spec §3: local name, OCPP name (None: installer only), default.
SPEC_3: list[tuple[str, str, str]] = [
    ("connection.protocol", "Protocol", "OCPP 1.6 JSON"),
    ("connection.enabled", "ConnectionEnabled", "true"),
    ("connection.central_system_address", "CentralSystemAddress", ""),
    ("connection.charge_point_id", "ChargePointId", ""),
    ("security.profile", "SecurityProfile", "0"),
    ("security.access_key", "AuthorizationKey", "not set"),
    ("security.certificate", "CentralSystemRootCertificate", ""),
    # Beyond §3: the client certificate that security profile 3 presents.
    ("security.client_certificate", "ChargePointCertificate", ""),
    ("security.client_key", "ChargePointPrivateKey", ""),
    ("monitoring.fallback_limit", "FallbackLimit", "6"),
    ("monitoring.connection_check_frequency", "WebSocketPingInterval", "10"),
    ("monitoring.reconnect_frequency", "ReconnectFrequency", "30"),
    ("data_sending.max_failed_attempts", "TransactionMessageAttempts", "3"),
    ("data_sending.retry_interval", "TransactionMessageRetryInterval", "20"),
    ("metering.interval", "MeterValueSampleInterval", "3600"),
    ("metering.measurands", "MeterValuesSampledData", "Energy.Active.Import.Register"),
]
GROUP_ORDER = ["connection", "security", "monitoring", "data sending", "metering"]
INSTALLER_ONLY = {
    "Protocol",
    "ConnectionEnabled",
    "CentralSystemAddress",
    "ChargePointId",
    "CentralSystemRootCertificate",
    "ChargePointCertificate",
    "ChargePointPrivateKey",
    "ReconnectFrequency",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "station.db")
    yield s
    s.close()


@pytest.fixture
def config(store: Store) -> Configuration:
    return Configuration(store)


class Pem:
    """Real PEM files made by trustme: two CAs, two client certificates and keys."""

    def __init__(self, tmp: Path) -> None:
        ca, other = trustme.CA(), trustme.CA()
        self.ca = str(tmp / "ca.pem")
        ca.cert_pem.write_to_path(self.ca)
        self.other_ca = str(tmp / "other-ca.pem")
        other.cert_pem.write_to_path(self.other_ca)
        paths: list[str] = []
        for i, issuer in enumerate((ca, other)):
            leaf = issuer.issue_cert(common_name=f"CP-{i}")
            cert, key = tmp / f"cp{i}.pem", tmp / f"cp{i}.key"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(key))
            paths += [str(cert), str(key)]
        self.cert, self.key, self.cert2, self.key2 = paths


@pytest.fixture
def pem(tmp_path: Path) -> Pem:
    return Pem(tmp_path)


def get_one(config: Configuration, name: str) -> dict[str, Any]:
    found, unknown = config.get_configuration([name])
    assert unknown == []
    assert len(found) == 1
    return found[0]


def with_key(config: Configuration) -> None:
    assert config.change("AuthorizationKey", KEY32, source=OCPP).status == "Accepted"


# -- the table -----------------------------------------------------------------


#: Keys the central system sees beyond the reference station's table (OCPP 1.6
#: §9 allows a charge point its own): the fallback limit, so that an operator
#: can read and set it by the installer's rule (issues 7 and 9).
VENDOR_KEYS = ["FallbackLimit"]


def test_the_ocpp_keys_are_exactly_the_spec_table(config: Configuration) -> None:
    found, unknown = config.get_configuration(None)
    names = [entry["key"] for entry in found]
    assert [n for n in names if n not in VENDOR_KEYS] == SPEC_NAMES
    assert sorted(set(names) - set(SPEC_NAMES)) == VENDOR_KEYS
    assert unknown == []


def test_installer_settings_are_exactly_section_3(config: Configuration) -> None:
    view = config.installer_view()
    rows = {row["name"]: row for row in view}
    assert len(rows) == len(view)
    assert {(name, row["default"]) for name, row in rows.items()} == {
        (local, default) for local, _, default in SPEC_3
    }
    for local, name, _ in SPEC_3:
        assert rows[local]["ocpp"] == (None if name in INSTALLER_ONLY else name)
        assert rows[local]["group"] == local.split(".")[0].replace("_", " ")
    # grouped, in the order of the §3 table
    groups = [row["group"] for row in view]
    assert groups == sorted(groups, key=GROUP_ORDER.index)


@pytest.mark.parametrize(("name", "default", "access", "good", "bad"), SPEC_2, ids=SPEC_NAMES)
def test_default_and_access(
    config: Configuration,
    name: str,
    default: str,
    access: str,
    good: tuple[str, ...],
    bad: tuple[str, ...],
) -> None:
    entry = get_one(config, name)
    assert entry["readonly"] is (access == "R")
    if access == "W":
        assert "value" not in entry
    else:
        assert entry["value"] == default
        assert config.text(name) == default


@pytest.mark.parametrize(("name", "default", "access", "good", "bad"), SPEC_2, ids=SPEC_NAMES)
def test_range_edges(
    store: Store,
    name: str,
    default: str,
    access: str,
    good: tuple[str, ...],
    bad: tuple[str, ...],
) -> None:
    for text in good:
        config = Configuration(store)
        result = config.change(name, text, source=OCPP)
        assert (result.status, result.key) == ("Accepted", name), (text, result.reason)
        expected = config.get_configuration([name])[0][0].get("value")
        if access != "W":
            assert store.get_setting(f"ocpp.{name}") == expected
            assert Configuration(store).text(name) == expected
        else:
            assert store.get_setting(f"ocpp.{name}") == text
    for text in bad:
        before = store.settings()
        config = Configuration(store)
        values = {k.name: config.value(k.name) for k in KEYS}
        result = config.change(name, text, source=OCPP)
        assert (result.status, result.key) == ("Rejected", name), text
        assert result.reason
        assert store.settings() == before
        assert {k.name: config.value(k.name) for k in KEYS} == values


def test_booleans_are_reported_as_true_false(config: Configuration, store: Store) -> None:
    assert config.change("LocalAuthorizeOffline", "1", source=OCPP).status == "Accepted"
    assert get_one(config, "LocalAuthorizeOffline")["value"] == "true"
    assert store.get_setting("ocpp.LocalAuthorizeOffline") == "true"
    assert config.get_bool("LocalAuthorizeOffline") is True
    assert config.change("LocalAuthorizeOffline", "FALSE", source=OCPP).ok
    assert get_one(config, "LocalAuthorizeOffline")["value"] == "false"


def test_values_are_stored_in_canonical_form(config: Configuration, store: Store) -> None:
    assert config.change("HeartbeatInterval", "0300", source=OCPP).ok
    assert store.get_setting("ocpp.HeartbeatInterval") == "300"
    assert config.change("ConnectorPhaseRotation", "tsr", source=OCPP).ok
    assert get_one(config, "ConnectorPhaseRotation")["value"] == "TSR"
    assert config.change("MeterValuesAlignedData", " voltage , TEMPERATURE", source=OCPP).ok
    assert get_one(config, "MeterValuesAlignedData")["value"] == "Voltage,Temperature"
    assert config.get_measurands("MeterValuesAlignedData") == ("Voltage", "Temperature")


def test_a_measurand_listed_twice_is_rejected(config: Configuration) -> None:
    result = config.change("MeterValuesSampledData", "Voltage,Voltage", source=OCPP)
    assert result.status == "Rejected"
    assert "twice" in result.reason


def test_a_value_longer_than_cistring500_is_rejected(config: Configuration) -> None:
    assert config.change("CpoName", "x" * 501, source=OCPP).status == "Rejected"


# -- statuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "NoSuchKey",
        "",
        "LightIntensity",
        "ConnectionEnabled",
        "CentralSystemAddress",
        "metering.interval",
        "security.access_key",
    ],
)
def test_unknown_keys_are_not_supported_over_ocpp(
    config: Configuration, store: Store, name: str
) -> None:
    result = config.change(name, "1", source=OCPP)
    assert (result.status, result.key) == ("NotSupported", name)
    assert not result.ok
    assert store.settings() == {}


def test_unknown_local_setting_is_not_supported(config: Configuration, store: Store) -> None:
    result = config.change("metering.nothing", "1", source="installer")
    assert result.status == "NotSupported"
    with pytest.raises(ConfigRejected) as info:
        result.raise_for_status()
    assert info.value.key == "metering.nothing"
    assert isinstance(info.value, OcppError)


def test_read_only_is_rejected_for_every_source(config: Configuration, store: Store) -> None:
    for source, name in [(OCPP, "NumberOfConnectors"), ("installer", "connection.protocol")]:
        result = config.change(name, "2", source=source)
        assert (result.status, result.reason) == ("Rejected", "read-only")
    assert store.settings() == {}


def test_reboot_required(store: Store) -> None:
    keys = (
        Key("Live", Kind.INT, "1", "applies at once", lo=0, hi=9),
        Key("AtStart", Kind.INT, "1", "read at start", lo=0, hi=9, reboot_required=True),
    )
    config = Configuration(store, keys=keys)
    assert config.change("AtStart", "2", source=OCPP).status == "RebootRequired"
    assert config.change("Live", "2", source=OCPP).status == "Accepted"
    assert config.change_many({"Live": "3", "AtStart": "3"}, source="x").status == "RebootRequired"
    assert store.settings() == {"ocpp.Live": "3", "ocpp.AtStart": "3"}
    assert Configuration(store, keys=keys).value("AtStart") == 3
    stored = config.change("AtStart", "4", source=OCPP)
    assert stored.ok
    stored.raise_for_status()  # RebootRequired was stored: not an error


def test_no_station_key_needs_a_reboot() -> None:
    # Every key applies live (the session reconnects itself): see the module doc.
    assert not any(key.reboot_required for key in KEYS)


def test_keys_are_case_insensitive_over_ocpp(config: Configuration, store: Store) -> None:
    # Key names are CiString50Type (OCPP 1.6 §5.3, §5.8).
    result = config.change("heartbeatINTERVAL", "120", source=OCPP)
    assert (result.status, result.key) == ("Accepted", "HeartbeatInterval")
    assert store.get_setting("ocpp.HeartbeatInterval") == "120"
    assert config.get_configuration(["HEARTBEATINTERVAL"]) == (
        [{"key": "HeartbeatInterval", "readonly": False, "value": "120"}],
        [],
    )


# -- SecurityProfile and AuthorizationKey -----------------------------------------


def test_security_profile_only_goes_up(config: Configuration, store: Store) -> None:
    with_key(config)
    assert config.change("SecurityProfile", "1", source=OCPP).status == "Accepted"
    before = store.settings()
    result = config.change("SecurityProfile", "0", source=OCPP)
    assert result.status == "Rejected" and "raised" in result.reason
    assert store.settings() == before
    assert config.change("SecurityProfile", "1", source=OCPP).status == "Accepted"  # same: fine
    assert config.change("SecurityProfile", "3", source=OCPP).status == "Accepted"
    for lower in ("2", "1", "0"):
        assert config.change("SecurityProfile", lower, source=OCPP).status == "Rejected"
        assert config.change("security.profile", lower, source="installer").status == "Rejected"
    assert Configuration(store).get_int("SecurityProfile") == 3
    # after a restart the stored profile is still the floor
    assert Configuration(store).change("SecurityProfile", "2", source=OCPP).status == "Rejected"


@pytest.mark.parametrize("profile", ["1", "2"])
def test_basic_auth_profiles_need_the_authorization_key(
    config: Configuration, store: Store, profile: str
) -> None:
    result = config.change("SecurityProfile", profile, source=OCPP)
    assert result.status == "Rejected" and "AuthorizationKey" in result.reason
    assert store.settings() == {}
    # both at once (the installer page) is fine
    ok = config.change_many(
        {"security.access_key": KEY32, "security.profile": profile}, source="ui"
    )
    assert ok.status == "Accepted"
    assert config.get_int("SecurityProfile") == int(profile)


def test_profile_3_needs_no_password(config: Configuration) -> None:
    assert config.change("SecurityProfile", "3", source=OCPP).status == "Accepted"


def test_tls_profiles_need_a_wss_address(config: Configuration, store: Store) -> None:
    with_key(config)
    assert config.change("connection.central_system_address", "ws://cs/ocpp/", source="ui").ok
    result = config.change("SecurityProfile", "2", source=OCPP)
    assert result.status == "Rejected" and "wss://" in result.reason
    ok = config.change_many(
        {"SecurityProfile": "2", "CentralSystemAddress": "wss://cs/ocpp/"}, source="ui"
    )
    assert ok.status == "Accepted"
    result = config.change("CentralSystemAddress", "ws://cs/ocpp/", source="ui")
    assert (result.status, result.key) == ("Rejected", "CentralSystemAddress")
    assert config.get_str("CentralSystemAddress") == "wss://cs/ocpp/"


def test_profile_check_is_asked_before_raising(store: Store) -> None:
    asked: list[int] = []

    def check(profile: int) -> str | None:
        asked.append(profile)
        return "no CentralSystemRootCertificate installed" if profile >= 2 else None

    config = Configuration(store, profile_check=check)
    with_key(config)
    assert config.change("SecurityProfile", "1", source=OCPP).status == "Accepted"
    result = config.change("SecurityProfile", "2", source=OCPP)
    assert result.status == "Rejected" and "CentralSystemRootCertificate" in result.reason
    assert config.get_int("SecurityProfile") == 1
    assert asked == [1, 2]


def test_authorization_key_is_never_revealed(
    config: Configuration, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "S3cr3t-" + "x" * 30
    assert config.change("security.access_key", secret, source="installer").status == "Accepted"
    entry = get_one(config, "AuthorizationKey")
    assert entry == {"key": "AuthorizationKey", "readonly": False}
    everything, _ = config.get_configuration(None)
    assert {"key": "AuthorizationKey", "readonly": False} in everything
    assert config.text("AuthorizationKey") == "set"
    assert config.text("security.access_key") == "set"
    view = {row["name"]: row for row in config.installer_view()}
    assert view["security.access_key"]["value"] == "set"
    # a rejected attempt does not echo the text either
    bad = config.change("AuthorizationKey", secret + "y" * 10, source=OCPP)
    assert bad.status == "Rejected"
    assert "S3cr3t" not in bad.reason
    shown = json.dumps([everything, config.installer_view(), bad.reason]) + caplog.text
    assert "S3cr3t" not in shown
    # the firmware itself still reads it (HTTP Basic password)
    assert config.get_str("AuthorizationKey") == secret
    assert store.get_setting("ocpp.AuthorizationKey") == secret


def test_unset_authorization_key(config: Configuration) -> None:
    assert config.text("AuthorizationKey") == "not set"
    assert config.get_str("AuthorizationKey") == ""


# -- GetConfiguration ------------------------------------------------------------


def test_get_configuration_all(config: Configuration) -> None:
    requests: list[list[str] | None] = [None, []]
    for request in requests:
        found, unknown = config.get_configuration(request)
        assert unknown == []
        names = {entry["key"] for entry in found}
        assert names == set(SPEC_NAMES) | set(VENDOR_KEYS)
        assert not names & INSTALLER_ONLY
        for entry in found:
            assert set(entry) <= {"key", "readonly", "value"}
            assert len(entry["key"]) <= 50 and len(entry.get("value", "")) <= 500


def test_get_configuration_by_name(config: Configuration) -> None:
    found, unknown = config.get_configuration(
        [
            "HeartbeatInterval",
            "Nope",
            "NumberOfConnectors",
            "ConnectionEnabled",
            "Nope",
            "heartbeatinterval",
            "metering.interval",
        ]
    )
    assert found == [
        {"key": "HeartbeatInterval", "readonly": False, "value": "3600"},
        {"key": "NumberOfConnectors", "readonly": True, "value": "1"},
    ]
    assert unknown == ["Nope", "ConnectionEnabled", "metering.interval"]


def test_get_configuration_key_limit(config: Configuration) -> None:
    sixty = [f"Unknown{i}" for i in range(58)] + ["HeartbeatInterval", "CpoName"]
    found, unknown = config.get_configuration(sixty)
    assert len(found) == 2 and len(unknown) == 58
    with pytest.raises(CallError) as info:
        config.get_configuration([*sixty, "ResetRetries"])
    assert info.value.code == "OccurenceConstraintViolation"
    assert "60" in info.value.description


# -- installer names ------------------------------------------------------------


@pytest.mark.parametrize(("local", "name", "default"), SPEC_3, ids=[row[0] for row in SPEC_3])
def test_installer_and_ocpp_names_are_one_value(
    store: Store, pem: Pem, local: str, name: str, default: str
) -> None:
    config = Configuration(store)
    assert config.resolve(local) is config.resolve(name)
    assert config.text(local) == default
    if name == "Protocol":
        assert config.change(local, "OCPP 1.6 JSON", source="installer").status == "Rejected"
        return
    samples = {
        "ConnectionEnabled": ("off", "false"),
        "CentralSystemAddress": ("wss://cs.example.com:443/ocpp/", "ws://10.0.0.1/"),
        "ChargePointId": ("EVSE-0001", "CP.7"),
        "SecurityProfile": ("3", "3"),
        "AuthorizationKey": (KEY32, KEY40),
        "CentralSystemRootCertificate": (pem.ca, pem.other_ca),
        "ChargePointCertificate": (pem.cert, pem.cert2),
        "ChargePointPrivateKey": (pem.key, pem.key2),
        "FallbackLimit": ("10.5", "16"),
        "WebSocketPingInterval": ("30", "60"),
        "ReconnectFrequency": ("120", "1"),
        "TransactionMessageAttempts": ("5", "7"),
        "TransactionMessageRetryInterval": ("30", "45"),
        "MeterValueSampleInterval": ("60", "300"),
        "MeterValuesSampledData": ("Voltage,Current.Import", "Temperature"),
    }
    first, second = samples[name]
    if name == "ConnectionEnabled":
        assert config.change(local, first, source="installer").status == "Rejected"  # not a bool
        first = "0"
    assert config.change(local, first, source="installer").status == "Accepted"
    assert config.value(local) == config.value(name)
    assert set(store.settings()) == {f"ocpp.{name}"}
    # the OCPP name changes the same value (over OCPP if the CS sees it, else locally)
    source = "installer" if name in INSTALLER_ONLY else OCPP
    assert config.change(name, second, source=source).status == "Accepted"
    assert set(store.settings()) == {f"ocpp.{name}"}
    assert Configuration(store).value(local) == config.value(name)
    row = next(r for r in config.installer_view() if r["name"] == local)
    assert row["value"] == config.text(name)


def test_installer_may_change_any_ocpp_key_locally(config: Configuration) -> None:
    assert config.change("HeartbeatInterval", "600", source="cli").status == "Accepted"
    assert config.get_int("HeartbeatInterval") == 600


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("", True),
        ("ws://cs/", True),
        ("wss://cs.example.com:8443/ocpp/v16/", True),
        ("WSS://cs.example.com/", True),
        ("wss://[::1]:9000/", True),
        ("http://cs/", False),
        ("wss://cs", False),
        ("wss://cs/ocpp", False),
        ("wss:///ocpp/", False),
        ("wss://user:pw@cs/", False),
        ("wss://cs/?x=/", False),
        ("wss://cs/#/", False),
        ("wss://cs:99999/", False),
        ("wss://c s/", False),
        ("wss://cs/\u00e9/", False),
    ],
)
def test_central_system_address(config: Configuration, text: str, ok: bool) -> None:
    result = config.change("connection.central_system_address", text, source="installer")
    assert result.ok is ok, result.reason
    if ok:
        assert config.get_str("CentralSystemAddress") == text.replace("WSS://", "wss://")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("", True),
        ("EVSE-0001", True),
        ("x" * 48, True),
        ("x" * 49, False),
        ("a/b", False),
        ("a b", False),
        ("a:b", False),  # the Basic auth user-id may not hold ':' (RFC 7617 §2)
        ("caf\u00e9", False),
        ("tab\t", False),
    ],
)
def test_charge_point_id(config: Configuration, text: str, ok: bool) -> None:
    assert config.change("connection.charge_point_id", text, source="installer").ok is ok


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0.0),
        ("5.9", 5.9),
        ("6", 6.0),
        ("80", 80.0),
        ("10.25", 10.25),
        ("16.50", 16.5),
        ("7.125", 7.125),
        ("0.001", 0.001),
    ],
)
def test_fallback_limit_accepted(
    config: Configuration, store: Store, text: str, value: float
) -> None:
    assert config.change("monitoring.fallback_limit", text, source="installer").ok
    assert config.get_float("FallbackLimit") == value
    assert Configuration(store).get_float("FallbackLimit") == value


@pytest.mark.parametrize(
    "text", ["-1", "80.01", "81", "nan", "inf", "1e1", "6,5", "", "6.", "6.1234", ".5", " 6"]
)
def test_fallback_limit_rejected(config: Configuration, text: str) -> None:
    assert config.change("monitoring.fallback_limit", text, source="installer").status == "Rejected"


# -- FallbackLimit: never above the station's maximum (evse.limits' one rule) --------


@pytest.fixture
def bounded(store: Store) -> Configuration:
    """A registry opened for a station whose installer maximum is 16 A."""
    return Configuration(store, maxima={"FallbackLimit": 16.0})


@pytest.mark.parametrize("source", ["installer", "cli", "config file"])
def test_fallback_limit_above_the_station_maximum_is_rejected(
    bounded: Configuration, store: Store, source: str
) -> None:
    before = store.settings()
    result = bounded.change("monitoring.fallback_limit", "20", source=source)
    assert (result.status, result.key) == ("Rejected", "FallbackLimit")
    assert result.reason == "20 A is above 16 A, the most this station allows"
    assert bounded.change("FallbackLimit", "16.001", source=source).status == "Rejected"
    assert store.settings() == before
    assert bounded.get_float("FallbackLimit") == 6.0
    for text, value in [("16", 16.0), ("5", 5.0), ("0", 0.0)]:  # below 6 A: 0 A in force
        assert bounded.change("FallbackLimit", text, source=source).ok
        assert bounded.get_float("FallbackLimit") == value


def test_fallback_limit_over_ocpp_follows_the_same_rule(
    bounded: Configuration, store: Store
) -> None:
    # ChangeConfiguration (chargepoint: change_async(source="ocpp")) reaches the
    # vendor key FallbackLimit with the installer's rule: above the maximum
    # Rejected and nothing changes, within it Accepted and GetConfiguration shows it.
    before = store.settings()
    result = bounded.change("FallbackLimit", "20", source=OCPP)
    assert (result.status, result.key) == ("Rejected", "FallbackLimit")
    assert store.settings() == before
    assert bounded.change("FallbackLimit", "10", source=OCPP).status == "Accepted"
    found, unknown = bounded.get_configuration(["FallbackLimit"])
    assert unknown == []
    assert found == [{"key": "FallbackLimit", "readonly": False, "value": "10"}]


async def test_fallback_limit_above_the_maximum_rejected_async_and_all_or_nothing(
    bounded: Configuration, store: Store
) -> None:
    seen: list[tuple[str, Value]] = []
    bounded.subscribe(lambda name, value: seen.append((name, value)))
    result = await bounded.change_many_async(
        {"HeartbeatInterval": "90", "monitoring.fallback_limit": "32"}, source="installer"
    )
    assert (result.status, result.key) == ("Rejected", "FallbackLimit")
    assert seen == []
    assert bounded.get_int("HeartbeatInterval") == 3600
    assert (await bounded.change_async("FallbackLimit", "10", source="installer")).ok
    assert seen == [("FallbackLimit", 10.0)]


def test_the_installer_page_shows_the_station_maximum(bounded: Configuration) -> None:
    rows = {row["name"]: row for row in bounded.installer_view()}
    assert rows["monitoring.fallback_limit"]["range"] == "0..16 A"


def test_a_maximum_above_the_declared_range_changes_nothing(store: Store) -> None:
    config = Configuration(store, maxima={"FallbackLimit": 100.0})
    assert config.change("FallbackLimit", "80", source="installer").ok
    assert config.change("FallbackLimit", "81", source="installer").status == "Rejected"


def test_the_maximum_is_kept_for_a_registry_opened_without_it(store: Store) -> None:
    # evse config set while no station runs opens the registry without maxima.
    Configuration(store, maxima={"FallbackLimit": 16.0})
    assert store.get_setting("bound.FallbackLimit") == "16"
    offline = Configuration(store)
    result = offline.change("monitoring.fallback_limit", "20", source="installer")
    assert result.status == "Rejected" and "16 A" in result.reason
    # The station's maximum wins over the stored one when it is given again.
    raised = Configuration(store, maxima={"FallbackLimit": 32.0})
    assert raised.change("monitoring.fallback_limit", "20", source="installer").ok
    assert store.get_setting("bound.FallbackLimit") == "32"


def test_a_stored_fallback_above_a_lowered_maximum_reads_as_the_maximum(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # 32 A set while the installer maximum was 32; then limits.installer_max = 16.
    assert Configuration(store).change("FallbackLimit", "32", source="installer").ok
    config = Configuration(store, maxima={"FallbackLimit": 16.0})
    assert config.get_float("FallbackLimit") == 16.0
    assert "above this station's maximum" in caplog.text
    # A bad stored value still reads as the default.
    store.set_settings({"ocpp.FallbackLimit": "junk"})
    assert Configuration(store, maxima={"FallbackLimit": 16.0}).get_float("FallbackLimit") == 6.0


def test_impossible_maxima_are_refused(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="no such configuration key"):
        Configuration(store, maxima={"NoSuchKey": 1.0})
    with pytest.raises(ValueError, match="below its default"):
        Configuration(store, maxima={"FallbackLimit": 5.0})
    with pytest.raises(ValueError, match="number key"):
        Configuration(store, maxima={"ConnectionEnabled": 1.0})
    with pytest.raises(ValueError, match="finite"):
        Configuration(store, maxima={"FallbackLimit": float("nan")})
    assert store.settings() == {}
    # A damaged stored maximum is ignored (logged), not a refusal to start.
    store.set_settings({"bound.FallbackLimit": "2"})
    assert Configuration(store).change("FallbackLimit", "20", source="installer").ok
    assert "stored maximum" in caplog.text


def test_an_int_key_takes_a_whole_maximum(store: Store) -> None:
    config = Configuration(store, maxima={"ConnectionTimeOut": 600.9})
    assert config.change("ConnectionTimeOut", "600", source=OCPP).ok
    result = config.change("ConnectionTimeOut", "601", source=OCPP)
    assert (result.status, result.reason) == (
        "Rejected",
        "601 s is above 600 s, the most this station allows",
    )


def test_reconnect_frequency_range(config: Configuration) -> None:
    for text, ok in [("1", True), ("3600", True), ("0", False), ("3601", False)]:
        assert config.change("monitoring.reconnect_frequency", text, source="ui").ok is ok


@pytest.mark.parametrize(("text", "ok"), [("", True), ("cs.pem", False)])
def test_certificate_path(config: Configuration, text: str, ok: bool) -> None:
    assert config.change("security.certificate", text, source="installer").ok is ok


# -- change_many ----------------------------------------------------------------


def test_change_many_is_all_or_nothing(config: Configuration, store: Store) -> None:
    calls: list[tuple[str, Value]] = []
    config.subscribe(lambda name, value: calls.append((name, value)))
    result = config.change_many(
        {"metering.interval": "60", "monitoring.fallback_limit": "99", "HeartbeatInterval": "90"},
        source="installer",
    )
    assert (result.status, result.key) == ("Rejected", "FallbackLimit")
    with pytest.raises(ConfigRejected) as info:
        result.raise_for_status()
    assert info.value.key == "FallbackLimit" and "80" in info.value.reason
    assert store.settings() == {}
    assert config.get_int("MeterValueSampleInterval") == 3600
    assert calls == []

    result = config.change_many(
        {"metering.interval": "60", "monitoring.fallback_limit": "16", "HeartbeatInterval": "90"},
        source="installer",
    )
    assert result.status == "Accepted"
    assert store.settings() == {
        "ocpp.MeterValueSampleInterval": "60",
        "ocpp.FallbackLimit": "16",
        "ocpp.HeartbeatInterval": "90",
    }
    assert calls == [
        ("MeterValueSampleInterval", 60),
        ("FallbackLimit", 16.0),
        ("HeartbeatInterval", 90),
    ]


def test_one_key_under_two_names_is_rejected(config: Configuration, store: Store) -> None:
    result = config.change_many(
        {"metering.interval": "60", "MeterValueSampleInterval": "60"}, source="installer"
    )
    assert result.status == "Rejected"
    assert store.settings() == {}


class FailingStore:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get_setting(self, key: str) -> str | None:
        return self.values.get(key)

    def set_settings(self, values: Mapping[str, str]) -> None:
        raise OSError("disk full")


def test_a_store_failure_is_rejected_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = Configuration(FailingStore())
    calls: list[str] = []
    config.subscribe(lambda name, value: calls.append(name))
    result = config.change("HeartbeatInterval", "60", source=OCPP)
    assert result.status == "Rejected" and "disk full" in result.reason
    assert config.get_int("HeartbeatInterval") == 3600
    assert calls == []
    assert "the store failed" in caplog.text


# -- subscribers ------------------------------------------------------------------


def test_subscribers(config: Configuration, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, Value]] = []

    def broken(name: str, value: Value) -> None:
        raise RuntimeError("listener bug")

    config.subscribe(broken)
    unsubscribe = config.subscribe(lambda name, value: seen.append((name, value)))
    assert config.change("WebSocketPingInterval", "30", source=OCPP).status == "Accepted"
    assert seen == [("WebSocketPingInterval", 30)]
    assert "listener bug" in caplog.text
    config.change("WebSocketPingInterval", "0", source=OCPP)  # rejected
    config.change("WebSocketPingInterval", "30", source=OCPP)  # unchanged
    config.change("monitoring.connection_check_frequency", "30", source="installer")
    assert seen == [("WebSocketPingInterval", 30)]
    config.change("monitoring.connection_check_frequency", "45", source="installer")
    assert seen[-1] == ("WebSocketPingInterval", 45)
    unsubscribe()
    config.change("WebSocketPingInterval", "50", source=OCPP)
    assert seen[-1] == ("WebSocketPingInterval", 45)
    unsubscribe()  # twice is harmless


async def test_change_async_writes_in_a_thread_and_notifies(
    config: Configuration, store: Store
) -> None:
    seen: list[tuple[str, Value]] = []
    config.subscribe(lambda name, value: seen.append((name, value)))
    result = await config.change_async("HeartbeatInterval", "120", source=OCPP)
    assert result.status == "Accepted"
    assert seen == [("HeartbeatInterval", 120)]
    bad = await config.change_many_async({"HeartbeatInterval": "1"}, source=OCPP)
    assert bad.status == "Rejected"
    assert store.settings() == {"ocpp.HeartbeatInterval": "120"}


# -- persistence and reads ------------------------------------------------------


def test_values_persist_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "station.db"
    with Store.open(path) as store:
        config = Configuration(store)
        assert config.change_many(
            {
                "HeartbeatInterval": "900",
                "MeterValuesSampledData": "Voltage,Power.Active.Import",
                "security.access_key": KEY40,
                "SecurityProfile": "1",
                "connection.enabled": "false",
                "monitoring.fallback_limit": "8.5",
            },
            source="installer",
        ).ok
    with Store.open(path) as store:
        config = Configuration(store)
        assert config.get_int("HeartbeatInterval") == 900
        assert config.get_measurands("metering.measurands") == ("Voltage", "Power.Active.Import")
        assert config.get_str("AuthorizationKey") == KEY40
        assert config.get_int("SecurityProfile") == 1
        assert config.get_bool("ConnectionEnabled") is False
        assert config.get_float("FallbackLimit") == 8.5
        assert config.text("ClockAlignedDataInterval") == "3600"  # untouched: default


def test_a_bad_stored_value_falls_back_to_the_default(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.set_settings({"ocpp.HeartbeatInterval": "5", "ocpp.AuthorizationKey": "short-secret"})
    config = Configuration(store)
    assert config.get_int("HeartbeatInterval") == 3600
    assert config.get_str("AuthorizationKey") == ""
    assert "HeartbeatInterval" in caplog.text
    assert "short-secret" not in caplog.text


def test_read_only_keys_ignore_the_store(store: Store) -> None:
    store.set_settings({"ocpp.NumberOfConnectors": "2", "ocpp.GetConfigurationMaxKeys": "1000"})
    config = Configuration(store)
    assert config.get_int("NumberOfConnectors") == 1
    assert config.get_int("GetConfigurationMaxKeys") == 60


def test_typed_reads(config: Configuration) -> None:
    assert config.get_str("ConnectorPhaseRotation") == "Unknown"
    assert config.value("metering.measurands") == ("Energy.Active.Import.Register",)
    with pytest.raises(TypeError):
        config.get_int("LocalPreAuthorize")
    with pytest.raises(KeyError):
        config.value("NoSuchKey")


def test_installer_view_rows(config: Configuration) -> None:
    rows = {row["name"]: row for row in config.installer_view()}
    limit = rows["monitoring.fallback_limit"]
    assert limit["ocpp"] == "FallbackLimit"
    assert limit["unit"] == "A" and limit["range"] == "0..80 A"
    assert "6 A" in limit["description"]
    ping = rows["monitoring.connection_check_frequency"]
    assert ping["ocpp"] == "WebSocketPingInterval" and ping["range"] == "1..1200 s"
    assert rows["connection.protocol"]["readonly"] is True
    assert rows["security.access_key"]["default"] == "not set"


def test_a_clashing_declaration_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="twice"):
        Configuration(
            store, keys=(Key("A", Kind.BOOL, "true", ""), Key("a", Kind.BOOL, "true", ""))
        )
    with pytest.raises(ValueError, match="canonical"):
        Configuration(store, keys=(Key("A", Kind.BOOL, "1", ""),))
    with pytest.raises(ValueError, match="outside"):
        Configuration(store, keys=(Key("A", Kind.INT, "9", "", lo=0, hi=5),))


# -- properties --------------------------------------------------------------------

NAMES = sorted({k.name for k in KEYS} | {k.installer for k in KEYS if k.installer})
TEXTS = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "0", "1", "-1", "true", "3600", "wss://cs/", KEY32, ALL_SIX, "x" * 600]),
    st.integers(-(10**20), 10**20).map(str),
    st.lists(st.sampled_from([*MEASURANDS, "Foo", " ", ""]), max_size=8).map(",".join),
)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store.open(tmp_path_factory.mktemp("config") / "station.db")
    yield s
    s.close()


@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.one_of(st.sampled_from(NAMES), st.text(max_size=20)), TEXTS),
        min_size=1,
        max_size=4,
    ),
    source=st.sampled_from([OCPP, "installer"]),
    many=st.booleans(),
)
def test_random_changes_never_raise_and_rejections_change_nothing(
    shared_store: Store, changes: list[tuple[str, str]], source: str, many: bool
) -> None:
    config = Configuration(shared_store)
    before = shared_store.settings()
    values = {k.name: config.value(k.name) for k in KEYS}
    if many:
        results = [config.change_many(dict(changes), source=source)]
    else:
        results = [config.change(name, text, source=source) for name, text in changes[:1]]
    for result in results:
        assert result.status in ("Accepted", "Rejected", "RebootRequired", "NotSupported")
        if not result.ok:
            assert shared_store.settings() == before
            assert {k.name: config.value(k.name) for k in KEYS} == values
        # whatever happened, what is stored reads back as what is cached
        again = Configuration(shared_store)
        assert {k.name: again.value(k.name) for k in KEYS} == {
            k.name: config.value(k.name) for k in KEYS
        }


@settings(max_examples=500, deadline=None)
@given(
    key=st.sampled_from([k for k in KEYS if not k.readonly]),
    text=st.one_of(
        TEXTS,
        st.decimals(0, 100, places=3).map(str),
        st.integers(0, 100_000).map(str),
        st.sampled_from(["RST", "tsr", "TRUE", "0", "/etc/x.pem", "wss://h:1/a/"]),
    ),
)
def test_canonical_text_reads_back_as_the_same_value(key: Key, text: str) -> None:
    try:
        value = key.parse(text)
    except ValueError:
        return
    canonical = key.format(value)
    assert key.parse(canonical) == value
    assert key.format(key.parse(canonical)) == canonical
