"""nox sessions: tests (per Python x extras), lint, typing, examples."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typing", "examples"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS)
@nox.parametrize("extras", ["", "sqlite"])
def tests(session: nox.Session, extras: str) -> None:
    """Run the suite; the bare run proves the optional extras are optional."""
    wanted = ",".join(filter(None, ["test", extras]))
    session.install(f".[{wanted}]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict with the pydantic plugin over src/ and tests/typing/."""
    session.install(".[dev]")
    session.run("mypy")


@nox.session
def examples(session: nox.Session) -> None:
    """Run the examples the way the test suite does."""
    session.install(".[test,sqlite]")
    session.run("pytest", "tests/test_examples.py")
