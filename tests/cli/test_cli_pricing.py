"""``ducto pricing``: validate, set, get, list, activate, export and diff, through `main(argv)`."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.cli._cli_support import Cli

from ducto.interface.base import CreditStore
from ducto.interface.models import PricingConfigData

PRICING: dict[str, Any] = {
    "models": {
        "gpt-4o": "input_tokens * 0.025 + output_tokens * 0.1",
        "_default": "input_tokens * 0.01",
    },
    "tools": {"_default": "tool_calls * 0", "web_search": "tool_calls * 25"},
    "plans": {"pro": {"id": "pro", "name": "Pro", "free_allowance": 500}},
}

BAD: dict[str, Any] = {
    "models": {"gpt-4o": "input_tokens * ) 0.025", "ok": "1", "typo": "input_token * 2"},
    "tools": {"web_search": "tool_calls *"},
    "plans": {
        "pro": {
            "id": "pro",
            "name": "Pro",
            "free_allowance": -5,
            "rate_overrides": {"gpt-4o": "max(input_tokens"},
        }
    },
    "colour": "blue",
}


def _write(cli: Cli, name: str, config: object) -> str:
    return cli.file(name, json.dumps(config))


def test_validate_a_good_file_needs_no_store(cli: Cli) -> None:
    """A valid file is reported valid with what it prices; no store is opened."""
    path = _write(cli, "pricing.json", PRICING)

    ran = cli("pricing", "validate", path, store=False)

    assert 0 == ran.status, ran.err
    assert "valid (2 models, 2 tools, 1 plan" in ran.out


def test_validate_reports_every_problem_with_its_place(cli: Cli) -> None:
    """Every bad expression is named by section and key, with its position; status 2."""
    path = _write(cli, "bad.json", BAD)

    ran = cli("--json", "pricing", "validate", path, store=False)
    text = cli("pricing", "validate", path, store=False)

    report = ran.json()
    found = {(p["where"], p["position"]) for p in report["problems"]}
    assert 2 == ran.status == text.status
    assert report["valid"] is False
    assert {
        ("models['gpt-4o']", 15),
        ("models['typo']", 0),
        ("tools['web_search']", 12),
        ("plans['pro'].rate_overrides['gpt-4o']", 3),
        ("plans['pro'].free_allowance", None),
        ("colour", None),
    } == found
    assert "ducto: " + path + ": models['gpt-4o']: unexpected ')' at position 15" in text.err
    assert "unknown variable 'input_token'" in text.err
    assert "6 problems" in text.err.splitlines()[-1]


def test_validate_bad_files(cli: Cli) -> None:
    """A missing file, broken JSON and a list instead of a mapping: one line, status 2."""
    broken = cli.file("broken.json", '{"models": {"a": "1",}}')
    listed = cli.file("list.json", "[1, 2]")

    missing = cli("pricing", "validate", str(cli.tmp_path / "nope.json"), store=False)
    not_json = cli("pricing", "validate", broken, store=False)
    not_mapping = cli("pricing", "validate", listed, store=False)

    assert [2, 2, 2] == [missing.status, not_json.status, not_mapping.status]
    assert "no such file" in missing.error_line()
    assert "not valid JSON" in not_json.error_line()
    assert "line 1 column" in not_json.err
    assert "must hold a mapping" in not_mapping.error_line()


def test_set_publishes_and_get_shows_it(cli: Cli) -> None:
    """set publishes version 1 and makes it active; get shows it, list lists it."""
    path = _write(cli, "pricing.json", PRICING)

    published = cli.json("pricing", "set", path, "--label", "launch")
    active = cli.json("pricing", "get")
    listed = cli.json("pricing", "list")
    shown = cli.ok("pricing", "get").out

    assert (1, "launch") == (published["version"], published["label"])
    assert (published["id"], 1) == (active["id"], active["version"])
    assert PRICING["models"] == active["config"]["models"]
    assert [(1, True, "launch")] == [(v["version"], v["active"], v["label"]) for v in listed]
    assert "launch" in shown
    assert '"gpt-4o"' in shown


def test_set_refuses_an_invalid_file_and_publishes_nothing(cli: Cli) -> None:
    """An invalid config is refused with its problems and status 2; no version appears."""
    path = _write(cli, "bad.json", BAD)
    one_bad = _write(cli, "one.json", {"models": {"x": "input_tokens *"}})

    ran = cli("pricing", "set", path)
    single = cli("pricing", "set", one_bad)

    assert 2 == ran.status
    assert "6 problems (listed above); nothing was published" in ran.err.splitlines()[-1]
    assert 2 == single.status
    assert "models['x']: unexpected end of expression at position 14" in single.error_line()
    assert [] == cli.json("pricing", "list")


def test_get_before_any_pricing_is_not_found(cli: Cli) -> None:
    """With nothing published, get says so in one line and exits 1."""
    ran = cli("pricing", "get")

    assert 1 == ran.status
    assert "no pricing published yet" in ran.error_line()


def test_activate_an_earlier_version(cli: Cli) -> None:
    """activate makes version 1 active again; an unknown version exits 1."""
    cli.ok("pricing", "set", _write(cli, "v1.json", PRICING))
    cli.ok("pricing", "set", _write(cli, "v2.json", {"models": {"_default": "input_tokens"}}))

    activated = cli.json("pricing", "activate", "1")
    unknown = cli("pricing", "activate", "9")
    not_a_number = cli("pricing", "activate", "latest")

    assert 1 == activated["version"]
    assert 1 == cli.json("pricing", "get")["version"]
    assert 1 == unknown.status
    assert "pricing version 9 does not exist" in unknown.error_line()
    assert 2 == not_a_number.status


def test_export_round_trips_through_set(cli: Cli) -> None:
    """export writes what set reads: publishing the export changes nothing."""
    cli.ok("pricing", "set", _write(cli, "pricing.json", PRICING))
    exported = cli.ok("pricing", "export", "1").out
    to_file = cli.tmp_path / "exported.json"
    cli.ok("pricing", "export", "active", "--output", str(to_file))

    cli.ok("pricing", "set", cli.file("again.json", exported))
    diff = cli.json("pricing", "diff", "1", "2")

    assert json.loads(exported) == json.loads(to_file.read_text())
    assert [] == diff["changes"]
    assert 1 == cli("pricing", "export", "4").status


def test_export_and_read_yaml(cli: Cli) -> None:
    """With PyYAML, export writes YAML for a .yaml file, and set and validate read it."""
    pytest.importorskip("yaml")
    cli.ok("pricing", "set", _write(cli, "pricing.json", PRICING))
    path = cli.tmp_path / "pricing.yaml"

    cli.ok("pricing", "export", "1", "-o", str(path))
    valid = cli("pricing", "validate", str(path), store=False)
    published = cli.json("pricing", "set", str(path))

    assert "gpt-4o:" in path.read_text()
    assert 0 == valid.status
    assert 2 == published["version"]
    assert [] == cli.json("pricing", "diff", "1", "2")["changes"]


def test_yaml_without_pyyaml_says_what_to_install(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PyYAML, a .yaml file is refused with the install command."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    path = cli.file("pricing.yaml", "models:\n  _default: input_tokens\n")

    ran = cli("pricing", "validate", path, store=False)

    assert 2 == ran.status
    assert "pip install 'ducto[yaml]'" in ran.error_line()


def test_diff_versions_and_files(cli: Cli) -> None:
    """diff lists added, removed and changed entries between versions, 'active' and files."""
    newer = {
        **PRICING,
        "models": {**PRICING["models"], "gpt-4o": "input_tokens * 0.03 + output_tokens * 0.1"},
        "tools": {"_default": "tool_calls * 0", "code": "tool_calls * 5"},
        "min_balance": 10,
    }
    cli.ok("pricing", "set", _write(cli, "v1.json", PRICING))
    newer_path = _write(cli, "v2.json", newer)

    changes = cli.json("pricing", "diff", "active", newer_path)["changes"]
    text = cli.ok("pricing", "diff", "1", newer_path).out
    files_only = cli("pricing", "diff", _write(cli, "same.json", PRICING), newer_path, store=False)
    unknown = cli("pricing", "diff", "1", "5")

    assert {
        ("models['gpt-4o']", "changed"),
        ("tools['web_search']", "removed"),
        ("tools['code']", "added"),
        ("min_balance", "changed"),
    } == {(c["where"], c["change"]) for c in changes}
    assert "~ min_balance: 5 -> 10" in text
    assert "+ tools['code']: 'tool_calls * 5'" in text
    assert 0 == files_only.status
    assert 1 == unknown.status


def test_validate_reads_standard_input(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """FILE '-' reads the config from stdin, so an export can be piped into validate."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(PRICING)))

    ran = cli("pricing", "validate", "-", store=False)

    assert 0 == ran.status
    assert "<stdin>" not in ran.err


