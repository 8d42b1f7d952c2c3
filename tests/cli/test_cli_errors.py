"""How the command line fails: the store setting, unreachable stores, secrets, bugs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tests.cli._cli_support import Cli

import ducto.cli
from ducto._cli import commands
from ducto.cli import main


def test_no_store_configured(cli: Cli) -> None:
    """Without --store or DUCTO_STORE_URL a store command is a usage error."""
    ran = cli("balance", "alice", store=False)

    assert 2 == ran.status
    assert "pass --store URL or set DUCTO_STORE_URL" in ran.error_line()


def test_store_from_the_environment(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """DUCTO_STORE_URL names the store when --store is absent."""
    cli.ok("grant", "alice", "12")
    monkeypatch.setenv("DUCTO_STORE_URL", cli.url)

    ran = cli("--json", "balance", "alice", store=False)

    assert 12 == ran.json()["balance"]


def test_password_on_the_command_line_is_refused(cli: Cli) -> None:
    """A URL with a password in --store is refused, and the password is not echoed."""
    ran = cli(
        "--store", "postgresql://ops:hunter2@db.internal/billing", "balance", "a", store=False
    )

    assert 2 == ran.status
    assert "--store must not carry a password" in ran.error_line()
    assert "hunter2" not in ran.err


def test_password_from_the_environment_is_never_printed(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors that quote the URL hide its password."""
    monkeypatch.setenv("DUCTO_STORE_URL", "nosuchdb://ops:hunter2@db.internal/billing")

    ran = cli("balance", "alice", store=False)

    assert 2 == ran.status
    assert "unsupported store url scheme 'nosuchdb'" in ran.error_line()
    assert "hunter2" not in ran.err
    assert "ops:***@db.internal" in ran.err


def test_unreachable_store(cli: Cli, tmp_path: Path) -> None:
    """A database that cannot be opened is a store error: status 3, one line."""
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}"

    ran = cli("--store", url, "setup", store=False)

    assert 3 == ran.status
    assert "store error" in ran.error_line()


def test_missing_database_file_is_not_created(cli: Cli, tmp_path: Path) -> None:
    """A command other than setup on a database file that does not exist creates nothing."""
    path = tmp_path / "typo.db"

    ran = cli("--store", f"sqlite:///{path}", "balance", "alice", store=False)

    assert 3 == ran.status
    assert "create it with 'ducto setup'" in ran.error_line()
    assert not path.exists()


def test_missing_schema_says_to_run_setup(cli: Cli, tmp_path: Path) -> None:
    """An existing database without the schema points at `ducto setup`."""
    path = tmp_path / "empty.db"
    path.touch()

    ran = cli("--store", f"sqlite:///{path}", "balance", "alice", store=False)

    assert 3 == ran.status
    assert "run 'ducto setup'" in ran.error_line()


def test_trio_not_installed(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """--backend trio without trio says which extra to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trio" else real(name, *a)
    )

    ran = cli("--backend", "trio", "balance", "alice", store=False)

    assert 2 == ran.status
    assert "pip install 'ducto[trio]'" in ran.error_line()


def test_a_bug_keeps_its_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that is not a DuctoError is a bug: it propagates with its traceback."""

    async def broken(ctx: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "cmd_balance", broken)

    with pytest.raises(RuntimeError, match="a bug"):
        main(["--store", cli.url, "balance", "alice"])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    status = main(["--version"])

    assert 0 == status
    assert capsys.readouterr().out.startswith("ducto ")


def test_cli_module_exports_main() -> None:
    """The console script's target is the module's one public name."""
    assert ["main"] == ducto.cli.__all__


def test_missing_sqlite_driver_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under asyncio without aiosqlite, the error names the extra and the trio way round."""
    monkeypatch.setitem(sys.modules, "aiosqlite", None)

    status = main(["--store", f"sqlite:///{tmp_path / 'x.db'}", "--backend", "asyncio", "setup"])

    err = capsys.readouterr().err
    assert 2 == status
    assert "pip install 'ducto[sqlite]'" in err
    assert "--backend trio" in err
    assert 1 == len(err.strip().splitlines())
