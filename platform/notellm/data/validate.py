"""Validate raw ``notes`` / ``behaviors`` tables against the data contract (``schema.py``).

Two kinds of problems:

- *Structural* (missing required column, a column type no row could fix such as a string
  ``hashtags`` column in Parquet, an unreadable file, an empty table): ``DataValidationError`` is
  raised at once, naming file, field and reason.
- *Row-level*: every check runs over every row (vectorised with ``pyarrow.compute``) and all
  problems are collected, at most one per (row, field). With ``on_row_error="fail"`` a
  ``DataValidationError`` lists the first ``MAX_ISSUES_SHOWN`` issues and the counts per reason;
  with ``"skip"`` the bad rows are dropped and the counts are logged and returned in a
  ``ValidationReport``.

Issue messages read ``<file> row <i> field '<field>': <reason>``; ``row`` is the 0-based row
index within the (part) file, JSONL issues show ``line <n>`` (1-based, as in an editor) instead.
Example: ``data/notes.parquet row 17 field 'note_id': duplicate note_id 'beer-42' (first at row 3)``.

Timestamps: Arrow timestamps of any unit (tz-naive ones are taken as UTC), ISO-8601 strings as
read by ``datetime.fromisoformat`` (no offset means UTC) or epoch seconds (int or float); values
outside years 1-9999 are rejected, as are values later than validation time + ``FUTURE_TOLERANCE``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from notellm.config import REPO_ROOT, DataConfig
from notellm.data.io import (
    HIDDEN_COLUMNS,
    LINE,
    MIXED_JSON,
    READ_ERROR,
    READ_ERROR_FIELD,
    DataValidationError,
    TableName,
    json_kind,
    read_table,
    sources_of,
    utf8_error,
)
from notellm.data.schema import BEHAVIORS_SCHEMA, NOTES_SCHEMA, REQUIRED, TIMESTAMP

__all__ = [
    "DataValidationError",
    "TableReport",
    "ValidationIssue",
    "ValidationReport",
    "load_and_validate",
    "validate_behaviors",
    "validate_notes",
]

log = logging.getLogger(__name__)

FUTURE_TOLERANCE = dt.timedelta(hours=1)  # clock skew allowed for "not in the future"
MAX_ISSUES_SHOWN = 20  # issues listed in an error message / summary
MAX_VALUE_CHARS = 40  # a value quoted in a message is cut to this many characters

_UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_US = dt.timedelta(microseconds=1)
_MIN_EPOCH_S = (dt.datetime(1, 1, 1, tzinfo=_UTC) - _EPOCH).total_seconds()
_MAX_EPOCH_S = (dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=_UTC) - _EPOCH).total_seconds()
_TAG_LIST = pa.list_(pa.string())


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ValidationIssue:
    """One problem found in an input table.

    ``row`` is the 0-based row index in ``file`` (None: the whole table), ``line`` the 1-based
    JSONL line, ``field`` the column (None: the whole row). ``fatal`` issues cannot be fixed by
    dropping rows. ``code`` is the short reason kind used for counts (``duplicate``, ``null``...).
    """

    file: str
    row: int | None
    field: str | None
    reason: str
    fatal: bool = False
    code: str = "invalid"
    line: int | None = None

    @property
    def key(self) -> str:
        """The counting key: ``"<field>.<code>"`` (``"<code>"`` for whole-row issues)."""
        return f"{self.field}.{self.code}" if self.field else self.code

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f" line {self.line}"
        elif self.row is not None:
            where += f" row {self.row}"
        if self.field is not None:
            where += f" field '{self.field}'"
        return f"{where}: {self.reason}"


@dataclass
class TableReport:
    """What validation found in one table: row counts, issues, ignored extra columns."""

    table: str
    file: str
    rows_in: int
    rows_kept: int
    issues: list[ValidationIssue] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def rows_dropped(self) -> int:
        return self.rows_in - self.rows_kept

    @property
    def counts(self) -> dict[str, int]:
        """Issues per reason key, most frequent first."""
        return dict(Counter(i.key for i in self.issues).most_common())


@dataclass
class ValidationReport:
    """The validation outcome of one or both tables."""

    on_row_error: str
    tables: dict[str, TableReport] = field(default_factory=dict)

    @property
    def issues(self) -> list[ValidationIssue]:
        return [i for t in self.tables.values() for i in t.issues]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """``{table: {reason key: count}}``."""
        return {name: t.counts for name, t in self.tables.items()}

    @property
    def rows_in(self) -> dict[str, int]:
        return {name: t.rows_in for name, t in self.tables.items()}

    @property
    def rows_kept(self) -> dict[str, int]:
        return {name: t.rows_kept for name, t in self.tables.items()}

    def summary(self, max_issues: int = MAX_ISSUES_SHOWN) -> str:
        """A few lines of text: per table rows in/kept and counts per reason, then the first issues."""
        lines = [f"data validation (on_row_error={self.on_row_error}):"]
        for name, t in self.tables.items():
            counts = ", ".join(f"{k}={v}" for k, v in t.counts.items()) or "no problems"
            lines.append(
                f"  {name} ({t.file}): {t.rows_in} rows, {t.rows_dropped} with problems, "
                f"{t.rows_kept} kept [{counts}]"
            )
            if t.ignored_columns:
                lines.append(f"    ignored columns outside the contract: {', '.join(t.ignored_columns)}")
        issues = self.issues
        if issues:
            lines.append(f"  first {min(max_issues, len(issues))} of {len(issues)} issues:")
            lines += [f"    {i}" for i in issues[:max_issues]]
        return "\n".join(lines)

    def to_dict(self, max_issues: int = 100) -> dict[str, Any]:
        """A JSON-able dict (for ``mlflow.log_dict``): per-table counts and the first issues."""
        return {
            "on_row_error": self.on_row_error,
            "tables": {
                name: {
                    "file": t.file,
                    "rows_in": t.rows_in,
                    "rows_kept": t.rows_kept,
                    "rows_dropped": t.rows_dropped,
                    "counts": t.counts,
                    "ignored_columns": list(t.ignored_columns),
                }
                for name, t in self.tables.items()
            },
            "num_issues": len(self.issues),
            "issues": [str(i) for i in self.issues[:max_issues]],
        }

    def metrics(self) -> dict[str, float]:
        """Flat numbers for ``mlflow.log_metrics``: ``data.<table>.rows_in``, ``...issues.<key>``."""
        out: dict[str, float] = {}
        for name, t in self.tables.items():
            out[f"data.{name}.rows_in"] = float(t.rows_in)
            out[f"data.{name}.rows_kept"] = float(t.rows_kept)
            for key, n in t.counts.items():
                out[f"data.{name}.issues.{key}"] = float(n)
        return out


# ---------------------------------------------------------------------------- public API


def validate_notes(
    data: pa.Table, file: str | Path, cfg: DataConfig, now: dt.datetime | None = None
) -> tuple[pa.Table, ValidationReport]:
    """Validate a raw notes table (as from ``read_table``) under ``cfg``'s limits and policy.

    Returns ``(clean, report)``: ``clean`` is cast to ``NOTES_SCHEMA`` and holds the good rows
    in input order. ``file`` names the input in messages when ``data`` does not record its
    source files. Raises ``DataValidationError`` on structural problems, on any row-level
    problem when ``cfg.on_row_error == "fail"``, and when no row is left.
    """
    checked = _check_notes(data, file, cfg, _now(now))
    report = ValidationReport(cfg.on_row_error, {"notes": checked.report})
    _enforce(report)
    return checked.clean, report


def validate_behaviors(
    data: pa.Table,
    file: str | Path,
    known_note_ids: pa.Array | pa.ChunkedArray | Iterable[str],
    cfg: DataConfig,
    now: dt.datetime | None = None,
    dropped_note_ids: pa.Array | pa.ChunkedArray | Iterable[str] | None = None,
) -> tuple[pa.Table, ValidationReport]:
    """Validate a raw behaviours table; every ``note_id`` must be in ``known_note_ids``.

    ``dropped_note_ids`` (ids whose notes validation dropped) are reported as such rather than
    as unknown. Returns ``(clean, report)`` with ``clean`` cast to ``BEHAVIORS_SCHEMA``; raises
    like ``validate_notes``.
    """
    checked = _check_behaviors(data, file, known_note_ids, dropped_note_ids, cfg, _now(now))
    report = ValidationReport(cfg.on_row_error, {"behaviors": checked.report})
    _enforce(report)
    return checked.clean, report


def load_and_validate(
    cfg: DataConfig, now: dt.datetime | None = None, root: str | Path | None = None
) -> tuple[pa.Table, pa.Table, ValidationReport]:
    """Read ``cfg.notes`` and ``cfg.behaviors`` and validate both (behaviours against the kept notes).

    Relative paths are taken from ``root`` (default: the repository root, as in
    ``PipelineConfig.resolve_path``). Returns ``(notes, behaviors, report)``, cast to the
    contract schemas. With ``on_row_error="fail"`` both tables are checked before raising, so the
    error lists the problems of both; behaviours whose note was dropped are counted as
    ``note_id.dropped_note``.
    """
    base = Path(root) if root is not None else REPO_ROOT
    notes_path = cfg.notes if cfg.notes.is_absolute() else base / cfg.notes
    behaviors_path = cfg.behaviors if cfg.behaviors.is_absolute() else base / cfg.behaviors
    when = _now(now)
    notes = _check_notes(read_table(notes_path, "notes"), notes_path, cfg, when)
    kept_ids = notes.clean.column("note_id")
    all_ids = notes.ids.drop_null()
    dropped = pc.unique(all_ids.filter(pc.invert(pc.is_in(all_ids, value_set=kept_ids.combine_chunks()))))
    behaviors = _check_behaviors(
        read_table(behaviors_path, "behaviors"), behaviors_path, kept_ids, dropped, cfg, when
    )
    report = ValidationReport(cfg.on_row_error, {"notes": notes.report, "behaviors": behaviors.report})
    _enforce(report)
    return notes.clean, behaviors.clean, report


# ------------------------------------------------------------------------ table checks


@dataclass
class _Checked:
    clean: pa.Table
    report: TableReport
    ids: pa.Array  # the note_id column after type checks (null where unusable)


def _check_notes(data: pa.Table, file: str | Path, cfg: DataConfig, now: dt.datetime) -> _Checked:
    checks = _start("notes", data, file)
    cols = _normalise(data, NOTES_SCHEMA, checks)
    _check_id(cols["note_id"], "note_id", cfg.max_id_chars, checks)
    _check_duplicates(cols["note_id"], "note_id", checks)
    _check_length(cols["title"], "title", cfg.max_title_chars, "max_title_chars", checks)
    _check_length(cols["content"], "content", cfg.max_content_chars, "max_content_chars", checks)
    no_text = _blank(cols["title"]) & _blank(cols["content"]) & ~checks.bad("title") & ~checks.bad("content")
    checks.add(no_text, "title/content", "missing", lambda i: "note has neither title nor content (both null or blank)")
    _check_hashtags(cols["hashtags"], cfg, checks)
    _check_nonempty(cols["category"], "category", checks)
    _check_timestamp(cols["created_at"], "created_at", now, checks)
    return _finish(checks, cols, NOTES_SCHEMA, cols["note_id"])


def _check_behaviors(
    data: pa.Table,
    file: str | Path,
    known_note_ids: Any,
    dropped_note_ids: Any,
    cfg: DataConfig,
    now: dt.datetime,
) -> _Checked:
    checks = _start("behaviors", data, file)
    cols = _normalise(data, BEHAVIORS_SCHEMA, checks)
    _check_id(cols["user_id"], "user_id", cfg.max_id_chars, checks)
    note_id = cols["note_id"]
    _check_id(note_id, "note_id", cfg.max_id_chars, checks)
    if dropped_note_ids is not None:
        dropped = _np(pc.is_in(note_id, value_set=_string_array(dropped_note_ids)))
        checks.add(dropped, "note_id", "dropped_note",
                   lambda i: f"note_id {_short(note_id[i].as_py())} refers to a note dropped by notes validation")
    unknown = ~_np(pc.is_in(note_id, value_set=_string_array(known_note_ids)))
    checks.add(unknown, "note_id", "unknown_note",
               lambda i: f"note_id {_short(note_id[i].as_py())} is not in the notes table")
    _check_nonempty(cols["event_type"], "event_type", checks)
    _check_timestamp(cols["ts"], "ts", now, checks)
    return _finish(checks, cols, BEHAVIORS_SCHEMA, note_id)


def _start(table: TableName, data: pa.Table, file: str | Path) -> _Checks:
    """Structural checks (non-empty, required columns) and the issue collector for ``data``."""
    file = str(file)
    if data.num_rows == 0:
        _structural(file, None, f"{table} table is empty (0 rows)")
    checks = _Checks(table, data, file)
    missing = [c for c in REQUIRED[table] if c not in data.column_names]
    if missing:
        unreadable = int(checks.read_errors.sum())
        hint = f" ({unreadable} of {data.num_rows} lines could not be read)" if unreadable else ""
        _structural(file, missing[0], f"{table} table has no column '{missing[0]}' (required){hint}")
    return checks


def _finish(checks: _Checks, cols: dict[str, pa.Array], schema: pa.Schema, ids: pa.Array) -> _Checked:
    keep = np.flatnonzero(~checks.bad_rows)
    arrays = [cols[f.name] for f in schema]
    if len(keep) < checks.n:
        indices = pa.array(keep, pa.int64())
        arrays = [a.take(indices) for a in arrays]
    clean = pa.Table.from_arrays(arrays, schema=schema)
    report = TableReport(
        table=checks.table,
        file=checks.file,
        rows_in=checks.n,
        rows_kept=len(keep),
        issues=checks.issues(),
        ignored_columns=[c for c in checks.columns if c not in schema.names and c not in HIDDEN_COLUMNS],
    )
    return _Checked(clean, report, ids)


def _enforce(report: ValidationReport) -> None:
    """Apply the row-error policy: raise on any issue ("fail") or log the summary ("skip")."""
    bad_tables = [t for t in report.tables.values() if t.issues]
    if bad_tables and report.on_row_error == "fail":
        lines = ["data validation failed (on_row_error=fail; set data.on_row_error=skip to drop bad rows):"]
        for t in bad_tables:
            counts = ", ".join(f"{k}={v}" for k, v in t.counts.items())
            lines.append(f"  {t.table} ({t.file}): {t.rows_dropped} of {t.rows_in} rows have problems [{counts}]")
        issues = report.issues
        lines += [f"  {i}" for i in issues[:MAX_ISSUES_SHOWN]]
        if len(issues) > MAX_ISSUES_SHOWN:
            lines.append(f"  ... and {len(issues) - MAX_ISSUES_SHOWN} more issues")
        raise DataValidationError("\n".join(lines), issues)
    for t in report.tables.values():
        if t.rows_kept == 0:
            raise DataValidationError(
                f"{t.file}: all {t.rows_in} rows of {t.table} have problems; nothing is left\n{report.summary()}",
                report.issues,
            )
    if bad_tables:
        log.warning("%s", report.summary())
    else:
        log.info("%s", report.summary())


# ------------------------------------------------------------------ the issue collector


class _Checks:
    """Collects row-level issues of one table, at most one per (row, field).

    Rows whose JSONL line could not be read get only that issue. Checks pass a boolean row
    mask and a function building the reason of one flagged row (called for flagged rows only).
    """

    def __init__(self, table: TableName, data: pa.Table, file: str) -> None:
        self.table = table
        self.file = file
        self.n = data.num_rows
        self.columns = list(data.column_names)
        sources = sources_of(data)
        if not sources or sum(n for _, n in sources) != self.n:
            sources = [(file, self.n)]
        self._files = [f for f, _ in sources]
        self._starts = np.cumsum([0] + [n for _, n in sources])[:-1]
        self._lines = data.column(LINE).to_numpy() if LINE in data.column_names else None
        self.bad_rows = np.zeros(self.n, dtype=bool)
        self._bad_fields: dict[str, np.ndarray] = {}
        self._found: list[tuple[np.ndarray, str | None, str, list[str]]] = []
        self.read_errors = np.zeros(self.n, dtype=bool)
        if READ_ERROR in data.column_names:
            self._add_read_errors(data)

    def _add_read_errors(self, data: pa.Table) -> None:
        reasons = data.column(READ_ERROR)
        fields = data.column(READ_ERROR_FIELD).to_pylist()
        rows = np.flatnonzero(_np(reasons.is_valid()))
        for row in rows:
            reason = reasons[int(row)].as_py()
            code = "invalid_utf8" if "UTF-8" in reason else "invalid_json"
            mask = np.zeros(self.n, dtype=bool)
            mask[row] = True
            self.add(mask, fields[row], code, lambda i, r=reason: r)
        self.read_errors = self.bad_rows.copy()

    def bad(self, field: str) -> np.ndarray:
        """Rows that already have an issue in ``field``."""
        found = self._bad_fields.get(field)
        return found if found is not None else np.zeros(self.n, dtype=bool)

    def add(self, mask: np.ndarray, field: str | None, code: str, reason: Callable[[int], str]) -> None:
        mask = mask & ~self.read_errors & ~self.bad(field or "")
        rows = np.flatnonzero(mask)
        if not len(rows):
            return
        self._found.append((rows, field, code, [reason(int(r)) for r in rows]))
        self._bad_fields[field or ""] = self.bad(field or "") | mask
        self.bad_rows |= mask

    def add_rows(self, reasons: dict[int, str], field: str, code: str) -> None:
        """Like ``add`` for issues found row by row: ``{row: reason}``."""
        if reasons:
            mask = np.zeros(self.n, dtype=bool)
            mask[list(reasons)] = True
            self.add(mask, field, code, reasons.__getitem__)

    def where(self, row: int, near: int | None = None) -> str:
        """``"row 3"`` / ``"line 4"`` for ``row``, plus ``" of <file>"`` if not in ``near``'s file."""
        part, local = self._locate(row)
        text = f"line {int(self._lines[row])}" if self._lines is not None else f"row {local}"
        if near is not None and self._locate(near)[0] != part:
            text += f" of {self._files[part]}"
        return text

    def _locate(self, row: int) -> tuple[int, int]:
        part = int(np.searchsorted(self._starts, row, side="right")) - 1
        return part, row - int(self._starts[part])

    def issues(self) -> list[ValidationIssue]:
        """All issues, by row and then in the order the checks ran."""
        order = []
        for k, (rows, column, code, reasons) in enumerate(self._found):
            for row, reason in zip(rows.tolist(), reasons):
                order.append((row, k, column, code, reason))
        order.sort(key=lambda x: (x[0], x[1]))
        out = []
        for row, _, column, code, reason in order:
            part, local = self._locate(row)
            line = int(self._lines[row]) if self._lines is not None else None
            out.append(ValidationIssue(self._files[part], local, column, reason, False, code, line))
        return out


