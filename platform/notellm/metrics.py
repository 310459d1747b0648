"""Evaluation metrics of method.md section 5, as pure functions.

Retrieval
---------
An evaluation set is a list of *test pairs* ``(query, truth)``: the first note of a test pair is
the query, the second its ground truth. For each pair the retriever returns ``ranked``: the
candidate note ids of the query, best first, *without the query itself* (global retrieval: the
whole test pool minus the query; within-category retrieval: the query's category minus the
query). A query with several ground truths appears once per pair, so every pair counts once.

* ``rank`` of a pair: the 1-based position of ``truth`` in ``ranked``; 0 when absent (the truth
  is not among the candidates, or the list was truncated before it).
* Recall@K = mean over pairs of ``1[0 < rank <= K]``.
* MRR = mean over pairs of ``1 / rank`` (0 when ``rank == 0`` or ``rank > cutoff``).
* Comparing two methods: ``recall_difference`` gives Recall@K(a) - Recall@K(b) with a paired
  bootstrap interval that resamples queries (clusters of pairs), so "a beats b" can be told
  apart from test-set noise.

A ranked list shorter than K is read as the *whole* candidate list: the truth is a hit iff it
appears anywhere in it. Callers that truncate rankings (top-``depth`` search) pass ``depth`` and
are refused any K above it, since a miss beyond ``depth`` would be counted as a miss silently.

Metric names are MLflow-safe (MLflow allows only ``[/\\w.\\- :]``, so no ``@`` or ``%``):
``recall_at_10``, ``recall_at_pct0.388``, ``cat_recall_at_10``, ``mrr``, ``cat_mrr``,
``recall_at_100_low_exposure``, ... Values are fractions in [0, 1] (NaN for an empty slice).

Generation
----------
* Category: accuracy = share of notes whose generated category equals the gold one after
  ``normalize_category`` (strip, casefold); Ill. = share of generated categories that are not in
  the closed category set (same normalisation).
* Hashtags: each note's hashtag list is joined with ``", "`` into one string (``HASHTAG_JOINER``).
  BLEU-4 is sacrebleu's corpus BLEU over notes (one reference per note, the ``13a`` tokenizer,
  which splits punctuation so the ``,`` separators are tokens; default ``exp`` smoothing),
  divided by 100. The separators match too, so disjoint 3-tag lists still score ~0.13, and a
  corpus whose hypotheses all have fewer than 4 tokens scores 0 (no 4-gram at all).
  ROUGE-1/2/L are rouge_score F1 per note, averaged over notes; rouge_score's
  default tokenizer lowercases and keeps only ``[a-z0-9]`` runs (the separators and ``-``/``+``
  become spaces; non-Latin scripts are dropped, so these scores are only meaningful for Latin-script
  hashtags), no stemming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

PAPER_POOL_SIZE = 257_937
"""Notes in the paper's test pool (its Recall@K uses K = 100, 1k, 10k, 100k on it)."""

PAPER_KS = (100, 1_000, 10_000, 100_000)
"""The paper's K values; ``PAPER_KS[i] / PAPER_POOL_SIZE`` are the default pool fractions."""

DEFAULT_LOW_QUANTILE = 0.25
"""Low-exposure slice: ground truths whose engagement count is <= this quantile of the pool's."""

DEFAULT_HIGH_QUANTILE = 0.75
"""High-exposure slice: ground truths whose engagement count is >= this quantile of the pool's."""

HASHTAG_JOINER = ", "
"""How a note's hashtag list becomes the one string BLEU/ROUGE compare."""

BLEU_TOKENIZER = "13a"
"""sacrebleu tokenizer (its default: mteval-v13a, splits punctuation off words)."""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
"""rouge_score metrics reported (``rougeL``: sentence-level LCS, no newline splitting)."""

BOOTSTRAP_BLOCK_CELLS = 4_000_000
"""``recall_difference`` draws its replicates in blocks of at most this many (replicate, query)
counts (32 MB of int64), so a 258k-query evaluation does not need one 2000 x 258k matrix."""


