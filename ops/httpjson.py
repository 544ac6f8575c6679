"""A small HTTP/1.1 + JSON server on trio and h11, for local control interfaces.

Local only (the simulator's control port, later the station's status view):
one request per connection turn, JSON in and out, bounded body size, and
every malformed request answered with a 4xx and a JSON error, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    #: Path parameters, for routes that end in "/{name}".
    params: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Any]]


class Router:
    """Exact paths, plus ``/prefix/{name}`` routes with one trailing parameter."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method.upper(), path)] = handler

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        if (method, path) in self.routes:
            return self.routes[(method, path)], {}
        head, _, tail = path.rpartition("/")
        for (m, pattern), handler in self.routes.items():
            if m == method and pattern.startswith(head + "/{") and pattern.endswith("}") and tail:
                return handler, {pattern[len(head) + 2 : -1]: tail}
        if any(p == path for (_, p) in self.routes):
            raise HTTPError(405, f"method {method} not allowed on {path}")
        raise HTTPError(404, f"no such resource {path}")


def _response(status: int, payload: Any) -> tuple[h11.Response, bytes]:
    body = (json.dumps(payload, indent=None, separators=(",", ":")) + "\n").encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    return h11.Response(status_code=status, headers=headers), body


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise HTTPError(413, f"request body over {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise HTTPError(400, "connection closed mid-request")


async def handle_connection(router: Router, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    status, payload = 500, {"error": "internal error"}
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            raw, body = await _read_request(conn, stream)
        url = urlsplit(raw.target.decode("latin-1"))
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            data = json.loads(body) if body.strip() else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"body is not JSON: {exc}") from None
        method = raw.method.decode("ascii").upper()
        handler, params = router.resolve(method, url.path.rstrip("/") or "/")
        payload = await handler(Request(method, url.path, query, data, params))
        status = 200
    except HTTPError as exc:
        status, payload = exc.status, {"error": exc.message}
    except h11.RemoteProtocolError as exc:
        status, payload = exc.error_status_hint, {"error": f"bad request: {exc}"}
    except trio.TooSlowError:
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    try:
        response, body_bytes = _response(status, payload)
        if conn.our_state is h11.SEND_RESPONSE or conn.our_state is h11.IDLE:
            await stream.send_all(conn.send(response) + conn.send(h11.Data(data=body_bytes)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def serve_unix(
    router: Router,
    path: str,
    *,
    mode: int = 0o660,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``router`` on a Unix socket at ``path`` (a stale socket file is replaced)."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await handle_connection(router, stream)

    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen()
    except OSError:
        sock.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])
            task_status.started(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def serve(
    router: Router,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``router`` on host:port; reports the bound port."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await handle_connection(router, stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


async def request_json(
    host: str,
    port: int,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
    *,
    within: float = 5.0,
    unix_socket: str | None = None,
) -> Any:
    """A minimal client for the same interface (used by the CLI and tests).

    With ``unix_socket`` the request goes to that socket; ``host`` is then
    only the Host header.
    """
    with trio.fail_after(within):
        stream: trio.abc.Stream
        if unix_socket is not None:
            stream = await trio.open_unix_socket(unix_socket)
        else:
            stream = await trio.open_tcp_stream(host, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            data = json.dumps(body).encode() if body is not None else b""
            headers = [
                ("host", f"{host}:{port}"),
                ("content-length", str(len(data))),
                ("content-type", "application/json"),
                ("connection", "close"),
            ]
            await stream.send_all(
                conn.send(h11.Request(method=method, target=path, headers=headers))
                + conn.send(h11.Data(data=data))
                + conn.send(h11.EndOfMessage())
            )
            status = 0
            chunks = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    payload = json.loads(chunks) if chunks else None
    if status >= 400:
        message = payload.get("error") if isinstance(payload, dict) else payload
        raise HTTPError(status, str(message))
    return payload
