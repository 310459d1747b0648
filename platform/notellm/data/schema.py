"""The data contract: Arrow schemas of the ``notes`` and ``behaviors`` tables.

Layout on disk: each table is one Parquet file or a folder of Parquet files
(``notes.parquet`` / ``behaviors.parquet``); JSONL with the same field names is accepted as input
(timestamps as ISO-8601 strings). Required columns must be present with these types; optional
columns may be absent (they are then filled with nulls).

notes
    note_id     string, non-empty, unique
    title       string (title or content must be non-empty)
    content     string
    hashtags    list<string>
    category    string, non-empty
    created_at  timestamp[us, UTC]
    source_url  string, optional (attribution)
    author      string, optional (attribution: display name)
    author_url  string, optional (attribution: profile link)

behaviors
    user_id     string, non-empty
    note_id     string, must exist in notes
    event_type  string, non-empty (the Stack Exchange adapter emits EVENT_TYPES; BYOD may use others)
    ts          timestamp[us, UTC], not in the future
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

NOTES_SCHEMA = pa.schema(
    [
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("content", pa.string()),
        pa.field("hashtags", pa.list_(pa.string())),
        pa.field("category", pa.string(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
        pa.field("source_url", pa.string()),
        pa.field("author", pa.string()),
        pa.field("author_url", pa.string()),
    ]
)
NOTES_REQUIRED = ("note_id", "title", "content", "hashtags", "category", "created_at")
NOTES_OPTIONAL = ("source_url", "author", "author_url")

BEHAVIORS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
    ]
)
BEHAVIORS_REQUIRED = ("user_id", "note_id", "event_type", "ts")

# Behaviour kinds the Stack Exchange adapter emits: the asker at question time, an answer's
# author at answer time, a commenter (on the question or any of its answers) at comment time.
EVENT_TYPES = ("ask", "answer", "comment")

TABLES = {"notes": NOTES_SCHEMA, "behaviors": BEHAVIORS_SCHEMA}
REQUIRED = {"notes": NOTES_REQUIRED, "behaviors": BEHAVIORS_REQUIRED}
