"""Stack Exchange data dumps -> the ``notes`` and ``behaviors`` tables of the data contract.

One site folder holds a Stack Exchange dump (``Posts``, optionally ``Comments`` and ``Users``) as
XML (the official format) or as a CSV conversion with the same column names. The adapter maps:

* every question (``PostTypeId=1``) to a note: ``note_id = "<site>:<Id>"``, the title, the HTML body
  as plain text, the tags as hashtags, ``category = <site>``, the creation date, and attribution
  (``https://<host>/q/<Id>``, the owner's display name and ``https://<host>/users/<UserId>``);
* who engaged with it to behaviour events (``user_id = "<site>:<UserId>"``): the asker at question
  time (``ask``), each answer's author at answer time (``answer``), each commenter on the question or
  on one of its answers at comment time (``comment``). The Community user (-1) and rows without a
  user id (deleted accounts) are skipped and counted, as are answers and comments whose question is
  not in the dump.

Files are streamed (``iterparse`` + ``clear``), so memory grows with the number of questions and
answers kept, not with the size of the text. Output rows are sorted, so the same dump always gives
the same tables in the same order.

Usage::

    tables = convert_site(Path("raw/stackexchange/coffee"))
    notes, behaviors, stats = convert_sites(Path("raw/stackexchange"), ["beer", "coffee"])
"""

from __future__ import annotations

import csv
import fnmatch
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa

from notellm.data.schema import BEHAVIORS_SCHEMA, NOTES_SCHEMA

# --- Stack Exchange conventions ------------------------------------------------------------------

QUESTION_TYPE = "1"
ANSWER_TYPE = "2"
COMMUNITY_USER_ID = "-1"  # the "Community" bot account; never a real reader

# Host of a site: "<site>.stackexchange.com" ("x.meta" -> "x.meta.stackexchange.com") except these.
SITE_HOST_OVERRIDES = {
    "mathoverflow": "mathoverflow.net",
    "mathoverflow.meta": "meta.mathoverflow.net",
}

# Licence of a post without a ContentLicense attribute, by creation date (Stack Exchange's rule):
# before the first date CC BY-SA 2.5, before the second 3.0, afterwards 4.0.
LICENSE_BY_DATE = (
    (datetime(2011, 4, 8, tzinfo=UTC), "CC BY-SA 2.5"),
    (datetime(2018, 5, 2, tzinfo=UTC), "CC BY-SA 3.0"),
)
LATEST_LICENSE = "CC BY-SA 4.0"

# File names of a site folder (matched case-insensitively). Posts may be split or renamed upstream.
POSTS_XML_PATTERNS = ("posts.xml", "posts_*.xml", "*-posts.xml")
POSTS_CSV_PATTERNS = ("posts.csv",)
COMMENTS_PATTERNS = ("comments.xml", "comments.csv")
USERS_PATTERNS = ("users.xml", "users.csv")

# Columns a CSV conversion must have to be converted like the XML dump.
POSTS_CSV_COLUMNS = ("Id", "PostTypeId", "ParentId", "CreationDate", "OwnerUserId", "Title", "Body", "Tags")
COMMENTS_CSV_COLUMNS = ("Id", "PostId", "CreationDate", "UserId")
USERS_CSV_COLUMNS = ("Id", "DisplayName")

CSV_FIELD_LIMIT = 1 << 30  # bodies can exceed the csv module's default 128 KiB field limit

_ANGLE_TAGS = re.compile(r"^(?:<[^<>]+>)+$")
_PIPE_TAGS = re.compile(r"^\|(?:[^|]+\|)+$")


class StackExchangeFormatError(ValueError):
    """A dump file is malformed or an unsupported variant; the message names the file and reason."""


@dataclass(frozen=True)
class SiteTables:
    """One converted site: ``notes`` (NOTES_SCHEMA), ``behaviors`` (BEHAVIORS_SCHEMA), ``stats``."""

    notes: pa.Table
    behaviors: pa.Table
    stats: dict[str, Any]


@dataclass(frozen=True)
class SiteFiles:
    """The dump files of one site folder that the adapter reads."""

    posts: list[Path]
    comments: Path | None
    users: Path | None


@dataclass
class _Question:
    post_id: str
    title: str
    body_html: str
    tags: list[str]
    created_at: datetime
    owner: str | None
    owner_display_name: str | None
    license: str


@dataclass(frozen=True)
class _Answer:
    parent_id: str | None
    owner: str | None
    created_at: datetime


# --- small pure helpers (tested directly) --------------------------------------------------------


def site_host(site: str) -> str:
    """The web host of ``site``: ``coffee`` -> ``coffee.stackexchange.com``."""
    return SITE_HOST_OVERRIDES.get(site, f"{site}.stackexchange.com")


