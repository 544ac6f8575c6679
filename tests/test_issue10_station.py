"""Issue 10 wired into the running station: ``evse run --sim`` against the lab central system.

The station is a process of its own (tests/ocpp_harness.py), the central system
the bench one (``python -m evse_lab.csms``, built on the ocpp package), the
upload server a real HTTP server on loopback (tests/transfer_servers.py). What is
judged is what the central system received and what the upload server got.
Named after the OCA compliance cases they cover: TC_045_1 (GetDiagnostics),
TC_079 (GetLog SecurityLog), TC_075_1 / TC_076 (InstallCertificate,
GetInstalledCertificateIds), TC_044_3 (an update that cannot be installed: the
simulator has no releases), and the security events the station sends.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from evse.store import Store
from tests.csms_peer import Csms, call, call_result, running_csms, wait_connected, wait_for
from tests.ocpp_harness import CP, StationProcess, booted, calls, station, until
from tests.transfer_servers import HttpServer

pytestmark = pytest.mark.slow

#: Hex, 20 bytes (the Security Whitepaper's form); never to leave the device.
KEY = "4f43415f4f4354545f61646d696e5f7465737431"
#: The six profiles of OCPP 1.6 section 3.1, all of them registered now.
ALL_PROFILES = [
    "Core",
    "FirmwareManagement",
    "LocalAuthListManagement",
    "Reservation",
    "SmartCharging",
    "RemoteTrigger",
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    Store.open(d / "station.sqlite").close()
    return d


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms() as cs:
        yield cs


@pytest.fixture
def uploads(tmp_path: Path) -> Iterator[HttpServer]:
    with HttpServer(tmp_path / "www").in_thread() as server:
        yield server


def statuses(csms: Csms, action: str) -> list[str]:
    return [str(m["payload"]["status"]) for m in calls(csms, action)]


def security_events(csms: Csms) -> list[str]:
    return [str(m["payload"]["type"]) for m in calls(csms, "SecurityEventNotification")]


def unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def uploaded(server: HttpServer, path: str) -> bytes:
    return until(lambda: server.uploads.get(path), 20, f"an upload to {path}")  # type: ignore[no-any-return]


@pytest.fixture
def running(csms: Csms, data_dir: Path) -> Iterator[StationProcess]:
    set_key = subprocess.run(
        [
            *(sys.executable, "-m", "ops.cli", "config", "set", "AuthorizationKey", KEY),
            *("--data-dir", str(data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert set_key.returncode == 0, set_key.stderr
    with station(csms, data_dir) as st:
        booted(csms)
        yield st


def test_supported_feature_profiles_name_the_six_and_no_security_profile(
    csms: Csms, running: StationProcess
) -> None:
    got = call_result(csms, CP, "GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
    (entry,) = got["configurationKey"]
    # FirmwareManagement is advertised now; the whitepaper's messages are answered
    # (below) but add no name OCPP 1.6 does not know (section 9.1).
    assert entry["value"].split(",") == ALL_PROFILES
    assert entry["readonly"] is True


def test_startup_of_the_device_and_setting_system_time_are_sent_after_boot(
    csms: Csms, running: StationProcess
) -> None:
    startup = wait_for(
        csms,
        CP,
        "SecurityEventNotification",
        within=20,
        where=lambda m: m["payload"]["type"] == "StartupOfTheDevice",
    )
    boot = wait_for(csms, CP, "BootNotification")
    # Raised before the boot, sent after it (nothing but BootNotification before).
    assert startup["seq"] > boot["seq"]
    assert startup["payload"]["techInfo"].startswith("evse-firmware ")
    # Its time was taken before the clock was set, and sent corrected (no marker).
    assert set(startup["payload"]) == {"type", "timestamp", "techInfo"}
    wait_for(
        csms,
        CP,
        "SecurityEventNotification",
        within=20,
        where=lambda m: m["payload"]["type"] == "SettingSystemTime",
    )


def test_tc_045_1_get_diagnostics_uploads_an_archive_without_the_authorization_key(
    csms: Csms, running: StationProcess, uploads: HttpServer
) -> None:
    answer = call_result(csms, CP, "GetDiagnostics", {"location": uploads.url("incoming/")})
    name = answer["fileName"]
    assert name.startswith(f"{CP}-diagnostics-") and name.endswith(".zip")
    data = uploaded(uploads, "/incoming/")
    until(
        lambda: statuses(csms, "DiagnosticsStatusNotification") == ["Uploading", "Uploaded"],
        20,
        "DiagnosticsStatusNotification Uploading, Uploaded",
    )
    members = unzip(data)
    assert set(members) >= {"manifest.json", "evse.log", "configuration.json"}
    everything = b"".join(members.values())
    # The key, in any case, and the password it encodes: never in the archive.
    for secret in (KEY, KEY.upper(), bytes.fromhex(KEY).decode("latin-1")):
        assert secret.encode("latin-1") not in everything
    rows = json.loads(members["configuration.json"])
    (row,) = [r for r in rows if "AuthorizationKey" in (r["key"], r["name"])]
    assert row["secret"] is True and row["value"] == "set"
    # The station's own log made it there (the file logs run).
    assert b"StartupOfTheDevice" in members["evse.log"]
    manifest = json.loads(members["manifest.json"])
    assert manifest["firmwareVersion"] == running_version()


def running_version() -> str:
    from ops.run import VERSION  # noqa: PLC0415 - the same checkout as the child

    return VERSION


def test_tc_079_get_log_security_log(
    csms: Csms, running: StationProcess, uploads: HttpServer
) -> None:
    payload = {
        "logType": "SecurityLog",
        "requestId": 79,
        "log": {"remoteLocation": uploads.url("sec/")},
    }
    answer = call_result(csms, CP, "GetLog", payload)
    assert answer["status"] == "Accepted"
    assert "SecurityLog" in answer["filename"]
    data = uploaded(uploads, "/sec/")
    until(
        lambda: statuses(csms, "LogStatusNotification") == ["Uploading", "Uploaded"],
        20,
        "LogStatusNotification Uploading, Uploaded",
    )
    assert {m["payload"]["requestId"] for m in calls(csms, "LogStatusNotification")} == {79}
    members = unzip(data)
    assert list(members) == ["security.log"]
    lines = [json.loads(line) for line in members["security.log"].splitlines()]
    assert any("StartupOfTheDevice" in line["message"] for line in lines)
    assert all(line["logger"] == "evse.security" for line in lines)


def test_a_security_log_cleared_between_runs_is_reported_once(csms: Csms, data_dir: Path) -> None:
    """Whitepaper ed. 3 SecurityLogWasCleared (critical): a restart with the log as it
    was raises nothing; removing the security log files while the station is
    stopped is raised at the next start, after StartupOfTheDevice, once."""

    def startups() -> int:
        return security_events(csms).count("StartupOfTheDevice")

    with station(csms, data_dir):
        booted(csms)
        until(lambda: startups() == 1, 20, "the first StartupOfTheDevice")
    with station(csms, data_dir):
        booted(csms, boots=2)
        until(lambda: startups() == 2, 20, "the second StartupOfTheDevice")
    assert "SecurityLogWasCleared" not in security_events(csms)
    for path in (data_dir / "log").glob("security.log*"):
        path.unlink()
    with station(csms, data_dir):
        booted(csms, boots=3)
        until(lambda: "SecurityLogWasCleared" in security_events(csms), 20, "the event")
        (cleared,) = [
            m
            for m in calls(csms, "SecurityEventNotification")
            if m["payload"]["type"] == "SecurityLogWasCleared"
        ]
        assert "security.log of the last run" in cleared["payload"]["techInfo"]
        sent = security_events(csms)
        at = sent.index("SecurityLogWasCleared")
        assert sent[at - 1] == "StartupOfTheDevice" and sent.count("StartupOfTheDevice") == 3
        # The new security log has both events of this run.
        lines = (data_dir / "log" / "security.log").read_text()
        assert "StartupOfTheDevice" in lines and "SecurityLogWasCleared" in lines
    with station(csms, data_dir):
        booted(csms, boots=4)
        until(lambda: startups() == 4, 20, "the fourth StartupOfTheDevice")
    assert security_events(csms).count("SecurityLogWasCleared") == 1


def test_tc_075_1_install_certificate_and_get_installed_certificate_ids(
    csms: Csms, running: StationProcess
) -> None:
    pem = trustme.CA().cert_pem.bytes().decode()
    cert = x509.load_pem_x509_certificate(pem.encode())
    installed = call_result(
        csms,
        CP,
        "InstallCertificate",
        {"certificateType": "CentralSystemRootCertificate", "certificate": pem},
    )
    assert installed == {"status": "Accepted"}
    ids = call_result(
        csms, CP, "GetInstalledCertificateIds", {"certificateType": "CentralSystemRootCertificate"}
    )
    assert ids["status"] == "Accepted"
    (hashes,) = ids["certificateHashData"]
    assert hashes["hashAlgorithm"] == "SHA256"
    assert hashes["serialNumber"] == format(cert.serial_number, "X")
    # None of the other type; the store change is a security event.
    other = call_result(
        csms, CP, "GetInstalledCertificateIds", {"certificateType": "ManufacturerRootCertificate"}
    )
    assert other == {"status": "NotFound"}
    wait_for(
        csms,
        CP,
        "SecurityEventNotification",
        within=20,
        where=lambda m: m["payload"]["type"] == "ReconfigurationOfSecurityParameters",
    )
    # TC_076: with no TLS the root is not in use, so it can be deleted.
    deleted = call_result(csms, CP, "DeleteCertificate", {"certificateHashData": hashes})
    assert deleted == {"status": "Accepted"}
    assert call_result(
        csms, CP, "GetInstalledCertificateIds", {"certificateType": "CentralSystemRootCertificate"}
    ) == {"status": "NotFound"}


def test_tc_044_3_update_on_the_simulator_downloads_checks_and_fails_to_install(
    csms: Csms, running: StationProcess, uploads: HttpServer, small_image: Path
) -> None:
    """``evse run --sim`` has no releases: the real download and the manifest check
    happen, the installation fails, and the station keeps running its firmware."""
    shutil.copyfile(small_image, uploads.root / small_image.name)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    call_result(
        csms,
        CP,
        "UpdateFirmware",
        {"location": uploads.url(small_image.name), "retrieveDate": now, "retries": 0},
    )
    until(
        lambda: (
            statuses(csms, "FirmwareStatusNotification")
            == ["Downloading", "Downloaded", "Installing", "InstallationFailed"]
        ),
        30,
        "FirmwareStatusNotification up to InstallationFailed",
    )
    assert uploads.seen("GET", f"/{small_image.name}")
    # Idle connectors were Unavailable meanwhile, and are available again.
    until(lambda: running.status()["status"] == "Available", 10, "Available again")
    assert "Unavailable" in [
        m["payload"]["status"]
        for m in calls(csms, "StatusNotification")
        if m["payload"]["connectorId"] == 1
    ]
    # Nothing of the download is left in the data directory.
    assert list((running.data_dir / "firmware").iterdir()) == []


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    """A real image (``ops.release.pack``: manifest, sha256 per member) of tiny wheels."""
    from ops import release  # noqa: PLC0415
    from tests.test_release import tiny_wheel  # noqa: PLC0415

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    firmware = tiny_wheel(wheels, "evse_firmware", "9.9.9", b"print('firmware')\n" * 500)
    tiny_wheel(wheels, "trio", "0.35.0", b"x" * 20_000)
    return release.pack(wheels, tmp_path / "out", firmware)


class Manufacturer:
    """A ManufacturerRootCertificate and a firmware signing certificate under it (EC P-256)."""

    def __init__(self, where: Path) -> None:
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import NameOID  # noqa: PLC0415

        now = datetime.now(UTC)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Manufacturer Root")])
        root = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(root_key, hashes.SHA256())
        )
        signer_key = ec.generate_private_key(ec.SECP256R1())
        signer = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Firmware Signing")])
            )
            .issuer_name(root_name)
            .public_key(signer_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.root_pem = root.public_bytes(pem).decode()
        self.signer_pem = signer.public_bytes(pem).decode()
        self.key = where / "signing-key.pem"
        self.key.write_bytes(
            signer_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def signed_statuses(csms: Csms, request_id: int) -> list[str]:
    return [
        str(m["payload"]["status"])
        for m in calls(csms, "SignedFirmwareStatusNotification")
        if m["payload"].get("requestId") == request_id
    ]


def test_tc_080_and_tc_081_signed_updates_are_checked_against_the_installed_root(
    csms: Csms, running: StationProcess, uploads: HttpServer, small_image: Path, tmp_path: Path
) -> None:
    from ops import release  # noqa: PLC0415

    maker = Manufacturer(tmp_path)
    installed = call_result(
        csms,
        CP,
        "InstallCertificate",
        {"certificateType": "ManufacturerRootCertificate", "certificate": maker.root_pem},
    )
    assert installed == {"status": "Accepted"}
    shutil.copyfile(small_image, uploads.root / small_image.name)
    url = uploads.url(small_image.name)
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def signed(request_id: int, signature: str) -> dict[str, Any]:
        firmware = {
            "location": url,
            "retrieveDateTime": now,
            "signingCertificate": maker.signer_pem,
            "signature": signature,
        }
        payload = {"requestId": request_id, "retries": 0, "firmware": firmware}
        return call_result(csms, CP, "SignedUpdateFirmware", payload)

    # TC_080: signed by ops.release.sign with the signing certificate's key; the
    # simulator has no releases, so it ends at the installation.
    good = release.sign(small_image, maker.key).decode()
    assert signed(80, good) == {"status": "Accepted"}
    until(
        lambda: (
            signed_statuses(csms, 80)
            == [
                "Downloading",
                "Downloaded",
                "SignatureVerified",
                "Installing",
                "InstallationFailed",
            ]
        ),
        30,
        "SignedFirmwareStatusNotification 80",
    )
    # TC_081: a signature of another file: refused before anything is installed.
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the image")
    assert signed(81, release.sign(other, maker.key).decode()) == {"status": "Accepted"}
    until(
        lambda: signed_statuses(csms, 81) == ["Downloading", "Downloaded", "InvalidSignature"],
        30,
        "SignedFirmwareStatusNotification 81",
    )
    wait_for(
        csms,
        CP,
        "SecurityEventNotification",
        within=20,
        where=lambda m: m["payload"]["type"] == "InvalidFirmwareSignature",
    )
    # A certificate the root did not sign: InvalidCertificate, answered at once.
    (tmp_path / "stranger").mkdir()
    stranger = Manufacturer(tmp_path / "stranger").signer_pem
    payload = {
        "requestId": 82,
        "firmware": {
            "location": url,
            "retrieveDateTime": now,
            "signingCertificate": stranger,
            "signature": good,
        },
    }
    assert call_result(csms, CP, "SignedUpdateFirmware", payload) == {
        "status": "InvalidCertificate"
    }
    # Plain UpdateFirmware is refused once a ManufacturerRootCertificate is installed.
    outcome = call(csms, CP, "UpdateFirmware", {"location": url, "retrieveDate": now})
    assert outcome["kind"] == "error" and outcome["error"]["code"] == "NotSupported"


def evse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tc_075_1_an_installed_root_is_a_trust_anchor_and_in_use(
    tmp_path: Path, data_dir: Path
) -> None:
    """Security profile 2 on the installer's root file; the same root installed with
    InstallCertificate; then the file removed by the installer: allowed only because
    the store holds a root now (the prerequisite), and the station reconnects over
    TLS with the installed root alone. That root is in use: DeleteCertificate Failed."""
    from tests.test_ocpp_security import Pki  # noqa: PLC0415

    pki = Pki(tmp_path)
    with running_csms("--tls-cert", str(pki.server_pem), "--basic-auth", KEY) as cs:
        for key, value in (
            ("CentralSystemAddress", cs.ws),
            ("CentralSystemRootCertificate", str(pki.ca_pem)),
            ("AuthorizationKey", KEY),
            ("SecurityProfile", "2"),
        ):
            done = evse("config", "set", key, value, "--data-dir", str(data_dir))
            assert done.returncode == 0, done.stderr
        with station(cs, data_dir) as st:
            booted(cs)
            sock = st.ready["control_socket"]
            # No root but the file's yet: removing the file is refused (profile 2 is TLS).
            refused = evse("config", "set", "CentralSystemRootCertificate", "", "--socket", sock)
            assert refused.returncode != 0 and "CentralSystemRootCertificate" in refused.stderr
            pem = pki.ca.cert_pem.bytes().decode()
            installed = call_result(
                cs,
                CP,
                "InstallCertificate",
                {"certificateType": "CentralSystemRootCertificate", "certificate": pem},
            )
            assert installed == {"status": "Accepted"}
            removed = evse("config", "set", "CentralSystemRootCertificate", "", "--socket", sock)
            assert removed.returncode == 0, removed.stderr
            state = wait_connected(cs, CP, within=30, connections=2)
            assert state["transport"]["tls"] is True
            ids = call_result(
                cs,
                CP,
                "GetInstalledCertificateIds",
                {"certificateType": "CentralSystemRootCertificate"},
            )
            (hashes,) = ids["certificateHashData"]
            # M04.FR.06: the root the TLS connection was verified with stays.
            deleted = call_result(cs, CP, "DeleteCertificate", {"certificateHashData": hashes})
            assert deleted == {"status": "Failed"}
