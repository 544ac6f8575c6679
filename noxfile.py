"""Sessions: tests, quick, lint, typecheck, bench, demo.

Every install is pinned by constraints.txt.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint", "typecheck"]

PINNED = ("-c", "constraints.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite with branch coverage."""
    session.install(*PINNED, "-e", ".[test]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", success_codes=[0, 1])
    session.run("coverage", "report")


@nox.session
def quick(session: nox.Session) -> None:
    """The fast lane: every test that starts no process (not marked slow), on two
    workers (pytest-xdist): under a minute on two cores. ``nox -s tests`` (what CI
    runs) still runs everything, one test at a time, with coverage.
    """
    session.install(*PINNED, "-e", ".[test]", "pytest-xdist")
    session.run(
        "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-n", "2", *session.posargs
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*PINNED, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(*PINNED, "-e", ".[test]", "mypy", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: JSON lines on stdout and in bench-results/results.jsonl."""
    session.install(*PINNED, "-e", ".[test]")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    session.install(*PINNED, "-e", ".")
    session.run("evse", "demo")
