"""Evaluation metrics (notellm.metrics) against values computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from notellm.metrics import (
    MetricInputError,
    category_accuracy,
    exposure_slices,
    hashtag_scores,
    illegal_rate,
    ks_for_pool,
    mrr,
    recall_at_k,
    recall_difference,
    retrieval_report,
    truth_ranks,
)

PAPER_FRACTIONS = [100 / 257_937, 1_000 / 257_937, 10_000 / 257_937, 100_000 / 257_937]

# Four test pairs over the pool {q1, q2, q3, a, b, c}; each ranking is the pool minus its query,
# truncated here to three candidates for readability where it does not matter.
#   pair 0: q1 -> a, ranking [a, b, c]      rank 1
#   pair 1: q1 -> c, ranking [a, b, c]      rank 3   (same query, second ground truth: counts again)
#   pair 2: q2 -> b, ranking [c, b, a]      rank 2
#   pair 3: q3 -> q2, ranking [a, b, c]     absent   (rank 0: a miss at every K)
QUERIES = ["q1", "q1", "q2", "q3"]
TRUTH = ["a", "c", "b", "q2"]
RANKED = [["a", "b", "c"], ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def test_truth_ranks_and_recall_by_hand():
    assert truth_ranks(RANKED, TRUTH).tolist() == [1, 3, 2, 0]
    # Recall@1: pair 0 only -> 1/4; @2: pairs 0, 2 -> 2/4; @3: pairs 0, 1, 2 -> 3/4.
    assert recall_at_k(RANKED, TRUTH, [1, 2, 3], queries=QUERIES) == {1: 0.25, 2: 0.5, 3: 0.75}
    # A 2-D array of ids gives the same answer as lists.
    assert recall_at_k(np.array(RANKED), np.array(TRUTH), [1, 2, 3]) == {1: 0.25, 2: 0.5, 3: 0.75}


def test_mrr_by_hand():
    # (1/1 + 1/3 + 1/2 + 0) / 4 = (11/6) / 4 = 11/24; the absent truth contributes 0.
    assert mrr(RANKED, TRUTH) == pytest.approx(11 / 24)
    # MRR@2: the rank-3 hit no longer counts: (1 + 1/2) / 4 = 3/8.
    assert mrr(RANKED, TRUTH, cutoff=2) == pytest.approx(3 / 8)


def test_retrieval_input_errors():
    with pytest.raises(MetricInputError, match="truth is empty"):
        recall_at_k([], [], [1])
    with pytest.raises(MetricInputError, match="3 rankings but truth has 4"):
        recall_at_k(RANKED[:3], TRUTH, [1])
    with pytest.raises(MetricInputError, match="contains the query itself"):
        recall_at_k([["q1", "a"]], ["a"], [1], queries=["q1"])
    with pytest.raises(MetricInputError, match="its own query"):
        recall_at_k([["a"]], ["q1"], [1], queries=["q1"])
    with pytest.raises(MetricInputError, match="exceeds the ranking depth 3"):
        recall_at_k(RANKED, TRUTH, [10], depth=3)
    with pytest.raises(MetricInputError, match=">= 1"):
        recall_at_k(RANKED, TRUTH, [0])


def test_ks_for_pool_covers_the_paper_fractions():
    # 600 notes: 100/257937*600 = 0.23 -> at least 1; 1k: 2.33 -> 2; 10k: 23.3 -> 23; 100k: 232.6 -> 233.
    assert ks_for_pool(600, PAPER_FRACTIONS, [1, 10, 100]) == {
        "1": 1, "10": 10, "100": 100, "pct0.0388": 1, "pct0.388": 2, "pct3.88": 23, "pct38.8": 233}
    # 5000 notes: 1.94 -> 2; 19.4 -> 19; 193.8 -> 194; 500000000/257937 = 1938.46 -> 1938.
    assert list(ks_for_pool(5000, PAPER_FRACTIONS, [1, 10, 100]).values()) == [1, 10, 100, 2, 19, 194, 1938]
    # 50 notes: every K is capped at the 49 candidates a query has; labels stay (stable names).
    small = ks_for_pool(50, PAPER_FRACTIONS, [1, 10, 100])
    assert small["100"] == 49 and small["pct38.8"] == 19 and len(small) == 7
    with pytest.raises(MetricInputError, match="pool_size must be >= 2"):
        ks_for_pool(1, PAPER_FRACTIONS, [1])
    with pytest.raises(MetricInputError, match="pool fraction"):
        ks_for_pool(100, [1.5], [1])


def test_exposure_slices_by_hand_and_ties():
    # Pool counts [1, 1, 2, 5, 10]: 25 % quantile at position 0.25*4 = 1 -> 1; 75 % at position 3 -> 5.
    counts = {"a": 1, "b": 1, "c": 2, "d": 5, "e": 10}
    s = exposure_slices(counts, ["a", "c", "d", "e", "b"])
    assert (s.low_threshold, s.high_threshold) == (1.0, 5.0)
    assert s.low.tolist() == [True, False, False, False, True]
    assert s.high.tolist() == [False, False, True, True, False]
    # All counts tied: both thresholds are 3; every note is low, none high (slices never overlap).
    tied = exposure_slices({"a": 3, "b": 3, "c": 3}, ["a", "b"])
    assert tied.low.tolist() == [True, True] and tied.high.tolist() == [False, False]
    with pytest.raises(MetricInputError, match="no engagement count"):
        exposure_slices(counts, ["zz"])
    with pytest.raises(MetricInputError, match="low_q < high_q"):
        exposure_slices(counts, ["a"], low_q=0.8, high_q=0.2)


def test_retrieval_report_names_values_and_slices():
    pool = ["q1", "q2", "q3", "a", "b", "c"]
    # Complete global rankings (pool minus query): truth ranks 1, 3, 2, 2.
    ranked = [["a", "b", "c", "q2", "q3"], ["b", "a", "c", "q2", "q3"],
              ["c", "b", "a", "q1", "q3"], ["a", "q2", "b", "c", "q1"]]
    # Within-category rankings, categories {q1, a, b} and {q2, q3, c}: the truths of pair 1 (q1 -> c)
    # and pair 2 (q2 -> b) are in the other category, so they are never candidates there.
    cat_ranked = [["a", "b"], ["a", "b"], ["q3", "c"], ["q2", "c"]]
    slices = exposure_slices({"q1": 1, "q2": 9, "q3": 1, "a": 1, "b": 5, "c": 9}, TRUTH)
    # Pool counts [1,1,1,5,9,9]: 25 % -> 1, 75 % -> position 3.75 -> 5 + 0.75*4 = 8;
    # truths a(1) c(9) b(5) q2(9).
    assert slices.low.tolist() == [True, False, False, False]
    assert slices.high.tolist() == [False, True, False, True]
    report = retrieval_report(ranked, TRUTH, QUERIES, pool, fractions=PAPER_FRACTIONS, plain_ks=[1, 2],
                              cat_ranked=cat_ranked, slices=slices)
    m = report.metrics
    assert report.ks["pct38.8"] == 2  # 0.388 * 6 = 2.3 -> 2
    assert m["recall_at_1"] == 0.25 and m["recall_at_2"] == 0.75 and m["recall_at_pct38.8"] == 0.75
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    # Within category: ranks 1, 0, 0, 1 -> @1: 2/4, @2: 2/4; MRR (1 + 0 + 0 + 1) / 4.
    assert m["cat_recall_at_1"] == 0.5 and m["cat_recall_at_2"] == 0.5
    assert m["cat_mrr"] == pytest.approx(2 / 4)
    # Low slice = pair 0 (rank 1); high slice = pairs 1 (rank 3) and 3 (rank 2).
    assert m["recall_at_1_low_exposure"] == 1.0
    assert m["recall_at_1_high_exposure"] == 0.0 and m["recall_at_2_high_exposure"] == 0.5
    assert m["cat_recall_at_1_high_exposure"] == 0.5  # cat ranks 0 and 1
    assert report.counts == {"pairs": 4, "queries": 3, "pool_size": 6, "cat_truth_not_candidate": 2,
                             "low_exposure_pairs": 1, "high_exposure_pairs": 2}
    assert all(0 <= v <= 1 for v in m.values())
    with pytest.raises(MetricInputError, match="not in the test pool"):
        retrieval_report(ranked, ["a", "c", "b", "zz"], QUERIES, pool, fractions=[], plain_ks=[1])


def test_empty_slice_is_nan():
    pool = ["q", "a", "b"]
    slices = exposure_slices({"q": 1, "a": 1, "b": 1}, ["a"])  # all tied: nothing is high
    report = retrieval_report([["a", "b"]], ["a"], ["q"], pool, fractions=[], plain_ks=[1], slices=slices)
    assert report.metrics["recall_at_1_low_exposure"] == 1.0
    assert math.isnan(report.metrics["recall_at_1_high_exposure"])


def test_category_accuracy_and_illegal_rate():
    # " Python" == "python" and "java" == "Java " after strip + casefold; "rust" != "go": 2/3.
    assert category_accuracy([" Python", "java", "rust"], ["python", "Java ", "go"]) == pytest.approx(2 / 3)
    # "cobol" is outside the closed set; "Rust " is inside after normalisation: 1/3.
    assert illegal_rate(["python", "cobol", "Rust "], {"Python", "Rust", "Go"}) == pytest.approx(1 / 3)
    with pytest.raises(MetricInputError, match="no category predictions"):
        category_accuracy([], [])
    with pytest.raises(MetricInputError, match="2 category predictions but 1 gold"):
        category_accuracy(["a", "b"], ["a"])


def test_hashtag_bleu_and_rouge_by_hand():
    same = hashtag_scores([["python", "pandas", "numpy", "scipy"]], [["python", "pandas", "numpy", "scipy"]])
    assert same == pytest.approx({"bleu4": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    disjoint = hashtag_scores([["rust", "cargo", "go"]], [["python", "pandas", "numpy"]])
    assert disjoint["rouge1"] == 0.0 and disjoint["rouge2"] == 0.0 and disjoint["rougeL"] == 0.0
    # BLEU sees the "," separators: [rust , cargo , go] vs [python , pandas , numpy] share 2 of 5
    # 1-grams and no longer n-gram; exp smoothing sets the zero precisions to 1/(2*4), 1/(4*3),
    # 1/(8*2): BLEU = (2/5 * 1/8 * 1/12 * 1/16)^(1/4) = 0.12703 for disjoint tags (documented).
    assert disjoint["bleu4"] == pytest.approx((2 / 5 * 1 / 8 * 1 / 12 * 1 / 16) ** 0.25, abs=1e-5)
    # Partial: hyp "python, pandas, scipy" vs ref "python, pandas, numpy"; 13a tokens:
    #   [python , pandas , scipy] vs [python , pandas , numpy] (5 tokens each, brevity penalty 1)
    #   1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2 -> BLEU = (4/5*3/4*2/3*1/2)^(1/4) = 0.2^0.25.
    # ROUGE tokens [python pandas scipy] vs [python pandas numpy]: R1 F1 2/3, R2 (1 of 2 bigrams) 1/2,
    #   RL: LCS 2 -> 2/3.
    partial = hashtag_scores([["python", "pandas", "scipy"]], [["python", "pandas", "numpy"]])
    assert partial["bleu4"] == pytest.approx(0.2 ** 0.25, abs=1e-4)
    assert partial["rouge1"] == pytest.approx(2 / 3) and partial["rouge2"] == pytest.approx(1 / 2)
    assert partial["rougeL"] == pytest.approx(2 / 3)
    # Unequal lengths: hyp [python] vs ref [python pandas]: P 1, R 1/2 -> F1 2/3 (F1, not P or R).
    shorter = hashtag_scores([["python"]], [["python", "pandas"]])
    assert shorter["rouge1"] == pytest.approx(2 / 3) and shorter["rougeL"] == pytest.approx(2 / 3)
    # ROUGE is a mean over notes: (1 + 2/3) / 2.
    both = hashtag_scores([["a1", "b2"], ["python", "pandas", "scipy"]],
                          [["a1", "b2"], ["python", "pandas", "numpy"]])
    assert both["rouge1"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(MetricInputError, match="list of strings"):
        hashtag_scores(["python"], [["python"]])
    with pytest.raises(MetricInputError, match="no hashtag predictions"):
        hashtag_scores([], [])


def test_recall_difference_point_value_and_interval_by_hand():
    a = np.array([1, 5, 20, 0, 3, 50])  # hits at K=10: 1, 1, 0, 0, 1, 0
    b = np.array([2, 30, 4, 7, 0, 50])  # hits at K=10: 1, 0, 1, 1, 0, 0
    d = recall_difference(a, b, 10, [f"q{i}" for i in range(6)], n_boot=500, seed=1)
    assert d.diff == pytest.approx(3 / 6 - 3 / 6) and d.groups == 6 and d.n_boot == 500
    assert d.low < 0 < d.high and not d.significant
    same = recall_difference(a, a, 10, list("abcdef"))
    assert (same.diff, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)


def test_recall_difference_resamples_queries_not_pairs():
    """Pairs of one query move together: 10 queries x 20 pairs is as uncertain as 10 pairs, not 200."""
    rng = np.random.default_rng(0)
    per_query_a = rng.integers(0, 2, size=10)  # a finds all pairs of a query or none
    a = np.repeat(np.where(per_query_a == 1, 1, 50), 20)
    b = np.full(200, 50)
    by_query = recall_difference(a, b, 10, np.repeat(np.arange(10), 20), seed=0)
    by_pair = recall_difference(a, b, 10, np.arange(200), seed=0)
    assert by_query.diff == by_pair.diff == pytest.approx(per_query_a.mean())
    assert by_query.groups == 10 and by_pair.groups == 200
    assert (by_query.high - by_query.low) > 3 * (by_pair.high - by_pair.low)


def test_recall_difference_interval_covers_a_zero_difference_about_95_percent():
    """Two methods with the same hit rate on 300 queries: the 95 % interval holds 0 in ~95 % of trials."""
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(200):
        a = np.where(rng.random(300) < 0.2, 1, 50)
        b = np.where(rng.random(300) < 0.2, 1, 50)
        d = recall_difference(a, b, 10, np.arange(300), n_boot=400, seed=trial)
        covered += d.low <= 0 <= d.high
    assert 0.89 <= covered / 200 <= 0.99


def test_recall_difference_same_interval_in_blocks(monkeypatch):
    import notellm.metrics as metrics

    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 40, size=500), rng.integers(0, 40, size=500)
    groups = rng.integers(0, 120, size=500)
    whole = recall_difference(a, b, 10, groups, n_boot=300, seed=5)
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_CELLS", 7 * 120)  # blocks of 7 replicates
    assert recall_difference(a, b, 10, groups, n_boot=300, seed=5) == whole


def test_recall_difference_refuses_bad_input():
    with pytest.raises(MetricInputError, match="ranks_a has 3 pairs, ranks_b 2"):
        recall_difference(np.array([1, 2, 3]), np.array([1, 2]), 10, ["a", "b", "c"])
    with pytest.raises(MetricInputError, match="groups has 1 labels but there are 2 pairs"):
        recall_difference(np.array([1, 2]), np.array([1, 2]), 10, ["a"])
    with pytest.raises(MetricInputError, match="K must be >= 1"):
        recall_difference(np.array([1, 2]), np.array([1, 2]), 0, ["a", "b"])
