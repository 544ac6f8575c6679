"""systemd integration without libsystemd: sd_notify, the watchdog, exit codes.

The notify protocol (sd_notify(3)) is one datagram of ``KEY=VALUE`` lines
sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace). The service manager's watchdog (WatchdogSec=)
sets ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``; sd_watchdog_enabled(3)
advises pinging at half the period.

Nothing here may stop the station: without ``$NOTIFY_SOCKET`` every call is
a no-op, and a failed or stuck send is logged and dropped, never raised.

Exit codes of ``evse run`` (sysexits.h where one fits), so that systemd's
``RestartPreventExitStatus=`` and an installer reading ``systemctl status``
can tell the causes apart (the unit restarts on every code but 2 and 78):

=====  ==============  ==========================================================
code   name            meaning
=====  ==============  ==========================================================
0      EXIT_OK         stopped on request (SIGTERM, SIGINT)
1      EXIT_FAILURE    failed while running, e.g. the store; restarted. Also an
                       orderly stop into another release (a firmware update
                       installed, or a trial rolled back): the unit's restart
                       follows the ``current`` link (ops/release.py)
2      EXIT_USAGE      bad command line; not restarted
69     EXIT_HARDWARE   EX_UNAVAILABLE: a device (board, meter) did not answer at
                       start (nothing on its TCP port, no such serial device, a
                       silent unit); never READY=1; restarted, it may come up
70     EXIT_SOFTWARE   EX_SOFTWARE: an internal error, or the station loop failed
                       its liveness probe; switched off before exiting;
                       restarted
75     EXIT_LOCKED     EX_TEMPFAIL: another station holds the data directory or
                       the board (the line names its pid and the lock file);
                       refused before touching store or bus. Restarted on
                       purpose: the holder is usually an installer's ``evse
                       run`` by hand or a bench, and when it ends the unit
                       takes its station back within RestartSec= without a
                       visit; each retry costs one journal line and never
                       touches the hardware
78     EXIT_CONFIG     EX_CONFIG: the configuration file is refused (including
                       a data directory that does not exist, or a lock
                       directory that cannot be used); not restarted, a bad
                       file does not fix itself
=====  ==============  ==========================================================
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_HARDWARE = 69  # EX_UNAVAILABLE
EXIT_SOFTWARE = 70  # EX_SOFTWARE
EXIT_LOCKED = 75  # EX_TEMPFAIL
EXIT_CONFIG = 78  # EX_CONFIG

#: A notification that cannot be sent within this time is dropped.
SEND_TIMEOUT = 1.0


def _address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path or '@abstract'."""
    if value.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte (unix(7)).
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # sd_notify also accepts vsock:...; a station has no use for it.
    return None


class Notifier:
    """Sends service-manager notifications; a no-op outside systemd.

    ``environ`` and ``pid`` default to the process's own; tests pass theirs.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        env = os.environ if environ is None else environ
        self.send_timeout = send_timeout
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", raw)
        self._watchdog_usec = self._read_watchdog(env, os.getpid() if pid is None else pid)
        self._sock: trio.socket.SocketType | None = None
        self._failing = False

    @staticmethod
    def _read_watchdog(env: Mapping[str, str], pid: int) -> int | None:
        usec_text = env.get("WATCHDOG_USEC")
        if not usec_text:
            return None
        try:
            usec = int(usec_text)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number; watchdog off", usec_text)
            return None
        if usec <= 0:
            return None
        pid_text = env.get("WATCHDOG_PID")
        if pid_text:
            # sd_watchdog_enabled(3): the watchdog is meant for WATCHDOG_PID
            # only (e.g. not for a child that inherited the environment).
            try:
                if int(pid_text) != pid:
                    return None
            except ValueError:
                log.warning("WATCHDOG_PID=%r is not a number; watchdog off", pid_text)
                return None
        return usec

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec=), or None if off."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    async def ready(self, status: str | None = None) -> bool:
        """Startup is complete (Type=notify: systemctl start returns now)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return await self.notify(*fields)

    async def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return await self.notify(_status_field(text))

    async def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        return await self.notify(*fields)

    async def watchdog(self) -> bool:
        """The service is alive (resets the WatchdogSec= timer)."""
        return await self.notify("WATCHDOG=1")

    async def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram; True if it was sent, never raises."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode()
        with trio.move_on_after(self.send_timeout) as scope:
            try:
                sock = self._sock or await self._connect()
                await sock.send(data)
            except OSError as exc:
                # systemd re-executed or the socket vanished: reconnect next time.
                self._close()
                self._report(f"{exc.strerror or exc}")
                return False
            except trio.ClosedResourceError:
                # Another task's send failed and closed the socket under ours.
                self._report("the socket was closed after a failed send")
                return False
        if scope.cancelled_caught:
            self._report(f"no room on the socket within {self.send_timeout:g} s")
            return False
        if self._failing:
            log.info("systemd notifications are delivered again")
            self._failing = False
        return True

    async def _connect(self) -> trio.socket.SocketType:
        assert self.address is not None
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # Connected, so a full receive queue makes us wait (bounded by
            # send_timeout) instead of spinning on EAGAIN.
            await sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        if self._sock is None:
            self._sock = sock
            return sock
        # Another task (the watchdog, a status change) connected meanwhile:
        # one socket, never a leaked second.
        sock.close()
        return self._sock

    def _report(self, reason: str) -> None:
        # Warn once per outage: the watchdog pings every few seconds and must
        # not flood the journal it is failing to reach.
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "systemd notification to %r not sent: %s", self.address, reason)
        self._failing = True

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._close()


def _status_field(text: str) -> str:
    # One datagram carries newline-separated fields: a status is one line.
    return "STATUS=" + " ".join(text.splitlines())


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Ping the watchdog every ``watchdog_interval`` while ``healthy()`` is true.

    ``healthy`` should say whether the station's own loops are making
    progress (e.g. a heartbeat they stamp is recent); while it is false no
    ping is sent, so systemd kills and restarts a wedged process after
    WatchdogSec=. Returns at once when the watchdog is off.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    deadline = trio.current_time()
    withheld = False
    while True:
        if healthy():
            if withheld:
                log.warning("station healthy again: systemd watchdog pings resumed")
                withheld = False
            await notifier.watchdog()
        elif not withheld:
            log.error("station not healthy: withholding systemd watchdog pings")
            withheld = True
        deadline += interval
        await trio.sleep_until(deadline)
