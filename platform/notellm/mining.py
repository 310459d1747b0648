"""Related-pair mining from co-engagement (method.md section 1): the math, as pure functions.

Exact semantics (``cfg`` is ``notellm.config.MiningConfig``; the input is one split's events,
see ``notellm.split``):

1. **First engagements.** For each (user, note) the first engagement time is the minimum ``ts``
   over that user's events on that note: repeated engagement with one note counts once, and the
   order of rows in the input does not matter.
2. **N_i** = the number of distinct notes of user ``i`` in these events.
   - ``N_i < 2``: the user produces nothing (counted as ``users_one_note``).
   - ``N_i > cfg.max_notes_per_user`` (a heavy user), policy ``cfg.heavy_user_policy``:
     ``"skip"`` drops the user (``heavy_users_skipped``); ``"sample"`` keeps
     ``cap = cfg.max_notes_per_user`` of the user's notes (``heavy_users_sampled``) and N_i
     becomes ``cap``. The kept notes are ``sorted(note_ids)[j]`` for ``j`` in
     ``numpy.random.default_rng([cfg.seed % 2**64, h]).choice(N_i, size=cap, replace=False)``,
     where ``h = int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(),
     "little")`` (a stable hash, not Python's ``hash()``), ``sorted`` is code-point order, and
     ``N_i`` is the count before sampling. The same user, notes and seed always keep the same notes.
3. **Pairs.** User ``i`` contributes the ordered pair A→B when A != B,
   ``first_ts(A) <= first_ts(B)`` and ``first_ts(B) - first_ts(A) <= window``, with
   ``window = datetime.timedelta(days=cfg.window_days)`` (microsecond resolution; the boundary is
   included). Equal first times give both A→B and B→A.
4. **Score.** ``s(A→B) = sum over contributing users of 1/N_i`` and ``n_users(A→B)`` = the
   number of contributing users. Scores are computed *exactly* (as integers over the common
   denominator ``lcm`` of the N_i values), so thresholds and ties are decided on exact rationals:
   1/3 + 1/4 + 1/6 ties with 1/2 + 1/4 (their float64 sums differ). The ``score`` column is that
   rational rounded to the nearest float64; the result never depends on summation order.
5. **Selection**, for each note A separately: candidates B with ``s(A→B) > cfg.u`` are dropped
   (``dropped_above_u``), then those with ``s(A→B) < cfg.l`` (``dropped_below_l``); a score
   equal to ``u`` or ``l`` is kept. ``u`` and ``l`` are taken as the decimal numbers written in
   the config (the shortest decimal of the float64, ``repr``): ``l: 0.2`` is exactly 1/5. Of the rest,
   the top ``cfg.t`` by score are kept, ties broken by ``related_note_id`` ascending (code-point
   order); the others are ``dropped_top_t``.
6. **Output**: rows ``(note_id: string, related_note_id: string, score: float64,
   n_users: int64)`` sorted by ``(note_id asc, score desc, related_note_id asc)``, ids in
   code-point order and scores compared exactly.

Counts (``MiningStats``) satisfy ``users = users_one_note + heavy_users_skipped + users_mined``
and ``candidate_pairs = dropped_above_u + dropped_below_l + dropped_top_t + pairs_out``.

Data-parallel use (``pipelines.mine_pairs``): ``user_pair_contributions`` and ``user_stats``
need *all* events of every user in their input (any number of users); ``classify_candidates``
needs *all* contribution rows of every note A in its input. Contribution rows are pre-aggregated
counts, so partial outputs of several batches can be concatenated and classified together.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd
import pyarrow as pa

from notellm.config import MiningConfig

# Columns of the tables passed between the stages. PART names the independent mining job a row
# belongs to when several share one Ray pipeline (see the batch adapters at the end).
PART = "part"
EVENT_COLUMNS = ("user_id", "note_id", "ts")
CONTRIBUTION_COLUMNS = ("note_id", "related_note_id", "n_notes", "n_users")
PAIR_COLUMNS = ("note_id", "related_note_id", "score", "n_users")
PAIRS_SCHEMA = pa.schema([  # the pairs files written by pipelines.mine_pairs
    pa.field("note_id", pa.string(), nullable=False),
    pa.field("related_note_id", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("n_users", pa.int64(), nullable=False),
])

# Candidate status codes written by ``classify_candidates``.
KEPT, ABOVE_U, BELOW_L, BEYOND_TOP_T = 0, 1, 2, 3

# Memory bound of the O(N_i^2) pair enumeration: users are processed in chunks of at most this
# many (A, B) index pairs (a few int64 arrays of this length live at once). Not a semantic knob.
MAX_ENUMERATED_PAIRS_PER_CHUNK = 2_000_000
_INT64_MAX = np.iinfo(np.int64).max
_FLOAT_EXACT = 2**53  # integers below this convert to float64 exactly


class MiningInputError(ValueError):
    """The mining input is unusable (missing, empty, inconsistent); the message says why and what to do."""


class NoPairsError(MiningInputError):
    """Mining produced no pairs; the message gives the counts and the config keys to change."""


@dataclass
class MiningStats:
    """What mining saw and dropped, for one split. Adding two stats adds every count."""

    events_in: int = 0  # behaviour rows given to the miner
    users: int = 0  # distinct users among them
    users_one_note: int = 0  # N_i < 2: produce nothing
    heavy_users_skipped: int = 0  # N_i > max_notes_per_user, policy "skip"
    heavy_users_sampled: int = 0  # N_i > max_notes_per_user, policy "sample" (also in users_mined)
    users_mined: int = 0  # users whose notes were paired (N_i >= 2 after the cap)
    user_pair_contributions: int = 0  # (user, A→B) contributions summed over users
    candidate_pairs: int = 0  # distinct A→B with at least one contribution
    dropped_above_u: int = 0
    dropped_below_l: int = 0
    dropped_top_t: int = 0
    pairs_out: int = 0

    def __add__(self, other: MiningStats) -> MiningStats:
        return MiningStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                              for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_frame(self) -> pd.DataFrame:
        """A one-row frame of the counts (how Ray batches return partial stats)."""
        return pd.DataFrame({k: np.array([v], dtype=np.int64) for k, v in self.to_dict().items()})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> MiningStats:
        """The sum of the rows of ``to_frame()`` outputs; missing columns count 0."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: int(frame[k].sum()) if k in frame.columns else 0 for k in names})

    @classmethod
    def by_part(cls, frame: pd.DataFrame, parts: list[str]) -> dict[str, MiningStats]:
        """``{part: sum of its rows}`` of ``*_stats_batch`` outputs (a column ``part``); absent parts count 0."""
        return {p: cls.from_frame(frame[frame[PART] == p]) if len(frame) else cls() for p in parts}


