"""The ``evse`` command line.

Errors an installer can cause (a wrong port, a silent device, a bad option,
a port in use, a second station, no station to ask) end in ONE line on
stderr naming what failed, and a non-zero exit, never a traceback. Exit
codes: 0 ok, 1 the operation failed (device, bus, store, no station
answering, a tag refused, nothing to stop), 2 usage error (a bad option or
value, an unknown setting), 78 a config file given with ``--config`` is
refused; ``evse run`` adds 69, 70 and 75 (see ops/systemd.py).

Every command's ``--help`` is plain text (argparse's RawDescriptionHelpFormatter:
the texts below are laid out as printed, no markup), with examples and the
exit codes of that command. The commands that talk to a running station
(status, authorize, stop, transactions, queue, config) go through its
control socket (ops/control.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, NoReturn

import trio

from fieldbus.errors import FieldbusError, PortConfigError
from ops import install as installer
from ops import logs, release
from ops.privileges import PrivilegeError, run_as_owner_of
from ops.probe import KINDS, probe
from ops.systemd import EXIT_CONFIG, EXIT_HARDWARE, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from ops.systemd import EXIT_FAILURE as EXIT_FAILED

DISTRIBUTION = "evse-firmware"
DEFAULT_SOCKET = "/var/lib/evse/control.sock"
#: ``evse status --watch`` without a number: redraw every second.
WATCH_INTERVAL = 1.0


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is one ``--help`` away)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed distribution's version (what pip installed, not a constant here)."""
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415 - only for --version
    from importlib.metadata import version as installed  # noqa: PLC0415

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: run from a source tree)"


class _Version(argparse.Action):
    """``--version``, the metadata read only when asked (it costs every start otherwise)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"evse {version()}")
        parser.exit(EXIT_OK)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _unit(text: str) -> int:
    try:
        unit = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unit id {text!r} is not a number") from None
    if not 1 <= unit <= 247:
        raise argparse.ArgumentTypeError(f"unit id {unit} is outside 1..247")
    return unit


def _port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..1000")
    return value


def _id_tag(text: str) -> str:
    from evse.auth import normalize_id_tag  # noqa: PLC0415 - keep probe light

    try:
        return normalize_id_tag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log_format(text: str) -> logs.Format:
    try:
        return logs.parse_format(text)
    except logs.LogFormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: OCPP 1.6 StopTransaction reasons an operator may give (section 7.33); the others
#: (EVDisconnected, PowerLoss, Reboot, resets, DeAuthorized) are the station's own.
STOP_REASONS = ("Local", "Remote", "EmergencyStop", "Other", "UnlockCommand")

FIND_STATION = """\
Which station: --socket PATH, else the control socket named by --config FILE
(control.socket, default <data_dir>/control.sock), else $EVSE_CONTROL_SOCKET,
else /var/lib/evse/control.sock. The socket is mode 0660: run as the station's
user or a member of its group."""


def _socket_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", help="the running station's control socket")
    p.add_argument(
        "--config", metavar="FILE", help="the station's config file (for the socket's path)"
    )


def _station_location(p: argparse.ArgumentParser) -> None:
    _socket_options(p)
    p.add_argument(
        "--data-dir", metavar="DIR", help="the station's data directory (when it is not running)"
    )


DESCRIPTION = """\
EV charging-station firmware: the station, its tools, and a simulator.

Run the station:
  evse run --config FILE      on the hardware the file names (systemd runs this)
  evse run --sim              on the built-in device simulator
  evse demo                   simulator + central system + one charging session

Look at and drive a running station (through its control socket):
  evse status [--watch]       state, offered current, meter, transaction, link
  evse authorize TAG          present an id tag, as at the reader
  evse stop                   stop the running transaction
  evse transactions           the latest transactions, with their energy
  evse queue                  OCPP messages waiting, and the dead letters
  evse config list|get|set    settings (OCPP keys and installer settings)
  evse passwd                 set the installer's password for the web page

Install on a gateway (as root):
  evse install                the evse user, /etc/evse, /var/lib/evse, a release
                              in /opt/evse, the systemd unit (run again: upgrade)
  evse uninstall              remove it (keeps data and settings unless --purge)

Firmware releases:
  evse release build|sign|verify
                              an image of a checkout (wheels, manifest), signed
  evse release install|rollback|list
                              releases side by side in /opt/evse, on trial

Devices:
  evse probe KIND PORT        read one meter or board once
  evse sim                    the device simulator, for benches and tests

"evse COMMAND --help" shows a command's options, examples and exit codes."""

EPILOG = """\
exit codes (each command's --help has its own):
  0   done
  1   the operation failed (device, bus, store, no station answering, a tag
      refused, nothing to stop)
  2   bad command line (an option, a value, an unknown setting)
  78  the config file given with --config is refused
  evse run adds 69 (a device did not answer at start), 70 (internal error),
  75 (another station holds the data directory or the board)."""

PROBE = """\
Reads one device once and prints its normalized reading as JSON: a meter's
voltage, current and power per phase (V, A, W), total power (W), imported
energy (Wh), frequency (Hz); a board's pilot state, cable limit, offered
current, contactor and fault flags, and its capabilities. Values a model
lacks are null.

examples:
  evse probe sdm630 tcp://127.0.0.1:5020 --unit 2
  evse probe evse-din "rtu:///dev/ttyUSB0?baud=9600&parity=N&stopbits=1" \\
             --unit 1

exit codes:
  0  read
  1  the device or bus failed (timeout, CRC error, exception reply,
     connection refused): one line naming the port, unit and reason
  2  the command was wrong (unknown kind, malformed port, unit outside 1..247)"""