# -- scheduled versions ------------------------------------------------------------------------

CHEAPER: dict[str, Any] = {"models": {"_default": "input_tokens * 0.005"}}
LATER = "2099-01-01T00:00:00Z"
"""Far enough ahead that the scheduled version is still scheduled when the test ends."""


def test_set_with_effective_at_schedules_a_version(cli: Cli) -> None:
    """--effective-at schedules a version; list and get show it beside the one in force."""
    cli.ok("pricing", "set", _write(cli, "v1.json", PRICING), "--label", "now")

    scheduled = cli.json(
        "pricing",
        "set",
        _write(cli, "v2.json", CHEAPER),
        "--label",
        "new year",
        "--effective-at",
        LATER,
    )
    said = cli.ok("pricing", "set", _write(cli, "v3.json", CHEAPER), "--effective-at", LATER)
    listed = cli.json("pricing", "list")
    table = cli.ok("pricing", "list").out
    in_force = cli.json("pricing", "get")
    shown = cli.ok("pricing", "get").out

    assert (2, False, True, LATER) == (
        scheduled["version"],
        scheduled["active"],
        scheduled["scheduled"],
        scheduled["effective_at"],
    )
    assert "scheduled pricing version 3" in said.out
    assert "take effect at 2099-01-01 00:00:00Z; version 1 stays in force until then" in said.out
    assert [(3, False, True), (2, False, True), (1, True, False)] == [
        (v["version"], v["active"], v["scheduled"]) for v in listed
    ]
    assert [LATER, LATER] == [v["effective_at"] for v in listed[:2]]
    assert [None, None, None] == [v["cancelled_at"] for v in listed]
    lines = table.splitlines()
    assert ["version", "state", "effective", "(UTC)", "label"] == lines[0].split()[:5]
    assert ["2", "scheduled", "2099-01-01", "00:00:00Z", "new", "year"] == lines[3].split()[:6]
    assert ["1", "in", "force"] == lines[4].split()[:3]
    assert 1 == in_force["version"]
    assert "next       version 2 at 2099-01-01 00:00:00Z" in shown


