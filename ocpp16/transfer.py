"""Firmware downloads and diagnostics/log uploads: HTTP, HTTPS and FTP, on trio.

OCPP 1.6 §5.17 (GetDiagnostics), §5.18 (UpdateFirmware) and the Security
Whitepaper's GetLog / SignedUpdateFirmware give the station a URL to fetch
an image from or to send a file to; the spec names no protocol, the reference
station serves HTTP, HTTPS and FTP (station-spec §1). This module is the
whole of that I/O:

* ``download(url, dest, max_bytes=...)`` fetches into ``dest + ".part"``, and
  moves the part to ``dest`` (fsynced, ``os.replace``: atomic) only when it is
  complete. A later call for the same URL resumes from the part's size:
  HTTP ``Range: bytes=N-`` (RFC 9110 §14.2; a 206 continues, a 200 starts
  over) guarded by ``If-Range`` with the first response's validator
  (§13.1.5), so a file replaced on the server is never spliced onto an old
  part; FTP ``REST`` (RFC 3659 §5), guarded by the file's ``MDTM``. A small
  sidecar (``dest + ".part.json"``) holds the validator and a hash of the URL
  (never the URL: it may carry a password): a part from another URL is
  thrown away, not resumed.
* ``upload(url, source)``: HTTP(S) ``PUT``; a server that refuses PUT with
  405 Method Not Allowed gets a ``POST`` of multipart/form-data (RFC 7578,
  field ``file``) instead, what most central systems' upload endpoints take.
  FTP ``STOR`` with the URL's user and password (anonymous without).
* ``redact(url)``: the URL with its password (and query values that look like
  credentials, as in pre-signed upload URLs) replaced by ``***``: every log
  line and every ``TransferError`` carries only that.

Every failure is a ``TransferError`` (``ocpp16.errors``) naming the reason;
``retryable=False`` where another attempt cannot help (unsupported scheme,
malformed URL, a file over the size cap).

Time: ``timeout`` is an *idle* timeout on trio's clock: the transfer fails
when no byte moved for that long (connecting and the server's first answer
included), however long the whole transfer takes. It is a cancel scope whose
deadline moves on with every chunk.

HTTP goes through httpx, which runs on trio natively (httpcore's trio
backend: no asyncio loop). FTP goes through ftplib in a worker thread: there
is no trio FTP client. The thread is abandoned on cancellation (so a
cancel or the idle timeout returns at once), its sockets are shut down to
wake it, and every write to the part file happens under a lock after a
check of the stop flag: once ``download`` has returned or raised, that
thread writes nothing more. Because the FTP side waits on a thread, its idle
timeout needs trio's real clock (a MockClock with autojump would jump over
the thread's real time).

TLS (HTTPS): ``ssl_context`` or ``ssl.create_default_context()`` with TLS 1.2
as the minimum (Security Whitepaper §2.3); host names checked. A redirect
from https to http is refused: it would drop the protection the central
system asked for.
"""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Protocol, TypeVar

import trio

from ocpp16.errors import TransferError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: Read and write in blocks of this size (bytes).
CHUNK: Final = 64 * 1024
#: At most this many progress reports a second (trio's clock), besides the final one.
PROGRESS_INTERVAL: Final = 0.25
#: Redirects followed before giving up (HTTP).
MAX_REDIRECTS: Final = 5
SCHEMES: Final = ("http", "https", "ftp")

# Query parameters whose values are credentials in pre-signed upload URLs
# (S3's X-Amz-Signature / X-Amz-Credential, Azure's sig, tokens, keys).
_SECRET_QUERY = re.compile(r"sig|signature|token|key|secret|pass|credential|auth", re.I)


@dataclass(frozen=True)
class Progress:
    """Bytes moved so far (a resumed download counts its part), of ``total`` when known."""

    done: int
    total: int | None


ProgressCallback = Callable[[Progress], None]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- URLs