SIM = """\
The device simulator: the register maps the drivers read, over Modbus TCP and
over RTU on a pseudo-terminal, with an EV that can be plugged in, charge and
pause, a meter that integrates energy, and faults to inject. When ready it
prints one JSON line {"ready": {"tcp", "rtu", "control", "devices"}};
"control" is its HTTP control interface (README.md, "evse sim").

examples:
  evse sim
  evse sim --device evse-din:1 --device sdm630:2 --tcp-port 5020 \\
           --control-port 8020 --rtu-link /tmp/evse-rtu
  curl -s -XPOST localhost:8020/plug -d '{"phases": 1}'

exit codes:
  0  stopped by SIGINT or SIGTERM
  1  it cannot serve (a port in use, an address it cannot bind, a link it
     cannot make): one line naming what, where and why
  2  a bad option"""

RUN = """\
Runs the station: from the TOML config file (what systemd runs), or with --sim
on the built-in simulator, started by this command on free ports (its ready
line names the simulator's endpoints, the control socket and the data
directory; local tags 04A2B3C4 and DEMOTAG1 are accepted). SIGTERM or SIGINT
stops it: the running transaction ends (Reboot) and the board is switched off.

Logs go to stderr: under systemd (stderr is the journal) each line carries its
syslog priority ("<4>evse.station: ...") and no timestamp; otherwise a
timestamped line; --log-format json writes one JSON object per line (ts,
level, logger, message, exc).

examples:
  evse run --config /etc/evse/evse.toml
  evse run --sim
  evse run --sim --csms-url ws://127.0.0.1:9000/ocpp/ --id CP-1
  evse run --sim --data-dir /tmp/station --log-format json

exit codes (ops/systemd.py has systemd's view of each):
  0   stopped on request (SIGTERM, SIGINT)
  1   failed while running (e.g. the store), or stopped to restart into
      another release (a firmware update, a rolled-back trial)
  2   bad command line
  69  a device did not answer at start (one line: device, port, reason)
  70  internal error, or the liveness probe failed (switched off first)
  75  another station holds the data directory or the board (pid, lock file)
  78  the config file is refused (file, key, reason), a data directory that
      does not exist or a lock directory that cannot be used"""

STATUS = f"""\
The running station's state, for people: connector status and error code,
pilot, offered current and what bounds it, power, current and meter, the
running transaction, a transaction ended as PowerLoss at the last start, the
central-system connection and why it is in that state, messages waiting and
dead letters, faults, transfers in progress. --json prints the control
socket's answer as it is, for scripts; --watch redraws until Ctrl-C.

{FIND_STATION}

examples:
  evse status
  evse status --watch        redraw every second
  evse status --watch 5      every 5 seconds
  evse status --json | jq .offered_a
  evse status --config /etc/evse/evse.toml

exit codes:
  0   shown (with --watch: stopped by Ctrl-C)
  1   no station answers at the socket (one line naming it and why)
  2   a bad option
  78  the file given with --config is refused"""

AUTHORIZE = f"""\
Presents an id tag to the station, as the RFID reader would: the station's
authorization chain decides (installer tags, local list, cache, central
system). Accepted with an EV plugged in starts a transaction; the tag that
started the running transaction stops it. Prints the answer and who gave it.

{FIND_STATION}

examples:
  evse authorize 04A2B3C4
  evse authorize DEMOTAG1 --socket /tmp/station/control.sock

exit codes:
  0  accepted
  1  not accepted (Invalid, Blocked, Expired, ConcurrentTx: named), or no
     station answers at the socket
  2  a malformed tag (empty, more than 20 characters) or option"""

STOP = f"""\
Stops the running transaction: the current is switched off at once, then the
transaction ends with the reason given (OCPP 1.6 StopTransaction reason,
default Local) and its StopTransaction is queued for the central system.

{FIND_STATION}

examples:
  evse stop
  evse stop --reason EmergencyStop

exit codes:
  0  stopped
  1  no transaction was running, or no station answers at the socket
  2  a reason that is not one of the choices"""

TRANSACTIONS = f"""\
The latest transactions, newest first: id, id tag, start, end, energy and the
stop reason (a running one has no end yet; its energy is up to the last
reading on disk). --json prints the control socket's answer.

{FIND_STATION}

examples:
  evse transactions
  evse transactions --limit 100 --json

exit codes:
  0  listed
  1  no station answers at the socket
  2  --limit outside 1..1000, or another bad option"""

QUEUE = f"""\
Transaction messages (StartTransaction, StopTransaction, MeterValues) waiting
for the central system's answer, oldest first, and the dead letters: messages
given up after TransactionMessageAttempts failures, with the reason. A table
by default; --json for scripts. Without a running station it reads the
station's store, given --data-dir or --config.

{FIND_STATION}

examples:
  evse queue
  evse queue --data-dir /var/lib/evse --json

exit codes:
  0   listed
  1   no station answers and no --data-dir or --config to read the store,
      or the store cannot be read
  2   a bad option (a --data-dir that does not exist)
  78  the file given with --config is refused"""

CONFIG = f"""\
Reads or changes one setting: an OCPP configuration key (HeartbeatInterval) or
an installer setting (connection.central_system_address), the same registry
and validation as OCPP ChangeConfiguration. With a running station the change
goes through its control socket and applies at once; without one it is
written to the store (--data-dir or --config).

{FIND_STATION}

examples:
  evse config list
  evse config get HeartbeatInterval
  evse config set connection.central_system_address wss://cs.example.com/ocpp/
  evse config set FallbackLimit 10 --config /etc/evse/evse.toml

exit codes:
  0   shown, or changed (Accepted, or RebootRequired: applies at the next start)
  1   no station answers and no --data-dir or --config, or the store failed
  2   an unknown setting, a value refused (the reason named), a bad option
  78  the file given with --config is refused"""

