"""The installer's page: an ASGI application written by hand (no framework).

Routes (every response carries the security headers, ``security_headers``):

==========  ==================  =====================================================
method      path                what
==========  ==================  =====================================================
GET         /                   status page (live through /events)
GET         /settings           settings, grouped as station-spec section 3
POST        /settings           change settings (installer; all or nothing, registry)
POST        /certificate        upload the central-system root certificate (installer)
GET/POST    /login              installer login (rate-limited per client address)
POST        /logout             end the installer session
GET         /events             server-sent events: status, faults, plot, transactions
GET         /metrics            Prometheus text (no login)
GET         /static/<file>      the page's one script and one style sheet
==========  ==================  =====================================================

Who may change what: every visitor is a viewer (values, no edit controls);
the installer, logged in, gets controls for writable settings. Every POST
carries the session's CSRF token (403 otherwise). Validation is the
registry's alone (``Configuration.change_many_async``): the page shows its
reason next to the field and nothing changes.

Bad input never crashes the app: unknown path 404, wrong method 405, a body
over ``MAX_BODY`` 413, a malformed form 400, an unexpected failure 500 with
a line in the log; the client gets a short page, never a traceback.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import importlib.resources
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qs

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from ocpp16.config import ChangeResult, Configuration, Key, Kind
from ocpp16.metering import SUPPORTED_MEASURANDS
from ops.web import pages
from ops.web.auth import (
    LoginLimiter,
    Session,
    Sessions,
    check_password,
    password_is_set,
    security_log,
    write_atomic,
)
from ops.web.errors import CertificateRefused, HTTPError, PasswordFileError, WebError
from ops.web.metrics import metrics_registry, render
from ops.web.monitor import WebState

if TYPE_CHECKING:
    # cryptography costs about 8 MB of memory: imported only when a certificate
    # is shown or uploaded (the settings page), never by a station that is just
    # serving its status.
    from cryptography import x509

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The largest request body taken (a certificate upload is a few kB).
MAX_BODY: Final = 64 * 1024
#: Event-stream clients served at once; more are answered 503.
MAX_STREAMS: Final = 16
#: The event stream sends the status at least this often (s), changed or not.
STREAM_HEARTBEAT: Final = 1.0
#: scrypt checks at once: a burst of logins must not take both cores from the station.
PASSWORD_CHECKS: Final = 1

COOKIE: Final = "evse_session"
#: The registry key the certificate upload sets (station-spec 3, "certificate").
CERTIFICATE_KEY: Final = "CentralSystemRootCertificate"
CERTIFICATE_DIR: Final = "certificates"

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)


def security_headers(*, secure: bool, cache: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cache-control", b"public, max-age=86400" if cache else b"no-store"),
    ]
    if secure:
        headers.append((b"strict-transport-security", b"max-age=31536000"))
    return headers


class ClientGone(WebError):
    """The client closed the connection before its request was read."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    client: str
    secure: bool
    session: Session
    #: The session was made for this request (the response sets its cookie).
    new_session: bool
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    cache: bool = False


Handler = Callable[[Request], Awaitable[Response]]


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, content type, short hash for the URL)."""
    types = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8"}
    found = {}
    root = importlib.resources.files("ops.web") / "static"
    for name in pages.STATIC_FILES:
        data = (root / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:10]
        found[name] = (data, types[name.rpartition(".")[2]], digest)
    return found


def registry_keys(registry: Configuration) -> tuple[Key, ...]:
    """The registry's keys (a property today; a method in the reworked model)."""
    keys: Any = cast(Any, registry).keys
    return tuple(keys() if callable(keys) else keys)


# --- certificates --------------------------------------------------------------------


