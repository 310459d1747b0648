"""Embedding folders: the Parquet layout ``pipelines.embed`` writes and every reader uses.

``<data.work_dir>/embeddings/<method>/`` (``embeddings_dir``) holds ``part-NNNNN.parquet`` files of
``output_schema(d)`` rows (``note_id`` string, ``category`` string, ``embedding``
fixed_size_list<float32>[d], L2-normalised) and, once complete, ``encoder.json`` (the
``notellm.encoders.EncoderInfo`` as a dict under ``encoder``, ``dim``, ``normalized``, ``notes``).

Kept free of torch so that readers (index building, serving) start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from notellm.config import PipelineConfig

ENCODER_FILE = "encoder.json"
PROGRESS_FILE = "progress.json"  # the encoder of an unfinished run (restart keeps its parts)
PART_GLOB = "part-*.parquet"


class EmbeddingError(ValueError):
    """Embedding inputs are missing or inconsistent."""


def embeddings_dir(cfg: PipelineConfig, method: str | None = None) -> Path:
    return cfg.resolve_path(cfg.data.work_dir) / "embeddings" / (method or cfg.embedding.method)


def output_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("note_id", pa.string(), nullable=False), pa.field("category", pa.string()),
                      pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)])


def vectors_to_table(note_ids: list[str], categories: list[str | None], vectors: np.ndarray) -> pa.Table:
    """[n, d] float32 vectors and their ids as an ``output_schema(d)`` table."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.Table.from_arrays([pa.array(note_ids, pa.string()), pa.array(categories, pa.string()),
                                 pa.FixedSizeListArray.from_arrays(flat, dim)], schema=output_schema(dim))


def read_embeddings(folder: Path) -> tuple[pa.Table, dict[str, Any]]:
    """All part files of an embeddings folder (one table) and its ``encoder.json``."""
    meta_path = folder / ENCODER_FILE
    if not meta_path.is_file():
        raise EmbeddingError(f"{meta_path} does not exist: run pipelines.embed first (or it did not finish)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    parts = sorted(folder.glob(PART_GLOB))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else output_schema(meta["dim"]).empty_table()
    return table, meta


def table_vectors(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as a [n, d] float32 array."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
