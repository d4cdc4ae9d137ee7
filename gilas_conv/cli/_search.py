"""``gilas-conv search``: find messages by what they said (see :mod:`gilas_conv.search`)."""

from __future__ import annotations

import json
import shlex

import click
from rich.text import Text

from ..search import SearchHit
from ._app import Settings, owner_options, pass_settings
from ._render import Output, visible

__all__ = ["print_hits", "search"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def _safe(text: str) -> str:
    """A title on one line, its control characters made visible (a title came from outside)."""
    return visible(" ".join(text.split()))


def resume_command(hit: SearchHit, owner: str | None) -> str:
    owner_flag = f" --owner {shlex.quote(owner)}" if owner is not None else ""
    return f"gilas-conv chat{owner_flag} {hit.conversation_id}"


def print_hits(output: Output, hits: list[SearchHit], *, owner: str | None) -> None:
    """Each hit as three lines: where it is, the snippet with the matches highlighted (on a
    terminal; in [brackets] when piped), and the command that resumes its conversation."""
    for hit in hits:
        where = f"{hit.conversation_id}  #{hit.seq} {hit.role}"
        if hit.incomplete:
            where += " (incomplete)"
        if hit.title:
            where += f"  {_safe(hit.title)}"
        output.line(where, style="bold")
        if output.rich:
            snippet = Text("  ")
            for fragment, matched in hit.fragments:
                snippet.append(fragment, style="bold yellow" if matched else None)
            output.console.print(snippet, soft_wrap=True)
        else:
            output.line(f"  {hit.snippet}")
        output.line(f"  {resume_command(hit, owner)}", style="dim")


@click.command("search")
@click.argument("query", nargs=-1, required=True)
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(1, MAX_LIMIT),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="Show at most this many messages.",
)
@click.option(
    "--cid", "--conversation", "conversation_id", metavar="ID", help="Search only this conversation."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of hits.")
@owner_options
@pass_settings
def search(
    settings: Settings, query: tuple[str, ...], limit: int, conversation_id: str | None, as_json: bool
) -> None:
    """Find messages by their words, best match first, and say how to resume each.

    All words must occur; "a phrase" must occur as written; a word ending in * matches its
    beginning (تهر* finds تهران). Persian and Arabic spellings match each other: ي and ی,
    ك and ک, with or without diacritics or tatweel, and می‌خواهم, میخواهم and می خواهم are
    one word; Persian digits match ASCII ones. System prompts and tool-call arguments are
    not searched. --json prints objects with conversation_id, title, seq, role, status,
    created_at, rank and snippet (matches in [brackets]).
    """
    hits = settings.store().search(
        " ".join(query), owner=settings.owner, limit=limit, conversation=conversation_id
    )
    output = Output()
    if as_json:
        output.json(json.dumps([hit.to_json() for hit in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        output.note("no message matches")
        return
    print_hits(output, hits, owner=settings.owner)
