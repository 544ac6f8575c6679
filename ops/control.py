"""The running station's local control socket: HTTP + JSON on a Unix socket.

``evse status`` reads it; installers and the bench drive the station through
it (present a tag, stop, availability, reset a latched fault). Only local
users with access to the socket file (mode 0660) reach it.

* ``GET /status``: the station's state (``Station.view``, with ``recovered``: what
  the last start ended as PowerLoss), bus counters, ``queue`` (``pending`` and
  ``dead_letters`` counts, null where they could not be counted within
  ``COUNT_TIMEOUT``), ``transfers`` (ops/progress.py) and the firmware ``version``;
* ``GET /transactions?limit=N``: the latest transactions, newest first (N 1..1000,
  default 20), each with its ``energy_wh`` (to its end, or to the last reading on
  disk while it runs);
* ``POST /authorize`` ``{"id_tag": "04A2B3C4"}``: the authorization result;
* ``POST /stop`` ``{"reason": "Local"}`` (optional): ``{"stopped": bool}``;
* ``POST /availability`` ``{"operative": bool}``: ``{"status": "Accepted"|"Scheduled"}``;
* ``POST /reset-faults``: clears latched faults; the status after it.
* ``GET /config`` (every setting) or ``GET /config?key=NAME``; ``POST /config``
  ``{"key": NAME, "value": TEXT}`` or ``{"values": {NAME: TEXT, ...}}`` (all or
  nothing): the same registry, validation and storage as OCPP
  ChangeConfiguration, by OCPP name or installer name;
* ``GET /queue``: transaction messages waiting, and the dead letters.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import trio

from evse.auth import normalize_id_tag
from evse.connector import StopReason
from evse.station import Station
from evse.supervisor import Service, Supervisor
from ocpp16.config import Configuration
from ocpp16.queue import TransactionQueue
from ops import httpjson, settings_view
from ops.config import Config
from ops.httpjson import HTTPError, Request, Router
from ops.progress import Transfers

STARTED = time.monotonic()
#: ``GET /status`` counts the queue in a worker thread; a store held by a slow fsync
#: must not hold the answer (``evse status --watch`` asks every second).
COUNT_TIMEOUT = 1.0


def firmware_version() -> str:
    """The installed distribution's version, for the status view."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("evse-firmware")
    except PackageNotFoundError:
        return "unknown"


def _station(supervisor: Supervisor) -> Station:
    station = supervisor.station
    if station is None:
        raise HTTPError(503, "the station is starting")
    return station


