"""A station with its web page, for the web tests: ``web_rig``.

The station of tests/station_harness.py (a real supervisor on the in-process
simulator, real sockets and SQLite), the registry and queue opened on its
file as ops/run.py does, and the page served on a free loopback port: by
``web_service`` through the supervisor (the way ``evse run`` runs it), or by
``serve_web`` directly when a test brings its own rate limiter or plot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from evse.store import Store
from ocpp16.config import Configuration
from ocpp16.queue import TransactionQueue
from ops.web.auth import LoginLimiter, set_password
from ops.web.monitor import PowerPlot
from ops.web.server import WebSettings, serve_web, web_service
from tests.station_harness import Rig, station_rig
from tests.web_client import WebClient

PASSWORD = "correct horse battery"


@dataclass
class WebRig:
    rig: Rig
    url: str
    registry: Configuration
    queue: TransactionQueue
    data_dir: Path

    def client(self) -> WebClient:
        return WebClient(self.url)

    async def installer(self) -> WebClient:
        client = self.client()
        reply = await client.login(PASSWORD)
        assert reply.status == 303, reply.text
        return client


@asynccontextmanager
async def web_rig(
    tmp_path: Path,
    *,
    limiter: LoginLimiter | None = None,
    plot: PowerPlot | None = None,
    password: str | None = PASSWORD,
) -> AsyncIterator[WebRig]:
    if password is not None:
        set_password(tmp_path, password)
    path = tmp_path / "station.sqlite"
    store = Store.open(path)
    registry = Configuration(store)
    queue = TransactionQueue.open(path)
    urls: list[str] = []
    ready = trio.Event()

    def on_ready(url: str) -> None:
        urls.append(url)
        ready.set()

    settings = WebSettings(port=0)
    services = []
    direct = limiter is not None or plot is not None
    if not direct:
        # The way the station runs it: a supervisor service.
        services.append(
            web_service(
                settings, registry=registry, queue=queue, data_dir=tmp_path, on_ready=on_ready
            )
        )
    try:
        async with station_rig(tmp_path, services=services) as rig:
            if direct:
                url = await rig.nursery.start(
                    partial(
                        serve_web,
                        settings,
                        supervisor=rig.supervisor,
                        registry=registry,
                        queue=queue,
                        data_dir=tmp_path,
                        limiter=limiter,
                        plot=plot,
                    )
                )
                on_ready(url)
            with trio.fail_after(10):
                await ready.wait()
            yield WebRig(rig, urls[0], registry, queue, tmp_path)
    finally:
        queue.close()
        store.close()
