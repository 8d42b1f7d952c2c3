"""The documentation's programs run and their assertions hold.

Every ```python block in the pages below is a complete program and is run in a fresh
namespace, in a temporary working directory; fragments are fenced as ```py and not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = [
    "index.md",
    "quickstart.md",
    "concepts/holds.md",
    "concepts/lots-and-expiry.md",
    "concepts/allowance.md",
    "concepts/caps.md",
    "concepts/teams.md",
    "concepts/idempotency.md",
    "concepts/pricing.md",
    "recipes/sync.md",
    "recipes/trio.md",
    "metrics.md",
]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _programs() -> list[object]:
    params: list[object] = []
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        for number, match in enumerate(_BLOCK.finditer(text), start=1):
            params.append(pytest.param(page, match.group(1), id=f"{page}#{number}"))
    return params


def test_every_page_has_a_program_or_is_prose() -> None:
    """Each listed page exists, and the pages hold programs to run."""
    assert all((DOCS / page).is_file() for page in PAGES)
    assert _programs()


@pytest.mark.parametrize(("page", "source"), _programs())
def test_program_runs(
    page: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The program runs to completion (its asserts are the documented outcomes)."""
    if "ducto.otel" in source:
        pytest.importorskip("opentelemetry.sdk", reason="the metrics page needs the SDK")
    if "sqlite" in source:
        pytest.importorskip("aiosqlite", reason="the program uses SQLiteStore")
    monkeypatch.chdir(tmp_path)
    code = compile(source, f"{page} (docs)", "exec")
    exec(code, {"__name__": "__main__"})
