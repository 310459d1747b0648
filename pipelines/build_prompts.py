"""Build prompts: tokenize the Note Compression Prompts of every note for training and embedding.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.build_prompts --config configs/demo.yaml [key=value ...]

Reads ``<data.work_dir>/pairs/{train,test}.parquet`` (mining stage; columns note_id,
related_note_id, score, n_users) and ``<data.work_dir>/ingested/notes.parquet`` (ingest stage), and
writes ``<data.work_dir>/prompts/``:

    train/*.parquet  ``notellm.prompts.TRAIN_SCHEMA``: one row per distinct note of the training
                     pairs (note_id, text, input_ids, labels, length, emb_pos, emb_token_pos, task,
                     j, output, title_truncated, content_truncated; token columns list<int32>).
                     The training stage joins the pairs with these rows by note_id.
    embed/*.parquet  ``notellm.prompts.EMBED_SCHEMA``: the embedding-only prompt (category task cut
                     after [EMB]) of every note of notes.parquet (training notes and test pool).
    meta.json        tokenizer facts the model side must match (model name, vocab size with
                     [EMB], [EMB]/BOS/EOS/pad ids) and the prompts config.
    summary.json     the printed summary (rows, token lengths p50/p95/max per task, hashtag-task
                     share, truncation counts, seconds).

Tokenization runs as a Ray Data ``map_batches`` with a class UDF (one tokenizer per actor, an actor
pool of up to the cluster's CPUs minus one, which is left to the Parquet writers). Rows are sorted
by note_id and Ray Data keeps that order, so the files' contents are deterministic. Everything is
written into a hidden temporary folder next to ``prompts/`` and renamed into place at the end: a
crash never leaves half an output (a previous ``prompts/`` stays as it was until the new one is
complete; hidden leftovers of a crashed run are removed by the next run, so two runs must not share
a work_dir at the same time). Exit code 2 with a clear message when
an input is missing (naming the stage to run first), the training pairs are empty, or a pair names
a note that is not in notes.parquet. Logs to MLflow when ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notellm.config import PipelineConfig, PromptConfig
from notellm.io_utils import atomic_write_text
from notellm.models import ModelResolutionError, load_tokenizer
from notellm.prompts import HASHTAG, PromptBuilder, PromptError
from notellm.stage_cli import run_stage

INGEST_STAGE = "python -m pipelines.ingest"
MINE_STAGE = "python -m pipelines.mine_pairs"
NOTE_COLUMNS = ["note_id", "title", "content", "hashtags", "category"]
PAIR_COLUMNS = ["note_id", "related_note_id"]
# Ray Data knobs (no config field yet): rows per tokenizer call and minimum rows per output file.


class PromptStageError(ValueError):
    """An input of the prompts stage is missing or unusable; the message says what to do."""


# ------------------------------------------------------------------------------------ inputs


def stage_paths(cfg: PipelineConfig) -> dict[str, Path]:
    """Input and output locations under ``cfg.data.work_dir``."""
    work = cfg.resolve_path(cfg.data.work_dir)
    return {
        "notes": work / "ingested" / "notes.parquet",
        "train_pairs": work / "pairs" / "train.parquet",
        "test_pairs": work / "pairs" / "test.parquet",
        "out": work / "prompts",
    }


def _read(path: Path, columns: list[str], stage: str, what: str) -> pa.Table:
    if not path.exists():
        raise PromptStageError(f"{path}: {what} not found; run `{stage}` first (same config)")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise PromptStageError(f"{path}: cannot read {what} ({exc}); rerun `{stage}`") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise PromptStageError(f"{path}: {what} lacks columns {missing} (has {schema.names}); rerun `{stage}`")
    table = pq.read_table(path, columns=columns)
    for name in columns:
        if name not in ("note_id", "related_note_id"):
            continue
        column = table.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise PromptStageError(f"{path}: {what} column {name} has type {column.type}, expected string; "
                                   f"rerun `{stage}`")
        if column.null_count:
            row = column.is_null().to_pylist().index(True)
            raise PromptStageError(f"{path}: row {row}: {name} is null; rerun `{stage}`")
        table = table.set_column(table.schema.get_field_index(name), name, column.cast(pa.string()))
    return table


def _check_known(pairs: pa.Table, known: pa.Array, path: Path) -> None:
    """Every id of ``pairs`` must be a note of notes.parquet."""
    for name in PAIR_COLUMNS:
        unknown = pc.invert(pc.is_in(pairs.column(name), value_set=known))
        if pc.any(unknown).as_py():
            row = unknown.to_pylist().index(True)
            raise PromptStageError(
                f"{path}: row {row}: {name} {pairs.column(name)[row].as_py()!r} is not in the ingested "
                f"notes; pairs and notes come from different runs: rerun `{MINE_STAGE}` on the current "
                "ingest output"
            )


def load_inputs(cfg: PipelineConfig) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(notes of the training pairs, all notes), both sorted by note_id, and input counts.

    Raises ``PromptStageError`` for a missing or unreadable input (naming the stage to run first),
    empty training pairs, or a pair naming an unknown note."""
    paths = stage_paths(cfg)
    notes = _read(paths["notes"], NOTE_COLUMNS, INGEST_STAGE, "ingested notes")
    train = _read(paths["train_pairs"], PAIR_COLUMNS, MINE_STAGE, "training pairs")
    test = _read(paths["test_pairs"], PAIR_COLUMNS, MINE_STAGE, "test pairs")
    if train.num_rows == 0:
        raise PromptStageError(
            f"{paths['train_pairs']}: no training pairs (0 rows), nothing to train on; widen "
            f"mining.window_days or relax mining.l / mining.u and rerun `{MINE_STAGE}`"
        )
    known = notes.column("note_id").combine_chunks()
    _check_known(train, known, paths["train_pairs"])
    _check_known(test, known, paths["test_pairs"])
    train_ids = pc.unique(pa.concat_arrays([c.combine_chunks() for c in train.select(PAIR_COLUMNS).columns]))
    test_ids = pc.unique(pa.concat_arrays([c.combine_chunks() for c in test.select(PAIR_COLUMNS).columns]))
    all_notes = notes.sort_by("note_id")
    train_notes = all_notes.filter(pc.is_in(all_notes.column("note_id"), value_set=train_ids))
    counts = {
        "notes": notes.num_rows,
        "train_pairs": train.num_rows,
        "test_pairs": test.num_rows,
        "train_notes": train_notes.num_rows,
        "test_pair_notes": len(test_ids),
    }
    return train_notes, all_notes, counts


