"""Encoders and batch embedding: batch/order invariance, ids through a shuffled Ray run, restarts.

Real components: tiny-llama NoteLLM with a saved checkpoint, the real SmolLM2 tokenizer, MiniLM,
the session's Ray cluster (``services``) for the Ray Data actor pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notellm.config import PipelineConfig, load_config
from notellm.embedding_store import read_embeddings, table_vectors
from notellm.encoders import EncoderError, describe_encoder, embed_notes, load_encoder
from notellm.modeling import build_notellm
from notellm.training import TRAINABLE_STATE_FILE
from pipelines import embed as embed_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTES = REPO_ROOT / "data/stackexchange/notes.parquet"


def tiny_cfg(work: Path, *overrides: str) -> PipelineConfig:
    return load_config(REPO_ROOT / "configs/tiny.yaml", [f"data.work_dir={work}", *overrides])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The saved trainable state (LoRA, [EMB] row, projection, tau) of a tiny-llama NoteLLM."""
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg(folder)
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=False)
    model.save_trainable_state(folder / TRAINABLE_STATE_FILE)
    return folder


@pytest.fixture(scope="module")
def notes() -> list[dict]:
    table = pq.read_table(NOTES, columns=embed_stage.NOTE_COLUMNS)
    return table.take(np.random.default_rng(0).permutation(table.num_rows)[:48]).to_pylist()


@pytest.mark.parametrize("method", ["notellm", "llm-mean", "llm-last", "prompteol", "minilm"])
def test_vectors_do_not_depend_on_batch_order_or_length_sorting(method, checkpoint, notes, tmp_path):
    cfg = tiny_cfg(tmp_path)
    encoder = load_encoder(cfg, method, checkpoint if method == "notellm" else None)
    # what the driver writes before any actor loads the model (configs and hashes only)
    assert describe_encoder(cfg, method, checkpoint if method == "notellm" else None) == encoder.info
    sorted_batches = embed_notes(encoder, notes, batch_size=8)
    unsorted = embed_notes(encoder, notes, batch_size=5, sort_by_length=False)
    alone = np.stack([embed_notes(encoder, [n], batch_size=1)[0] for n in notes[:6]])
    assert sorted_batches.shape == (len(notes), encoder.info.dim) and sorted_batches.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sorted_batches, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(sorted_batches, unsorted, atol=2e-5)
    np.testing.assert_allclose(sorted_batches[:6], alone, atol=2e-5)
    assert np.abs(sorted_batches[0] - sorted_batches[1]).max() > 1e-3  # different notes differ
    lengths = [i.length for i in encoder.tokenize(notes)]
    assert len(set(lengths)) > 1  # padding really happens in mixed batches


@pytest.mark.parametrize("method", ["notellm", "llm-mean"])
def test_bf16_autocast_vectors_are_unit_norm_float32_and_close_to_fp32(method, checkpoint, notes, tmp_path):
    fp32 = embed_notes(load_encoder(tiny_cfg(tmp_path), method, checkpoint), notes[:16], batch_size=8)
    bf16 = embed_notes(load_encoder(tiny_cfg(tmp_path, "embedding.bf16=true"), method, checkpoint),
                       notes[:16], batch_size=8)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(bf16 * fp32, axis=1)) > 0.99  # the same direction up to bf16 rounding