def test_cancel_a_scheduled_version(cli: Cli) -> None:
    """cancel stops a scheduled version; one in force, or unknown, cannot be cancelled."""
    cli.ok("pricing", "set", _write(cli, "v1.json", PRICING))
    cli.ok("pricing", "set", _write(cli, "v2.json", CHEAPER), "--effective-at", LATER)

    cancelled = cli.json("pricing", "cancel", "2")
    again = cli.json("pricing", "cancel", "2")
    text = cli.ok("pricing", "cancel", "2").out
    in_force = cli("pricing", "cancel", "1")
    unknown = cli("pricing", "cancel", "9")
    not_a_number = cli("pricing", "cancel", "active")
    reactivated = cli("pricing", "activate", "2")
    listed = cli.ok("pricing", "list").out

    assert cancelled["cancelled_at"] is not None
    assert cancelled["cancelled_at"] == again["cancelled_at"]
    assert "which was to take effect at 2099-01-01 00:00:00Z" in text
    assert (1, "ducto: version 1 has taken effect; only a scheduled version can be cancelled") == (
        in_force.status,
        in_force.error_line(),
    )
    assert 1 == unknown.status
    assert "pricing version 9 does not exist" in unknown.error_line()
    assert 2 == not_a_number.status
    assert "cancel needs a version number" in not_a_number.error_line()
    assert 1 == reactivated.status
    assert "version 2 was cancelled and cannot be activated" in reactivated.error_line()
    assert ["2", "cancelled", "2099-01-01"] == listed.splitlines()[2].split()[:3]
    assert 1 == cli.json("pricing", "get")["version"]


@pytest.mark.parametrize(
    ("when", "says"),
    [
        ("2099-01-01", "--effective-at must say its time zone: add Z for UTC"),
        ("2099-01-01T00:00:00", "--effective-at must say its time zone: add Z for UTC"),
        ("next tuesday", "--effective-at must be an ISO 8601 instant with Z or an offset"),
        ("7d", "--effective-at must be an ISO 8601 instant with Z or an offset"),
        ("2020-01-01T00:00:00Z", "--effective-at must be in the future"),
    ],
)
def test_effective_at_must_name_its_time_zone_and_be_ahead(cli: Cli, when: str, says: str) -> None:
    """A naive, unparsable or past --effective-at is refused, naming the option; nothing is
    published."""
    ran = cli("pricing", "set", _write(cli, "v1.json", PRICING), "--effective-at", when)

    assert 2 == ran.status
    assert says in ran.error_line()
    assert [] == cli.json("pricing", "list")


def test_a_version_whose_time_came_is_in_force_and_a_rollback_undoes_it(cli: Cli) -> None:
    """A version scheduled for an instant now past is in force; activate rolls back to 1."""
    yesterday = datetime.now(UTC) - timedelta(days=1)

    async def publish(store: CreditStore) -> None:
        await store.set_active_pricing(PricingConfigData.model_validate(PRICING), "first")
        await store.set_active_pricing(
            PricingConfigData.model_validate(CHEAPER),
            "then",
            effective_at=yesterday + timedelta(hours=1),
        )

    cli.with_store(publish, clock=lambda: yesterday)
    before = cli.ok("pricing", "list").out.splitlines()
    cli.ok("pricing", "activate", "1")
    after = cli.json("pricing", "list")

    assert ["2", "in", "force"] == before[2].split()[:3]
    assert ["1", "-"] == before[3].split()[:2]
    assert [(2, False), (1, True)] == [(v["version"], v["active"]) for v in after]
    assert 1 == cli.json("pricing", "get")["version"]


def test_get_before_a_scheduled_version_takes_effect(cli: Cli) -> None:
    """With only a scheduled version, get says when pricing will be in force."""
    cli.ok("pricing", "set", _write(cli, "v1.json", PRICING), "--effective-at", LATER)

    ran = cli("pricing", "get")

    assert 1 == ran.status
    assert "no pricing in force yet: version 1 takes effect at 2099-01-01 00:00:00Z" in (
        ran.error_line()
    )
