"""A null-modem cable between two pseudo-terminals, as its own process.

``python -m bench.ptybridge`` prints ``A B`` (two serial device paths) and
copies bytes between them until killed, like ``socat pty,raw pty,raw``. It
runs in a process of its own so the copying costs neither side of a benchmark.
"""

from __future__ import annotations

import os
import select
import sys
import tty


def main() -> None:
    ends = []
    for _ in range(2):
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        ends.append((master, slave, os.ttyname(slave)))
    print(ends[0][2], ends[1][2], flush=True)
    a, b = ends[0][0], ends[1][0]
    peer = {a: b, b: a}
    while True:
        readable, _, _ = select.select([a, b], [], [])
        for fd in readable:
            try:
                data = os.read(fd, 4096)
            except OSError:
                continue
            os.write(peer[fd], data)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
