"""Sessions: tests, quick, lint, typecheck, bench, demo.

Every install is pinned by constraints.txt. The bench central system is the
evse-lab package (lab/), outside the firmware's wheel: the sessions that run
it (tests, quick, bench, demo) and typecheck install it next to the firmware.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint", "typecheck"]

PINNED = ("-c", "constraints.txt")
LAB = ("-e", "./lab")
#: Two workers (pytest-xdist): the machines have two cores.
WORKERS = ("-n", "2")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, on two workers, with branch coverage of every
    process it starts (pyproject.toml: [tool.coverage.run] patch), combined.

    ``nox -s tests -- -n 0`` runs it on one worker; other arguments go to pytest.
    """
    session.install(*PINNED, "-e", ".[test]", *LAB)
    # Children started in another directory (a test's tmp_path) write their
    # data next to ours, where `coverage combine` finds it.
    session.env["COVERAGE_FILE"] = str(Path(".coverage").resolve())
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *WORKERS, *session.posargs)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report")


@nox.session
def quick(session: nox.Session) -> None:
    """The fast lane: every test that starts no process (not marked slow), on two
    workers: under a minute on two cores, no coverage.
    """
    session.install(*PINNED, "-e", ".[test]", *LAB)
    session.run(
        "pytest",
        "-q",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        *WORKERS,
        *session.posargs,
        # Fewer examples of the state machines here (station 15 of 20-50,
        # connector 100 of 300): the full suite (nox -s tests, CI) runs them all.
        env={"EVSE_STATEFUL_EXAMPLES": "15", "EVSE_CONNECTOR_EXAMPLES": "100"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*PINNED, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(*PINNED, "-e", ".[test]", *LAB, "mypy", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: JSON lines on stdout and in bench-results/results.jsonl."""
    session.install(*PINNED, "-e", ".[test]", *LAB)
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    session.install(*PINNED, "-e", ".", *LAB)
    session.run("evse", "demo")
