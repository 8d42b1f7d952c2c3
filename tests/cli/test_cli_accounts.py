"""The account commands through `main(argv)`: setup, grant, balance, ledger, refund, release,
sweep and stats, with their JSON output and their refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tests.cli._cli_support import Cli

from ducto.interface.base import CreditStore


def test_setup_is_idempotent_and_migrate_is_its_alias(cli: Cli) -> None:
    """A second setup (or migrate) finds nothing to do and reports the schema version."""
    again = cli.json("setup")
    alias = cli.ok("migrate")

    assert [] == again["tables_created"]
    assert again["schema_version"] >= 1
    assert "nothing to do" in alias.out


def test_grant_then_balance(cli: Cli) -> None:
    """A purchase shows in the balance, lifetime purchases and one lot."""
    granted = cli.json("grant", "alice", "1,000", "--type", "purchase")
    balance = cli.json("balance", "alice")

    assert 1000 == granted["amount"]
    assert 1000 == granted["new_balance"]
    assert granted["transaction_id"]
    assert (1000, 1000, 1000, 0) == (
        balance["balance"],
        balance["available"],
        balance["lifetime_purchased"],
        balance["reserved"],
    )
    assert [1000] == [lot["remaining"] for lot in balance["lots"]]


def test_balance_table_is_aligned(cli: Cli) -> None:
    """The human balance puts every value in one column after the longest label."""
    cli.ok("grant", "alice", "1500", "--type", "purchase")
    lines = cli.ok("balance", "alice").out.splitlines()[:7]
    width = len("plan allowance left")

    assert ["user", "balance"] == [line[:width].rstrip() for line in lines[:2]]
    assert all(line[width : width + 2] == "  " and line[width + 2] != " " for line in lines)
    assert "1,500" == lines[1][width + 2 :]


def test_unknown_user_has_zero_balance(cli: Cli) -> None:
    """Reading a user nobody wrote to is not an error: it is all zeros."""
    balance = cli.json("balance", "nobody")

    assert (0, 0, []) == (balance["balance"], balance["available"], balance["lots"])


def test_grant_with_a_key_applies_once(cli: Cli) -> None:
    """Running the same keyed grant twice grants once; the second run says so."""
    first = cli.json("grant", "alice", "100", "--key", "stripe-evt-1")
    second = cli.ok("grant", "alice", "100", "--key", "stripe-evt-1")

    assert "already applied" in second.out
    assert first["transaction_id"] in second.out
    assert 100 == cli.json("balance", "alice")["balance"]


def test_grant_with_a_key_and_another_amount_is_refused(cli: Cli) -> None:
    """Reusing a key for a different grant is refused with status 1 and one line."""
    cli.ok("grant", "alice", "100", "--key", "k")
    ran = cli("grant", "alice", "200", "--key", "k")

    assert 1 == ran.status
    assert "idempotency_conflict" in ran.error_line()
    assert 100 == cli.json("balance", "alice")["balance"]


def test_grant_expiring_in_a_duration(cli: Cli) -> None:
    """--expires 30d sets the lot to expire 30 days from now."""
    before = datetime.now(UTC)
    granted = cli.json("grant", "alice", "50", "--type", "signup_bonus", "--expires", "30d")
    after = datetime.now(UTC)

    expires = datetime.fromisoformat(granted["expires_at"])
    assert before + timedelta(days=30) <= expires <= after + timedelta(days=30)


def test_rerun_of_a_keyed_grant_with_a_duration_replays(cli: Cli) -> None:
    """The same keyed grant with --expires 30d, run again later, is not granted twice."""
    first = cli.json("grant", "alice", "50", "--expires", "30d", "--key", "promo-7")
    second = cli.json("grant", "alice", "50", "--expires", "30d", "--key", "promo-7")

    assert second["idempotent"] is True
    assert first["transaction_id"] == second["transaction_id"]
    assert 50 == cli.json("balance", "alice")["balance"]


def test_grant_expiring_at_a_naive_instant_is_local_time(cli: Cli) -> None:
    """A naive ISO instant is read as local time, as datetime.astimezone reads it."""
    moment = datetime.now().replace(microsecond=0) + timedelta(days=3)
    granted = cli.json("grant", "alice", "5", "--expires", moment.isoformat())

    assert moment.astimezone(UTC) == datetime.fromisoformat(granted["expires_at"])


def test_grant_expiring_at_a_utc_instant(cli: Cli) -> None:
    """A trailing Z means UTC."""
    moment = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    text = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    granted = cli.json("grant", "alice", "5", "--expires", text)

    assert moment == datetime.fromisoformat(granted["expires_at"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["grant", "alice", "1.5"], "AMOUNT must be a whole number of credits, got '1.5'"),
        (["grant", "alice", "ten"], "AMOUNT must be a whole number of credits, got 'ten'"),
        (["grant", "alice", "0", "--type", "purchase"], "AMOUNT must be between 1"),
        (["grant", "alice", "-5", "--type", "purchase"], "only an 'adjustment' may be negative"),
        (["grant", "alice", "5", "--expires", "yesterday"], "--expires must be an ISO 8601"),
        (["grant", "alice", "5", "--expires", "2001-01-01"], "--expires must be in the future"),
        (["grant", "alice", "5", "--expires", "0d"], "duration must be longer than 0"),
        (["grant", "alice"], "grant needs USER and AMOUNT, or --csv FILE"),
        (["grant", "alice", "5", "--type", "gift"], "invalid choice: 'gift'"),
        (["grant", "alice", "5", "--batch", "b"], "--batch goes with --csv"),
        (["refund", "tx", "abc"], "AMOUNT must be a whole number"),
        (["ledger", "alice", "--limit", "0"], "--limit must be a whole number from 1 to 1000"),
        (["stats", "--since", "1d", "--until", "2d"], "--since must be before --until"),
        (["caps", "set", "alice", "lots"], "LIMIT must be a whole number"),
        (["teams", "credit", "team-x", "-3"], "AMOUNT must be between 1"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_input_is_one_line_and_status_2(cli: Cli, args: list[str], says: str) -> None:
    """A mistake on the command line changes nothing and says what is wrong in one line."""
    ran = cli(*args)

    assert 2 == ran.status
    assert says in ran.error_line()
    assert 0 == cli.json("balance", "alice")["balance"]


def test_negative_adjustment_takes_credits_back(cli: Cli) -> None:
    """An adjustment may be negative; beyond what is available it is refused."""
    cli.ok("grant", "alice", "100")
    taken = cli.json("grant", "alice", "-40")
    refused = cli("grant", "alice", "-100")

    assert -40 == taken["amount"]
    assert 1 == refused.status
    assert "insufficient_credits" in refused.error_line()
    assert "needs 100 credits" in refused.err
    assert 60 == cli.json("balance", "alice")["balance"]


def test_refused_result_still_prints_its_json(cli: Cli) -> None:
    """With --json a refusal prints the result (with its error code) and exits 1."""
    ran = cli("--json", "grant", "alice", "-5")

    assert 1 == ran.status
    assert "insufficient_credits" == ran.json()["error"]


def test_ledger_pages_newest_first(cli: Cli) -> None:
    """--limit pages the ledger; the cursor continues where the page ended."""
    for amount in ("10", "20", "30"):
        cli.ok("grant", "alice", amount, "--type", "purchase")

    first = cli.json("ledger", "alice", "--limit", "2")
    rest = cli.json("ledger", "alice", "--limit", "2", "--cursor", first["next_cursor"])
    table = cli.ok("ledger", "alice", "--limit", "2").out

    assert [30, 20] == [row["amount"] for row in first["items"]]
    assert [10] == [row["amount"] for row in rest["items"]]
    assert rest["next_cursor"] is None
    assert f"--cursor {first['next_cursor']}" in table


def test_ledger_filters_by_type(cli: Cli) -> None:
    """--type keeps only rows of that type."""
    cli.ok("grant", "alice", "100", "--type", "purchase")
    cli.usage("alice", 20, 15)

    rows = cli.json("ledger", "alice", "--type", "usage")["items"]

    assert [("usage", -15)] == [(row["type"], row["amount"]) for row in rows]


def test_refund_in_part_then_the_rest(cli: Cli) -> None:
    """A partial refund, then the rest; one more is refused as already refunded."""
    cli.ok("grant", "alice", "100", "--type", "purchase")
    transaction = cli.usage("alice", 50, 40)

    part = cli.json("refund", transaction, "15", "--reason", "bad answer")
    rest = cli.json("refund", transaction)
    again = cli("refund", transaction)

    assert (15, 25) == (part["amount"], part["refundable"])
    assert (25, 0) == (rest["amount"], rest["refundable"])
    assert 1 == again.status
    assert "already_refunded" in again.error_line()
    assert 100 == cli.json("balance", "alice")["balance"]


def test_refund_refusals(cli: Cli) -> None:
    """Too much, an unknown transaction and a grant are refused with status 1."""
    cli.ok("grant", "alice", "100", "--type", "purchase")
    grant_id = cli.json("ledger", "alice")["items"][0]["id"]
    transaction = cli.usage("alice", 50, 40)

    over = cli("refund", transaction, "41")
    unknown = cli("refund", "tx_nope")
    grant = cli("refund", grant_id)

    assert [1, 1, 1] == [over.status, unknown.status, grant.status]
    assert "over_refund" in over.error_line()
    assert "cannot refund 41" in over.err
    assert "transaction_not_found" in unknown.error_line()
    assert "not_refundable" in grant.error_line()


def test_refund_with_a_key_applies_once(cli: Cli) -> None:
    """The same refund key refunds once."""
    cli.ok("grant", "alice", "100", "--type", "purchase")
    transaction = cli.usage("alice", 50, 40)

    cli.ok("refund", transaction, "10", "--key", "ticket-9")
    again = cli.json("refund", transaction, "10", "--key", "ticket-9")

    assert again["idempotent"] is True
    assert 70 == cli.json("balance", "alice")["balance"]


def test_release_frees_a_hold(cli: Cli) -> None:
    """Releasing a hold makes its credits available again; an unknown hold is refused."""
    cli.ok("grant", "alice", "100", "--type", "purchase")
    reservation = cli.hold("alice", 30)
    held = cli.json("balance", "alice")

    released = cli.json("release", "alice", reservation)
    unknown = cli("release", "alice", "res_nope")

    assert (30, 70) == (held["reserved"], held["available"])
    assert (True, 30, 100) == (released["released"], released["amount"], released["available"])
    assert 1 == unknown.status
    assert "reservation_not_found" in unknown.error_line()


def test_sweep_writes_off_expired_lots(cli: Cli) -> None:
    """A dry run reports the expired remainder; the sweep writes it off once."""
    now = datetime.now(UTC)

    async def grant_in_the_past(store: CreditStore) -> None:
        result = await store.add_credits(
            "alice", 40, "signup_bonus", expires_at=now - timedelta(days=1)
        )
        result.raise_for_error()

    cli.with_store(grant_in_the_past, clock=lambda: now - timedelta(days=2))

    dry = cli.json("sweep", "--dry-run")
    swept = cli.ok("sweep")
    again = cli.json("sweep")

    assert (1, 40, True) == (dry["expired_count"], dry["expired_amount"], dry["dry_run"])
    assert "wrote off 40 credits from 1 expired lots" in swept.out
    assert (0, 0) == (again["expired_count"], again["expired_amount"])
    assert 0 == cli.json("balance", "alice")["balance"]


def test_stats_totals_and_groups(cli: Cli) -> None:
    """Totals, and spend by user, model and day, over the default window."""
    cli.ok("grant", "alice", "1000", "--type", "purchase")
    cli.ok("grant", "bob", "1000", "--type", "purchase")
    cli.usage("alice", 100, 70, model="gpt-4o")
    cli.usage("bob", 100, 30, model="claude")
    cli.usage("alice", 100, 5, model="claude")

    totals = cli.json("stats", "--top", "1")
    by_user = cli.json("stats", "--by", "user")
    by_model = cli.json("stats", "--by", "model", "--top", "1")
    by_day = cli.json("stats", "--by", "day", "--since", "2d")
    table = cli.ok("stats", "--by", "model").out

    assert 105 == totals["totals"]["total_credits_consumed"]
    assert [("alice", 75)] == [(r["user_id"], r["total_spend"]) for r in totals["top_users"]]
    assert [("alice", 75), ("bob", 30)] == [
        (r["user_id"], r["total_spend"]) for r in by_user["rows"]
    ]
    assert [("gpt-4o", 70)] == [(r["model"], r["total_spend"]) for r in by_model["rows"]]
    assert [105] == [r["total_spend"] for r in by_day["rows"]]
    assert "gpt-4o" in table
    assert "claude" in table


def test_options_go_before_or_after_the_command(cli: Cli) -> None:
    """--json and --store work before the command name and after it."""
    cli.ok("grant", "alice", "7")
    after = cli("balance", "alice", "--json", store=False)
    with_store_after = cli("balance", "alice", "--store", cli.url, "--json", store=False)

    assert 2 == after.status  # no store anywhere: a usage error
    assert 7 == with_store_after.json()["balance"]


def test_every_command_has_help(cli: Cli) -> None:
    """Each command and subcommand answers --help with status 0."""
    commands = [
        [],
        ["setup"],
        ["pricing"],
        ["grant"],
        ["balance"],
        ["ledger"],
        ["refund"],
        ["release"],
        ["sweep"],
        ["stats"],
        ["caps"],
        ["teams"],
        *[
            ["pricing", v]
            for v in ("validate", "set", "get", "list", "activate", "cancel", "export", "diff")
        ],
        *[["caps", v] for v in ("set", "list", "remove", "check")],
        *[
            ["teams", v]
            for v in ("create", "show", "add-member", "remove-member", "credit", "ledger")
        ],
    ]
    for command in commands:
        ran = cli(*command, "--help", store=False)
        assert 0 == ran.status, command
        assert "usage: ducto" in ran.out


def test_a_group_without_a_subcommand_prints_its_help(cli: Cli) -> None:
    """`ducto pricing` alone lists its subcommands and exits 2."""
    ran = cli("pricing")

    assert 2 == ran.status
    assert "validate" in ran.err
    assert "export" in ran.err