def parse_tags(raw: str | None) -> list[str]:
    """Tag names from ``<a><b>`` or ``|a|b|`` (both dump generations); ``[]`` for none.

    Raises ``ValueError`` for any other shape (e.g. the comma-separated spreadsheet form).
    """
    if raw is None or not raw.strip():
        return []
    raw = raw.strip()
    if _ANGLE_TAGS.match(raw):
        return re.findall(r"<([^<>]+)>", raw)
    if _PIPE_TAGS.match(raw):
        return raw.strip("|").split("|")
    raise ValueError(f"tags {raw[:60]!r} are neither '<a><b>' nor '|a|b|'")


def license_for(created_at: datetime, content_license: str | None) -> str:
    """The CC BY-SA version of a post: its ``ContentLicense`` if given, else by creation date."""
    if content_license:
        return content_license
    for until, name in LICENSE_BY_DATE:
        if created_at < until:
            return name
    return LATEST_LICENSE


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment; block elements and ``<br>`` become line breaks."""

    BLOCK_TAGS = frozenset(
        "p div pre blockquote ul ol li dl dt dd table thead tbody tr h1 h2 h3 h4 h5 h6 hr".split()
    )
    CELL_TAGS = frozenset(("td", "th"))
    SKIP_TAGS = frozenset(("script", "style"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._pre_depth = 0
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP_TAGS:
            self._skip_depth += 1
        elif tag == "br" or tag in self.BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in self.CELL_TAGS:
            self.parts.append(" ")
        if tag == "pre":
            self._pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self.BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in self.CELL_TAGS:
            self.parts.append(" ")
        if tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        # Source line breaks are layout except inside <pre>, where they separate lines of code.
        self.parts.append(data if self._pre_depth else data.replace("\n", " ").replace("\r", " "))


def html_to_text(html: str | None) -> str:
    """Plain text of a Stack Exchange HTML body.

    Tags are dropped (the text of ``<code>``, links and list items is kept), entities unescaped,
    whitespace collapsed to single spaces; paragraphs, list items, ``<br>`` and the lines of a
    ``<pre>`` block are separated by one ``"\\n"``; empty lines are removed.
    """
    if not html:
        return ""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line)


def _clean_title(title: str) -> str:
    return " ".join(title.split())


# --- file discovery and row streaming ------------------------------------------------------------


def _match(site_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    found = [
        p for p in site_dir.iterdir()
        if p.is_file() and any(fnmatch.fnmatchcase(p.name.lower(), pat) for pat in patterns)
    ]
    return sorted(found)


def find_site_files(site_dir: Path) -> SiteFiles:
    """The Posts file(s), Comments file and Users file of ``site_dir`` (the last two optional).

    Several Posts XML parts (``Posts.xml``, ``Posts_1.xml``, ``<x>-posts.xml``) are read in name
    order. Raises ``StackExchangeFormatError`` if there is no Posts file, or both XML and CSV ones.
    """
    if not site_dir.is_dir():
        raise StackExchangeFormatError(f"{site_dir}: site folder does not exist")
    xml_posts = _match(site_dir, POSTS_XML_PATTERNS)
    csv_posts = _match(site_dir, POSTS_CSV_PATTERNS)
    if xml_posts and csv_posts:
        raise StackExchangeFormatError(
            f"{site_dir}: both XML and CSV posts files ({[p.name for p in xml_posts + csv_posts]}); keep one"
        )
    posts = xml_posts or csv_posts
    if not posts:
        raise StackExchangeFormatError(
            f"{site_dir}: no posts file (expected one of {', '.join(POSTS_XML_PATTERNS + POSTS_CSV_PATTERNS)})"
        )

    def one(patterns: tuple[str, ...], kind: str) -> Path | None:
        found = _match(site_dir, patterns)
        if len(found) > 1:
            raise StackExchangeFormatError(f"{site_dir}: several {kind} files {[p.name for p in found]}")
        return found[0] if found else None

    return SiteFiles(posts=posts, comments=one(COMMENTS_PATTERNS, "comments"), users=one(USERS_PATTERNS, "users"))


def _iter_xml_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row number, attributes)`` of each ``<row>`` of a dump file, streamed."""
    n = 0
    try:
        for _, elem in ET.iterparse(path, events=("end",)):
            if elem.tag == "row":
                n += 1
                yield n, dict(elem.attrib)
                elem.clear()
    except ET.ParseError as exc:
        raise StackExchangeFormatError(f"{path}: not well-formed XML after row {n}: {exc}") from exc


