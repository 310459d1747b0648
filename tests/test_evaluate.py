"""Evaluation. End to end on the tiny model: ingest → mine → train (in process, on the session's Ray
cluster; training prompts written directly), then embed → build_index → evaluate submitted with
`ray job submit`, logging to MLflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from notellm.config import load_config
from notellm.embedding_store import embeddings_dir, table_vectors, vectors_to_table
from notellm.encoders import file_digest
from notellm.index import ModelInfo, NoteIndex
from notellm.training import TRAINABLE_STATE_FILE
from pipelines import ingest, mine_pairs
from pipelines import train as train_stage
from pipelines.embed import select_notes
from pipelines.evaluate import EvalData, corpus_embeddings, verdict, verdict_line
from train_inputs import train_pair_notes, write_train_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ["notellm", "llm-mean", "minilm", "bm25", "random"]


@pytest.mark.slow
def test_tiny_chain_embed_index_evaluate_as_ray_jobs(services, submit_stage, tmp_path):
    """Ingest and mining (the real split) and 4 training steps here, then embed -> index -> evaluate
    as `ray job submit` jobs on the session's cluster; the pool only is embedded, as in the demo."""
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    common = [f"data.work_dir={work}", f"training.storage_path={tmp_path / 'runs'}"]
    config = str(REPO_ROOT / "configs/tiny.yaml")
    try:  # the stages connect this process to the session's cluster (ray_init)
        for stage in (ingest, mine_pairs):
            assert stage.main(["--config", config, *common]) == 0
        cfg = load_config(config, [*common, "training.max_steps=4", "training.num_workers=1"])
        write_train_prompts(cfg, train_pair_notes(work))
        assert train_stage.train(cfg, threads_per_worker=1)["step"] == 4
    finally:
        ray.shutdown()  # later tests call ray.init themselves

    out = {}
    for module, extra in (("pipelines.embed", ["embedding.notes=test_pool"]), ("pipelines.build_index", []),
                          ("pipelines.evaluate", [f"evaluation.methods=[{','.join(METHODS)}]",
                                                  "evaluation.max_generation_notes=8"])):
        proc = submit_stage(module, work, *common[1:], *extra, config="configs/tiny.yaml")
        out[module] = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[module][-3000:]

    encoder = json.loads((work / "embeddings/notellm/encoder.json").read_text())
    notes = encoder["notes"]
    assert notes == len(select_notes(cfg, "test_pool")) and encoder["dim"] == 32 and encoder["encoder"]["checkpoint"].startswith(str(tmp_path))
    index = NoteIndex.load(work / "index/notellm", ModelInfo.from_encoder(encoder["encoder"]))
    assert len(index) == notes and index.metadata.factory == "Flat" and index.metadata.recall_at_100 == 1.0

    summary = json.loads((work / "eval/comparison.json").read_text())
    results = {m["method"]: m["metrics"] for m in summary["methods"]}
    assert list(results) == METHODS and summary["pool_size"] == notes > 100
    for metrics in results.values():
        assert 0 <= metrics["recall_at_1"] <= metrics["recall_at_10"] <= metrics["recall_at_100"] <= 1
    expected_random = 100 / (summary["pool_size"] - 1)  # R@100 of a random ranking of the pool minus the query
    assert abs(results["random"]["recall_at_100"] - expected_random) < 0.05
    assert results["minilm"]["recall_at_10"] > results["random"]["recall_at_10"] + 0.05  # real signal
    assert {"category_acc", "category_ill", "bleu4", "rougeL"} <= set(results["notellm"])
    assert "| notellm |" in (work / "eval/comparison.md").read_text()
    assert len(summary["verdict"]) == 4 and summary["verdict"][2] in out["pipelines.evaluate"]
    details = summary["verdict_details"]
    assert [v["metric"] for v in details] == ["R@10", "R@100", "cat R@10", "cat R@100"]
    assert all(v["ci_low"] <= v["diff"] <= v["ci_high"] and v["queries"] <= summary["pairs"] for v in details)
    ranks = pq.read_table(work / "eval/ranks.parquet")
    assert ranks.num_rows == summary["pairs"] and {"query_id", "truth_id", "minilm", "minilm.cat"} <= set(ranks.column_names)
    for method, metrics in results.items():  # the stored ranks give the table's recalls
        glob, cat = ranks.column(method).to_numpy(), ranks.column(f"{method}.cat").to_numpy()
        assert np.mean((glob > 0) & (glob <= 10)) == pytest.approx(metrics["recall_at_10"])
        assert np.mean((cat > 0) & (cat <= 10)) == pytest.approx(metrics["cat_recall_at_10"])

    # NoteLLM's pool vectors come from the corpus embeddings of the same checkpoint (no second pass)
    assert "notellm: the pool's vectors from the corpus embeddings" in out["pipelines.evaluate"]
    assert not (work / "eval/embeddings/notellm").exists() and (work / "eval/embeddings/llm-mean").is_dir()

    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out["pipelines.evaluate"]).group(1)
    client = MlflowClient(services.mlflow_url)
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {
        "evaluation/comparison.md", "evaluation/ranks.parquet", "evaluation/recall_at_k.png"}
    assert client.get_run(run_id).data.metrics["minilm.recall_at_10"] == pytest.approx(results["minilm"]["recall_at_10"])