def test_encoder_errors_are_clear(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(EncoderError, match="trainable_state.safetensors does not exist"):
        load_encoder(cfg, "notellm", tmp_path)
    with pytest.raises(EncoderError, match="fine-tuned model folder"):
        load_encoder(cfg, "minilm-ft", tmp_path / "nope")
    with pytest.raises(EncoderError, match="unknown encoder method"):
        load_encoder(cfg, "word2vec")
    for method, source in (("notellm", tmp_path), ("minilm-ft", tmp_path / "nope"), ("word2vec", None)):
        with pytest.raises(EncoderError):  # the driver's description fails the same way
            describe_encoder(cfg, method, source)


def test_note_ids_survive_a_shuffled_ray_run_with_two_actors(services, checkpoint, notes, tmp_path):
    import ray

    cfg = tiny_cfg(tmp_path, "embedding.num_actors=2", "embedding.batch_size=4", "embedding.window_batches=2")
    expected = embed_notes(load_encoder(cfg, "notellm", checkpoint), notes, batch_size=8)
    ray.init(address=services.ray_address)
    try:
        table = pa.Table.from_pylist(notes)
        blocks = [table.slice(i, 8) for i in range(0, table.num_rows, 8)]
        # shuffled and materialised first: the two actors then hold both CPUs of this machine
        ds = ray.data.from_arrow(blocks).random_shuffle(seed=1).materialize()
        info = describe_encoder(cfg, "notellm", str(checkpoint))
        out = embed_stage.embed_dataset(ds, cfg, "notellm", str(checkpoint), None, info).to_arrow_refs()
        table = pa.concat_tables(ray.get(out))
    finally:
        ray.shutdown()
    ids = table.column("note_id").to_pylist()
    assert sorted(ids) == sorted(n["note_id"] for n in notes) and ids != [n["note_id"] for n in notes]
    got = table_vectors(table)
    row = {n["note_id"]: i for i, n in enumerate(notes)}
    np.testing.assert_allclose(got, expected[[row[i] for i in ids]], atol=2e-5)
    category = {n["note_id"]: n["category"] for n in notes}
    assert table.column("category").to_pylist() == [category[i] for i in ids]


def test_embed_stage_restarts_from_finished_files_and_drops_another_models(services, checkpoint, tmp_path):
    (tmp_path / "ingested").mkdir()
    notes = pq.read_table(NOTES).slice(0, 40)
    pq.write_table(notes, tmp_path / "ingested" / "notes.parquet")
    cfg = tiny_cfg(tmp_path, f"embedding.checkpoint={checkpoint}", "embedding.rows_per_file=16")
    try:
        _restart_checks(cfg)
    finally:
        import ray

        ray.shutdown()  # embed() connected this process (ray_init); later tests call ray.init


def _restart_checks(cfg: PipelineConfig) -> None:
    first = embed_stage.embed(cfg)
    out = embed_stage.embeddings_dir(cfg)
    parts = sorted(out.glob("part-*.parquet"))
    assert first["notes"] == 40 and [pq.ParquetFile(p).metadata.num_rows for p in parts] == [16, 16, 8]
    before, meta = read_embeddings(out)
    assert meta["encoder"]["checkpoint"] == str(cfg.embedding.checkpoint) and meta["dim"] == 32 and meta["normalized"]

    # a crash after two files: the last part and encoder.json are missing; the rerun embeds only 8 notes
    parts[-1].unlink()
    (out / "encoder.json").unlink()
    (out / "progress.json").write_text(json.dumps({"encoder": meta["encoder"]}))
    second = embed_stage.embed(cfg)
    assert second["embedded_now"] == 8 and second["notes"] == 40
    after, _ = read_embeddings(out)
    vec = dict(zip(after.column("note_id").to_pylist(), table_vectors(after)))
    for nid, v in zip(before.column("note_id").to_pylist(), table_vectors(before)):
        np.testing.assert_allclose(vec[nid], v, atol=1e-6)
    assert embed_stage.embed(cfg)["embedded_now"] == 0  # nothing left to do

    # another encoder into the same folder: the old parts are removed, not mixed in
    llm = embed_stage.embed(cfg, method="llm-mean", out_dir=out)
    assert llm["embedded_now"] == 40 and llm["dim"] == 64
    assert read_embeddings(out)[0].column("embedding").type.list_size == 64


def test_embed_stage_errors(tmp_path, capsys):
    rc = embed_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={tmp_path}"])
    assert rc == 2 and "ingested/notes.parquet does not exist" in capsys.readouterr().err
    (tmp_path / "ingested").mkdir()
    pq.write_table(pq.read_table(NOTES).slice(0, 4), tmp_path / "ingested" / "notes.parquet")
    rc = embed_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={tmp_path}",
                           f"training.storage_path={tmp_path / 'runs'}"])
    assert rc == 2 and "no complete checkpoint" in capsys.readouterr().err