# ---------------------------------------------------------------- column normalisation


def _normalise(data: pa.Table, schema: pa.Schema, checks: _Checks) -> dict[str, pa.Array]:
    """Each contract column as one Arrow array of the contract type; wrong values become null
    and are reported (wrong JSON kind, invalid UTF-8, unparsable timestamp); absent optional
    columns are all null. Raises ``DataValidationError`` for column types no row can fix."""
    cols: dict[str, pa.Array] = {}
    for target in schema:
        if target.name not in data.column_names:
            cols[target.name] = pa.nulls(data.num_rows, target.type)
            continue
        source = data.schema.field(target.name)
        column = data.column(target.name).combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        mixed = bool(source.metadata and source.metadata.get(MIXED_JSON))
        if target.type == TIMESTAMP:
            cols[target.name] = _timestamp_column(column, target.name, mixed, checks)
        elif target.type == _TAG_LIST:
            cols[target.name] = _list_column(column, target.name, mixed, checks)
        else:
            cols[target.name] = _string_column(column, target.name, mixed, checks)
    return cols


def _string_column(column: pa.Array, name: str, mixed: bool, checks: _Checks) -> pa.Array:
    if mixed:
        out, bad = [], {}
        for i, value in enumerate(_json_values(column)):
            if value is None or isinstance(value, str):
                out.append(value)
            else:
                bad[i] = f"{name} must be a string, got {json_kind(value)} {_short(value)}"
                out.append(None)
        checks.add_rows(bad, name, "wrong_type")
        return pa.array(out, pa.string())
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    if not _is_text(column.type):
        _structural(checks.file, name, f"column '{name}' has type {column.type}; expected string")
    checked, bad = _utf8_checked(column)
    checks.add_rows({i: f"{name} is not valid UTF-8 ({err})" for i, err in bad.items()}, name, "invalid_utf8")
    return checked


