"""Pair mining on the real Ray cluster equals the plain reference, on hand-computed cases and the real data.

All Ray mining of this module happens in two pipeline runs (module fixtures): every case is one
"part" of a single ``mine_parts_ray`` call, mined as if alone.
"""

from __future__ import annotations

import datetime as dt
from fractions import Fraction

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reference_mining import reference_mine, reference_sample, reference_split

from notellm.config import REPO_ROOT, MiningConfig, load_config
from notellm.mining import PAIRS_SCHEMA, classify_candidates, mine_pairs_local, select_pairs
from pipelines.mine_pairs import main, mine_parts_ray

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
DEMO = load_config(REPO_ROOT / "configs/demo.yaml").mining


def events(*rows: tuple[str, str, float]) -> pd.DataFrame:
    """(user, note, days after T0) rows -> an events frame, in the given (file) order."""
    return pd.DataFrame({
        "user_id": [r[0] for r in rows], "note_id": [r[1] for r in rows],
        "ts": pd.to_datetime([T0 + dt.timedelta(days=r[2]) for r in rows]).as_unit("us"),
    })


def mining(**overrides) -> MiningConfig:
    return MiningConfig(**{"window_days": 7, "u": 30, "l": 0, "t": 10, "max_notes_per_user": 30} | overrides)


# ------------------------------------------------------------------------- hand-computed cases
# Each case: (events, config, expected pairs [(A, B, score, n_users)] in output order, expected counts).
# Notes far apart (100+ days) count in N_i but pair with nothing inside a 7-day window.

HEAVY_NOTES = ["K1", "K2", "K3", "K4", "K5"]  # user "heavy" engages with them on days 0..4
HEAVY_KEPT = reference_sample("heavy", HEAVY_NOTES, 3, 7)  # the documented rule, seed 7, cap 3