# ------------------------------------------------------------------------------------ Ray Data


class EncodePrompts:
    """Ray Data class UDF: one tokenizer (with [EMB]) per actor; pyarrow batch in, prompts out."""

    def __init__(self, model_name: str, prompt_cfg: dict[str, Any], variant: str, emb_token_id: int) -> None:
        tokenizer = load_tokenizer(model_name, fresh=True)
        self.builder = PromptBuilder(tokenizer, PromptConfig.model_validate(prompt_cfg))
        self.variant = variant
        if self.builder.emb_token_id != emb_token_id:
            raise PromptError(
                f"[EMB] got id {self.builder.emb_token_id} in a worker but {emb_token_id} in the driver"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.builder.encode_table(batch, self.variant)  # type: ignore[arg-type]


def encode_with_ray(notes: pa.Table, cfg: PipelineConfig, variant: str, emb_token_id: int, out_dir: Path) -> None:
    """Tokenize ``notes`` (sorted) with an actor pool and write Parquet shards to ``out_dir``."""
    import ray

    blocks = max(1, math.ceil(notes.num_rows / cfg.prompts.batch_size))
    # one CPU is left to the Parquet write tasks that run beside the actors
    actors = max(1, min(blocks, int(ray.cluster_resources().get("CPU", 1)) - 1))
    ds = ray.data.from_arrow(notes, override_num_blocks=blocks).map_batches(
        EncodePrompts,
        fn_constructor_kwargs={
            "model_name": cfg.model.name,
            "prompt_cfg": cfg.prompts.model_dump(mode="json"),
            "variant": variant,
            "emb_token_id": emb_token_id,
        },
        batch_size=cfg.prompts.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )
    ds.write_parquet(str(out_dir), min_rows_per_file=cfg.prompts.rows_per_file)


# ------------------------------------------------------------------------------------ output


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """p50 / p95 / max / mean of token lengths (zeros for an empty array)."""
    if lengths.size == 0:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0, "mean": 0.0}
    return {
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": float(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
    }


