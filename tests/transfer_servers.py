"""Real file servers on loopback for transfer tests: HTTP, HTTPS (trustme) and FTP (pyftpdlib).

``HttpServer`` is a small HTTP/1.1 server written on trio and h11, so it runs
either in the test's own trio run (``async with server.running():`` or
``await nursery.start(server.serve)``: the one to use with trio's MockClock,
since then the client and the server share the clock) or in a thread of its
own with its own trio run (``with server.in_thread():``, for sync tests or a
firmware running as a child process)::

    server = HttpServer(tmp_path / "www", ca=trustme.CA())   # ca=None: plain http
    async with server.running():
        await download(server.url("image.tar"), dest, max_bytes=...,
                       ssl_context=server.client_ssl_context())

It serves the files under ``root`` (GET/HEAD, single ``Range: bytes=a-b``
requests with ``If-Range``, an ``ETag`` and ``Last-Modified``) and receives
uploads (PUT, and POST multipart/form-data), recording every request it saw in
``requests`` (method, target, headers, body, form fields) and every upload in
``uploads`` (path -> bytes). Behaviour switches, read per request (set them
from any thread):

* ``ranges = False``: ignore Range (always 200 with the whole file);
* ``drop_after = n``: the next GET sends ``n`` bytes of its body, then drops
  the connection (once; set it again for another drop);
* ``stall_after = n``: every GET sends ``n`` bytes of body, then nothing more,
  keeping the connection open;
* ``rate = bytes_per_second``: slow mode for bodies sent;
* ``chunked = True``: no Content-Length on GET, the body chunked (total unknown);
* ``put_status = 405``: answer PUT with that status (405 = try POST instead);
  ``post_status`` likewise; ``statuses[path] = 503``: answer GET of a path so;
* ``redirects[path] = location``: 302 to there.

One request per connection (``Connection: close``).

``FtpServer`` is pyftpdlib in a child process (``python -m
tests.transfer_servers ftp ...``): passive mode, one user with a password
(with characters that need percent-encoding in a URL), anonymous access when
asked, ``root`` served and written to; ``rate`` paces the data channel (bytes
per second both ways, evenly in 8 KiB steps: pyftpdlib's own throttle sends a
second's worth at once, then sleeps);
``rest=False`` refuses REST (502); ``port`` asks for a port (to restart a
server where a client expects it, e.g. with other settings); ``commands()``
is every command the server received (PASS masked). Synchronous: start and stop it from any test.

``silent_server()`` accepts TCP connections and never says anything: for idle
timeouts of any protocol.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trio
import trustme

READY_TIMEOUT = 15.0
_PROJECT = Path(__file__).resolve().parents[1]
_CHUNK = 64 * 1024
_SLOW_CHUNK = 8 * 1024
_PACE = 8 * 1024


# --------------------------------------------------------------------------- HTTP


@dataclass
class Request:
    """One request the server received."""

    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # names in lower case
    body: bytes = b""
    #: multipart/form-data fields: name -> (filename or None, content)
    form: dict[str, tuple[str | None, bytes]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return urllib.parse.unquote(self.target.split("?", 1)[0])


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body (RFC 7578), byte-exact."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        return {}
    delimiter = b"--" + match[1].encode()
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        field_name = re.search(r'\bname="((?:[^"\\]|\\.)*)"', disposition)
        filename = re.search(r'\bfilename="((?:[^"\\]|\\.)*)"', disposition)
        if field_name is not None:
            unescape = re.compile(r"\\(.)")
            fields[unescape.sub(r"\1", field_name[1])] = (
                None if filename is None else unescape.sub(r"\1", filename[1]),
                content,
            )
    return fields


class HttpServer:
    """HTTP or (with ``ca``) HTTPS on 127.0.0.1, serving ``root`` and taking uploads."""

    def __init__(
        self,
        root: Path,
        *,
        ca: trustme.CA | None = None,
        hostnames: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.port = 0
        self.ranges = True
        self.drop_after: int | None = None
        self.stall_after: int | None = None
        self.rate: float | None = None
        self.chunked = False
        self.put_status: int | None = None
        self.post_status: int | None = None
        self.statuses: dict[str, int] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[Request] = []
        self.uploads: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server_context: ssl.SSLContext | None = None
        if ca is not None:
            self._server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert(*hostnames).configure_cert(self._server_context)

    # -- what a test uses ----------------------------------------------------

    @property
    def scheme(self) -> str:
        return "http" if self.ca is None else "https"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}/{path.lstrip('/')}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's CA (TLS >= 1.2, host names checked)."""
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            self.ca.configure_trust(context)
        return context

    def seen(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The requests received, those of ``method`` and ``path`` when given."""
        with self._lock:
            requests = list(self.requests)
        return [
            r
            for r in requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        ]

    # -- running -------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (a free port, in ``port``) and serve until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                task_status.started(self)
        finally:
            for listener in listeners:
                listener.socket.close()  # no await: we are being cancelled

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HttpServer]:
        """Serve in the caller's trio run for the ``async with`` block."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[HttpServer]:
        """Serve from a thread with its own trio run for the ``with`` block."""
        ready = threading.Event()
        box: dict[str, Any] = {}

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                box["token"] = trio.lowlevel.current_trio_token()
                box["scope"] = nursery.cancel_scope
                await nursery.start(self.serve)
                ready.set()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # reported to the test below
                box["error"] = exc
            finally:
                ready.set()

        thread = threading.Thread(target=run, name="http-server", daemon=True)
        thread.start()
        if not ready.wait(READY_TIMEOUT) or "error" in box:
            raise RuntimeError(f"HTTP server did not start: {box.get('error')!r}")
        try:
            yield self
        finally:
            # Thread-safe and non-blocking, from a trio run or not.
            box["token"].run_sync_soon(box["scope"].cancel)
            thread.join(READY_TIMEOUT)
            if "error" in box:
                raise RuntimeError("HTTP server failed") from box["error"]

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream: trio.abc.Stream = await listener.accept()
            nursery.start_soon(self._connection, stream)

    async def _connection(self, tcp: trio.abc.Stream) -> None:
        stream = tcp
        try:
            if self._server_context is not None:
                stream = trio.SSLStream(tcp, self._server_context, server_side=True)
                await stream.do_handshake()
            await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass  # the client went away or refused our certificate: its business
        finally:
            await trio.aclose_forcefully(stream)

    # -- one request -----------------------------------------------------------

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        event = await _next_event(conn, stream)
        if not isinstance(event, h11.Request):
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        request = Request(event.method.decode(), event.target.decode(), headers)
        body = bytearray()
        while True:
            event = await _next_event(conn, stream)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        request.body = bytes(body)
        if request.method == "POST":
            request.form = parse_multipart(headers.get("content-type", ""), request.body)
        with self._lock:
            self.requests.append(request)
        responder = _Responder(conn, stream)
        if request.method in ("GET", "HEAD"):
            await self._get(request, responder)
        elif request.method == "PUT":
            await self._put(request, responder)
        elif request.method == "POST":
            await self._post(request, responder)
        else:
            await responder.simple(405, extra=[("Allow", "GET, HEAD, PUT, POST")])

    async def _get(self, request: Request, out: _Responder) -> None:
        path = request.path
        if path in self.statuses:
            await out.simple(self.statuses[path])
            return
        if path in self.redirects:
            await out.simple(302, extra=[("Location", self.redirects[path])])
            return
        file = self._file(path)
        if file is None:
            await out.simple(404)
            return
        data = await trio.Path(file).read_bytes()
        stat = os.stat(file)
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        headers = [("ETag", etag), ("Last-Modified", modified)]
        status, start, end = 200, 0, len(data)
        wanted = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if self.ranges:
            headers.append(("Accept-Ranges", "bytes"))
        if self.ranges and wanted and (if_range is None or if_range in (etag, modified)):
            match = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", wanted)
            if match is not None:
                first = int(match[1])
                last = int(match[2]) if match[2] else len(data) - 1
                if first >= len(data):
                    await out.simple(416, extra=[("Content-Range", f"bytes */{len(data)}")])
                    return
                status, start, end = 206, first, min(last + 1, len(data))
                headers.append(("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"))
        headers.append(("Content-Type", "application/octet-stream"))
        if not self.chunked:
            headers.append(("Content-Length", str(end - start)))
        await out.start(status, headers)
        if request.method == "HEAD":
            await out.end()
            return
        drop, self.drop_after = self.drop_after, None
        stall = self.stall_after
        body = memoryview(data)[start:end]
        sent = 0
        while sent < len(body):
            step = _SLOW_CHUNK if self.rate else _CHUNK
            chunk = bytes(body[sent : sent + step])
            cut = min(x for x in (drop, stall, len(body)) if x is not None)
            if sent + len(chunk) > cut:
                chunk = chunk[: cut - sent]
            if chunk:
                await out.data(chunk)
                sent += len(chunk)
            if drop is not None and sent >= drop:
                await trio.aclose_forcefully(out.stream)  # no end: the client sees a short body
                return
            if stall is not None and sent >= stall:
                await trio.sleep_forever()
            if self.rate:
                await trio.sleep(len(chunk) / self.rate)
        await out.end()

    async def _put(self, request: Request, out: _Responder) -> None:
        if self.put_status is not None:
            await out.simple(self.put_status, extra=[("Allow", "GET, HEAD, POST")])
            return
        with self._lock:
            self.uploads[request.path] = request.body
        await out.simple(201)

    async def _post(self, request: Request, out: _Responder) -> None:
        if self.post_status is not None:
            await out.simple(self.post_status)
            return
        if "file" not in request.form:
            await out.simple(400)
            return
        with self._lock:
            self.uploads[request.path] = request.form["file"][1]
        await out.simple(201)

    def _file(self, path: str) -> Path | None:
        root = self.root.resolve()
        candidate = (root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(_CHUNK)))


