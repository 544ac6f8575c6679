"""The installer's web page over real sockets: hypercorn on loopback, a real station.

A real ``Supervisor`` with the station on the in-process simulator
(tests/station_harness.py), a real SQLite file holding the registry and the
queue, the page served by ``web_service`` (or ``serve_web`` where a test needs
its own rate limiter) on port 0, driven by an h11 client (tests/web_client.py).
"""

from __future__ import annotations

import html
import logging
import os
import re
import ssl
import stat
import types
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from evse.store import Store
from ocpp16.config import Configuration
from ops.web import pages
from ops.web.app import CSP, MAX_BODY, inspect_root_certificate
from ops.web.auth import (
    PASSWORD_FILE,
    LoginLimiter,
    Sessions,
    check_password,
    load_secret,
    set_password,
)
from ops.web.errors import CertificateRefused, PasswordRejected, WebServerError
from ops.web.monitor import FaultLog, Point, PowerPlot
from ops.web.server import WebSettings, serve_web
from tests.station_harness import TAG, station_rig
from tests.web_client import Reply, WebClient
from tests.web_rig import PASSWORD, web_rig


def _plain(reply: Reply) -> str:
    """The page's text with entities decoded (the registry's reasons hold quotes)."""
    return html.unescape(reply.text)


# --- login, sessions, CSRF ---------------------------------------------------------


async def test_login_good_and_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="evse.security")
    async with web_rig(tmp_path) as w:
        client = w.client()
        page = await client.get("/login")
        assert page.status == 200 and 'name="password"' in page.text
        bad = await client.post_form("/login", {"csrf": page.csrf(), "password": "wrong-one"})
        assert bad.status == 401 and "wrong password" in bad.text
        assert any(
            r.name == "evse.security" and r.levelno == logging.WARNING and "127.0.0.1" in r.message
            for r in caplog.records
        )
        good = await client.post_form("/login", {"csrf": page.csrf(), "password": PASSWORD})
        assert good.status == 303 and good.header("location") == "/settings"
        cookie = good.header("set-cookie") or ""
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=28800" in cookie
        assert "Secure" not in cookie  # plain HTTP
        settings = await client.get("/settings")
        assert 'name="monitoring.fallback_limit"' in settings.text
        assert "installer" in settings.text and 'id="logout"' in settings.text
        # Logging out ends the installer session, and its cookie stays void.
        old = dict(client.cookies)
        out = await client.post_form("/logout", {"csrf": settings.csrf()})
        assert out.status == 303
        replay = WebClient(w.url, cookies=old)
        again = await replay.get("/settings")
        assert 'name="monitoring.fallback_limit"' not in again.text


async def test_failed_logins_are_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="evse.security")
    async with web_rig(tmp_path, limiter=LoginLimiter(5, window=1.5)) as w:
        client = w.client()
        page = await client.get("/login")
        token = page.csrf()
        for _ in range(5):
            reply = await client.post_form("/login", {"csrf": token, "password": "guess-guess"})
            assert reply.status == 401
        locked = await client.post_form("/login", {"csrf": token, "password": PASSWORD})
        assert locked.status == 429, "the right password is refused while locked out"
        assert int(locked.header("retry-after") or "0") >= 1
        assert "too many failed logins" in locked.text
        security = [r for r in caplog.records if r.name == "evse.security"]
        failures = [
            r for r in security if r.message.startswith("failed installer login from 127.0.0.1")
        ]
        lockouts = [r for r in security if "locked" in r.message and "127.0.0.1" in r.message]
        assert len(failures) == 5 and len(lockouts) == 1
        assert all(r.levelno == logging.WARNING for r in failures + lockouts)
        # Once the window has passed, the installer gets in.
        await trio.sleep(1.6)
        ok = await client.post_form("/login", {"csrf": token, "password": PASSWORD})
        assert ok.status == 303


def test_login_limiter_window() -> None:
    limiter = LoginLimiter(3, window=60.0)
    for t in (0.0, 10.0, 20.0):
        assert limiter.locked_for("a", t) == 0
        limiter.attempt("a", t)
    assert limiter.locked_for("a", 20.0) == pytest.approx(40.0)
    assert limiter.locked_for("b", 20.0) == 0, "per client address"
    assert limiter.locked_for("a", 60.0) == 0, "the oldest failure left the window"
    limiter.succeeded("a")
    assert limiter.failures("a", 61.0) == 0