def summarize(train: pa.Table, embed: pa.Table) -> dict[str, Any]:
    """Counts and token-length statistics of written train and embed prompts."""
    task = train.column("task")
    summary: dict[str, Any] = {
        "train_rows": train.num_rows,
        "embed_rows": embed.num_rows,
        "hashtag_task_share": round(pc.mean(pc.equal(task, HASHTAG).cast(pa.float64())).as_py() or 0.0, 4),
        "length": {"train": length_stats(train.column("length").to_numpy()),
                   "embed": length_stats(embed.column("length").to_numpy())},
        "truncated": {},
    }
    for t in ("category", "hashtag"):
        rows = train.filter(pc.equal(task, t))
        summary["length"][t] = length_stats(rows.column("length").to_numpy())
        summary[f"{t}_rows"] = rows.num_rows
    for name, table in (("train", train), ("embed", embed)):
        summary["truncated"][name] = {
            "title": int(pc.sum(table.column("title_truncated").cast(pa.int64())).as_py() or 0),
            "content": int(pc.sum(table.column("content_truncated").cast(pa.int64())).as_py() or 0),
        }
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"prompts: {s['train_rows']} training notes ({s['category_rows']} category, {s['hashtag_rows']} "
        f"hashtag task: share {s['hashtag_task_share']:.3f}), {s['embed_rows']} embedding prompts",
        "tokens        p50     p95     max    mean",
    ]
    for key in ("category", "hashtag", "train", "embed"):
        st = s["length"][key]
        lines.append(f"  {key:<9} {st['p50']:>6.0f}  {st['p95']:>6.0f}  {st['max']:>6.0f}  {st['mean']:>6.1f}")
    for key in ("train", "embed"):
        tr = s["truncated"][key]
        lines.append(f"truncated ({key}): title {tr['title']}, content {tr['content']}")
    return "\n".join(lines)


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by the complete folder ``tmp`` (same file system) with renames; the
    previous ``final`` is moved aside first and deleted only once ``tmp`` is in place."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / final.name)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_prompts(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the stage (see the module docstring); returns the summary (also in summary.json)."""
    import ray

    started = time.perf_counter()
    train_notes, all_notes, counts = load_inputs(cfg)
    tokenizer = load_tokenizer(cfg.model.name, fresh=True)
    builder = PromptBuilder(tokenizer, cfg.prompts)
    meta = {
        "model": cfg.model.name,
        "vocab_size": len(tokenizer),
        "emb_token": builder.emb_token,
        "emb_token_id": builder.emb_token_id,
        "bos_token_id": builder.bos_token_id,
        "eos_token_id": builder.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "prompts": cfg.prompts.model_dump(mode="json"),
    }

    out = stage_paths(cfg)["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # left by a crashed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the published folder gets normal permissions
    try:
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS under `ray job submit`, else a local cluster
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        encode_with_ray(train_notes, cfg, "train", builder.emb_token_id, tmp / "train")
        encode_with_ray(all_notes, cfg, "embed", builder.emb_token_id, tmp / "embed")
        train = pq.read_table(tmp / "train", columns=["note_id", "task", "length", "title_truncated",
                                                      "content_truncated"])
        embed = pq.read_table(tmp / "embed", columns=["note_id", "length", "title_truncated",
                                                      "content_truncated"])
        if train.num_rows != train_notes.num_rows or embed.num_rows != all_notes.num_rows:
            raise PromptError(
                f"wrote {train.num_rows} train / {embed.num_rows} embed rows, expected "
                f"{train_notes.num_rows} / {all_notes.num_rows}"
            )
        summary = summarize(train, embed)
        summary["inputs"] = counts
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["output"] = str(out)
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"inputs: {counts['notes']} notes, {counts['train_pairs']} training pairs over "
          f"{counts['train_notes']} notes, {counts['test_pairs']} test pairs over {counts['test_pair_notes']} notes")
    if counts["test_pairs"] == 0:
        print("warning: no test pairs; evaluation will have no queries")
    print(format_summary(summary))
    print(f"wrote {out} in {summary['seconds']:.1f}s")
    return summary


def log_to_mlflow(cfg: PipelineConfig, summary: dict[str, Any]) -> str:
    """One MLflow run (experiment ``<registry.model_name>-data``); returns its id."""
    import mlflow

    mlflow.set_experiment(f"{cfg.registry.model_name}-data")
    with mlflow.start_run(run_name="build_prompts") as run:
        mlflow.log_params({f"prompts.{k}": v for k, v in cfg.prompts.model_dump(mode="json").items()}
                          | {"model.name": cfg.model.name})
        metrics = {
            "train_rows": summary["train_rows"],
            "embed_rows": summary["embed_rows"],
            "hashtag_task_share": summary["hashtag_task_share"],
            "seconds": summary["seconds"],
        }
        for key, st in summary["length"].items():
            for stat, value in st.items():
                metrics[f"length.{key}.{stat}"] = value
        for key, tr in summary["truncated"].items():
            for field, value in tr.items():
                metrics[f"truncated.{key}.{field}"] = value
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(summary, "build_prompts/summary.json")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    return run_stage("pipelines.build_prompts", __doc__, lambda cfg, _: build_prompts(cfg), log_to_mlflow,
                     (PromptStageError, PromptError, ModelResolutionError), argv)

if __name__ == "__main__":
    sys.exit(main())
