"""The switch-off budget: the longest the off sequence can take on a board and bus.

Pure: a board model, its bus and its request timing in, seconds out, with the
parts named (for the configuration check's message and for tests). The
configuration refuses a ``safety.off_deadline`` shorter than this, because the
supervisor gives the whole switch-off sequence that deadline: a deadline that
fires inside the off-write cancels it, and a board without a hardware
failsafe then keeps its last current.

The sequence (``evse.supervisor``): "allowed current 0" (one write), then,
where the model has an enable switch, "disabled" (a coil write, or, for a
bit inside a holding register, a read-modify-write: one read and one write).

The worst case, as ``fieldbus.master.ModbusMaster`` behaves::

    budget   = in_flight + sum(request over the sequence)
    request  = request_gap + attempts * (timeout + line)
    attempts = 1 + retries
    in_flight = bus_timeout + line
    line     = RTU: t3.5 + max(0.02 s, 4 * t3.5)     TCP: 0.05 s

* ``in_flight``: one exchange already on the wire when the sequence starts (a
  poll of the board, or of another device on the same bus). No request can
  overtake a frame on the wire; on RTU a cancelled exchange leaves the line
  "dirty" and the next request first waits until the aborted request's own
  timeout has run out. One attempt, not all of its retries: the master's
  priority lane lets an off-write go before a poll's retry.
* ``request_gap``: the model's pause before each request to it (EVSE DIN:
  0.1 s), taken once per request (retries inside the bus lock do not wait it).
* ``line`` on RTU: the t3.5 silence before every frame, plus the settle after
  an aborted exchange (the master drains the line until it has been quiet for
  ``max(0.02 s, 4 * t3.5)``), counted before every attempt since the first
  attempt may follow an aborted poll. On TCP: the pause after a refused
  connection before the next attempt. A TCP connect is assumed to be bounded
  by the request timeout.

Not counted: the disk write that ends the transaction record (no bus work),
and the scheduler's own latency (milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from fieldbus.boards import BoardModel
from fieldbus.ports import PortSpec, RtuPort
from fieldbus.registers import Table

#: fieldbus.master: after an aborted RTU exchange the line must be quiet this long at least.
SETTLE_QUIET_MIN = 0.02
#: ... or four t3.5 silences, whichever is longer.
SETTLE_QUIET_FRAMES = 4
#: fieldbus.master: a refused TCP connection waits this long before the next attempt.
RECONNECT_PAUSE = 0.05


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the off sequence and its worst case."""

    what: str
    gap: float
    attempts: int
    attempt: float  # one attempt's worst case: timeout + line

    @property
    def seconds(self) -> float:
        return self.gap + self.attempts * self.attempt


@dataclass(frozen=True, slots=True)
class OffBudget:
    """The off sequence's worst case on one board and bus."""

    in_flight: float
    requests: tuple[Request, ...]

    @property
    def seconds(self) -> float:
        return self.in_flight + sum(r.seconds for r in self.requests)

    def describe(self) -> str:
        """The parts, for people (one line)."""
        text = f"{self.in_flight:.3f} s for an exchange already on the bus"
        kinds = {(r.gap, r.attempts, r.attempt) for r in self.requests}
        if len(kinds) == 1:
            gap, attempts, attempt = next(iter(kinds))
            names = ", ".join(r.what for r in self.requests)
            each = f"{gap:g} s gap + " if gap else ""
            count = len(self.requests)
            plural = "request" if count == 1 else "requests"
            return (
                f"{text}, then {count} {plural} ({names}) of {each}"
                f"{attempts} x {attempt:.3f} s{' each' if count > 1 else ''}"
            )
        return ", then ".join([text, *(f"{r.what} {r.seconds:.3f} s" for r in self.requests)])


def line_cost(port: PortSpec) -> float:
    """What the bus adds to every attempt beyond the reply timeout (see the module doc)."""
    if isinstance(port, RtuPort):
        silence = port.frame_gap
        return silence + max(SETTLE_QUIET_MIN, SETTLE_QUIET_FRAMES * silence)
    return RECONNECT_PAUSE


def off_requests(model: BoardModel) -> tuple[str, ...]:
    """The bus requests of the switch-off sequence on ``model``, in order."""
    steps = ["write current 0"]
    enable = model.enable
    if enable is not None:
        if enable.field.table is Table.COIL:
            steps.append("write enable coil")
        else:
            # Board.set_enabled: a bit inside a register keeps the other bits.
            steps += ["read enable register", "write enable register"]
    return tuple(steps)


def off_budget(
    model: BoardModel,
    port: PortSpec,
    *,
    timeout: float,
    retries: int,
    bus_timeout: float | None = None,
) -> OffBudget:
    """The worst case of the switch-off sequence on ``model`` behind ``port``.

    ``timeout`` and ``retries`` are the board's (the plan gives the board one
    retry); ``bus_timeout`` is the longest reply timeout of any device on the
    same bus (the board's own when it is alone there), for the exchange that
    may be on the wire when the sequence starts.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, not {retries}")
    line = line_cost(port)
    ahead = max(timeout, bus_timeout if bus_timeout is not None else timeout)
    attempt = timeout + line
    requests = tuple(
        Request(what, model.request_gap, 1 + retries, attempt) for what in off_requests(model)
    )
    return OffBudget(ahead + line, requests)