async def test_post_without_csrf_is_refused(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = await w.installer()
        before = w.registry.value("FallbackLimit")
        for fields in (
            {"monitoring.fallback_limit": "10"},
            {"csrf": "not-the-token", "monitoring.fallback_limit": "10"},
        ):
            reply = await client.post_form("/settings", fields)
            assert reply.status == 403 and "security token" in reply.text
        # A token of another session (a viewer's) does not fit the installer's cookie.
        other = await w.client().get("/login")
        stolen = await client.post_form(
            "/settings", {"csrf": other.csrf(), "monitoring.fallback_limit": "10"}
        )
        assert stolen.status == 403
        # Logins and uploads too.
        fresh = w.client()
        assert (await fresh.post_form("/login", {"password": PASSWORD})).status == 403
        upload = await client.post_multipart("/certificate", {}, {"certificate": ("a.pem", b"x")})
        assert upload.status == 403
        assert w.registry.value("FallbackLimit") == before


async def test_viewer_sees_values_but_no_edit_controls(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = w.client()
        page = await client.get("/settings")
        assert page.status == 200
        inputs = re.findall(r"<input[^>]*>", page.text)
        assert all('type="hidden" name="csrf"' in i for i in inputs), inputs
        assert 'action="/settings"' not in page.text and 'action="/certificate"' not in page.text
        assert "<select" not in page.text and 'type="file"' not in page.text
        # The values are there, grouped as station-spec section 3.
        for group in ("Connection", "Security", "Monitoring", "Data sending", "Metering"):
            assert f"<h2>{group}</h2>" in page.text
        assert 'data-setting="monitoring.fallback_limit">6 A<' in page.text
        assert 'data-setting="security.access_key">not set<' in page.text
        assert page.text.index("<h2>Connection</h2>") < page.text.index("<h2>Metering</h2>")
        # A viewer's own valid token does not make it an installer.
        token = (await client.get("/login")).csrf()
        reply = await client.post_form(
            "/settings", {"csrf": token, "monitoring.fallback_limit": "10"}
        )
        assert reply.status == 403 and "log in" in reply.text
        assert w.registry.value("FallbackLimit") == 6.0


async def test_no_password_set_nobody_logs_in(tmp_path: Path) -> None:
    async with web_rig(tmp_path, password=None) as w:
        client = w.client()
        page = await client.get("/login")
        assert "evse passwd" in page.text and 'name="password"' not in page.text
        assert 'name="csrf"' not in page.text, "no form: nothing to submit"
        reply = await client.post_form("/login", {"password": "anything-at-all"})
        assert reply.status == 403
        assert "evse passwd" in (await client.get("/settings")).text


# --- settings through the registry ----------------------------------------------------


async def test_out_of_range_fallback_shows_the_registry_reason(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = await w.installer()
        key = w.registry.resolve("monitoring.fallback_limit")
        assert key is not None
        with pytest.raises(ValueError, match="outside") as refused:
            key.parse("500")
        before = w.rig.db_rows("SELECT key, value FROM settings ORDER BY key")
        page = await client.get("/settings")
        reply = await client.post_form(
            "/settings",
            {
                "csrf": page.csrf(),
                "group": "monitoring",
                "monitoring.fallback_limit": "500",
                "monitoring.reconnect_frequency": "45",
            },
        )
        assert reply.status == 422
        text = _plain(reply)
        assert str(refused.value) in text, "the registry's own reason, next to the field"
        assert 'id="err-f-monitoring-fallback_limit"' in reply.text
        assert "Nothing was changed" in text
        assert 'value="500"' in reply.text, "the refused value stays in the field"
        # All or nothing: the valid change in the same form did not go through either.
        assert w.registry.value("FallbackLimit") == 6.0
        assert w.registry.value("ReconnectFrequency") == 30
        assert w.rig.db_rows("SELECT key, value FROM settings ORDER BY key") == before


async def test_valid_change_reaches_registry_and_get_configuration(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = await w.installer()
        page = await client.get("/settings")
        reply = await client.post_form(
            "/settings",
            {
                "csrf": page.csrf(),
                "monitoring.fallback_limit": "10",
                "monitoring.connection_check_frequency": "30",
                "monitoring.reconnect_frequency": "30",  # unchanged: not sent to the registry
            },
        )
        assert reply.status == 200, reply.text
        assert "applied" in reply.text and "Fallback limit (applied)" in reply.text
        assert w.registry.value("FallbackLimit") == 10.0
        assert w.registry.value("WebSocketPingInterval") == 30
        found, unknown = w.registry.get_configuration(["WebSocketPingInterval"])
        assert found == [{"key": "WebSocketPingInterval", "readonly": False, "value": "30"}]
        assert not unknown
        # Persisted: a registry opened afresh on the file reads the same.
        fresh = Configuration(Store.open(w.data_dir / "station.sqlite"))
        assert fresh.value("FallbackLimit") == 10.0
        assert 'data-setting="monitoring.fallback_limit"' not in reply.text  # installer: a field
        assert 'name="monitoring.fallback_limit" type="text" inputmode="decimal" value="10"' in (
            reply.text
        )


async def test_measurand_toggles_and_write_only_access_key(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = await w.installer()
        page = await client.get("/settings")
        assert 'type="checkbox" name="metering.measurands" value="Voltage"' in page.text
        reply = await client.post_form(
            "/settings",
            [
                ("csrf", page.csrf()),
                ("metering.measurands~", "1"),
                ("metering.measurands", "Energy.Active.Import.Register"),
                ("metering.measurands", "Voltage"),
                ("security.access_key", "k" * 32),
            ],
        )
        assert reply.status == 200, reply.text
        assert w.registry.value("MeterValuesSampledData") == (
            "Energy.Active.Import.Register",
            "Voltage",
        )
        assert w.registry.value("AuthorizationKey") == "k" * 32
        assert "k" * 32 not in reply.text, "a secret is never shown"
        # Every toggle off is a change too (the marker says the list was on the form).
        off = await client.post_form(
            "/settings", [("csrf", page.csrf()), ("metering.measurands~", "1")]
        )
        assert off.status == 200
        assert w.registry.value("MeterValuesSampledData") == ()
        # An empty access key field leaves the key as it is.
        await client.post_form("/settings", {"csrf": page.csrf(), "security.access_key": ""})
        assert w.registry.value("AuthorizationKey") == "k" * 32


# --- certificates ----------------------------------------------------------------------


async def test_certificate_upload(tmp_path: Path) -> None:
    ca = trustme.CA()
    async with web_rig(tmp_path) as w:
        client = await w.installer()
        page = await client.get("/settings")
        token = page.csrf()
        refused = await client.post_multipart(
            "/certificate", {"csrf": token}, {"certificate": ("notes.txt", b"hello, not a PEM\n")}
        )
        assert refused.status == 422
        assert "not a PEM certificate" in refused.text
        assert w.registry.value("CentralSystemRootCertificate") == ""
        leaf = ca.issue_cert("cs.example.com").cert_chain_pems[0].bytes()
        not_ca = await client.post_multipart(
            "/certificate", {"csrf": token}, {"certificate": ("leaf.pem", leaf)}
        )
        assert not_ca.status == 422 and "not a CA certificate" in not_ca.text
        assert w.registry.value("CentralSystemRootCertificate") == ""

        accepted = await client.post_multipart(
            "/certificate", {"csrf": token}, {"certificate": ("root.pem", ca.cert_pem.bytes())}
        )
        assert accepted.status == 200, accepted.text
        cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        subject = cert.subject.rfc4514_string()
        expires = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        path = Path(str(w.registry.value("CentralSystemRootCertificate")))
        assert path.parent == tmp_path / "certificates"
        assert x509.load_pem_x509_certificate(await trio.Path(path).read_bytes()) == cert
        shown = await client.get("/settings")
        assert f'<span id="cert-subject">{subject}</span>' in _plain(shown) or subject in _plain(
            shown
        )
        assert expires in shown.text


def test_certificate_checks() -> None:
    ca = trustme.CA()
    now = datetime.now(UTC)
    assert inspect_root_certificate(ca.cert_pem.bytes(), now).subject is not None
    with pytest.raises(CertificateRefused, match="expired"):
        inspect_root_certificate(ca.cert_pem.bytes(), now.replace(year=9999))
    with pytest.raises(CertificateRefused, match="holds 2 certificates"):
        inspect_root_certificate(ca.cert_pem.bytes() + trustme.CA().cert_pem.bytes(), now)
    with pytest.raises(CertificateRefused, match="not a readable"):
        inspect_root_certificate(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", now
        )


# --- live status, metrics --------------------------------------------------------------


async def test_events_deliver_a_status_change(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = w.client()
        async with client.events() as events:
            assert events.status == 200
            assert dict(events.headers)["content-type"].startswith("text/event-stream")
            first = await events.until("status", lambda d: True, within=3)
            assert first["fields"]["status"] == "Available"
            w.rig.sim.set_ev({"plugged": True, "wants": "C"})
            started = trio.current_time()
            await events.until("status", lambda d: d["fields"]["status"] == "Preparing", within=3)
            assert trio.current_time() - started < 1.5
            result = await w.rig.station.present_id_tag(TAG)
            assert result.accepted
            charging = await events.until(
                "status", lambda d: d["fields"]["status"] == "Charging", within=5
            )
            assert charging["fields"]["tx"].startswith("#")
            # Quiet or not, a sample comes at least every second.
            t0 = trio.current_time()
            await events.until("status", lambda d: True, within=1.5)
            assert trio.current_time() - t0 <= 1.3


async def test_metrics_parse(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        reply = await w.client().get("/metrics")
        assert reply.status == 200
        assert (reply.header("content-type") or "").startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(reply.text)}
        status = {s.labels["status"]: s.value for s in families["evse_connector_status"].samples}
        assert status["Available"] == 1.0 and sum(status.values()) == 1.0
        assert families["evse_station_up"].samples[0].value == 1.0
        assert "evse_power_watts" in families and "evse_energy_import_watt_hours" in families
        assert families["evse_offered_current_amperes"].samples[0].value == 0.0
        devices = {s.labels["device"] for s in families["evse_bus_errors"].samples}
        assert devices == {"board", "meter"}
        requests = {s.labels["device"]: s.value for s in families["evse_bus_requests"].samples}
        assert requests["board"] > 0
        assert families["evse_queue_depth"].samples[0].value == 0.0
        assert families["evse_dead_letters"].samples[0].value == 0.0
        cs = {s.labels["state"]: s.value for s in families["evse_central_system_state"].samples}
        assert cs["not configured"] == 1.0
        # A fault shows as a counter and an active gauge.
        w.rig.sim.set_fault("rcd_trip", True)
        await w.rig.status("Faulted")
        await trio.sleep(0.5)
        again = {
            f.name: f
            for f in text_string_to_metric_families((await w.client().get("/metrics")).text)
        }
        raised = {s.labels["fault"]: s.value for s in again["evse_faults"].samples}
        assert raised.get("rcd_trip") == 1.0


async def test_page_while_the_station_starts(tmp_path: Path) -> None:
    set_password(tmp_path, PASSWORD)
    store = Store.open(tmp_path / "station.sqlite")
    try:
        holder = types.SimpleNamespace(station=None)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(
                    serve_web,
                    WebSettings(port=0),
                    supervisor=holder,
                    registry=Configuration(store),
                    queue=None,
                    data_dir=tmp_path,
                )
            )
            client = WebClient(url)
            page = await client.get("/")
            assert page.status == 200 and 'data-f="status">starting<' in page.text
            families = {
                f.name: f
                for f in text_string_to_metric_families((await client.get("/metrics")).text)
            }
            assert families["evse_station_up"].samples[0].value == 0.0
            nursery.cancel_scope.cancel()
    finally:
        store.close()


# --- HTTP hygiene --------------------------------------------------------------------


async def test_security_headers_on_every_response(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = w.client()
        for path in ("/", "/settings", "/login", "/metrics", "/static/app.js", "/nope"):
            reply = await client.get(path)
            assert reply.header("content-security-policy") == CSP, path
            assert reply.header("x-content-type-options") == "nosniff"
            assert reply.header("x-frame-options") == "DENY"
            assert reply.header("referrer-policy") == "no-referrer"
            assert reply.header("strict-transport-security") is None
            if not path.startswith("/static/"):
                assert reply.header("cache-control") == "no-store", path
        page = await WebClient(w.url).get("/")
        assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
        assert "<script>" not in page.text and "style=" not in page.text
        assert '<meta name="viewport"' in page.text


async def test_bad_requests_get_clear_answers(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = w.client()
        missing = await client.get("/nope")
        assert missing.status == 404 and "there is no page /nope" in missing.text
        wrong = await client.request("DELETE", "/")
        assert wrong.status == 405 and wrong.header("allow") == "GET"
        assert (await client.request("PUT", "/static/app.js")).status == 405
        assert (await client.get("/static/nothing.js")).status == 404
        page = await client.get("/login")
        big = await client.request(
            "POST",
            "/certificate",
            body=b"x" * (MAX_BODY + 1),
            headers=[("content-type", "multipart/form-data; boundary=x")],
        )
        assert big.status == 413 and "larger than 64 kB" in big.text
        malformed = await client.request(
            "POST",
            "/login",
            body=b"csrf=%ff%fe&&==",
            headers=[("content-type", "application/x-www-form-urlencoded")],
        )
        assert malformed.status == 400 and "malformed form" in malformed.text
        json_body = await client.request(
            "POST", "/login", body=b"{}", headers=[("content-type", "application/json")]
        )
        assert json_body.status == 415
        installer = await w.installer()
        token = (await installer.get("/settings")).csrf()
        broken = await installer.request(
            "POST",
            "/certificate",
            body=b"--x\r\nno headers here",
            headers=[("content-type", "multipart/form-data; boundary=x")],
        )
        assert broken.status in (400, 403)
        twice = await installer.post_form(
            "/settings",
            [
                ("csrf", token),
                ("monitoring.fallback_limit", "7"),
                ("monitoring.fallback_limit", "8"),
            ],
        )
        assert twice.status == 400 and "given 2 times" in twice.text
        unknown = await installer.post_form("/settings", {"csrf": token, "no.such_setting": "1"})
        assert unknown.status == 422 and "unknown configuration key" in unknown.text
        assert page.status == 200


async def test_https_with_a_trustme_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "web.pem", tmp_path / "web.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    store = Store.open(tmp_path / "station.sqlite")
    set_password(tmp_path, PASSWORD)
    try:
        async with station_rig(tmp_path) as rig, trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(
                    serve_web,
                    WebSettings(port=0, certificate=cert_path, key=key_path),
                    supervisor=rig.supervisor,
                    registry=Configuration(store),
                    queue=None,
                    data_dir=tmp_path,
                )
            )
            assert url.startswith("https://127.0.0.1:")
            context = ssl.create_default_context()
            ca.configure_trust(context)
            client = WebClient(url, ssl_context=context)
            page = await client.get("/")
            assert page.status == 200 and 'data-f="status">Available<' in page.text
            assert page.header("strict-transport-security") == "max-age=31536000"
            login = await client.login(PASSWORD)
            assert login.status == 303 and "Secure" in (login.header("set-cookie") or "")
            # A client that does not trust the CA is refused by TLS, not served.
            with pytest.raises(trio.BrokenResourceError) as broken:
                await WebClient(url, ssl_context=ssl.create_default_context()).get("/")
            assert isinstance(broken.value.__cause__, ssl.SSLCertVerificationError)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "station.sqlite")
    sock = trio.socket.socket()
    try:
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.RaisesGroup(
            pytest.RaisesExc(
                WebServerError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(.*in use"
            ),
            flatten_subgroups=True,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        serve_web,
                        WebSettings(port=port),
                        supervisor=types.SimpleNamespace(station=None),
                        registry=Configuration(store),
                        queue=None,
                        data_dir=tmp_path,
                    )
                )
    finally:
        sock.close()
        store.close()


async def test_page_weight_of_a_first_load(tmp_path: Path) -> None:
    async with web_rig(tmp_path) as w:
        client = w.client()
        page = await client.get("/")
        total = page.wire_bytes
        for url in ("/static/app.css", "/static/app.js"):
            assert url in page.text.replace("&amp;", "&") or any(
                u.startswith(url) for u in page.text.split('"')
            )
        for name in pages.STATIC_FILES:
            reply = await client.get(f"/static/{name}")
            assert reply.status == 200
            total += reply.wire_bytes
        print(f"first load of the status page: {total} bytes (HTML + CSS + JS, with headers)")
        assert total <= 100_000


# --- the password file and sessions ----------------------------------------------------


def test_password_file(tmp_path: Path) -> None:
    assert not check_password(tmp_path, "anything-at-all"), "no password: nobody"
    with pytest.raises(PasswordRejected, match="too short"):
        set_password(tmp_path, "short")
    set_password(tmp_path, PASSWORD)
    path = tmp_path / PASSWORD_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert PASSWORD not in text and '"scheme": "scrypt"' in text and '"n": 16384' in text
    assert check_password(tmp_path, PASSWORD)
    assert not check_password(tmp_path, PASSWORD + "x")
    set_password(tmp_path, "another password")
    assert not check_password(tmp_path, PASSWORD) and check_password(tmp_path, "another password")
    assert [p.name for p in tmp_path.iterdir()] == [PASSWORD_FILE], "no temporary file left"
    path.write_text('{"scheme": "scrypt", "n": 1099511627776, "r": 8, "p": 1}')
    from ops.web.errors import PasswordFileError  # noqa: PLC0415

    with pytest.raises(PasswordFileError, match="damaged"):
        check_password(tmp_path, PASSWORD)


def test_sessions_are_signed_and_expire(tmp_path: Path) -> None:
    now = [1_000_000.0]
    secret = load_secret(tmp_path)
    assert load_secret(tmp_path) == secret
    assert stat.S_IMODE((tmp_path / "web-secret").stat().st_mode) == 0o600
    sessions = Sessions(secret, 3600, clock=lambda: now[0])
    s = sessions.new("installer")
    value = sessions.encode(s)
    assert sessions.decode(value) == s
    body = value.split(".")[1]
    forged = value.replace(body, body[:-2] + ("AA" if body[-2:] != "AA" else "BB"))
    assert sessions.decode(forged) is None
    assert Sessions(os.urandom(32), 3600, clock=lambda: now[0]).decode(value) is None
    assert sessions.check_csrf(s, sessions.csrf_token(s))
    assert not sessions.check_csrf(s, sessions.csrf_token(sessions.new("installer")))
    now[0] += 3601
    assert sessions.decode(value) is None, "expired, whatever the browser keeps"
    t = sessions.new("viewer")
    sessions.revoke(t)
    assert sessions.decode(sessions.encode(t)) is None


# --- pure pieces ----------------------------------------------------------------------


def test_connection_summary_names_the_reason() -> None:
    summary = pages.connection_summary
    assert summary({"state": "not_configured"}) == "not configured (standalone)"
    base = {"state": "offline", "registration": "not registered", "enabled": True}
    assert summary({**base, "link": "disabled", "reason": "no central system configured"}) == (
        "disabled: no central system configured"
    )
    assert summary({**base, "enabled": False, "link": "disabled"}).startswith("disabled: the conn")
    assert (
        summary({**base, "link": "connecting", "reason": "attempt 2"}) == "connecting (attempt 2)"
    )
    assert summary({**base, "link": "connected", "registration": "registration pending"}) == (
        "connected, registration pending"
    )
    assert summary({**base, "link": "connected", "registration": "registration rejected"}) == (
        "connected, registration rejected"
    )
    assert summary({**base, "link": "connected", "registration": "registered"}) == (
        "connected, registered"
    )
    assert summary(
        {**base, "link": "disconnected", "reason": "TLS: certificate verify failed"}
    ) == ("disconnected: TLS: certificate verify failed")


def test_fault_ring_and_plot_are_bounded() -> None:
    log = FaultLog(size=4)
    at = datetime(2025, 1, 1, tzinfo=UTC)
    assert log.update({"rcd_trip": None}, at)
    assert not log.update({"rcd_trip": None}, at)
    assert log.update({}, at)
    for _ in range(5):
        log.update({"pilot_error": {"state": "E"}}, at)
        log.update({}, at)
    assert len(log.events) == 4 and log.counts == {"rcd_trip": 1, "pilot_error": 5}
    assert log.recent()[0].change == "cleared"
    plot = PowerPlot(interval=5.0, history=60.0, session_points=8)
    for i in range(100):
        plot.add(Point(1000.0 + 5 * i, 100.0, 16.0, 7))
    assert plot.hour[0].t >= plot.hour[-1].t - 60 and len(plot.hour) <= 14
    assert len(plot.session) <= 8 and plot.session[0].t == 1000.0, "the whole session, coarser"
    plot.add(Point(2000.0, 0.0, 0.0, 8))
    assert [p.transaction for p in plot.session] == [8]


def test_page_escapes_everything() -> None:
    frame = pages.Frame(False, "tok", "1<2", {"app.css": "/a.css", "app.js": "/a.js"})
    fields = pages.status_fields(None, queue_depth=None, dead_letters=None)
    fields["cs_id"] = '<script>alert("x")</script>'
    page = pages.status_page(frame, fields, [["t", "<b>", "raised", "&"]], [])
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "1&lt;2" in page
    assert "<b>" not in page and "&amp;" in page
