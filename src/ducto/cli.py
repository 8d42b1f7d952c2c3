"""
The ``ducto`` command line: set up a store, publish and schedule pricing, grant, inspect,
refund, sweep, prune and archive.

```
ducto --store sqlite:///billing.db setup
ducto pricing validate pricing.json
ducto pricing set pricing.json --label "March prices"
ducto pricing set next.json --effective-at 2027-01-01T00:00:00Z
ducto pricing list
ducto grant alice 1000 --type purchase --key stripe-evt-1
ducto grant --csv grants.csv
ducto balance alice
ducto --json ledger alice --limit 5
ducto caps set alice 500 --scope key_123
ducto stats --by scope --user alice
ducto prune --dry-run
ducto archive --before 2026-01-01 --to ledger-2025.jsonl.gz
```

The store comes from ``--store URL`` or the ``DUCTO_STORE_URL`` environment variable (the
place for a URL that carries a password). Results are aligned tables, or JSON with
``--json``. Exit status: 0 done, 1 refused by the books (or nothing found), 2 usage error,
3 the store failed or cannot be reached, 130 interrupted. Errors are one line on stderr.

The command line uses only the standard library (argparse), so it works in any install of
ducto, and runs the async store API with `anyio.run` (``--backend trio`` needs
``ducto[trio]``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, date, datetime, timedelta
from typing import Final, Generic, NoReturn, TextIO, TypeVar

import anyio

from ducto._cli import batch, commands
from ducto._cli.context import STORE_ENV, Context
from ducto._cli.output import Output, cell
from ducto._cli.values import (
    NotFoundError,
    UsageError,
    parse_count,
    parse_duration,
    redact,
)
from ducto._shown import shown
from ducto.errors import (
    CreditError,
    DuctoError,
    InvalidArgumentError,
    PricingVersionInEffectError,
    PricingVersionNotFoundError,
    StoreError,
)
from ducto.interface.models import ArchiveResult, PruneResult

__all__ = ["main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_INTERRUPTED = 130

PROGRESS_EVERY: Final = 0.5
"""Seconds between two progress lines of `prune` and `archive` (none for a shorter run)."""

_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_FOR_EVER: Final = frozenset({"forever", "for-ever", "never", "none"})

_R = TypeVar("_R")

_EPILOG = f"""\
The store is --store URL or ${STORE_ENV}: memory://, sqlite:///relative.db,
sqlite:////absolute.db. Put a URL with a password in ${STORE_ENV}, never on the command line.

Amounts are whole credits. Instants are ISO 8601 (2026-04-01T12:00:00Z); one without Z or an
offset is local time. Durations are 30d, 12h, 90m, 2w or 1d12h: from now for --expires, ago for
--since and --until.

