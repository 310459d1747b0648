"""The main job at this stage: ingest → validate → summary, locally and through `ray job submit`."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from notellm.config import REPO_ROOT, load_config
from pipelines.ingest import ingest



def test_ingest_default_dataset_writes_clean_tables_and_stats(tmp_path):
    cfg = load_config(REPO_ROOT / "configs/demo.yaml", [f"data.work_dir={tmp_path}"])
    stats = ingest(cfg)
    notes = pq.read_table(tmp_path / "ingested/notes.parquet")
    behaviors = pq.read_table(tmp_path / "ingested/behaviors.parquet")
    raw_notes = pq.read_table(REPO_ROOT / "data/stackexchange/notes.parquet")
    # independent recount from the committed files
    assert stats["notes"] == notes.num_rows == raw_notes.num_rows
    assert stats["behaviors"] == behaviors.num_rows
    per_cat = raw_notes.group_by("category").aggregate([("note_id", "count")]).to_pylist()
    assert {r["category"]: r["note_id_count"] for r in per_cat} == {
        cat: s["notes"] for cat, s in stats["per_category"].items()
    }
    assert len(stats["per_category"]) == 8
    on_disk = json.loads((tmp_path / "ingested/stats.json").read_text())
    assert on_disk["notes"] == stats["notes"] and on_disk["validation"]["tables"]["notes"]["rows_kept"] == stats["notes"]


def _cli(args, env=None, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_bad_input_exits_2_naming_file_row_field_and_keeps_previous_output(tmp_path):
    cfg_args = ["--config", str(REPO_ROOT / "configs/demo.yaml"), f"data.work_dir={tmp_path}"]
    assert _cli(cfg_args).returncode == 0
    before = (tmp_path / "ingested/notes.parquet").read_bytes()

    notes = pq.read_table(REPO_ROOT / "data/stackexchange/notes.parquet")
    ids = notes.column("note_id").to_pylist()
    ids[5] = ids[2]  # a duplicate note_id at row 5
    bad = tmp_path / "bad_notes.parquet"
    pq.write_table(notes.set_column(0, "note_id", pa.array(ids, pa.string())), bad)
    proc = _cli([*cfg_args, f"data.notes={bad}"])
    assert proc.returncode == 2
    assert "bad_notes.parquet" in proc.stderr and "row 5" in proc.stderr and "note_id" in proc.stderr
    assert "duplicate" in proc.stderr
    assert (tmp_path / "ingested/notes.parquet").read_bytes() == before


@pytest.mark.slow
def test_ingest_runs_as_a_ray_job_and_logs_to_mlflow(services, submit_stage, tmp_path):
    proc = submit_stage("pipelines.ingest", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert (tmp_path / "ingested/behaviors.parquet").is_file()
    stats = json.loads((tmp_path / "ingested/stats.json").read_text())
    run_id = next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("MLflow run "))
    run = MlflowClient(services.mlflow_url).get_run(run_id)
    assert run.data.metrics["notes"] == stats["notes"]
    assert run.data.metrics["behaviors"] == stats["behaviors"]
