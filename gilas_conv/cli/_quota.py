"""The operator's commands: ``usage`` (what was spent), ``quota set/show/rm`` (limits per
owner and a default) and ``prune`` (delete conversations idle too long). ``rm --owner X
--all`` (a user's erasure request) is with ``rm`` in :mod:`._manage`."""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import click

from ..store import Deletion
from ._app import Settings, dumps, fail, main, owner_options, pass_settings, plural, store_options
from ._render import Output

__all__ = ["confirm_deletion", "parse_duration", "report_deletion"]

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> dt.timedelta:
    """``90d``, ``12h``, ``30m``, ``45s`` or ``2w`` as a timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r}; use a positive number and a unit, like 90d or 12h")
    return dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _date(value: str | None, option: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)", param_hint=option) from None


def _number(value: Decimal | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"{value.normalize():f}"
    return f"{value:,}"


# ---------------------------------------------------------------------------------------------
# usage


@main.command()
@click.option("--since", metavar="YYYY-MM-DD", help="From this day (in the quota time zone).")
@click.option("--until", metavar="YYYY-MM-DD", help="Up to and including this day.")
@click.option(
    "--by",
    type=click.Choice(["day", "month", "model", "owner", "conversation"]),
    default="day",
    show_default=True,
    help="Group the requests by this.",
)
@click.option(
    "--prices",
    "prices_file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Price the tokens with this TOML/JSON price table, instead of the costs recorded.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of rows.")
@owner_options
@pass_settings
def usage(
    settings: Settings,
    since: str | None,
    until: str | None,
    by: str,
    prices_file: str | None,
    as_json: bool,
) -> None:
    """Show the requests made, their tokens and their cost.

    Read from the usage ledger, which keeps the spending of deleted conversations. With
    --owner, that owner's requests only; otherwise everyone's. Days and months are those of
    the quota time zone (`gilas-conv quota set --timezone`). The cost is what was recorded
    with each request when a price table was configured ($GILAS_CONV_PRICES), else empty:
    gilas-conv never invents a price.
    """
    rows = settings.store().usage(
        owner=settings.owner,
        since=_date(since, "--since"),
        until=_date(until, "--until"),
        by=by,
        prices=prices_file,
    )
    output = Output()
    if as_json:
        output.json(dumps([row.to_json() for row in rows], pretty=True))
        return
    if not rows:
        output.note("No requests recorded in that range.")
        return
    table = [
        [
            str(row.key) if row.key is not None else "(none)",
            _number(row.requests),
            _number(row.prompt_tokens),
            _number(row.completion_tokens),
            _number(row.total_tokens),
            f"{_number(row.cost)} {row.currency}" if row.cost is not None else "-",
        ]
        for row in rows
    ]
    output.table([by, "requests", "prompt", "completion", "total", "cost"], table)


# ---------------------------------------------------------------------------------------------
# quota


@main.group()
def quota() -> None:
    """Token and cost limits per owner, per day and per month."""


def _quota_command(name: str, *options: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """A ``quota`` subcommand: an optional OWNER, then ``options`` (in help order), then the
    store's global options; the function gets the settings first."""

    def decorate(function: Callable[..., Any]) -> Any:
        command = store_options(pass_settings(function))
        for option in reversed(options):
            command = option(command)
        return quota.command(name)(click.argument("owner", required=False)(command))

    return decorate


@_quota_command(
    "set",
    click.option("--default", "default", is_flag=True, help="Set the limits of owners without their own."),
    click.option("--daily-tokens", type=click.IntRange(min=0), metavar="N", help="Tokens per day."),
    click.option("--monthly-tokens", type=click.IntRange(min=0), metavar="N", help="Tokens per month."),
    click.option("--daily-cost", metavar="X", help="Cost per day, in the price table's currency."),
    click.option("--monthly-cost", metavar="X", help="Cost per month."),
    click.option("--timezone", metavar="ZONE", help="The time zone of days and months, for every owner."),
)
def quota_set(
    settings: Settings,
    owner: str | None,
    default: bool,
    daily_tokens: int | None,
    monthly_tokens: int | None,
    daily_cost: str | None,
    monthly_cost: str | None,
    timezone: str | None,
) -> None:
    """Set limits of OWNER (or --default), and/or the periods' time zone.

    Token limits count the total tokens the API reported (prompt + completion); a request
    is refused when what is used, plus what requests in flight hold, plus its own
    reservation would pass a limit. Periods are calendar days and months in the time zone
    (default UTC). Only the limits given change.
    """
    store = settings.store()
    limits = (daily_tokens, monthly_tokens, daily_cost, monthly_cost)
    if owner is None and not default and timezone is None:
        raise click.UsageError("give an OWNER, --default, or --timezone")
    if (owner is not None or default) and all(v is None for v in limits):
        raise click.UsageError(
            "give at least one of --daily-tokens, --monthly-tokens, --daily-cost, --monthly-cost"
        )
    if owner is None and not default and any(v is not None for v in limits):
        raise click.UsageError("limits need an OWNER or --default")
    if owner is not None and default:
        raise click.UsageError("give an OWNER or --default, not both")
    output = Output()
    if timezone is not None:
        store.set_quota_timezone(timezone)
        output.note(f"quota periods follow {timezone}")
    if owner is not None or default:
        store.set_quota(
            owner,
            default=default,
            daily_tokens=daily_tokens,
            monthly_tokens=monthly_tokens,
            daily_cost=daily_cost,
            monthly_cost=monthly_cost,
        )
        output.note(f"limits set for {'the default' if default else repr(owner)}")


