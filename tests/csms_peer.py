"""Start, stop and drive the bench central system (``python -m evse_lab.csms``) from tests.

Everything here is synchronous (subprocess.Popen, urllib) so that sync tests call
it directly and trio tests through ``trio.to_thread.run_sync``; no event loop of
any kind runs in the test process on its behalf::

    with running_csms("--boot-status", "Pending") as csms:
        ...  # point the charge point at csms.url("CP-1")
        boot = wait_for(csms, "CP-1", "BootNotification", within=10)
        outcome = call(csms, "CP-1", "Reset", {"type": "Soft"})

The helpers take the ``Csms`` object or the plain ``ready`` dict the process
printed (``{"ws": ..., "control": ...}``). Times in the records (``t``) are
``time.monotonic()`` of the central system's process: on Linux the same clock as
the test process's ``time.monotonic()``.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

READY_TIMEOUT = 15.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


@dataclass(frozen=True, slots=True)
class Csms:
    """A running central system: its endpoints and its process."""

    ws: str
    control: str
    process: subprocess.Popen[str]

    def url(self, cp_id: str) -> str:
        """The websocket URL a charge point with this id connects to."""
        return self.ws + cp_id


Ready = Csms | Mapping[str, Any]


class CsmsError(Exception):
    """The control interface answered with an HTTP error: (status, body)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@contextmanager
def running_csms(*args: str, quiet: bool = True) -> Iterator[Csms]:
    """Run ``python -m evse_lab.csms ARGS`` (ports default to 0) until the block ends."""
    argv = [sys.executable, "-m", "evse_lab.csms", *args]
    if "--port" not in args:
        argv += ["--port", "0"]
    if "--control-port" not in args:
        argv += ["--control-port", "0"]
    if quiet:
        argv.append("--quiet")
    # stderr is inherited: pytest's fd capture shows it with a failing test.
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(READY_TIMEOUT):
                raise RuntimeError(f"evse_lab.csms printed nothing within {READY_TIMEOUT} s")
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"evse_lab.csms exited with {process.wait()} before it was ready")
        ready = json.loads(line)["ready"]
        yield Csms(ready["ws"], ready["control"], process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _control_url(ready: Ready) -> str:
    return ready.control if isinstance(ready, Csms) else str(ready["control"])


def request(
    ready: Ready, method: str, path: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One control request: (HTTP status, decoded JSON body); never raises on a status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(_control_url(ready) + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def control(ready: Ready, method: str, path: str, body: Any = None) -> Any:
    """A control request that must succeed (2xx); its JSON body."""
    status, reply = request(ready, method, path, body)
    if status >= 300:
        raise CsmsError(status, reply)
    return reply


def health(ready: Ready) -> dict[str, Any]:
    return dict(control(ready, "GET", "/health"))


def chargepoints(ready: Ready) -> dict[str, Any]:
    """``{"connected": [...], "chargepoints": {id: state}}``."""
    return dict(control(ready, "GET", "/chargepoints"))


def transactions(ready: Ready) -> list[dict[str, Any]]:
    return list(control(ready, "GET", "/transactions")["transactions"])


def configure(ready: Ready, **changes: Any) -> dict[str, Any]:
    """POST /config (boot_status, boot_interval, rtt_ms, authorize, refuse_for)."""
    return dict(control(ready, "POST", "/config", changes))


def disconnect(ready: Ready, cp: str, *, abort: bool = False, code: int = 1001) -> None:
    """Drop the charge point's connection (``abort``: no closing handshake)."""
    control(ready, "POST", "/disconnect", {"cp": cp, "abort": abort, "code": code})


def call(
    ready: Ready,
    cp: str,
    action: str,
    payload: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
    *,
    validate: bool = True,
) -> dict[str, Any]:
    """Send a CS->CP CALL; the outcome.

    ``{"kind": "result", "result": {...}}``, ``{"kind": "error", "error": {"code",
    "description", "details"}}``, ``{"kind": "timeout"}`` or ``{"kind":
    "invalid_response", "result", "violation"}``. A request the central system
    refuses to send (unknown action, schema violation, not connected) raises
    ``CsmsError``.
    """
    body = {
        "cp": cp,
        "action": action,
        "payload": dict(payload or {}),
        "timeout": timeout,
        "validate": validate,
    }
    status, reply = request(ready, "POST", "/call", body, timeout=timeout + 10)
    if status not in (200, 504):
        raise CsmsError(status, reply)
    return dict(reply)


def call_result(
    ready: Ready, cp: str, action: str, payload: Mapping[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """``call()`` that must end in a CALLRESULT; its payload."""
    outcome = call(ready, cp, action, payload, **kw)
    if outcome["kind"] != "result":
        raise AssertionError(f"{action} to {cp}: {outcome}")
    return dict(outcome["result"])


def messages(
    ready: Ready, cp: str | None = None, since: int = 0, action: str | None = None
) -> list[dict[str, Any]]:
    """Received frames (with ``seq`` > ``since``), oldest first."""
    query = {k: v for k, v in {"cp": cp, "since": since, "action": action}.items() if v}
    return list(control(ready, "GET", "/messages?" + urlencode(query))["messages"])


def wait_for(
    ready: Ready,
    cp: str | None,
    action: str,
    within: float = 10.0,
    *,
    since: int = 0,
    where: Callable[[dict[str, Any]], bool] | None = None,
    poll: float = 0.02,
) -> dict[str, Any]:
    """The first CALL ``action`` from ``cp`` after ``since`` (matching ``where``).

    Waits for its response too (the record's ``response`` field), so a caller
    sees what the charge point was answered. TimeoutError after ``within`` s.
    """
    deadline = time.monotonic() + within
    while True:
        for message in messages(ready, cp, since, action):
            if message.get("type") == "CALL" and (where is None or where(message)):
                if "response" in message:
                    return message
                break
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no answered {action} from {cp} within {within} s")
        time.sleep(poll)


def wait_connected(
    ready: Ready, cp: str, within: float = 10.0, *, connections: int = 1, poll: float = 0.02
) -> dict[str, Any]:
    """Wait until ``cp`` is connected with at least ``connections`` connections so far."""
    deadline = time.monotonic() + within
    while True:
        state = chargepoints(ready)["chargepoints"].get(cp)
        if state is not None and state["connected"] and state["connections"] >= connections:
            return dict(state)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{cp} not connected ({connections}) within {within} s: {state}")
        time.sleep(poll)