# ---------------------------------------------------------------------------- helpers


def window_microseconds(window_days: float) -> int:
    """``window_days`` as whole microseconds, rounded as ``datetime.timedelta(days=...)`` rounds."""
    return dt.timedelta(days=window_days) // dt.timedelta(microseconds=1)


def stable_user_hash(user_id: str) -> int:
    """An unsigned 64-bit hash of ``user_id`` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "little")


def sample_user_notes(user_id: str, note_ids: list[str], cap: int, seed: int) -> list[str]:
    """The ``cap`` notes a heavy user keeps under policy "sample" (sorted by note id).

    ``note_ids`` are the user's distinct notes in any order; see the module docstring for the rule.
    """
    ordered = sorted(note_ids)
    rng = np.random.default_rng([seed % 2**64, stable_user_hash(user_id)])
    picked = rng.choice(len(ordered), size=cap, replace=False)
    return [ordered[j] for j in sorted(picked)]


def _decimal(x: float) -> Fraction:
    """The exact rational of the shortest decimal that round-trips ``x`` (0.2 -> 1/5)."""
    return Fraction(repr(float(x)))


def _timestamps_us(ts: pd.Series) -> np.ndarray:
    """int64 microseconds since the epoch of a datetime column (integers are taken as microseconds)."""
    if pd.api.types.is_datetime64_any_dtype(ts.dtype):
        return ts.dt.as_unit("us").astype("int64").to_numpy()
    if pd.api.types.is_integer_dtype(ts.dtype):
        return ts.to_numpy(dtype=np.int64)
    raise MiningInputError(f"column 'ts' must hold timestamps, got dtype {ts.dtype}")


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MiningInputError(f"{what} lacks columns {missing}; has {list(frame.columns)}")


@dataclass
class _UserNotes:
    """First engagements after the heavy-user policy, rows grouped by user (users contiguous)."""

    note_code: np.ndarray  # int64 index into note_names, per kept (user, note)
    first_ts: np.ndarray  # int64 microseconds, per kept (user, note)
    starts: np.ndarray  # int64 first row of each mined user
    sizes: np.ndarray  # int64 N_i of each mined user (after the cap)
    note_names: pd.Index  # note ids (note_code indexes them)
    stats: MiningStats  # user-level counts


def _first_engagements(events: pd.DataFrame, cfg: MiningConfig) -> _UserNotes:
    _require_columns(events, EVENT_COLUMNS, "events")
    user_code, user_names = pd.factorize(events["user_id"])
    note_code, note_names = pd.factorize(events["note_id"])
    if (user_code < 0).any() or (note_code < 0).any():
        raise MiningInputError("events hold null user_id or note_id values")
    first = (pd.DataFrame({"u": user_code, "n": note_code, "ts": _timestamps_us(events["ts"])})
             .groupby(["u", "n"], sort=True)["ts"].min())  # sorted by (user, note)
    u = first.index.get_level_values("u").to_numpy(np.int64)
    n = first.index.get_level_values("n").to_numpy(np.int64)
    ts = first.to_numpy(np.int64)

    n_raw = np.bincount(u, minlength=len(user_names))
    present = n_raw > 0
    cap = cfg.max_notes_per_user
    heavy = n_raw > cap
    stats = MiningStats(
        events_in=len(events),
        users=int(present.sum()),
        users_one_note=int((n_raw == 1).sum()),
        heavy_users_skipped=int(heavy.sum()) if cfg.heavy_user_policy == "skip" else 0,
        heavy_users_sampled=int(heavy.sum()) if cfg.heavy_user_policy == "sample" else 0,
    )
    keep = n_raw[u] >= 2
    if cfg.heavy_user_policy == "skip":
        keep &= ~heavy[u]
    else:
        user_start = np.concatenate([[0], np.cumsum(n_raw)[:-1]])
        names = note_names.to_numpy(dtype=object)
        for user in np.flatnonzero(heavy):  # heavy users are few; one Python call each
            rows = np.arange(user_start[user], user_start[user] + n_raw[user])
            kept = set(sample_user_notes(str(user_names[user]), list(names[n[rows]]), cap, cfg.seed))
            keep[rows] = [names[code] in kept for code in n[rows]]
    u, n, ts = u[keep], n[keep], ts[keep]
    sizes_all = np.bincount(u, minlength=len(user_names))
    mined = np.flatnonzero(sizes_all)
    sizes = sizes_all[mined].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    stats.users_mined = len(mined)
    return _UserNotes(n, ts, starts, sizes, note_names, stats)


def _enumerate_pairs(un: _UserNotes, window_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A code, B code, N_i) of every contribution, enumerating each user's N_i^2 ordered pairs."""
    out_a, out_b, out_n = [], [], []
    squares = un.sizes * un.sizes
    ends = np.cumsum(squares)
    g0 = 0
    while g0 < len(un.sizes):
        done = ends[g0 - 1] if g0 else 0
        g1 = max(int(np.searchsorted(ends, done + MAX_ENUMERATED_PAIRS_PER_CHUNK, side="right")), g0 + 1)
        sizes, starts, sq = un.sizes[g0:g1], un.starts[g0:g1], squares[g0:g1]
        user = np.repeat(np.arange(len(sizes)), sq)
        k = np.arange(int(sq.sum()), dtype=np.int64) - np.repeat(np.cumsum(sq) - sq, sq)
        size = sizes[user]
        a = starts[user] + k // size
        b = starts[user] + k % size
        gap = un.first_ts[b] - un.first_ts[a]
        ok = (a != b) & (gap >= 0) & (gap <= window_us)
        out_a.append(un.note_code[a[ok]])
        out_b.append(un.note_code[b[ok]])
        out_n.append(size[ok])
        g0 = g1
    if not out_a:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_n)


