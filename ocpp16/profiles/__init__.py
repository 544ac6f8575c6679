"""Feature profiles: who answers which call of the central system, and what runs.

OCPP 1.6 groups its messages into feature profiles (section 3.1): Core,
FirmwareManagement, LocalAuthListManagement, Reservation, SmartCharging and
RemoteTrigger. Each profile this firmware implements is one module in this
package holding its handlers and its state, and registers itself with the
charge point (``ChargePoint.register``) as a ``Profile``:

* ``name``: the OCPP feature profile name, as SupportedFeatureProfiles
  spells it;
* ``handlers``: action -> coroutine taking the CALL payload and returning
  the CALLRESULT payload (raise ``ocpp16.errors.CallError`` for a CALLERROR);
* ``tasks()``: the profile's long-lived tasks, each with a name and a
  ``Lifetime``.

``Profiles`` is the registry: the handler of an action, the tasks to start,
and the SupportedFeatureProfiles value, derived from what is registered (a
profile the firmware does not register is never advertised). An action that
OCPP 1.6 defines but no registered profile handles is answered NotSupported
by the charge point; one OCPP 1.6 does not define never gets here (``rpc``
answers it NotImplemented).

No trio and no I/O here: the charge point runs the tasks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

#: The handler of one action: the CALL payload in, the CALLRESULT payload out.
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: The OCPP 1.6 feature profile names, in the order of section 3.1: the order
#: SupportedFeatureProfiles lists them in, whatever the order of registration.
FEATURE_PROFILES = (
    "Core",
    "FirmwareManagement",
    "LocalAuthListManagement",
    "Reservation",
    "SmartCharging",
    "RemoteTrigger",
)


class Lifetime(Enum):
    """How long a profile's task runs."""

    #: From the registration on a connection (BootNotification Accepted) until
    #: that connection ends: work that needs the central system.
    CONNECTION = "connection"
    #: For as long as ``ChargePoint.run`` runs, online or not: work that
    #: outlives a connection (meter values are taken and queued offline too).
    CHARGE_POINT = "charge point"


@dataclass(frozen=True, slots=True)
class Task:
    """One long-lived task of a profile; ``name`` names it in the nursery tree."""

    name: str
    run: Callable[[], Awaitable[None]]
    lifetime: Lifetime = Lifetime.CONNECTION


class Profile(Protocol):
    """One feature profile, as the charge point's session sees it."""

    @property
    def name(self) -> str:
        """The OCPP feature profile name (``FEATURE_PROFILES``)."""
        ...

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """The central system's calls this profile answers, by action."""
        ...

    def tasks(self) -> Sequence[Task]:
        """The profile's long-lived tasks (none: an empty sequence)."""
        ...


class Profiles:
    """The registered profiles: an action's handler, the tasks, the advertised names."""

    def __init__(self) -> None:
        self._registered: list[Profile] = []
        self._handlers: dict[str, tuple[str, Handler]] = {}

    def register(self, profile: Profile) -> None:
        """Add a profile; ValueError if its name or one of its actions is taken.

        Its handlers are read now; its tasks when the charge point starts them.
        """
        name = profile.name
        if not name or "," in name:
            raise ValueError(f"feature profile name {name!r}: not a SupportedFeatureProfiles item")
        if any(p.name == name for p in self._registered):
            raise ValueError(f"feature profile {name} is registered twice")
        handlers = dict(profile.handlers)
        for action in handlers:
            owner = self._handlers.get(action)
            if owner is not None:
                raise ValueError(f"{action} is handled by {owner[0]} already, not also by {name}")
        self._registered.append(profile)
        self._handlers.update({action: (name, h) for action, h in handlers.items()})

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._registered)

    def handler(self, action: str) -> Handler | None:
        owner = self._handlers.get(action)
        return owner[1] if owner is not None else None

    def tasks(self, lifetime: Lifetime) -> list[Task]:
        """The registered profiles' tasks of ``lifetime``, in registration order."""
        return [t for p in self._registered for t in p.tasks() if t.lifetime is lifetime]

    @property
    def names(self) -> tuple[str, ...]:
        """The registered profiles' names: OCPP 1.6's in its order, then any
        other in registration order."""
        registered = [p.name for p in self._registered]
        known = [n for n in FEATURE_PROFILES if n in registered]
        return (*known, *(n for n in registered if n not in FEATURE_PROFILES))

    @property
    def supported(self) -> str:
        """The SupportedFeatureProfiles value (OCPP 1.6 section 9.1): exactly the
        registered profiles, comma-separated."""
        return ",".join(self.names)
