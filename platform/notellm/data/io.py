"""Read and write the ``notes`` / ``behaviors`` tables of the data contract.

``read_table`` is a *raw* reader: it keeps what the file holds so that the validator
(``notellm.data.validate``) can name every wrong type, bad value and bad row. It accepts

- a Parquet file (``.parquet`` / ``.pq``): columns come back with the types in the file;
- a folder of Parquet files (``*.parquet``, hidden ``.``/``_`` files ignored): the parts must
  share one schema and are concatenated in name order;
- a JSONL file (``.jsonl`` / ``.json``, one JSON object per line, blank lines ignored).

JSONL has no column types, so the reader types a contract column only when every value already
has the contract's kind (strings for string fields, lists of strings for ``hashtags``, strings or
numbers for timestamps: ISO-8601 or epoch seconds). Otherwise the column is kept as the JSON text
of each value (field metadata ``MIXED_JSON``) and the validator reports each wrong value by row.
Columns outside the contract are kept the same way. A line that is not valid JSON, not an object
or not valid UTF-8 becomes a row whose ``READ_ERROR`` column says why (with ``READ_ERROR_FIELD``
naming the field for UTF-8 errors inside a string value); ``LINE`` holds each row's line number.

Every table carries schema metadata ``SOURCES``: the JSON list ``[[file, rows], ...]`` of the
file(s) its rows came from, in order, so messages can name the part file and the row in it.

``write_table`` casts to the contract schema and writes one Parquet file atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from notellm.data.schema import TABLES, TIMESTAMP
from notellm.io_utils import atomic_write_parquet

TableName = Literal["notes", "behaviors"]

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json")

# Hidden columns added by the JSONL reader (never part of the contract).
LINE = "__line"
READ_ERROR = "__read_error"
READ_ERROR_FIELD = "__read_error_field"
HIDDEN_COLUMNS = (LINE, READ_ERROR, READ_ERROR_FIELD)

# Schema / field metadata keys.
SOURCES = b"notellm.sources"
MIXED_JSON = b"notellm.mixed_json"


class DataValidationError(ValueError):
    """An input table breaks the data contract; the message names file, row, field and reason.

    ``issues`` holds the ``ValidationIssue`` objects behind the message (empty when the problem
    is a file that cannot be read at all).
    """

    def __init__(self, message: str, issues: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.issues = list(issues)


def read_table(path: str | Path, table: TableName) -> pa.Table:
    """Read the raw ``table`` ("notes" or "behaviors") from a Parquet file, folder or JSONL file.

    Returns the table as stored (no casting), with ``SOURCES`` schema metadata. Raises
    ``DataValidationError`` naming the path when it is missing, an empty folder, of an unknown
    kind or unreadable.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(TABLES)}")
    path = Path(path)
    if path.is_dir():
        return _read_parquet_folder(path)
    if not path.exists():
        raise DataValidationError(f"{path}: {table} input does not exist")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _with_sources(_read_parquet_file(path), [(str(path), None)])
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, table)
    raise DataValidationError(
        f"{path}: unsupported {table} input; expected a Parquet file ({', '.join(PARQUET_SUFFIXES)}), "
        f"a folder of Parquet files or a JSONL file ({', '.join(JSONL_SUFFIXES)})"
    )


def write_table(path: str | Path, data: pa.Table, table: TableName | None = None) -> None:
    """Cast ``data`` to the contract schema of ``table`` and write it to ``path`` atomically.

    ``table`` is inferred from the columns when omitted. Optional contract columns that are
    absent are written as nulls; columns outside the contract are an error. A failed cast or
    write raises ``DataValidationError`` and leaves any existing file at ``path`` untouched.
    """
    path = Path(path)
    name = table or _infer_table(data, path)
    atomic_write_parquet(path, to_contract(data, name, path))


