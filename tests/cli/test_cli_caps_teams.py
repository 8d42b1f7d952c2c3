"""``ducto caps`` and ``ducto teams`` through `main(argv)`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.cli._cli_support import Cli

from ducto import CreditMetadata
from ducto.interface.base import CreditStore


def test_caps_set_list_check_remove(cli: Cli) -> None:
    """A cap is set, listed, checked, replaced by (user, period, model) and removed."""
    daily = cli.json("caps", "set", "alice", "500")
    cli.ok(
        "caps",
        "set",
        "alice",
        "100",
        "--period",
        "monthly",
        "--model",
        "gpt-4o",
        "--action",
        "warn",
    )
    replaced = cli.json("caps", "set", "alice", "600")
    listed = cli.json("caps", "list", "alice")

    assert ("daily", None, 500, "deny") == (
        daily["cap_type"],
        daily["model"],
        daily["limit"],
        daily["action"],
    )
    assert 600 == replaced["limit"]
    assert {("daily", None, 600, "deny"), ("monthly", "gpt-4o", 100, "warn")} == {
        (c["cap_type"], c["model"], c["limit"], c["action"]) for c in listed
    }

    within = cli.json("caps", "check", "alice", "--amount", "600")
    over = cli.json("caps", "check", "alice", "--amount", "601")
    removed = cli.json("caps", "remove", "alice")
    missing = cli("caps", "remove", "alice")

    assert (False, False) == (within["capped"], within["exceeded"])
    assert (True, True, "deny") == (over["capped"], over["exceeded"], over["action"])
    assert removed["removed"] is True
    assert 1 == missing.status
    assert "has no daily cap" in missing.error_line()
    assert [("monthly", "gpt-4o")] == [
        (c["cap_type"], c["model"]) for c in cli.json("caps", "list", "alice")
    ]


def test_caps_check_without_caps(cli: Cli) -> None:
    """A user without caps has none that applies."""
    text = cli.ok("caps", "check", "bob").out
    listed = cli.ok("caps", "list", "bob").out

    assert "no spend cap applies to 'bob'" in text
    assert "no spend caps for 'bob'" in listed


def test_a_deny_cap_set_by_the_cli_refuses_holds(cli: Cli) -> None:
    """A cap set from the command line is the one the store enforces."""
    cli.ok("grant", "alice", "1000", "--type", "purchase")
    cli.ok("caps", "set", "alice", "50", "--period", "daily")

    async def reserve(store: CreditStore) -> str | None:
        result = await store.reserve_credits("alice", 60, "chat", min_balance=0)
        return result.error

    assert "spend_cap_exceeded" == cli.with_store(reserve)


def test_team_lifecycle(cli: Cli) -> None:
    """Create, add members, credit once per key, show, list the ledger, remove a member."""
    team = cli.json("teams", "create", "acme", "--balance", "1000")
    team_id = team["team_id"]

    added = cli.json("teams", "add-member", team_id, "alice", "--cap", "300")
    cli.ok("teams", "add-member", team_id, "bob", "--role", "admin")
    credited = cli.json("teams", "credit", team_id, "500", "--key", "po-17")
    again = cli.json("teams", "credit", team_id, "500", "--key", "po-17")
    shown = cli.json("teams", "show", team_id)
    table = cli.ok("teams", "show", team_id).out
    ledger = cli.json("teams", "ledger", team_id)
    removed = cli.ok("teams", "remove-member", team_id, "bob")
    not_member = cli("teams", "remove-member", team_id, "bob")

    assert ("acme", 1000) == (team["name"], team["balance"])
    assert (300, "member") == (added["spend_cap"], added["role"])
    assert 1500 == credited["team_balance_after"]
    assert again["idempotent"] is True
    assert (1500, 2) == (shown["balance"], shown["member_count"])
    assert {("alice", 300), ("bob", None)} == {
        (m["user_id"], m["spend_cap"]) for m in shown["members"]
    }
    assert "alice" in table
    assert "admin" in table
    assert [500, 1000] == [row["amount"] for row in ledger["items"]]
    assert "removed 'bob'" in removed.out
    assert 1 == not_member.status
    assert "not a member" in not_member.error_line()


def test_team_spend_shows_per_member(cli: Cli) -> None:
    """A member's team spend this month shows in `teams show`."""
    team_id = cli.json("teams", "create", "acme", "--balance", "100")["team_id"]
    cli.ok("teams", "add-member", team_id, "alice")

    async def spend(store: CreditStore) -> None:
        (await store.deduct_team(team_id, "alice", 30)).raise_for_error()

    cli.with_store(spend)
    shown = cli.json("teams", "show", team_id)

    assert 70 == shown["balance"]
    assert [("alice", 30)] == [(m["user_id"], m["total_spent"]) for m in shown["members"]]


def test_unknown_team_is_refused(cli: Cli) -> None:
    """Showing, crediting or adding to a team that does not exist exits 1 with one line."""
    shown = cli("teams", "show", "team_nope")
    credited = cli("teams", "credit", "team_nope", "5")
    added = cli("teams", "add-member", "team_nope", "alice")

    assert [1, 1, 1] == [shown.status, credited.status, added.status]
    for ran in (shown, credited, added):
        assert "team_not_found" in ran.error_line()


