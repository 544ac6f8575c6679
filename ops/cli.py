"""The ``evse`` command line.

Errors an installer can cause (a wrong port, a silent device, a bad option,
a port in use, a second station) end in ONE line on stderr naming what
failed, and a non-zero exit, never a traceback. Exit codes: 0 ok, 1 the
operation failed (device, bus, store, no station answering), 2 usage error
(a bad option or value, an unknown setting); ``evse run`` adds 69, 70, 75 and
78 (see ops/systemd.py).
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
from functools import partial
from typing import NoReturn

import trio

from fieldbus.errors import FieldbusError, PortConfigError
from ops.probe import KINDS, probe
from ops.systemd import EXIT_CONFIG, EXIT_HARDWARE, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from ops.systemd import EXIT_FAILURE as EXIT_FAILED


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _station_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="the station's config file")
    p.add_argument("--socket", metavar="PATH", help="the running station's control socket")
    p.add_argument(
        "--data-dir", metavar="DIR", help="the station's data directory (when it is not running)"
    )


DESCRIPTION = (
    "EV charging-station firmware: run the station (evse run), read a device (evse probe), "
    "simulate the devices (evse sim), see and change a running station (evse status, "
    "evse config, evse queue), or try it all at once (evse demo)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evse", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # -v after the command works too (evse run --sim -v).
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = sub.add_parser(
        "probe", parents=[common], help="read one device once and print its reading as JSON"
    )
    p.add_argument("kind", metavar="KIND", help=f"device model: {', '.join(KINDS)}")
    p.add_argument(
        "port",
        metavar="PORT",
        help="tcp://HOST:PORT or rtu:///dev/ttyX?baud=9600&parity=N&stopbits=1",
    )
    p.add_argument("--unit", type=_unit, default=None, help="Modbus unit id 1..247")
    p.add_argument("--timeout", type=_seconds, default=1.0, help="seconds per request (default 1)")

    s = sub.add_parser(
        "sim", parents=[common], help="run the device simulator (Modbus TCP, RTU on a pty, HTTP)"
    )
    s.add_argument(
        "--device",
        action="append",
        metavar="KIND[:UNIT]",
        help="simulated device (repeatable; default evse-din:1 and sdm630:2)",
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
    s.add_argument("--rtu-link", metavar="PATH", help="symlink to the pty's serial device")
    s.add_argument(
        "--control-port",
        type=_port_number,
        default=8020,
        help="HTTP control port (default 8020, 0 = any free port)",
    )

    r = sub.add_parser(
        "run", parents=[common], help="run the station (from a config file, or on the simulator)"
    )
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
        help="with --sim: the simulator's HTTP control port (default 0: any free port; "
        "the ready line names it)",
    )

    st = sub.add_parser("status", parents=[common], help="show the running station's state")
    st.add_argument("--socket", metavar="PATH", help="the station's control socket")
    st.add_argument("--config", metavar="FILE", help="take the socket path from this config")
    st.add_argument("--json", action="store_true", help="print the full state as JSON")

    cf = sub.add_parser(
        "config", parents=[common], help="read or change a setting (OCPP key or installer setting)"
    )
    cf.add_argument("action", choices=("get", "set", "list"), help="what to do")
    cf.add_argument(
        "key",
        nargs="?",
        help="OCPP key or installer name, e.g. HeartbeatInterval "
        "or connection.central_system_address",
    )
    cf.add_argument("value", nargs="?", help="the new value (set)")
    _station_location(cf)

    q = sub.add_parser(
        "queue", parents=[common], help="transaction messages waiting, and the dead letters"
    )
    _station_location(q)

    d = sub.add_parser(
        "demo", parents=[common], help="simulator + station: a full charging session, then exit"
    )
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
            )
            if value is not None
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)}: only with --sim (the config file sets the station's "
                "data directory and devices)"
            )
        config = load_config(args.config)
        logging.getLogger().setLevel(
            logging.DEBUG if args.verbose else config.logging.level.upper()
        )
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
        config = sim_config(port, data_dir, board=board)
        print(
            json.dumps(
                {
                    "ready": {
                        "simulator": endpoints.to_json(),
                        "control_socket": str(config.control.socket),
                        "data_dir": str(data_dir),
                    }
                }
            ),
            flush=True,
        )
        code = await run_station(config, settings=_connection_settings(args))
        nursery.cancel_scope.cancel(reason="station stopped")
    return code


def _existing_dir(path: os.PathLike[str] | str) -> None:
    """--data-dir names a directory that exists (a typo must not create a store)."""
    if not os.path.exists(path):
        raise UsageError(f"--data-dir {path}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"--data-dir {path}: not a directory")


async def _run_status(args: argparse.Namespace) -> int:
    from ops.control import query  # noqa: PLC0415

    if args.socket:
        path = args.socket
    elif args.config:
        from ops.config import load_config  # noqa: PLC0415

        path = str(load_config(args.config).control.socket)
    else:
        path = os.environ.get("EVSE_CONTROL_SOCKET", "/var/lib/evse/control.sock")
    try:
        view = await query(path, "GET", "/status")
    except OSError as exc:
        raise StationUnreachable(f"no station at {path} ({exc.strerror or exc})") from None
    except trio.TooSlowError:
        raise StationUnreachable(f"the station at {path} did not answer within 5 s") from None
    if args.json:
        print(json.dumps(view, indent=2))
        return EXIT_OK
    print(format_status(view))
    return EXIT_OK


class StationUnreachable(Exception):
    pass


def _locate(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(control socket, data directory) of the station the command is about."""
    if args.config:
        from ops.config import load_config  # noqa: PLC0415

        config = load_config(args.config)
        return str(config.control.socket), str(config.station.data_dir)
    if args.data_dir:
        _existing_dir(args.data_dir)
    if args.socket or args.data_dir:
        socket = args.socket or os.path.join(args.data_dir, "control.sock")
        return socket, args.data_dir
    return os.environ.get("EVSE_CONTROL_SOCKET", "/var/lib/evse/control.sock"), None