def build_router(
    supervisor: Supervisor,
    registry: Configuration | None = None,
    queue: TransactionQueue | None = None,
    transfers: Transfers | None = None,
    config: Config | None = None,
) -> Router:
    router = Router()
    running = firmware_version()

    async def queue_counts() -> dict[str, int | None]:
        counts: dict[str, int | None] = {"pending": None, "dead_letters": None}
        if queue is None:
            return counts
        with trio.move_on_after(COUNT_TIMEOUT):
            counts["pending"] = await trio.to_thread.run_sync(
                queue.pending_count, abandon_on_cancel=True
            )
            # Counted up to the listing's own cap: "1000" then reads "1000 or more".
            dead = await trio.to_thread.run_sync(queue.dead_letters, abandon_on_cancel=True)
            counts["dead_letters"] = len(dead)
        return counts

    async def status(req: Request) -> Any:
        station = _station(supervisor)
        view = station.view()
        board = supervisor.board
        view["uptime_s"] = round(time.monotonic() - STARTED, 1)
        if board is not None:
            view["bus"] = {"board": asdict(board.master.stats)}
        view["recovered_transactions"] = [r.id for r in station.recovered]
        reader = supervisor.reader
        view["rfid_reader"] = (
            None
            if reader is None
            else {"status": reader.state.status.value, "reason": reader.state.reason}
        )
        view["queue"] = await queue_counts()
        view["transfers"] = [] if transfers is None else transfers.snapshot()
        view["version"] = running
        return view

    async def transactions(req: Request) -> Any:
        station = _station(supervisor)
        try:
            limit = int(req.query.get("limit", "20"))
        except ValueError:
            raise HTTPError(400, "limit must be a whole number") from None
        if not 1 <= limit <= 1000:
            raise HTTPError(400, f"limit {limit} is outside 1..1000")
        records = await trio.to_thread.run_sync(lambda: station.store.transactions(limit=limit))
        return {
            "transactions": [
                {
                    "id": r.id,
                    "id_tag": r.id_tag,
                    "started_at": r.started_at.isoformat().replace("+00:00", "Z"),
                    "meter_start_wh": r.meter_start_wh,
                    "stopped_at": r.stopped_at.isoformat().replace("+00:00", "Z")
                    if r.stopped_at
                    else None,
                    "meter_stop_wh": r.meter_stop_wh,
                    "last_meter_wh": r.last_meter_wh,
                    "energy_wh": (
                        r.meter_stop_wh if r.meter_stop_wh is not None else r.last_meter_wh
                    )
                    - r.meter_start_wh,
                    "stop_reason": r.stop_reason,
                }
                for r in records
            ]
        }

    def body(req: Request) -> dict[str, Any]:
        if req.body is None:
            return {}
        if not isinstance(req.body, dict):
            raise HTTPError(400, "body must be a JSON object")
        return req.body

    async def authorize(req: Request) -> Any:
        raw = body(req).get("id_tag")
        if not isinstance(raw, str):
            raise HTTPError(400, "id_tag (a string) is required")
        try:
            id_tag = normalize_id_tag(raw)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        result = await _station(supervisor).present_id_tag(id_tag, source="local control")
        return {"id_tag": result.id_tag, "status": result.status.value, "source": result.source}

    async def stop(req: Request) -> Any:
        raw = body(req).get("reason", "Local")
        try:
            reason = StopReason(raw)
        except ValueError:
            known = ", ".join(r.value for r in StopReason)
            raise HTTPError(400, f"reason {raw!r} is not one of {known}") from None
        return {"stopped": await _station(supervisor).request_stop(reason)}

    async def availability(req: Request) -> Any:
        operative = body(req).get("operative")
        if not isinstance(operative, bool):
            raise HTTPError(400, "operative (true or false) is required")
        return {"status": await _station(supervisor).set_availability(operative)}

    async def reset_faults(req: Request) -> Any:
        station = _station(supervisor)
        await station.reset_faults()
        return station.view()

    def need_registry() -> Configuration:
        if registry is None:
            raise HTTPError(503, "no configuration registry")
        return registry

    async def get_config(req: Request) -> Any:
        reg = need_registry()
        name = req.query.get("key")
        if name is None:
            return settings_view.listing(reg, config)  # rows + settings + ocpp
        try:
            return settings_view.lookup(reg, config, name)
        except ValueError as exc:  # UnknownSetting, FileNeeded
            raise HTTPError(404, str(exc)) from None

    async def set_config(req: Request) -> Any:
        reg = need_registry()
        data = body(req)
        if "values" in data:
            values = data["values"]
            if not isinstance(values, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in values.items()
            ):
                raise HTTPError(400, "values must map setting names to strings")
            result = await reg.change_many_async(values, source="installer")
        else:
            key, value = data.get("key"), data.get("value")
            if not isinstance(key, str) or not isinstance(value, str):
                raise HTTPError(400, "key and value (strings) are required")
            try:
                return await settings_view.change_async(reg, config, key, value, source="installer")
            except settings_view.UnknownSetting as exc:
                return {"status": "NotSupported", "key": key, "reason": str(exc), "note": ""}
        return {"status": result.status, "reason": result.reason}

    async def get_queue(req: Request) -> Any:
        if queue is None:
            raise HTTPError(503, "no transaction queue")
        pending = await trio.to_thread.run_sync(queue.pending)
        dead = await trio.to_thread.run_sync(queue.dead_letters)
        return {
            "pending": [
                {
                    "seq": m.seq,
                    "action": m.action,
                    "transaction": m.local_tx_id,
                    "attempts": m.attempts,
                    "last_error": m.last_error,
                }
                for m in pending
            ],
            "dead_letters": [
                {
                    "seq": d.seq,
                    "action": d.action,
                    "transaction": d.local_tx_id,
                    "attempts": d.attempts,
                    "reason": d.reason,
                    "died_at": d.died_at.isoformat().replace("+00:00", "Z"),
                    "payload": d.payload,
                }
                for d in dead
            ],
        }

    router.add("GET", "/config", get_config)
    router.add("POST", "/config", set_config)
    router.add("GET", "/queue", get_queue)
    router.add("GET", "/status", status)
    router.add("GET", "/transactions", transactions)
    router.add("POST", "/authorize", authorize)
    router.add("POST", "/stop", stop)
    router.add("POST", "/availability", availability)
    router.add("POST", "/reset-faults", reset_faults)
    return router


def control_service(
    path: str,
    registry: Configuration | None = None,
    queue: TransactionQueue | None = None,
    transfers: Transfers | None = None,
    config: Config | None = None,
) -> Service:
    async def run(supervisor: Supervisor) -> None:
        await supervisor.started.wait()
        router = build_router(supervisor, registry, queue, transfers, config)
        await httpjson.serve_unix(router, path)

    return Service("control socket", run)


async def query(path: str, method: str, resource: str, body: dict[str, Any] | None = None) -> Any:
    """Ask a running station (``evse status`` and friends)."""
    return await httpjson.request_json("localhost", 0, method, resource, body, unix_socket=path)
