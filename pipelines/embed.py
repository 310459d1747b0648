"""Embed: notes -> float32 L2-normalised vectors with Ray Data and an actor pool, as Parquet.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.embed --config configs/demo.yaml [embedding.method=notellm] [key=value ...]

Reads ``<data.work_dir>/ingested/notes.parquet`` (``pipelines.ingest``), all notes or only the
evaluation pool (``embedding.notes``), and embeds them with ``embedding.method``
(``notellm.encoders``; ``notellm`` = the newest checkpoint of ``training.run_name`` unless
``embedding.checkpoint`` names one). Ray Data runs ``embedding.num_actors`` actors
(``compute=ActorPoolStrategy``; ``embedding.cpus_per_actor`` CPUs and torch threads each, or one GPU
with ``embedding.use_gpu``); each actor loads the model once and receives
``embedding.window_batches x embedding.batch_size`` notes per call, which it embeds in
length-sorted forward batches of ``embedding.batch_size`` (``notellm.encoders.embed_notes``).

Output, under ``<data.work_dir>/embeddings/<method>/`` (``embeddings_dir``):

* ``part-NNNNN.parquet``: ``note_id`` string, ``category`` string, ``embedding``
  fixed_size_list<float32>[d], at most ``embedding.rows_per_file`` rows each, each written
  atomically (temp file + rename) as soon as it is full;
* ``encoder.json``: the ``EncoderInfo`` (method, model, dimension, weights version, training run,
  checkpoint), ``normalized: true``, the note count and the time, written last.

Restartable: a rerun with the same encoder keeps the finished part files and embeds only the notes
they do not hold; parts made by another encoder version are removed first (they would mix models).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notellm.config import PipelineConfig
from notellm.embedding_store import (
    ENCODER_FILE,
    PART_GLOB,
    PROGRESS_FILE,
    EmbeddingError,
    embeddings_dir,
    vectors_to_table,
)
from notellm.encoders import EncoderError, EncoderInfo, describe_encoder, embed_notes, load_encoder
from notellm.io_utils import atomic_write_parquet, atomic_write_text
from notellm.models import ModelResolutionError
from notellm.stage_cli import ray_init, run_stage
from notellm.training import TrainingDataError, newest_checkpoint

NOTE_COLUMNS = ["note_id", "title", "content", "hashtags", "category"]


# ------------------------------------------------------------------------------------ inputs


def select_notes(cfg: PipelineConfig, which: str | None = None) -> pa.Table:
    """The ingested notes (``NOTE_COLUMNS``): all, or the evaluation pool (test notes never seen in
    a training pair; ``notellm.split.evaluation_pool``)."""
    from notellm.split import evaluation_pool

    work = cfg.resolve_path(cfg.data.work_dir)
    path = work / "ingested" / "notes.parquet"
    if not path.is_file():
        raise EmbeddingError(f"{path} does not exist: run pipelines.ingest with this data.work_dir first")
    notes = pq.read_table(path, columns=NOTE_COLUMNS)
    if (which or cfg.embedding.notes) == "all":
        return notes
    split_path, train_path = work / "pairs" / "notes_split.parquet", work / "pairs" / "train.parquet"
    for p in (split_path, train_path):
        if not p.is_file():
            raise EmbeddingError(f"{p} does not exist: run pipelines.mine_pairs with this data.work_dir first")
    pool = evaluation_pool(pq.read_table(split_path).to_pandas(), pq.read_table(train_path).to_pandas())
    return notes.filter(pc.is_in(notes.column("note_id"), pa.array(list(pool), pa.string())))


def encoder_source(cfg: PipelineConfig, method: str) -> tuple[str | None, str | None]:
    """(checkpoint folder, MLflow training run id) the encoder of ``method`` loads from."""
    if cfg.embedding.checkpoint is not None:
        folder = cfg.resolve_path(cfg.embedding.checkpoint)
        state = folder / "train_state.json"
        run_id = json.loads(state.read_text(encoding="utf-8")).get("mlflow_run_id") if state.is_file() else None
        return str(folder), run_id
    if method == "notellm":
        folder, state = newest_checkpoint(cfg)
        return str(folder), state.get("mlflow_run_id")
    if method == "minilm-ft":
        return str(cfg.resolve_path(cfg.data.work_dir) / "baselines" / "minilm-ft"), None
    return None, None


# ------------------------------------------------------------------------------------ Ray


class EmbedActor:
    """Ray Data actor: loads the encoder once, embeds each batch in length-sorted forward batches.

    ``expected``: the driver's ``describe_encoder`` result; an actor whose loaded encoder differs
    (the checkpoint changed in between, a config the description got wrong) refuses to start."""

    def __init__(self, cfg_json: dict[str, Any], method: str, checkpoint: str | None, run_id: str | None,
                 threads: int, expected: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(threads)
        cfg = PipelineConfig.model_validate(cfg_json)
        device = "cuda" if cfg.embedding.use_gpu else "cpu"
        self.encoder = load_encoder(cfg, method, checkpoint, device=device, run_id=run_id)
        if self.encoder.info.as_dict() != expected:
            raise EncoderError(f"the loaded encoder {self.encoder.info.as_dict()} is not the one the driver "
                               f"described ({expected})")
        self.batch_size = cfg.embedding.batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        notes = batch.select(NOTE_COLUMNS).to_pylist()
        vectors = embed_notes(self.encoder, notes, self.batch_size)
        return vectors_to_table([n["note_id"] for n in notes], [n["category"] for n in notes], vectors)


def embed_dataset(ds, cfg: PipelineConfig, method: str, checkpoint: str | None, run_id: str | None,
                  info: EncoderInfo):
    """The lazy Ray Dataset of ``output_schema`` rows for a Dataset of notes (``NOTE_COLUMNS``),
    embedded by actors that load the encoder ``info`` describes."""
    from ray.data import ActorPoolStrategy

    e = cfg.embedding
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump(mode="json"), "method": method,
                               "checkpoint": checkpoint, "run_id": run_id, "threads": e.cpus_per_actor,
                               "expected": info.as_dict()},
        batch_size=e.batch_size * e.window_batches,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=e.num_actors),
        num_cpus=e.cpus_per_actor,
        num_gpus=1 if e.use_gpu else 0,
    )


def _finished(out_dir: Path, info: EncoderInfo) -> set[str]:
    """Note ids in finished part files made by the same encoder; stale parts are removed."""
    meta_path = out_dir / ENCODER_FILE
    parts = sorted(out_dir.glob(PART_GLOB))
    progress = out_dir / PROGRESS_FILE
    previous = None
    for source in (meta_path, progress):
        if source.is_file():
            previous = json.loads(source.read_text(encoding="utf-8")).get("encoder")
            break
    if parts and previous != info.as_dict():
        print(f"{out_dir}: {len(parts)} part files from another encoder ({previous}); removing them")
        for p in parts:
            p.unlink()
        return set()
    return {nid for p in parts for nid in pq.read_table(p, columns=["note_id"]).column("note_id").to_pylist()}


def embed(cfg: PipelineConfig, notes: pa.Table | None = None, method: str | None = None,
          out_dir: Path | None = None, source: tuple[str | None, str | None] | None = None) -> dict[str, Any]:
    """Embed ``notes`` (default ``select_notes(cfg)``) with ``method`` (default
    ``embedding.method``) into ``out_dir`` (default ``embeddings_dir``); ``source`` = (checkpoint
    folder, MLflow run id) overrides ``encoder_source``. Returns the summary written to
    ``encoder.json``."""
    import ray

    started = time.perf_counter()
    method = method or cfg.embedding.method
    out_dir = out_dir or embeddings_dir(cfg, method)
    notes = select_notes(cfg) if notes is None else notes
    if notes.num_rows == 0:
        raise EmbeddingError("no notes to embed")
    checkpoint, run_id = source if source is not None else encoder_source(cfg, method)
    info = describe_encoder(cfg, method, checkpoint, run_id)  # bad inputs fail here, not in every actor
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _finished(out_dir, info)
    (out_dir / ENCODER_FILE).unlink(missing_ok=True)  # the folder is incomplete until the end
    atomic_write_text(out_dir / PROGRESS_FILE, json.dumps({"encoder": info.as_dict()}, indent=2) + "\n")
    todo = notes.filter(pc.invert(pc.is_in(notes.column("note_id"), pa.array(sorted(done), pa.string()))))
    print(f"embedding {todo.num_rows} notes with {method} ({info.model_name}, d={info.dim}); "
          f"{len(done)} already in {out_dir}")
    part_index = len(list(out_dir.glob(PART_GLOB)))
    if todo.num_rows:
        ray_init()
        rows_per_file = cfg.embedding.rows_per_file
        # Blocks made here, on the driver: no Ray task has to wait for a CPU the actors hold.
        step = cfg.embedding.batch_size * cfg.embedding.window_batches
        blocks = [todo.slice(i, step) for i in range(0, todo.num_rows, step)]
        ds = embed_dataset(ray.data.from_arrow(blocks), cfg, method, checkpoint, run_id, info)
        buffer: list[pa.Table] = []
        buffered = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            buffer.append(batch)
            buffered += batch.num_rows
            while buffered >= rows_per_file:
                table = pa.concat_tables(buffer)
                atomic_write_parquet(out_dir / f"part-{part_index:05d}.parquet", table.slice(0, rows_per_file))
                part_index += 1
                rest = table.slice(rows_per_file)
                buffer, buffered = [rest], rest.num_rows
        if buffered:
            atomic_write_parquet(out_dir / f"part-{part_index:05d}.parquet", pa.concat_tables(buffer))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in out_dir.glob(PART_GLOB))
    summary = {"encoder": info.as_dict(), "method": method, "dim": info.dim, "normalized": True,
               "notes": total, "embedded_now": todo.num_rows, "seconds": round(time.perf_counter() - started, 2),
               "notes_per_s": round(todo.num_rows / max(time.perf_counter() - started, 1e-9), 2)}
    atomic_write_text(out_dir / ENCODER_FILE, json.dumps(summary, indent=2) + "\n")
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    print(f"wrote {total} embeddings to {out_dir} in {summary['seconds']:.1f}s "
          f"({summary['notes_per_s']:.1f} notes/s incl. model load)")
    return summary


def log_to_mlflow(cfg: PipelineConfig, summary: dict[str, Any]) -> str:
    import mlflow

    mlflow.set_experiment(f"{cfg.registry.model_name}-embed")
    with mlflow.start_run(run_name=f"embed-{summary['method']}") as run:
        mlflow.log_params({f"encoder.{k}": str(v) for k, v in summary["encoder"].items()})
        mlflow.log_metrics({"notes": summary["notes"], "embedded_now": summary["embedded_now"],
                            "seconds": summary["seconds"], "notes_per_s": summary["notes_per_s"]})
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    return run_stage("pipelines.embed", __doc__, lambda cfg, _: embed(cfg), log_to_mlflow,
                     (EmbeddingError, EncoderError, TrainingDataError, ModelResolutionError), argv)


if __name__ == "__main__":
    sys.exit(main())
