"""``python -m bench [--quick]``: every benchmark, JSON lines on stdout and in a file."""

from __future__ import annotations

import argparse

from bench import (
    boot_time,
    fault_latency,
    footprint,
    kill_soak,
    modbus_poll,
    ocpp_calls,
    offline_replay,
)
from bench.results import RESULTS, Recorder


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    rec = Recorder(RESULTS)
    modbus_poll.run(rec, quick=args.quick)
    fault_latency.run(rec, quick=args.quick)
    footprint.run(rec, quick=args.quick)
    ocpp_calls.run(rec, quick=args.quick)
    offline_replay.run(rec, quick=args.quick)
    boot_time.run(rec, quick=args.quick)
    kill_soak.run(rec, quick=args.quick)


if __name__ == "__main__":
    main()