Exit status: 0 done, 1 refused by the books or not found, 2 usage error, 3 store error,
130 interrupted. Try 'ducto COMMAND --help'; docs/cli.md has every command.
"""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, naming the command and its help."""

    def error(self, message: str) -> NoReturn:
        """Print the error as one line and exit with the usage status."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _count(name: str, maximum: int = 1_000_000) -> Callable[[str], int]:
    """An argparse type reading a whole number from 1 to `maximum`."""

    def convert(text: str) -> int:
        try:
            return parse_count(text, name, maximum=maximum)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _common(suppress: bool) -> _Parser:
    """The options every command takes, before or after its name."""
    parent = _Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parent.add_argument(
        "--store",
        metavar="URL",
        default=default,
        help=f"the store (default: ${STORE_ENV}); no passwords here",
    )
    parent.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print results as JSON for scripts",
    )
    parent.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default=argparse.SUPPRESS if suppress else "asyncio",
        help="event loop to run on (default: asyncio; trio needs ducto[trio])",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every command and option with its help."""
    from ducto import __version__

    parser = _Parser(
        prog="ducto",
        description="Operate ducto credit billing: schema, pricing, grants, balances, ledger, "
        "refunds, holds, expiry, analytics, spend caps and teams.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"ducto {__version__}")
    parser.set_defaults(handler=None)
    common = [_common(suppress=True)]
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    def command(
        name: str, help_text: str, *, aliases: Sequence[str] = (), epilog: str | None = None
    ) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            aliases=aliases,
            parents=common,
        )
        return made

    cmd = command("setup", "create or migrate the schema (idempotent)", aliases=["migrate"])
    cmd.set_defaults(handler=commands.cmd_setup)

    _pricing(
        command(
            "pricing",
            "validate, publish, schedule, list, activate, cancel, export and diff pricing",
        ),
        common,
    )

    cmd = command(
        "grant",
        "grant credits to a user, or a batch from a CSV file",
        epilog="CSV columns: user_id, amount, and optionally type, expires, key. Each row is "
        "granted under its own idempotency key (its key column, else BATCH:N for the user's "
        "N-th row), so running the same batch again applies nothing twice.",
    )
    cmd.add_argument("user", nargs="?", metavar="USER", help="the account")
    cmd.add_argument(
        "amount", nargs="?", metavar="AMOUNT", help="credits (negative only for --type adjustment)"
    )
    cmd.add_argument(
        "--type",
        choices=commands.GRANT_TYPES,
        default="adjustment",
        help="ledger type of the grant (default: adjustment)",
    )
    cmd.add_argument(
        "--expires",
        metavar="WHEN",
        help="when the credits expire: ISO 8601 instant or a duration such as 30d (default: never)",
    )
    cmd.add_argument("--key", help="idempotency key: the same key grants once (default: none)")
    cmd.add_argument("--csv", metavar="FILE", help="grant every row of this CSV file")
    cmd.add_argument(
        "--batch",
        help="with --csv: the batch name keys derive from "
        "(default: the file name without its suffix)",
    )
    cmd.add_argument(
        "--jobs",
        type=_count("--jobs", 64),
        default=16,
        help="with --csv: grants in flight at once (default: 16)",
    )
    cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="with --csv: check the file and show the keys, grant nothing",
    )
    cmd.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --csv: show progress on stderr (default: when it is a terminal)",
    )
    cmd.set_defaults(handler=_grant)

    cmd = command("balance", "show a user's balance and credit lots")
    cmd.add_argument("user", metavar="USER")
    cmd.set_defaults(handler=commands.cmd_balance)

    cmd = command("ledger", "show a user's ledger, newest first")
    cmd.add_argument("user", metavar="USER")
    _ledger_options(cmd)
    cmd.add_argument(
        "--type",
        dest="types",
        action="append",
        metavar="TYPE",
        help="only rows of this type (repeatable)",
    )
    cmd.add_argument("--since", metavar="WHEN", help="only rows at or after WHEN")
    cmd.add_argument("--until", metavar="WHEN", help="only rows before WHEN")
    cmd.set_defaults(handler=commands.cmd_ledger)

    cmd = command("refund", "refund a usage debit, in full or in part")
    cmd.add_argument("transaction", metavar="TRANSACTION", help="the usage row's id")
    cmd.add_argument(
        "amount", nargs="?", metavar="AMOUNT", help="credits (default: all that is left)"
    )
    cmd.add_argument("--reason", help="stored on the refund row")
    cmd.add_argument("--key", help="idempotency key: the same key refunds once")
    cmd.set_defaults(handler=commands.cmd_refund)

    cmd = command("release", "free a user's hold (or a member's hold on a team pool)")
    cmd.add_argument("user", metavar="USER")
    cmd.add_argument("reservation", metavar="RESERVATION", help="the hold's id")
    cmd.add_argument(
        "--team", metavar="TEAM", help="the team pool, for a hold on a team (default: none)"
    )
    cmd.set_defaults(handler=commands.cmd_release)

    cmd = command("sweep", "write off the unspent remainder of expired credit lots")
    cmd.add_argument("--dry-run", action="store_true", help="report, change nothing")
    cmd.set_defaults(handler=commands.cmd_sweep)

    cmd = command(
        "prune",
        "delete idempotency records and finished holds past retention, and closed windows",
        epilog="Run it with the retention your application gives its store: a key is replayed "
        "only while its record is kept. Safe while traffic flows and from several processes.",
    )
    cmd.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    for option, what in (("idempotency", "idempotency records"), ("hold", "finished holds")):
        cmd.add_argument(
            f"--{option}-retention",
            metavar="DURATION",
            help=f"how long {what} are kept: 24h, 7d, 30d, or 'forever' "
            "(default: 7d, the stores' default)",
        )
    _progress_option(cmd)
    cmd.set_defaults(handler=_prune)

    cmd = command(
        "archive",
        "move ledger rows created before a UTC day to a gzip'd JSON Lines file",
        epilog="The file is appended to, and each chunk is synced before its rows leave the "
        "ledger. After an interrupted run, run the same command again: a chunk may then be "
        "in the file twice (same ids), never missing.",
    )
    cmd.add_argument(
        "--before",
        required=True,
        metavar="YYYY-MM-DD",
        help="archive rows created before this UTC midnight "
        "(no later than the first day of the current month)",
    )
    cmd.add_argument(
        "--to", dest="destination", required=True, metavar="PATH", help="the archive file"
    )
    cmd.add_argument(
        "--dry-run", action="store_true", help="count the rows, write and delete nothing"
    )
    _progress_option(cmd)
    cmd.set_defaults(handler=_archive)

    cmd = command("stats", "spend (net paid usage) over a window")
    cmd.add_argument(
        "--since", metavar="WHEN", help="window start (default: 30 days before --until)"
    )
    cmd.add_argument("--until", metavar="WHEN", help="window end, exclusive (default: now)")
    cmd.add_argument(
        "--by",
        choices=("user", "model", "day", "scope"),
        help="group the spend (scope: per user and budget scope, such as an API key)",
    )
    cmd.add_argument(
        "--user", metavar="USER", help="with --by scope: only this user's spend (default: all)"
    )
    cmd.add_argument(
        "--top",
        type=_count("--top"),
        metavar="N",
        help="only the first N rows (with no --by: also list the top N users)",
    )
    cmd.set_defaults(handler=commands.cmd_stats)

    _caps(command("caps", "set, list, remove and check spend caps"), common)
    _teams(command("teams", "team pools: create, show, members, credits, ledger"), common)
    return parser


