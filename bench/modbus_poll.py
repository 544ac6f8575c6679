"""Polling throughput and CPU per poll: the trio master vs pymodbus's sync client.

Same server (pymodbus's own, in its own process), same request (10 input
registers from unit 1), in one run. Rounds alternate between the two clients
and the median round counts, so a burst of load elsewhere on the machine hits
both alike. Over RTU a null-modem process links two pseudo-terminals; both
clients are configured for the same baud rate, and our master keeps the
Modbus t3.5 inter-frame silence for it (Serial Line V1.02, 2.5.1.1), which
pymodbus's sync client does not.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from pymodbus.client import ModbusSerialClient, ModbusTcpClient

from bench.results import Recorder, compare
from fieldbus.links import SerialLink
from fieldbus.master import ModbusMaster
from fieldbus.ports import RtuPort, TcpPort

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "tests" / "pymodbus_peer.py"
UNIT, ADDRESS, COUNT = 1, 0, 10


@contextmanager
def process(*argv: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


#: (requests per second, CPU microseconds per request) of the last round run:
#: measured inside the round, after connecting and one warm-up request.
_LAST: list[tuple[float, float]] = []


def timed(run: Callable[[], None]) -> tuple[float, float]:
    _LAST.clear()
    run()
    return _LAST[-1]


def sync_rounds(
    make_client: Callable[[], ModbusTcpClient | ModbusSerialClient], n: int
) -> Callable[[], None]:
    """pymodbus's client, connected per round (a serial port is opened exclusively)."""

    def run() -> None:
        client = make_client()
        if not client.connect():
            raise RuntimeError("pymodbus client could not connect")
        try:
            client.read_input_registers(ADDRESS, count=COUNT, device_id=UNIT)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                reply = client.read_input_registers(ADDRESS, count=COUNT, device_id=UNIT)
                if reply.isError():
                    raise RuntimeError(f"pymodbus client: {reply}")
            _LAST.append((n / (time.perf_counter() - wall), (time.process_time() - cpu) / n * 1e6))
        finally:
            client.close()  # type: ignore[no-untyped-call]

    return run


def trio_rounds(make_master: Callable[[], ModbusMaster], n: int) -> Callable[[], None]:
    async def main() -> None:
        async with make_master() as master:
            await master.read_input_registers(UNIT, ADDRESS, COUNT)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await master.read_input_registers(UNIT, ADDRESS, COUNT)
            _LAST.append((n / (time.perf_counter() - wall), (time.process_time() - cpu) / n * 1e6))

    return lambda: trio.run(main)


def duel(
    ours: Callable[[], None], theirs: Callable[[], None] | None, rounds: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    mine: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    for _ in range(rounds):
        if theirs is not None:
            base.append(timed(theirs))
        mine.append(timed(ours))

    def median(results: list[tuple[float, float]]) -> tuple[float, float]:
        if not results:
            return (float("nan"), float("nan"))
        return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))

    return median(mine), median(base)


def bench_tcp(rec: Recorder, n: int, rounds: int) -> None:
    with process(sys.executable, "-u", str(PEER), "tcp") as (_, ready):
        _, _, host, port = ready.split()
        (rate, cpu), (base_rate, base_cpu) = duel(
            trio_rounds(lambda: ModbusMaster.for_port(TcpPort(host, int(port))), n),
            sync_rounds(lambda: ModbusTcpClient(host, port=int(port), timeout=2), n),
            rounds,
        )
    rec.emit(
        compare(
            "modbus_tcp_poll_throughput",
            rate,
            base_rate,
            "req/s",
            target="ratio >= 1.0",
            note="trio master vs pymodbus ModbusTcpClient, 10 input registers",
        )
    )
    rec.emit(
        compare(
            "modbus_tcp_cpu_per_poll",
            cpu,
            base_cpu,
            "us",
            higher_is_better=False,
            note="client process CPU time per request; ratio > 1: less CPU than pymodbus",
        )
    )


def bench_rtu(rec: Recorder, n: int, rounds: int, baud: int) -> None:
    with process(sys.executable, "-u", "-m", "bench.ptybridge") as (_, paths):
        server_end, client_end = paths.split()
        with process(sys.executable, "-u", str(PEER), "rtu", server_end):
            port = RtuPort(client_end, baud=baud)
            (rate, cpu), (base_rate, base_cpu) = duel(
                trio_rounds(lambda: ModbusMaster.for_port(port), n),
                sync_rounds(lambda: ModbusSerialClient(client_end, baudrate=baud, timeout=2), n),
                rounds,
            )

            def no_silence() -> ModbusMaster:
                # Measurement only, never a field setting: what the master
                # costs per request once the line's t3.5 wait is taken out.
                link = SerialLink(port)
                link.frame_gap = 0.0
                return ModbusMaster(link)

            (raw_rate, raw_cpu), _ = duel(trio_rounds(no_silence, n), None, rounds)
    rec.emit(
        compare(
            f"modbus_rtu_pty_poll_throughput_{baud}",
            rate,
            base_rate,
            "req/s",
            target="ratio >= 5",
            note=f"{baud} baud, our master keeps t3.5 = {port.frame_gap * 1e3:.2f} ms "
            "between frames; pymodbus's client keeps none",
        )
    )
    rec.emit(
        compare(
            f"modbus_rtu_pty_cpu_per_poll_{baud}",
            cpu,
            base_cpu,
            "us",
            higher_is_better=False,
            note="client process CPU time per request",
        )
    )
    rec.emit(
        compare(
            f"modbus_rtu_pty_poll_throughput_{baud}_without_t35",
            raw_rate,
            base_rate,
            "req/s",
            note="inter-frame silence removed (measurement only): the "
            "master's own cost over a pty against pymodbus's client",
        )
    )
    # A compliant master cannot beat one request per (t3.5 + its own cost):
    # the share of that ceiling we reach shows what is lost around the silence.
    ceiling = 1.0 / (port.frame_gap + 1.0 / raw_rate)
    rec.emit(
        compare(
            f"modbus_rtu_pty_share_of_compliant_ceiling_{baud}",
            rate,
            ceiling,
            "req/s",
            target="ratio >= 0.9",
            note=f"ceiling = 1 / (t3.5 {port.frame_gap * 1e3:.2f} ms + the master's own cost "
            f"{1e3 / raw_rate:.2f} ms measured with the silence removed) = {ceiling:.0f} req/s",
        )
    )
    rec.emit(
        compare(
            f"modbus_rtu_pty_cpu_per_poll_{baud}_without_t35",
            raw_cpu,
            base_cpu,
            "us",
            higher_is_better=False,
            note="client process CPU time per request",
        )
    )


def run(rec: Recorder, *, quick: bool = False) -> None:
    bench_tcp(rec, n=500 if quick else 3000, rounds=3 if quick else 7)
    bench_rtu(rec, n=50 if quick else 300, rounds=3 if quick else 5, baud=9600)


if __name__ == "__main__":
    import argparse

    from bench.results import RESULTS, Recorder

    parser = argparse.ArgumentParser(prog="python -m bench.modbus_poll")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["tcp", "rtu"])
    args = parser.parse_args()
    recorder = Recorder(RESULTS)
    if args.only != "rtu":
        bench_tcp(recorder, n=500 if args.quick else 3000, rounds=3 if args.quick else 7)
    if args.only != "tcp":
        bench_rtu(recorder, n=50 if args.quick else 300, rounds=3 if args.quick else 5, baud=9600)