# ---------------------------------------------------------------------------- stage 1: per user


def user_stats(events: pd.DataFrame, cfg: MiningConfig) -> MiningStats:
    """User-level counts (events_in, users, users_one_note, heavy users, users_mined).

    ``events``: columns user_id, note_id, ts, holding all events of each user present.
    """
    return _first_engagements(events, cfg).stats


def user_pair_contributions(events: pd.DataFrame, cfg: MiningConfig) -> pd.DataFrame:
    """The pair contributions of the users in ``events``, counted.

    ``events``: columns user_id (str), note_id (str), ts (timestamp or int64 microseconds),
    holding *all* events of each user present (one user or many; any row order).
    Returns columns note_id, related_note_id (str), n_notes (int64: the contributing users' N_i),
    n_users (int64: how many users of ``events`` with that N_i contribute A→B); one row per
    distinct (note_id, related_note_id, n_notes).
    """
    un = _first_engagements(events, cfg)
    a, b, n = _enumerate_pairs(un, window_microseconds(cfg.window_days))
    counted = (pd.DataFrame({"a": a, "b": b, "n": n}).groupby(["a", "b", "n"], sort=True)
               .size().reset_index(name="n_users"))
    return pd.DataFrame({
        "note_id": un.note_names.take(counted["a"].to_numpy()),
        "related_note_id": un.note_names.take(counted["b"].to_numpy()),
        "n_notes": counted["n"].to_numpy(np.int64),
        "n_users": counted["n_users"].to_numpy(np.int64),
    })


