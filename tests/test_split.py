"""The time split (cutoffs, note and behaviour routing, test pool) and the mine_pairs stage as a Ray job."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from reference_mining import reference_mine, reference_split

from notellm.config import REPO_ROOT, SplitConfig, load_config
from notellm.mining import MiningInputError
from notellm.split import (
    assign_splits,
    category_cutoffs,
    check_pairs_within_split,
    evaluation_pool,
    split_behaviors,
)
from pipelines.ingest import ingest

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def day(d: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(days=d)


def hand_notes() -> pd.DataFrame:
    # "a": days 0, 30, 75, 100 -> cutoff day 0 + 0.75 * 100 = 75: a0, a30 train; a75 (at the cutoff), a100 test.
    # "b": one note -> cutoff = its own time, so it is a test note.
    rows = [("a0", "a", 0), ("a30", "a", 30), ("a75", "a", 75), ("a100", "a", 100), ("b5", "b", 5)]
    return pd.DataFrame({"note_id": [r[0] for r in rows], "category": [r[1] for r in rows],
                         "created_at": pd.DatetimeIndex([day(r[2]) for r in rows]).as_unit("us")})


def test_cutoff_per_category_and_notes_at_the_cutoff_are_test_notes():
    notes = hand_notes()
    cutoffs = category_cutoffs(notes, SplitConfig(test_fraction=0.25)).set_index("category")["cutoff"]
    assert cutoffs["a"] == day(75) and cutoffs["b"] == day(5)
    split = assign_splits(notes, SplitConfig(test_fraction=0.25)).set_index("note_id")["split"]
    assert split.to_dict() == {"a0": "train", "a30": "train", "a75": "test", "a100": "test", "b5": "test"}


def test_global_cutoff_replaces_the_per_category_ones():
    notes = hand_notes()
    cfg = SplitConfig(cutoff="2024-01-06T00:00:00")  # no offset: UTC; day 5
    assert set(category_cutoffs(notes, cfg)["cutoff"]) == {day(5)}
    split = assign_splits(notes, cfg).set_index("note_id")["split"]
    assert split.to_dict() == {"a0": "train", "a30": "test", "a75": "test", "a100": "test", "b5": "test"}
    with pytest.raises(MiningInputError, match="split.cutoff 'last tuesday'"):
        category_cutoffs(notes, SplitConfig(cutoff="last tuesday"))


def test_real_cutoffs_and_splits_match_the_reference():
    notes = pd.read_parquet(REPO_ROOT / "data/stackexchange/notes.parquet")
    behaviors = pd.read_parquet(REPO_ROOT / "data/stackexchange/behaviors.parquet")
    ref_cutoffs, ref_split, ref_train, ref_test = reference_split(notes, behaviors, 0.25)
    cutoffs = category_cutoffs(notes, SplitConfig(test_fraction=0.25))
    assert len(cutoffs) == 8
    assert {c: t.to_pydatetime() for c, t in zip(cutoffs["category"], cutoffs["cutoff"])} == ref_cutoffs
    notes_split = assign_splits(notes, SplitConfig(test_fraction=0.25))
    assert notes_split["note_id"].is_unique and len(notes_split) == len(notes)
    assert dict(zip(notes_split["note_id"], notes_split["split"])) == ref_split
    events = split_behaviors(behaviors, notes_split)
    assert events["train"].equals(ref_train.reset_index(drop=True))
    assert events["test"].equals(ref_test.reset_index(drop=True))
    # every category has notes on both sides of its cutoff
    per_cat = notes_split.groupby("category")["split"].nunique()
    assert (per_cat == 2).all()


def test_behaviours_are_routed_by_note_split_and_cutoff():
    notes_split = assign_splits(hand_notes(), SplitConfig(test_fraction=0.25))
    behaviors = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u2"],
        "note_id": ["a0", "a30", "a100", "a75", "a0"],
        # a0 before the cutoff: train; a30 engaged after the cutoff (day 80): dropped;
        # a100 / a75 are test notes: kept whatever their time (even day 1); a0 on day 75: dropped.
        "ts": pd.DatetimeIndex([day(10), day(80), day(1), day(101), day(75)]).as_unit("us"),
    })
    events = split_behaviors(behaviors, notes_split)
    assert events["train"][["user_id", "note_id"]].values.tolist() == [["u1", "a0"]]
    assert events["test"][["user_id", "note_id"]].values.tolist() == [["u1", "a100"], ["u2", "a75"]]


def test_unknown_note_ids_are_refused_naming_rows():
    notes_split = assign_splits(hand_notes(), SplitConfig())
    behaviors = pd.DataFrame({"user_id": ["u"] * 3, "note_id": ["a0", "zz", "a30"],
                              "ts": pd.DatetimeIndex([day(1)] * 3).as_unit("us")})
    with pytest.raises(MiningInputError, match=r"b.parquet: 1 of 3 behaviour rows .*row 1 note_id 'zz'"):
        split_behaviors(behaviors, notes_split, source="b.parquet")


def test_test_pool_excludes_train_pair_notes_and_pairs_stay_in_their_split():
    notes_split = assign_splits(hand_notes(), SplitConfig(test_fraction=0.25))
    train_pairs = pd.DataFrame({"note_id": ["a0"], "related_note_id": ["a30"]})
    assert sorted(evaluation_pool(notes_split, train_pairs)) == ["a100", "a75", "b5"]
    check_pairs_within_split(notes_split, train_pairs, "train")
    leaking = pd.DataFrame({"note_id": ["a0"], "related_note_id": ["a75"]})
    with pytest.raises(AssertionError, match="test notes appear in training pairs"):
        evaluation_pool(notes_split, leaking)
    with pytest.raises(AssertionError, match="related_note_id outside the train split"):
        check_pairs_within_split(notes_split, leaking, "train")


@pytest.mark.slow
def test_mine_pairs_runs_as_a_ray_job_and_logs_to_mlflow(services, submit_stage, tmp_path):
    cfg = load_config(REPO_ROOT / "configs/demo.yaml", [f"data.work_dir={tmp_path}"])
    ingest(cfg)
    proc = submit_stage("pipelines.mine_pairs", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "train pairs" in proc.stdout and "cardano" in proc.stdout  # the per-category summary

    out = tmp_path / "pairs"
    notes_split = pd.read_parquet(out / "notes_split.parquet")
    pairs = {s: pd.read_parquet(out / f"{s}.parquet") for s in ("train", "test")}
    stats = json.loads((out / "stats.json").read_text())

    notes = pd.read_parquet(tmp_path / "ingested/notes.parquet")
    behaviors = pd.read_parquet(tmp_path / "ingested/behaviors.parquet")
    ref_cutoffs, ref_split, ref_train, ref_test = reference_split(notes, behaviors, cfg.split.test_fraction)
    assert dict(zip(notes_split["note_id"], notes_split["split"])) == ref_split
    assert {c: dt.datetime.fromisoformat(t) for c, t in stats["cutoffs"].items()} == ref_cutoffs

    split_of = dict(zip(notes_split["note_id"], notes_split["split"]))
    m = cfg.mining
    for split, ref_events in (("train", ref_train), ("test", ref_test)):
        got = pairs[split]
        assert len(got) > 0
        # pairs never cross splits
        assert {split_of[n] for n in got["note_id"]} | {split_of[n] for n in got["related_note_id"]} == {split}
        want, counts = reference_mine(ref_events, m.window_days, m.u, m.l, m.t, m.max_notes_per_user,
                                      m.heavy_user_policy, m.seed)
        assert got[["note_id", "related_note_id", "n_users"]].equals(want[["note_id", "related_note_id", "n_users"]])
        np.testing.assert_allclose(got["score"], want["score"], rtol=0, atol=1e-12)
        assert {k: stats["splits"][split][k] for k in counts} == counts
        category = got["note_id"].map(dict(zip(notes_split["note_id"], notes_split["category"])))
        assert stats["splits"][split]["pairs_per_category"] == {
            c: int((category == c).sum()) for c in sorted(notes_split["category"].unique())}

    # the test pool (test notes) holds no note of a training pair
    train_notes = set(pairs["train"]["note_id"]) | set(pairs["train"]["related_note_id"])
    pool = set(notes_split.loc[notes_split["split"] == "test", "note_id"])
    assert stats["test_pool_notes"] == len(pool) > 0 and not pool & train_notes

    run_id = next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("MLflow run "))
    metrics = MlflowClient(services.mlflow_url).get_run(run_id).data.metrics
    assert metrics["train.pairs_out"] == len(pairs["train"]) and metrics["test.pairs_out"] == len(pairs["test"])
    assert metrics["test.pairs.cardano"] == stats["splits"]["test"]["pairs_per_category"]["cardano"]
