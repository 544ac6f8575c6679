"""``/metrics``: the station in the Prometheus text format, with prometheus-client.

One ``CollectorRegistry`` of our own (never the library's global one, which
would also export this process's Python internals and any other code's
metrics) holding one custom ``Collector`` that reads the station when it is
scraped: there is nothing to keep up to date between scrapes, and a scrape
always shows the station as it is. What lives on disk (queue depth, dead
letters) is read by the web service's sampler off the trio thread and only
picked up here, so a scrape never waits on SQLite.

Names follow the Prometheus conventions: base units in the name (``_watts``,
``_amperes``, ``_watt_hours``), ``_total`` for counters, states as a labelled
0/1 gauge so that every state is present (an absent series would look like a
gap, not a 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from evse.connector import Status
from ocpp16.status import LinkState
from ops.web.monitor import WebState

#: The central-system link states, plus the station without one (standalone).
LINK_STATES = ("not configured", *(s.value for s in LinkState))

#: BusStats fields that count something going wrong on a bus.
BUS_ERRORS = (
    "timeouts",
    "frame_errors",
    "exception_replies",
    "disconnects",
    "retries",
    "stale_discarded",
)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class StationCollector(Collector):
    """Reads the station at scrape time (``WebState.view`` and the bus counters)."""

    def __init__(self, state: WebState) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        state = self._state
        view = state.view()
        yield InfoMetricFamily(
            "evse_firmware", "Firmware version.", value={"version": state.version}
        )
        up = GaugeMetricFamily("evse_station_up", "1 once the station runs (0 while it starts).")
        up.add_metric([], 0.0 if view is None else 1.0)
        yield up
        yield from self._station(view or {})
        yield from self._central((view or {}).get("central_system"))
        yield from self._queue()
        yield from self._buses()
        yield from self._faults(view or {})

    def _station(self, view: dict[str, Any]) -> Iterable[Metric]:
        connector = str(view.get("connector", 1))
        for name, doc, key in (
            ("evse_power_watts", "Active power drawn, all phases (meter).", "power_w"),
            ("evse_offered_current_amperes", "Current offered to the EV now.", "offered_a"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["connector"])
            value = _number(view.get(key))
            if value is not None:
                g.add_metric([connector], value)
            yield g
        energy = GaugeMetricFamily(
            "evse_energy_import_watt_hours",
            "Imported energy register of the meter.",
            labels=["connector"],
        )
        value = _number(view.get("energy_wh"))
        if value is not None:
            energy.add_metric([connector], value)
        yield energy
        limit = view.get("limit") or {}
        g = GaugeMetricFamily(
            "evse_limit_amperes",
            "The lowest of the limits in force, and what bounds it.",
            labels=["connector", "bound_by"],
        )
        amps = _number(limit.get("amps"))
        if amps is not None:
            g.add_metric([connector, str(limit.get("bound_by", ""))], amps)
        yield g
        status = GaugeMetricFamily(
            "evse_connector_status",
            "Connector status (OCPP 1.6 ChargePointStatus): 1 for the current one.",
            labels=["connector", "status"],
        )
        if view:
            current = view.get("status")
            for s in Status:
                status.add_metric([connector, s.value], 1.0 if s.value == current else 0.0)
        yield status
        tx = view.get("transaction")
        g = GaugeMetricFamily(
            "evse_transaction_energy_watt_hours",
            "Energy of the running transaction (absent when none runs).",
            labels=["connector", "transaction"],
        )
        if isinstance(tx, dict) and _number(tx.get("energy_wh")) is not None:
            g.add_metric([connector, str(tx.get("id"))], float(tx["energy_wh"]))
        yield g

    def _central(self, central: object) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "evse_central_system_state",
            "Connection to the central system: 1 for the current state.",
            labels=["state"],
        )
        registered = GaugeMetricFamily(
            "evse_central_system_registered",
            "1 when the central system accepted the BootNotification.",
        )
        if isinstance(central, dict):
            link = central.get("link")
            current = "not configured" if link is None else str(link)
            for name in LINK_STATES:
                g.add_metric([name], 1.0 if name == current else 0.0)
            registered.add_metric([], 1.0 if central.get("registration") == "registered" else 0.0)
        yield g
        yield registered

    def _queue(self) -> Iterable[Metric]:
        state = self._state
        for name, doc, value in (
            ("evse_queue_depth", "Transaction messages waiting to be sent.", state.queue_depth),
            ("evse_dead_letters", "Transaction messages given up on.", state.dead_letters),
        ):
            g = GaugeMetricFamily(name, doc)
            if value is not None:
                g.add_metric([], float(value))
            yield g

    def _buses(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "evse_bus_requests", "Modbus requests sent, per device.", labels=["device", "bus"]
        )
        errors = CounterMetricFamily(
            "evse_bus_errors",
            "Modbus errors per device and kind. A board and a meter on one line share its "
            "counters (the same bus label).",
            labels=["device", "bus", "kind"],
        )
        for device, bus, stats in self._devices():
            requests.add_metric([device, bus], float(stats.requests))
            for kind in BUS_ERRORS:
                errors.add_metric([device, bus, kind], float(getattr(stats, kind)))
        yield requests
        yield errors

    def _devices(self) -> list[tuple[str, str, Any]]:
        station = self._state.supervisor.station
        if station is None:
            return []
        found = []
        for device, driver in (("board", station.board), ("meter", station.meter)):
            master = getattr(driver, "master", None)
            if master is not None:
                found.append((device, str(master.where), master.stats))
        return found

    def _faults(self, view: dict[str, Any]) -> Iterable[Metric]:
        log = self._state.faults
        # The view of this scrape is a look like the sampler's: a fault raised since
        # its last look counts now, not up to a second later.
        if log.update(view.get("faults") or {}, datetime.now(UTC)):
            self._state.news.bump()
        raised = CounterMetricFamily(
            "evse_faults", "Faults raised since the start, per fault.", labels=["fault"]
        )
        for name, count in sorted(log.counts.items()):
            raised.add_metric([name], float(count))
        yield raised
        active = GaugeMetricFamily(
            "evse_fault_active", "1 while a fault is active.", labels=["fault"]
        )
        for name in sorted(set(log.counts) | set(view.get("faults") or {})):
            active.add_metric([name], 1.0 if name in (view.get("faults") or {}) else 0.0)
        yield active


def metrics_registry(state: WebState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StationCollector(state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (version 0.0.4) of everything in ``registry``."""
    return generate_latest(registry)