async def _ask_station(socket: str | None, method: str, path: str, body: object = None) -> object:
    """The running station's answer, or None when no station listens there.

    A station that is there but does not answer is an error, not a reason to
    write its store behind its back.
    """
    from ops.control import query  # noqa: PLC0415

    if socket is None:
        return None
    try:
        return await query(socket, method, path, body)  # type: ignore[arg-type]
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
    if args.action == "list":
        answer = await _ask_station(socket, "GET", "/config")
    elif args.action == "get":
        answer = await _ask_station(socket, "GET", "/config?" + _query({"key": args.key}))
    else:
        answer = await _ask_station(
            socket, "POST", "/config", {"key": args.key, "value": args.value}
        )
    if answer is None:
        answer = await trio.to_thread.run_sync(_config_offline, args, data_dir)
    return _print_config(args, answer)


def _query(params: dict[str, str]) -> str:
    from urllib.parse import urlencode  # noqa: PLC0415

    return urlencode(params)


def _config_offline(args: argparse.Namespace, data_dir: str | None) -> object:
    from pathlib import Path  # noqa: PLC0415

    from evse.store import Store  # noqa: PLC0415
    from ocpp16.config import Configuration  # noqa: PLC0415

    if data_dir is None:
        raise StationUnreachable("no running station; give --config or --data-dir")
    with Store.open(Path(data_dir) / "station.sqlite") as store:
        registry = Configuration(store)
        if args.action == "list":
            return {
                "settings": registry.installer_view(),
                "ocpp": registry.get_configuration(None)[0],
            }
        key = registry.resolve(args.key)
        if key is None:
            raise UsageError(f"unknown setting {args.key!r}")
        if args.action == "get":
            return {"key": key.name, "value": registry.text(key.name), "readonly": key.readonly}
        result = registry.change(args.key, args.value, source="installer")
        return {"status": result.status, "reason": result.reason}


def _print_config(args: argparse.Namespace, answer: object) -> int:
    assert isinstance(answer, dict)
    if args.action == "list":
        for row in answer["settings"]:
            print(f"{row['name']:<42} {row['value']}")
        for entry in answer["ocpp"]:
            print(f"{entry['key']:<42} {entry.get('value', '(hidden)')}")
        return EXIT_OK
    if args.action == "get":
        print(answer["value"])
        return EXIT_OK
    if answer["status"] in ("Accepted", "RebootRequired"):
        print(answer["status"])
        return EXIT_OK
    print(
        f"evse config: error: {args.key}: {answer['status']}: {answer['reason']}", file=sys.stderr
    )
    return EXIT_USAGE


async def _run_queue(args: argparse.Namespace) -> int:
    socket, data_dir = _locate(args)
    answer = await _ask_station(socket, "GET", "/queue")
    if answer is None:
        answer = await trio.to_thread.run_sync(_queue_offline, data_dir)
    print(json.dumps(answer, indent=2))
    return EXIT_OK


def _queue_offline(data_dir: str | None) -> object:
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
                }
                for m in queue.pending()
            ],
            "dead_letters": [
                {"seq": d.seq, "action": d.action, "transaction": d.local_tx_id, "reason": d.reason}
                for d in queue.dead_letters()
            ],
        }


def format_status(view: dict[str, object]) -> str:
    """The one-screen summary an installer reads."""
    lines = [
        f"connector {view['connector']}: {view['status']}"
        + (f" ({view['error_code']})" if view["error_code"] != "NoError" else ""),
        f"  pilot {view['pilot']}, offered {view['offered_a']} A, limit {view['limit']}",
        f"  power {view['power_w']} W, meter {view['energy_wh']} Wh",
    ]
    faults = view.get("faults")
    if isinstance(faults, dict) and faults:
        lines.append("  faults: " + ", ".join(f"{k} ({v})" for k, v in faults.items()))
    tx = view.get("transaction")
    if isinstance(tx, dict):
        lines.append(
            f"  transaction {tx['id']} for {tx['id_tag']} since {tx['started_at']}: "
            f"{tx['energy_wh']} Wh"
        )
    cs = view["central_system"]
    if isinstance(cs, dict):
        link = f"{cs.get('state')}"
        if cs.get("registration"):
            link += f", {cs['registration']}"
        if cs.get("reason"):
            link += f" ({cs['reason']})"
        if cs.get("queued_messages"):
            link += f", {cs['queued_messages']} messages queued"
        lines.append(f"  central system: {link}")
    lines.append(f"  operative: {view['operative']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse has printed the usage error (or the help); report its code.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    runner = {
        "probe": _run_probe,
        "sim": _run_sim,
        "demo": _run_demo,
        "run": _run_station,
        "status": _run_status,
        "config": _run_config,
        "queue": _run_queue,
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
        known = _explain(exc)
        if known is None:
            raise
        code, message = known
        print(f"evse {args.command}: {message}", file=sys.stderr)
        return code


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
    from ops.sim.app import SimulatorError  # noqa: PLC0415

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
    if isinstance(exc, StationUnreachable | SimulatorError | StoreError | QueueError):
        return EXIT_FAILED, f"error: {exc}"
    if isinstance(exc, UsageError | ValueError | PortConfigError):
        return EXIT_USAGE, f"error: {exc}"
    if isinstance(exc, FieldbusError):
        return EXIT_FAILED, f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