def _progress_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="report a long run on stderr, at most twice a second (default: on)",
    )


def _ledger_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--limit",
        type=_count("--limit", 1000),
        default=20,
        help="rows to show (default: 20, at most 1000)",
    )
    cmd.add_argument("--cursor", help="continue from where the previous page ended")


def _group(
    cmd: argparse.ArgumentParser, common: list[_Parser]
) -> Callable[[str, str], argparse.ArgumentParser]:
    sub = cmd.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    cmd.set_defaults(handler=None, group=cmd)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=common
        )
        return made

    return add


def _pricing(cmd: argparse.ArgumentParser, common: list[_Parser]) -> None:
    add = _group(cmd, common)
    sub = add("validate", "check a pricing file (JSON, or YAML with PyYAML); no store needed")
    sub.add_argument("file", metavar="FILE", help="the pricing file, or - for stdin")
    sub.set_defaults(handler=commands.cmd_pricing_validate)

    sub = add(
        "set",
        "validate a pricing file and publish it as a new version, in force now or at a time",
    )
    sub.add_argument("file", metavar="FILE", help="the pricing file, or - for stdin")
    sub.add_argument("--label", help="a name for the version, shown in the history")
    sub.add_argument(
        "--effective-at",
        metavar="WHEN",
        help="schedule the version for this future instant, ISO 8601 with Z or an offset "
        "(2027-01-01T00:00:00Z); the current version stays in force until then "
        "(default: in force now)",
    )
    sub.set_defaults(handler=commands.cmd_pricing_set)

    add("get", "show the pricing version in force").set_defaults(handler=commands.cmd_pricing_get)
    add(
        "list",
        "list every pricing version, newest first: when it takes effect and whether it is "
        "in force, scheduled or cancelled",
    ).set_defaults(handler=commands.cmd_pricing_list)

    sub = add("activate", "put an existing pricing version in force now (a rollback)")
    sub.add_argument("version", metavar="VERSION", help="the version number")
    sub.set_defaults(handler=commands.cmd_pricing_activate)

    sub = add("cancel", "cancel a scheduled pricing version before it takes effect")
    sub.add_argument("version", metavar="VERSION", help="the version number")
    sub.set_defaults(handler=commands.cmd_pricing_cancel)

    sub = add("export", "write a version's config in the form 'pricing set' reads")
    sub.add_argument("version", metavar="VERSION", help="a version number, or 'active'")
    sub.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    sub.add_argument(
        "--format",
        choices=("json", "yaml"),
        help="default: yaml for a .yaml/.yml --output, else json",
    )
    sub.set_defaults(handler=commands.cmd_pricing_export)

    sub = add("diff", "compare two configs entry by entry")
    sub.add_argument("old", metavar="A", help="a version number, 'active', or a pricing file")
    sub.add_argument("new", metavar="B", help="a version number, 'active', or a pricing file")
    sub.set_defaults(handler=commands.cmd_pricing_diff)


