"""Reconnecting over a real TCP socket when a connect attempt is lost.

A lost SYN is made for real: a listening socket with a backlog of 0 whose one
queue slot is taken by a connection nobody accepts; Linux drops the SYNs that
arrive meanwhile (the accept queue is full), and the kernel would send a lost
SYN again only after its initial retransmission timeout of 1 s (RFC 6298).
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from fieldbus.master import ModbusMaster
from fieldbus.ports import TcpPort

pytestmark = pytest.mark.slow


async def _answer_one_read(conn: trio.socket.SocketType) -> None:
    """Answer one FC03 request with its register count of 0x1234 values."""
    request = b""
    while len(request) < 12:
        chunk = await conn.recv(64)
        if not chunk:
            return
        request += chunk
    tid, _, _, unit, code, _, count = struct.unpack(">HHHBBHH", request[:12])
    assert code == 3
    body = bytes([code, 2 * count]) + b"\x12\x34" * count
    await conn.send(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)


async def test_a_lost_syn_is_overtaken_by_a_staggered_attempt() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # Take the accept queue's one slot: the master's first SYN is dropped.
    filler = socket.create_connection(("127.0.0.1", port))
    # The request's own deadline is shorter than the kernel's retransmission:
    # one attempt per request would fail; the staggered one gets through.
    async with ModbusMaster.for_port(TcpPort("127.0.0.1", port), timeout=0.8, retries=0) as master:

        async def serve() -> None:
            await trio.sleep(0.15)
            first, _ = await listener.accept()  # the filler: the queue has room again
            with first:
                conn, _ = await listener.accept()  # the master's staggered attempt
                with conn:
                    await _answer_one_read(conn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            assert await master.read_holding_registers(1, 0, 2) == [0x1234, 0x1234]
    filler.close()
    listener.close()
