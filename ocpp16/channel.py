"""The call channel: OCPP-J calls in both directions over the current connection.

``rpc.RpcSession`` is sans-I/O; this is its I/O around one connection at a
time, with nothing of the application in it:

* ``call`` sends one CALL and waits for its CALLRESULT payload; a CALLERROR,
  a timeout (``CALL_TIMEOUT``) or a lost connection raise ``CallFailed``. One
  CALL of ours is outstanding at a time (OCPP-J 1.6 section 4.1.1), even when
  a caller gave up waiting for its answer (cancelled).
* every incoming CALL is handed to the ``Answer`` callback in order, one at a
  time (a second CALL waits in the channel), and its result or the right
  CALLERROR sent back; a callback that returns None leaves the call
  unanswered (OCPP 1.6 4.2.1: a Rejected charge point does not respond).
* the reader dispatches answers to the waiting caller, the call timer
  expires the outstanding CALL on trio's clock.
* work that must follow an answer (TriggerMessage's triggered message, a
  reconnect after a ChangeConfiguration) is handed to ``after_answer`` by the
  handler: it starts once the answer has been written to the connection.

The charge point opens the channel on each new connection (``open``), starts
its three tasks in the connection's nursery (``start``) and closes it when the
connection ends (``close``): a call still waiting then fails with
``counts=False`` (offline time never costs a transaction message an attempt).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ocpp16.errors import CallError, ConnectionLost, OcppError, TransportError

if TYPE_CHECKING:
    # Loaded when a connection is first made (rpc: jsonschema and the ocpp
    # package's schemas; transport: WebSocket and TLS), not by a station that
    # has no central system configured.
    from ocpp16.rpc import IncomingCall, RpcSession
    from ocpp16.transport import Connection

log = logging.getLogger(__name__)

#: CALL timeout (OCPP-J leaves it to the implementation).
CALL_TIMEOUT = 30.0
#: Incoming CALLs waiting for the answerer (a well-behaved central system sends
#: one at a time, OCPP-J 1.6 4.1.1).
INCOMING_BACKLOG = 16

#: The application's answer to an incoming CALL: its CALLRESULT payload; raise
#: ``CallError`` for a CALLERROR; None to leave it unanswered.
Answer = Callable[["IncomingCall"], Awaitable[dict[str, Any] | None]]


class CallFailed(OcppError):
    """An outgoing CALL got a CALLERROR, timed out or lost its connection."""

    def __init__(self, action: str, reason: str, *, counts: bool = True) -> None:
        super().__init__(f"{action}: {reason}")
        self.action = action
        self.reason = reason
        #: False when the connection dropped: offline time never costs attempts.
        self.counts = counts


class CallChannel:
    def __init__(self, answer: Answer, *, call_timeout: float = CALL_TIMEOUT) -> None:
        self._answer_with = answer
        self._call_timeout = call_timeout
        self._rpc: RpcSession | None = None
        self._conn: Connection | None = None
        self._incoming: trio.MemoryReceiveChannel[IncomingCall] | None = None
        self._incoming_send: trio.MemorySendChannel[IncomingCall] | None = None
        self._call_lock = trio.Lock()
        self._call_ended = trio.Event()
        self._waiting: dict[str, trio.MemorySendChannel[object]] = {}
        #: Told of every frame refused or not understood (its description), from the
        #: reader: the charge point's InvalidMessages security event.
        self.on_problem: Callable[[str], None] | None = None
        #: ``after_answer`` work of the call being answered.
        self._after: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- one connection -------------------------------------------------------------

    def open(self, conn: Connection) -> None:
        """A new connection: calls go out on it from now on."""
        from ocpp16.rpc import IncomingCall, RpcSession  # noqa: PLC0415 - see the imports

        self._rpc, self._conn = RpcSession(call_timeout=self._call_timeout), conn
        self._incoming_send, self._incoming = trio.open_memory_channel[IncomingCall](
            INCOMING_BACKLOG
        )

    def start(self, nursery: trio.Nursery) -> None:
        """The channel's tasks on the connection ``open`` was given, in its nursery."""
        rpc, conn = self._rpc, self._conn
        incoming_send, incoming = self._incoming_send, self._incoming
        assert rpc is not None and conn is not None
        assert incoming_send is not None and incoming is not None
        nursery.start_soon(self._reader, conn, rpc, incoming_send, name="ocpp reader")
        nursery.start_soon(self._answerer, incoming, nursery, name="ocpp answerer")
        nursery.start_soon(self._ticker, rpc, name="ocpp call timer")

    def close(self) -> None:
        """The connection ended: every call waiting on it fails, none counts."""
        rpc = self._rpc
        self._rpc, self._conn = None, None
        self._incoming_send = self._incoming = None
        if rpc is not None:
            for event in rpc.connection_lost(trio.current_time()):
                self._dispatch_result(event)
        self._call_ended.set()

    # -- outgoing calls ---------------------------------------------------------------

    async def call(
        self, action: str, payload: dict[str, Any], *, unique_id: str | None = None
    ) -> dict[str, Any]:
        """One CALL, answered by its CALLRESULT payload; CallFailed otherwise."""
        async with self._call_lock:
            rpc, conn = self._rpc, self._conn
            if rpc is None or conn is None:
                raise CallFailed(action, "not connected", counts=False)
            while rpc.call_outstanding:
                # A caller gave up waiting (cancelled: an authorization step
                # timed out), but its CALL is still out: one at a time (OCPP-J
                # 4.1.1), so wait for its answer, timeout or the connection's end.
                self._call_ended = trio.Event()
                await self._call_ended.wait()
                if self._rpc is not rpc:
                    raise CallFailed(action, "connection lost", counts=False)
            send, receive = trio.open_memory_channel[object](1)
            sent_id = unique_id or str(uuid.uuid4())
            frame = rpc.send_call(action, payload, trio.current_time(), unique_id=sent_id)
            self._waiting[sent_id] = send
            try:
                await conn.send(frame)
            except (ConnectionLost, TransportError) as exc:
                self._waiting.pop(sent_id, None)
                raise CallFailed(action, f"connection lost: {exc}", counts=False) from None
            event = await receive.receive()
        from ocpp16.rpc import (  # noqa: PLC0415 - see the imports
            CallErrorReceived,
            CallResultReceived,
            CallTimedOut,
        )

        if isinstance(event, CallResultReceived):
            return event.payload
        if isinstance(event, CallErrorReceived):
            raise CallFailed(action, f"{event.code}: {event.description}")
        if isinstance(event, CallTimedOut):
            connected = self._conn is conn
            raise CallFailed(
                action, "no answer" if connected else "connection lost", counts=connected
            )
        raise CallFailed(action, f"unexpected {event!r}")

    def _dispatch_result(self, event: object) -> None:
        unique_id = getattr(event, "unique_id", None)
        if unique_id is None:
            return
        waiter = self._waiting.pop(unique_id, None)
        if waiter is not None:
            waiter.send_nowait(event)
        self._call_ended.set()

    # -- the channel's tasks ------------------------------------------------------------

    async def _reader(
        self,
        conn: Connection,
        rpc: RpcSession,
        incoming: trio.MemorySendChannel[IncomingCall],
    ) -> None:
        from ocpp16 import rpc as rpc_module  # noqa: PLC0415 - see the imports

        async with incoming:
            while True:
                text = await conn.receive()
                replies, events = rpc.receive(text, trio.current_time())
                for reply in replies:
                    await conn.send(reply)
                for event in events:
                    if isinstance(event, rpc_module.IncomingCall):
                        await incoming.send(event)
                    elif isinstance(event, rpc_module.ProtocolProblem):
                        log.warning("OCPP protocol problem: %s", event.description)
                        if self.on_problem is not None:
                            try:
                                self.on_problem(event.description)
                            except Exception:
                                log.exception("protocol problem hook failed")
                    else:
                        self._dispatch_result(event)

    async def _ticker(self, rpc: RpcSession) -> None:
        while True:
            deadline = rpc.next_deadline
            if deadline is None:
                await trio.sleep(0.5)
                continue
            await trio.sleep_until(deadline)
            for event in rpc.tick(trio.current_time()):
                self._dispatch_result(event)

    def after_answer(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` (a task named ``name``, in the connection's nursery) once the
        answer to the call being answered has been written to the connection.

        Only from a handler of an incoming call, before it returns. Dropped when
        the call is left unanswered or its connection ended before the answer
        went out; the task ends with the connection.
        """
        self._after.append((name, work))

    async def _answerer(
        self, incoming: trio.MemoryReceiveChannel[IncomingCall], nursery: trio.Nursery
    ) -> None:
        async for call in incoming:
            rpc, conn = self._rpc, self._conn
            if rpc is None or conn is None:
                return
            # One call is answered at a time: what its handler hands to
            # ``after_answer`` belongs to it.
            self._after = []
            frame = await self._answer(rpc, call)
            after, self._after = self._after, []
            if frame is None or rpc is not self._rpc:
                # Left unanswered, or the connection this call came on is gone:
                # nobody to answer.
                continue
            await conn.send(frame)
            for name, work in after:
                nursery.start_soon(work, name=name)

    async def _answer(self, rpc: RpcSession, call: IncomingCall) -> str | None:
        """The reply frame for one incoming call: its result, or the right CALLERROR."""
        try:
            try:
                payload = await self._answer_with(call)
                if payload is None:
                    return None
                return rpc.reply(call.unique_id, payload)
            except CallError as exc:
                return rpc.reply_error(call.unique_id, exc.code, exc.description, exc.details)
            except OcppError as exc:
                log.error("answering %s failed: %s", call.action, exc)
                return rpc.reply_error(call.unique_id, "InternalError", str(exc)[:255])
            except Exception as exc:
                log.exception("handler for %s failed", call.action)
                return rpc.reply_error(call.unique_id, "InternalError", type(exc).__name__)
        except OcppError as exc:
            # reply_error itself refused: the call was forgotten (connection lost).
            log.info("no answer to %s: %s", call.action, exc)
            return None
