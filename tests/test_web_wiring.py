"""The installer's page as the station runs it: the [web] section of the config
file, ``evse run --sim`` naming the page's URL in its ready line, ``evse passwd``,
and a login with that password on the page the running station serves."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from ops.config import ConfigError, config_from_dict
from tests.csms_peer import Csms, call_result, running_csms, wait_for
from tests.test_config import minimal, with_
from tests.web_client import WebClient


def evse(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        check=False,
    )


def test_web_defaults_to_localhost_on_8080_over_http() -> None:
    web = config_from_dict(minimal()).web
    assert (web.enabled, web.host, web.port, web.certificate, web.key) == (
        True,
        "127.0.0.1",
        8080,
        None,
        None,
    )


def test_a_web_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("station.local")
    pem = tmp_path / "web.pem"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    with pytest.raises(ConfigError, match=r"web\.key: web\.certificate and web\.key go together"):
        config_from_dict(with_(minimal(), web__certificate=str(pem)))


def test_a_web_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem, key = tmp_path / "web.pem", tmp_path / "web.key"
    ca.issue_cert("station.local").cert_chain_pems[0].write_to_path(str(pem))
    ca.issue_cert("other.local").private_key_pem.write_to_path(str(key))
    with pytest.raises(ConfigError, match=r"web\.key: "):
        config_from_dict(with_(minimal(), web__certificate=str(pem), web__key=str(key)))


def test_a_web_certificate_and_its_key_are_accepted(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("station.local")
    pem, key = tmp_path / "web.pem", tmp_path / "web.key"
    issued.cert_chain_pems[0].write_to_path(str(pem))
    issued.private_key_pem.write_to_path(str(key))
    web = config_from_dict(with_(minimal(), web__certificate=str(pem), web__key=str(key))).web
    assert (web.certificate, web.key) == (pem, key)


def test_passwd_sets_a_hash_only_its_owner_reads(tmp_path: Path) -> None:
    from ops.web.auth import check_password  # noqa: PLC0415

    done = evse("passwd", "--data-dir", str(tmp_path), "--password-stdin", stdin="s3cret-pass\n")
    assert done.returncode == 0, done.stderr
    file = tmp_path / "web-password"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert "s3cret-pass" not in file.read_text()
    assert check_password(tmp_path, "s3cret-pass")
    assert not check_password(tmp_path, "s3cret-pas")


def test_passwd_refuses_a_short_password_in_one_line_and_changes_nothing(tmp_path: Path) -> None:
    done = evse("passwd", "--data-dir", str(tmp_path), "--password-stdin", stdin="short\n")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "at least 8 characters" in done.stderr
    assert not (tmp_path / "web-password").exists()


def test_passwd_of_a_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    done = evse("passwd", "--data-dir", str(tmp_path / "nope"), "--password-stdin", stdin="x" * 9)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("no such directory")


async def _login_status(url: str, password: str) -> int:
    return (await WebClient(url).login(password)).status


async def _change_on_page(url: str, password: str, name: str, value: str) -> bool:
    """Log in, change one setting on the settings page; True if it was applied."""
    client = WebClient(url)
    assert (await client.login(password)).status == 303
    page = await client.get("/settings")
    reply = await client.post_form("/settings", {"csrf": page.csrf(), name: value})
    return reply.status == 200


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read().decode(), {k.lower(): v for k, v in reply.headers.items()}


@pytest.mark.slow
def test_run_sim_serves_the_page_and_names_it_in_the_ready_line(tmp_path: Path) -> None:
    done = evse("passwd", "--data-dir", str(tmp_path), "--password-stdin", stdin="installer-pw\n")
    assert done.returncode == 0, done.stderr
    with running_csms() as csms:
        _run_sim_with_page(tmp_path, csms)


def _run_sim_with_page(tmp_path: Path, csms: Csms) -> None:
    cp = "CP-WEB"
    argv = ["run", "--sim", "--data-dir", str(tmp_path), "--csms-url", csms.ws, "--id", cp]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error", "EVSE_LOCK_DIR": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1]
        ready: dict[str, Any] = json.loads(line)["ready"]
        url = ready["web"]
        assert url.startswith("http://127.0.0.1:")
        status, page, headers = _get(url + "/")
        assert status == 200 and "<html" in page.lower()
        assert "default-src 'self'" in headers["content-security-policy"]
        status, metrics, _ = _get(url + "/metrics")
        assert status == 200 and "evse_" in metrics
        # The password `evse passwd` set opens the installer's session on this page.
        assert trio.run(_login_status, url, "installer-pw") == 303
        assert trio.run(_login_status, url, "wrong-password") == 401
        # A change on the page is the station's: evse config (through the control
        # socket) reads it back, and the station's status shows the same page value.
        assert trio.run(_change_on_page, url, "installer-pw", "monitoring.fallback_limit", "10")
        socket = ready["control_socket"]
        got = evse("config", "get", "monitoring.fallback_limit", "--socket", socket)
        assert got.returncode == 0 and got.stdout.strip() == "10", got
        status = json.loads(evse("status", "--json", "--socket", socket).stdout)
        assert status["status"] == "Available"
        # The central system reads the same value (GetConfiguration, a vendor key).
        wait_for(csms, cp, "BootNotification", within=30)
        found = call_result(csms, cp, "GetConfiguration", {"key": ["FallbackLimit"]})
        assert found["configurationKey"] == [
            {"key": "FallbackLimit", "readonly": False, "value": "10"}
        ]
        # Refused on the page: nothing changes anywhere.
        assert not trio.run(_change_on_page, url, "installer-pw", "monitoring.fallback_limit", "99")
        got = evse("config", "get", "monitoring.fallback_limit", "--socket", socket)
        assert got.stdout.strip() == "10"
        # Changed by the central system, by the same rule: the page shows it.
        changed = call_result(
            csms, cp, "ChangeConfiguration", {"key": "FallbackLimit", "value": "12"}
        )
        assert changed == {"status": "Accepted"}
        refused = call_result(
            csms, cp, "ChangeConfiguration", {"key": "FallbackLimit", "value": "99"}
        )
        assert refused == {"status": "Rejected"}
        _, settings_page, _ = _get(url + "/settings")
        assert 'data-setting="monitoring.fallback_limit">12 A<' in settings_page
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
