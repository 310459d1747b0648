"""Time split of notes and behaviours for training and evaluation (method.md section 5).

Rules (``cfg`` is ``notellm.config.SplitConfig``):

- **Cutoff per category** ``c``: ``cutoff_c = min_c + floor((1 - cfg.test_fraction) * (max_c - min_c))``
  over the ``created_at`` of the category's notes, computed in microseconds (a category whose
  notes all share one instant has ``cutoff_c = min_c``, so all its notes are test notes).
  When ``cfg.cutoff`` (ISO-8601; no offset means UTC) is set, every category uses that instant.
- **Notes**: a note is a *train* note when ``created_at < cutoff`` of its category, else a
  *test* note. Every note is in exactly one split.
- **Behaviours**: train pairs are mined from events on train notes with ``ts < cutoff`` of the
  note's category; test pairs from all events on test notes (any ``ts``). So pairs of a split
  only connect notes of that split, and N_i of a user counts only that split's notes.
- **Test pool** = test notes minus every note that appears in a training pair (empty by
  construction; ``evaluation_pool`` checks it).

A behaviour whose ``note_id`` is not a known note is refused (``MiningInputError``), never
silently dropped: the ingest validator removes or rejects such rows, so their presence means
the ingested tables are inconsistent.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from notellm.config import SplitConfig
from notellm.mining import MiningInputError

SPLITS = ("train", "test")
MAX_EXAMPLES_SHOWN = 5  # unknown note ids quoted in an error message


def parse_cutoff(text: str) -> pd.Timestamp:
    """``split.cutoff`` as a UTC timestamp; raises ``MiningInputError`` naming the key."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise MiningInputError(f"split.cutoff {text!r} is not an ISO-8601 date/time: {exc}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return pd.Timestamp(value).tz_convert("UTC").as_unit("us")


def category_cutoffs(notes: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """One row per category (sorted): category, notes (count), first, last (created_at range), cutoff."""
    created = notes["created_at"].dt.as_unit("us")
    ranges = (pd.DataFrame({"category": notes["category"], "created_at": created})
              .groupby("category", sort=True)["created_at"].agg(["count", "min", "max"]))
    if cfg.cutoff is not None:
        cutoff = pd.Series(parse_cutoff(cfg.cutoff), index=ranges.index)
    else:
        span_us = (ranges["max"] - ranges["min"]).dt.as_unit("us").astype("int64").to_numpy()
        offset_us = np.floor((1 - cfg.test_fraction) * span_us).astype(np.int64)
        cutoff = ranges["min"] + pd.to_timedelta(offset_us, unit="us")
    return pd.DataFrame({"category": ranges.index.astype("str"), "notes": ranges["count"].to_numpy(np.int64),
                         "first": ranges["min"].to_numpy(), "last": ranges["max"].to_numpy(),
                         "cutoff": cutoff.dt.as_unit("us").to_numpy()}).reset_index(drop=True)


def assign_splits(notes: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Columns note_id, category, split ("train"/"test"), cutoff (UTC, the note's category's)."""
    cutoffs = category_cutoffs(notes, cfg).set_index("category")["cutoff"]
    cutoff = notes["category"].map(cutoffs).dt.as_unit("us")
    split = np.where(notes["created_at"].dt.as_unit("us") < cutoff, "train", "test")
    return pd.DataFrame({"note_id": notes["note_id"].to_numpy(), "category": notes["category"].to_numpy(),
                         "split": pd.array(split, dtype="str"), "cutoff": cutoff.to_numpy()})


def split_behaviors(behaviors: pd.DataFrame, notes_split: pd.DataFrame,
                    source: str = "behaviors") -> dict[str, pd.DataFrame]:
    """The events each split mines from: ``{"train": events, "test": events}`` (same columns).

    Raises ``MiningInputError`` naming ``source``, the count and the first rows when a
    behaviour's note_id is not in ``notes_split``.
    """
    index = notes_split.set_index("note_id")
    pos = index.index.get_indexer(behaviors["note_id"])
    unknown = np.flatnonzero(pos < 0)
    if len(unknown):
        shown = ", ".join(f"row {i} note_id {behaviors['note_id'].iloc[i]!r}" for i in unknown[:MAX_EXAMPLES_SHOWN])
        raise MiningInputError(
            f"{source}: {len(unknown)} of {len(behaviors)} behaviour rows refer to notes that are not in "
            f"the notes table ({shown}); the ingest validator removes such rows - rerun "
            "`python -m pipelines.ingest` on consistent inputs")
    is_train_note = index["split"].to_numpy()[pos] == "train"
    cutoff = index["cutoff"].dt.as_unit("us").to_numpy()[pos]
    before_cutoff = behaviors["ts"].dt.as_unit("us").to_numpy() < cutoff
    return {"train": behaviors[is_train_note & before_cutoff].reset_index(drop=True),
            "test": behaviors[~is_train_note].reset_index(drop=True)}


def evaluation_pool(notes_split: pd.DataFrame, train_pairs: pd.DataFrame) -> pd.Index:
    """The note ids of the evaluation pool: test notes that appear in no training pair.

    Raises ``AssertionError`` when a training pair touches a test note (the split is broken).
    """
    test_notes = pd.Index(notes_split.loc[notes_split["split"] == "test", "note_id"])
    in_train = pd.Index(train_pairs["note_id"]).union(pd.Index(train_pairs["related_note_id"]))
    leaked = test_notes.intersection(in_train)
    if len(leaked):
        raise AssertionError(f"{len(leaked)} test notes appear in training pairs, e.g. {list(leaked[:5])}")
    return test_notes.difference(in_train)


def check_pairs_within_split(notes_split: pd.DataFrame, pairs: pd.DataFrame, split: str) -> None:
    """Raise ``AssertionError`` unless both notes of every pair belong to ``split``."""
    split_of = notes_split.set_index("note_id")["split"]
    for column in ("note_id", "related_note_id"):
        got = pairs[column].map(split_of)
        bad = pairs[got != split]
        if len(bad):
            raise AssertionError(f"{len(bad)} {split} pairs have a {column} outside the {split} split, "
                                 f"e.g. {bad.iloc[0].to_dict()}")


def pairs_per_category(pairs: pd.DataFrame, notes_split: pd.DataFrame) -> dict[str, int]:
    """``{category: pairs whose note_id is in it}`` for every category of ``notes_split`` (sorted)."""
    category = pairs["note_id"].map(notes_split.set_index("note_id")["category"])
    counts = category.value_counts()
    return {str(c): int(counts.get(c, 0)) for c in sorted(notes_split["category"].unique())}
