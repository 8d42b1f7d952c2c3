"""
Pricing configs as files: reading JSON or YAML, reporting every problem, comparing two configs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from ducto._cli.values import UsageError
from ducto._shown import shown
from ducto.errors import ExpressionError, InvalidArgumentError
from ducto.interface.models import PricingConfigData
from ducto.pricing import PricingEngine, validate_pricing_config

EXPRESSION_SECTIONS: Final = ("models", "tools", "search", "cache")
_KEYED: Final = frozenset({*EXPRESSION_SECTIONS, "fixed", "plans", "rate_overrides", "features"})
_YAML_SUFFIXES: Final = (".yaml", ".yml")
_NO_YAML: Final = "reading YAML needs PyYAML: pip install 'ducto[yaml]' (or pip install pyyaml)"


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        raise UsageError(_NO_YAML) from None


def read_config_file(name: str) -> dict[str, Any]:
    """
    Read a pricing config from a JSON or YAML file (``-`` reads standard input).

    YAML is chosen by the ``.yaml`` or ``.yml`` suffix, and needs PyYAML. Standard input is
    read as JSON, or as YAML when it is not JSON and PyYAML is installed.

    Args:
        name: The file's path, or ``-``.

    Returns:
        The document, which must be a mapping.

    Raises:
        UsageError: The file is missing or unreadable, is not valid JSON or YAML, or does not
            hold a mapping.
    """
    if name == "-":
        text = sys.stdin.read()
        label = "<stdin>"
        as_yaml = False
    else:
        path = Path(name)
        label = name
        as_yaml = path.suffix.lower() in _YAML_SUFFIXES
        if as_yaml:
            _yaml()  # say what is missing before reading anything
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"{label}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"{label}: is a directory, not a pricing file") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"{label}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise UsageError(f"{label}: cannot read it ({exc.strerror or exc})") from None
    data = _parse(text, label, as_yaml)
    if not isinstance(data, dict):
        raise UsageError(f"{label}: must hold a mapping of sections, not {type(data).__name__}")
    return data


def _parse(text: str, label: str, as_yaml: bool) -> object:
    if as_yaml:
        return _parse_yaml(text, label)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if label == "<stdin>" and importlib.util.find_spec("yaml") is not None:
            return _parse_yaml(text, label)
        raise UsageError(
            f"{label}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def _parse_yaml(text: str, label: str) -> object:
    yaml = _yaml()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(f"{label}: not valid YAML: {detail}") from None


def write_config_text(config: PricingConfigData, *, as_yaml: bool) -> str:
    """
    A config as the text `read_config_file` reads back: JSON, or YAML (needs PyYAML).

    Raises:
        UsageError: YAML was asked for and PyYAML is not installed.
    """
    data = config.model_dump(mode="json", exclude_none=True)
    if as_yaml:
        dumped: str = _yaml().safe_dump(data, sort_keys=False, allow_unicode=True)
        return dumped
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# -- validation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """
    One thing wrong with a pricing config.

    Attributes:
        where: The place in the config, e.g. ``models['gpt-4o']`` or
            ``plans['pro'].rate_overrides['gpt-4o']``.
        message: What is wrong.
        position: Zero-based offset in the expression, when the problem is in one.
        expression: The expression text, when the problem is in one.
    """

    where: str
    message: str
    position: int | None = None
    expression: str | None = None

    def __str__(self) -> str:
        """The problem as one line."""
        text = f"{self.where}: {self.message}"
        if self.position is not None:
            text += f" at position {self.position}"
        if self.expression is not None:
            text += f" in {self.expression!r}"
        return text

    def as_dict(self) -> dict[str, object]:
        """The problem as JSON data."""
        return {
            "where": self.where,
            "message": self.message,
            "position": self.position,
            "expression": self.expression,
        }


def place(loc: tuple[str | int, ...]) -> str:
    """A pydantic error location written as config paths read: ``plans['pro'].name``."""
    text = ""
    keyed = False  # the previous part was a section whose entries are keyed by name
    for part in loc:
        if keyed or isinstance(part, int):
            text += f"[{part!r}]"
            keyed = False
        else:
            text += f".{part}" if text else str(part)
            keyed = part in _KEYED
    return text or "config"


def _expression_problem(where: str, source: str, config: dict[str, Any]) -> Problem | None:
    """Build an engine holding this one expression; report what it refuses."""
    try:
        PricingEngine.from_dict(config)
    except ExpressionError as exc:
        reason = exc.reason.removeprefix(f"{where}: ")
        return Problem(where, reason, exc.position, source)
    except InvalidArgumentError as exc:
        return Problem(where, str(exc).removeprefix(f"{where}: "))
    return None


def check_config(data: Mapping[str, Any]) -> list[Problem]:
    """
    Every problem of a config: its shape, then each expression on its own.

    Each expression is checked by building a `PricingEngine` that holds only it, so the
    report covers every bad expression (with its section, key and position), not only the
    first; then the whole config is checked by `validate_pricing_config`, as publishing does.

    Args:
        data: The config as read from a file.

    Returns:
        The problems, in the order of the config; empty when it can be published.
    """
    problems: list[Problem] = []
    try:
        PricingConfigData.model_validate(dict(data))
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            message = error["msg"]
            if error["type"] not in ("missing", "extra_forbidden"):
                message += f", got {shown(error['input'])}"
            problems.append(Problem(place(tuple(error["loc"])), message))

    base: dict[str, Any] = {"models": {"_default": "0"}}
    for section in EXPRESSION_SECTIONS:
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue
        for key, source in entries.items():
            if not isinstance(key, str) or not key or not isinstance(source, str):
                continue
            where = f"{section}[{key!r}]"
            single: dict[str, Any] = (
                {section: {key: source}}
                if section == "models"
                else {**base, section: {key: source}}
            )
            problem = _expression_problem(where, source, single)
            if problem is not None:
                problems.append(problem)

    plans = data.get("plans")
    if isinstance(plans, dict):
        for plan_key, plan in plans.items():
            overrides = plan.get("rate_overrides") if isinstance(plan, dict) else None
            if not isinstance(plan_key, str) or not isinstance(overrides, dict):
                continue
            for key, source in overrides.items():
                if not isinstance(key, str) or not key or not isinstance(source, str):
                    continue
                where = f"plans[{plan_key!r}].rate_overrides[{key!r}]"
                plan_def = {"id": plan_key, "name": plan_key, "rate_overrides": {key: source}}
                problem = _expression_problem(
                    where, source, {**base, "plans": {plan_key: plan_def}}
                )
                if problem is not None:
                    problems.append(problem)

    if not problems:
        try:
            validate_pricing_config(data)
        except InvalidArgumentError as exc:
            position = exc.position if isinstance(exc, ExpressionError) else None
            problems.append(Problem("config", str(exc), position))
    return problems


def summary(config: PricingConfigData) -> str:
    """A short description of what a config prices, e.g. ``3 models, 2 tools, 1 plan``."""

    def count(number: int, noun: str) -> str:
        return f"{number} {noun}{'' if number == 1 else 's'}"

    parts = [count(len(config.models), "model"), count(len(config.tools), "tool")]
    if config.search:
        parts.append(count(len(config.search), "search price"))
    if config.cache:
        parts.append(count(len(config.cache), "cache price"))
    if config.fixed:
        parts.append(count(len(config.fixed), "fixed job"))
    if config.plans:
        parts.append(count(len(config.plans), "plan"))
    parts.append(f"rounding {config.rounding}, min_balance {config.min_balance}")
    return ", ".join(parts)


# -- comparison ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between two configs: ``added``, ``removed`` or ``changed``."""

    where: str
    change: str
    old: object = None
    new: object = None

    def as_dict(self) -> dict[str, object]:
        """The change as JSON data."""
        return {"where": self.where, "change": self.change, "old": self.old, "new": self.new}


def _flatten(value: object, path: tuple[str, ...], out: dict[tuple[str, ...], object]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, (*path, str(key)), out)
    elif value is not None:
        out[path] = value


def diff_configs(old: PricingConfigData, new: PricingConfigData) -> list[Change]:
    """
    What changed from `old` to `new`, entry by entry (an absent entry and an empty or null
    one are the same), in the order of `old` then of what `new` adds.
    """
    before: dict[tuple[str, ...], object] = {}
    after: dict[tuple[str, ...], object] = {}
    _flatten(old.model_dump(mode="json"), (), before)
    _flatten(new.model_dump(mode="json"), (), after)
    changes: list[Change] = []
    for path, value in before.items():
        where = place(path)
        if path not in after:
            changes.append(Change(where, "removed", old=value))
        elif after[path] != value:
            changes.append(Change(where, "changed", old=value, new=after[path]))
    for path, value in after.items():
        if path not in before:
            changes.append(Change(place(path), "added", new=value))
    return changes
