"""SYNTHETIC behaviour data for benchmarks — not real users, not real notes.

Generates a notes table and a behaviours table that follow the data contract, with the skew that
makes pair mining expensive in production:

* note popularity is Zipf-distributed (exponent ``zipf_s``): a few notes get most engagement;
* user activity is heavy-tailed (log-normal events per user): most users touch one or two notes,
  a few touch hundreds (the heavy users the miner must cap);
* timestamps are uniform over ``days`` days; categories are assigned round-robin.

Deterministic for a seed. Every note title says it is synthetic.

    python -m bench.synthetic_behaviors --events 1000000 --out bench/out/synthetic-1m
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from notellm.data.schema import BEHAVIORS_SCHEMA, NOTES_SCHEMA
from notellm.io_utils import atomic_write_parquet

START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def generate(
    n_events: int,
    seed: int = 0,
    events_per_note: int = 20,
    events_per_user: int = 10,
    zipf_s: float = 1.1,
    user_sigma: float = 1.5,
    days: int = 30,
    n_categories: int = 20,
) -> tuple[pa.Table, pa.Table]:
    """Returns ``(notes, behaviors)`` cast to the contract schemas; ``behaviors`` has ``n_events`` rows."""
    rng = np.random.default_rng(seed)
    n_notes = max(2, n_events // events_per_note)
    n_users = max(1, n_events // events_per_user)

    # Zipf note popularity: p(rank k) ∝ k^-s, sampled by inverse CDF.
    weights = 1.0 / np.arange(1, n_notes + 1, dtype=np.float64) ** zipf_s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    note_idx = np.searchsorted(cdf, rng.random(n_events), side="right")
    note_idx = rng.permutation(n_notes)[np.minimum(note_idx, n_notes - 1)]  # popularity ≠ id order

    # Heavy-tailed user activity: log-normal weights, events assigned proportionally.
    user_w = rng.lognormal(mean=0.0, sigma=user_sigma, size=n_users)
    user_cdf = np.cumsum(user_w)
    user_cdf /= user_cdf[-1]
    user_idx = np.minimum(np.searchsorted(user_cdf, rng.random(n_events), side="right"), n_users - 1)

    start_us = int(START.timestamp() * 1_000_000)
    ts = start_us + rng.integers(0, days * 86_400 * 1_000_000, size=n_events, dtype=np.int64)
    behaviors = pa.table(
        {
            "user_id": pa.array(np.char.add("synu:", user_idx.astype(str))),
            "note_id": pa.array(np.char.add("syn:", note_idx.astype(str))),
            "event_type": pa.array(np.full(n_events, "view")),
            "ts": pa.array(ts, type=pa.timestamp("us", tz="UTC")),
        }
    ).cast(BEHAVIORS_SCHEMA)

    ids = np.arange(n_notes)
    notes = pa.table(
        {
            "note_id": pa.array(np.char.add("syn:", ids.astype(str))),
            "title": pa.array(np.char.add("SYNTHETIC benchmark note ", ids.astype(str))),
            "content": pa.array(np.full(n_notes, "synthetic content")),
            "hashtags": pa.array([[] for _ in range(n_notes)], type=pa.list_(pa.string())),
            "category": pa.array(np.char.add("syncat", (ids % n_categories).astype(str))),
            "created_at": pa.array(np.full(n_notes, start_us - 1), type=pa.timestamp("us", tz="UTC")),
            "source_url": pa.nulls(n_notes, pa.string()),
            "author": pa.nulls(n_notes, pa.string()),
            "author_url": pa.nulls(n_notes, pa.string()),
        }
    ).cast(NOTES_SCHEMA)
    return notes, behaviors


def write(out_dir: Path, n_events: int, seed: int = 0) -> Path:
    """Generate and write ``notes.parquet`` + ``behaviors.parquet`` under ``out_dir`` (skips if present)."""
    if (out_dir / "behaviors.parquet").is_file() and (out_dir / "notes.parquet").is_file():
        return out_dir
    started = time.perf_counter()
    notes, behaviors = generate(n_events, seed=seed)
    atomic_write_parquet(out_dir / "notes.parquet", notes)
    atomic_write_parquet(out_dir / "behaviors.parquet", behaviors, row_group_size=1_000_000)
    print(f"SYNTHETIC data: {behaviors.num_rows:,} events, {notes.num_rows:,} notes -> {out_dir} "
          f"({time.perf_counter() - started:.1f}s)")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write(args.out, args.events, args.seed)


if __name__ == "__main__":
    main()
