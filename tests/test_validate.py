"""Readers and validator of the data contract, on small real Parquet / JSONL files.

Every bad-input kind is written to a real file in ``tmp_path``, read with ``read_table`` and
validated in both policies: ``fail`` must raise with the exact issue lines and counts, ``skip``
must report exactly those issues and keep exactly the other rows.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notellm.config import DataConfig
from notellm.data.io import read_table, write_table
from notellm.data.schema import BEHAVIORS_SCHEMA, NOTES_SCHEMA, TIMESTAMP
from notellm.data.validate import (
    MAX_ISSUES_SHOWN,
    DataValidationError,
    load_and_validate,
    validate_behaviors,
    validate_notes,
)

UTC = dt.UTC
NOW = dt.datetime(2025, 1, 1, tzinfo=UTC)
FUTURE = "(validated at 2025-01-01T00:00:00Z, tolerance 1:00:00)"
KNOWN = ["beer-0", "beer-1", "beer-2"]
TYPES = {
    "note_id": pa.string(), "title": pa.string(), "content": pa.string(),
    "hashtags": pa.list_(pa.string()), "category": pa.string(), "created_at": TIMESTAMP,
    "source_url": pa.string(), "author": pa.string(), "author_url": pa.string(),
    "user_id": pa.string(), "event_type": pa.string(), "ts": TIMESTAMP,
}


def note(i: int, **fields: Any) -> dict[str, Any]:
    row = {
        "note_id": f"beer-{i}", "title": f"Best stout {i}", "content": f"Roasty and dry, batch {i}.",
        "hashtags": ["stout", "brewing"], "category": "beer",
        "created_at": dt.datetime(2024, 1, 1, 8, 30, tzinfo=UTC) + dt.timedelta(days=i),
    }
    row.update(fields)
    return row


def behavior(i: int, **fields: Any) -> dict[str, Any]:
    row = {
        "user_id": f"user-{i}", "note_id": KNOWN[i % 3], "event_type": "answer",
        "ts": dt.datetime(2024, 6, 1, tzinfo=UTC) + dt.timedelta(hours=i),
    }
    row.update(fields)
    return row


def write_parquet(path: Path, rows: list[dict[str, Any]], types: dict[str, pa.DataType] | None = None) -> Path:
    """Rows -> a Parquet file, column types from ``TYPES`` unless overridden."""
    types = {**TYPES, **(types or {})}
    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({c: pa.array([r.get(c) for r in rows], types[c]) for c in columns}), path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any] | bytes]) -> Path:
    """Rows -> JSONL (datetimes as ISO strings); ``bytes`` items are written as raw lines."""
    lines = []
    for row in rows:
        if isinstance(row, bytes):
            lines.append(row)
        else:
            lines.append(json.dumps(row, default=lambda v: v.isoformat()).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run(table: str, path: Path, mode: str, **limits: Any):
    """Read ``path`` and validate it as ``table`` with policy ``mode``; returns (clean, report)."""
    cfg = DataConfig(on_row_error=mode, **limits)
    raw = read_table(path, table)
    if table == "notes":
        return validate_notes(raw, path, cfg, now=NOW)
    return validate_behaviors(raw, path, KNOWN, cfg, now=NOW)


def failure(table: str, path: Path, **limits: Any) -> str:
    with pytest.raises(DataValidationError) as exc:
        run(table, path, "fail", **limits)
    return str(exc.value)


def ids(table: pa.Table, column: str) -> list[str]:
    return table.column(column).to_pylist()


def good_notes() -> list[dict[str, Any]]:
    return [note(i) for i in range(3)]


# --------------------------------------------------------------------- row-level cases
# (name, table, file name, rows, limits, expected issues as (location, field, reason), kept ids)
BAD_LINE = b'{"note_id": "beer-1", "title": '
CASES = [
    ("null note_id", "notes", "notes.parquet",
     [note(0), note(1, note_id=None), note(2)], {},
     [("row 1", "note_id", "note_id is null")], ["beer-0", "beer-2"]),
    ("blank note_id", "notes", "notes.jsonl",
     [note(0), note(1, note_id="  "), note(2)], {},
     [("line 2", "note_id", "note_id is empty or blank ('  ')")], ["beer-0", "beer-2"]),
    ("note_id not a string", "notes", "notes.jsonl",
     [note(0), note(1, note_id=42), note(2)], {},
     [("line 2", "note_id", "note_id must be a string, got number 42")], ["beer-0", "beer-2"]),
    ("duplicate note_id", "notes", "notes.parquet",
     [note(0), note(1), note(2), note(3, note_id="beer-1")], {},
     [("row 3", "note_id", "duplicate note_id 'beer-1' (first at row 1)")], ["beer-0", "beer-1", "beer-2"]),
    ("duplicate note_id, JSONL line numbers across a blank line", "notes", "notes.jsonl",
     [note(0), b"", note(1), note(2, note_id="beer-0")], {},
     [("line 4", "note_id", "duplicate note_id 'beer-0' (first at line 1)")], ["beer-0", "beer-1"]),
    ("neither title nor content", "notes", "notes.parquet",
     [note(0), note(1, title=None, content="  \n"), note(2, title=None), note(3, content="")], {},
     [("row 1", "title/content", "note has neither title nor content (both null or blank)")],
     ["beer-0", "beer-2", "beer-3"]),
    ("null category", "notes", "notes.parquet",
     [note(0), note(1, category=None), note(2)], {},
     [("row 1", "category", "category is null")], ["beer-0", "beer-2"]),
    ("blank category", "notes", "notes.jsonl",
     [note(0), note(1, category="")], {},
     [("line 2", "category", "category is empty or blank ('')")], ["beer-0"]),
    ("null created_at", "notes", "notes.parquet",
     [note(0), note(1, created_at=None), note(2)], {},
     [("row 1", "created_at", "created_at is null")], ["beer-0", "beer-2"]),
    ("future created_at", "notes", "notes.parquet",
     [note(0), note(1, created_at=dt.datetime(2030, 1, 1, tzinfo=UTC)),
      note(2, created_at=NOW + dt.timedelta(minutes=30))], {},
     [("row 1", "created_at", f"created_at 2030-01-01T00:00:00Z is in the future {FUTURE}")],
     ["beer-0", "beer-2"]),
    ("unparsable created_at", "notes", "notes.jsonl",
     [note(0), note(1, created_at="next tuesday"), note(2)], {},
     [("line 2", "created_at", "created_at 'next tuesday' is not an ISO-8601 timestamp")], ["beer-0", "beer-2"]),
    ("created_at of the wrong JSON kind", "notes", "notes.jsonl",
     [note(0), note(1, created_at=[2024, 1, 1])], {},
     [("line 2", "created_at", "created_at must be an ISO-8601 string or epoch seconds, got array [2024, 1, 1]")],
     ["beer-0"]),
    ("hashtags a string", "notes", "notes.jsonl",
     [note(0), note(1, hashtags="#ipa #stout"), note(2)], {},
     [("line 2", "hashtags", "hashtags must be a list of strings, got string '#ipa #stout'")], ["beer-0", "beer-2"]),
    ("non-string hashtag", "notes", "notes.jsonl",
     [note(0), note(1, hashtags=["ipa", 7, None]), note(2, hashtags=None), note(3, hashtags=[])], {},
     [("line 2", "hashtags", "hashtags[1] must be a string, got number 7")], ["beer-0", "beer-2", "beer-3"]),
    ("null hashtag element", "notes", "notes.parquet",
     [note(0), note(1, hashtags=["ipa", None]), note(2, hashtags=None)], {},
     [("row 1", "hashtags", "hashtags[1] is null, expected a string")], ["beer-0", "beer-2"]),
    ("title too long", "notes", "notes.parquet",
     [note(0, title="x" * 10), note(1, title="é" * 11)], {"max_title_chars": 10},
     [("row 1", "title", "title has 11 characters (max_title_chars=10)")], ["beer-0"]),
    ("content too long", "notes", "notes.jsonl",
     [note(0, content="y" * 21), note(1, content="y" * 20)], {"max_content_chars": 20},
     [("line 1", "content", "content has 21 characters (max_content_chars=20)")], ["beer-1"]),
    ("too many hashtags", "notes", "notes.parquet",
     [note(0, hashtags=["a", "b", "c"]), note(1, hashtags=["a", "b"])], {"max_hashtags": 2},
     [("row 0", "hashtags", "3 hashtags (max_hashtags=2)")], ["beer-1"]),
    ("hashtag too long", "notes", "notes.parquet",
     [note(0, hashtags=["ipa", "stoutish", "porterish"]), note(1, hashtags=["stout"])], {"max_hashtag_chars": 5},
     [("row 0", "hashtags", "hashtags[1] has 8 characters (max_hashtag_chars=5)")], ["beer-1"]),
    ("note_id too long", "notes", "notes.parquet",
     [note(0), note(1, note_id="beer-123456")], {"max_id_chars": 8},
     [("row 1", "note_id", "note_id has 11 characters (max_id_chars=8): 'beer-123456'")], ["beer-0"]),
    ("invalid UTF-8 in a JSONL string value", "notes", "notes.jsonl",
     [note(0), json.dumps(note(1, created_at="2024-01-02")).encode().replace(b"Roasty", b"Ro\xffasty"), note(2)], {},
     [("line 2", "content", "content is not valid UTF-8 (invalid byte 0xff at byte offset 2)")], ["beer-0", "beer-2"]),
    ("line not valid JSON", "notes", "notes.jsonl",
     [note(0), BAD_LINE, note(2)], {},
     [("line 2", None, "not valid JSON: Expecting value at column 32")], ["beer-0", "beer-2"]),
    ("line not an object", "notes", "notes.jsonl",
     [note(0), b'["beer-1", "title"]'], {},
     [("line 2", None, "expected a JSON object per line, got a JSON array")], ["beer-0"]),
    ("null user_id", "behaviors", "behaviors.parquet",
     [behavior(0), behavior(1, user_id=None), behavior(2)], {},
     [("row 1", "user_id", "user_id is null")], ["user-0", "user-2"]),
    ("blank user_id", "behaviors", "behaviors.jsonl",
     [behavior(0), behavior(1, user_id="")], {},
     [("line 2", "user_id", "user_id is empty or blank ('')")], ["user-0"]),
    ("user_id too long", "behaviors", "behaviors.parquet",
     [behavior(0), behavior(1, user_id="u" * 9)], {"max_id_chars": 8},
     [("row 1", "user_id", "user_id has 9 characters (max_id_chars=8): 'uuuuuuuuu'")], ["user-0"]),
    ("null note_id in a behaviour", "behaviors", "behaviors.parquet",
     [behavior(0), behavior(1, note_id=None)], {},
     [("row 1", "note_id", "note_id is null")], ["user-0"]),
    ("behaviour on an unknown note", "behaviors", "behaviors.parquet",
     [behavior(0), behavior(1, note_id="beer-9"), behavior(2)], {},
     [("row 1", "note_id", "note_id 'beer-9' is not in the notes table")], ["user-0", "user-2"]),
    ("null event_type", "behaviors", "behaviors.parquet",
     [behavior(0, event_type=None), behavior(1)], {},
     [("row 0", "event_type", "event_type is null")], ["user-1"]),
    ("null ts", "behaviors", "behaviors.jsonl",
     [behavior(0), behavior(1, ts=None)], {},
     [("line 2", "ts", "ts is null")], ["user-0"]),
    ("unparsable ts", "behaviors", "behaviors.jsonl",
     [behavior(0), behavior(1, ts="yesterday")], {},
     [("line 2", "ts", "ts 'yesterday' is not an ISO-8601 timestamp")], ["user-0"]),
    ("future ts in epoch seconds", "behaviors", "behaviors.jsonl",
     [behavior(0, ts=1_717_200_000), behavior(1, ts=1_893_456_000)], {},
     [("line 2", "ts", f"ts 2030-01-01T00:00:00Z is in the future {FUTURE}")], ["user-0"]),
    ("epoch seconds out of range", "behaviors", "behaviors.jsonl",
     [behavior(0, ts=1_717_200_000), behavior(1, ts=10**15)], {},
     [("line 2", "ts", "ts 1000000000000000 epoch seconds is outside years 1-9999")], ["user-0"]),
    ("invalid UTF-8 user_id", "behaviors", "behaviors.jsonl",
     [b'{"user_id": "user-\xc3(", "note_id": "beer-0", "event_type": "ask", "ts": "2024-06-01T00:00:00Z"}',
      behavior(1)], {},
     [("line 1", "user_id", "user_id is not valid UTF-8 (invalid byte 0xc3 at byte offset 5)")], ["user-1"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_row_level_problem_fails_then_is_skipped(tmp_path: Path, case: tuple) -> None:
    _, table, name, rows, limits, expected, kept = case
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, rows)
    else:
        write_jsonl(path, rows)
    lines = [f"{path} {where}" + (f" field '{field}'" if field else "") + f": {reason}"
             for where, field, reason in expected]
    counts = {}
    for issue in expected:
        counts[f"{issue[1]}.{_code(issue[2])}" if issue[1] else _code(issue[2])] = 1

    message = failure(table, path, **limits)
    for line in lines:
        assert f"\n  {line}" in message
    n_rows = sum(1 for r in rows if r != b"")
    assert f"{table} ({path}): {len(expected)} of {n_rows} rows have problems" in message

    id_column = "note_id" if table == "notes" else "user_id"
    clean, report = run(table, path, "skip", **limits)
    assert [str(i) for i in report.issues] == lines
    assert ids(clean, id_column) == kept
    assert clean.schema == (NOTES_SCHEMA if table == "notes" else BEHAVIORS_SCHEMA)
    assert report.rows_in == {table: n_rows}
    assert report.rows_kept == {table: len(kept)}
    assert set(report.counts[table]) == set(counts)


def _code(reason: str) -> str:
    """The issue code a reason belongs to (independent table of reason shapes -> codes)."""
    shapes = [
        (" is null, expected a string", "null_element"), (" is null", "null"), ("is empty or blank", "empty"),
        ("must be a", "wrong_type"), ("duplicate ", "duplicate"), ("neither title nor content", "missing"),
        ("in the future", "future"), ("not an ISO-8601", "unparsable"), ("outside years", "out_of_range"),
        ("not valid UTF-8", "invalid_utf8"), ("not valid JSON", "invalid_json"),
        ("expected a JSON object", "invalid_json"), ("hashtags (max_hashtags", "too_many"),
        (" characters (", "too_long"), ("not in the notes table", "unknown_note"),
    ]
    return next(code for shape, code in shapes if shape in reason)


# ------------------------------------------------------------------ invalid UTF-8 in Parquet


def test_invalid_utf8_in_parquet_binary_and_string_columns(tmp_path: Path) -> None:
    # A binary title column (a writer that never decoded the bytes) ...
    path = write_parquet(
        tmp_path / "notes.parquet",
        [note(0, title=b"Stout"), note(1, title=b"bad\xff title"), note(2, title=None)],
        types={"title": pa.binary()},
    )
    bad_title = f"{path} row 1 field 'title': title is not valid UTF-8 (invalid byte 0xff at byte offset 3)"
    assert f"\n  {bad_title}" in failure("notes", path)
    clean, report = run("notes", path, "skip")
    assert [str(i) for i in report.issues] == [bad_title]
    assert ids(clean, "title") == ["Stout", None]

    # ... and a string column holding invalid bytes: Arrow reads it back without checking.
    raw = pa.array([b"user-0", b"user-\xe9", b"user-2"], pa.binary())
    users = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    rows = [behavior(i) for i in range(3)]
    table = pa.table({
        "user_id": users,
        "note_id": [r["note_id"] for r in rows],
        "event_type": [r["event_type"] for r in rows],
        "ts": pa.array([r["ts"] for r in rows], TIMESTAMP),
    })
    path = tmp_path / "behaviors.parquet"
    pq.write_table(table, path)
    bad_user = f"{path} row 1 field 'user_id': user_id is not valid UTF-8 (invalid byte 0xe9 at byte offset 5)"
    assert f"\n  {bad_user}" in failure("behaviors", path)
    clean, report = run("behaviors", path, "skip")
    assert [str(i) for i in report.issues] == [bad_user]
    assert ids(clean, "user_id") == ["user-0", "user-2"]


def test_invalid_utf8_hashtag_element_in_parquet(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "notes.parquet",
        [note(0, hashtags=[b"ipa"]), note(1, hashtags=[b"ipa", b"st\xffout"])],
        types={"hashtags": pa.list_(pa.binary())},
    )
    clean, report = run("notes", path, "skip")
    assert [str(i) for i in report.issues] == [
        f"{path} row 1 field 'hashtags': hashtags[1] is not valid UTF-8 (invalid byte 0xff at byte offset 2)"
    ]
    assert clean.column("hashtags").to_pylist() == [["ipa"]]


# ------------------------------------------------------------- all issues, both tables


def test_all_issues_are_collected_and_the_message_is_capped(tmp_path: Path) -> None:
    n_bad = MAX_ISSUES_SHOWN + 5
    rows = [note(i, category=None) for i in range(n_bad)] + [note(100)]
    path = write_parquet(tmp_path / "notes.parquet", rows)
    message = failure("notes", path)
    assert f"{n_bad} of {n_bad + 1} rows have problems [category.null={n_bad}]" in message
    assert f"{path} row {MAX_ISSUES_SHOWN - 1} field 'category'" in message
    assert f"{path} row {MAX_ISSUES_SHOWN} field" not in message
    assert message.endswith("... and 5 more issues")
    clean, report = run("notes", path, "skip")
    assert len(report.issues) == n_bad
    assert ids(clean, "note_id") == ["beer-100"]


def test_one_row_with_several_problems_reports_each_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "notes.jsonl", [note(0), note(1, note_id="", category=None, hashtags="x")])
    clean, report = run("notes", path, "skip")
    assert [str(i) for i in report.issues] == [
        f"{path} line 2 field 'hashtags': hashtags must be a list of strings, got string 'x'",
        f"{path} line 2 field 'note_id': note_id is empty or blank ('')",
        f"{path} line 2 field 'category': category is null",
    ]
    assert report.rows_kept == {"notes": 1}


def test_load_and_validate_counts_behaviours_of_dropped_notes(tmp_path: Path) -> None:
    write_parquet(tmp_path / "notes.parquet", [note(0), note(1, category=None), note(2)])
    write_jsonl(tmp_path / "behaviors.jsonl", [
        behavior(0), behavior(1), behavior(2), behavior(3, note_id="beer-1"), behavior(4, note_id="beer-7"),
    ])
    cfg = DataConfig(notes=Path("notes.parquet"), behaviors=Path("behaviors.jsonl"), on_row_error="skip")
    notes, behaviors, report = load_and_validate(cfg, now=NOW, root=tmp_path)
    assert ids(notes, "note_id") == ["beer-0", "beer-2"]
    assert ids(behaviors, "user_id") == ["user-0", "user-2"]
    beh = tmp_path / "behaviors.jsonl"
    assert [str(i) for i in report.tables["behaviors"].issues] == [
        f"{beh} line 2 field 'note_id': note_id 'beer-1' refers to a note dropped by notes validation",
        f"{beh} line 4 field 'note_id': note_id 'beer-1' refers to a note dropped by notes validation",
        f"{beh} line 5 field 'note_id': note_id 'beer-7' is not in the notes table",
    ]
    assert report.counts == {
        "notes": {"category.null": 1},
        "behaviors": {"note_id.dropped_note": 2, "note_id.unknown_note": 1},
    }
    assert report.rows_in == {"notes": 3, "behaviors": 5}
    assert report.rows_kept == {"notes": 2, "behaviors": 2}
    assert json.loads(json.dumps(report.to_dict()))["tables"]["behaviors"]["rows_dropped"] == 3
    assert report.metrics()["data.behaviors.issues.note_id.dropped_note"] == 2.0
    summary = report.summary()
    assert f"notes ({tmp_path / 'notes.parquet'}): 3 rows, 1 with problems, 2 kept [category.null=1]" in summary
    assert f"{tmp_path / 'notes.parquet'} row 1 field 'category': category is null" in summary

    # fail: both tables are checked before raising, so one message lists the problems of both
    with pytest.raises(DataValidationError) as exc:
        load_and_validate(cfg.model_copy(update={"on_row_error": "fail"}), now=NOW, root=tmp_path)
    message = str(exc.value)
    assert "notes (" in message and "behaviors (" in message
    assert f"{beh} line 5 field 'note_id': note_id 'beer-7' is not in the notes table" in message
    assert len(exc.value.issues) == 4


def test_skip_mode_with_no_row_left_raises(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "notes.parquet", [note(0, category=None), note(1, category=" ")])
    with pytest.raises(DataValidationError, match=r"all 2 rows of notes have problems; nothing is left"):
        run("notes", path, "skip")


# ------------------------------------------------------------------- structural problems


def _structural_cases(tmp: Path) -> list[tuple[str, Path, str]]:
    """(table, path, exact message) for inputs no row-level policy can fix."""
    out = []
    p = write_parquet(tmp / "no_category.parquet", [{k: v for k, v in note(0).items() if k != "category"}])
    out.append(("notes", p, f"{p} field 'category': notes table has no column 'category' (required)"))
    p = write_parquet(tmp / "tag_string.parquet", [note(0, hashtags="#ipa #stout")], {"hashtags": pa.string()})
    out.append(("notes", p, f"{p} field 'hashtags': column 'hashtags' has type string; "
                            "expected list<string> (a list per row)"))
    p = write_parquet(tmp / "tag_ints.parquet", [note(0, hashtags=[1, 2])], {"hashtags": pa.list_(pa.int64())})
    out.append(("notes", p, f"{p} field 'hashtags': column 'hashtags' has type list<int64>; "
                            "expected list<string>"))
    p = write_parquet(tmp / "int_ids.parquet", [note(0, note_id=7)], {"note_id": pa.int64()})
    out.append(("notes", p, f"{p} field 'note_id': column 'note_id' has type int64; expected string"))
    p = write_parquet(tmp / "date.parquet", [note(0, created_at=dt.date(2024, 1, 1))], {"created_at": pa.date32()})
    out.append(("notes", p, f"{p} field 'created_at': column 'created_at' has type date32[day]; "
                            "expected a timestamp, ISO-8601 strings or epoch seconds"))
    p = tmp / "empty.parquet"
    pq.write_table(pa.table({k: pa.array([], t) for k, t in TYPES.items() if k in note(0)}), p)
    out.append(("notes", p, f"{p}: notes table is empty (0 rows)"))
    p = tmp / "empty.jsonl"
    p.write_bytes(b"\n\n")
    out.append(("behaviors", p, f"{p}: behaviors table is empty (0 rows)"))
    p = write_jsonl(tmp / "garbage.jsonl", [b"not json", b"[1]"])
    out.append(("notes", p, f"{p} field 'note_id': notes table has no column 'note_id' (required) "
                            "(2 of 2 lines could not be read)"))
    return out


def test_structural_problems_raise_in_both_modes(tmp_path: Path) -> None:
    for table, path, message in _structural_cases(tmp_path):
        for mode in ("fail", "skip"):
            with pytest.raises(DataValidationError) as exc:
                run(table, path, mode)
            assert str(exc.value) == message, (path.name, mode)
            assert exc.value.issues[0].fatal and exc.value.issues[0].row is None


def test_unreadable_inputs_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "notes.parquet"
    with pytest.raises(DataValidationError, match=f"^{missing}: notes input does not exist$"):
        read_table(missing, "notes")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "_SUCCESS").write_text("")
    with pytest.raises(DataValidationError, match=f"^{empty}: folder holds no Parquet files"):
        read_table(empty, "notes")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match=f"^{corrupt}: cannot read Parquet file: "):
        read_table(corrupt, "notes")
    csv = tmp_path / "notes.csv"
    csv.write_text("note_id\n1\n")
    with pytest.raises(DataValidationError, match=f"^{csv}: unsupported notes input"):
        read_table(csv, "notes")


# ------------------------------------------------------------------------ Parquet folders


def test_folder_of_parquet_files_names_the_part_file(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    part0 = write_parquet(folder / "part-0.parquet", [note(0), note(1)])
    part1 = write_parquet(folder / "part-1.parquet", [note(2, note_id="beer-1"), note(3, category=None), note(4)])
    (folder / ".part-2.parquet.x.tmp").write_bytes(b"half-written")  # a crashed writer's temp file
    clean, report = run("notes", folder, "skip")
    assert [str(i) for i in report.issues] == [
        f"{part1} row 0 field 'note_id': duplicate note_id 'beer-1' (first at row 1 of {part0})",
        f"{part1} row 1 field 'category': category is null",
    ]
    assert ids(clean, "note_id") == ["beer-0", "beer-1", "beer-4"]

    write_parquet(folder / "part-3.parquet", [note(5, note_id=5)], {"note_id": pa.int64()})
    with pytest.raises(DataValidationError, match="part-3.parquet: column 'note_id' has type int64 but .*part-0"):
        read_table(folder, "notes")


# -------------------------------------------------------------------------- timestamps


def test_timestamp_forms_parse_to_the_same_instants(tmp_path: Path) -> None:
    noon = dt.datetime(2024, 3, 1, 12, tzinfo=UTC)
    stamps = ["2024-03-01T12:00:00Z", "2024-03-01T14:00:00+02:00", "2024-03-01T12:00:00",
              "2024-03-01 12:00:00.000", int(noon.timestamp()), noon.timestamp() + 0.25]
    path = write_jsonl(tmp_path / "behaviors.jsonl", [behavior(i, ts=s) for i, s in enumerate(stamps)])
    clean, report = run("behaviors", path, "fail")
    assert report.issues == []
    assert clean.column("ts").to_pylist() == [noon] * 5 + [noon + dt.timedelta(milliseconds=250)]

    # Parquet: tz-naive nanoseconds are UTC; integer columns are epoch seconds
    path = tmp_path / "behaviors.parquet"
    rows = [behavior(i) for i in range(2)]
    pq.write_table(pa.table({
        "user_id": [r["user_id"] for r in rows], "note_id": [r["note_id"] for r in rows],
        "event_type": [r["event_type"] for r in rows],
        "ts": pa.array([noon.replace(tzinfo=None)] * 2, pa.timestamp("ns")),
    }), path)
    assert run("behaviors", path, "fail")[0].column("ts").to_pylist() == [noon, noon]
    write_parquet(path, [behavior(0, ts=int(noon.timestamp()))], {"ts": pa.int64()})
    assert run("behaviors", path, "fail")[0].column("ts").to_pylist() == [noon]


# -------------------------------------------------------------- good files and writing


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_good_files_pass_and_round_trip(tmp_path: Path, fmt: str) -> None:
    rows = good_notes() + [note(3, title=None, hashtags=None, source_url="https://beer.stackexchange.com/q/3",
                                author="Ann", author_url="https://beer.stackexchange.com/u/1")]
    path = tmp_path / f"notes.{fmt}"
    write_parquet(path, rows) if fmt == "parquet" else write_jsonl(path, rows)
    clean, report = run("notes", path, "fail")
    assert report.issues == [] and report.counts == {"notes": {}}
    assert clean.schema == NOTES_SCHEMA
    expected = [{**{f: None for f in NOTES_SCHEMA.names}, **r} for r in rows]
    assert clean.to_pylist() == expected

    out = tmp_path / "out" / "notes.parquet"
    write_table(out, clean)
    again, report = run("notes", out, "fail")
    assert report.issues == []
    assert again.equals(clean)
    assert pq.read_schema(out).remove_metadata() == NOTES_SCHEMA


def test_extra_columns_are_ignored_and_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "notes.jsonl", [{**note(0), "views": 10}, {**note(1), "views": "many"}])
    clean, report = run("notes", path, "fail")
    assert clean.num_rows == 2 and clean.schema == NOTES_SCHEMA
    assert report.tables["notes"].ignored_columns == ["views"]
    assert "ignored columns outside the contract: views" in report.summary()


def test_failing_write_leaves_the_existing_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "notes.parquet"
    good = validate_notes(pa.Table.from_pylist(good_notes()), "mem", DataConfig(), now=NOW)[0]
    write_table(target, good, "notes")
    before = target.read_bytes()

    uncastable = good.set_column(3, "hashtags", pa.array([1, 2, 3], pa.int64()))
    with pytest.raises(DataValidationError, match=f"{target}: notes column 'hashtags' of type int64 cannot be cast"):
        write_table(target, uncastable, "notes")
    null_ids = good.set_column(0, pa.field("note_id", pa.string()), pa.array(["a", None, "c"]))
    with pytest.raises(DataValidationError, match="column 'note_id' has 1 null values; it must not be null"):
        write_table(target, null_ids)
    with pytest.raises(DataValidationError, match=r"columns \['views'\] are not part of the notes contract"):
        write_table(target, good.append_column("views", pa.array([1, 2, 3])), "notes")

    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.parquet"]  # no temp file left
    assert pq.read_table(target).equals(good)


def test_committed_default_dataset_is_clean() -> None:
    cfg = DataConfig()  # the committed data/stackexchange files: always present in a checkout
    notes, behaviors, report = load_and_validate(cfg)
    assert report.issues == []
    assert notes.num_rows == report.rows_in["notes"] > 0
    assert behaviors.num_rows == report.rows_in["behaviors"] > 0
