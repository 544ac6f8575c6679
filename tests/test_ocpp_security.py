"""Security profiles 1-3 end to end: the station process against the bench central system.

Real TLS with certificates made by trustme, HTTP Basic authentication, client
certificates; the central system is built on the ocpp package and websockets
(code we did not write). Failures must surface at once with their reason.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from evse.store import Store
from tests.csms_peer import Csms, chargepoints, running_csms, wait_for
from tests.ocpp_harness import CP, station, until

pytestmark = pytest.mark.slow

#: Hex (Security Whitepaper): the Basic password is the 16 bytes it encodes, as the
#: lab central system (--basic-auth-form hex, its default) expects.
KEY = "0123456789abcdef0123456789ABCDEF"


def evse_config(data_dir: Path, *pairs: tuple[str, str]) -> None:
    """Installer settings, written before the station starts (``evse config set``)."""
    for key, value in pairs:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "config",
                "set",
                key,
                value,
                "--data-dir",
                str(data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (key, result.stderr)


class Pki:
    """A central-system CA with a server certificate, and a charge-point identity."""

    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_pem = tmp / "server.pem"
        server.private_key_and_cert_chain_pem.write_to_path(str(self.server_pem))
        self.ca_pem = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        client = self.ca.issue_cert(common_name=CP)
        self.client_cert = tmp / "cp-cert.pem"
        self.client_key = tmp / "cp-key.pem"
        for blob in client.cert_chain_pems:
            with self.client_cert.open("ab") as f:
                f.write(blob.bytes())
        client.private_key_pem.write_to_path(str(self.client_key))
        other = trustme.CA()
        self.other_ca_pem = tmp / "other-ca.pem"
        other.cert_pem.write_to_path(str(self.other_ca_pem))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    Store.open(d / "station.sqlite").close()
    return d


@pytest.fixture
def basic_csms() -> Iterator[Csms]:
    with running_csms("--basic-auth", KEY) as cs:
        yield cs


def link(view: dict[str, Any]) -> dict[str, Any]:
    cs: dict[str, Any] = view["central_system"]
    return cs


def test_profile_1_basic_authentication(basic_csms: Csms, data_dir: Path) -> None:
    evse_config(data_dir, ("AuthorizationKey", KEY), ("SecurityProfile", "1"))
    with station(basic_csms, data_dir):
        wait_for(basic_csms, CP, "BootNotification")
        transport = chargepoints(basic_csms)["chargepoints"][CP]["transport"]
        assert transport["auth_user"] == CP
        assert transport["tls"] is False


def test_profile_1_wrong_key_is_reported_at_once(basic_csms: Csms, data_dir: Path) -> None:
    # Another key (not KEY.lower(): a hex key names bytes, so its case does not matter).
    wrong = "fedcba9876543210" + KEY[16:]
    evse_config(data_dir, ("AuthorizationKey", wrong), ("SecurityProfile", "1"))
    with station(basic_csms, data_dir) as st:
        started = time.monotonic()
        view = until(lambda: _reason_contains(st.try_status(), "401"), 10, "401 reported")
        assert time.monotonic() - started < 5
        assert link(view)["state"] == "offline"
        refused = chargepoints(basic_csms)["chargepoints"][CP]["unauthorized"]
        assert refused and refused[0]["username"] == CP


def _reason_contains(view: dict[str, Any] | None, text: str) -> dict[str, Any] | None:
    if view is None:
        return None
    return view if text in str(link(view).get("reason", "")) else None


def test_profile_2_tls_with_the_installed_root_certificate(pki: Pki, data_dir: Path) -> None:
    with running_csms("--tls-cert", str(pki.server_pem), "--basic-auth", KEY) as cs:
        evse_config(
            data_dir,
            ("CentralSystemAddress", cs.ws),
            ("CentralSystemRootCertificate", str(pki.ca_pem)),
            ("AuthorizationKey", KEY),
            ("SecurityProfile", "2"),
        )
        assert cs.ws.startswith("wss://")
        with station(cs, data_dir):
            wait_for(cs, CP, "BootNotification")
            transport = chargepoints(cs)["chargepoints"][CP]["transport"]
            assert transport["tls"] is True
            assert transport["auth_user"] == CP


def test_profile_2_wrong_root_certificate_fails_at_once(pki: Pki, data_dir: Path) -> None:
    with running_csms("--tls-cert", str(pki.server_pem), "--basic-auth", KEY) as cs:
        evse_config(
            data_dir,
            ("CentralSystemAddress", cs.ws),
            ("CentralSystemRootCertificate", str(pki.other_ca_pem)),
            ("AuthorizationKey", KEY),
            ("SecurityProfile", "2"),
        )
        with station(cs, data_dir) as st:
            started = time.monotonic()
            view = until(lambda: _reason_contains(st.try_status(), "certificate"), 10, "TLS error")
            # Far sooner than the 10 s connect timeout: the reason, not a timeout.
            assert time.monotonic() - started < 5
            assert "unable to get local issuer certificate" in link(view)["reason"]
            assert CP not in chargepoints(cs)["chargepoints"]


def test_profile_3_client_certificate(pki: Pki, data_dir: Path) -> None:
    with running_csms("--tls-cert", str(pki.server_pem), "--client-ca", str(pki.ca_pem)) as cs:
        evse_config(
            data_dir,
            ("CentralSystemAddress", cs.ws),
            ("CentralSystemRootCertificate", str(pki.ca_pem)),
            ("ChargePointCertificate", str(pki.client_cert)),
            ("ChargePointPrivateKey", str(pki.client_key)),
            ("SecurityProfile", "3"),
        )
        with station(cs, data_dir):
            wait_for(cs, CP, "BootNotification")
            transport = chargepoints(cs)["chargepoints"][CP]["transport"]
            assert transport["client_cert_subject"].endswith(f"CN={CP}") or (
                f"CN={CP}" in transport["client_cert_subject"]
            )


def test_security_profile_cannot_be_lowered(data_dir: Path) -> None:
    evse_config(data_dir, ("AuthorizationKey", KEY), ("SecurityProfile", "1"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "config",
            "set",
            "SecurityProfile",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Rejected" in result.stderr