def _iter_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, non-empty fields)`` of each CSV record; refuses files lacking ``required``."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise StackExchangeFormatError(
                f"{path}: unsupported CSV variant: has no {', '.join(missing)} column"
                f"{'s' if len(missing) > 1 else ''} (columns: {', '.join(columns)})"
            )
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None and v not in (None, "")}


def _iter_rows(path: Path, csv_columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    if path.suffix.lower() == ".csv":
        return _iter_csv_rows(path, csv_columns)
    return _iter_xml_rows(path)


def _where(path: Path, row_no: int, row: dict[str, str]) -> str:
    return f"{path}: row {row_no} (Id={row.get('Id', '?')})"


def _required(path: Path, row_no: int, row: dict[str, str], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise StackExchangeFormatError(f"{_where(path, row_no, row)}: field {field}: missing")
    return value


def _user_id(path: Path, row_no: int, row: dict[str, str], field: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    try:
        return str(int(value))
    except ValueError:
        raise StackExchangeFormatError(
            f"{_where(path, row_no, row)}: field {field}: not an integer user id: {value!r}"
        ) from None


def _timestamp(path: Path, row_no: int, row: dict[str, str], field: str) -> datetime:
    raw = _required(path, row_no, row, field)
    try:
        ts = datetime.fromisoformat(raw)
    except ValueError:
        raise StackExchangeFormatError(
            f"{_where(path, row_no, row)}: field {field}: not an ISO-8601 date: {raw!r}"
        ) from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def read_display_names(path: Path) -> dict[str, str]:
    """``{user id: display name}`` from a Users.xml / Users.csv file."""
    names: dict[str, str] = {}
    for row_no, row in _iter_rows(path, USERS_CSV_COLUMNS):
        user = _user_id(path, row_no, row, "Id")
        name = row.get("DisplayName")
        if user is not None and name:
            names[user] = name
    return names


# --- conversion ----------------------------------------------------------------------------------


def _read_posts(
    paths: list[Path],
) -> tuple[dict[str, _Question], dict[str, _Answer], dict[str, str]]:
    """Questions and answers by post id, and ``{post id: type}`` of other posts (tag wikis, ...)."""
    questions: dict[str, _Question] = {}
    answers: dict[str, _Answer] = {}
    others: dict[str, str] = {}
    for path in paths:
        for row_no, row in _iter_rows(path, POSTS_CSV_COLUMNS):
            post_id = _required(path, row_no, row, "Id")
            post_type = _required(path, row_no, row, "PostTypeId")
            if post_id in questions or post_id in answers or post_id in others:
                raise StackExchangeFormatError(f"{_where(path, row_no, row)}: duplicate post Id {post_id}")
            if post_type == QUESTION_TYPE:
                created_at = _timestamp(path, row_no, row, "CreationDate")
                try:
                    tags = parse_tags(row.get("Tags"))
                except ValueError as exc:
                    raise StackExchangeFormatError(f"{_where(path, row_no, row)}: field Tags: {exc}") from None
                questions[post_id] = _Question(
                    post_id=post_id,
                    title=_clean_title(_required(path, row_no, row, "Title")),
                    body_html=row.get("Body", ""),
                    tags=tags,
                    created_at=created_at,
                    owner=_user_id(path, row_no, row, "OwnerUserId"),
                    owner_display_name=row.get("OwnerDisplayName"),
                    license=license_for(created_at, row.get("ContentLicense")),
                )
            elif post_type == ANSWER_TYPE:
                answers[post_id] = _Answer(
                    parent_id=row.get("ParentId"),
                    owner=_user_id(path, row_no, row, "OwnerUserId"),
                    created_at=_timestamp(path, row_no, row, "CreationDate"),
                )
            else:
                others[post_id] = post_type
    return questions, answers, others


def _note_rows(site: str, host: str, questions: dict[str, _Question], names: dict[str, str]) -> dict[str, list]:
    cols: dict[str, list] = {f.name: [] for f in NOTES_SCHEMA}
    for q in questions.values():
        author = names.get(q.owner) if q.owner is not None else None
        cols["note_id"].append(f"{site}:{q.post_id}")
        cols["title"].append(q.title)
        cols["content"].append(html_to_text(q.body_html))
        cols["hashtags"].append(q.tags)
        cols["category"].append(site)
        cols["created_at"].append(q.created_at)
        cols["source_url"].append(f"https://{host}/q/{q.post_id}")
        cols["author"].append(author or q.owner_display_name)
        cols["author_url"].append(f"https://{host}/users/{q.owner}" if q.owner is not None else None)
    return cols


def convert_site(site_dir: Path, site: str | None = None) -> SiteTables:
    """Convert one site folder; ``site`` (default: the folder name) is the category and id prefix.

    Returns the site's notes and behaviours (sorted as in ``convert_sites``) and ``stats``: counts of
    notes, events by type, distinct users, skipped rows by reason, ignored post types, licences,
    and the input file names read.
    """
    site_dir = Path(site_dir)
    site = site or site_dir.name
    host = site_host(site)
    files = find_site_files(site_dir)
    names = read_display_names(files.users) if files.users else {}
    questions, answers, others = _read_posts(files.posts)

    events: dict[str, list] = {f.name: [] for f in BEHAVIORS_SCHEMA}
    skipped: Counter[str] = Counter()

    def add(event: str, user: str | None, question_id: str, ts: datetime) -> None:
        if user is None:
            skipped[f"{event}_no_user"] += 1
        elif user == COMMUNITY_USER_ID:
            skipped[f"{event}_community_user"] += 1
        else:
            events["user_id"].append(f"{site}:{user}")
            events["note_id"].append(f"{site}:{question_id}")
            events["event_type"].append(event)
            events["ts"].append(ts)

    for q in questions.values():
        add("ask", q.owner, q.post_id, q.created_at)
    for a in answers.values():
        if a.parent_id in questions:
            add("answer", a.owner, a.parent_id, a.created_at)
        else:
            skipped["answer_question_missing"] += 1
    if files.comments is not None:
        path = files.comments
        for row_no, row in _iter_rows(path, COMMENTS_CSV_COLUMNS):
            post_id = _required(path, row_no, row, "PostId")
            if post_id in questions:
                question_id = post_id
            elif post_id in answers and answers[post_id].parent_id in questions:
                question_id = answers[post_id].parent_id
            elif post_id in others:
                skipped["comment_on_other_post_type"] += 1
                continue
            else:
                skipped["comment_question_missing"] += 1
                continue
            add("comment", _user_id(path, row_no, row, "UserId"), question_id, _timestamp(path, row_no, row, "CreationDate"))

    notes = pa.table(_note_rows(site, host, questions, names), schema=NOTES_SCHEMA)
    behaviors = pa.table(events, schema=BEHAVIORS_SCHEMA)
    notes, behaviors = sort_notes(notes), sort_behaviors(behaviors)

    type_counts = Counter(events["event_type"])
    stats: dict[str, Any] = {
        "site": site,
        "host": host,
        "input_files": [p.name for p in [*files.posts, files.comments, files.users] if p is not None],
        "notes": notes.num_rows,
        "notes_with_author": notes.num_rows - notes["author"].null_count,
        "notes_with_author_url": notes.num_rows - notes["author_url"].null_count,
        "answers_read": len(answers),
        "events": {event: type_counts.get(event, 0) for event in ("ask", "answer", "comment")},
        "events_total": behaviors.num_rows,
        "users": len(set(events["user_id"])),
        "skipped": dict(sorted(skipped.items())),
        "ignored_post_types": dict(sorted(Counter(others.values()).items())),
        "licenses": dict(sorted(Counter(q.license for q in questions.values()).items())),
        "first_question": min(q.created_at for q in questions.values()).isoformat() if questions else None,
        "last_question": max(q.created_at for q in questions.values()).isoformat() if questions else None,
    }
    return SiteTables(notes=notes, behaviors=behaviors, stats=stats)


def sort_notes(notes: pa.Table) -> pa.Table:
    """Notes in the canonical order: (category, created_at, note_id)."""
    return notes.sort_by([("category", "ascending"), ("created_at", "ascending"), ("note_id", "ascending")])


def sort_behaviors(behaviors: pa.Table) -> pa.Table:
    """Behaviours in the canonical order: (note_id, ts, user_id, event_type)."""
    return behaviors.sort_by(
        [("note_id", "ascending"), ("ts", "ascending"), ("user_id", "ascending"), ("event_type", "ascending")]
    )


def convert_sites(raw_dir: Path, sites: list[str]) -> tuple[pa.Table, pa.Table, dict[str, dict[str, Any]]]:
    """Convert ``raw_dir/<site>`` for each site; returns (notes, behaviors, {site: stats}).

    Rows of all sites are merged and sorted canonically, so the result does not depend on the
    order of ``sites``.
    """
    if not sites:
        raise ValueError("no Stack Exchange sites given")
    duplicates = sorted(s for s, n in Counter(sites).items() if n > 1)
    if duplicates:
        raise ValueError(f"sites listed twice: {duplicates}")
    converted = [convert_site(Path(raw_dir) / site, site) for site in sites]
    notes = sort_notes(pa.concat_tables([c.notes for c in converted]))
    behaviors = sort_behaviors(pa.concat_tables([c.behaviors for c in converted]))
    return notes, behaviors, {c.stats["site"]: c.stats for c in converted}
