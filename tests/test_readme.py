"""The README stays true to the code it shows."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_is_the_example_that_runs() -> None:
    """The README quickstart is examples/quickstart.py, which the example tests run."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S)
    example = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")

    assert shown is not None
    assert example.endswith(shown.group(1))


def test_the_two_setup_commands_exist() -> None:
    """`make demo` and `make test`, the README's set-up commands, are Makefile targets."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")

    assert {"demo", "test"} <= set(re.findall(r"^([a-z]+):", makefile, re.M))


def test_pricing_example_is_the_example_that_runs() -> None:
    """The README's manager example is examples/pricing_quickstart.py."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"## Pricing and the manager\n.*?```python\n(.*?)```", readme, re.S)
    example = (ROOT / "examples" / "pricing_quickstart.py").read_text(encoding="utf-8")

    assert shown is not None
    assert example.endswith(shown.group(1))