class MetricInputError(ValueError):
    """Inputs to a metric are inconsistent (lengths, empty sets, unknown ids); the message says which."""


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------

Ranking = Sequence[Sequence[str]] | np.ndarray
"""Per pair, candidate ids best first: a list of lists (lengths may differ) or a 2-D array
``(n_pairs, L)`` of ids (str or int, compared with ``==`` against ``truth``)."""


def _check_pairs(ranked: Ranking, truth: Sequence[str] | np.ndarray, what: str = "ranked") -> int:
    n = len(truth)
    if n == 0:
        raise MetricInputError("no test pairs: truth is empty (recall/MRR of nothing is undefined)")
    if len(ranked) != n:
        raise MetricInputError(f"{what} has {len(ranked)} rankings but truth has {n} pairs")
    return n


def truth_ranks(
    ranked: Ranking,
    truth: Sequence[str] | np.ndarray,
    queries: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """1-based rank of each pair's ground truth in its ranking; 0 when absent.

    ranked: ``n_pairs`` rankings (see ``Ranking``); truth: ``(n_pairs,)`` ids. When ``queries``
    ``(n_pairs,)`` is given, a ranking that contains its own query or a pair whose truth equals
    its query raises ``MetricInputError`` (the query must be excluded from its candidates).
    Returns int64 ``(n_pairs,)``.
    """
    n = _check_pairs(ranked, truth)
    if queries is not None and len(queries) != n:
        raise MetricInputError(f"queries has {len(queries)} ids but truth has {n} pairs")
    ranks = np.zeros(n, dtype=np.int64)
    for i in range(n):
        row = ranked[i]
        if queries is not None:
            if truth[i] == queries[i]:
                raise MetricInputError(f"pair {i}: truth {truth[i]!r} is its own query")
            if _position(row, queries[i]) >= 0:
                raise MetricInputError(
                    f"pair {i}: the ranking of query {queries[i]!r} contains the query itself "
                    "(rank the pool minus the query)"
                )
        ranks[i] = _position(row, truth[i]) + 1
    return ranks


def _position(row: Sequence[str] | np.ndarray, item: str) -> int:
    """0-based index of ``item`` in ``row``, -1 when absent."""
    if isinstance(row, np.ndarray):
        hits = np.flatnonzero(row == item)
        return int(hits[0]) if hits.size else -1
    try:
        return (row if isinstance(row, list) else list(row)).index(item)
    except ValueError:
        return -1


def _check_ks(ks: Sequence[int], depth: int | None) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks:
        raise MetricInputError("ks is empty: ask for at least one K")
    if any(k < 1 for k in ks):
        raise MetricInputError(f"every K must be >= 1, got {ks}")
    if depth is not None and max(ks) > depth:
        raise MetricInputError(
            f"K={max(ks)} exceeds the ranking depth {depth}: a truth ranked below {depth} would "
            "count as a miss; retrieve deeper or ask for smaller K"
        )
    return ks


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int], depth: int | None = None) -> dict[int, float]:
    """Recall@K for each K from ``truth_ranks`` output (int ``(n_pairs,)``, 0 = absent)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise MetricInputError("no test pairs: recall of nothing is undefined")
    return {k: float(np.mean(_hits(ranks, k))) for k in _check_ks(ks, depth)}


def _hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """bool ``(n_pairs,)``: the truth is among the top ``k`` (rank 0 = absent, never a hit)."""
    return (ranks > 0) & (ranks <= k)


def recall_at_k(
    ranked: Ranking,
    truth: Sequence[str] | np.ndarray,
    ks: Sequence[int],
    *,
    queries: Sequence[str] | np.ndarray | None = None,
    depth: int | None = None,
) -> dict[int, float]:
    """Recall@K: share of test pairs whose ground truth is in the top K of the query's ranking.

    ranked: ``n_pairs`` rankings of candidate ids (the pool minus the query), best first;
    truth: ``(n_pairs,)`` ground-truth ids, one per pair (a query with several ground truths is
    repeated, once per pair). A truth absent from its ranking is a miss. ``depth``: the length
    rankings were truncated to (None: rankings are complete candidate lists), K > depth raises.
    ``queries``: checked as in ``truth_ranks``. Returns ``{K: recall}`` with values in [0, 1].
    """
    return recall_from_ranks(truth_ranks(ranked, truth, queries), ks, depth)


def mrr_from_ranks(ranks: np.ndarray, cutoff: int | None = None) -> float:
    """Mean reciprocal rank from ``truth_ranks`` output; ``1/rank`` counts 0 when the truth is
    absent (rank 0) or ranked below ``cutoff``."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise MetricInputError("no test pairs: MRR of nothing is undefined")
    if cutoff is not None and cutoff < 1:
        raise MetricInputError(f"MRR cutoff must be >= 1, got {cutoff}")
    hit = ranks > 0
    if cutoff is not None:
        hit &= ranks <= cutoff
    reciprocal = np.where(hit, 1.0 / np.maximum(ranks, 1), 0.0)
    return float(reciprocal.mean())


