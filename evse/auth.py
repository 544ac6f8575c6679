"""Authorization: who may charge, asked of a chain of steps.

Theory of operation
-------------------
An identifier (an RFID card's UID, a central system's remote-start idTag,
the free-charging tag on plug-in) is put to an ``AuthChain``. The chain asks
its steps in order; each step answers with an ``AuthResult`` or with
``None``, "no opinion, ask the next one". The first answer wins, whatever
its status: a tag the local list calls Blocked is not asked of the next
step. Nothing decided means Invalid, with source ``"none"``.

The OCPP 1.6 sources fit this shape without changing the chain
(OCPP 1.6 §3.5 and the keys LocalPreAuthorize, LocalAuthorizeOffline,
AllowOfflineTxForUnknownId, LocalAuthListEnabled, AuthorizationCacheEnabled):

- the local authorization list and the authorization cache are steps that
  look a tag up; the online/offline policy of those keys is theirs (e.g. a
  cache step answers only for Accepted entries while online, so a stale
  Blocked entry is re-checked at the central system);
- the online Authorize request is a step that may take long or never
  answer: every step runs under a timeout on trio's clock, and a step that
  times out has no opinion, so the next step (e.g. "offline, unknown id
  allowed") decides;
- when a key changes, whoever owns the configuration builds the new steps
  and calls ``AuthChain.set_steps``; a request already running finishes with
  the steps it started with.

The chain never crashes the station: a step that raises is logged and
skipped like one that timed out, and the result lists those failures
(``AuthResult.failures``) for the status display.

Expiry (IdTagInfo.expiryDate, OCPP 1.6 section 7: "date and time after which the
token must be considered invalid") is applied by the chain to every answer,
so each step need not: an Accepted answer whose expiry is not after ``now``
becomes Expired. All datetimes are timezone-aware; ``now`` is an argument
(wall time, the clock the central system's expiry dates are written in).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, TypeVar

import trio

# The one id tag rule (OCPP 1.6 section 7, CiString20Type) is declared in ocpp16
# (stdlib only) for both sides, and re-exported from here.
from ocpp16.idtag import ID_TAG_MAX_LENGTH as ID_TAG_MAX_LENGTH  # noqa: PLC0414
from ocpp16.idtag import normalize_id_tag as normalize_id_tag  # noqa: PLC0414

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Source of the answer when no step decided.
NO_SOURCE = "none"

#: A step that has not answered within this is treated as having no opinion.
DEFAULT_STEP_TIMEOUT = 5.0


class AuthStatus(StrEnum):
    """OCPP 1.6 AuthorizationStatus (section 7)."""

    ACCEPTED = "Accepted"
    BLOCKED = "Blocked"
    EXPIRED = "Expired"
    INVALID = "Invalid"
    CONCURRENT_TX = "ConcurrentTx"


@dataclass(frozen=True, slots=True)
class StepFailure:
    """A step that could not answer: it raised, timed out or answered nonsense."""

    step: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The answer for one tag: IdTagInfo (OCPP 1.6 section 7) plus where it came from."""

    id_tag: str
    status: AuthStatus
    #: Name of the step that answered, or ``"none"``.
    source: str
    parent_id_tag: str | None = None
    expiry: datetime | None = None
    #: Steps asked before the answer that failed, in chain order.
    failures: tuple[StepFailure, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.status is AuthStatus.ACCEPTED

    @property
    def failed_steps(self) -> tuple[str, ...]:
        return tuple(failure.step for failure in self.failures)


class AuthStep(Protocol):
    """One source of authorization.

    ``authorize`` returns ``None`` when the step has no opinion on the tag
    (unknown to it, or the step is not in charge right now, e.g. an online
    step while offline). It may take time (a network request); the chain
    bounds that with its timeout and may cancel it.
    """

    name: str

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None: ...


def _lookup_key(id_tag: str) -> str | None:
    """The key a tag is looked up by, or None if it cannot be a valid tag."""
    try:
        return normalize_id_tag(id_tag)
    except ValueError:
        return None


def _keyed(table: Mapping[str, object], values: Mapping[str, _T], what: str) -> dict[str, _T]:
    keyed: dict[str, _T] = {}
    for raw, value in values.items():
        key = normalize_id_tag(raw)
        if key not in table:
            raise ValueError(f"{what} given for id tag {raw!r}, which has no status")
        keyed[key] = value
    return keyed


def _is_aware(value: datetime) -> bool:
    return value.tzinfo is not None and value.utcoffset() is not None


def _require_aware(value: datetime, what: str) -> None:
    if not _is_aware(value):
        raise ValueError(f"{what} {value.isoformat()} has no time zone")


def is_expired(expiry: datetime | None, now: datetime) -> bool:
    """Whether a tag with this expiry is invalid at ``now`` ("after which", IdTagInfo)."""
    return expiry is not None and now >= expiry


class AuthChain:
    """Asks its steps in order; see the module docstring."""

    def __init__(
        self,
        steps: Sequence[AuthStep],
        *,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        step_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self._steps: tuple[AuthStep, ...] = ()
        self._step_timeout = DEFAULT_STEP_TIMEOUT
        self._step_timeouts: dict[str, float] = {}
        self.set_steps(steps, step_timeout=step_timeout, step_timeouts=step_timeouts)

    @property
    def steps(self) -> tuple[AuthStep, ...]:
        return self._steps

    def set_steps(
        self,
        steps: Sequence[AuthStep],
        *,
        step_timeout: float | None = None,
        step_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        """Replace the steps (and optionally the timeouts), e.g. after a configuration change.

        ``step_timeout`` applies to every step unless ``step_timeouts`` names
        the step (an online request may get longer than a table lookup).
        Omitted, each keeps its current value. Step names must be unique:
        they are the ``source`` of answers and name the failures.
        """
        new_steps = tuple(steps)
        names = [step.name for step in new_steps]
        for name in names:
            if not name or name == NO_SOURCE:
                raise ValueError(f"step name {name!r} is reserved or empty")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"step names must be unique; repeated: {', '.join(duplicates)}")
        timeout = self._step_timeout if step_timeout is None else step_timeout
        if step_timeouts is None:
            # Keep the timeouts of the steps that stay; forget those that left.
            timeouts = {k: v for k, v in self._step_timeouts.items() if k in names}
        else:
            timeouts = dict(step_timeouts)
        for what, value in [("step_timeout", timeout), *timeouts.items()]:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"timeout for {what} is {value!r}; it must be a positive number")
        unknown = sorted(set(timeouts) - set(names))
        if unknown:
            raise ValueError(f"timeouts given for steps not in the chain: {', '.join(unknown)}")
        # Assigned together and only after every check: a refused change leaves
        # the chain as it was.
        self._steps, self._step_timeout, self._step_timeouts = new_steps, timeout, timeouts

    def timeout_for(self, step: AuthStep) -> float:
        return self._step_timeouts.get(step.name, self._step_timeout)

    def parent_of(self, id_tag: str) -> str | None:
        """The parentIdTag (normalized) the first step holding one gives ``id_tag``.

        Asks the steps that keep tables and have a ``parent_of(id_tag)`` (the
        installer's tags, the local list, the cache), in chain order, whatever
        the entry's status and the link state: it says which group a tag
        belongs to, e.g. whether it may stop a transaction another tag of the
        group started (OCPP 1.6 IdTagInfo.parentIdTag). None if none knows one.
        A step that raises is logged and skipped.
        """
        for step in self._steps:
            lookup = getattr(step, "parent_of", None)
            if lookup is None:
                continue
            try:
                parent: object = lookup(id_tag)
            except Exception:
                log.exception("authorization step %s: parent of %r failed", step.name, id_tag)
                continue
            if isinstance(parent, str):
                key = _lookup_key(parent)
                if key is not None:
                    return key
        return None

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult:
        """The first answer of the steps, with expiry applied; Invalid if none decides.

        ``id_tag`` is passed to the steps as given (normalize it where it
        enters, e.g. the RFID reader); steps compare case-insensitively.
        ``now`` must be timezone-aware (``ValueError`` otherwise: a
        programming error, not a tag's fault).
        """
        _require_aware(now, "now")
        failures: list[StepFailure] = []
        for step in self._steps:
            result = await self._ask(step, id_tag, now, failures)
            if result is None:
                continue
            if result.accepted and is_expired(result.expiry, now):
                log.info(
                    "id tag %r: %s says Accepted, but it expired at %s",
                    id_tag,
                    step.name,
                    result.expiry,
                )
                result = dataclasses.replace(result, status=AuthStatus.EXPIRED)
            return dataclasses.replace(result, source=step.name, failures=tuple(failures))
        return AuthResult(id_tag, AuthStatus.INVALID, NO_SOURCE, failures=tuple(failures))

    async def _ask(
        self, step: AuthStep, id_tag: str, now: datetime, failures: list[StepFailure]
    ) -> AuthResult | None:
        timeout = self.timeout_for(step)
        result: AuthResult | None = None
        with trio.move_on_after(timeout) as scope:
            try:
                result = await step.authorize(id_tag, now)
            except Exception as exc:
                # A bug or an unexpected error in one source must not stop a
                # driver from charging on another, nor crash the station.
                log.exception("authorization step %s failed for id tag %r", step.name, id_tag)
                failures.append(StepFailure(step.name, f"{type(exc).__name__}: {exc}"))
                return None
        if scope.cancelled_caught:
            log.warning("authorization step %s timed out after %g s", step.name, timeout)
            failures.append(StepFailure(step.name, f"timed out after {timeout:g} s"))
            return None
        if result is not None and result.expiry is not None and not _is_aware(result.expiry):
            log.error("authorization step %s answered an expiry without time zone", step.name)
            failures.append(StepFailure(step.name, "answered an expiry without time zone"))
            return None
        return result


class FreeCharging:
    """Accepts every tag: a private or free-vend station.

    ``free_id_tag`` is the tag the station authorizes with on plug-in when
    no card is presented (plug and charge without identification); it is
    also the idTag of the transactions that start that way.
    """

    def __init__(self, free_id_tag: str = "FREECHARGING", *, name: str = "free") -> None:
        self.name = name
        self.free_id_tag = normalize_id_tag(free_id_tag)

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        return AuthResult(id_tag, AuthStatus.ACCEPTED, self.name)


class LocalTagList:
    """A fixed table of tags from the station's configuration.

    ``statuses`` maps a tag to its status (tags are normalized: matching is
    case-insensitive); ``expiries`` and ``parents`` optionally give a tag an
    expiry (timezone-aware) and a parent idTag (OCPP 1.6 IdTagInfo). A tag not in
    the table gets no opinion.
    """

    def __init__(
        self,
        statuses: Mapping[str, AuthStatus],
        expiries: Mapping[str, datetime] | None = None,
        parents: Mapping[str, str] | None = None,
        *,
        name: str = "local",
    ) -> None:
        self.name = name
        table: dict[str, AuthStatus] = {}
        for raw, status in statuses.items():
            key = normalize_id_tag(raw)
            if key in table:
                raise ValueError(f"id tag {raw!r} is listed twice (as {key!r})")
            table[key] = AuthStatus(status)
        self._statuses = table
        self._expiries = _keyed(table, expiries or {}, "expiry")
        for key, expiry in self._expiries.items():
            _require_aware(expiry, f"expiry of id tag {key!r}")
        self._parents = {
            key: normalize_id_tag(parent)
            for key, parent in _keyed(table, parents or {}, "parent").items()
        }

    def __len__(self) -> int:
        return len(self._statuses)

    def parent_of(self, id_tag: str) -> str | None:
        """The parent configured for ``id_tag`` (``AuthChain.parent_of``)."""
        key = _lookup_key(id_tag)
        return None if key is None else self._parents.get(key)

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        key = _lookup_key(id_tag)
        if key is None or key not in self._statuses:
            return None
        return AuthResult(
            id_tag,
            self._statuses[key],
            self.name,
            parent_id_tag=self._parents.get(key),
            expiry=self._expiries.get(key),
        )
