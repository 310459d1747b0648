"""Evaluate: NoteLLM against its ablation and the baselines on the time split, as one table.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.evaluate --config configs/demo.yaml [evaluation.methods=[notellm,bm25]]

Protocol (method.md section 5): the pool is the evaluation pool (test-period notes never seen in a
training pair, ``notellm.split.evaluation_pool``); each test pair (``pairs/test.parquet``) is a query
and its ground truth; every method ranks the whole pool minus the query (global) and the query's
category minus the query (within-category). Metrics (``notellm.metrics.retrieval_report``):
Recall@K for K in ``evaluation.ks`` and at the paper's pool fractions, MRR, the same on the
low/high-exposure slices (engagement quartiles of the ground truth), within-category Recall@K and
MRR; for the models in ``evaluation.generation_methods`` (default NoteLLM only) also category
generation accuracy / illegal rate and hashtag BLEU-4 / ROUGE-1/2/L on
``evaluation.max_generation_notes`` pool notes.

Methods (``evaluation.methods``):

* dense (``notellm``, ``notellm-wo-csft``, ``llm-mean``, ``llm-last``, ``prompteol``, ``minilm``,
  ``minilm-ft``): the pool is embedded by ``pipelines.embed`` (Ray Data actors; cached under
  ``<work_dir>/eval/embeddings/<method>/``, restartable; ``notellm`` takes the pool's rows of the
  corpus embeddings ``pipelines.embed`` wrote when they come from the same checkpoint) and searched
  through ``notellm.index`` (the code that serves); ``notellm`` = the newest checkpoint of ``training.run_name``,
  ``notellm-wo-csft`` = of ``training.run_name + evaluation.ablation_suffix`` (a run trained with
  ``training.alpha=0``); ``minilm-ft`` is fine-tuned here first (``notellm.baselines``) on the
  training pairs, as many pairs as NoteLLM's training sees unless ``evaluation.minilm_ft_steps``.
* ``bm25`` (bm25s over the same plain text) and ``random`` (a seeded shuffle: the floor).

Below the table, one verdict line per acceptance metric (R@10, R@100, within-category R@10 and
R@100): NoteLLM minus the best other method, with a 95 % paired bootstrap interval over queries
(``notellm.metrics.recall_difference``), so a lead smaller than the test set's noise reads as
"not significant".

Writes ``<work_dir>/eval/comparison.{md,csv,json}``, ``ranks.parquet`` (every pair's rank of its
truth per method) and ``recall_at_k.png`` (global and within-category Recall@K curves), prints the
table, and logs everything to MLflow (experiment ``<registry.model_name>-eval``: metrics
``<method>.<metric>``, the table, the ranks and the plot).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notellm.config import PipelineConfig
from notellm.embedding_store import EmbeddingError, embeddings_dir, read_embeddings, table_vectors
from notellm.encoders import EncoderError
from notellm.index import IndexInputError, ModelInfo, NoteIndex
from notellm.io_utils import atomic_path, atomic_write_text
from notellm.metrics import (
    MetricInputError,
    category_accuracy,
    exposure_slices,
    hashtag_scores,
    illegal_rate,
    recall_difference,
    retrieval_report,
)
from notellm.models import ModelResolutionError
from notellm.stage_cli import run_stage
from notellm.training import TrainingDataError, newest_checkpoint
from pipelines.embed import embed, select_notes

DENSE_ENCODER = {"notellm": "notellm", "notellm-wo-csft": "notellm", "llm-mean": "llm-mean",
                 "llm-last": "llm-last", "prompteol": "prompteol", "minilm": "minilm", "minilm-ft": "minilm-ft"}
"""Evaluation method -> ``notellm.encoders`` method."""
TABLE_COLUMNS = [("recall_at_1", "R@1"), ("recall_at_10", "R@10"), ("recall_at_100", "R@100"),
                 ("recall_at_pct0.388", "R@0.39%"), ("recall_at_pct3.88", "R@3.9%"), ("mrr", "MRR"),
                 ("cat_recall_at_1", "cat R@1"), ("cat_recall_at_10", "cat R@10"),
                 ("cat_recall_at_100", "cat R@100"), ("cat_mrr", "cat MRR"),
                 ("recall_at_10_low_exposure", "R@10 low"), ("recall_at_10_high_exposure", "R@10 high"),
                 ("category_acc", "cat. Acc"), ("category_ill", "cat. Ill"), ("bleu4", "BLEU-4"),
                 ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")]
"""Columns of the printed table (values in %); the CSV/JSON hold every metric."""


class EvaluationError(ValueError):
    """Evaluation inputs are missing or inconsistent."""


@dataclass(frozen=True)
class EvalData:
    """The evaluation set. ``pool``: notes table (``NOTE_COLUMNS``) of the pool; ``queries`` /
    ``truth``: [P] note ids of the test pairs; ``category``: note id -> category of pool notes;
    ``engagement``: note id -> behaviour events of every pool note."""

    pool: Any
    queries: list[str]
    truth: list[str]
    category: dict[str, str]
    engagement: dict[str, int]

    @property
    def pool_ids(self) -> list[str]:
        return self.pool.column("note_id").to_pylist()


def load_eval_data(cfg: PipelineConfig) -> EvalData:
    work = cfg.resolve_path(cfg.data.work_dir)
    pool = select_notes(cfg, "test_pool")
    pairs_path = work / "pairs" / "test.parquet"
    if not pairs_path.is_file():
        raise EvaluationError(f"{pairs_path} does not exist: run pipelines.mine_pairs first")
    pairs = pq.read_table(pairs_path, columns=["note_id", "related_note_id"])
    ids = set(pool.column("note_id").to_pylist())
    queries, truth = pairs.column("note_id").to_pylist(), pairs.column("related_note_id").to_pylist()
    outside = [n for n in queries + truth if n not in ids]
    if outside:
        raise EvaluationError(f"{pairs_path}: {len(outside)} pair notes are not in the evaluation pool "
                              f"(first {outside[0]!r}): rerun pipelines.mine_pairs")
    if not queries:
        raise EvaluationError(f"{pairs_path} holds no test pairs: nothing to evaluate")
    behaviors = pq.read_table(work / "ingested" / "behaviors.parquet", columns=["note_id"]).column("note_id")
    values, counts = np.unique(np.asarray(behaviors.to_pylist(), dtype=object), return_counts=True)
    engagement = {n: 0 for n in ids} | {v: int(c) for v, c in zip(values, counts) if v in ids}
    category = dict(zip(pool.column("note_id").to_pylist(), pool.column("category").to_pylist()))
    return EvalData(pool, queries, truth, category, engagement)


# ------------------------------------------------------------------------------------ rankings


def _strip(rows: list[list[str | None]]) -> list[list[str]]:
    return [[n for n in row if n is not None] for row in rows]


def encoder_source(cfg: PipelineConfig, method: str) -> tuple[str | None, str | None]:
    """(checkpoint or model folder, MLflow run id) of a dense evaluation method."""
    if method in ("notellm", "notellm-wo-csft"):
        run_name = cfg.training.run_name + (cfg.evaluation.ablation_suffix if method != "notellm" else "")
        folder, state = newest_checkpoint(cfg, run_name)
        return str(folder), state.get("mlflow_run_id")
    if method == "minilm-ft":
        return str(finetune_minilm(cfg)), None
    return None, None


def finetune_minilm(cfg: PipelineConfig) -> Path:
    """The MiniLM baseline fine-tuned on the training pairs (``<work_dir>/baselines/minilm-ft``;
    reused when its ``settings.json`` matches)."""
    from notellm.baselines import finetune_sentence_encoder
    from notellm.models import load_tokenizer
    from notellm.prompts import PromptBuilder

    e, t = cfg.evaluation, cfg.training
    steps = e.minilm_ft_steps or max(1, math.ceil(t.max_steps * t.pairs_per_batch / e.minilm_ft_batch_size))
    work = cfg.resolve_path(cfg.data.work_dir)
    out = work / "baselines" / "minilm-ft"
    pairs = pq.read_table(work / "pairs" / "train.parquet", columns=["note_id", "related_note_id"])
    settings = {"steps": steps, "batch_size": e.minilm_ft_batch_size, "lr": e.minilm_ft_lr, "seed": cfg.seed,
                "max_seq_length": e.minilm_ft_max_seq_length, "pairs": pairs.num_rows,
                "prompts": cfg.prompts.model_dump(mode="json")}
    marker = out / "notellm_settings.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == settings:
        print(f"minilm-ft: reusing {out}")
        return out
    notes = pq.read_table(work / "ingested" / "notes.parquet", columns=["note_id", "title", "content", "hashtags"])
    builder = PromptBuilder(load_tokenizer(cfg.model.name, fresh=True), cfg.prompts)
    text = dict(zip(notes.column("note_id").to_pylist(), builder.plain_texts(notes.to_pylist())))
    train_pairs = [(text[a], text[b]) for a, b in zip(pairs.column("note_id").to_pylist(),
                                                      pairs.column("related_note_id").to_pylist())]
    started = time.perf_counter()
    print(f"minilm-ft: fine-tuning MiniLM on {len(train_pairs)} training pairs for {steps} steps of "
          f"{e.minilm_ft_batch_size}")
    finetune_sentence_encoder(train_pairs, out, batch_size=e.minilm_ft_batch_size, lr=e.minilm_ft_lr,
                              seed=cfg.seed, max_steps=steps, max_seq_length=e.minilm_ft_max_seq_length)
    atomic_write_text(marker, json.dumps(settings, indent=2) + "\n")
    print(f"minilm-ft: done in {time.perf_counter() - started:.0f}s")
    return out


def corpus_embeddings(cfg: PipelineConfig, method: str, source: tuple[str | None, str | None],
                      data: EvalData) -> tuple[Any, dict[str, Any]] | None:
    """The pool's rows of the corpus embeddings ``pipelines.embed`` wrote for the same weights
    (``<work_dir>/embeddings/notellm``, made from ``source``'s checkpoint), or None when there are
    none, they come from other weights, or they miss a pool note. Saves re-embedding the pool."""
    if method != "notellm" or source[0] is None:
        return None
    from notellm.encoders import file_digest
    from notellm.training import TRAINABLE_STATE_FILE

    folder = embeddings_dir(cfg, method)
    try:
        table, meta = read_embeddings(folder)
    except EmbeddingError:
        return None
    if meta["encoder"].get("version") != file_digest(Path(source[0]) / TRAINABLE_STATE_FILE):
        print(f"{method}: {folder} holds other weights ({meta['encoder'].get('checkpoint')}); embedding the pool")
        return None
    table = table.filter(pc.is_in(table.column("note_id"), pa.array(data.pool_ids, pa.string())))
    if table.num_rows != len(data.pool_ids):
        print(f"{method}: {folder} lacks {len(data.pool_ids) - table.num_rows} pool notes; embedding the pool")
        return None
    print(f"{method}: the pool's vectors from the corpus embeddings in {folder}")
    return table, meta


def dense_rankings(cfg: PipelineConfig, method: str, data: EvalData) -> tuple[list, list, dict[str, Any]]:
    """Embed the pool with ``method`` (``pipelines.embed``), index it (``NoteIndex``), search every
    query globally and within its category; returns (ranked, cat_ranked, encoder info)."""
    source = encoder_source(cfg, method)
    table, meta = corpus_embeddings(cfg, method, source, data) or (None, None)
    if table is None:
        out_dir = cfg.resolve_path(cfg.data.work_dir) / "eval" / "embeddings" / method
        embed(cfg, data.pool, DENSE_ENCODER[method], out_dir, source=source)
        table, meta = read_embeddings(out_dir)
    else:
        out_dir = embeddings_dir(cfg, method)
    ids = table.column("note_id").to_pylist()
    index = NoteIndex.build(table_vectors(table), ids, table.column("category").to_pylist(), cfg.index,
                            ModelInfo.from_encoder(meta["encoder"]), seed=cfg.seed)
    position = {n: i for i, n in enumerate(ids)}
    missing = [q for q in data.queries if q not in position]
    if missing:
        raise EvaluationError(f"{out_dir}: {len(missing)} queries have no embedding (first {missing[0]!r})")
    queries = index.vectors()[[position[q] for q in data.queries]]
    n = len(index)
    _, ranked = index.search(queries, n, exclude_ids=data.queries)
    _, cat_ranked = index.search(queries, n, categories=[data.category[q] for q in data.queries],
                                 exclude_ids=data.queries)
    return _strip(ranked), _strip(cat_ranked), meta["encoder"]


def bm25_rankings(cfg: PipelineConfig, data: EvalData) -> tuple[list, list, dict[str, Any]]:
    from notellm.baselines import BM25Retriever
    from notellm.models import load_tokenizer
    from notellm.prompts import PromptBuilder

    builder = PromptBuilder(load_tokenizer(cfg.model.name, fresh=True), cfg.prompts)
    rows = data.pool.to_pylist()
    text = dict(zip(data.pool_ids, builder.plain_texts(rows)))
    bm25 = BM25Retriever(seed=cfg.seed).fit(data.pool_ids, [text[n] for n in data.pool_ids],
                                            [data.category[n] for n in data.pool_ids])
    query_texts = [text[q] for q in data.queries]
    n = len(data.pool_ids)
    ranked, _ = bm25.rank(query_texts, n, exclude_ids=data.queries)
    cat_ranked, _ = bm25.rank(query_texts, n, exclude_ids=data.queries,
                              restrict_to=[data.category[q] for q in data.queries])
    return ranked, cat_ranked, {"method": "bm25"}


def random_rankings(cfg: PipelineConfig, data: EvalData) -> tuple[list, list, dict[str, Any]]:
    """A seeded random order of the pool (and of the query's category), minus the query."""
    rng = np.random.default_rng(cfg.seed)
    ids = np.asarray(data.pool_ids, dtype=object)
    ranked, cat_ranked = [], []
    for q in data.queries:
        order = ids[rng.permutation(len(ids))]
        ranked.append([n for n in order if n != q])
        cat_ranked.append([n for n in order if n != q and data.category[n] == data.category[q]])
    return ranked, cat_ranked, {"method": "random", "seed": cfg.seed}


# ------------------------------------------------------------------------------------ generation


def generation_metrics(cfg: PipelineConfig, checkpoint: str, data: EvalData) -> dict[str, float]:
    """Category Acc./Ill. and hashtag BLEU-4/ROUGE of the NoteLLM checkpoint (greedy decoding) on
    the first ``evaluation.max_generation_notes`` pool notes by note id (hashtags: those of them
    that have hashtags; gold = all the note's normalised hashtags)."""
    from notellm.encoders import NoteLLMEncoder, autocast
    from notellm.prompts import normalize_hashtags, parse_output

    e = cfg.evaluation
    if e.max_generation_notes == 0:
        return {}
    encoder = NoteLLMEncoder(cfg, checkpoint)
    model, builder = encoder.model, encoder.builder
    notes = sorted(data.pool.to_pylist(), key=lambda n: n["note_id"])[: e.max_generation_notes]

    def run(batch_notes: list[dict], task: str, max_new: int) -> list:
        out = []
        for start in range(0, len(batch_notes), e.generation_batch_size):
            chunk = batch_notes[start : start + e.generation_batch_size]
            prompts = builder.encode_many(chunk, "generate", task)
            with autocast(model.tau.device, cfg.embedding.bf16):
                texts = model.generate([p.input_ids for p in prompts], max_new)
            out += [parse_output(t, task) for t in texts]
        return out

    categories = sorted(set(data.category.values()))
    predicted = run(notes, "category", e.category_max_new_tokens)
    metrics = {"category_acc": category_accuracy(predicted, [n["category"] for n in notes]),
               "category_ill": illegal_rate(predicted, categories)}
    tagged = [n for n in notes if normalize_hashtags(n["hashtags"], builder.forbidden)]
    if tagged:
        tags = run(tagged, "hashtag", e.hashtag_max_new_tokens)
        gold = [normalize_hashtags(n["hashtags"], builder.forbidden) for n in tagged]
        metrics |= hashtag_scores(tags, gold)
    return metrics


# ------------------------------------------------------------------------------------ driver


def evaluate_method(cfg: PipelineConfig, method: str, data: EvalData, slices) -> dict[str, Any]:
    started = time.perf_counter()
    if method in DENSE_ENCODER:
        ranked, cat_ranked, info = dense_rankings(cfg, method, data)
    elif method == "bm25":
        ranked, cat_ranked, info = bm25_rankings(cfg, data)
    else:
        ranked, cat_ranked, info = random_rankings(cfg, data)
    report = retrieval_report(ranked, data.truth, data.queries, data.pool_ids,
                              fractions=cfg.evaluation.pool_fractions, plain_ks=cfg.evaluation.ks,
                              cat_ranked=cat_ranked, slices=slices)
    metrics = dict(report.metrics)
    if method in cfg.evaluation.generation_methods:
        metrics |= generation_metrics(cfg, info["checkpoint"], data)
    seconds = time.perf_counter() - started
    print(f"{method}: R@10 {100 * metrics['recall_at_10']:.2f}  cat R@10 {100 * metrics['cat_recall_at_10']:.2f} "
          f"({seconds:.0f}s)", flush=True)
    return {"method": method, "metrics": metrics, "ks": report.ks, "counts": report.counts, "encoder": info,
            "ranks": report.ranks, "cat_ranks": report.cat_ranks, "seconds": round(seconds, 1)}


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of ``TABLE_COLUMNS`` (percent, 2 decimals; '–' where a method has no value)."""
    header = "| method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for r in results:
        cells = []
        for key, _ in TABLE_COLUMNS:
            value = r["metrics"].get(key)
            cells.append("–" if value is None or (isinstance(value, float) and math.isnan(value))
                         else f"{100 * value:.2f}")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


VERDICT_METRICS = [("recall_at_10", "R@10", "ranks", 10), ("recall_at_100", "R@100", "ranks", 100),
                   ("cat_recall_at_10", "cat R@10", "cat_ranks", 10),
                   ("cat_recall_at_100", "cat R@100", "cat_ranks", 100)]
"""Where NoteLLM has to beat every other method (the issue's acceptance metrics): metric key,
label, the result's rank field and K."""


def verdict(results: list[dict[str, Any]], queries: list[str], ours: str = "notellm",
            n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """``ours`` against the best other method (by point value) on each ``VERDICT_METRICS`` entry.

    results: ``evaluate_method`` outputs (``metrics`` and the per-pair ``ranks``/``cat_ranks``);
    queries: the query id of each pair (the bootstrap's clusters). Each entry (values in %): metric,
    ours, other, ours_value, other_value, diff and its paired query-bootstrap interval (ci_low,
    ci_high; ``notellm.metrics.recall_difference``) and significant (the interval excludes 0).
    Empty without ``ours`` or without another method.
    """
    by_method = {r["method"]: r for r in results}
    if ours not in by_method or len(by_method) < 2:
        return []
    rows = []
    for key, label, field, k in VERDICT_METRICS:
        mine = by_method[ours]
        other = max((r for m, r in by_method.items() if m != ours), key=lambda r: r["metrics"][key])
        d = recall_difference(np.asarray(mine[field]), np.asarray(other[field]), k, queries,
                              n_boot=n_boot, seed=seed)
        rows.append({"metric": label, "ours": ours, "other": other["method"],
                     "ours_value": 100 * mine["metrics"][key], "other_value": 100 * other["metrics"][key],
                     "diff": 100 * d.diff, "ci_low": 100 * d.low, "ci_high": 100 * d.high,
                     "level": d.level, "significant": d.significant, "queries": d.groups})
    return rows


def verdict_line(v: dict[str, Any]) -> str:
    """e.g. ``"R@10: notellm 18.41 vs best other bm25 16.02 -> ahead by 2.39 (95% CI +0.61 to +4.20
    over 812 queries: significant)"``."""
    word = "ahead" if v["diff"] > 0 else "behind" if v["diff"] < 0 else "level"
    sig = "significant" if v["significant"] else "not significant"
    return (f"{v['metric']}: {v['ours']} {v['ours_value']:.2f} vs best other {v['other']} {v['other_value']:.2f}"
            f" -> {word} by {abs(v['diff']):.2f} ({100 * v['level']:.0f}% CI {v['ci_low']:+.2f} to "
            f"{v['ci_high']:+.2f} over {v['queries']} queries: {sig})")


def write_ranks(results: list[dict[str, Any]], data: EvalData, path: Path) -> None:
    """Per test pair: ``query_id``, ``truth_id`` and, per method, the truth's global rank
    (``<method>``) and within-category rank (``<method>.cat``), int32, 0 = not a candidate; for
    significance tests between runs (``notellm.metrics.recall_difference``) and error analysis."""
    columns = {"query_id": pa.array(data.queries, pa.string()), "truth_id": pa.array(data.truth, pa.string())}
    for r in results:
        columns[r["method"]] = pa.array(r["ranks"], pa.int32())
        columns[f"{r['method']}.cat"] = pa.array(r["cat_ranks"], pa.int32())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def recall_curves_png(results: list[dict[str, Any]], pool_size: int, path: Path) -> None:
    """Recall@K for K = 1..pool size (log x), global and within-category, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.unique(np.round(np.logspace(0, math.log10(max(pool_size - 1, 2)), 60)).astype(int))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "ranks", "global (pool minus query)"),
                           (axes[1], "cat_ranks", "within the query's category")):
        for r in results:
            ranks = np.asarray(r[key])
            ax.plot(ks, [np.mean((ranks > 0) & (ranks <= k)) for k in ks], label=r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(f"Recall@K, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@K")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def evaluate(cfg: PipelineConfig) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_eval_data(cfg)
    slices = exposure_slices(data.engagement, data.truth)
    print(f"evaluation pool {len(data.pool_ids)} notes, {len(data.queries)} test pairs; methods: "
          f"{', '.join(cfg.evaluation.methods)}", flush=True)
    results = [evaluate_method(cfg, m, data, slices) for m in cfg.evaluation.methods]
    out_dir = cfg.resolve_path(cfg.data.work_dir) / "eval"
    table = format_table(results)
    verdicts = verdict(results, data.queries, seed=cfg.seed)
    lines = [verdict_line(v) for v in verdicts]
    summary = {"pool_size": len(data.pool_ids), "pairs": len(data.queries), "verdict": lines,
               "verdict_details": verdicts,
               "exposure_thresholds": [slices.low_threshold, slices.high_threshold],
               "methods": [{k: v for k, v in r.items() if k not in ("ranks", "cat_ranks")} for r in results],
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "comparison.md", table + "\n" + "".join(f"\n{line}" for line in lines) + "\n")
    atomic_write_text(out_dir / "comparison.json", json.dumps(summary, indent=2, default=str) + "\n")
    keys = sorted({k for r in results for k in r["metrics"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", *keys])
    for r in results:
        writer.writerow([r["method"], *[r["metrics"].get(k, "") for k in keys]])
    atomic_write_text(out_dir / "comparison.csv", buf.getvalue())
    write_ranks(results, data, out_dir / "ranks.parquet")
    recall_curves_png(results, len(data.pool_ids), out_dir / "recall_at_k.png")
    print(f"\nComparison on the evaluation pool ({len(data.pool_ids)} notes, {len(data.queries)} test pairs; "
          f"%, cat = within the query's category):\n{table}\n\n" + "".join(f"{line}\n" for line in lines)
          + f"\nwrote {out_dir}/comparison.{{md,csv,json}}, ranks.parquet "
          f"and recall_at_k.png in {summary['seconds']:.0f}s")
    return summary | {"out_dir": str(out_dir)}


def log_to_mlflow(cfg: PipelineConfig, summary: dict[str, Any]) -> str:
    import mlflow

    out_dir = Path(summary["out_dir"])
    mlflow.set_experiment(f"{cfg.registry.model_name}-eval")
    with mlflow.start_run(run_name="compare") as run:
        mlflow.log_params({"methods": ",".join(cfg.evaluation.methods), "pool_size": summary["pool_size"],
                           "pairs": summary["pairs"], "training.run_name": cfg.training.run_name,
                           "data.work_dir": str(cfg.data.work_dir)})
        for r in summary["methods"]:
            mlflow.log_metrics({f"{r['method']}.{k}": float(v) for k, v in r["metrics"].items()
                                if not (isinstance(v, float) and math.isnan(v))})
        for name in ("comparison.md", "comparison.csv", "comparison.json", "ranks.parquet", "recall_at_k.png"):
            mlflow.log_artifact(str(out_dir / name), "evaluation")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    return run_stage("pipelines.evaluate", __doc__, lambda cfg, _: evaluate(cfg), log_to_mlflow,
                     (EvaluationError, EmbeddingError, EncoderError, TrainingDataError, ModelResolutionError,
                      IndexInputError, MetricInputError), argv)


if __name__ == "__main__":
    sys.exit(main())
