"""Training inputs written directly with ``PromptBuilder`` (the ``pipelines.build_prompts`` stage has
its own tests): tests that start at training or later use this instead of running that stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notellm.config import PipelineConfig
from notellm.models import load_tokenizer
from notellm.prompts import PromptBuilder


def write_train_prompts(cfg: PipelineConfig, notes: pa.Table) -> None:
    """``<work>/prompts/train/part-0.parquet`` (train prompts of ``notes``) and ``prompts/meta.json``,
    as ``pipelines.build_prompts`` writes them for ``cfg``'s model and prompt settings."""
    work = cfg.resolve_path(cfg.data.work_dir)
    builder = PromptBuilder(load_tokenizer(cfg.model.name, fresh=True), cfg.prompts)
    (work / "prompts" / "train").mkdir(parents=True)
    pq.write_table(builder.encode_table(notes, "train"), work / "prompts" / "train" / "part-0.parquet")
    meta = {"model": cfg.model.name, "emb_token_id": builder.emb_token_id,
            "pad_token_id": builder.tokenizer.pad_token_id}
    (work / "prompts" / "meta.json").write_text(json.dumps(meta))


def train_pair_notes(work: Path) -> pa.Table:
    """The ingested notes that appear in ``<work>/pairs/train.parquet``."""
    pairs = pq.read_table(work / "pairs" / "train.parquet")
    ids = pa.concat_arrays([pairs.column("note_id").combine_chunks(), pairs.column("related_note_id").combine_chunks()])
    notes = pq.read_table(work / "ingested" / "notes.parquet",
                          columns=["note_id", "title", "content", "hashtags", "category"])
    return notes.filter(pc.is_in(notes.column("note_id"), value_set=pc.unique(ids)))