def _list_column(column: pa.Array, name: str, mixed: bool, checks: _Checks) -> pa.Array:
    if mixed:
        out, bad = [], {}
        for i, value in enumerate(_json_values(column)):
            if value is not None and not isinstance(value, list):
                bad[i] = f"{name} must be a list of strings, got {json_kind(value)} {_short(value)}"
            elif value is not None:
                j = next((j for j, x in enumerate(value) if not isinstance(x, str)), None)
                if j is not None:
                    bad[i] = f"{name}[{j}] must be a string, got {json_kind(value[j])} {_short(value[j])}"
            out.append(None if i in bad else value)
        checks.add_rows(bad, name, "wrong_type")
        return pa.array(out, _TAG_LIST)
    kind = column.type
    if pa.types.is_null(kind):
        return pa.nulls(len(column), _TAG_LIST)
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        _structural(checks.file, name, f"column '{name}' has type {kind}; expected list<string> (a list per row)")
    values = pc.list_flatten(column)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not (_is_text(values.type) or pa.types.is_null(values.type)):
        outer = "large_list" if pa.types.is_large_list(kind) else "list"
        _structural(checks.file, name, f"column '{name}' has type {outer}<{values.type}>; expected list<string>")
    parents, positions = _list_positions(column)
    null_elements = _np(values.is_null())
    bad = {}
    for e in np.flatnonzero(null_elements)[::-1]:  # reversed: the first bad element wins
        bad[int(parents[e])] = f"{name}[{positions[e]}] is null, expected a string"
    checks.add_rows(bad, name, "null_element")
    if pa.types.is_null(values.type):
        values = pa.nulls(len(values), pa.string())
    values, bad_utf8 = _utf8_checked(values)
    bad = {}
    for e in sorted(bad_utf8, reverse=True):
        bad[int(parents[e])] = f"{name}[{positions[e]}] is not valid UTF-8 ({bad_utf8[e]})"
    checks.add_rows(bad, name, "invalid_utf8")
    lengths = _np_int(pc.list_value_length(column))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=column.is_null())