CASES = {
    # A→B = 1/3 + 1/4 + 1/6 = 3/4 (users of N = 3, 4, 6); A→C = 1/2 + 1/4 = 3/4; A→D = 1/4 + 1/2 = 3/4;
    # A→E = 1/3. t = 2 keeps B and C (the three-way tie at 3/4 is broken by related_note_id), drops
    # D and E. Summed naively in float64, 1/3 + 1/4 + 1/6 = 0.7499999999999999 would lose the tie.
    "ties": (events(
        ("ua", "A", 0), ("ua", "B", 1), ("ua", "X1", 100),
        ("ub", "A", 0), ("ub", "B", 1), ("ub", "X2", 100), ("ub", "X3", 200),
        ("uc", "A", 0), ("uc", "B", 1), ("uc", "X4", 100), ("uc", "X5", 200), ("uc", "X6", 300), ("uc", "X7", 400),
        ("ud", "A", 0), ("ud", "C", 1),
        ("ue", "A", 0), ("ue", "C", 1), ("ue", "X8", 100), ("ue", "X9", 200),
        ("uf", "A", 0), ("uf", "D", 1), ("uf", "X10", 100), ("uf", "X11", 200),
        ("ug", "A", 0), ("ug", "D", 1),
        ("uh", "A", 0), ("uh", "E", 1), ("uh", "X12", 100),
    ), mining(t=2), [("A", "B", 0.75, 3), ("A", "C", 0.75, 2)],
        {"users": 8, "users_mined": 8, "candidate_pairs": 4, "dropped_top_t": 2, "pairs_out": 2}),

    # "one" engages only with X (three times): N = 1, nothing. "rep" has Y on day 5, X on day 2,
    # Y again on day 1 (file order scrambled) and Z on day 3: first times Y 1, X 2, Z 3, N = 3,
    # so Y→X, Y→Z, X→Z at 1/3 each (using the file order or the last Y would give X→Y, Z→Y).
    "one_note_repeats_out_of_order": (events(
        ("one", "X", 4), ("rep", "Y", 5), ("one", "X", 1), ("rep", "X", 2), ("rep", "Y", 1),
        ("rep", "Z", 3), ("one", "X", 2),
    ), mining(), [("X", "Z", 1 / 3, 1), ("Y", "X", 1 / 3, 1), ("Y", "Z", 1 / 3, 1)],
        {"events_in": 7, "users": 2, "users_one_note": 1, "users_mined": 1, "candidate_pairs": 3,
         "user_pair_contributions": 3, "pairs_out": 3}),

    # u = 0.5, l = 0.2. P→Q = 1/2 (one user of N = 2) == u: kept. P→R = 1/2 + 1/5 = 7/10 > u: dropped.
    # User "five" (P R S T U on days 0..4, N = 5) gives every other pair among them 1/5 == l: kept (9).
    # User "six" (V1..V6, N = 6) gives 15 pairs at 1/6 < l: dropped.
    "thresholds": (events(
        ("two", "P", 0), ("two", "Q", 1),
        ("pr", "P", 0), ("pr", "R", 1),
        ("five", "P", 0), ("five", "R", 1), ("five", "S", 2), ("five", "T", 3), ("five", "U", 4),
        *[("six", f"V{i}", i) for i in range(1, 7)],
    ), mining(u=0.5, l=0.2), [
        ("P", "Q", 0.5, 1), ("P", "S", 0.2, 1), ("P", "T", 0.2, 1), ("P", "U", 0.2, 1),
        ("R", "S", 0.2, 1), ("R", "T", 0.2, 1), ("R", "U", 0.2, 1),
        ("S", "T", 0.2, 1), ("S", "U", 0.2, 1), ("T", "U", 0.2, 1),
    ], {"candidate_pairs": 26, "dropped_above_u": 1, "dropped_below_l": 15, "pairs_out": 10}),

    # window 2 days. "w": A day 0, B day 2 exactly (gap == window: A→B), C 2 days + 1 µs (A→C is
    # 1 µs too far; B→C is 1 µs apart): N = 3, A→B and B→C at 1/3. "same": E and F at one instant,
    # N = 2: E→F and F→E at 1/2.
    "window_boundary": (events(
        ("w", "A", 0), ("w", "B", 2), ("w", "C", 2 + 1 / 86_400_000_000),
        ("same", "E", 10), ("same", "F", 10),
    ), mining(window_days=2), [("A", "B", 1 / 3, 1), ("B", "C", 1 / 3, 1), ("E", "F", 0.5, 1), ("F", "E", 0.5, 1)],
        {"users_mined": 2, "candidate_pairs": 4}),

    # cap 3, skip: "big" (4 notes) is dropped; "ok" (3 notes, days 0..2) gives H1→H2, H1→H3, H2→H3 at 1/3.
    "heavy_skip": (events(
        *[("big", f"H{i}", i) for i in range(1, 5)], *[("ok", f"H{i}", i) for i in range(1, 4)],
    ), mining(max_notes_per_user=3, heavy_user_policy="skip"),
        [("H1", "H2", 1 / 3, 1), ("H1", "H3", 1 / 3, 1), ("H2", "H3", 1 / 3, 1)],
        {"users": 2, "heavy_users_skipped": 1, "users_mined": 1, "pairs_out": 3}),

    # cap 3, sample, seed 7: "heavy" keeps the 3 notes of the documented rule (HEAVY_KEPT, sorted,
    # which is also their time order); N = 3, so each of its 3 ordered pairs scores 1/3.
    "heavy_sample": (events(*[("heavy", n, d) for d, n in enumerate(HEAVY_NOTES)]),
                     mining(max_notes_per_user=3, heavy_user_policy="sample", seed=7),
                     [(HEAVY_KEPT[0], HEAVY_KEPT[1], 1 / 3, 1), (HEAVY_KEPT[0], HEAVY_KEPT[2], 1 / 3, 1),
                      (HEAVY_KEPT[1], HEAVY_KEPT[2], 1 / 3, 1)],
                     {"users": 1, "heavy_users_sampled": 1, "users_mined": 1, "pairs_out": 3}),
}


def _real_parts() -> dict[str, tuple[pd.DataFrame, MiningConfig]]:
    notes = pd.read_parquet(REPO_ROOT / "data/stackexchange/notes.parquet")
    behaviors = pd.read_parquet(REPO_ROOT / "data/stackexchange/behaviors.parquet")
    _, _, train, test = reference_split(notes, behaviors, test_fraction=0.25)
    sample = DEMO.model_copy(update={"max_notes_per_user": 8, "heavy_user_policy": "sample", "seed": 3})
    return {"real.train": (train, DEMO), "real.test": (test, DEMO), "real.train.sample": (train, sample)}