def test_release_a_members_hold_on_the_pool(cli: Cli) -> None:
    """`release USER RESERVATION --team TEAM` frees a hold placed on a team pool."""
    team_id = cli.json("teams", "create", "acme", "--balance", "100")["team_id"]
    cli.ok("teams", "add-member", team_id, "alice")

    async def hold(store: CreditStore) -> str:
        placed = await store.reserve_team_credits(team_id, "alice", 40, "chat")
        placed.raise_for_error()
        return placed.reservation_id

    reservation = cli.with_store(hold)
    held = cli.json("teams", "show", team_id)
    without_team = cli("release", "alice", reservation)
    released = cli.json("release", "alice", reservation, "--team", team_id)

    assert (40, 60) == (held["reserved"], held["available"])
    assert 1 == without_team.status
    assert "reservation_not_found" in without_team.error_line()
    assert (True, 40, team_id) == (released["released"], released["amount"], released["team_id"])
    assert 100 == cli.json("teams", "show", team_id)["available"]


# -- budget scopes -----------------------------------------------------------------------------


def _next_midnight() -> str:
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    return midnight.isoformat().replace("+00:00", "Z")


def test_caps_with_a_scope(cli: Cli) -> None:
    """A cap per API key is set, listed, checked (with its reset) and removed by its scope."""
    scoped = cli.json("caps", "set", "alice", "100", "--scope", "key_1")
    cli.ok("caps", "set", "alice", "1000")
    listed = cli.json("caps", "list", "alice")
    table = cli.ok("caps", "list", "alice").out

    over = cli.json("caps", "check", "alice", "--scope", "key_1", "--amount", "101")
    other_key = cli.json("caps", "check", "alice", "--scope", "key_2", "--amount", "101")
    text = cli.ok("caps", "check", "alice", "--scope", "key_1", "--amount", "101").out
    removed = cli.ok("caps", "remove", "alice", "--scope", "key_1")
    missing = cli("caps", "remove", "alice", "--scope", "key_1")
    empty = cli("caps", "set", "alice", "5", "--scope", "")

    assert ("key_1", 100) == (scoped["scope"], scoped["limit"])
    assert [(None, 1000), ("key_1", 100)] == [(c["scope"], c["limit"]) for c in listed]
    assert ["alice", "daily", "(all", "models)", "key_1", "100", "deny"] == (
        table.splitlines()[3].split()
    )
    assert "(all usage)" in table.splitlines()[2]
    assert (True, "key_1", _next_midnight()) == (over["capped"], over["scope"], over["resets_at"])
    assert (False, None, 1000) == (other_key["capped"], other_key["scope"], other_key["cap_limit"])
    assert "scope         key_1" in text
    assert "resets (UTC)  " + _next_midnight().replace("T", " ") in text
    assert "removed the daily cap in scope 'key_1' of 'alice'" in removed.out
    assert 1 == missing.status
    assert "'alice' has no daily cap in scope 'key_1'" in missing.error_line()
    assert 2 == empty.status
    assert "--scope must not be empty" in empty.error_line()
    assert [None] == [c["scope"] for c in cli.json("caps", "list", "alice")]


def test_a_scoped_cap_set_by_the_cli_refuses_only_its_scope(cli: Cli) -> None:
    """A key's cap refuses that key's holds; another key of the same user still holds."""
    cli.ok("grant", "alice", "1000", "--type", "purchase")
    cli.ok("caps", "set", "alice", "50", "--scope", "key_1")

    async def reserve(store: CreditStore) -> list[str | None]:
        errors = []
        for scope in ("key_1", "key_2"):
            result = await store.reserve_credits(
                "alice", 60, "chat", CreditMetadata(scope=scope), min_balance=0
            )
            errors.append(result.error)
        return errors

    assert ["spend_cap_exceeded", None] == cli.with_store(reserve)


def test_stats_by_scope(cli: Cli) -> None:
    """Spend per user and budget scope, one user's with --user; --user needs --by scope."""
    cli.ok("grant", "alice", "1000", "--type", "purchase")
    cli.ok("grant", "bob", "1000", "--type", "purchase")

    async def spend(store: CreditStore) -> None:
        for user, scope, amount in (
            ("alice", "key_1", 70),
            ("alice", "key_2", 20),
            ("alice", None, 5),
            ("bob", "key_9", 40),
        ):
            result = await store.charge_credits(
                user, amount, "chat", CreditMetadata(scope=scope), min_balance=0
            )
            result.raise_for_error()

    cli.with_store(spend)
    everyone = cli.json("stats", "--by", "scope")
    alice = cli.json("stats", "--by", "scope", "--user", "alice", "--top", "2")
    table = cli.ok("stats", "--by", "scope", "--user", "alice").out
    misplaced = cli("stats", "--by", "user", "--user", "alice")

    assert [("alice", "key_1", 70), ("bob", "key_9", 40), ("alice", "key_2", 20)] == [
        (r["user_id"], r["scope"], r["total_spend"]) for r in everyone["rows"][:3]
    ]
    assert ("alice", None, 5) == (
        everyone["rows"][3]["user_id"],
        everyone["rows"][3]["scope"],
        everyone["rows"][3]["total_spend"],
    )
    assert [("key_1", 70), ("key_2", 20)] == [(r["scope"], r["total_spend"]) for r in alice["rows"]]
    assert "spend by scope of 'alice'" in table
    assert ["alice", "(unscoped)", "5", "1"] == table.splitlines()[-1].split()
    assert 2 == misplaced.status
    assert "--user goes with --by scope" in misplaced.error_line()