def redact(url: str) -> str:
    """``url`` with the password and credential-like query values replaced by ``***``.

    Never raises: text that is not a URL comes back with anything between
    ``://`` and an ``@`` that looks like ``user:password`` cut to ``user:***``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + hostport
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            if eq and value and _SECRET_QUERY.search(urllib.parse.unquote(name)):
                value = "***"
            pairs.append(name + eq + value)
        query = "&".join(pairs)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class _Target:
    url: str  # as given (may hold a password: never logged)
    shown: str  # redact(url)
    scheme: str
    host: str
    port: int | None
    user: str | None
    password: str | None
    path: str

    @property
    def bare_url(self) -> str:
        """The URL without user and password (those go as HTTP Basic auth, never logged)."""
        parts = urllib.parse.urlsplit(self.url)
        hostport = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=hostport))

    def scrub(self, text: str) -> str:
        """``text`` (a library's error message) without the password in it."""
        if self.password:
            for form in {self.password, urllib.parse.quote(self.password, safe="")}:
                text = text.replace(form, "***")
        return text


def _parse(url: str) -> _Target:
    shown = redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TransferError(shown, f"malformed URL: {exc}", retryable=False) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise TransferError(
            shown,
            f"unsupported scheme {scheme or '(none)'!r}: only http, https and ftp",
            retryable=False,
        )
    if not parts.hostname:
        raise TransferError(shown, "malformed URL: no host", retryable=False)
    user = None if parts.username is None else urllib.parse.unquote(parts.username)
    password = None if parts.password is None else urllib.parse.unquote(parts.password)
    return _Target(url, shown, scheme, parts.hostname, port, user, password, parts.path)


def _default_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    # Security Whitepaper §2.3: TLS 1.2 or later; create_default_context
    # already checks the host name against the certificate.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# --------------------------------------------------------------------------- shared pieces


class _Reporter:
    """Hands ``Progress`` to the caller at most every ``PROGRESS_INTERVAL`` (trio's clock)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._last = -float("inf")

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        if self._callback is None:
            return
        now = trio.current_time()
        if final or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._callback(Progress(done, total))


class _Idle:
    """The idle timeout: a cancel scope whose deadline moves on whenever bytes move."""

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout {timeout!r} is not a positive number of seconds")
        self.timeout = timeout
        self.scope = trio.CancelScope(deadline=trio.current_time() + timeout)

    def touch(self) -> None:
        self.scope.deadline = trio.current_time() + self.timeout

    def error(self, target: _Target) -> TransferError:
        return TransferError(target.shown, f"timed out: no data for {self.timeout:g} s")


@dataclass(frozen=True)
class _Ctx:
    """What every step of one transfer needs."""

    target: _Target
    idle: _Idle
    report: _Reporter
    ssl_context: ssl.SSLContext | None


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def _url_key(url: str) -> str:
    # The sidecar identifies the URL by a hash: the URL may carry a password.
    return hashlib.sha256(url.encode()).hexdigest()


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _start_over(part: Path, sidecar: Path, url: str, validator: str | None) -> None:
    """An empty part, then the sidecar naming what it will hold.

    In this order: a crash between the two leaves an empty part (nothing to
    resume), never old bytes under a new validator.
    """
    part.write_bytes(b"")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps({"url": _url_key(url), "validator": validator}))
    os.replace(tmp, sidecar)


def _resume_from(part: Path, sidecar: Path, url: str, max_bytes: int) -> tuple[int, str | None]:
    """The offset to resume at (0: start over, the part removed) and the stored validator."""
    meta = _read_sidecar(sidecar)
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        size = 0
    if size and meta is not None and meta.get("url") == _url_key(url) and size <= max_bytes:
        validator = meta.get("validator")
        return size, validator if isinstance(validator, str) else None
    _discard(part, sidecar)
    return 0, None


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _finish(part: Path, sidecar: Path, dest: Path) -> None:
    """Make the complete part ``dest``: fsync, atomic rename, fsync the directory."""
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, dest)
    _discard(sidecar)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _over_cap(
    target: _Target, part: Path, sidecar: Path, max_bytes: int, what: str
) -> TransferError:
    _discard(part, sidecar)
    return TransferError(
        target.shown, f"over the size cap of {max_bytes} bytes: {what}", retryable=False
    )


def _cause(exc: BaseException) -> BaseException | None:
    """The first ssl certificate error in ``exc``'s chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _reason(target: _Target, exc: BaseException) -> str:
    """A one-line reason for a library's exception, certificate failures named as such."""
    cert = _cause(exc)
    if isinstance(cert, ssl.SSLCertVerificationError):
        detail = cert.verify_message or str(cert)
        return target.scrub(f"TLS server certificate refused: {detail}")
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        text = f"TLS: {text}"
    return target.scrub(f"{type(exc).__name__}: {text}")


# --------------------------------------------------------------------------- download


async def download(
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    timeout: float = 60.0,  # noqa: ASYNC109 - the contract's name: an idle timeout, see above
    progress: ProgressCallback | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Fetch ``url`` into ``dest`` (via ``dest.part``, resumed where possible); return its size.

    Raises ``TransferError``; the part stays for the next attempt unless the
    file is over ``max_bytes`` (then it is removed and the error not retryable).
    """
    target = _parse(url)
    if max_bytes < 0:
        raise ValueError(f"max_bytes {max_bytes} is negative")
    ctx = _Ctx(target, _Idle(timeout), _Reporter(progress), ssl_context)
    dest = Path(dest)
    part, sidecar = _part_paths(dest)
    started = trio.current_time()
    log.info("download %s to %s", target.shown, dest)
    try:
        if target.scheme == "ftp":
            size = await _ftp_download(ctx, part, sidecar, max_bytes)
        else:
            size = await _http_download(ctx, part, sidecar, max_bytes)
        await trio.to_thread.run_sync(_finish, part, sidecar, dest)
    except OSError as exc:
        raise TransferError(target.shown, f"cannot write {part}: {exc}") from None
    except TransferError as exc:
        log.warning("download %s failed: %s", target.shown, exc.reason)
        raise
    log.info("download %s: %d bytes in %.1f s", target.shown, size, trio.current_time() - started)
    return size


def _unsatisfied_length(value: str | None) -> int | None:
    """The length in a 416's ``Content-Range: bytes */n`` (RFC 9110 §14.4)."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return None if match is None else int(match[1])


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, complete length or None) of ``Content-Range: bytes a-b/n`` (RFC 9110 §14.4)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if match is None:
        return None
    return int(match[1]), None if match[3] == "*" else int(match[3])


async def _http_download(ctx: _Ctx, part: Path, sidecar: Path, max_bytes: int) -> int:
    import httpx  # noqa: PLC0415 - only while a transfer runs: it costs memory on a gateway

    target, idle, report = ctx.target, ctx.idle, ctx.report
    with idle.scope:
        async with _http_client(target, ctx.ssl_context) as client:
            # Two rounds at most: a 416 for a part that is not the whole file
            # (the file shrank) starts over once.
            for _ in range(2):
                offset, validator = _resume_from(part, sidecar, target.url, max_bytes)
                headers = {"Accept-Encoding": "identity"}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                    if validator:
                        headers["If-Range"] = validator
                try:
                    async with client.stream("GET", target.bare_url, headers=headers) as response:
                        idle.touch()
                        if response.status_code == 416 and offset:
                            # RFC 9110 §15.5.17: "bytes */n" names the length.
                            if _unsatisfied_length(response.headers.get("content-range")) == offset:
                                report(offset, offset, final=True)
                                return offset  # the part was complete already
                            _discard(part, sidecar)
                            continue
                        return await _http_body(
                            ctx, response, part, sidecar, offset=offset, max_bytes=max_bytes
                        )
                except httpx.HTTPError as exc:
                    raise TransferError(target.shown, _reason(target, exc)) from None
            raise TransferError(target.shown, "HTTP 416 Range Not Satisfiable twice")
    raise idle.error(target)


def _http_client(target: _Target, ssl_context: ssl.SSLContext | None) -> httpx.AsyncClient:
    import httpx  # noqa: PLC0415 - see _http_download

    async def no_downgrade(request: httpx.Request) -> None:
        # A redirect from https to http would drop the TLS the central system asked for.
        if target.scheme == "https" and request.url.scheme != "https":
            raise TransferError(
                target.shown, f"redirected from https to {request.url.scheme}: refused"
            )

    _quiet_httpx_urls()
    return httpx.AsyncClient(
        # The URL's user and password as Basic auth (RFC 7617), not in the URL:
        # httpx logs every request's URL.
        auth=None if target.user is None else (target.user, target.password or ""),
        verify=ssl_context if ssl_context is not None else _default_ssl_context(),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        # Our own idle timeout (one cancel scope on trio's clock) governs.
        timeout=None,  # noqa: S113 - not unbounded: the idle scope around every use
        # No proxies or CA bundles from the environment: the station's
        # configuration says where to go, nothing else.
        trust_env=False,
        event_hooks={"request": [no_downgrade]},
    )


class _RedactUrls(logging.Filter):
    """Redacts URLs in httpx's own log lines ("HTTP Request: GET <url> ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact(str(arg)) if type(arg).__name__ == "URL" else arg for arg in record.args
            )
        return True


def _quiet_httpx_urls() -> None:
    # A pre-signed upload URL carries its credentials in the query: keep them
    # out of the log the station writes (and sends back with GetDiagnostics).
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactUrls) for f in logger.filters):
        logger.addFilter(_RedactUrls())


def _status(response: httpx.Response) -> str:
    phrase = response.reason_phrase
    if not phrase:
        with contextlib.suppress(ValueError):
            phrase = HTTPStatus(response.status_code).phrase
    return f"HTTP {response.status_code} {phrase}".rstrip()


async def _http_body(
    ctx: _Ctx, response: httpx.Response, part: Path, sidecar: Path, *, offset: int, max_bytes: int
) -> int:
    target, idle, report = ctx.target, ctx.idle, ctx.report
    status: int = response.status_code
    if status not in (200, 206):
        raise TransferError(target.shown, _status(response))
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        # We asked for identity (RFC 9110 §12.5.3): a coded body would not be
        # the file's bytes, and ranges of it would not resume it.
        raise TransferError(
            target.shown, f"server sent Content-Encoding {encoding!r}", retryable=False
        )
    length = response.headers.get("content-length")
    body_length = int(length) if length is not None and length.isdigit() else None
    if status == 206:
        ranged = _content_range(response.headers.get("content-range"))
        if ranged is None or ranged[0] != offset:
            _discard(part, sidecar)  # the next attempt from the start
            raise TransferError(
                target.shown,
                f"HTTP 206 with Content-Range {response.headers.get('content-range')!r}"
                f" for a request from byte {offset}",
            )
        start = offset
        total = ranged[1]
        if total is None and body_length is not None:
            total = offset + body_length
    else:
        # A 200 to a ranged request: the server has no ranges, or If-Range
        # found the file changed. Either way, from the start.
        start = 0
        total = body_length
        validator = response.headers.get("etag")
        if validator is None or validator.startswith("W/"):
            # If-Range takes only strong validators (RFC 9110 §13.1.5).
            validator = response.headers.get("last-modified")
        if total is None or total <= max_bytes:
            await trio.to_thread.run_sync(_start_over, part, sidecar, target.url, validator)
    if total is not None and total > max_bytes:
        raise _over_cap(target, part, sidecar, max_bytes, f"the file has {total}")
    done = start
    over = False
    report(done, total)
    async with await trio.open_file(part, "ab") as file:
        # Past the cap we stop by cancelling this scope, not by leaving the
        # loop: the Cancelled raised in httpx's innermost read ends its chain
        # of async generators, where a break would leave them to be finalized
        # at some garbage collection (a ResourceWarning under trio).
        with trio.CancelScope() as cap:
            # As received: a chunk size would hold bytes back from the part
            # (lost when the link drops) and from the idle deadline.
            async for chunk in response.aiter_raw():
                if over:
                    continue  # what httpx had buffered: dropped, never written
                idle.touch()
                if done + len(chunk) > max_bytes:
                    over = True
                    cap.cancel(reason="over the size cap")
                    continue
                await file.write(chunk)
                done += len(chunk)
                report(done, total)
    if over:
        raise _over_cap(target, part, sidecar, max_bytes, "the server sent more")
    if total is not None and done != total:
        raise TransferError(target.shown, f"connection closed at {done} of {total} bytes")
    report(done, total, final=True)
    return done


def discard_partial(dest: Path) -> None:
    """Remove what an unfinished ``download(..., dest)`` left (the part and its sidecar).

    For a caller giving a download up for good (retries exhausted, the
    request replaced): otherwise the next attempt resumes from them.
    """
    _discard(*_part_paths(Path(dest)))


# --------------------------------------------------------------------------- upload


async def upload(
    url: str,
    source: Path,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109 - the contract's name: an idle timeout, see above
    progress: ProgressCallback | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Send ``source`` to ``url``: HTTP(S) PUT (POST multipart on 405) or FTP STOR."""
    target = _parse(url)
    ctx = _Ctx(target, _Idle(timeout), _Reporter(progress), ssl_context)
    source = Path(source)
    started = trio.current_time()
    log.info("upload %s to %s", source, target.shown)
    try:
        size = source.stat().st_size
        if target.scheme == "ftp":
            await _ftp_upload(ctx, source, size)
        else:
            await _http_upload(ctx, source, size)
    except OSError as exc:
        raise TransferError(target.shown, f"cannot read {source}: {exc}") from None
    except TransferError as exc:
        log.warning("upload %s failed: %s", target.shown, exc.reason)
        raise
    log.info("upload %s: %d bytes in %.1f s", target.shown, size, trio.current_time() - started)


class _Reader(Protocol):
    async def read(self, size: int = -1, /) -> bytes: ...


class _FileBody:
    """An httpx request body: ``head``, the file's blocks, ``tail``; progress and idle per block.

    A class, not an async generator (nor an iterable httpx would wrap in
    one): when the upload is cancelled or fails while httpcore writes a
    block, a generator suspended at its ``yield`` would be left to some
    garbage collection to finalize (a ResourceWarning under trio).
    """

    def __init__(
        self, ctx: _Ctx, file: _Reader, size: int, *, head: bytes = b"", tail: bytes = b""
    ) -> None:
        self._file = file
        self._size = size
        self._idle = ctx.idle
        self._report = ctx.report
        self._head = head
        self._tail = tail
        self._sent = 0
        self.length = len(head) + size + len(tail)

    def __aiter__(self) -> _FileBody:
        return self

    async def __anext__(self) -> bytes:
        self._idle.touch()
        if self._head:
            head, self._head = self._head, b""
            return head
        if self._sent < self._size:
            # Never past ``size``: the Content-Length already went out.
            block = await self._file.read(min(CHUNK, self._size - self._sent))
            if block:
                self._sent += len(block)
                self._report(self._sent, self._size)
                return block
            self._size = self._sent  # the file shrank; the server will see a short body
        if self._tail:
            tail, self._tail = self._tail, b""
            return tail
        raise StopAsyncIteration


def _multipart(filename: str) -> tuple[str, bytes, bytes]:
    """Content-Type, head and tail of a form with one file field ``file`` (RFC 7578)."""
    boundary = "evse-" + secrets.token_hex(16)
    # RFC 7578 §4.2: the filename is a quoted-string; quote and backslash escaped.
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", head, tail


async def _http_upload(ctx: _Ctx, source: Path, size: int) -> None:
    import httpx  # noqa: PLC0415 - see _http_download

    class Stream(httpx.AsyncByteStream):
        # httpx wants an AsyncByteStream; its __aiter__ here is the _FileBody
        # itself, not an async generator (see _FileBody).
        def __init__(self, body: _FileBody) -> None:
            self._body = body

        def __aiter__(self) -> _FileBody:
            return self._body

    async def send(
        client: httpx.AsyncClient, method: str, content_type: str, head: bytes, tail: bytes
    ) -> httpx.Response:
        async with await trio.open_file(source, "rb") as file:
            body = _FileBody(ctx, file, size, head=head, tail=tail)
            request = client.build_request(
                method,
                target.bare_url,
                headers={"Content-Length": str(body.length), "Content-Type": content_type},
            )
            request.stream = Stream(body)
            return await client.send(request)

    target, idle = ctx.target, ctx.idle
    with idle.scope:
        async with _http_client(target, ctx.ssl_context) as client:
            try:
                response = await send(client, "PUT", "application/octet-stream", b"", b"")
                idle.touch()
                if response.status_code == 405:
                    log.info("upload %s: PUT refused (405), sending a POST", target.shown)
                    content_type, head, tail = _multipart(source.name)
                    response = await send(client, "POST", content_type, head, tail)
            except httpx.HTTPError as exc:
                raise TransferError(target.shown, _reason(target, exc)) from None
            if not 200 <= response.status_code < 300:
                raise TransferError(
                    target.shown,
                    f"{_status(response)} to {response.request.method}",
                )
            ctx.report(size, size, final=True)
            return
    raise idle.error(target)


# --------------------------------------------------------------------------- FTP


class _Stopped(Exception):
    """The trio side gave the FTP job up: the worker thread ends without another write."""


class _FtpJob:
    """One FTP transfer in a worker thread, stoppable from the trio side.

    ``stop()`` (trio thread) takes the lock every write to the part file
    holds, so once it returns no write is under way and none will start;
    it then shuts the sockets down so a ``recv`` blocked in the thread wakes.
    Activity goes to the trio side through ``trio.from_thread`` (at most
    every ``_BUMP`` seconds), where it moves the idle deadline and reports
    progress, unless the job is stopped.
    """

    _BUMP: Final = 0.05

    def __init__(self, ctx: _Ctx) -> None:
        self.target = ctx.target
        self.idle = ctx.idle
        self._report = ctx.report
        self._lock = threading.Lock()
        self._stopped = False
        self._sockets: list[socket.socket] = []
        self._last_bump = 0.0
        self.done = 0
        self.total: int | None = None

    # -- the trio side ---------------------------------------------------------

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _on_activity(self, done: int, moving: bool) -> None:
        if self._stopped:
            return  # a late call from an abandoned thread: the caller has moved on
        self.idle.touch()
        if moving:
            self._report(done, self.total)

    # -- the worker thread -----------------------------------------------------

    def bump(self, *, moving: bool = True, force: bool = False) -> None:
        """Something happened: the server answered (``moving=False``) or bytes moved."""
        now = time.monotonic()
        if force or now - self._last_bump >= self._BUMP:
            self._last_bump = now
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._on_activity, self.done, moving)

    def keep(self, sock: socket.socket | None) -> None:
        """Register a socket for ``stop()``; stopped already: close it and end."""
        if sock is None:
            return
        with self._lock:
            if not self._stopped:
                self._sockets.append(sock)
                return
        sock.close()
        raise _Stopped

    def check(self) -> None:
        if self._stopped:
            raise _Stopped

    def guarded(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` (a write to the part) only if not stopped, and never during ``stop()``."""
        with self._lock:
            if self._stopped:
                raise _Stopped
            return action()

    def session(self, work: Callable[[ftplib.FTP], _T]) -> _T:
        """Log in (binary mode), run ``work``, close: all in the worker thread."""
        # FTP is what central systems hand out for diagnostics (OCPP 1.6 §5.17);
        # the backstop socket timeout is the idle timeout (real seconds).
        ftp = ftplib.FTP(timeout=self.idle.timeout)  # noqa: S321
        # Passive (RFC 959 PASV): the station is behind NAT, the server cannot
        # connect back to it.
        ftp.set_pasv(True)
        try:
            ftp.connect(self.target.host, self.target.port or 21)
            self.keep(ftp.sock)
            self.bump(moving=False, force=True)
            if self.target.user is None:
                ftp.login()  # anonymous
            else:
                ftp.login(self.target.user, self.target.password or "")
            self.bump(moving=False, force=True)
            ftp.voidcmd("TYPE I")  # binary: REST and SIZE count bytes (RFC 3659 §4, §5)
            return work(ftp)
        finally:
            with contextlib.suppress(OSError, EOFError, ftplib.Error):
                ftp.close()

    def enter_dirs(self, ftp: ftplib.FTP) -> str:
        """CWD into the URL's directories, return its file name (RFC 1738 §3.2.2)."""
        segments = self.target.path.lstrip("/").split("/")
        name = urllib.parse.unquote(segments[-1].split(";", 1)[0])
        if not name:
            raise TransferError(self.target.shown, "no file name in the URL", retryable=False)
        for segment in segments[:-1]:
            if segment:
                ftp.cwd(urllib.parse.unquote(segment))
        return name


def _ftp_int(reply: str) -> int | None:
    parts = reply.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _ftp_download_job(
    job: _FtpJob, ftp: ftplib.FTP, part: Path, sidecar: Path, max_bytes: int
) -> tuple[int, int | None, str | None]:
    """Worker thread: RETR into the part (REST from its size): (done, total, over the cap?)."""
    name = job.enter_dirs(ftp)
    try:
        job.total = _ftp_int(ftp.sendcmd(f"SIZE {name}"))  # RFC 3659 §4
    except ftplib.error_perm:
        job.total = None
    try:
        mdtm: str | None = ftp.sendcmd(f"MDTM {name}")  # RFC 3659 §3
    except ftplib.error_perm:
        mdtm = None
    job.bump(moving=False, force=True)
    if job.total is not None and job.total > max_bytes:
        return 0, job.total, "total"
    offset, stored = job.guarded(lambda: _resume_from(part, sidecar, job.target.url, max_bytes))
    if offset and stored != mdtm:
        offset = 0  # the file changed since the part was written
    if job.total is not None and offset > job.total:
        offset = 0
    conn = None
    if offset:
        try:
            conn = ftp.transfercmd(f"RETR {name}", rest=offset)
        except (ftplib.error_perm, ftplib.error_reply):
            offset = 0  # no REST on this server (502): from the start
    if conn is None:
        conn = ftp.transfercmd(f"RETR {name}")
    with conn:
        job.keep(conn)
        if not offset:
            job.guarded(lambda: _start_over(part, sidecar, job.target.url, mdtm))
        job.done = offset
        job.bump(force=True)
        file: IO[bytes] = job.guarded(lambda: part.open("ab"))
        with file:
            while True:
                block = conn.recv(CHUNK)
                job.check()
                if not block:
                    break
                if job.done + len(block) > max_bytes:
                    return job.done, job.total, "bytes"
                job.guarded(lambda b=block: file.write(b))  # type: ignore[misc]
                job.done += len(block)
                job.bump()
    ftp.voidresp()  # 226 Transfer complete (RFC 959 §4.2)
    return job.done, job.total, None


async def _run_ftp_job(job: _FtpJob, work: Callable[[], Any]) -> Any:
    """Run ``work`` in a worker thread under the job's idle scope; map its errors."""
    target = job.target
    with job.idle.scope:
        try:
            # ftplib in a thread: there is no trio FTP client. Abandoned on
            # cancel so a cancel or the idle timeout returns at once; stop()
            # in the finally makes sure the thread writes nothing afterwards.
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except TransferError:
            raise
        except ftplib.Error as exc:
            raise TransferError(target.shown, target.scrub(f"FTP: {exc}")) from None
        except (OSError, EOFError) as exc:
            raise TransferError(target.shown, _reason(target, exc)) from None
        finally:
            job.stop()
    raise job.idle.error(target)


async def _ftp_download(ctx: _Ctx, part: Path, sidecar: Path, max_bytes: int) -> int:
    target = ctx.target
    job = _FtpJob(ctx)
    done, total, over = await _run_ftp_job(
        job, lambda: job.session(lambda ftp: _ftp_download_job(job, ftp, part, sidecar, max_bytes))
    )
    if over is not None:
        what = f"the file has {total}" if over == "total" else "the server sent more"
        raise _over_cap(target, part, sidecar, max_bytes, what)
    if total is not None and done != total:
        raise TransferError(target.shown, f"data connection closed at {done} of {total} bytes")
    ctx.report(done, total, final=True)
    return int(done)


def _ftp_upload_job(job: _FtpJob, ftp: ftplib.FTP, source: Path) -> None:
    """Worker thread: STOR ``source`` under the URL's name."""
    name = job.enter_dirs(ftp)
    with source.open("rb") as file:
        job.total = os.fstat(file.fileno()).st_size
        with ftp.transfercmd(f"STOR {name}") as conn:
            job.keep(conn)
            job.bump(force=True)
            while block := file.read(CHUNK):
                job.check()
                conn.sendall(block)
                job.done += len(block)
                job.bump()
    ftp.voidresp()  # 226: the server has the whole file


async def _ftp_upload(ctx: _Ctx, source: Path, size: int) -> None:
    job = _FtpJob(ctx)
    await _run_ftp_job(job, lambda: job.session(lambda ftp: _ftp_upload_job(job, ftp, source)))
    ctx.report(size, size, final=True)


__all__ = [
    "CHUNK",
    "PROGRESS_INTERVAL",
    "Progress",
    "discard_partial",
    "download",
    "redact",
    "upload",
]
