"""``ducto grant --csv``: a batch of grants, each under its own key, safe to run again."""

from __future__ import annotations

import pytest
from tests.cli._cli_support import Cli

GRANTS = """user_id,amount,type,expires
carol,100,purchase,
dave,50,signup_bonus,30d
carol,100,purchase,
erin,25,,
"""


def _balances(cli: Cli, *users: str) -> dict[str, int]:
    return {user: cli.json("balance", user)["balance"] for user in users}


def test_batch_grants_every_row(cli: Cli) -> None:
    """Every row is granted, with its type and expiry; identical rows are separate grants."""
    path = cli.file("march.csv", GRANTS)

    report = cli.json("grant", "--csv", path, "--type", "purchase")

    assert (4, 4, 0, 275) == (
        report["rows"],
        report["applied"],
        report["replayed"],
        report["credits"],
    )
    assert {"carol": 200, "dave": 50, "erin": 25} == _balances(cli, "carol", "dave", "erin")
    assert [
        "march:100:purchase",
        "march:50:signup_bonus:30d",
        "march:100:purchase#2",
        "march:25:purchase",
    ] == [row["key"] for row in report["results"]]
    assert cli.json("balance", "dave")["lots"][0]["expires_at"] is not None


def test_rerun_applies_nothing_twice(cli: Cli) -> None:
    """Running the same file again replays every row and grants nothing."""
    path = cli.file("march.csv", GRANTS)
    cli.ok("grant", "--csv", path)

    again = cli("--json", "grant", "--csv", path)
    text = cli("grant", "--csv", path)

    report = again.json()
    assert 0 == again.status
    assert (0, 4, 0) == (report["applied"], report["replayed"], report["credits"])
    assert "every row of batch 'march' was applied before" in text.err
    assert {"carol": 200, "dave": 50, "erin": 25} == _balances(cli, "carol", "dave", "erin")


def test_rerun_after_editing_the_file(cli: Cli) -> None:
    """Removing and adding rows never re-applies another row; only the new row is granted."""
    path = cli.file("march.csv", GRANTS)
    cli.ok("grant", "--csv", path)
    edited = GRANTS.replace("dave,50,signup_bonus,30d\n", "") + "frank,10,,\n"
    cli.file("march.csv", edited)

    report = cli.json("grant", "--csv", path)

    assert (1, 3) == (report["applied"], report["replayed"])
    assert {"carol": 200, "dave": 50, "erin": 25, "frank": 10} == _balances(
        cli, "carol", "dave", "erin", "frank"
    )


def test_another_batch_name_grants_again(cli: Cli) -> None:
    """--batch names a new batch: the same rows are new grants."""
    path = cli.file("grants.csv", "user_id,amount\ncarol,5\n")
    cli.ok("grant", "--csv", path, "--batch", "2026-03")

    report = cli.json("grant", "--csv", path, "--batch", "2026-04")

    assert 1 == report["applied"]
    assert 10 == cli.json("balance", "carol")["balance"]


def test_key_column_is_used(cli: Cli) -> None:
    """A key column keys each row; an explicit key replays even from another file."""
    first = cli.file("a.csv", "user,amount,key\ncarol,7,evt-1\n")
    second = cli.file("b.csv", "user,amount,key\ncarol,7,evt-1\n")
    cli.ok("grant", "--csv", first)

    report = cli.json("grant", "--csv", second)

    assert (0, 1) == (report["applied"], report["replayed"])
    assert 7 == cli.json("balance", "carol")["balance"]


def test_refused_rows_are_listed_and_the_rest_applied(cli: Cli) -> None:
    """A row the books refuse is reported with its line; the others apply; status 1."""
    path = cli.file("adjust.csv", "user_id,amount\ncarol,10\nerin,-5\n")

    ran = cli("grant", "--csv", path)

    assert 1 == ran.status
    assert "adjust.csv line 3: refused (insufficient_credits)" in ran.err
    assert 10 == cli.json("balance", "carol")["balance"]


def test_bad_rows_grant_nothing(cli: Cli) -> None:
    """Any invalid row stops the batch before anything is granted, listing every bad row."""
    path = cli.file("bad.csv", "user_id,amount\ncarol,10\ndave,ten\n,5\nerin,1.5,extra\n")

    ran = cli("grant", "--csv", path)

    lines = ran.err.strip().splitlines()
    assert 2 == ran.status
    assert "line 3: amount must be a whole number of credits, got 'ten'" in lines[0]
    assert "line 4: user_id is empty" in lines[1]
    assert "line 5: 3 values for 2 columns" in lines[2]
    assert "3 bad rows (listed above); nothing was granted" in lines[-1]
    assert 0 == cli.json("balance", "carol")["balance"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "the file is empty"),
        ("user_id,credits\n", "unknown column 'credits'"),
        ("user_id,type\n", "must name the user_id and amount columns"),
        ("user_id,amount\n", "no rows to grant"),
        ("user_id,amount\ncarol,5,,\n", "line 2: 4 values for 2 columns; nothing was granted"),
    ],
)
def test_bad_files(cli: Cli, content: str, says: str) -> None:
    """A file without the right header or rows is a usage error in one line."""
    ran = cli("grant", "--csv", cli.file("f.csv", content))

    assert 2 == ran.status
    assert says in ran.error_line()


def test_missing_file(cli: Cli) -> None:
    """A CSV file that does not exist is a usage error."""
    ran = cli("grant", "--csv", str(cli.tmp_path / "nope.csv"))

    assert 2 == ran.status
    assert "no such file" in ran.error_line()


def test_dry_run_grants_nothing(cli: Cli) -> None:
    """--dry-run checks the file and shows each row's key."""
    path = cli.file("march.csv", GRANTS)

    ran = cli.ok("grant", "--csv", path, "--dry-run")

    assert "march:100:purchase#2" in ran.out
    assert "nothing was granted (dry run)" in ran.out
    assert 0 == cli.json("balance", "carol")["balance"]


def test_progress_is_shown_on_request(cli: Cli) -> None:
    """--progress reports on stderr as rows are granted, ending at 100%."""
    rows = "".join(f"user-{n},1\n" for n in range(30))
    path = cli.file("many.csv", "user_id,amount\n" + rows)

    ran = cli.ok("grant", "--csv", path, "--progress")
    quiet = cli.ok("grant", "--csv", path, "--batch", "other", "--no-progress")

    progress = [line for line in ran.err.splitlines() if line.startswith("granting")]
    assert 10 == len(progress)
    assert "granting 30/30 (100%)" == progress[-1]
    assert "granting" not in quiet.err


def test_single_grant_options_do_not_mix_with_csv(cli: Cli) -> None:
    """USER AMOUNT and --key do not go with --csv."""
    path = cli.file("g.csv", "user_id,amount\ncarol,1\n")

    both = cli("grant", "carol", "5", "--csv", path)
    key = cli("grant", "--csv", path, "--key", "k")

    assert (2, 2) == (both.status, key.status)
    assert "not both" in both.error_line()
    assert "put a key column in the file" in key.error_line()
