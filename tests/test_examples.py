"""Every script in examples/ runs to completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """The script exits with status 0, run from a scratch working directory."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert 0 == completed.returncode, completed.stdout + completed.stderr


def test_gateway_example_runs_on_sqlite(tmp_path: Path) -> None:
    """The gateway example takes a store URL and runs on SQLite too."""
    pytest.importorskip("aiosqlite")
    script = next(path for path in EXAMPLES if path.name == "gateway.py")
    completed = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'gateway.db'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert 0 == completed.returncode, completed.stdout + completed.stderr
    assert "books: no hold left open" in completed.stdout