def _timestamp_column(column: pa.Array, name: str, mixed: bool, checks: _Checks) -> pa.Array:
    kind = column.type
    if mixed or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = _json_values(column) if mixed else column.to_pylist()
        micros: list[int | None] = []
        bad: dict[str, dict[int, str]] = {}
        for i, value in enumerate(values):
            us, code, reason = _parse_timestamp(value, name)
            micros.append(us)
            if code:
                bad.setdefault(code, {})[i] = reason
        for code, reasons in bad.items():
            checks.add_rows(reasons, name, code)
        return pa.array(micros, pa.int64()).cast(TIMESTAMP)
    if pa.types.is_null(kind):
        return pa.nulls(len(column), TIMESTAMP)
    if pa.types.is_timestamp(kind):
        try:
            return column.cast(pa.timestamp("us", kind.tz), safe=kind.unit != "ns").cast(TIMESTAMP)
        except pa.ArrowInvalid as exc:
            _structural(checks.file, name, f"column '{name}' ({kind}) does not fit microseconds: {exc}")
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        seconds = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        present = _np(column.is_valid())
        finite = np.isfinite(seconds)
        checks.add(present & ~finite, name, "unparsable",
                   lambda i: f"{name} {seconds[i]} is not a finite number of epoch seconds")
        in_range = finite & (seconds >= _MIN_EPOCH_S) & (seconds <= _MAX_EPOCH_S)
        checks.add(present & finite & ~in_range, name, "out_of_range",
                   lambda i: f"{name} {column[i].as_py()} epoch seconds is outside years 1-9999")
        if pa.types.is_integer(kind):  # exact: no float rounding for whole seconds
            ints = np.asarray(pc.fill_null(column, 0).to_numpy(zero_copy_only=False))
            us = np.where(in_range, ints, 0).astype(np.int64) * 1_000_000
        else:
            us = np.round(np.where(in_range, seconds, 0.0) * 1_000_000).astype(np.int64)
        return pa.array(us, pa.int64(), mask=~(present & in_range)).cast(TIMESTAMP)
    _structural(checks.file, name, f"column '{name}' has type {kind}; expected a timestamp, "
                "ISO-8601 strings or epoch seconds")