PASSWD_HELP = """\
Sets the installer's password for the station's web page (the viewer sees
values; the installer, logged in, may change settings). It is stored as a
salted scrypt hash in the station's data directory (web-password, mode 0600),
never in the config file. Asked twice on a terminal; --password-stdin reads
one line from standard input instead (for scripts). At least 8 characters.
Run as root on a data directory owned by the station's user, the file is
written as that user. A running station uses the new password at the next
login.

examples:
  evse passwd --config /etc/evse/evse.toml
  evse passwd --data-dir /var/lib/evse
  printf '%s\\n' "$PW" | evse passwd --data-dir /var/lib/evse --password-stdin

exit codes:
  0   set
  1   the password file cannot be written
  2   refused (too short, unprintable, the two entries differ), a bad option
  78  the file given with --config is refused"""  # noqa: S105 -- a help text, not a password

DEMO = """\
The README's first command: the simulator, a local central system and the
station, through one charging session (plug in, tag, charge with a live status
line, tag again to stop, unplug), the OCPP exchange shown as it happens.

examples:
  evse demo
  evse demo --seconds 10 --transport rtu

exit codes:
  0    the transaction is on disk with its energy, and the central system has
       its StopTransaction
  1    the session did not complete (the line says where it stopped)
  2    a bad option
  130  interrupted (Ctrl-C)"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evse", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # -v after the command works too (evse run --sim -v).
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=summary, description=description)

    p = command("probe", "read one device once and print its reading as JSON", PROBE)
    p.add_argument("kind", metavar="KIND", help=f"device model: {', '.join(KINDS)}")
    p.add_argument(
        "port",
        metavar="PORT",
        help="tcp://HOST[:PORT] (default port 502) or "
        "rtu:///dev/ttyX?baud=9600&parity=N&stopbits=1",
    )
    p.add_argument("--unit", type=_unit, default=None, help="Modbus unit id 1..247")
    p.add_argument("--timeout", type=_seconds, default=1.0, help="seconds per request (default 1)")

    s = command("sim", "run the device simulator (Modbus TCP, RTU on a pty, HTTP)", SIM)
    s.add_argument(
        "--device",
        action="append",
        metavar="KIND[:UNIT]",
        help="simulated device (repeatable, at most one board; default evse-din:1 and sdm630:2)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument(
        "--tcp-port",
        type=_port_number,
        default=5020,
        help="Modbus TCP port (default 5020, 0 = any free port)",
    )
    s.add_argument("--no-tcp", action="store_true", help="do not serve Modbus TCP")
    s.add_argument("--no-rtu", action="store_true", help="do not serve RTU on a pty")
    s.add_argument(
        "--rtu-link",
        metavar="PATH",
        help="symlink to the pty's serial device (an existing symlink is replaced, any "
        "other file refused)",
    )
    s.add_argument(
        "--control-port",
        type=_port_number,
        default=8020,
        help="HTTP control port (default 8020, 0 = any free port)",
    )

    r = command("run", "run the station (from a config file, or on the simulator)", RUN)
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="the station's TOML config file")
    source.add_argument(
        "--sim", action="store_true", help="run on the built-in simulator (started by this command)"
    )
    r.add_argument(
        "--data-dir",
        metavar="DIR",
        help="with --sim: where the store and control socket go, an existing directory "
        "(default: a new temporary directory)",
    )
    r.add_argument(
        "--sim-transport",
        choices=("tcp", "rtu"),
        default=None,
        help="with --sim: Modbus TCP or RTU on a pty (default tcp)",
    )
    r.add_argument(
        "--sim-board",
        choices=("evse-din", "heidelberg", "ev-cc", "ev-cc-basic"),
        default=None,
        help="with --sim: the simulated board (default evse-din)",
    )
    r.add_argument(
        "--csms-url",
        metavar="URL",
        help="central system address (ws:// or wss://, ending in /); the charge point id "
        "is appended",
    )
    r.add_argument("--id", metavar="ID", help="charge point id (default: the serial number)")
    r.add_argument(
        "--sim-control-port",
        type=_port_number,
        default=None,
        metavar="PORT",
        help="with --sim: the simulator's HTTP control port (default 0: any free port; "
        "the ready line names it)",
    )
    r.add_argument(
        "--web-port",
        type=_port_number,
        default=None,
        metavar="PORT",
        help="with --sim: the installer's page's port on 127.0.0.1 (default 0: any free "
        "port; the ready line names its URL under 'web')",
    )
    r.add_argument(
        "--log-format",
        type=_log_format,
        default=None,
        metavar="FORMAT",
        help="auto (journal under systemd, else text), journal, text or json "
        "(default: the config file's logging.format, else auto)",
    )

    st = command("status", "show the running station's state", STATUS)
    _socket_options(st)
    output = st.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the full state as JSON")
    output.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=WATCH_INTERVAL,
        default=None,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {WATCH_INTERVAL:g}) until Ctrl-C",
    )

    a = command("authorize", "present an id tag to the running station", AUTHORIZE)
    a.add_argument("tag", metavar="TAG", type=_id_tag, help="the id tag (up to 20 characters)")
    _socket_options(a)

    sp = command("stop", "stop the running transaction", STOP)
    sp.add_argument(
        "--reason",
        choices=STOP_REASONS,
        default="Local",
        help="the StopTransaction reason (default Local)",
    )
    _socket_options(sp)

    t = command("transactions", "the latest transactions, with their energy", TRANSACTIONS)
    t.add_argument(
        "--limit", type=_limit, default=20, metavar="N", help="how many (1..1000, default 20)"
    )
    t.add_argument("--json", action="store_true", help="print the control socket's answer")
    _socket_options(t)

    cf = command("config", "read or change a setting (OCPP key or installer setting)", CONFIG)
    cf.add_argument("action", choices=("get", "set", "list"), help="what to do")
    cf.add_argument(
        "key",
        nargs="?",
        help="OCPP key or installer name, e.g. HeartbeatInterval "
        "or connection.central_system_address",
    )
    cf.add_argument("value", nargs="?", help="the new value (set)")
    _station_location(cf)

    q = command("queue", "transaction messages waiting, and the dead letters", QUEUE)
    q.add_argument("--json", action="store_true", help="print the queue as JSON")
    _station_location(q)

    pw = command("passwd", "set the installer's password for the web page", PASSWD_HELP)
    pw.add_argument("--config", metavar="FILE", help="take the data directory from this config")
    pw.add_argument(
        "--data-dir", metavar="DIR", help="the station's data directory (default /var/lib/evse)"
    )
    pw.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )

    installer.add_parsers(sub, parents=[common])
    release.add_parsers(sub, parents=[common])

    d = command("demo", "simulator + station: a full charging session, then exit", DEMO)
    d.add_argument("--seconds", type=_seconds, default=4.0, help="how long to charge (default 4)")
    d.add_argument(
        "--transport",
        choices=("tcp", "rtu"),
        default="tcp",
        help="Modbus TCP or RTU on a pty between station and simulator",
    )
    return parser


async def _run_probe(args: argparse.Namespace) -> int:
    result = await probe(args.kind, args.port, args.unit, reply_timeout=args.timeout)
    print(json.dumps(result, indent=2))
    return EXIT_OK


async def _run_sim(args: argparse.Namespace) -> int:
    from ops.sim.app import DeviceSpec, SimConfig, Simulator  # noqa: PLC0415 - keep probe light

    try:
        devices = [DeviceSpec.parse(d) for d in (args.device or ["evse-din:1", "sdm630:2"])]
        sim = Simulator(
            SimConfig(
                devices=devices,
                host=args.host,
                tcp_port=None if args.no_tcp else args.tcp_port,
                rtu=not args.no_rtu,
                rtu_link=args.rtu_link,
                control_port=args.control_port,
            )
        )
    except (ValueError, FieldbusError) as exc:
        raise UsageError(str(exc)) from None
    async with trio.open_nursery() as nursery:
        try:
            endpoints = await nursery.start(sim.run)
        except OSError as exc:
            raise UsageError(f"cannot bind: {exc.strerror or exc}") from None
        print(json.dumps({"ready": endpoints.to_json()}), flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel(reason="signal")
                break
    return EXIT_OK


async def _run_demo(args: argparse.Namespace) -> int:
    from ops.demo import run_demo  # noqa: PLC0415

    return await run_demo(seconds=args.seconds, transport=args.transport)


async def _run_station(args: argparse.Namespace) -> int:
    from ops.config import load_config  # noqa: PLC0415
    from ops.run import run_station  # noqa: PLC0415

    if args.config is not None:
        given = [
            flag
            for flag, value in (
                ("--data-dir", args.data_dir),
                ("--sim-transport", args.sim_transport),
                ("--sim-board", args.sim_board),
                ("--sim-control-port", args.sim_control_port),
                ("--web-port", args.web_port),
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)}: only with --sim (the config file sets the station's "
                "data directory and devices)"
            )
        config = load_config(args.config)
        # Started by root (by hand, not by the unit): the store stays the station's user's.
        run_as_owner_of(config.station.data_dir)
        # The command line wins over the file's logging.format.
        fmt = args.log_format or logs.parse_format(config.logging.format)
        logs.configure(logging.DEBUG if args.verbose else config.logging.level, fmt)
        return await run_station(config, settings=_connection_settings(args))
    return await _run_on_sim(args)


def _connection_settings(args: argparse.Namespace) -> dict[str, str]:
    settings: dict[str, str] = {}
    if args.csms_url is not None:
        settings["CentralSystemAddress"] = args.csms_url
        settings["ConnectionEnabled"] = "true"
    if args.id is not None:
        settings["ChargePointId"] = args.id
    return settings


async def _run_on_sim(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from ops.run import default_sim_dir, run_station, sim_config  # noqa: PLC0415
    from ops.sim.app import DeviceSpec, SimConfig, Simulator  # noqa: PLC0415

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # Resolved once at start-up, before anything runs concurrently.
    given = Path(os.path.abspath(args.data_dir)) if args.data_dir else None  # noqa: ASYNC240
    if given is not None:
        _existing_dir(given)
    board = args.sim_board or "evse-din"
    if args.web_port:
        _port_free(args.web_port, "--web-port")
    sim = Simulator(
        SimConfig(
            devices=[DeviceSpec(board, 1), DeviceSpec("sdm630", 2)],
            tcp_port=0,
            # Free ports unless told: next to a running `evse sim` (8020), or another
            # `evse run --sim`.
            control_port=args.sim_control_port or 0,
        )
    )
    code = EXIT_OK
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(sim.run)
        # A new directory only once the simulator serves: a port in use leaves none.
        data_dir = given if given is not None else default_sim_dir()
        port = endpoints.tcp if (args.sim_transport or "tcp") == "tcp" else endpoints.rtu
        config = sim_config(port, data_dir, board=board, web_port=args.web_port or 0)
        ready: dict[str, Any] = {
            "simulator": endpoints.to_json(),
            "control_socket": str(config.control.socket),
            "data_dir": str(data_dir),
        }

        def web_ready(url: str) -> None:
            # The ready line once the page serves too: a script reads every address from it.
            print(json.dumps({"ready": {**ready, "web": url}}), flush=True)

        code = await run_station(
            config, settings=_connection_settings(args), on_web_ready=web_ready
        )
        nursery.cancel_scope.cancel(reason="station stopped")
    return code


def _port_free(port: int, option: str) -> None:
    """A port asked for is free now, or the command stops in one line (the page's
    server would otherwise retry in the background, and the ready line never come)."""
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UsageError(f"{option} {port}: {exc.strerror or exc}") from None


def _existing_dir(path: os.PathLike[str] | str) -> None:
    """--data-dir names a directory that exists (a typo must not create a store)."""
    if not os.path.exists(path):
        raise UsageError(f"--data-dir {path}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"--data-dir {path}: not a directory")


def _socket_path(args: argparse.Namespace) -> str:
    """The control socket of the station the command is about (FIND_STATION)."""
    if args.socket:
        return str(args.socket)
    if args.config:
        from ops.config import load_config  # noqa: PLC0415

        return str(load_config(args.config).control.socket)
    return os.environ.get("EVSE_CONTROL_SOCKET", DEFAULT_SOCKET)


async def _request(
    path: str, method: str, resource: str, body: dict[str, Any] | None = None
) -> Any:
    """One request to the control socket (ops/control.py's interface).

    The HTTP client alone, not ops.control: a command that asks a station must
    not import the station it asks (a second and more per call on a gateway).
    """
    from ops.httpjson import request_json  # noqa: PLC0415

    return await request_json("localhost", 0, method, resource, body, unix_socket=path)


async def _ask(path: str, method: str, resource: str, body: dict[str, Any] | None = None) -> Any:
    """The station's answer; StationUnreachable in one line when none answers."""
    try:
        return await _request(path, method, resource, body)
    except OSError as exc:
        raise StationUnreachable(f"no station at {path} ({exc.strerror or exc})") from None
    except trio.TooSlowError:
        raise StationUnreachable(f"the station at {path} did not answer within 5 s") from None


async def _run_status(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    view = await _ask(path, "GET", "/status")
    if args.json:
        print(json.dumps(view, indent=2))
        return EXIT_OK
    if args.watch is None:
        print(format_status(view))
        return EXIT_OK
    return await _watch(path, args.watch, view)


async def _watch(path: str, interval: float, view: Any) -> int:
    """Redraw the status every ``interval`` s until SIGINT (Ctrl-C) or SIGTERM: exit 0.

    The signals are taken by trio's receiver, so Ctrl-C ends the loop instead of
    raising KeyboardInterrupt through it. A station that goes away while watched
    (a restart) is shown as such and asked again: the watch outlives it.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def until_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel(reason="signal")
                    return

            nursery.start_soon(until_signal)
            await _redraw(path, interval, view)
    return EXIT_OK


async def _redraw(path: str, interval: float, view: Any) -> None:
    """One frame every ``interval`` s, until cancelled."""
    # A terminal gets the screen redrawn in place; a pipe or file gets one frame after
    # another, separated by a blank line.
    redraw = sys.stdout.isatty()
    while True:
        if isinstance(view, StationUnreachable):
            text = f"evse status: {view}; asking again every {interval:g} s"
        else:
            text = format_status(view)
        # Wall time, for the person reading: which moment the frame shows.
        stamp = datetime.now().astimezone().strftime("%H:%M:%S")
        head = f"evse status, every {interval:g} s (Ctrl-C to stop), {stamp}"
        frame = f"{head}\n\n{text}\n"
        sys.stdout.write("\x1b[H\x1b[J" + frame if redraw else frame + "\n")
        sys.stdout.flush()
        await trio.sleep(interval)
        try:
            view = await _ask(path, "GET", "/status")
        except StationUnreachable as exc:
            view = exc


async def _run_authorize(args: argparse.Namespace) -> int:
    answer = await _ask(_socket_path(args), "POST", "/authorize", {"id_tag": args.tag})
    status, source = answer.get("status"), answer.get("source")
    if status != "Accepted":
        raise Refused(f"id tag {answer.get('id_tag', args.tag)} not accepted: {status} ({source})")
    print(f"id tag {answer.get('id_tag', args.tag)}: {status} ({source})")
    return EXIT_OK


async def _run_stop(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    before = await _ask(path, "GET", "/status")
    tx = before.get("transaction") if isinstance(before, dict) else None
    answer = await _ask(path, "POST", "/stop", {"reason": args.reason})
    if not answer.get("stopped"):
        raise Refused("no transaction is running; nothing stopped")
    name = f"transaction {tx['id']}" if isinstance(tx, dict) else "the transaction"
    print(f"{name} stopped ({args.reason}); the current is off")
    return EXIT_OK


async def _run_transactions(args: argparse.Namespace) -> int:
    answer = await _ask(_socket_path(args), "GET", f"/transactions?limit={args.limit}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    print(format_transactions(answer.get("transactions") or []))
    return EXIT_OK


class StationUnreachable(Exception):
    pass


class Refused(Exception):
    """The station answered, and the answer is no (a tag refused, nothing to stop)."""


def _locate(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(control socket, data directory) of the station the command is about."""
    if args.config:
        from ops.config import load_config  # noqa: PLC0415

        config = load_config(args.config)
        # Before anything is opened: what root writes there stays the station's.
        run_as_owner_of(config.station.data_dir)
        return str(config.control.socket), str(config.station.data_dir)
    if args.data_dir:
        _existing_dir(args.data_dir)
        run_as_owner_of(args.data_dir)
    if args.socket or args.data_dir:
        socket = args.socket or os.path.join(args.data_dir, "control.sock")
        return socket, args.data_dir
    return os.environ.get("EVSE_CONTROL_SOCKET", "/var/lib/evse/control.sock"), None


async def _ask_station(socket: str | None, method: str, path: str, body: object = None) -> object:
    """The running station's answer, or None when no station listens there.

    A station that is there but does not answer is an error, not a reason to
    write its store behind its back.
    """
    if socket is None:
        return None
    try:
        return await _request(socket, method, path, body)  # type: ignore[arg-type]
    except OSError:
        return None
    except trio.TooSlowError:
        raise StationUnreachable(f"the station at {socket} did not answer within 5 s") from None


async def _run_config(args: argparse.Namespace) -> int:
    """Through the running station when there is one (it applies the change at
    once), else straight into its store: the same registry and validation."""
    socket, data_dir = _locate(args)
    if args.action in ("get", "set") and not args.key:
        raise UsageError(f"config {args.action} needs a KEY")
    if args.action == "set" and args.value is None:
        raise UsageError("config set needs a VALUE")
    from ops.httpjson import HTTPError  # noqa: PLC0415

    answer: object
    try:
        if args.action == "list":
            answer = await _ask_station(socket, "GET", "/config")
        elif args.action == "get":
            answer = await _ask_station(socket, "GET", "/config?" + _query({"key": args.key}))
        else:
            answer = await _ask_station(
                socket, "POST", "/config", {"key": args.key, "value": args.value}
            )
    except HTTPError as exc:  # an unknown key, a file-owned one: the station says why
        answer = {"error": exc.message}
    if answer is None:
        answer = await trio.to_thread.run_sync(_config_offline, args, data_dir)
    return _print_config(args, answer)


async def _run_passwd(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from ops.web.auth import set_password  # noqa: PLC0415
    from ops.web.errors import PasswordFileError, PasswordRejected  # noqa: PLC0415

    if args.config:
        from ops.config import load_config  # noqa: PLC0415

        data_dir = Path(load_config(args.config).station.data_dir)
    else:
        data_dir = Path(args.data_dir or "/var/lib/evse")
    _existing_dir(data_dir)
    run_as_owner_of(data_dir)
    password = await trio.to_thread.run_sync(_read_password, args.password_stdin)
    try:
        await trio.to_thread.run_sync(set_password, data_dir, password)
    except PasswordRejected as exc:
        raise UsageError(f"password refused: {exc}") from None
    except PasswordFileError as exc:
        raise StationUnreachable(str(exc)) from None
    print(f"installer password set ({data_dir / 'web-password'})")
    return EXIT_OK


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise UsageError("no password on standard input")
        return line.rstrip("\r\n")
    import getpass  # noqa: PLC0415

    first = getpass.getpass("new installer password: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the two passwords differ; nothing changed")
    return first


def _query(params: dict[str, str]) -> str:
    from urllib.parse import urlencode  # noqa: PLC0415

    return urlencode(params)


def _config_offline(args: argparse.Namespace, data_dir: str | None) -> object:
    from ops import settings_view  # noqa: PLC0415
    from ops.config import load_config  # noqa: PLC0415

    if data_dir is None:
        raise StationUnreachable("no running station; give --config or --data-dir")
    config = load_config(args.config) if args.config else None
    return settings_view.offline(args.action, args.key, args.value, data_dir, config)


def _print_config(args: argparse.Namespace, answer: object) -> int:
    from ops import settings_view  # noqa: PLC0415

    assert isinstance(answer, dict)
    code, out, err = settings_view.render(args.action, args.key, answer)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return code


async def _run_queue(args: argparse.Namespace) -> int:
    socket, data_dir = _locate(args)
    answer = await _ask_station(socket, "GET", "/queue")
    if answer is None:
        answer = await trio.to_thread.run_sync(_queue_offline, data_dir)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        assert isinstance(answer, dict)
        print(format_queue(answer))
    return EXIT_OK


def _queue_offline(data_dir: str | None) -> object:
    """The queue from the store, in the control socket's shape (``evse queue`` reads one)."""
    from pathlib import Path  # noqa: PLC0415

    from ocpp16.queue import TransactionQueue  # noqa: PLC0415

    if data_dir is None:
        raise StationUnreachable("no running station; give --config or --data-dir")
    with TransactionQueue.open(Path(data_dir) / "station.sqlite") as queue:
        return {
            "pending": [
                {
                    "seq": m.seq,
                    "action": m.action,
                    "transaction": m.local_tx_id,
                    "attempts": m.attempts,
                    "last_error": m.last_error,
                }
                for m in queue.pending()
            ],
            "dead_letters": [
                {
                    "seq": d.seq,
                    "action": d.action,
                    "transaction": d.local_tx_id,
                    "attempts": d.attempts,
                    "reason": d.reason,
                    "died_at": d.died_at.isoformat().replace("+00:00", "Z"),
                    "payload": d.payload,
                }
                for d in queue.dead_letters()
            ],
        }


# -- for people: units, rounding, words --------------------------------------------------

#: What bounds the offered current (evse/limits.py's ``bound_by``), in words.
BOUND_BY = {
    "hardware": "the board's maximum",
    "installer": "the installer's maximum",
    "cable": "the cable's capacity",
    "smart_charging": "the central system's charging profile",
    "fallback": "the fallback limit (the central system is unreachable)",
    "mains lost": "mains power is lost",
    "starting": "the station is starting",
    "deauthorized": "the tag was deauthorized",
}
#: Causes that are 0 A by themselves (not a limit that happens to be below 6 A).
ZERO_CAUSES = frozenset({"mains lost", "starting", "deauthorized"})
BELOW_MINIMUM = " (below 6 A)"


def energy(wh: object) -> str:
    """Wh below 1 kWh (one decimal), kWh above (three: a meter's resolution is 1 Wh)."""
    if not isinstance(wh, int | float) or isinstance(wh, bool):
        return "unknown"
    if abs(wh) < 1000:
        return f"{wh:.1f} Wh"
    return f"{wh / 1000:.3f} kWh"


def power(w: object) -> str:
    if not isinstance(w, int | float) or isinstance(w, bool):
        return "unknown"
    return f"{w / 1000:.2f} kW"


def amps(a: object) -> str:
    if not isinstance(a, int | float) or isinstance(a, bool):
        return "unknown"
    return f"{a:.1f} A"


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def when(text: object) -> str:
    """A UTC ISO 8601 time as ``2026-12-02 07:10:04 UTC`` (the station's times are UTC)."""
    at = _parse_time(text)
    if at is None:
        return str(text) if text is not None else "unknown"
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _since(text: object, now: datetime) -> str:
    at = _parse_time(text)
    if at is None:
        return when(text)
    return f"{when(text)} ({duration((now - at).total_seconds())} ago)"


def limit_in_words(limit: object) -> str:
    """``16.0 A, set by the installer's maximum`` / ``0 A: mains power is lost``."""
    if not isinstance(limit, dict):
        return "unknown"
    bound = str(limit.get("bound_by") or "unknown")
    below = bound.endswith(BELOW_MINIMUM)
    base = bound.removesuffix(BELOW_MINIMUM)
    words = BOUND_BY.get(base, base)
    if base in ZERO_CAUSES:
        return f"0 A: {words}"
    if below:
        return f"0 A: {words} is below 6 A, the least a pilot can offer (no charging)"
    return f"{amps(limit.get('amps'))}, set by {words}"


def central_system_in_words(cs: object) -> str:
    """The connection, why it is in that state, and where it goes."""
    if not isinstance(cs, dict):
        return "unknown"
    link = cs.get("link")
    if link is None:
        # The standalone port knows only that there is none.
        return "none (standalone)" if cs.get("state") == "not_configured" else str(cs.get("state"))
    text = str(link)
    if link == "connected" and cs.get("registration"):
        text += f", {cs['registration']}"
    if cs.get("reason"):
        text += f": {cs['reason']}"
    address = cs.get("address")
    if address:
        cp = cs.get("charge_point_id") or ""
        text += f" ({address}{cp})" if str(address).endswith("/") else f" ({address})"
    return text


def _plural(n: object, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def format_status(view: dict[str, Any], now: datetime | None = None) -> str:
    """The one-screen summary an installer reads (``now``: for "ago"; wall time)."""
    now = now or datetime.now(UTC)
    status = str(view.get("status", "unknown"))
    error = view.get("error_code")
    head = f"connector {view.get('connector', '?')}: {status}"
    if error and error != "NoError":
        head += f" ({error})"
    if view.get("status_since"):
        head += f" since {_since(view['status_since'], now)}"
    lines = [head]
    if "pilot" in view or "limit" in view:
        lines.append(
            f"  pilot {view.get('pilot', '?')}, offered {amps(view.get('offered_a'))}"
            f" (limit {limit_in_words(view.get('limit'))})"
        )
    if "power_w" in view or "energy_wh" in view:
        currents = view.get("current_a")
        phases = (
            " / ".join(amps(a) for a in currents).replace(" A /", " /")
            if isinstance(currents, list) and currents
            else "unknown"
        )
        lines.append(
            f"  power {power(view.get('power_w'))}, current {phases},"
            f" meter {energy(view.get('energy_wh'))}"
        )
    faults = view.get("faults")
    if isinstance(faults, dict) and faults:
        lines.append(
            "  faults: " + ", ".join(f"{k} ({v})" if v else str(k) for k, v in faults.items())
        )
    tx = view.get("transaction")
    if isinstance(tx, dict):
        lines.append(
            f"  transaction {tx.get('id')} for {tx.get('id_tag')} since"
            f" {_since(tx.get('started_at'), now)}: {energy(tx.get('energy_wh'))}"
        )
    lines.extend(
        f"  recovered at start: transaction {rec.get('id')} for {rec.get('id_tag')},"
        f" started {when(rec.get('started_at'))}, ended {rec.get('stop_reason')}"
        f" at {when(rec.get('stopped_at'))}: {energy(rec.get('energy_wh'))}"
        for rec in view.get("recovered") or []
        if isinstance(rec, dict)
    )
    if "central_system" in view:
        lines.append(f"  central system: {central_system_in_words(view['central_system'])}")
    queue = view.get("queue")
    cs = view.get("central_system")
    if isinstance(queue, dict):
        text = _plural(queue.get("pending"), "message", "messages") + " waiting"
        dead = queue.get("dead_letters")
        if dead is not None:
            text += ", " + _plural(dead, "dead letter", "dead letters")
            if dead:
                text += " (evse queue lists them)"
        lines.append(f"  queue: {text}")
    elif isinstance(cs, dict) and cs.get("queued_messages") is not None:
        lines.append(f"  queue: {_plural(cs['queued_messages'], 'message', 'messages')} waiting")
    lines.extend(
        f"  transfer {transfer_in_words(t)}"
        for t in view.get("transfers") or []
        if isinstance(t, dict)
    )
    reader = view.get("rfid_reader")
    if isinstance(reader, dict):
        reason = f" ({reader['reason']})" if reader.get("reason") else ""
        lines.append(f"  rfid reader: {reader.get('status')}{reason}")
    if view.get("lock") is not None:
        lines.append(f"  socket lock: {view['lock']}")
    if "operative" in view:
        lines.append(f"  operative: {'yes' if view['operative'] else 'no'}")
    return "\n".join(lines)


def transfer_in_words(t: dict[str, Any]) -> str:
    from ops.progress import size  # noqa: PLC0415

    done = size(t.get("bytes") or 0)
    if t.get("total") is not None:
        done += f" of {size(t['total'])}"
        if t.get("percent") is not None:
            done += f" ({t['percent']:.0f} %)"
    state = t.get("state")
    if state == "failed":
        return f"{t.get('name')}: failed at {done}: {t.get('reason')}"
    rate = t.get("rate_bps")
    if state == "running" and rate:
        done += f", {size(rate)}/s"
    return f"{t.get('name')}: {'done, ' if state == 'done' else ''}{done}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> str:
    """Columns as wide as their widest cell; the columns in ``right`` right-aligned."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)
        ).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def format_transactions(records: Sequence[dict[str, Any]]) -> str:
    if not records:
        return "no transactions"
    rows = [
        (
            r.get("id"),
            r.get("id_tag"),
            when(r.get("started_at")).removesuffix(" UTC"),
            when(r.get("stopped_at")).removesuffix(" UTC") if r.get("stopped_at") else "running",
            energy(r.get("energy_wh")),
            r.get("stop_reason") or "",
        )
        for r in records
    ]
    return table(("id", "id tag", "started (UTC)", "ended (UTC)", "energy", "reason"), rows, {0, 4})


def format_queue(answer: dict[str, Any]) -> str:
    pending = answer.get("pending") or []
    dead = answer.get("dead_letters") or []
    parts = []
    if pending:
        parts.append(f"waiting for the central system ({len(pending)}, oldest first):")
        rows = [
            (
                m.get("seq"),
                m.get("action"),
                m.get("transaction"),
                m.get("attempts"),
                m.get("last_error") or "",
            )
            for m in pending
        ]
        parts.append(
            table(("seq", "action", "transaction", "attempts", "last error"), rows, {0, 2, 3})
        )
    else:
        parts.append("no messages waiting")
    if dead:
        parts.append(f"dead letters ({len(dead)}, given up):")
        dead_rows = [
            (
                d.get("seq"),
                d.get("action"),
                d.get("transaction"),
                d.get("attempts"),
                when(d.get("died_at")).removesuffix(" UTC") if d.get("died_at") else "",
                d.get("reason") or "",
            )
            for d in dead
        ]
        parts.append(
            table(
                ("seq", "action", "transaction", "attempts", "given up (UTC)", "reason"),
                dead_rows,
                {0, 2, 3},
            )
        )
    else:
        parts.append("no dead letters")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse has printed the usage error (or the help); report its code.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logs.configure(
        logging.DEBUG if args.verbose else logging.WARNING,
        getattr(args, "log_format", None) or "auto",
    )
    runner = {
        "probe": _run_probe,
        "sim": _run_sim,
        "demo": _run_demo,
        "run": _run_station,
        "status": _run_status,
        "authorize": _run_authorize,
        "stop": _run_stop,
        "transactions": _run_transactions,
        "config": _run_config,
        "queue": _run_queue,
        "passwd": _run_passwd,
        "install": installer.run,
        "uninstall": installer.run,
        "release": release.run,
    }[args.command]
    try:
        code = trio.run(partial(runner, args))
        if args.command == "run" and code == _restart_code():
            # OCPP Reset: the firmware starts again from the top, same arguments.
            logging.shutdown()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606
        return code
    except BaseException as exc:
        if _interrupted(exc):
            # Ctrl-C outside a station's run (evse run catches its signals).
            return 130
        if not isinstance(exc, Exception):
            raise
        if _broken_pipe(exc):
            # The reader went away (evse transactions | head): no traceback, and
            # no second error when Python flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FAILED
        known = _explain(exc)
        if known is None:
            raise
        code, message = known
        print(f"evse {args.command}: {message}", file=sys.stderr)
        return code


def _broken_pipe(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _broken_pipe(exc.exceptions[0])
    return isinstance(exc, BrokenPipeError)


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, possibly inside exception groups (from a nursery)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_interrupted(e) for e in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _restart_code() -> int:
    from ops.run import EXIT_RESTART  # noqa: PLC0415 - probe must not load the station

    return EXIT_RESTART


def _explain(exc: BaseException) -> tuple[int, str] | None:
    """Exit code and one line for an error an operator can cause; None otherwise."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _explain(exc.exceptions[0])
    from evse.errors import HardwareUnavailable, StoreError  # noqa: PLC0415
    from ocpp16.errors import ConfigRejected, QueueError  # noqa: PLC0415
    from ops.config import ConfigError  # noqa: PLC0415
    from ops.httpjson import HTTPError  # noqa: PLC0415
    from ops.lock import LockHeld, LockUnusable  # noqa: PLC0415

    # Only a loaded simulator raises its error: importing it here would load the
    # simulator (tty, termios) into a station that never ran it, and fail where
    # the interpreter's files are not readable to the user dropped to.
    sim = sys.modules.get("ops.sim.app")
    simulator_error: tuple[type[BaseException], ...] = (
        (sim.SimulatorError,) if sim is not None else ()
    )
    if isinstance(exc, ConfigError | ConfigRejected):
        return EXIT_CONFIG, f"error: {exc}"
    if isinstance(exc, LockHeld):
        return EXIT_LOCKED, f"error: {exc}"
    if isinstance(exc, LockUnusable):
        # A lock directory that cannot be used ($EVSE_LOCK_DIR, permissions)
        # does not fix itself: like a refused configuration.
        return EXIT_CONFIG, f"error: {exc}"
    if isinstance(exc, HardwareUnavailable):
        return EXIT_HARDWARE, f"error: {exc}"
    if isinstance(exc, HTTPError):
        # The station's control socket refused the request (404: unknown setting).
        return (EXIT_USAGE if exc.status in (400, 404) else EXIT_FAILED), f"error: {exc.message}"
    if isinstance(exc, PrivilegeError):
        return EXIT_FAILED, f"error: {exc}"
    if isinstance(exc, (StationUnreachable, Refused, StoreError, QueueError, *simulator_error)):
        return EXIT_FAILED, f"error: {exc}"
    if isinstance(exc, UsageError | ValueError | PortConfigError):
        return EXIT_USAGE, f"error: {exc}"
    if isinstance(exc, FieldbusError):
        return EXIT_FAILED, f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