def mrr(
    ranked: Ranking,
    truth: Sequence[str] | np.ndarray,
    cutoff: int | None = None,
    *,
    queries: Sequence[str] | np.ndarray | None = None,
) -> float:
    """Mean reciprocal rank over test pairs: mean of ``1 / rank(truth)``.

    A pair contributes 0 when its truth is not in the ranked list (so truncated rankings give a
    lower bound) or, with ``cutoff``, when it is ranked below ``cutoff`` (MRR@cutoff).
    """
    return mrr_from_ranks(truth_ranks(ranked, truth, queries), cutoff)


@dataclass(frozen=True)
class RecallDifference:
    """Recall@K of method a minus method b on the same test pairs, with a bootstrap interval.

    diff/low/high: fractions in [-1, 1] (point estimate and the ``level`` percentile interval);
    groups: resampled clusters (distinct queries); significant: the interval excludes 0.
    """

    diff: float
    low: float
    high: float
    level: float
    groups: int
    n_boot: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def recall_difference(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    k: int,
    groups: Sequence[str] | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> RecallDifference:
    """Paired cluster bootstrap of Recall@K(a) - Recall@K(b).

    ranks_a/ranks_b: ``truth_ranks`` of two methods on the same ``n_pairs`` test pairs (int,
    0 = absent); groups: ``(n_pairs,)`` cluster labels, normally the query ids (the pairs of one
    query share its embedding and ranking, so they are not independent). Each replicate draws
    as many groups as there are, with replacement, and recomputes the difference over all pairs
    of the drawn groups (both methods on the same draw: paired). The interval is the percentile
    interval of ``n_boot`` replicates; ``seed`` makes it reproducible.
    """
    a = np.asarray(ranks_a, dtype=np.int64)
    b = np.asarray(ranks_b, dtype=np.int64)
    n = len(a)
    if n == 0 or len(b) != n:
        raise MetricInputError(f"need the same test pairs for both methods: ranks_a has {n} pairs, "
                               f"ranks_b {len(b)}")
    if len(groups) != n:
        raise MetricInputError(f"groups has {len(groups)} labels but there are {n} pairs")
    if n_boot < 1 or not (0 < level < 1):
        raise MetricInputError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    (k,) = _check_ks([k], None)
    delta = _hits(a, k).astype(np.float64) - _hits(b, k).astype(np.float64)
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    delta_sum = np.bincount(group_index, weights=delta, minlength=n_groups)
    size = np.bincount(group_index, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    block = max(1, BOOTSTRAP_BLOCK_CELLS // n_groups)  # replicates per draw matrix: bounded memory
    for start in range(0, n_boot, block):
        count = min(block, n_boot - start)
        draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=count)  # (count, n_groups)
        replicates[start:start + count] = (draws @ delta_sum) / (draws @ size)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return RecallDifference(diff=float(delta.mean()), low=float(low), high=float(high), level=level,
                            groups=n_groups, n_boot=n_boot)


def _pct_label(fraction: float) -> str:
    return "pct" + format(100.0 * fraction, ".3g")


def ks_for_pool(
    pool_size: int, fractions: Sequence[float], plain_ks: Sequence[int]
) -> dict[str, int]:
    """Labelled K values for a pool of ``pool_size`` notes (each query ranks ``pool_size - 1``).

    * plain K (method.md: 1, 10, 100): label ``str(K)`` (metric ``recall_at_10``);
    * each pool fraction f (the paper's K / 257,937 by default): K = round(f * pool_size)
      (Python's round, halves to even), at least 1; label ``"pct"`` + 3 significant digits of
      100*f (``100/257937`` -> ``pct0.0388``, the paper's R@100; ``pct0.388`` R@1k;
      ``pct3.88`` R@10k; ``pct38.8`` R@100k).

    Every K is capped at ``pool_size - 1`` (a ranking holds at most that many candidates; asking
    for more would not change the recall). Labels are never dropped, so metric names are stable
    across pools even when two labels map to the same K (recall is computed once per distinct K
    by ``retrieval_report``). Two fractions with the same label, or a bad value, raise.
    Returns ``{label: K}`` in the order plain Ks, then fractions.
    """
    if pool_size < 2:
        raise MetricInputError(f"pool_size must be >= 2 (a query needs a candidate), got {pool_size}")
    cap = pool_size - 1
    labelled: dict[str, int] = {}
    for k in plain_ks:
        if int(k) != k or k < 1:
            raise MetricInputError(f"plain K must be a positive integer, got {k!r}")
        labelled[str(int(k))] = min(int(k), cap)
    for f in fractions:
        if not (0 < f <= 1):
            raise MetricInputError(f"pool fraction must be in (0, 1], got {f!r}")
        label = _pct_label(f)
        if label in labelled:
            raise MetricInputError(f"pool fractions repeat: two map to label {label!r}")
        labelled[label] = min(max(1, round(f * pool_size)), cap)
    if not labelled:
        raise MetricInputError("no K: give plain Ks or pool fractions")
    return labelled


@dataclass(frozen=True)
class ExposureSlices:
    """Boolean masks over test pairs by the engagement count of the pair's ground truth.

    low/high: bool ``(n_pairs,)``, disjoint. low_threshold/high_threshold: the count thresholds
    (pool quantiles) used; a pair is low when count <= low_threshold, high when
    count >= high_threshold and count > low_threshold.
    """

    low: np.ndarray
    high: np.ndarray
    low_threshold: float
    high_threshold: float


def exposure_slices(
    engagement_counts: Mapping[str, int],
    truth_ids: Sequence[str] | np.ndarray,
    low_q: float = DEFAULT_LOW_QUANTILE,
    high_q: float = DEFAULT_HIGH_QUANTILE,
) -> ExposureSlices:
    """Low/high-exposure slices of test pairs (method.md: engagement quantiles when views are unknown).

    ``engagement_counts``: note id -> number of engagements (behaviour events) of every note of
    the test pool. Thresholds are quantiles of these counts over the pool's notes, each note once
    (numpy's default linear interpolation), so they describe notes, not how often a note is a
    ground truth. Defaults: bottom quartile (``low_q=0.25``) and top quartile (``high_q=0.75``).

    Ties: a pair is *low* when its truth's count <= the low threshold and *high* when >= the high
    threshold, so every note tied at a threshold joins the slice (slices may hold more than 25 %
    of the notes when counts are heavily tied). A count that is both (thresholds equal or crossed
    through ties) is low only: the slices never overlap. A truth missing from
    ``engagement_counts`` raises. Compute per-slice recall with ``recall_at_k`` on the masked pairs.
    """
    if not (0 <= low_q < high_q <= 1):
        raise MetricInputError(f"need 0 <= low_q < high_q <= 1, got low_q={low_q}, high_q={high_q}")
    if not engagement_counts:
        raise MetricInputError("engagement_counts is empty: exposure quantiles need the pool's counts")
    if len(truth_ids) == 0:
        raise MetricInputError("no test pairs: truth_ids is empty")
    missing = [t for t in truth_ids if t not in engagement_counts]
    if missing:
        raise MetricInputError(
            f"{len(missing)} ground-truth notes have no engagement count (first: {missing[:3]}); "
            "engagement_counts must cover the test pool"
        )
    pool_counts = np.fromiter(engagement_counts.values(), dtype=np.float64, count=len(engagement_counts))
    low_t, high_t = (float(v) for v in np.quantile(pool_counts, [low_q, high_q]))
    counts = np.array([engagement_counts[t] for t in truth_ids], dtype=np.float64)
    low = counts <= low_t
    high = (counts >= high_t) & ~low
    return ExposureSlices(low=low, high=high, low_threshold=low_t, high_threshold=high_t)


@dataclass(frozen=True)
class RetrievalReport:
    """The result of ``retrieval_report``.

    metrics: flat ``{name: fraction in [0, 1]}`` (NaN for an empty slice) with stable names;
    ks: ``{label: K}`` actually used (``ks_for_pool``); counts: ``{name: int}`` (pairs, queries,
    pool size, slice sizes, pairs whose truth is not among their within-category candidates);
    ranks/cat_ranks: the ``truth_ranks`` the metrics come from (int64 ``(n_pairs,)``; cat_ranks
    None without within-category rankings).
    """

    metrics: dict[str, float]
    ks: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)
    ranks: np.ndarray | None = None
    cat_ranks: np.ndarray | None = None


def _recall_by_label(ranks: np.ndarray, ks: Mapping[str, int], depth: int | None) -> dict[str, float]:
    if ranks.size == 0:
        return {label: math.nan for label in ks}
    by_k = recall_from_ranks(ranks, sorted(set(ks.values())), depth)
    return {label: by_k[k] for label, k in ks.items()}


def retrieval_report(
    ranked: Ranking,
    truth: Sequence[str] | np.ndarray,
    queries: Sequence[str] | np.ndarray,
    pool_ids: Sequence[str] | np.ndarray,
    *,
    fractions: Sequence[float],
    plain_ks: Sequence[int],
    cat_ranked: Ranking | None = None,
    slices: ExposureSlices | None = None,
    depth: int | None = None,
    cat_depth: int | None = None,
) -> RetrievalReport:
    """All retrieval metrics of one evaluation, with stable names.

    ranked: global rankings (pool minus query), one per pair; cat_ranked: within-category
    rankings (the query's category minus the query), one per pair, or None; truth/queries:
    ``(n_pairs,)`` ids; pool_ids: the test pool (every query and truth must be in it, else the
    evaluation set is inconsistent and this raises). depth/cat_depth: truncation depth of the
    rankings (see ``recall_at_k``).

    Metrics: ``recall_at_<label>`` for every label of ``ks_for_pool(len(pool_ids), fractions,
    plain_ks)``, ``mrr``; with ``cat_ranked``: ``cat_recall_at_<K>`` for the plain Ks and
    ``cat_mrr``; with ``slices``: the same names with ``_low_exposure`` / ``_high_exposure``
    appended (computed on the masked pairs). Counts: ``pairs``, ``queries`` (distinct),
    ``pool_size``, ``low_exposure_pairs``, ``high_exposure_pairs`` and, for complete
    within-category rankings, ``cat_truth_not_candidate`` (pairs whose truth is in another
    category: always a miss within category).
    """
    n = _check_pairs(ranked, truth)
    if len(queries) != n:
        raise MetricInputError(f"queries has {len(queries)} ids but truth has {n} pairs")
    pool = set(pool_ids)
    if len(pool) != len(pool_ids):
        raise MetricInputError("pool_ids repeat a note id")
    outside = [x for x in list(truth) + list(queries) if x not in pool]
    if outside:
        raise MetricInputError(
            f"{len(outside)} query/truth ids are not in the test pool (first: {outside[:3]})"
        )
    ks = ks_for_pool(len(pool), fractions, plain_ks)
    ranks = truth_ranks(ranked, truth, queries)
    metrics: dict[str, float] = {}
    counts = {"pairs": n, "queries": len(set(queries)), "pool_size": len(pool)}
    cat_ks = {str(int(k)): int(k) for k in plain_ks}
    cat_ranks = None
    if cat_ranked is not None:
        _check_pairs(cat_ranked, truth, "cat_ranked")
        cat_ranks = truth_ranks(cat_ranked, truth, queries)
        if cat_depth is None:  # complete rankings: rank 0 means the truth is in another category
            counts["cat_truth_not_candidate"] = int(np.sum(cat_ranks == 0))

    def add(suffix: str, mask: np.ndarray | None) -> None:
        r = ranks if mask is None else ranks[mask]
        for label, value in _recall_by_label(r, ks, depth).items():
            metrics[f"recall_at_{label}{suffix}"] = value
        metrics[f"mrr{suffix}"] = mrr_from_ranks(r) if r.size else math.nan
        if cat_ranks is not None:
            c = cat_ranks if mask is None else cat_ranks[mask]
            for label, value in _recall_by_label(c, cat_ks, cat_depth).items():
                metrics[f"cat_recall_at_{label}{suffix}"] = value
            metrics[f"cat_mrr{suffix}"] = mrr_from_ranks(c) if c.size else math.nan

    add("", None)
    if slices is not None:
        for name, mask in (("low", slices.low), ("high", slices.high)):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (n,):
                raise MetricInputError(f"slice mask {name} has shape {mask.shape}, expected ({n},)")
            counts[f"{name}_exposure_pairs"] = int(mask.sum())
            add(f"_{name}_exposure", mask)
    return RetrievalReport(metrics=metrics, ks=ks, counts=counts, ranks=ranks, cat_ranks=cat_ranks)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def normalize_category(text: str) -> str:
    """The form categories are compared in: surrounding whitespace stripped, casefolded."""
    return text.strip().casefold()


def _check_same_length(pred: Sequence, gold: Sequence, what: str) -> int:
    if len(pred) == 0:
        raise MetricInputError(f"no {what} predictions: the metric of nothing is undefined")
    if len(pred) != len(gold):
        raise MetricInputError(f"{len(pred)} {what} predictions but {len(gold)} gold values")
    return len(pred)


def category_accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    """Share of notes whose generated category equals the gold category after
    ``normalize_category``; ``pred``/``gold`` are aligned per note."""
    n = _check_same_length(pred, gold, "category")
    return sum(normalize_category(p) == normalize_category(g) for p, g in zip(pred, gold)) / n


def illegal_rate(pred: Sequence[str], category_set: Sequence[str] | set[str]) -> float:
    """"Ill." of the paper: share of generated categories not in the closed ``category_set``
    (compared after ``normalize_category``)."""
    if len(pred) == 0:
        raise MetricInputError("no category predictions: the illegal rate of nothing is undefined")
    allowed = {normalize_category(c) for c in category_set}
    if not allowed:
        raise MetricInputError("category_set is empty")
    return sum(normalize_category(p) not in allowed for p in pred) / len(pred)


def join_hashtags(tags: Sequence[str]) -> str:
    """One note's hashtags as the text BLEU/ROUGE compare: stripped, joined with ``HASHTAG_JOINER``."""
    if isinstance(tags, str):
        raise MetricInputError(f"hashtags must be a list of strings, got the string {tags!r}")
    return HASHTAG_JOINER.join(t.strip() for t in tags)


def hashtag_scores(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1 of generated hashtags against gold hashtags, in [0, 1].

    pred/gold: per note, a list of hashtags (joined by ``join_hashtags``). ``bleu4``: sacrebleu
    corpus BLEU (``BLEU_TOKENIZER``, exp smoothing) / 100. ``rouge1``/``rouge2``/``rougeL``:
    mean over notes of rouge_score F1 (default tokenizer, no stemming; see the module doc).
    """
    _check_same_length(pred, gold, "hashtag")
    hyps = [join_hashtags(p) for p in pred]
    refs = [join_hashtags(g) for g in gold]
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize=BLEU_TOKENIZER)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hyps, refs):
        for name, score in scorer.score(ref, hyp).items():
            sums[name] += score.fmeasure
    out = {"bleu4": bleu.score / 100.0}
    out.update({name: total / len(hyps) for name, total in sums.items()})
    return out