# ---------------------------------------------------------------------------- stage 2: per note


def classify_candidates(contributions: pd.DataFrame, u: float, l: float, t: int) -> pd.DataFrame:  # noqa: E741
    """Score every candidate A→B and decide its fate.

    ``contributions``: columns note_id, related_note_id, n_notes, n_users (``user_pair_contributions``
    outputs, possibly several concatenated), holding *all* rows of each note_id present.
    Returns one row per candidate: note_id, related_note_id (str), score (float64), n_users (int64),
    status (int8: ``KEPT``, ``ABOVE_U``, ``BELOW_L``, ``BEYOND_TOP_T``), rank (int64: position among
    the note's kept candidates, 0 = best; -1 when not kept). Rows are sorted by note_id, then by
    exact score descending, then related_note_id.
    """
    _require_columns(contributions, CONTRIBUTION_COLUMNS, "contributions")
    if len(contributions) == 0:
        return pd.DataFrame({
            "note_id": pd.Series([], dtype="str"), "related_note_id": pd.Series([], dtype="str"),
            "score": np.zeros(0), "n_users": np.zeros(0, np.int64),
            "status": np.zeros(0, np.int8), "rank": np.zeros(0, np.int64)})
    a_code, a_names = pd.factorize(contributions["note_id"], sort=True)
    b_code, b_names = pd.factorize(contributions["related_note_id"], sort=True)
    n_notes = contributions["n_notes"].to_numpy(np.int64)
    n_users = contributions["n_users"].to_numpy(np.int64)
    if (n_notes < 1).any() or (n_users < 1).any():
        raise MiningInputError("contributions need n_notes >= 1 and n_users >= 1")

    # Exact score: numerator over the common denominator L = lcm of the N_i present.
    distinct_n = np.unique(n_notes)
    denominator = math.lcm(*(int(x) for x in distinct_n))
    exact_int64 = denominator * int(n_users.sum()) < _INT64_MAX
    if exact_int64:
        terms = n_users * (denominator // n_notes)
    else:  # huge caps: Python integers (slower, still exact)
        per_n = {int(x): denominator // int(x) for x in distinct_n}
        terms = np.array([int(c) * per_n[int(x)] for c, x in zip(n_users, n_notes)], dtype=object)
    grouped = (pd.DataFrame({"a": a_code, "b": b_code, "num": terms, "users": n_users})
               .groupby(["a", "b"], sort=True).agg(num=("num", "sum"), users=("users", "sum")))
    a = grouped.index.get_level_values("a").to_numpy(np.int64)
    b = grouped.index.get_level_values("b").to_numpy(np.int64)
    num = grouped["num"].to_numpy(np.int64 if exact_int64 else object)
    users = grouped["users"].to_numpy(np.int64)

    above_num = math.floor(_decimal(u) * denominator)  # s > u  <=>  num > floor(u * L)
    below_num = math.ceil(_decimal(l) * denominator)  # s < l  <=>  num < ceil(l * L)
    if exact_int64:
        above_num, below_num = min(above_num, _INT64_MAX), min(below_num, _INT64_MAX)
    status = np.full(len(num), KEPT, dtype=np.int8)
    status[num > above_num] = ABOVE_U
    status[(status == KEPT) & (num < below_num)] = BELOW_L

    # Order: note asc, exact score desc, related note asc (codes follow sorted ids).
    score_rank = np.unique(num, return_inverse=True)[1].astype(np.int64)
    order = np.lexsort((b, -score_rank, a))
    a, b, num, users, status = a[order], b[order], num[order], users[order], status[order]
    eligible = np.flatnonzero(status == KEPT)
    rank = np.full(len(num), -1, dtype=np.int64)
    if len(eligible):
        ea = a[eligible]
        first_of_note = np.concatenate([[True], ea[1:] != ea[:-1]])
        group_start = np.maximum.accumulate(np.where(first_of_note, np.arange(len(ea)), 0))
        within = np.arange(len(ea)) - group_start
        beyond = within >= t
        status[eligible[beyond]] = BEYOND_TOP_T
        rank[eligible[~beyond]] = within[~beyond]

    if exact_int64 and denominator < _FLOAT_EXACT and (len(num) == 0 or num.max() < _FLOAT_EXACT):
        score = num.astype(np.float64) / float(denominator)  # exact operands: correctly rounded
    else:
        score = np.array([int(x) / denominator for x in num], dtype=np.float64)  # int/int is correctly rounded
    return pd.DataFrame({
        "note_id": a_names.take(a), "related_note_id": b_names.take(b),
        "score": score, "n_users": users, "status": status, "rank": rank,
    })


def kept_pairs(classified: pd.DataFrame) -> pd.DataFrame:
    """The ``KEPT`` rows of ``classify_candidates`` output: columns note_id, related_note_id,
    score, n_users, rank (order unchanged)."""
    kept = classified[classified["status"] == KEPT]
    return kept[[*PAIR_COLUMNS, "rank"]].reset_index(drop=True)


def selection_stats(classified: pd.DataFrame) -> MiningStats:
    """Pair-level counts of ``classify_candidates`` output (candidates, drops, pairs out, contributions)."""
    status = classified["status"].to_numpy()
    return MiningStats(
        user_pair_contributions=int(classified["n_users"].sum()),
        candidate_pairs=len(classified),
        dropped_above_u=int((status == ABOVE_U).sum()),
        dropped_below_l=int((status == BELOW_L).sum()),
        dropped_top_t=int((status == BEYOND_TOP_T).sum()),
        pairs_out=int((status == KEPT).sum()),
    )


def select_pairs(contributions: pd.DataFrame, u: float, l: float, t: int) -> pd.DataFrame:  # noqa: E741
    """The selected pairs (columns ``PAIR_COLUMNS``) in output order; see ``classify_candidates``."""
    return kept_pairs(classify_candidates(contributions, u, l, t)).drop(columns="rank")


def mine_pairs_local(events: pd.DataFrame, cfg: MiningConfig) -> tuple[pd.DataFrame, MiningStats]:
    """The whole mining in one process: (pairs in output order, stats). For small data and checks."""
    classified = classify_candidates(user_pair_contributions(events, cfg), cfg.u, cfg.l, cfg.t)
    return kept_pairs(classified).drop(columns="rank"), user_stats(events, cfg) + selection_stats(classified)


# ---------------------------------------------------------------------------- Ray batch adapters
# (batch, **kwargs) -> batch functions for Dataset.map_batches. Several independent mining jobs
# ("parts", e.g. the train and the test split) share one Ray pipeline: every row carries its part
# name in the column ``PART`` and each part is mined with its own config, as if alone.


def _per_part(batch: pd.DataFrame, fn: Callable[[pd.DataFrame, str], pd.DataFrame],
              empty: pd.DataFrame) -> pd.DataFrame:
    """``fn(rows of one part without the PART column, part)`` for each part, with PART added back."""
    if len(batch) == 0 or PART not in batch.columns:  # an empty hash partition
        return empty.assign(**{PART: pd.Series([], dtype="str")})
    frames = [fn(rows.drop(columns=PART).reset_index(drop=True), str(part)).assign(**{PART: str(part)})
              for part, rows in batch.groupby(PART, sort=True)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty.assign(**{PART: pd.Series([], dtype="str")})
    return pd.concat(frames, ignore_index=True)


def _empty_contributions() -> pd.DataFrame:
    return pd.DataFrame({"note_id": pd.Series([], dtype="str"), "related_note_id": pd.Series([], dtype="str"),
                         "n_notes": np.zeros(0, np.int64), "n_users": np.zeros(0, np.int64)})


def _empty_classified() -> pd.DataFrame:
    return classify_candidates(_empty_contributions(), 1.0, 0.0, 1)


def user_stats_batch(events: pd.DataFrame, cfgs: dict[str, MiningConfig]) -> pd.DataFrame:
    """One row of ``user_stats`` counts per part present in ``events`` (columns: counts + part)."""
    return _per_part(events, lambda e, part: user_stats(e, cfgs[part]).to_frame(), MiningStats().to_frame().iloc[:0])


def user_pair_contributions_batch(events: pd.DataFrame, cfgs: dict[str, MiningConfig]) -> pd.DataFrame:
    """``user_pair_contributions`` per part (columns ``CONTRIBUTION_COLUMNS`` + part)."""
    return _per_part(events, lambda e, part: user_pair_contributions(e, cfgs[part]), _empty_contributions())


def classify_candidates_batch(contributions: pd.DataFrame, cfgs: dict[str, MiningConfig]) -> pd.DataFrame:
    """``classify_candidates`` per part with that part's u, l, t (its columns + part)."""
    def classify(rows: pd.DataFrame, part: str) -> pd.DataFrame:
        return classify_candidates(rows, cfgs[part].u, cfgs[part].l, cfgs[part].t)
    return _per_part(contributions, classify, _empty_classified())


def selection_stats_batch(classified: pd.DataFrame) -> pd.DataFrame:
    """One row of ``selection_stats`` counts per part present in ``classified``."""
    return _per_part(classified, lambda c, _: selection_stats(c).to_frame(), MiningStats().to_frame().iloc[:0])


def kept_pairs_batch(classified: pd.DataFrame) -> pd.DataFrame:
    """The ``KEPT`` rows: columns ``PAIR_COLUMNS``, rank, part."""
    return classified.loc[classified["status"] == KEPT, [*PAIR_COLUMNS, "rank", PART]].reset_index(drop=True)
