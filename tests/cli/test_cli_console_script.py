"""The installed ``ducto`` console script and ``python -m ducto``, run as an operator would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _script() -> str:
    found = shutil.which("ducto", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("the ducto console script is not installed next to this Python")
    return found


def _run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DUCTO_STORE_URL"}
    environment.update(env or {})
    return subprocess.run(
        [_script(), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_line(completed: subprocess.CompletedProcess[str]) -> str:
    lines = completed.stderr.strip().splitlines()
    assert 1 == len(lines), completed.stderr
    assert "Traceback" not in completed.stderr
    return lines[0]


@pytest.fixture
def backend() -> str:
    """asyncio when aiosqlite is installed, else trio (the SQLite store's thread path)."""
    import importlib.util

    return "asyncio" if importlib.util.find_spec("aiosqlite") is not None else "trio"


def test_help_works(tmp_path: Path) -> None:
    """`ducto --help` and `python -m ducto --help` both print the usage."""
    script = _run("--help", cwd=tmp_path)
    module = subprocess.run(
        [sys.executable, "-m", "ducto", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert 0 == script.returncode == module.returncode
    assert "usage: ducto" in script.stdout
    assert script.stdout.replace("python -m ducto", "ducto") == module.stdout.replace(
        "__main__.py", "ducto"
    )


def test_an_operator_session(tmp_path: Path, backend: str) -> None:
    """Set up a store, publish pricing, grant by CSV twice, read the balance as JSON."""
    env = {"DUCTO_STORE_URL": "sqlite:///billing.db"}
    (tmp_path / "pricing.json").write_text(json.dumps({"models": {"_default": "input_tokens"}}))
    (tmp_path / "grants.csv").write_text("user_id,amount,type\nalice,100,purchase\nbob,5,\n")

    steps = [
        _run("--backend", backend, "setup", cwd=tmp_path, env=env),
        _run("--backend", backend, "pricing", "set", "pricing.json", cwd=tmp_path, env=env),
        _run("--backend", backend, "grant", "--csv", "grants.csv", cwd=tmp_path, env=env),
        _run("--backend", backend, "grant", "--csv", "grants.csv", cwd=tmp_path, env=env),
    ]
    balance = _run("--backend", backend, "--json", "balance", "alice", cwd=tmp_path, env=env)

    assert [0, 0, 0, 0, 0] == [s.returncode for s in [*steps, balance]], [s.stderr for s in steps]
    assert "already applied before  2" in steps[3].stdout
    assert 100 == json.loads(balance.stdout)["balance"]


def test_mistakes_are_one_line_with_their_status(tmp_path: Path, backend: str) -> None:
    """A bad amount (2), an invalid pricing file (2), an unreachable store (3), a refusal (1)."""
    (tmp_path / "bad.json").write_text(json.dumps({"models": {"x": "input_tokens * * 2"}}))
    url = "sqlite:///billing.db"
    _run("--store", url, "--backend", backend, "setup", cwd=tmp_path)

    amount = _run("--store", url, "--backend", backend, "grant", "alice", "12.5", cwd=tmp_path)
    pricing = _run("pricing", "validate", "bad.json", cwd=tmp_path)
    missing = _run("pricing", "validate", "missing.json", cwd=tmp_path)
    unreachable = _run(
        "--store", "sqlite:////nonexistent/dir/x.db", "--backend", backend, "setup", cwd=tmp_path
    )
    refused = _run("--store", url, "--backend", backend, "refund", "tx_unknown", cwd=tmp_path)

    assert 2 == amount.returncode
    assert "AMOUNT must be a whole number of credits, got '12.5'" in _one_line(amount)
    assert 2 == pricing.returncode
    assert "models['x']: unexpected '*' at position 15" in _one_line(pricing)
    assert 2 == missing.returncode
    assert "no such file" in _one_line(missing)
    assert 3 == unreachable.returncode
    assert "store error" in _one_line(unreachable)
    assert 1 == refused.returncode
    assert "transaction_not_found" in _one_line(refused)


def test_import_ducto_loads_no_cli(tmp_path: Path) -> None:
    """`import ducto` loads neither the command line nor its optional dependencies."""
    code = (
        "import sys, ducto; "
        "print(sorted(m for m in sys.modules "
        "if m in ('ducto.cli', 'yaml') or m.startswith('ducto._cli')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )

    assert "[]" == completed.stdout.strip()
