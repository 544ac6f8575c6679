"""The web page inside the station: hypercorn's trio worker, the sampler, the service.

::

    web page                      (a supervisor service: isolated, restarted on failure)
    └── serve_web
        ├── web sampler           every SAMPLE_INTERVAL (IDLE_SAMPLE_INTERVAL when no
        │                         page is open): the station's view -> status
        │                         fields, fault ring, plot ring, counts (SQLite in a
        │                         worker thread), transaction list; wakes the streams
        └── hypercorn.trio.serve  the ASGI app (ops/web/app.py); one task per
                                  connection, each event stream a task

The web page must never take charging down: ``web_service`` runs it in a loop
that logs a failure (a port in use, a bad TLS file, a bug) and tries again
with back-off, the way the supervisor's central-system slot does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, cast

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from evse.errors import EvseError, find_in_group
from evse.supervisor import Service, Supervisor
from ocpp16.config import Configuration
from ocpp16.errors import OcppError
from ocpp16.queue import TransactionQueue
from ops.web import pages
from ops.web.app import WebApp
from ops.web.auth import LoginLimiter, Sessions, load_secret
from ops.web.errors import WebError, WebServerError
from ops.web.monitor import PowerPlot, WebState, point_from_view

log = logging.getLogger(__name__)

#: How often the sampler looks at the station (s): a change reaches the page
#: within this plus the network.
SAMPLE_INTERVAL: Final = 0.2
#: With no page open (no event stream), the sampler looks once a second: each
#: look builds the station's view and its texts, and five a second cost the
#: station 0.4 % of a core for nobody (bench/footprint.py, the _web results).
#: The plot keeps its own interval either way.
IDLE_SAMPLE_INTERVAL: Final = 1.0
#: One plot point every this many seconds (720 points an hour).
PLOT_INTERVAL: Final = 5.0
#: Queue depth and dead letters are read from SQLite this often (s).
COUNT_INTERVAL: Final = 2.0
#: The transaction list is read again at least this often (s), and at once
#: when the running transaction or the connector status changes.
TRANSACTIONS_INTERVAL: Final = 30.0
TRANSACTIONS_SHOWN: Final = 20
#: Back-off of the web service after a failure (s).
RESTART_MIN: Final = 1.0
RESTART_MAX: Final = 60.0

try:
    VERSION = importlib.metadata.version("evse-firmware")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
    VERSION = "0+unknown"


@dataclass(frozen=True)
class WebSettings:
    """Where and how the installer's page is served."""

    enabled: bool = True
    #: Localhost only unless told: the page is for the installer on site.
    host: str = "127.0.0.1"
    #: 0: any free port (the bound URL is reported through ``on_ready``).
    port: int = 8080
    #: PEM files; both set: HTTPS (and HSTS, Secure cookies). None: HTTP.
    certificate: Path | None = None
    key: Path | None = None
    #: How long an installer stays logged in (s).
    session_lifetime: float = 8 * 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"web port {self.port} is outside 0..65535")
        if (self.certificate is None) != (self.key is None):
            raise ValueError("HTTPS needs both a certificate and a key file")
        if not (math.isfinite(self.session_lifetime) and self.session_lifetime > 0):
            raise ValueError(f"session lifetime {self.session_lifetime} must be positive")

    @property
    def https(self) -> bool:
        return self.certificate is not None


def where(settings: WebSettings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.port}"


def bind_socket(settings: WebSettings) -> socket.socket:
    """The listening address, bound here: a port in use is one clear error.

    hypercorn would bind it too, but leaks its socket when the bind fails; a
    socket bound here is handed over by file descriptor (``fd://``), so there
    is no window in which another process could take the port either.
    """
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise WebServerError(
            f"the web server cannot listen on {where(settings)} ({exc.strerror or exc})"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise WebServerError(
            f"the web server cannot listen on {where(settings)} ({exc.strerror or exc})"
        ) from None
    return sock


def hypercorn_config(settings: WebSettings, sock: socket.socket | None = None) -> HypercornConfig:
    """hypercorn's configuration; ``sock`` (bound, not listening) is handed over to it."""
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}" if sock is not None else where(settings)]
    if settings.https:
        config.certfile = str(settings.certificate)
        config.keyfile = str(settings.key)
    config.accesslog = None
    # hypercorn's own lines ("Running on ...", protocol errors) join the station's log.
    config.errorlog = logging.getLogger("evse.web.hypercorn")
    config.include_server_header = False
    # Event streams are open for as long as a page is; a shutdown must not wait for them.
    config.graceful_timeout = 1.0
    return config


