"""``python -m bench [--quick]``: every benchmark, JSON lines on stdout and in a file."""

from __future__ import annotations

import argparse

from bench import modbus_poll
from bench.results import RESULTS, Recorder


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    rec = Recorder(RESULTS)
    modbus_poll.run(rec, quick=args.quick)


if __name__ == "__main__":
    main()
