"""A deliberately plain reference of pair mining and the time split, for tests and benchmarks only.

Written from the semantics in the ``notellm.mining`` and ``notellm.split`` docstrings with
Python loops, ``datetime`` and ``fractions.Fraction`` (no shared code with the library beyond the
documented sampling recipe, which is part of the specification). Slow: small inputs only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pandas as pd


def reference_sample(user_id: str, note_ids: list[str], cap: int, seed: int) -> list[str]:
    """The documented "sample" rule, written out again."""
    h = int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "little")
    rng = np.random.default_rng([seed % 2**64, h])
    ordered = sorted(note_ids)
    return sorted(ordered[j] for j in rng.choice(len(ordered), size=cap, replace=False))


def reference_mine(events: pd.DataFrame, window_days: float, u: float, l: float, t: int,  # noqa: E741
                   max_notes_per_user: int, heavy_user_policy: str = "skip", seed: int = 0,
                   ) -> tuple[pd.DataFrame, dict[str, int]]:
    """(pairs, counts) for ``events`` (columns user_id, note_id, ts as datetimes)."""
    first: dict[str, dict[str, dt.datetime]] = defaultdict(dict)
    for user, note, ts in zip(events["user_id"], events["note_id"], events["ts"]):
        ts = ts.to_pydatetime() if hasattr(ts, "to_pydatetime") else ts
        if note not in first[user] or ts < first[user][note]:
            first[user][note] = ts

    counts = {"events_in": len(events), "users": len(first), "users_one_note": 0,
              "heavy_users_skipped": 0, "heavy_users_sampled": 0, "users_mined": 0,
              "user_pair_contributions": 0}
    window = dt.timedelta(days=window_days)
    score: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
    users: dict[tuple[str, str], int] = defaultdict(int)
    for user, notes in first.items():
        if len(notes) < 2:
            counts["users_one_note"] += 1
            continue
        if len(notes) > max_notes_per_user:
            if heavy_user_policy == "skip":
                counts["heavy_users_skipped"] += 1
                continue
            counts["heavy_users_sampled"] += 1
            keep = reference_sample(user, list(notes), max_notes_per_user, seed)
            notes = {n: notes[n] for n in keep}
        counts["users_mined"] += 1
        weight = Fraction(1, len(notes))
        for a, ta in notes.items():
            for b, tb in notes.items():
                if a != b and ta <= tb and tb - ta <= window:
                    score[(a, b)] += weight
                    users[(a, b)] += 1
                    counts["user_pair_contributions"] += 1

    by_note: dict[str, list[str]] = defaultdict(list)
    for a, b in score:
        by_note[a].append(b)
    counts.update(candidate_pairs=len(score), dropped_above_u=0, dropped_below_l=0, dropped_top_t=0)
    upper, lower = Fraction(str(u)), Fraction(str(l))  # the decimals as written in the config
    rows = []
    for a in sorted(by_note):
        survivors = []
        for b in by_note[a]:
            s = score[(a, b)]
            if s > upper:
                counts["dropped_above_u"] += 1
            elif s < lower:
                counts["dropped_below_l"] += 1
            else:
                survivors.append(b)
        survivors.sort(key=lambda b: (-score[(a, b)], b))
        counts["dropped_top_t"] += max(0, len(survivors) - t)
        for b in survivors[:t]:
            rows.append((a, b, float(score[(a, b)]), users[(a, b)]))
    counts["pairs_out"] = len(rows)
    pairs = pd.DataFrame(rows, columns=["note_id", "related_note_id", "score", "n_users"])
    return pairs.astype({"score": "float64", "n_users": "int64"}), counts


def reference_split(notes: pd.DataFrame, behaviors: pd.DataFrame, test_fraction: float,
                    ) -> tuple[dict[str, dt.datetime], dict[str, str], pd.DataFrame, pd.DataFrame]:
    """(cutoff per category, split per note, train events, test events), with loops."""
    times: dict[str, list[dt.datetime]] = defaultdict(list)
    for cat, created in zip(notes["category"], notes["created_at"]):
        times[cat].append(created.to_pydatetime())
    cutoffs = {}
    for cat, ts in times.items():
        span_us = (max(ts) - min(ts)) // dt.timedelta(microseconds=1)
        cutoffs[cat] = min(ts) + dt.timedelta(microseconds=int((1 - test_fraction) * span_us))
    split, category = {}, {}
    for note, cat, created in zip(notes["note_id"], notes["category"], notes["created_at"]):
        split[note] = "train" if created.to_pydatetime() < cutoffs[cat] else "test"
        category[note] = cat
    train_rows, test_rows = [], []
    for i, (note, ts) in enumerate(zip(behaviors["note_id"], behaviors["ts"])):
        if split[note] == "test":
            test_rows.append(i)
        elif ts.to_pydatetime() < cutoffs[category[note]]:
            train_rows.append(i)
    return cutoffs, split, behaviors.iloc[train_rows], behaviors.iloc[test_rows]