def _parse_timestamp(value: Any, name: str) -> tuple[int | None, str | None, str]:
    """(microseconds since epoch, issue code, reason) for one JSON/Python value."""
    if value is None:
        return None, None, ""
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return None, "unparsable", f"{name} {_short(value)} is not an ISO-8601 timestamp"
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_UTC)
        return (parsed - _EPOCH) // _ONE_US, None, ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not np.isfinite(value):
            return None, "unparsable", f"{name} {value} is not a finite number of epoch seconds"
        if not _MIN_EPOCH_S <= value <= _MAX_EPOCH_S:
            return None, "out_of_range", f"{name} {value} epoch seconds is outside years 1-9999"
        micros = value * 1_000_000 if isinstance(value, int) else round(value * 1_000_000)
        return micros, None, ""
    return None, "wrong_type", (
        f"{name} must be an ISO-8601 string or epoch seconds, got {json_kind(value)} {_short(value)}"
    )


# -------------------------------------------------------------------- row-level checks


def _check_id(ids: pa.Array, name: str, max_chars: int, checks: _Checks) -> None:
    _check_nonempty(ids, name, checks)
    lengths = _np_int(pc.utf8_length(ids))
    checks.add(lengths > max_chars, name, "too_long",
               lambda i: f"{name} has {lengths[i]} characters (max_id_chars={max_chars}): {_short(ids[i].as_py())}")


