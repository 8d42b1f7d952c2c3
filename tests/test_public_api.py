"""Each public module's ``__all__`` is sorted, complete and importable."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

PUBLIC_MODULES = [
    "ducto",
    "ducto.errors",
    "ducto.events",
    "ducto.interface",
    "ducto.interface.base",
    "ducto.interface.models",
    "ducto.interface.memory",
    "ducto.interface.postgres",
    "ducto.interface.sqlite",
    "ducto.manager",
    "ducto.pricing",
    "ducto.sync",
]


def _defined_here(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_importable(name: str) -> None:
    """Every name in __all__ exists, and __all__ is sorted without duplicates."""
    module = importlib.import_module(name)
    exported = list(module.__all__)

    assert sorted(set(exported)) == exported
    assert [] == [n for n in exported if not hasattr(module, n)]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_lists_every_public_definition(name: str) -> None:
    """Every public class and function a module defines is in its __all__."""
    module = importlib.import_module(name)

    assert set() == _defined_here(module) - set(module.__all__)


def test_documented_import_paths() -> None:
    """The import paths ducto 1.x documented keep working."""
    from ducto import MemoryStore as TopLevel
    from ducto.interface.base import CreditStore, StoreError
    from ducto.interface.memory import MemoryStore

    assert TopLevel is MemoryStore
    assert issubclass(StoreError, Exception)
    assert isinstance(MemoryStore(), CreditStore)


def test_the_top_level_offers_every_result_model_and_error() -> None:
    """`from ducto import X` works for every result model and every exception, as in 1.x."""
    import ducto
    import ducto.errors
    import ducto.interface.models

    missing_models = set(ducto.interface.models.__all__) - set(ducto.__all__)
    missing_errors = set(ducto.errors.__all__) - {"error_from_fields"} - set(ducto.__all__)

    assert set() == missing_models
    assert set() == missing_errors
    for name in ("ConfigError", "PricingConfig", "ExpressionError", "PricingNotLoadedError"):
        assert name in ducto.__all__
    assert ducto.PricingConfig is ducto.PricingConfigData
