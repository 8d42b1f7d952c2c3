"""The integration modules' public names, and that importing them pulls in no extra."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

MODULES = ["ducto.integrations", "ducto.integrations.asgi", "ducto.integrations.litellm"]
OPTIONAL = (
    "fastapi",
    "starlette",
    "litellm",
    "httpx",
    "uvicorn",
    "hypercorn",
    "openai",
    "anthropic",
)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_complete_and_importable(name: str) -> None:
    """__all__ is sorted, names only what exists, and lists every public definition."""
    if name.endswith("litellm"):
        pytest.importorskip("litellm")
    module = importlib.import_module(name)
    exported = list(module.__all__)
    defined = {
        key
        for key, value in vars(module).items()
        if not key.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }

    assert sorted(set(exported)) == exported
    assert [] == [n for n in exported if not hasattr(module, n)]
    assert set() == defined - set(exported)


def test_core_and_asgi_imports_need_no_optional_dependency() -> None:
    """`import ducto`, `ducto.integrations` and its ASGI module load no web or LLM library."""
    code = (
        "import sys, ducto, ducto.integrations, ducto.integrations.asgi\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert "[]" == completed.stdout.strip()
