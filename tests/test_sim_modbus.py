"""The simulator over real Modbus: our drivers, pymodbus's own client, the control API."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from pymodbus.client import ModbusSerialClient, ModbusTcpClient

from fieldbus.boards import BOARD_MODELS, Bit, Board, BoardFault, PilotState
from fieldbus.errors import ExceptionReply, ModbusTimeout
from fieldbus.master import ModbusMaster
from fieldbus.meters import METER_MODELS, Meter
from fieldbus.ports import RtuPort, TcpPort, parse_port
from fieldbus.registers import Field, Table
from ops.httpjson import HTTPError, request_json
from ops.sim.app import DeviceSpec, Endpoints, SimConfig, Simulator
from ops.sim.devices import BoardSim
from ops.sim.model import FAULTS, Station


async def start(nursery: trio.Nursery, *devices: str) -> tuple[Simulator, Endpoints]:
    specs = [DeviceSpec.parse(d) for d in devices] or None
    sim = Simulator(SimConfig(devices=specs) if specs else SimConfig())
    endpoints: Endpoints = await nursery.start(sim.run)
    return sim, endpoints


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Simulator, Endpoints]]:
    async with trio.open_nursery() as nursery:
        yield await start(nursery, "evse-din:1", "sdm630:2", "sdm120:3")
        nursery.cancel_scope.cancel()


async def control(endpoints: Endpoints, method: str, path: str, body: Any = None) -> Any:
    assert endpoints.control is not None
    url = urlsplit(endpoints.control)
    assert url.hostname is not None and url.port is not None
    return await request_json(url.hostname, url.port, method, path, body)


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_board_follows_the_firmware_writes_and_records_them(
    sim: tuple[Simulator, Endpoints], transport: str
) -> None:
    simulator, endpoints = sim
    port = endpoints.tcp if transport == "tcp" else endpoints.rtu
    assert port is not None
    async with ModbusMaster.for_port(port, timeout=0.5) as master:
        board = Board(master, 1, BOARD_MODELS["evse-din"])
        meter = Meter(master, 2, METER_MODELS["sdm630"])
        simulator.set_ev({"plugged": True, "phases": 3, "max_current": 32.0})
        assert (await board.read_status()).pilot is PilotState.B
        t_before = trio.current_time()
        await board.set_current(16)
        status = await board.read_status()
        assert status.pilot is PilotState.C
        assert status.offered_a == 16
        reading = await meter.read()
        assert reading.current == pytest.approx((16.0, 16.0, 16.0))
        await board.set_current(0)
        assert (await board.read_status()).pilot is PilotState.B
        assert (await meter.read()).power_total == 0.0
    writes = [e for e in simulator.events if e["event"] == "write"]
    assert [w["fields"]["command"] for w in writes] == [16.0, 0.0]
    assert all(w["address"] == 1000 and w["unit"] == 1 for w in writes)
    assert writes[0]["t"] >= t_before


async def test_silent_units_time_out_and_come_back(sim: tuple[Simulator, Endpoints]) -> None:
    simulator, endpoints = sim
    assert endpoints.tcp is not None
    async with ModbusMaster.for_port(endpoints.tcp, timeout=0.1, retries=0) as master:
        board = Board(master, 1, BOARD_MODELS["evse-din"])
        meter = Meter(master, 2, METER_MODELS["sdm630"])
        simulator.set_fault("board_silent", True)
        with pytest.raises(ModbusTimeout):
            await board.read_status()
        await meter.read()  # the meter still answers on the same bus
        simulator.set_fault("meter_silent", True)
        with pytest.raises(ModbusTimeout):
            await meter.read()
        simulator.clear_faults()
        await board.read_status()
        await meter.read()


async def test_rcd_trip_pilot_error_and_welded_contactor(sim: tuple[Simulator, Endpoints]) -> None:
    simulator, endpoints = sim
    assert endpoints.tcp is not None
    async with ModbusMaster.for_port(endpoints.tcp, timeout=0.5) as master:
        board = Board(master, 1, BOARD_MODELS["evse-din"])
        simulator.set_ev({"plugged": True})
        await board.set_current(16)
        status = await board.read_status()
        assert status.relay_on is True
        assert status.contactor_closed is None  # no feedback on this board
        simulator.set_fault("rcd_trip", True)
        status = await board.read_status()
        assert BoardFault.RCD_TRIP in status.faults
        assert status.relay_on is False
        assert simulator.station.contactor_closed is False
        simulator.clear_faults()
        simulator.set_fault("pilot_error", True, {"state": "F"})
        status = await board.read_status()
        assert status.pilot is PilotState.F
        simulator.clear_faults()
        simulator.set_fault("welded", True)
        await board.set_current(0)
        assert simulator.station.contactor_closed is True


async def test_din_relay_bit_reads_off_while_welded_contacts_carry_current(
    sim: tuple[Simulator, Endpoints],
) -> None:
    # Issue 7: the simulator wrote the physical contactor state into 1007 b0,
    # so a welded contactor "reported" itself through a bit the real board
    # drives from its own command.
    simulator, endpoints = sim
    assert endpoints.tcp is not None
    async with ModbusMaster.for_port(endpoints.tcp, timeout=0.5) as master:
        board = Board(master, 1, BOARD_MODELS["evse-din"])
        meter = Meter(master, 2, METER_MODELS["sdm630"])
        simulator.set_ev({"plugged": True, "phases": 3, "max_current": 16.0})
        await board.set_current(16)
        assert (await board.read_status()).relay_on is True
        simulator.set_fault("welded", True)
        await board.set_current(0)
        status = await board.read_status()
        assert status.relay_on is False
        assert status.contactor_closed is None
        words = await master.read_holding_registers(1, 1007, 1)
        assert words[0] & 1 == 0
        # The contacts are still closed and the EV still draws: only the meter shows it.
        assert simulator.station.contactor_closed is True
        reading = await meter.read()
        assert reading.current == pytest.approx((16.0, 16.0, 16.0))
        simulator.set_fault("welded", False)
        assert (await meter.read()).current == pytest.approx((0.0, 0.0, 0.0))


def test_only_an_auxiliary_contact_reports_the_contacts() -> None:
    # A board model that did read an auxiliary contact (here on 1008, next to
    # the EVSE DIN's drive bit) is served the physical contacts, the drive bit
    # the drive: with welded contacts the two disagree.
    aux = Bit(Field(Table.HOLDING, 1008))
    model = replace(BOARD_MODELS["evse-din"], kind="aux-test", contactor=aux)
    station = Station()
    device = BoardSim(model, 1, station, record=lambda event: None)
    station.ev.plugged = True
    station.board.command = 16
    device.refresh()
    assert device.store.get(Table.HOLDING, 1007, 2) == [1, 1]  # driven, closed
    station.faults.welded = True
    station.board.command = 0
    device.refresh()
    assert device.store.get(Table.HOLDING, 1007, 2) == [0, 1]  # drive off, still closed
    # The real EVSE DIN table has no such input: nothing shows the contacts.
    din = BoardSim(BOARD_MODELS["evse-din"], 1, station, record=lambda event: None)
    din.refresh()
    assert din.store.get(Table.HOLDING, 1007, 1) == [0]
    assert BOARD_MODELS["evse-din"].contactor is None


async def test_overdraw_shows_on_the_meter(sim: tuple[Simulator, Endpoints]) -> None:
    simulator, endpoints = sim
    assert endpoints.tcp is not None
    async with ModbusMaster.for_port(endpoints.tcp, timeout=0.5) as master:
        simulator.set_ev({"plugged": True, "phases": 1})
        await Board(master, 1, BOARD_MODELS["evse-din"]).set_current(10)
        simulator.set_fault("overdraw", True, {"amps": 3})
        reading = await Meter(master, 3, METER_MODELS["sdm120"]).read()
        assert reading.current[0] == pytest.approx(13.0)
        assert reading.current[1] is None


async def test_board_refuses_out_of_range_current_like_a_device(
    sim: tuple[Simulator, Endpoints],
) -> None:
    _, endpoints = sim
    assert endpoints.tcp is not None
    async with ModbusMaster.for_port(endpoints.tcp, timeout=0.5) as master:
        with pytest.raises(ExceptionReply) as exc_info:
            await master.write_registers(1, 1000, [3])
        assert exc_info.value.code == 3
        # A register that is read-only on the device.
        with pytest.raises(ExceptionReply) as exc_info:
            await master.write_registers(1, 1002, [1])
        assert exc_info.value.code == 2


async def test_heidelberg_failsafe_trips_when_the_bus_goes_quiet() -> None:
    async with trio.open_nursery() as nursery:
        simulator, endpoints = await start(nursery, "heidelberg:1")
        assert endpoints.tcp is not None
        async with ModbusMaster.for_port(endpoints.tcp, timeout=0.5) as master:
            board = Board(master, 1, BOARD_MODELS["heidelberg"])
            simulator.set_ev({"plugged": True})
            await board.initialize()
            await board.set_current(16)
            await board.arm_failsafe(0.2, 6)
            assert simulator.station.offered == 16
            await trio.sleep(0.35)
            simulator.station.advance(simulator.now())
            assert simulator.station.board.failsafe_tripped
            assert simulator.station.offered == 6
            # The next request feeds the watchdog again.
            await board.read_status()
            assert simulator.station.offered == 16
        nursery.cancel_scope.cancel()


def _pymodbus_read(port: str, unit: int, address: int, count: int) -> list[int]:
    spec = parse_port(port)
    client: ModbusTcpClient | ModbusSerialClient
    if isinstance(spec, TcpPort):
        client = ModbusTcpClient(spec.host, port=spec.port, timeout=2)
    else:
        assert isinstance(spec, RtuPort)
        client = ModbusSerialClient(spec.device, baudrate=spec.baud, timeout=2)
    assert client.connect()
    try:
        result = client.read_input_registers(address, count=count, device_id=unit)
        assert not result.isError(), result
        return list(result.registers)
    finally:
        client.close()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_simulator_answers_pymodbus_own_client(
    sim: tuple[Simulator, Endpoints], transport: str
) -> None:
    simulator, endpoints = sim
    port = endpoints.tcp if transport == "tcp" else endpoints.rtu
    assert port is not None
    simulator.station.energy_wh = 12_345.0
    # SDM630 import energy: float32 kWh at input register 0x0048, high word first.
    words = await trio.to_thread.run_sync(_pymodbus_read, port, 2, 0x0048, 2)
    (kwh,) = struct.unpack(">f", struct.pack(">HH", *words))
    assert kwh == pytest.approx(12.345)
    words = await trio.to_thread.run_sync(_pymodbus_read, port, 2, 0x0000, 2)
    assert struct.unpack(">f", struct.pack(">HH", *words))[0] == pytest.approx(230.0)


async def test_control_interface(sim: tuple[Simulator, Endpoints]) -> None:
    simulator, endpoints = sim
    state = await control(endpoints, "POST", "/plug", {"phases": 1})
    assert state["ev"]["plugged"] is True and state["ev"]["phases"] == 1
    state = await control(endpoints, "POST", "/ev", {"wants": "B", "max_current": 10})
    assert state["ev"]["wants"] == "B"
    state = await control(endpoints, "POST", "/faults/pilot_error", {"state": "E"})
    assert state["pilot"] == "E"
    state = await control(endpoints, "DELETE", "/faults/pilot_error")
    assert state["faults"]["pilot_error"] is None
    await control(endpoints, "POST", "/faults/overdraw", {"amps": 2})
    state = await control(endpoints, "DELETE", "/faults")
    assert state["faults"]["overdraw"] == 0.0
    state = await control(endpoints, "POST", "/unplug")
    assert state["ev"]["plugged"] is False and state["pilot"] == "A"
    full = await control(endpoints, "GET", "/state")
    assert full["endpoints"]["tcp"] == endpoints.tcp
    kinds = [e["event"] for e in full["events"]]
    # DELETE /faults clears every fault kind, one event each.
    assert kinds == ["ev", "ev", "fault", "fault", "fault", *["fault"] * len(FAULTS), "ev"]
    since = full["events"][-2]["seq"]
    tail = await control(endpoints, "GET", f"/events?since={since}")
    assert [e["seq"] for e in tail["events"]] == [since + 1]
    assert simulator.station.ev.plugged is False


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "/ev", {"wants": "X"}, 400, "'X'"),
        ("POST", "/ev", {"phases": 2}, 400, "phases"),
        ("POST", "/ev", {"colour": "red"}, 400, "'colour'"),
        ("POST", "/ev", {"plugged": "yes"}, 400, "'plugged'"),
        ("POST", "/ev", [1, 2], 400, "JSON object"),
        ("POST", "/faults/meteor", None, 400, "'meteor'"),
        ("POST", "/faults/pilot_error", {"state": "C"}, 400, "'C'"),
        ("POST", "/faults/overdraw", {"amps": "lots"}, 400, "'lots'"),
        ("GET", "/nowhere", None, 404, "/nowhere"),
        ("DELETE", "/state", None, 405, "DELETE"),
        ("GET", "/events?since=x", None, 400, "since"),
    ],
)
async def test_control_interface_refuses_bad_requests(
    sim: tuple[Simulator, Endpoints],
    method: str,
    path: str,
    body: Any,
    status: int,
    needle: str,
) -> None:
    _, endpoints = sim
    with pytest.raises(HTTPError) as exc_info:
        await control(endpoints, method, path, body)
    assert exc_info.value.status == status
    assert needle in exc_info.value.message


async def test_control_interface_survives_garbage(sim: tuple[Simulator, Endpoints]) -> None:
    _, endpoints = sim
    assert endpoints.control is not None
    url = urlsplit(endpoints.control)
    assert url.hostname is not None and url.port is not None
    for garbage in (
        b"\x00\xff garbage\r\n\r\n",
        b"POST /ev HTTP/1.1\r\ncontent-length: 3\r\n\r\n{x}",
    ):
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        async with stream:
            await stream.send_all(garbage)
            reply = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(4096):
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 400")
    # Still serving.
    assert (await control(endpoints, "GET", "/state"))["requests"] >= 0