def to_contract(data: pa.Table, table: TableName, path: str | Path = "<table>") -> pa.Table:
    """``data`` cast to the contract schema of ``table`` (column order and types of the schema).

    Raises ``DataValidationError`` naming ``path`` and the column when a column is missing,
    unknown, not castable, or null where the contract forbids nulls.
    """
    schema = TABLES[table]
    extra = [c for c in data.column_names if c not in schema.names]
    if extra:
        raise DataValidationError(f"{path}: columns {extra} are not part of the {table} contract")
    columns = []
    for field in schema:
        if field.name in data.column_names:
            column = data.column(field.name)
        elif field.nullable:
            column = pa.nulls(data.num_rows, field.type)
        else:
            raise DataValidationError(f"{path}: {table} column '{field.name}' is missing")
        if not field.nullable and column.null_count:
            raise DataValidationError(
                f"{path}: {table} column '{field.name}' has {column.null_count} null values; it must not be null"
            )
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataValidationError(
                f"{path}: {table} column '{field.name}' of type {column.type} cannot be cast to {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=schema)


def sources_of(data: pa.Table) -> list[tuple[str, int]] | None:
    """The ``[(file, rows), ...]`` recorded by ``read_table``, or None for other tables."""
    meta = data.schema.metadata or {}
    if SOURCES not in meta:
        return None
    return [(str(f), int(n)) for f, n in json.loads(meta[SOURCES])]


# ---------------------------------------------------------------------------------- Parquet


def _read_parquet_file(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(f"{path}: cannot read Parquet file: {exc}") from exc


def _read_parquet_folder(folder: Path) -> pa.Table:
    parts = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES and not p.name.startswith((".", "_"))
    )
    if not parts:
        raise DataValidationError(f"{folder}: folder holds no Parquet files (*.parquet)")
    tables = [_read_parquet_file(p) for p in parts]
    first = tables[0].schema.remove_metadata()
    for part, t in zip(parts[1:], tables[1:]):
        other = t.schema.remove_metadata()
        if other.names != first.names:
            raise DataValidationError(
                f"{part}: columns {other.names} differ from {parts[0]}'s {first.names}; "
                "all Parquet files of a folder must share one schema"
            )
        for a, b in zip(first, other):
            if a.type != b.type:
                raise DataValidationError(
                    f"{part}: column '{b.name}' has type {b.type} but {parts[0]} has {a.type}; "
                    "all Parquet files of a folder must share one schema"
                )
    combined = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    return _with_sources(combined, [(str(p), t.num_rows) for p, t in zip(parts, tables)])


def _with_sources(data: pa.Table, sources: list[tuple[str, int | None]]) -> pa.Table:
    filled = [[f, data.num_rows if n is None else n] for f, n in sources]
    return data.replace_schema_metadata({SOURCES: json.dumps(filled)})


def _infer_table(data: pa.Table, path: Path) -> TableName:
    for name in ("notes", "behaviors"):
        required = [f.name for f in TABLES[name] if not f.nullable]
        if all(c in data.column_names for c in required) and all(
            c in TABLES[name].names for c in data.column_names
        ):
            return name  # type: ignore[return-value]
    raise DataValidationError(
        f"{path}: columns {data.column_names} match neither the notes nor the behaviors contract"
    )


# ------------------------------------------------------------------------------------ JSONL


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's kind: null, boolean, number, string, array or object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def utf8_error(raw: bytes) -> str | None:
    """None when ``raw`` is valid UTF-8, else ``"invalid byte 0xff at byte offset 3"``."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid byte 0x{raw[exc.start]:02x} at byte offset {exc.start}"
    return None


def _undecodable(value: Any) -> bool:
    """True when a value parsed from a surrogate-escaped line holds bytes that are not UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, list):
        return any(_undecodable(v) for v in value)
    if isinstance(value, dict):
        return any(_undecodable(k) or _undecodable(v) for k, v in value.items())
    return False


def _parse_line(raw: bytes) -> tuple[dict[str, Any], str | None, str | None]:
    """(object, error field, error reason) for one non-blank JSONL line."""
    bad_utf8 = utf8_error(raw)
    text = raw.decode("utf-8", "surrogateescape")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if bad_utf8:
            return {}, None, f"line is not valid UTF-8 ({bad_utf8})"
        return {}, None, f"not valid JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(obj, dict):
        return {}, None, f"expected a JSON object per line, got a JSON {json_kind(obj)}"
    if bad_utf8:
        fields = [k for k, v in obj.items() if _undecodable(k) or _undecodable(v)]
        value = obj.get(fields[0]) if fields else None
        detail = bad_utf8
        if isinstance(value, str):
            detail = utf8_error(value.encode("utf-8", "surrogateescape")) or bad_utf8
        others = f"; also in {', '.join(repr(f) for f in fields[1:])}" if len(fields) > 1 else ""
        field = fields[0] if fields else None
        if field is not None and _undecodable(field):
            field = field.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        subject = f"{field} is" if field is not None else "line is"
        return {}, field, f"{subject} not valid UTF-8 ({detail}){others}"
    return obj, None, None


def _read_jsonl(path: Path, table: TableName) -> pa.Table:
    values: dict[str, list[Any]] = {}
    lines: list[int] = []
    err_fields: list[str | None] = []
    errors: list[str | None] = []
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataValidationError(f"{path}: cannot read JSONL file: {exc}") from exc
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            obj, err_field, err = _parse_line(raw.rstrip(b"\r\n"))
            row = len(lines)
            for key, value in obj.items():
                if key not in values:
                    values[key] = [None] * row
                values[key].append(value)
            for column in values.values():
                if len(column) == row:
                    column.append(None)
            lines.append(line_no)
            err_fields.append(err_field)
            errors.append(err)
    schema = TABLES[table]
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for name, column in values.items():
        expected = schema.field(name).type if name in schema.names else None
        array = _typed_json_column(column, expected)
        if array is None:
            texts = [None if v is None else json.dumps(v, ensure_ascii=False) for v in column]
            array = pa.array(texts, pa.string())
            fields.append(pa.field(name, pa.string(), metadata={MIXED_JSON: b"1"}))
        else:
            fields.append(pa.field(name, array.type))
        arrays.append(array)
    arrays += [pa.array(lines, pa.int64()), pa.array(err_fields, pa.string()), pa.array(errors, pa.string())]
    fields += [pa.field(LINE, pa.int64()), pa.field(READ_ERROR_FIELD, pa.string()), pa.field(READ_ERROR, pa.string())]
    data = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    return _with_sources(data, [(str(path), data.num_rows)])


def _typed_json_column(column: list[Any], expected: pa.DataType | None) -> pa.Array | None:
    """An Arrow array when every value already has the contract kind of ``expected``, else None."""
    kinds = {json_kind(v) for v in column} - {"null"}
    try:
        if expected == pa.string() and kinds <= {"string"}:
            return pa.array(column, pa.string())
        if expected == pa.list_(pa.string()) and kinds <= {"array"}:
            if all(isinstance(x, str) for v in column if v is not None for x in v):
                return pa.array(column, pa.list_(pa.string()))
        if expected == TIMESTAMP:
            if kinds <= {"string"}:
                return pa.array(column, pa.string())
            if kinds <= {"number"}:
                ints = all(isinstance(v, int) for v in column if v is not None)
                return pa.array(column, pa.int64() if ints else pa.float64())
    except (pa.ArrowInvalid, OverflowError):
        return None
    return None
