"""Build index: the faiss index over a method's note embeddings (``notellm.index``).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.build_index --config configs/demo.yaml [index.mode=update|rebuild]

Reads ``<data.work_dir>/embeddings/<embedding.method>/`` (``pipelines.embed``) and writes
``<data.work_dir>/index/<embedding.method>/`` (``index.faiss``, ``ids.parquet``, ``metadata.json``;
saved atomically). ``index.mode=update`` (default) builds the index when there is none and
otherwise adds the embedded notes it does not hold yet (cold start: run ``pipelines.embed`` after
new notes were ingested; it embeds only those, then this adds them without retraining the index).
An existing index made from another encoder (model, weights version or dimension) is refused:
``index.mode=rebuild`` re-creates it from all embeddings (factory re-chosen for N, IVF re-trained,
nprobe/efSearch re-tuned to ``index.target_recall_at_100``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from notellm.config import PipelineConfig
from notellm.embedding_store import EmbeddingError, embeddings_dir, read_embeddings, table_vectors
from notellm.index import METADATA_FILE, ModelInfo, NoteIndex, NoteIndexError
from notellm.stage_cli import run_stage


def index_dir(cfg: PipelineConfig, method: str | None = None) -> Path:
    return cfg.resolve_path(cfg.data.work_dir) / "index" / (method or cfg.embedding.method)


def build_index(cfg: PipelineConfig) -> dict[str, Any]:
    """Build, update or rebuild the index (module docstring); returns its metadata and counts."""
    started = time.perf_counter()
    table, meta = read_embeddings(embeddings_dir(cfg))
    model = ModelInfo.from_encoder(meta["encoder"])
    target = index_dir(cfg)
    added = 0
    if cfg.index.mode == "update" and (target / METADATA_FILE).is_file():
        index = NoteIndex.load(target, expect=model)
        known = pa.array(index.note_ids, pa.string())
        new = table.filter(pc.invert(pc.is_in(table.column("note_id"), value_set=known)))
        if new.num_rows:
            index.add(table_vectors(new), new.column("note_id").to_pylist(), new.column("category").to_pylist())
            index.save(target)
        added, action = new.num_rows, "updated"
    else:
        index = NoteIndex.build(table_vectors(table), table.column("note_id").to_pylist(),
                                table.column("category").to_pylist(), cfg.index, model, seed=cfg.seed)
        index.save(target)
        added, action = len(index), "built" if cfg.index.mode == "update" else "rebuilt"
    m = index.metadata
    summary = {"action": action, "added": added, "notes": len(index), "index_dir": str(target),
               "factory": m.factory, "nprobe": m.nprobe, "ef_search": m.ef_search,
               "recall_at_100": m.recall_at_100, "build_seconds": m.build_seconds,
               "seconds": round(time.perf_counter() - started, 2), "model": model.name,
               "model_version": model.version}
    print(f"{action} {target}: {len(index)} notes (+{added}), {m.factory}, recall@100 vs exact "
          f"{m.recall_at_100:.3f}, {summary['seconds']:.1f}s")
    return summary


def log_to_mlflow(cfg: PipelineConfig, summary: dict[str, Any]) -> str:
    import mlflow

    mlflow.set_experiment(f"{cfg.registry.model_name}-index")
    with mlflow.start_run(run_name=f"index-{cfg.embedding.method}") as run:
        mlflow.log_params({k: str(summary[k]) for k in ("action", "factory", "nprobe", "ef_search", "model",
                                                         "model_version", "index_dir")})
        mlflow.log_metrics({k: float(summary[k]) for k in ("notes", "added", "recall_at_100", "build_seconds",
                                                            "seconds")})
        mlflow.log_text(json.dumps(summary, indent=2), "index/summary.json")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    return run_stage("pipelines.build_index", __doc__, lambda cfg, _: build_index(cfg), log_to_mlflow,
                     (EmbeddingError, NoteIndexError), argv)


if __name__ == "__main__":
    sys.exit(main())
