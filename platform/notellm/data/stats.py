"""Dataset statistics: what a person checks first after ingesting notes and behaviours."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def dataset_stats(notes: pa.Table, behaviors: pa.Table) -> dict[str, Any]:
    """Counts overall and per category.

    Returns ``{"notes", "behaviors", "users", "events_by_type", "per_category": {cat: {...}},
    "notes_time_range": [first, last]}``; per category: notes, behaviour events, distinct users,
    notes with at least one behaviour, first/last note time (ISO strings).
    """
    n = notes.select(["note_id", "category", "created_at"]).to_pandas()
    b = behaviors.select(["user_id", "note_id", "event_type"]).to_pandas()
    b = b.merge(n[["note_id", "category"]], on="note_id", how="left")
    per_category: dict[str, dict[str, Any]] = {}
    for cat, group in n.groupby("category", sort=True):
        events = b[b["category"] == cat]
        per_category[str(cat)] = {
            "notes": int(len(group)),
            "behaviors": int(len(events)),
            "users": int(events["user_id"].nunique()),
            "notes_with_behavior": int(events["note_id"].nunique()),
            "first": group["created_at"].min().isoformat(),
            "last": group["created_at"].max().isoformat(),
        }
    return {
        "notes": int(len(n)),
        "behaviors": int(len(b)),
        "users": int(b["user_id"].nunique()),
        "events_by_type": {str(k): int(v) for k, v in b["event_type"].value_counts().sort_index().items()},
        "per_category": per_category,
        "notes_time_range": [n["created_at"].min().isoformat(), n["created_at"].max().isoformat()]
        if len(n)
        else [None, None],
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A fixed-width per-category table plus totals, for terminals and job logs."""
    header = f"{'category':<16}{'notes':>8}{'events':>9}{'users':>8}{'active':>8}  {'first':<10}  {'last':<10}"
    lines = [header, "-" * len(header)]
    for cat, s in stats["per_category"].items():
        lines.append(
            f"{cat:<16}{s['notes']:>8}{s['behaviors']:>9}{s['users']:>8}{s['notes_with_behavior']:>8}"
            f"  {s['first'][:10]:<10}  {s['last'][:10]:<10}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'total':<16}{stats['notes']:>8}{stats['behaviors']:>9}{stats['users']:>8}")
    events = ", ".join(f"{k}={v}" for k, v in stats["events_by_type"].items())
    lines.append(f"events by type: {events}")
    return "\n".join(lines)