@_quota_command("show", click.option("--json", "as_json", is_flag=True, help="Print a JSON array."))
def quota_show(settings: Settings, owner: str | None, as_json: bool) -> None:
    """Show the limits of OWNER (or of every owner that has some), with what is used, what
    requests in flight hold and when each resets."""
    store = settings.store()
    zone = store.quota_timezone()
    defaults: list[tuple[str, str, Any]] = []
    if owner is not None:
        statuses = store.quota(owner)
    else:
        statuses = []
        for limits in store.quota_limits():
            if limits.default:
                defaults = [
                    (period, unit, value)
                    for period, unit, value in (
                        ("day", "tokens", limits.daily_tokens),
                        ("month", "tokens", limits.monthly_tokens),
                        ("day", "cost", limits.daily_cost),
                        ("month", "cost", limits.monthly_cost),
                    )
                    if value is not None
                ]
            else:
                statuses.extend(store.quota(limits.owner))
    output = Output()
    if as_json:
        data = [
            {"owner": None, "default": True, "period": p, "unit": u, "limit": float(v)}
            for p, u, v in defaults
        ]
        output.json(dumps(data + [s.to_json() for s in statuses], pretty=True))
        return
    if not statuses and not defaults:
        output.note(f"No limits apply{f' to {owner!r}' if owner else ''} (`gilas-conv quota set`).")
        return
    rows = [["(default)", period, unit, _number(value), "-", "-", "-"] for period, unit, value in defaults]
    rows += [
        [
            str(s.owner) + (" (default)" if s.inherited else ""),
            s.period,
            s.unit,
            _number(s.limit),
            _number(s.used),
            _number(s.reserved),
            s.resets_at.astimezone(_zone(zone)).strftime("%Y-%m-%d %H:%M"),
        ]
        for s in statuses
    ]
    output.table(["owner", "period", "unit", "limit", "used", "reserved", f"resets ({zone})"], rows)


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


@_quota_command("rm", click.option("--default", "default", is_flag=True, help="Remove the default limits."))
def quota_rm(settings: Settings, owner: str | None, default: bool) -> None:
    """Remove every limit of OWNER (who then falls under the default), or the default."""
    if (owner is None) == (not default):
        raise click.UsageError("give an OWNER or --default")
    removed = settings.store().remove_quota(owner, default=default)
    who = "the default" if default else repr(owner)
    if not removed:
        fail(f"{who} has no limits of its own")
    Output().note(f"limits of {who} removed")


# ---------------------------------------------------------------------------------------------
# prune (and the confirmation rm --all shares)


def confirm_deletion(found: Deletion, what: str) -> None:
    """Ask before deleting ``found`` (``what`` says whose); exit with nothing deleted on no."""
    click.echo(
        f"{what}: {plural(found.conversations, 'conversation', 'conversations')}, "
        f"{plural(found.messages, 'message', 'messages')}",
        err=True,
    )
    try:
        confirmed = click.confirm("Delete them for good?", default=False, err=True)
    except click.Abort:  # end of input: no answer is a no
        confirmed = False
    if not sys.stdin.isatty():
        click.echo(err=True)
    if not confirmed:
        fail("nothing was deleted (pass --yes to delete without asking)")


def report_deletion(done: Deletion, *, dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    Output().note(
        f"{verb} {plural(done.conversations, 'conversation', 'conversations')} and "
        f"{plural(done.messages, 'message', 'messages')}",
        style="" if dry_run else "dim",
    )


@main.command()
@click.option(
    "--inactive-for", "inactive_for", required=True, metavar="DURATION", help="Idle this long: 90d, 12h, 30m."
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@owner_options
@pass_settings
def prune(settings: Settings, inactive_for: str, dry_run: bool, yes: bool) -> None:
    """Delete every conversation idle longer than --inactive-for (of --owner only, if given).

    Whole conversations go: messages, summaries and what is derived from them, in batches
    that never hold the database long; the usage ledger keeps their spending. On SQLite the
    text is overwritten in the file; on Postgres run VACUUM afterwards (see the README).
    """
    try:
        idle = parse_duration(inactive_for)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--inactive-for") from None
    store = settings.store()
    found = store.prune(inactive_for=idle, owner=settings.owner, dry_run=True)
    if dry_run or not found.conversations:
        report_deletion(found, dry_run=True)
        return
    if not yes:
        confirm_deletion(found, f"idle for over {inactive_for}")
    report_deletion(store.prune(inactive_for=idle, owner=settings.owner), dry_run=False)
