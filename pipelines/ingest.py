"""Ingest: read the notes and behaviours named by the config, validate them, write the clean tables.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m pipelines.ingest --config configs/demo.yaml [key=value ...]

Reads ``data.notes`` / ``data.behaviors`` (Parquet file or folder, or JSONL), validates them
against the data contract (``notellm.data.validate``; policy ``data.on_row_error``), writes
``<data.work_dir>/ingested/{notes,behaviors}.parquet`` and ``stats.json`` atomically, prints a
per-category summary, and logs the counts to MLflow when ``MLFLOW_TRACKING_URI`` is set.
Exit code 2 with a message naming file, row, field and reason on invalid input; nothing already
written is touched in that case.
"""

from __future__ import annotations

import json
import sys
import time

from notellm.config import PipelineConfig
from notellm.data.io import DataValidationError, write_table
from notellm.data.stats import dataset_stats, format_stats
from notellm.data.validate import load_and_validate
from notellm.io_utils import atomic_write_text
from notellm.stage_cli import run_stage


def ingest(cfg: PipelineConfig) -> dict:
    """Validate and write the clean tables; returns the stats (also written as ``stats.json``)."""
    started = time.perf_counter()
    notes, behaviors, report = load_and_validate(cfg.data)
    out_dir = cfg.resolve_path(cfg.data.work_dir) / "ingested"
    write_table(out_dir / "notes.parquet", notes, "notes")
    write_table(out_dir / "behaviors.parquet", behaviors, "behaviors")
    stats = dataset_stats(notes, behaviors)
    stats["validation"] = report.to_dict()
    stats["inputs"] = {
        "notes": str(cfg.resolve_path(cfg.data.notes)),
        "behaviors": str(cfg.resolve_path(cfg.data.behaviors)),
    }
    stats["outputs"] = {"notes": str(out_dir / "notes.parquet"), "behaviors": str(out_dir / "behaviors.parquet")}
    stats["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    print(report.summary())
    print(format_stats(stats))
    print(f"wrote {out_dir} in {stats['seconds']:.1f}s")
    return stats


def log_to_mlflow(cfg: PipelineConfig, stats: dict) -> str:
    """One MLflow run (experiment ``<registry.model_name>-data``) with the counts; returns its id."""
    import mlflow

    mlflow.set_experiment(f"{cfg.registry.model_name}-data")
    with mlflow.start_run(run_name="ingest") as run:
        mlflow.log_params({"data.notes": stats["inputs"]["notes"], "data.behaviors": stats["inputs"]["behaviors"],
                           "data.on_row_error": cfg.data.on_row_error})
        metrics = {"notes": stats["notes"], "behaviors": stats["behaviors"], "users": stats["users"]}
        for cat, s in stats["per_category"].items():
            metrics[f"notes.{cat}"] = s["notes"]
            metrics[f"behaviors.{cat}"] = s["behaviors"]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(stats, "ingest/stats.json")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    return run_stage("pipelines.ingest", __doc__, lambda cfg, _: ingest(cfg), log_to_mlflow,
                     (DataValidationError,), argv)

if __name__ == "__main__":
    sys.exit(main())