def _check_tls(settings: WebSettings) -> None:
    """Load the certificate and key once here, so a bad file is one clear line."""
    if not settings.https:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(settings.certificate), str(settings.key))
    except (OSError, ssl.SSLError) as exc:
        raise WebServerError(
            f"the web server cannot use certificate {settings.certificate} with key "
            f"{settings.key}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


async def serve_web(
    settings: WebSettings,
    *,
    supervisor: Supervisor | Any,
    registry: Configuration,
    queue: TransactionQueue | None,
    data_dir: Path,
    limiter: LoginLimiter | None = None,
    plot: PowerPlot | None = None,
    sample_interval: float = SAMPLE_INTERVAL,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the page until cancelled; ``task_status.started(url)`` once it listens.

    ``WebServerError`` when it cannot start (address in use, bad TLS files,
    the session secret unusable).
    """
    await trio.to_thread.run_sync(_check_tls, settings)
    try:
        secret = await trio.to_thread.run_sync(load_secret, Path(data_dir))
    except WebError as exc:
        raise WebServerError(str(exc)) from None
    state = WebState(supervisor=supervisor, version=VERSION, plot=plot or PowerPlot())
    app = WebApp(
        state,
        registry=registry,
        data_dir=Path(data_dir),
        sessions=Sessions(secret, settings.session_lifetime),
        secure=settings.https,
        limiter=limiter,
    )
    sampler = Sampler(state, queue)
    await sampler.sample()  # the first page load has values
    sock = await trio.to_thread.run_sync(bind_socket, settings)
    config = hypercorn_config(settings, sock)
    listening = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(sampler.run, sample_interval), name="web sampler")
            binds = await nursery.start(
                # hypercorn types its app as its own TypedDict-based ASGI protocol;
                # WebApp is that protocol over plain mappings.
                partial(hypercorn.trio.serve, cast(Any, app), config, mode="asgi"),
                name="web server",
            )
            listening = True
            url = str(binds[0])
            log.info("installer page on %s", url)
            task_status.started(url)
    except BaseException as exc:
        found = None if listening else find_in_group(exc, OSError)
        if found is None:
            raise
        raise WebServerError(
            f"the web server cannot listen on {where(settings)} ({found.strerror or found})"
        ) from None


class Sampler:
    """Looks at the station and updates ``WebState`` (the only writer of it)."""

    def __init__(self, state: WebState, queue: TransactionQueue | None) -> None:
        self.state = state
        self.queue = queue
        self._next_plot = -math.inf
        self._next_count = -math.inf
        self._next_transactions = -math.inf
        self._tx_key: tuple[object, object] | None = None
        self._count_failed = ""

    async def run(self, interval: float) -> None:
        while True:
            watched = self.state.watchers > 0
            await trio.sleep(interval if watched else max(interval, IDLE_SAMPLE_INTERVAL))
            await self.sample()

    async def sample(self) -> None:
        state = self.state
        now = trio.current_time()
        view = state.view()
        changed = False
        if view is not None and state.faults.update(view.get("faults") or {}, datetime.now(UTC)):
            changed = True
        if now >= self._next_count:
            self._next_count = now + COUNT_INTERVAL
            await self._count()
        fields = pages.status_fields(
            view, queue_depth=state.queue_depth, dead_letters=state.dead_letters
        )
        if fields != state.fields:
            state.fields = fields
            changed = True
        if now >= self._next_plot:
            interval = state.plot.interval
            self._next_plot = (
                now + interval
                if math.isinf(self._next_plot)
                else max(self._next_plot + interval, now)
            )
            state.plot.add(point_from_view(view, time.time()))
            changed = True
        tx = view.get("transaction") if view is not None else None
        tx_key = (tx.get("id") if isinstance(tx, dict) else None, view and view.get("status"))
        if tx_key != self._tx_key or now >= self._next_transactions:
            self._tx_key = tx_key
            self._next_transactions = now + TRANSACTIONS_INTERVAL
            if await self._transactions():
                changed = True
        if isinstance(tx, dict) and self._live_energy(tx):
            changed = True
        if changed:
            state.news.bump()

    async def _count(self) -> None:
        queue = self.queue
        if queue is None:
            return
        try:
            depth = await trio.to_thread.run_sync(queue.pending_count)
            dead = await trio.to_thread.run_sync(lambda: len(queue.dead_letters()))
        except OcppError as exc:
            if str(exc) != self._count_failed:
                log.warning("web page: queue not counted: %s", exc)
            self._count_failed = str(exc)
            return
        self._count_failed = ""
        self.state.queue_depth, self.state.dead_letters = depth, dead

    def _live_energy(self, tx: dict[str, Any]) -> bool:
        """The running transaction's row shows the energy of the view, not the last
        reading persisted (which lags by up to the persist interval)."""
        text = pages.fmt_energy(tx.get("energy_wh"))
        for row in self.state.transactions:
            if row[0] == str(tx.get("id")) and row[4] != text:
                row[4] = text
                self.state.transactions_version += 1
                return True
        return False

    async def _transactions(self) -> bool:
        station = self.state.supervisor.station
        if station is None:
            return False
        store = station.store
        try:
            records = await trio.to_thread.run_sync(
                lambda: store.transactions(limit=TRANSACTIONS_SHOWN)
            )
        except EvseError as exc:
            log.warning("web page: transactions not read: %s", exc)
            return False
        rows = pages.transaction_rows(records)
        if rows == self.state.transactions:
            return False
        self.state.transactions = rows
        self.state.transactions_version += 1
        return True


def web_service(
    settings: WebSettings,
    *,
    registry: Configuration,
    queue: TransactionQueue | None,
    data_dir: Path,
    on_ready: Callable[[str], None] | None = None,
) -> Service:
    """The installer's page as a supervisor service (``Plan.services``).

    ``on_ready(url)`` is called once the server listens (``http://127.0.0.1:PORT``;
    with port 0 the port it was given). A failure is logged and the page is
    tried again with back-off (1 s doubling to 60 s); charging goes on.
    """

    async def run(supervisor: Supervisor) -> None:
        if not settings.enabled:
            return
        delay = RESTART_MIN
        while True:
            started = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    url = await nursery.start(
                        partial(
                            serve_web,
                            settings,
                            supervisor=supervisor,
                            registry=registry,
                            queue=queue,
                            data_dir=data_dir,
                        )
                    )
                    if on_ready is not None:
                        on_ready(url)
                return
            except Exception as exc:
                problem = find_in_group(exc, WebServerError)
                if problem is not None:
                    log.error(
                        "installer page not served: %s; trying again in %.0f s", problem, delay
                    )
                else:
                    log.exception("installer page failed; restarting it in %.0f s", delay)
            if trio.current_time() - started > RESTART_MAX:
                delay = RESTART_MIN
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    return Service("web page", run)
