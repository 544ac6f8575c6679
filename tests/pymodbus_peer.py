"""pymodbus's own Modbus server, run as a subprocess, for testing our trio master against.

Run as a script::

    python tests/pymodbus_peer.py tcp                 # 127.0.0.1, a free port
    python tests/pymodbus_peer.py rtu /dev/pts/7      # RTU on a serial (pty) path

It serves two devices, unit ids 1 and 2, on the same port (two devices sharing
one line), with deterministic contents given by the ``*_value`` functions below
for addresses ``0 .. SIZE - 1``; anything beyond is an illegal data address.
When it is listening it prints one line, ``ready tcp <host> <port>`` or
``ready rtu <path>``, on stdout.

Imported by the tests, ``running_peer()`` starts the script and kills it again.
The server side is pymodbus's code, not ours: it is the independent peer the
master is checked against.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

UNITS = (1, 2)
#: Registers, coils and discrete inputs at protocol addresses 0 .. SIZE - 1.
SIZE = 200
READY_TIMEOUT = 15.0


def holding_value(unit: int, address: int) -> int:
    return (unit * 1000 + address) & 0xFFFF


def input_value(unit: int, address: int) -> int:
    return (unit * 1000 + 500 + address) & 0xFFFF


def coil_value(unit: int, address: int) -> bool:
    return (address + unit) % 3 == 0


def discrete_value(unit: int, address: int) -> bool:
    return address % (unit + 3) == 1


# -- the subprocess side (asyncio, pymodbus) ----------------------------------------


def _serve(argv: list[str]) -> None:  # pragma: no cover - runs in the subprocess
    # The old datastore API logs "deprecated, removed in v4"; keep the peer quiet
    # (and never let a warning leak into the test process's output).
    warnings.simplefilter("ignore")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    def block(values: list[int] | list[bool]) -> ModbusSequentialDataBlock:
        # ModbusSequentialDataBlock(1, ...) is the block at protocol address 0.
        return ModbusSequentialDataBlock(1, values)  # type: ignore[no-untyped-call]

    def device(unit: int) -> ModbusDeviceContext:
        addresses = range(SIZE)
        return ModbusDeviceContext(
            co=block([coil_value(unit, a) for a in addresses]),
            di=block([discrete_value(unit, a) for a in addresses]),
            hr=block([holding_value(unit, a) for a in addresses]),
            ir=block([input_value(unit, a) for a in addresses]),
        )

    async def main() -> None:
        context = ModbusServerContext(devices={unit: device(unit) for unit in UNITS})
        server: ModbusTcpServer | ModbusSerialServer
        if argv[0] == "tcp":
            server = ModbusTcpServer(context, address=("127.0.0.1", 0))
            await server.serve_forever(background=True)
            host, port = server.transport.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
            print(f"ready tcp {host} {port}", flush=True)
        elif argv[0] == "rtu":
            server = ModbusSerialServer(context, port=argv[1], baudrate=19200, timeout=1)
            await server.serve_forever(background=True)
            print(f"ready rtu {argv[1]}", flush=True)
        else:
            raise SystemExit(f"usage: {sys.argv[0]} tcp | rtu PATH")
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the test side (trio) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """A running peer: its process and the port URL to give the master."""

    process: trio.Process
    url: str


@asynccontextmanager
async def running_peer(mode: str = "tcp", device: str | None = None) -> AsyncIterator[Peer]:
    """Start the peer (``tcp``, or ``rtu`` on ``device``) and kill it on exit."""
    argv = [sys.executable, "-u", __file__, mode]
    if mode == "rtu":
        if device is None:
            raise ValueError("an rtu peer needs a serial device path")
        argv.append(device)
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        line = await _read_line(process)
        words = line.split()
        if not words or words[0] != "ready":
            raise RuntimeError(f"pymodbus peer did not start: {line!r}")
        url = f"tcp://{words[2]}:{words[3]}" if mode == "tcp" else f"rtu://{words[2]}?baud=19200"
        yield Peer(process, url)
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def _read_line(process: trio.Process) -> str:
    assert process.stdout is not None
    data = b""
    with trio.fail_after(READY_TIMEOUT):
        while b"\n" not in data:
            chunk = await process.stdout.receive_some(256)
            if not chunk:
                code = await process.wait()
                raise RuntimeError(f"pymodbus peer exited with {code} before it was ready")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


if __name__ == "__main__":
    _serve(sys.argv[1:])
