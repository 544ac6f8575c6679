"""A small HTTP/1.1 client for the web page tests: h11 over trio sockets (TLS optional).

One connection per request (``Connection: close``), a cookie jar, forms and
multipart uploads, the bytes each reply took on the wire (headers and body:
the page-weight test counts them), and a reader for server-sent events.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    #: Bytes read from the socket for this reply (status line, headers, body).
    wire_bytes: int

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def csrf(self) -> str:
        found = CSRF.search(self.text)
        assert found is not None, f"no CSRF token on the page:\n{self.text[:2000]}"
        return found.group(1)


@dataclass
class WebClient:
    base_url: str
    ssl_context: ssl.SSLContext | None = None
    cookies: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port, self.https = parts.hostname, parts.port, parts.scheme == "https"

    async def _open(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        if self.https:
            assert self.ssl_context is not None
            tls = trio.SSLStream(stream, self.ssl_context, server_hostname=self.host)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stream = tls
        return stream

    def _request_bytes(
        self,
        conn: h11.Connection,
        method: str,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
    ) -> bytes:
        all_headers = [("host", f"{self.host}:{self.port}"), ("connection", "close"), *headers]
        if self.cookies:
            all_headers.append(("cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items())))
        if body or method == "POST":
            all_headers.append(("content-length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=path, headers=all_headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        return data + (conn.send(h11.EndOfMessage()) or b"")

    def _keep_cookies(self, headers: list[tuple[str, str]]) -> None:
        for name, value in headers:
            if name == "set-cookie":
                pair = value.split(";", 1)[0]
                key, _, val = pair.partition("=")
                self.cookies[key.strip()] = val.strip()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        with trio.fail_after(20):
            stream = await self._open()
            try:
                conn = h11.Connection(h11.CLIENT)
                await stream.send_all(self._request_bytes(conn, method, path, body, headers))
                wire = 0
                status = 0
                reply_headers: list[tuple[str, str]] = []
                chunks: list[bytes] = []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        wire += len(data)
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Response):
                        status = event.status_code
                        reply_headers = [(n.decode(), v.decode()) for n, v in event.headers]
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
            finally:
                await stream.aclose()
        self._keep_cookies(reply_headers)
        return Reply(status, reply_headers, b"".join(chunks), wire)

    async def get(self, path: str) -> Reply:
        return await self.request("GET", path)

    async def post_form(
        self, path: str, fields: Mapping[str, str] | Sequence[tuple[str, str]]
    ) -> Reply:
        pairs = list(fields.items()) if isinstance(fields, Mapping) else list(fields)
        return await self.request(
            "POST",
            path,
            body=urlencode(pairs).encode(),
            headers=[("content-type", "application/x-www-form-urlencoded")],
        )

    async def post_multipart(
        self, path: str, fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes]]
    ) -> Reply:
        boundary = "----evse" + secrets.token_hex(8)
        parts: list[bytes] = []
        for name, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                + value.encode()
                + b"\r\n"
            )
        for name, (filename, data) in files.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                + data
                + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return await self.request(
            "POST",
            path,
            body=body,
            headers=[("content-type", f"multipart/form-data; boundary={boundary}")],
        )

    async def login(self, password: str) -> Reply:
        page = await self.get("/login")
        return await self.post_form("/login", {"csrf": page.csrf(), "password": password})

    @asynccontextmanager
    async def events(self, path: str = "/events") -> AsyncIterator[EventReader]:
        stream = await self._open()
        try:
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(self._request_bytes(conn, "GET", path, b"", ()))
            reader = EventReader(stream, conn)
            await reader.start()
            yield reader
        finally:
            await stream.aclose()


class EventReader:
    """Server-sent events (``event:`` / ``data:`` lines, blank-line separated)."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        self._buffer = b""
        self.status = 0
        self.headers: list[tuple[str, str]] = []

    async def _event(self) -> object:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._stream.receive_some(65536)
                self._conn.receive_data(bytes(data))
                continue
            return event

    async def start(self) -> None:
        event = await self._event()
        assert isinstance(event, h11.Response), event
        self.status = event.status_code
        self.headers = [(n.decode(), v.decode()) for n, v in event.headers]

    async def next(self) -> tuple[str, Any]:
        """The next event: (name, JSON data)."""
        while b"\n\n" not in self._buffer:
            event = await self._event()
            if isinstance(event, h11.Data):
                self._buffer += bytes(event.data)
            else:
                raise EOFError(f"the stream ended: {event}")
        block, self._buffer = self._buffer.split(b"\n\n", 1)
        name, data = "message", ""
        for line in block.decode().splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if not data:
            return await self.next()  # "retry:" and comments
        return name, json.loads(data)

    async def until(self, name: str, predicate: Any, within: float) -> Any:
        """The first ``name`` event whose data satisfies ``predicate``."""
        seen: list[Any] = []
        with trio.move_on_after(within):
            while True:
                event, data = await self.next()
                if event == name:
                    seen.append(data)
                    if predicate(data):
                        return data
        raise AssertionError(f"no {name} event matched within {within} s; last: {seen[-1:]}")