def _caps(cmd: argparse.ArgumentParser, common: list[_Parser]) -> None:
    add = _group(cmd, common)

    def budget_scope(sub: argparse.ArgumentParser, help_text: str) -> None:
        sub.add_argument("--scope", metavar="SCOPE", help=help_text)

    def cap_key(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("user", metavar="USER")
        sub.add_argument(
            "--period",
            choices=("daily", "monthly"),
            default="daily",
            help="the UTC day or the UTC month (default: daily)",
        )
        sub.add_argument("--model", help="only this model's spend (default: all models)")
        budget_scope(
            sub,
            "only spend in this budget scope, such as an API key's id "
            "(default: all of the user's spend)",
        )

    sub = add("set", "create or replace the cap of (user, period, model, scope)")
    cap_key(sub)
    sub.add_argument("limit", metavar="LIMIT", help="credits the window may spend")
    sub.add_argument(
        "--action",
        choices=("deny", "warn", "notify"),
        default="deny",
        help="deny refuses holds over the limit; warn and notify only report (default: deny)",
    )
    sub.set_defaults(handler=commands.cmd_caps_set)

    sub = add("list", "list a user's caps")
    sub.add_argument("user", metavar="USER")
    sub.set_defaults(handler=commands.cmd_caps_list)

    sub = add("remove", "remove the cap of (user, period, model, scope)")
    cap_key(sub)
    sub.set_defaults(handler=commands.cmd_caps_remove)

    sub = add("check", "advisory: would AMOUNT more trip a cap, and when does it reset?")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("--model", help="the model of the spend (default: none)")
    budget_scope(sub, "the budget scope of the spend (default: none)")
    sub.add_argument("--amount", help="credits about to be spent (default: 0)")
    sub.set_defaults(handler=commands.cmd_caps_check)


def _teams(cmd: argparse.ArgumentParser, common: list[_Parser]) -> None:
    add = _group(cmd, common)
    sub = add("create", "create a team pool; prints its id")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--balance", default="0", help="initial credits (default: 0)")
    sub.set_defaults(handler=commands.cmd_teams_create)

    sub = add("show", "show a team's balance and members")
    sub.add_argument("team", metavar="TEAM", help="the team id")
    sub.set_defaults(handler=commands.cmd_teams_show)

    sub = add("add-member", "add a member, or change its role and monthly cap")
    sub.add_argument("team", metavar="TEAM")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("--role", default="member", help="(default: member)")
    sub.add_argument("--cap", help="the member's monthly spend cap on the pool (default: none)")
    sub.set_defaults(handler=commands.cmd_teams_add_member)

    sub = add("remove-member", "remove a member")
    sub.add_argument("team", metavar="TEAM")
    sub.add_argument("user", metavar="USER")
    sub.set_defaults(handler=commands.cmd_teams_remove_member)

    sub = add("credit", "add credits to a team pool")
    sub.add_argument("team", metavar="TEAM")
    sub.add_argument("amount", metavar="AMOUNT")
    sub.add_argument(
        "--expires", metavar="WHEN", help="ISO 8601 instant or duration (default: never)"
    )
    sub.add_argument("--key", help="idempotency key: the same key credits once")
    sub.set_defaults(handler=commands.cmd_teams_credit)

    sub = add("ledger", "show a team pool's ledger, newest first")
    sub.add_argument("team", metavar="TEAM")
    _ledger_options(sub)
    sub.set_defaults(handler=commands.cmd_teams_ledger)


async def _grant(ctx: Context) -> int:
    if ctx.args.csv is not None:
        if ctx.args.progress is None:
            ctx.args.progress = sys.stderr.isatty()
        return await batch.cmd_grant_csv(ctx)
    for option in ("batch", "dry_run"):
        if getattr(ctx.args, option):
            raise UsageError(f"--{option.replace('_', '-')} goes with --csv")
    return await commands.cmd_grant(ctx)


class _Ticker(Generic[_R]):
    """
    A `progress` callback for `prune` and `archive_ledger` that reports on stderr.

    A line at most every `every` seconds, and none before the run has taken that long, so
    a short run prints nothing and a long one does not flood a log.
    """

    def __init__(
        self,
        describe: Callable[[_R], str],
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        self._describe = describe
        self._every = PROGRESS_EVERY if every is None else every
        self._clock = clock
        self._stream = stream
        self._next = clock() + self._every

    def __call__(self, result: _R) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._every
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(self._describe(result) + "\n")
        stream.flush()


def _retention(args: argparse.Namespace, option: str) -> dict[str, timedelta | None]:
    """The store keyword for ``--OPTION-retention`` when it was given."""
    text: str | None = getattr(args, f"{option}_retention", None)
    if text is None:
        return {}
    if text.strip().lower() in _FOR_EVER:
        return {f"{option}_retention": None}
    duration = parse_duration(text)
    if duration is None:
        raise UsageError(
            f"--{option}-retention must be a duration (24h, 7d, 30d) or 'forever', "
            f"got {shown(text)}"
        )
    return {f"{option}_retention": duration}


def _counts(result: PruneResult) -> str:
    return (
        f"{result.idempotency_keys:,} idempotency records, {result.holds:,} holds "
        f"and {result.windows:,} window counters"
    )


async def _prune(ctx: Context) -> int:
    args = ctx.args
    store = await ctx.store()
    ticker: _Ticker[PruneResult] | None = None
    if args.progress:
        ticker = _Ticker(lambda done: f"pruning: {_counts(done)} so far")
    result = await store.prune(dry_run=args.dry_run, progress=ticker)
    if ctx.out.as_json:
        ctx.out.json(result)
    else:
        verb = "would delete" if result.dry_run else "deleted"
        ctx.out.text(f"{verb} {_counts(result)} past retention")
    return EXIT_OK


def _before(text: str) -> datetime:
    """``--before``: a date, read as that day's UTC midnight."""
    day: date | None = None
    if _DATE.fullmatch(text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            day = None
    if day is None:
        raise UsageError(
            f"--before must be a date YYYY-MM-DD (read as that day's UTC midnight), "
            f"got {shown(text)}"
        )
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def _archive(ctx: Context) -> int:
    args = ctx.args
    before = _before(args.before)
    store = await ctx.store()
    ticker: _Ticker[ArchiveResult] | None = None
    if args.progress:
        ticker = _Ticker(
            lambda done: f"archiving: {done.rows:,} rows, {done.bytes_written:,} bytes so far"
        )
    try:
        result = await store.archive_ledger(
            before, args.destination, dry_run=args.dry_run, progress=ticker
        )
    except OSError as exc:
        # Rows leave the ledger only after their chunk is synced, so none were lost.
        raise UsageError(
            f"cannot write the archive {args.destination!r}: {exc.strerror or exc}"
        ) from exc
    if ctx.out.as_json:
        ctx.out.json(result)
        return EXIT_OK
    when = cell(result.before)
    if result.dry_run:
        ctx.out.text(f"would archive {result.rows:,} ledger rows created before {when}")
    else:
        ctx.out.text(
            f"archived {result.rows:,} ledger rows created before {when} to "
            f"{result.destination} ({result.bytes_written:,} bytes)"
        )
    return EXIT_OK


async def _run(args: argparse.Namespace, out: Output, url: str | None, from_flag: bool) -> int:
    async with AsyncExitStack() as stack:
        options = {**_retention(args, "idempotency"), **_retention(args, "hold")}
        ctx = Context(args, out, url, stack, url_from_flag=from_flag, options=options)
        status: int = await args.handler(ctx)
        return status


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, PricingVersionInEffectError):
        return EXIT_REFUSED  # the version's state refuses it, not the command line
    if isinstance(exc, UsageError | InvalidArgumentError):
        return EXIT_USAGE
    if isinstance(exc, NotFoundError | PricingVersionNotFoundError | CreditError):
        return EXIT_REFUSED
    if isinstance(exc, StoreError):
        return EXIT_STORE
    return EXIT_REFUSED


def _message(exc: BaseException, setting_up: bool) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, PricingVersionNotFoundError | PricingVersionInEffectError | NotFoundError):
        return text
    if isinstance(exc, StoreError):
        lowered = text.lower()
        hint = ""
        if not setting_up and (
            "no such table" in lowered
            or "no ducto schema" in lowered
            or ("relation" in lowered and "does not exist" in lowered)
        ):
            hint = "; from the command line, run 'ducto setup'"
        return f"store error: {text}{hint}"
    if isinstance(exc, UsageError | InvalidArgumentError):
        return f"error: {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the ``ducto`` command line.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 done, 1 refused by the books or not found, 2 usage error, 3 store
        error, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if args.handler is None:
        group: argparse.ArgumentParser = getattr(args, "group", parser)
        group.print_help(sys.stderr)
        return EXIT_USAGE
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        sys.stderr.write("ducto: error: --backend trio needs trio: pip install 'ducto[trio]'\n")
        return EXIT_USAGE
    url = args.store or os.environ.get(STORE_ENV) or None
    out = Output(as_json=args.json)
    try:
        status: int = anyio.run(_run, args, out, url, args.store is not None, backend=args.backend)
    except KeyboardInterrupt:
        sys.stderr.write("ducto: interrupted\n")
        return EXIT_INTERRUPTED
    except DuctoError as exc:
        sys.stderr.write(
            f"ducto: {redact(_message(exc, args.handler is commands.cmd_setup), url)}\n"
        )
        return _exit_status(exc)
    except BrokenPipeError:
        # The reader went away (``ducto ledger alice | head``); nothing more to say to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return status