REAL = _real_parts()


@pytest.fixture(scope="module")
def ray_cluster(services):
    import ray

    if ray.is_initialized():  # a connection an earlier test's pipeline left open
        ray.shutdown()
    ray.init(address=services.ray_address)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mined(ray_cluster):
    """One Ray pipeline run over every hand case and the real data (train, test, train sampled)."""
    return mine_parts_ray({name: (ev, cfg) for name, (ev, cfg, _, _) in CASES.items()} | REAL)


def _as_rows(table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in ("note_id", "related_note_id", "score", "n_users"))))


def _assert_same_pairs(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same rows in the same order; scores within 1e-12."""
    assert len(got) == len(want)
    for col in ("note_id", "related_note_id", "n_users"):
        assert got[col].tolist() == want[col].tolist(), col
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_hand_computed_case(mined, case):
    ev, cfg, expected, counts = CASES[case]
    pairs, stats = mined[case]
    assert pairs.schema == PAIRS_SCHEMA
    rows = _as_rows(pairs)
    assert [r[:2] + (r[3],) for r in rows] == [e[:2] + (e[3],) for e in expected]
    np.testing.assert_allclose([r[2] for r in rows], [e[2] for e in expected], rtol=0, atol=1e-12)
    got = stats.to_dict()
    assert {k: got[k] for k in counts} == counts
    ref_pairs, ref_counts = reference_mine(ev, cfg.window_days, cfg.u, cfg.l, cfg.t, cfg.max_notes_per_user,
                                           cfg.heavy_user_policy, cfg.seed)
    _assert_same_pairs(pairs.to_pandas(), ref_pairs)
    assert got == ref_counts


def test_exact_ties_survive_where_float_sums_differ(mined):
    # the float sums of the tied scores differ; the kept order follows the exact rationals
    assert 1 / 3 + 1 / 4 + 1 / 6 != 1 / 2 + 1 / 4
    assert _as_rows(mined["ties"][0])[0][2] == 0.75


@pytest.mark.parametrize("part", list(REAL))
def test_real_dataset_equals_reference(mined, part):
    ev, cfg = REAL[part]
    pairs, stats = mined[part]
    ref_pairs, ref_counts = reference_mine(ev, cfg.window_days, cfg.u, cfg.l, cfg.t, cfg.max_notes_per_user,
                                           cfg.heavy_user_policy, cfg.seed)
    assert len(ref_pairs) > 1000 if part.endswith("train") else len(ref_pairs) > 100
    _assert_same_pairs(pairs.to_pandas(), ref_pairs)
    assert stats.to_dict() == ref_counts
    s = stats
    assert s.users == s.users_one_note + s.heavy_users_skipped + s.users_mined
    assert s.candidate_pairs == s.dropped_above_u + s.dropped_below_l + s.dropped_top_t + s.pairs_out
    if cfg.heavy_user_policy == "sample":
        assert s.heavy_users_sampled > 10 and s.heavy_users_skipped == 0


def test_one_process_mining_equals_ray(mined):
    for name, (ev, cfg) in REAL.items():
        local, stats = mine_pairs_local(ev, cfg)
        _assert_same_pairs(local, mined[name][0].to_pandas())
        assert stats == mined[name][1]


def test_sampling_and_output_are_deterministic_across_runs(mined):
    parts = {name: REAL[name] for name in ("real.train.sample",)} | {"heavy_sample": CASES["heavy_sample"][:2]}
    again = mine_parts_ray(parts)
    for name in parts:
        assert again[name][0].equals(mined[name][0])
        assert again[name][1] == mined[name][1]


def test_exact_scores_with_a_denominator_beyond_int64():
    # N_i up to 60: lcm(2..60) > 2**63, so scores take the Python-integer path; same semantics.
    rng = np.random.default_rng(0)
    n = 400
    contributions = pd.DataFrame({
        "note_id": pd.array(rng.choice(["a", "b", "c"], n), dtype="str"),
        "related_note_id": pd.array([f"r{i}" for i in rng.integers(0, 40, n)], dtype="str"),
        "n_notes": rng.integers(2, 61, n), "n_users": rng.integers(1, 3, n)})
    got = select_pairs(contributions, u=1.0, l=0.05, t=5)
    exact: dict[tuple[str, str], Fraction] = {}
    users: dict[tuple[str, str], int] = {}
    for a, b, nn, c in contributions.itertuples(index=False):
        exact[(a, b)] = exact.get((a, b), Fraction(0)) + Fraction(int(c), int(nn))
        users[(a, b)] = users.get((a, b), 0) + int(c)
    want = []
    for a in sorted({k[0] for k in exact}):
        cands = sorted((b for (x, b) in exact if x == a and Fraction("0.05") <= exact[(x, b)] <= 1),
                       key=lambda b: (-exact[(a, b)], b))[:5]
        want += [(a, b, float(exact[(a, b)]), users[(a, b)]) for b in cands]
    assert len(want) == 15
    assert list(got.itertuples(index=False, name=None)) == want
    assert len(classify_candidates(contributions, 1.0, 0.05, 5)) == len(exact)


# ------------------------------------------------------------------------- bad input, through the CLI


def _write_ingested(folder, behaviors: pd.DataFrame | None) -> None:
    """``<folder>/ingested/``: the real notes and ``behaviors`` (none: no behaviour file)."""
    ingested = folder / "ingested"
    ingested.mkdir(parents=True)
    pq.write_table(pq.read_table(REPO_ROOT / "data/stackexchange/notes.parquet"), ingested / "notes.parquet")
    if behaviors is not None:
        pq.write_table(pa.Table.from_pandas(behaviors, preserve_index=False), ingested / "behaviors.parquet")


def _run(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    rc = main(["--config", str(REPO_ROOT / "configs/demo.yaml"), f"data.work_dir={tmp_path}", *overrides])
    return rc, capsys.readouterr().err


def _real_behaviors() -> pd.DataFrame:
    return pd.read_parquet(REPO_ROOT / "data/stackexchange/behaviors.parquet")


def test_missing_behaviours_say_to_run_ingest_first(tmp_path, capsys):
    _write_ingested(tmp_path, None)
    rc, err = _run(tmp_path, capsys)
    assert rc == 2
    assert "behaviors.parquet does not exist" in err and "pipelines.ingest" in err
    assert not (tmp_path / "pairs").exists()


def test_empty_behaviours_are_refused(tmp_path, capsys):
    _write_ingested(tmp_path, _real_behaviors().iloc[:0])
    rc, err = _run(tmp_path, capsys)
    assert rc == 2 and "behaviors.parquet has no rows" in err
    assert not (tmp_path / "pairs").exists()


def test_unknown_note_ids_are_refused_with_rows(tmp_path, capsys):
    b = _real_behaviors()
    b.loc[[7, 9], "note_id"] = ["nope:1", "nope:2"]
    _write_ingested(tmp_path, b)
    rc, err = _run(tmp_path, capsys)
    assert rc == 2
    assert "2 of 20039 behaviour rows" in err and "row 7 note_id 'nope:1'" in err and "row 9" in err
    assert not (tmp_path / "pairs").exists()


def test_users_with_one_note_each_give_a_no_pairs_error(ray_cluster, tmp_path, capsys):
    b = _real_behaviors().drop_duplicates("user_id")  # every user keeps one event
    _write_ingested(tmp_path, b)
    rc, err = _run(tmp_path, capsys)
    assert rc == 2
    _, _, train, _ = reference_split(pd.read_parquet(REPO_ROOT / "data/stackexchange/notes.parquet"), b, 0.25)
    users = train["user_id"].nunique()
    assert (f"no train pairs mined: {len(train)} events from {users} users; "
            f"{users} users engaged with one note only") in err
    assert "mining.max_notes_per_user" in err
    assert not (tmp_path / "pairs").exists()


def test_a_window_too_small_gives_a_no_pairs_error_naming_the_key(ray_cluster, tmp_path, capsys):
    _write_ingested(tmp_path, _real_behaviors())
    rc, err = _run(tmp_path, capsys, "mining.window_days=1e-9")
    assert rc == 2
    assert "no train pairs mined" in err and "raise mining.window_days" in err and "0 candidate pairs" in err
    assert not (tmp_path / "pairs").exists()