def _check_nonempty(values: pa.Array, name: str, checks: _Checks) -> None:
    checks.add(_np(values.is_null()), name, "null", lambda i: f"{name} is null")
    blank = _np(pc.equal(pc.utf8_trim_whitespace(values), ""))
    checks.add(blank, name, "empty", lambda i: f"{name} is empty or blank ({values[i].as_py()!r})")


def _check_duplicates(ids: pa.Array, name: str, checks: _Checks) -> None:
    usable = np.flatnonzero(~checks.bad(name) & _np(ids.is_valid()))
    codes = _np_int(ids.dictionary_encode().indices)[usable]
    first_index = np.zeros(codes.max() + 1 if len(codes) else 0, dtype=np.int64)
    unique_codes, first_pos = np.unique(codes, return_index=True)
    first_index[unique_codes] = usable[first_pos]
    first = np.full(checks.n, -1, dtype=np.int64)
    first[usable] = first_index[codes]
    duplicate = (first >= 0) & (first != np.arange(checks.n))
    checks.add(duplicate, name, "duplicate",
               lambda i: f"duplicate {name} {_short(ids[i].as_py())} (first at {checks.where(int(first[i]), i)})")


def _check_length(values: pa.Array, name: str, limit: int, setting: str, checks: _Checks) -> None:
    lengths = _np_int(pc.utf8_length(values))
    checks.add(lengths > limit, name, "too_long", lambda i: f"{name} has {lengths[i]} characters ({setting}={limit})")