def _eval_data(pool_ids: list[str]) -> EvalData:
    pool = pa.table({"note_id": pool_ids, "category": ["c"] * len(pool_ids)})
    return EvalData(pool, [], [], dict.fromkeys(pool_ids, "c"), dict.fromkeys(pool_ids, 1))


def test_corpus_embeddings_are_reused_only_for_the_same_weights(tmp_path):
    cfg = load_config(REPO_ROOT / "configs/tiny.yaml", [f"data.work_dir={tmp_path / 'work'}"])
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    state = checkpoint / TRAINABLE_STATE_FILE
    state.write_bytes(b"weights v1")
    folder = embeddings_dir(cfg, "notellm")
    folder.mkdir(parents=True)
    ids = [f"n{i}" for i in range(6)]
    vectors = np.eye(6, 4, dtype=np.float32)
    pq.write_table(vectors_to_table(ids, ["c"] * 6, vectors), folder / "part-00000.parquet")
    meta = {"encoder": {"method": "notellm", "version": file_digest(state), "checkpoint": str(checkpoint)},
            "dim": 4, "normalized": True, "notes": 6}
    (folder / "encoder.json").write_text(json.dumps(meta))
    source = (str(checkpoint), None)

    table, got = corpus_embeddings(cfg, "notellm", source, _eval_data(["n4", "n1"]))
    assert sorted(table.column("note_id").to_pylist()) == ["n1", "n4"] and got == meta
    assert np.array_equal(table_vectors(table.sort_by("note_id")), vectors[[1, 4]])
    assert corpus_embeddings(cfg, "notellm", source, _eval_data(["n1", "n9"])) is None  # a pool note missing
    assert corpus_embeddings(cfg, "llm-mean", source, _eval_data(["n1"])) is None  # only the trained model
    state.write_bytes(b"weights v2")  # the checkpoint moved on: the corpus vectors are stale
    assert corpus_embeddings(cfg, "notellm", source, _eval_data(["n1"])) is None


def test_verdict_compares_notellm_with_the_best_other_method_with_a_bootstrap_interval():
    queries = [f"q{i}" for i in range(200)]
    rng = np.random.default_rng(0)
    base = rng.integers(1, 300, size=200)

    def result(method, ranks, cat_ranks):
        ranks, cat_ranks = np.asarray(ranks), np.asarray(cat_ranks)
        metrics = {f"{prefix}recall_at_{k}": float(np.mean((r > 0) & (r <= k)))
                   for prefix, r in (("", ranks), ("cat_", cat_ranks)) for k in (10, 100)}
        return {"method": method, "metrics": metrics, "ranks": ranks.tolist(), "cat_ranks": cat_ranks.tolist()}

    much_better = np.where(np.arange(200) < 100, 1, base)  # half the pairs moved to rank 1
    slightly = base.copy()
    slightly[np.flatnonzero((base > 10) & (base <= 100))[:1]] = 5  # one more hit at K=10 only
    rows = verdict([result("notellm", much_better, slightly), result("bm25", base, base),
                    result("minilm", base + 1, base)], queries)
    assert [(v["metric"], v["other"]) for v in rows] == [("R@10", "bm25"), ("R@100", "bm25"),
                                                         ("cat R@10", "bm25"), ("cat R@100", "bm25")]
    r10, _, cat10, cat100 = rows
    assert r10["significant"] and 0 < r10["ci_low"] < r10["diff"] < r10["ci_high"]
    assert r10["diff"] == pytest.approx(r10["ours_value"] - r10["other_value"])
    assert cat10["diff"] == pytest.approx(0.5) and not cat10["significant"]  # 1 pair of 200: noise
    assert cat100["diff"] == 0 and cat100["ci_low"] == cat100["ci_high"] == 0 and not cat100["significant"]
    assert verdict_line(cat10) == ("cat R@10: notellm {:.2f} vs best other bm25 {:.2f} -> ahead by 0.50 (95% CI "
                                   "{:+.2f} to {:+.2f} over 200 queries: not significant)").format(
        cat10["ours_value"], cat10["other_value"], cat10["ci_low"], cat10["ci_high"])
    assert rows == verdict([result("notellm", much_better, slightly), result("bm25", base, base),
                            result("minilm", base + 1, base)], queries)  # seeded
    assert verdict([result("bm25", base, base)], queries) == []