class _Responder:
    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        self.conn = conn
        self.stream = stream

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self._send(
            h11.Response(
                status_code=status,
                headers=[*headers, ("Connection", "close")],
                reason=HTTPStatus(status).phrase.encode(),
            )
        )

    async def data(self, chunk: bytes) -> None:
        await self._send(h11.Data(data=chunk))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def simple(self, status: int, *, extra: list[tuple[str, str]] | None = None) -> None:
        body = f"{status}\n".encode()
        await self.start(status, [*(extra or []), ("Content-Length", str(len(body)))])
        await self.data(body)
        await self.end()


# --------------------------------------------------------------------------- a silent peer


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port on 127.0.0.1 that accepts and then never sends a byte (nor closes)."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def accept() -> None:
        while True:
            held.append(await listener.accept())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            try:
                yield listener.socket.getsockname()[1]
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # Closed without awaiting: this may run inside a cancelled scope.
        for stream in held:
            stream.socket.close()
        listener.socket.close()


# --------------------------------------------------------------------------- FTP


class FtpServer:
    """pyftpdlib serving ``root`` from a child process; ``with FtpServer(root) as ftp:``."""

    def __init__(
        self,
        root: Path,
        *,
        user: str = "evse",
        password: str = "s3cr:t@/pw",  # a test account; needs percent-encoding in a URL
        anonymous: bool = False,
        rate: int | None = None,
        rest: bool = True,
        port: int = 0,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.password = password
        self.anonymous = anonymous
        self.rate = rate
        self.rest = rest
        self.port = port
        fd, log = tempfile.mkstemp(prefix=".ftp-commands-", suffix=".log", dir=root.parent)
        os.close(fd)
        self._log = Path(log)
        self._proc: subprocess.Popen[str] | None = None

    def url(self, path: str, *, login: bool = True) -> str:
        """``ftp://user:password@127.0.0.1:port/path`` (anonymous when ``login`` is False)."""
        auth = ""
        if login:
            auth = (
                urllib.parse.quote(self.user, safe="")
                + ":"
                + urllib.parse.quote(self.password, safe="")
                + "@"
            )
        return f"ftp://{auth}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def commands(self) -> list[str]:
        try:
            return self._log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def start(self) -> FtpServer:
        config = {
            "root": str(self.root),
            "user": self.user,
            "password": self.password,
            "anonymous": self.anonymous,
            "rate": self.rate,
            "rest": self.rest,
            "log": str(self._log),
            "port": self.port,
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.transfer_servers", "ftp", json.dumps(config)],
            cwd=_PROJECT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError("FTP server did not start")
        self.port = int(json.loads(line)["ready"]["port"])
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> FtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ftp_main(config: dict[str, Any]) -> None:
    """The child: a pyftpdlib server, its port printed as ``{"ready": {"port": n}}``."""
    import logging  # noqa: PLC0415 - only the child

    from pyftpdlib.authorizers import DummyAuthorizer  # type: ignore[import-untyped]  # noqa: PLC0415
    from pyftpdlib.handlers import (  # type: ignore[import-untyped]  # noqa: PLC0415
        DTPHandler,
        FTPHandler,
    )
    from pyftpdlib.servers import FTPServer  # type: ignore[import-untyped]  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING)
    authorizer = DummyAuthorizer()
    authorizer.add_user(config["user"], config["password"], config["root"], perm="elradfmwMT")
    if config["anonymous"]:
        authorizer.add_anonymous(config["root"], perm="elrw")
    log_path = Path(config["log"])

    class Handler(FTPHandler):  # type: ignore[misc]
        def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
            shown = "PASS ***" if cmd == "PASS" else line
            with log_path.open("a") as log:
                log.write(shown + "\n")
            super().pre_process_command(line, cmd, arg)

        def ftp_REST(self, line: str) -> None:
            if config["rest"]:
                super().ftp_REST(line)
            else:
                self.respond("502 Command not implemented.")

    Handler.authorizer = authorizer
    Handler.auth_failed_timeout = 0.05  # pyftpdlib waits 3 s before a 530 by default
    rate = config["rate"]
    if rate:

        class Paced(DTPHandler):  # type: ignore[misc]
            """At most _PACE bytes per step, then the channel rests for _PACE / rate seconds."""

            _timer: Any = None

            def use_sendfile(self) -> bool:
                return False

            def _rest(self, nbytes: int, event: int) -> None:
                if nbytes > 0:
                    self.del_channel()
                    self._timer = self.ioloop.call_later(
                        nbytes / rate,
                        lambda: self.add_channel(events=event),
                        _errback=self.handle_error,
                    )

            def send(self, data: bytes) -> int:
                sent: int = super().send(data[:_PACE])
                self._rest(sent, self.ioloop.WRITE)
                return sent

            def recv(self, size: int) -> bytes:
                chunk: bytes = super().recv(min(size, _PACE))
                self._rest(len(chunk), self.ioloop.READ)
                return chunk

            def close(self) -> None:
                if self._timer is not None and not self._timer.cancelled:
                    self._timer.cancel()
                super().close()

        Handler.dtp_handler = Paced
    server = FTPServer(("127.0.0.1", config["port"]), Handler)
    print(json.dumps({"ready": {"port": server.socket.getsockname()[1]}}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["ftp"]:
        _ftp_main(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m tests.transfer_servers ftp CONFIG_JSON")