def _check_hashtags(tags: pa.Array, cfg: DataConfig, checks: _Checks) -> None:
    counts = _np_int(pc.list_value_length(tags))
    checks.add(counts > cfg.max_hashtags, "hashtags", "too_many",
               lambda i: f"{counts[i]} hashtags (max_hashtags={cfg.max_hashtags})")
    parents, positions = _list_positions(tags)
    lengths = _np_int(pc.utf8_length(pc.list_flatten(tags)))
    reasons = {}
    for e in np.flatnonzero(lengths > cfg.max_hashtag_chars)[::-1]:  # reversed: first element wins
        reasons[int(parents[e])] = (
            f"hashtags[{positions[e]}] has {lengths[e]} characters (max_hashtag_chars={cfg.max_hashtag_chars})"
        )
    checks.add_rows(reasons, "hashtags", "too_long")


def _check_timestamp(ts: pa.Array, name: str, now: dt.datetime, checks: _Checks) -> None:
    checks.add(_np(ts.is_null()), name, "null", lambda i: f"{name} is null")
    limit = now + FUTURE_TOLERANCE
    micros = _np_int(ts.cast(pa.int64()))
    limit_us = (limit - _EPOCH) // _ONE_US
    checks.add(_np(ts.is_valid()) & (micros > limit_us), name, "future",
               lambda i: f"{name} {_format_us(int(micros[i]))} is in the future "
                         f"(validated at {_format_us((now - _EPOCH) // _ONE_US)}, tolerance {FUTURE_TOLERANCE})")