def inspect_root_certificate(data: bytes, now: datetime) -> x509.Certificate:
    """The one CA certificate in PEM ``data``, valid now; ``CertificateRefused`` otherwise."""
    from cryptography import x509  # noqa: PLC0415

    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateRefused("not a PEM certificate (no BEGIN CERTIFICATE block)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateRefused(f"not a readable PEM certificate ({exc})") from None
    if len(certs) != 1:
        # CertificateStoreMaxLength is 1: one root certificate.
        raise CertificateRefused(f"the file holds {len(certs)} certificates; one root expected")
    cert = certs[0]
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CertificateRefused(
            "not a CA certificate (no basic constraints): upload the central system's root"
        ) from None
    if not constraints.ca:
        raise CertificateRefused(
            "not a CA certificate (basic constraints CA:FALSE): upload the central system's root"
        )
    if cert.not_valid_after_utc <= now:
        raise CertificateRefused(f"expired on {_when(cert.not_valid_after_utc)}")
    if cert.not_valid_before_utc > now:
        raise CertificateRefused(f"not valid before {_when(cert.not_valid_before_utc)}")
    return cert


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe_certificate(path: str) -> pages.CertificateInfo:
    """Subject and expiry of the certificate file ``path`` (blocking: a file read)."""
    if not path:
        return pages.CertificateInfo("")
    from cryptography import x509  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        return pages.CertificateInfo(path, problem=f"cannot read: {exc.strerror or exc}")
    except ValueError as exc:
        return pages.CertificateInfo(path, problem=f"not a readable PEM certificate ({exc})")
    return pages.CertificateInfo(
        path, subject=cert.subject.rfc4514_string(), expires=_when(cert.not_valid_after_utc)
    )


def save_certificate(data_dir: Path, cert: x509.Certificate) -> Path:
    """Write ``cert`` (re-encoded: nothing but the certificate) under the data dir.

    The name holds the certificate's hash, so a new certificate is a new path:
    the registry sees a change and the OCPP session reconnects with it.
    """
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    pem = cert.public_bytes(serialization.Encoding.PEM)
    directory = data_dir / CERTIFICATE_DIR
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / f"central-system-root-{hashlib.sha256(pem).hexdigest()[:16]}.pem"
    write_atomic(path, pem, mode=0o644)
    return path


# --- forms -----------------------------------------------------------------------------


def parse_form(req: Request) -> dict[str, list[str]]:
    ctype = req.headers.get("content-type", "").partition(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise HTTPError(415, f"expected a form (application/x-www-form-urlencoded), not {ctype!r}")
    try:
        text = req.body.decode("utf-8")
        return parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "malformed form data") from None


def parse_multipart(req: Request) -> dict[str, list[bytes]]:
    ctype = req.headers.get("content-type", "")
    if ctype.partition(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPError(415, "expected a file upload (multipart/form-data)")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + req.body
        )
    except (UnicodeEncodeError, ValueError):
        raise HTTPError(400, "malformed upload") from None
    if not message.is_multipart() or message.defects:
        raise HTTPError(400, "malformed upload (not a complete multipart form)")
    fields: dict[str, list[bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            raise HTTPError(400, "malformed upload (a part without a name)")
        fields.setdefault(name, []).append(payload)
    return fields


def _one(form: Mapping[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HTTPError(400, f"field {name!r} given {len(values)} times")
    return values[0]


# --- the application ------------------------------------------------------------------


class WebApp:
    """The ASGI application. ``state`` is shared with the sampler (ops/web/server.py)."""

    def __init__(
        self,
        state: WebState,
        *,
        registry: Configuration,
        data_dir: Path,
        sessions: Sessions,
        secure: bool = False,
        limiter: LoginLimiter | None = None,
    ) -> None:
        self.state = state
        self.registry = registry
        self.data_dir = Path(data_dir)
        self.sessions = sessions
        self.secure = secure
        self.limiter = limiter or LoginLimiter()
        self.static = _load_static()
        self.static_urls = {n: f"/static/{n}?v={h}" for n, (_, _, h) in self.static.items()}
        self.metrics = metrics_registry(state)
        self._checks = trio.CapacityLimiter(PASSWORD_CHECKS)
        self._streams = 0
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.status},
            "/settings": {"GET": self.settings, "POST": self.change_settings},
            "/certificate": {"POST": self.upload_certificate},
            "/login": {"GET": self.login_form, "POST": self.login},
            "/logout": {"POST": self.logout},
            "/metrics": {"GET": self.metrics_text},
            "/events": {"GET": self._not_streamed},
        }

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        req = self._request(scope)
        head = req.method == "HEAD"
        try:
            if req.path == "/events" and req.method in ("GET", "HEAD"):
                await self.events(req, receive, send)
                return
            handler = self._route(req)
            if req.method == "POST":
                req.body = await self._read_body(req, receive)
            response = await handler(req)
        except ClientGone:
            return
        except HTTPError as exc:
            response = await self._error(req, exc.status, exc.message, list(exc.headers))
        except Exception:
            log.exception("web page: %s %s failed", req.method, req.path)
            response = await self._error(req, 500, "internal error; the station's log says more")
        await self._send(req, send, response, head=head)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.state.closing.set()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _request(self, scope: Scope) -> Request:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            # RFC 9110 5.3: repeated fields join with commas; cookies with "; ".
            sep = "; " if name == "cookie" else ", "
            headers[name] = f"{headers[name]}{sep}{value}" if name in headers else value
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        session = None
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                session = self.sessions.decode(value)
                if session is not None:
                    break
        raw_query = scope.get("query_string", b"").decode("latin-1")
        try:
            query = parse_qs(raw_query, keep_blank_values=True, max_num_fields=20)
        except ValueError:
            query = {}
        return Request(
            method=str(scope.get("method", "GET")).upper(),
            path=str(scope.get("path", "/")),
            query=query,
            headers=headers,
            client=address,
            secure=scope.get("scheme") == "https",
            session=session or self.sessions.new("viewer"),
            new_session=session is None,
        )

    def _route(self, req: Request) -> Handler:
        if req.path.startswith("/static/"):
            if req.method not in ("GET", "HEAD"):
                raise HTTPError(
                    405, f"{req.method} is not allowed on {req.path}", headers=(("allow", "GET"),)
                )
            return self.static_file
        methods = self.routes.get(req.path)
        if methods is None:
            raise HTTPError(404, f"there is no page {req.path}")
        method = "GET" if req.method == "HEAD" else req.method
        handler = methods.get(method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            raise HTTPError(
                405,
                f"{req.method} is not allowed on {req.path} (allowed: {allowed})",
                headers=(("allow", allowed),),
            )
        return handler

    async def _read_body(self, req: Request, receive: Receive) -> bytes:
        declared = req.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise HTTPError(400, "malformed Content-Length")
            if int(declared) > MAX_BODY:
                raise HTTPError(413, f"the request is larger than {MAX_BODY // 1024} kB")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone("client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise HTTPError(413, f"the request is larger than {MAX_BODY // 1024} kB")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _cookie(self, session: Session) -> str:
        value = self.sessions.encode(session)
        attrs = f"Path=/; HttpOnly; SameSite=Strict; Max-Age={int(self.sessions.lifetime)}"
        return f"{COOKIE}={value}; {attrs}{'; Secure' if self.secure else ''}"

    async def _send(self, req: Request, send: Send, response: Response, *, head: bool) -> None:
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            *security_headers(secure=self.secure, cache=response.cache),
        ]
        names = {n.lower() for n, _ in response.headers}
        if (
            req.new_session
            and "set-cookie" not in names
            and response.content_type.startswith("text/html")
        ):
            headers.append((b"set-cookie", self._cookie(req.session).encode()))
        headers += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else response.body})

    async def _frame(self, req: Request, session: Session | None = None) -> pages.Frame:
        session = session or req.session
        return pages.Frame(
            installer=session.installer,
            csrf=self.sessions.csrf_token(session),
            version=self.state.version,
            static=self.static_urls,
            password_set=await trio.to_thread.run_sync(password_is_set, self.data_dir),
        )

    async def _error(
        self, req: Request, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        if req.path == "/metrics" or req.path.startswith("/static/"):
            body = (message + "\n").encode()
            return Response(status, body, "text/plain; charset=utf-8", headers or [])
        frame = await self._frame(req)
        return Response(
            status, pages.error_page(frame, status, message).encode(), headers=headers or []
        )

    def _need_csrf(self, req: Request, token: str | None) -> None:
        if req.new_session or not self.sessions.check_csrf(req.session, token):
            raise HTTPError(
                403,
                "the form's security token is missing or does not match this session; "
                "reload the page and try again",
            )

    def _need_installer(self, req: Request) -> None:
        if not req.session.installer:
            raise HTTPError(403, "only the installer may change settings: log in first")

    # -- pages -----------------------------------------------------------------------

    async def status(self, req: Request) -> Response:
        frame = await self._frame(req)
        state = self.state
        fields = state.fields or pages.status_fields(
            state.view(), queue_depth=state.queue_depth, dead_letters=state.dead_letters
        )
        body = pages.status_page(
            frame, fields, pages.fault_rows(state.faults.recent()), state.transactions
        )
        return Response(200, body.encode())

    async def static_file(self, req: Request) -> Response:
        name = req.path.removeprefix("/static/")
        found = self.static.get(name)
        if found is None:
            raise HTTPError(404, f"there is no file {req.path}")
        data, ctype, _ = found
        return Response(200, data, ctype, cache=True)

    async def metrics_text(self, req: Request) -> Response:
        return Response(200, render(self.metrics), CONTENT_TYPE_LATEST)

    async def _not_streamed(self, req: Request) -> Response:  # pragma: no cover - routed above
        raise HTTPError(405, "the event stream is GET only")

    # -- settings --------------------------------------------------------------------

    async def _settings_view(
        self,
        installer: bool,
        *,
        errors: Mapping[str, str] | None = None,
        notes: Mapping[str, str] | None = None,
        submitted: Mapping[str, str] | None = None,
        message: str = "",
        error: str = "",
    ) -> pages.SettingsView:
        errors, notes, submitted = errors or {}, notes or {}, submitted or {}
        rows = []
        for key in registry_keys(self.registry):
            if key.installer is None or key.group is None:
                continue
            cert = None
            if key.name == CERTIFICATE_KEY:
                cert = await trio.to_thread.run_sync(
                    describe_certificate, self.registry.get_str(key.name)
                )
            rows.append(
                pages.SettingRow(
                    name=key.installer,
                    group=key.group,
                    label=pages.label_of(key.installer),
                    ocpp=key.name if key.ocpp else None,
                    kind=key.kind.name,
                    value=self.registry.text(key.name),
                    unit=key.unit,
                    range_text=key.range_text,
                    description=key.description,
                    readonly=key.readonly,
                    secret=key.secret,
                    reboot_required=key.reboot_required,
                    editable=installer and not key.readonly,
                    choices=key.choices,
                    certificate=cert,
                    error=errors.get(key.installer, ""),
                    note=notes.get(key.installer, ""),
                    submitted=None if key.secret else submitted.get(key.installer),
                )
            )
        return pages.SettingsView(
            rows,
            message=message,
            error=error,
            live_status=self.state.fields.get("cs", "starting"),
            measurands=SUPPORTED_MEASURANDS,
        )

    async def settings(self, req: Request) -> Response:
        frame = await self._frame(req)
        view = await self._settings_view(req.session.installer)
        return Response(200, pages.settings_page(frame, view).encode())

    def _key_of(self, name: str) -> Key | None:
        return self.registry.resolve(name)

    async def change_settings(self, req: Request) -> Response:
        form = parse_form(req)
        self._need_csrf(req, _one(form, "csrf"))
        self._need_installer(req)
        given: dict[str, str] = {}
        for name in form:
            if name in ("csrf", "group"):
                continue
            if name.endswith("~"):
                # A toggle list: the checked values (none checked sends none).
                given[name[:-1]] = ",".join(form.get(name[:-1], []))
            elif name + "~" not in form:
                value = _one(form, name)
                given[name] = "" if value is None else value
        changes: dict[str, str] = {}
        for name, text in given.items():
            key = self._key_of(name)
            if key is not None:
                if key.secret and text == "":
                    continue  # write-only: empty means "leave it"
                if not key.secret and _same(key, text, self.registry.text(key.name)):
                    continue
            changes[name] = text
        frame = await self._frame(req)
        if not changes:
            view = await self._settings_view(True, message="nothing to change")
            return Response(200, pages.settings_page(frame, view).encode())
        result = await self.registry.change_many_async(changes, source="installer")
        shown = {self._local_name(n): t for n, t in changes.items()}
        if not result.ok:
            where = self._local_name(result.key)
            reason = result.reason or result.status
            view = await self._settings_view(
                True,
                errors={where: reason},
                submitted=shown,
                error=f"{pages.label_of(where)}: {reason}. Nothing was changed.",
            )
            return Response(422, pages.settings_page(frame, view).encode())
        notes, said = self._notes(changes, result)
        view = await self._settings_view(True, notes=notes, message="Saved: " + "; ".join(said))
        return Response(200, pages.settings_page(frame, view).encode())

    def _local_name(self, name: str) -> str:
        key = self._key_of(name)
        return key.installer if key is not None and key.installer is not None else name

    def _notes(
        self, changes: Mapping[str, str], result: ChangeResult
    ) -> tuple[dict[str, str], list[str]]:
        notes: dict[str, str] = {}
        said: list[str] = []
        for name in changes:
            key = self._key_of(name)
            restart = key is not None and key.reboot_required
            note = "applies after a restart" if restart else "applied"
            local = self._local_name(name)
            notes[local] = note
            said.append(f"{pages.label_of(local)} ({note})")
        if result.status == "RebootRequired" and not any("restart" in n for n in notes.values()):
            said.append("the station must restart for the change to apply")
        return notes, said

    async def upload_certificate(self, req: Request) -> Response:
        fields = parse_multipart(req)
        token = fields.get("csrf", [b""])[0].decode("ascii", "replace")
        self._need_csrf(req, token)
        self._need_installer(req)
        key = self._key_of(CERTIFICATE_KEY)
        if key is None or key.installer is None:
            raise HTTPError(404, "this firmware has no central system certificate setting")
        where = key.installer
        frame = await self._frame(req)
        files = fields.get("certificate") or []
        data = files[0] if files else b""

        async def refused(status: int, reason: str) -> Response:
            view = await self._settings_view(
                True, errors={where: reason}, error=f"Certificate refused: {reason}"
            )
            return Response(status, pages.settings_page(frame, view).encode())

        if not data:
            return await refused(400, "no file: choose the PEM file of the root certificate")
        try:
            cert = await trio.to_thread.run_sync(inspect_root_certificate, data, datetime.now(UTC))
        except CertificateRefused as exc:
            security_log.warning("certificate upload from %s refused: %s", req.client, exc)
            return await refused(422, str(exc))
        previous = self.registry.get_str(key.name)
        try:
            path = await trio.to_thread.run_sync(save_certificate, self.data_dir, cert)
        except OSError as exc:
            return await refused(500, f"cannot save the certificate: {exc.strerror or exc}")
        result = await self.registry.change_many_async({key.name: str(path)}, source="installer")
        if not result.ok:
            if str(path) != previous:
                await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
            return await refused(422, result.reason or result.status)
        if previous and previous != str(path) and Path(previous).parent == path.parent:
            # Ours, replaced: the registry no longer names it.
            await trio.to_thread.run_sync(lambda: Path(previous).unlink(missing_ok=True))
        security_log.warning(
            "central system root certificate replaced from %s: %s",
            req.client,
            cert.subject.rfc4514_string(),
        )
        note = "applies after a restart" if key.reboot_required else "applied"
        view = await self._settings_view(
            True,
            notes={where: f"installed ({note})"},
            message=f"Certificate installed: {cert.subject.rfc4514_string()}, expires "
            f"{_when(cert.not_valid_after_utc)} ({note})",
        )
        return Response(200, pages.settings_page(frame, view).encode())

    # -- login -------------------------------------------------------------------------

    async def login_form(self, req: Request) -> Response:
        frame = await self._frame(req)
        locked = self.limiter.locked_for(req.client, trio.current_time()) > 0
        error = "too many failed logins: try again later" if locked else ""
        return Response(200, pages.login_page(frame, error=error, locked=locked).encode())

    async def login(self, req: Request) -> Response:
        form = parse_form(req)
        self._need_csrf(req, _one(form, "csrf"))
        password = _one(form, "password") or ""
        now = trio.current_time()
        wait = self.limiter.locked_for(req.client, now)
        frame = await self._frame(req)
        if wait > 0:
            security_log.info("installer login from %s refused: locked out", req.client)
            body = pages.login_page(
                frame, error=f"too many failed logins: try again in {int(wait) + 1} s", locked=True
            )
            return Response(429, body.encode(), headers=[("retry-after", str(int(wait) + 1))])
        if not frame.password_set:
            return Response(403, pages.login_page(frame).encode())
        # Counted as failed until proven right: parallel guesses see it at once.
        self.limiter.attempt(req.client, now)
        try:
            async with self._checks:
                ok = await trio.to_thread.run_sync(check_password, self.data_dir, password)
        except PasswordFileError as exc:
            log.error("installer login: %s", exc)
            raise HTTPError(
                500, "the installer password file is damaged: set it again with `evse passwd`"
            ) from None
        if ok:
            self.limiter.succeeded(req.client)
            session = self.sessions.new("installer")
            security_log.info("installer logged in from %s", req.client)
            return Response(
                303, b"", headers=[("location", "/settings"), ("set-cookie", self._cookie(session))]
            )
        failures = self.limiter.failures(req.client, trio.current_time())
        security_log.warning(
            "failed installer login from %s (%d of %d in %g s)",
            req.client,
            failures,
            self.limiter.max_failures,
            self.limiter.window,
        )
        locked_for = self.limiter.locked_for(req.client, trio.current_time())
        if locked_for > 0:
            security_log.warning(
                "installer login locked for %s for %d s after %d failed attempts",
                req.client,
                int(locked_for) + 1,
                failures,
            )
        body = pages.login_page(frame, error="wrong password", locked=locked_for > 0)
        return Response(401, body.encode())

    async def logout(self, req: Request) -> Response:
        form = parse_form(req)
        self._need_csrf(req, _one(form, "csrf"))
        self.sessions.revoke(req.session)
        if req.session.installer:
            security_log.info("installer logged out from %s", req.client)
        viewer = self.sessions.new("viewer")
        return Response(303, b"", headers=[("location", "/"), ("set-cookie", self._cookie(viewer))])

    # -- the event stream ----------------------------------------------------------------

    async def events(self, req: Request, receive: Receive, send: Send) -> None:
        if self._streams >= MAX_STREAMS:
            response = await self._error(req, 503, "too many live pages open; close one")
            await self._send(req, send, response, head=False)
            return
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            *security_headers(secure=self.secure, cache=False),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if req.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        self._streams += 1
        self.state.watchers += 1
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel(reason="client went away")

                async def closing() -> None:
                    await self.state.closing.wait()
                    nursery.cancel_scope.cancel(reason="server closing")

                nursery.start_soon(watch)
                nursery.start_soon(closing)
                await self._stream(send)
        finally:
            self._streams -= 1
            self.state.watchers -= 1

    async def _stream(self, send: Send) -> None:
        state = self.state

        async def event(name: str, data: object) -> None:
            chunk = f"event: {name}\ndata: {_json(data)}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        # The client reconnects after 2 s when the stream breaks (the default is 3).
        await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
        await event("plot", state.plot.to_json())
        await event("faults", pages.fault_rows(state.faults.recent()))
        await event("transactions", state.transactions)
        seen = (state.plot.version, state.faults.version, state.transactions_version)
        while True:
            await event("status", {"fields": state.fields, "at": time.strftime("%H:%M:%S")})
            news = state.news.version
            with trio.move_on_after(STREAM_HEARTBEAT):
                await state.news.wait_past(news)
            plot, faults, txs = state.plot.version, state.faults.version, state.transactions_version
            if plot != seen[0]:
                if plot == seen[0] + 1 and state.plot.hour:
                    await event("point", state.plot.hour[-1].to_json())
                else:
                    await event("plot", state.plot.to_json())
            if faults != seen[1]:
                await event("faults", pages.fault_rows(state.faults.recent()))
            if txs != seen[2]:
                await event("transactions", state.transactions)
            seen = (plot, faults, txs)


def _json(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


def _same(key: Key, text: str, current: str) -> bool:
    """The submitted text means the value the registry holds (nothing to change)."""
    if text == current:
        return True
    if key.kind is Kind.MEASURANDS:
        return {t.strip().lower() for t in text.split(",") if t.strip()} == {
            t.lower() for t in current.split(",") if t
        }
    return False