# ------------------------------------------------------------------------------ helpers


def _structural(file: str, name: str | None, reason: str) -> NoReturn:
    """Raise ``DataValidationError`` for a problem of the whole table (no row can fix it)."""
    issue = ValidationIssue(file, None, name, reason, fatal=True, code="structure")
    raise DataValidationError(str(issue), [issue])


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(_UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=_UTC)


def _np(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy, null as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _np_int(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer Arrow array as int64 numpy, null as 0."""
    return np.asarray(pc.fill_null(values, 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _blank(values: pa.Array) -> np.ndarray:
    return _np(values.is_null()) | _np(pc.equal(pc.utf8_trim_whitespace(values), ""))


def _is_text(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
        or pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
    )


def _utf8_checked(column: pa.Array) -> tuple[pa.Array, dict[int, str]]:
    """(``column`` as a string array, ``{index: utf-8 error}``); invalid values become null.

    Arrow does not check UTF-8 when it reads Parquet string columns, so string columns are
    checked like binary ones: the cast binary -> string validates every value at C++ speed, and
    only when it fails is the column walked in Python to name the bad rows.
    """
    kind = column.type
    if pa.types.is_large_string(kind):
        raw = column.cast(pa.large_binary())
    elif pa.types.is_string(kind) or pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):
        raw = column.cast(pa.binary())
    else:
        raw = column
    try:
        return raw.cast(pa.string()), {}
    except pa.ArrowInvalid:
        pass
    out, bad = [], {}
    for i, value in enumerate(raw.to_pylist()):
        err = None if value is None else utf8_error(value)
        if err:
            bad[i] = err
        out.append(None if value is None or err else value.decode("utf-8"))
    return pa.array(out, pa.string()), bad


def _list_positions(lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """For each element of ``pc.list_flatten(lists)``: its row and its index within the row's list."""
    parents = _np_int(pc.list_parent_indices(lists))
    lengths = _np_int(pc.list_value_length(lists))
    starts = np.cumsum(lengths) - lengths
    return parents, np.arange(len(parents)) - starts[parents]


def _json_values(column: pa.Array) -> list[Any]:
    return [None if text is None else json.loads(text) for text in column.to_pylist()]


def _string_array(ids: Any) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not isinstance(ids, pa.Array):
        ids = pa.array(list(ids), pa.string())
    return ids.cast(pa.string())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _format_us(micros: int) -> str:
    try:
        return (_EPOCH + dt.timedelta(microseconds=micros)).isoformat().replace("+00:00", "Z")
    except OverflowError:
        return f"{micros} microseconds since 1970"
