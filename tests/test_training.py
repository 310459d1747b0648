"""Training: batching, the GCL + CSFT step on tiny-llama, checkpoints, the Ray Train job, bad inputs.

Inputs are real: notes of the default dataset, encoded by the real ``PromptBuilder`` into
``TRAIN_SCHEMA`` rows; pairs link consecutive notes of the same category.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from notellm.config import PipelineConfig, load_config
from notellm.modeling import TrainableStateError, build_notellm
from notellm.models import ModelResolutionError, load_causal_lm, load_tokenizer
from notellm.prompts import IGNORE_INDEX
from notellm.training import (
    TRAINABLE_STATE_FILE,
    BatchPlan,
    TrainingDataError,
    build_optimizer,
    check_training_inputs,
    collate,
    epoch_batches,
    load_checkpoint,
    load_training_data,
    resume_candidates,
    save_checkpoint,
    seed_everything,
    train_step,
)
from pipelines import train as train_stage
from train_inputs import write_train_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTES_PATH = REPO_ROOT / "data/stackexchange/notes.parquet"
NOTES_PER_CATEGORY = 8


def make_inputs(work: Path, model: str = "tiny-llama") -> int:
    """Write ``pairs/train.parquet`` and ``prompts/{train/,meta.json}`` under ``work``; returns the
    number of pairs (consecutive notes of one category, NOTES_PER_CATEGORY notes per category)."""
    cfg = load_config(REPO_ROOT / "configs/tiny.yaml", [f"data.work_dir={work}", f"model.name={model}"])
    notes = pq.read_table(NOTES_PATH).select(["note_id", "title", "content", "hashtags", "category"])
    notes = notes.sort_by([("category", "ascending"), ("note_id", "ascending")])
    rows: list[dict] = []
    for cat in sorted(set(notes.column("category").to_pylist())):
        rows += notes.filter(pc.equal(notes.column("category"), cat)).slice(0, NOTES_PER_CATEGORY).to_pylist()
    write_train_prompts(cfg, pa.Table.from_pylist(rows))
    pairs = [(a["note_id"], b["note_id"]) for a, b in zip(rows, rows[1:]) if a["category"] == b["category"]]
    (work / "pairs").mkdir()
    pq.write_table(pa.table({"note_id": [a for a, _ in pairs], "related_note_id": [b for _, b in pairs],
                             "score": [1.0] * len(pairs), "n_users": [1] * len(pairs)}),
                   work / "pairs" / "train.parquet")
    return len(pairs)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("train_inputs")
    return folder, make_inputs(folder)


def tiny_cfg(work: Path, *overrides: str) -> PipelineConfig:
    return load_config(REPO_ROOT / "configs/tiny.yaml", [f"data.work_dir={work}", *overrides])


# ------------------------------------------------------------------------------------ batching


def test_data_join_and_batch_layout(work):
    folder, num_pairs = work
    cfg = tiny_cfg(folder, "training.pairs_per_batch=8")
    data = load_training_data(cfg)
    assert data.num_pairs == num_pairs
    pairs = pq.read_table(folder / "pairs/train.parquet").to_pylist()
    assert [(data.note_ids[a], data.note_ids[b]) for a, b in data.pairs] == [
        (p["note_id"], p["related_note_id"]) for p in pairs]

    plan = BatchPlan(data, 8, seed=0)
    epoch = np.concatenate([plan.global_pairs(s) for s in range(plan.steps_per_epoch)])
    assert len(set(epoch.tolist())) == plan.steps_per_epoch * 8  # each pair at most once an epoch
    assert [plan.global_pairs(s).tolist() for s in range(10)] == [
        BatchPlan(data, 8, seed=0).global_pairs(s).tolist() for s in range(10)]  # position = step
    assert any(not np.array_equal(plan.global_pairs(s), BatchPlan(data, 8, seed=1).global_pairs(s))
               for s in range(3))
    assert not np.array_equal(plan.global_pairs(0), plan.global_pairs(plan.steps_per_epoch))  # reshuffled

    # rank r of W = 2 takes pairs [r*b:(r+1)*b] and lays them out [a_1..a_b, b_1..b_b]
    pad = data.meta["pad_token_id"]
    global_pairs = plan.global_pairs(3)
    for rank in range(2):
        batch = plan.local_batch(3, rank, 2, pad)
        mine = global_pairs[rank * 4:(rank + 1) * 4]
        assert torch.equal(batch["input_ids"], collate(data, mine, pad)["input_ids"])
        rows = [data.pairs[p][0] for p in mine] + [data.pairs[p][1] for p in mine]
        for k, row in enumerate(rows):
            n = batch["lengths"][k].item()
            assert batch["input_ids"][k, :n].tolist() == data.input_ids[row]
            assert batch["labels"][k, :n].tolist() == data.labels[row]
            assert (batch["labels"][k, n:] == IGNORE_INDEX).all()
            assert batch["input_ids"][k, batch["emb_pos"][k] + 1].item() == data.meta["emb_token_id"]


def test_same_category_batches_hold_one_category_and_cover_the_epoch():
    rng = np.random.default_rng(0)
    group = np.repeat([0, 1, 2], [37, 21, 6])  # 64 pairs; the 6 of group 2 fit no batch of 8 alone
    length = rng.integers(50, 150, len(group))
    batches = epoch_batches(length, 8, seed=0, epoch=0, pair_group=group)
    assert batches.shape == (64 // 8, 8)
    assert len(set(batches.ravel().tolist())) == 64  # every pair once
    pure = [b for b in batches if len(set(group[b].tolist())) == 1]
    assert len(pure) == 37 // 8 + 21 // 8  # whole batches within a category; remainders pooled
    assert np.array_equal(batches, epoch_batches(length, 8, seed=0, epoch=0, pair_group=group))
    assert not np.array_equal(batches, epoch_batches(length, 8, seed=0, epoch=1, pair_group=group))


def test_same_category_batching_reads_the_ingested_categories(work, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(work[0], folder)
    with pytest.raises(TrainingDataError, match="ingested/notes.parquet does not exist"):
        load_training_data(tiny_cfg(folder, "training.batching=same_category"))
    (folder / "ingested").mkdir()
    shutil.copy(NOTES_PATH, folder / "ingested/notes.parquet")
    data = load_training_data(tiny_cfg(folder, "training.batching=same_category"))
    category = dict(zip(*pq.read_table(NOTES_PATH, columns=["note_id", "category"]).to_pydict().values()))
    first = [category[data.note_ids[a]] for a, _ in data.pairs]
    names = sorted(set(first))
    assert data.pair_group.tolist() == [names.index(c) for c in first]
    assert load_training_data(tiny_cfg(folder)).pair_group is None


# ------------------------------------------------------------------------------------ the step


def test_loss_decreases_on_tiny_llama(work):
    folder, _ = work
    cfg = tiny_cfg(folder, "training.pairs_per_batch=8", "training.num_workers=1", "training.lr=1e-2",
                   "training.max_steps=30")
    data = load_training_data(cfg)
    seed_everything(0)
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True)
    optimizer, scheduler = build_optimizer(model, cfg)
    plan = BatchPlan(data, 8, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other tests: one thread is faster here
    try:
        history = [train_step(model, plan.local_batch(s, 0, 1, model.pad_token_id), optimizer, scheduler, cfg)
                   for s in range(30)]
    finally:
        torch.set_num_threads(threads)
    losses = [m["loss"] for m in history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert history[0]["notes"] == 16 and history[0]["tokens"] > 16
    assert history[0]["lr"] < history[2]["lr"] and history[-1]["lr"] < history[5]["lr"]  # warmup, decay
    assert history[-1]["tau"] != pytest.approx(cfg.model.tau_init, abs=1e-6)  # tau is trained


DDP_STEPS = 2
DDP_OVERRIDES = ("training.pairs_per_batch=8", "lora.dropout=0.0", "training.alpha=1.0")  # CSFT weighs in


def _run_steps(folder: Path, rank: int, world: int) -> list[dict[str, float]]:
    cfg = tiny_cfg(folder, *DDP_OVERRIDES, f"training.num_workers={world}")
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True)
    optimizer, scheduler = build_optimizer(model, cfg)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    plan = BatchPlan(load_training_data(cfg), 8, seed=0)
    return [train_step(wrapped, plan.local_batch(s, rank, world, model.pad_token_id), optimizer, scheduler, cfg)
            for s in range(DDP_STEPS)]


def _ddp_worker(rank: int, world: int, port: int, folder: str, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        history = _run_steps(Path(folder), rank, world)
        if rank == 0:
            Path(out_file).write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_train_step_matches_single_process(work, tmp_path):
    """The whole step under DDP (global negatives, CSFT global token count, gradient averaging)
    gives the single-process metrics and gradient norm of the same global batch."""
    folder, _ = work
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_file = tmp_path / "rank0.json"
    mp.spawn(_ddp_worker, args=(2, port, str(folder), str(out_file)), nprocs=2, join=True)
    ddp = json.loads(out_file.read_text())
    single = _run_steps(folder, 0, 1)
    for key in ("loss", "l_cl", "l_gen", "grad_norm", "tokens", "notes", "lr"):
        assert ddp[0][key] == pytest.approx(single[0][key], rel=1e-4), key
    for key in ("loss", "l_cl", "l_gen"):  # after one AdamW update
        assert ddp[1][key] == pytest.approx(single[1][key], rel=1e-3), key


def test_checkpoint_round_trip_and_other_base_model(work, tmp_path):
    folder, _ = work
    cfg = tiny_cfg(folder, "training.pairs_per_batch=4", "training.num_workers=1")
    data = load_training_data(cfg)
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True)
    optimizer, scheduler = build_optimizer(model, cfg)
    plan = BatchPlan(data, 4, seed=0)
    for s in range(2):
        train_step(model, plan.local_batch(s, 0, 1, model.pad_token_id), optimizer, scheduler, cfg)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, 2, cfg)

    fresh, _ = build_notellm(cfg.model, cfg.lora, for_training=True)
    opt2, sch2 = build_optimizer(fresh, cfg)
    state = load_checkpoint(tmp_path / "ckpt", fresh, opt2, sch2)
    assert state["step"] == 2 and state["pairs_seen"] == 8
    for name, value in model.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], value), name
    assert sch2.last_epoch == 2 and opt2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    other, _ = build_notellm(cfg.model, cfg.lora, for_training=True, seed=1)  # other tiny-llama weights
    with pytest.raises(TrainableStateError, match="base model"):
        load_checkpoint(tmp_path / "ckpt", other)

    # resume picks the newest COMPLETE folder: one still being copied (no optimizer file) is skipped
    run = tmp_path / "run"
    for step in (2, 4, 6):
        save_checkpoint(run / f"checkpoint_{step}", model, optimizer, scheduler, step, cfg)
    (run / "checkpoint_6" / "optimizer.pt").unlink()
    assert [s for s, _ in resume_candidates(run_dir=run)] == [4, 2]
    with_handed = resume_candidates(tmp_path / "ckpt", run_dir=run)
    assert len(with_handed) == 3 and (2, (tmp_path / "ckpt").resolve()) in with_handed
    assert resume_candidates(run_dir=tmp_path / "missing") == []


# ------------------------------------------------------------------------------------ bad inputs


def test_fewer_pairs_than_a_global_batch_is_refused(work, capsys):
    folder, num_pairs = work
    cfg = tiny_cfg(folder, "training.pairs_per_batch=64")
    assert num_pairs < 64
    with pytest.raises(TrainingDataError, match="fewer than one global batch"):
        check_training_inputs(load_training_data(cfg), cfg)
    rc = train_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={folder}",
                           "training.pairs_per_batch=64"])
    assert rc == 2 and "fewer than one global batch" in capsys.readouterr().err


def test_missing_inputs_and_indivisible_batch_are_refused(tmp_path, capsys):
    rc = train_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={tmp_path}"])
    assert rc == 2 and "pipelines.mine_pairs" in capsys.readouterr().err
    rc = train_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={tmp_path}",
                           "training.pairs_per_batch=5", "training.num_workers=2"])
    assert rc == 2 and "divisible" in capsys.readouterr().err


def test_base_model_without_tokenizer_is_refused(work, tmp_path, capsys):
    folder, _ = work
    model, _ = load_causal_lm("tiny-llama", fresh=True)
    model.save_pretrained(tmp_path / "no_tokenizer")  # weights + config, no tokenizer files
    with pytest.raises(ModelResolutionError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "no_tokenizer"), fresh=True)
    rc = train_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={folder}",
                           f"model.name={tmp_path / 'no_tokenizer'}"])
    assert rc == 2 and "no tokenizer" in capsys.readouterr().err


def test_resuming_from_another_base_models_checkpoint_is_refused(work, tmp_path, capsys):
    folder, _ = work
    cfg = tiny_cfg(folder, f"training.storage_path={tmp_path}", "training.run_name=r")
    other, _ = build_notellm(cfg.model, cfg.lora, for_training=True, seed=1)  # other tiny-llama weights
    optimizer, scheduler = build_optimizer(other, cfg)
    save_checkpoint(tmp_path / "r" / "checkpoint_0", other, optimizer, scheduler, 2, cfg)
    rc = train_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={folder}",
                           f"training.storage_path={tmp_path}", "training.run_name=r"])
    assert rc == 2 and "another base model" in capsys.readouterr().err


def test_resuming_with_another_global_batch_size_is_refused(work, tmp_path, capsys):
    folder, _ = work
    cfg = tiny_cfg(folder, f"training.storage_path={tmp_path}", "training.run_name=r")
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True)
    optimizer, scheduler = build_optimizer(model, cfg)
    save_checkpoint(tmp_path / "r" / "checkpoint_0", model, optimizer, scheduler, 2, cfg)
    rc = train_stage.main(["--config", str(REPO_ROOT / "configs/tiny.yaml"), f"data.work_dir={folder}",
                           f"training.storage_path={tmp_path}", "training.run_name=r", "training.pairs_per_batch=8"])
    assert rc == 2 and "training.pairs_per_batch=4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Ray Train


@pytest.fixture
def ray_client(services):
    import ray

    if ray.is_initialized():  # a connection an earlier test's pipeline left open
        ray.shutdown()
    ray.init(address=services.ray_address)
    yield services
    ray.shutdown()


@pytest.mark.slow
def test_torch_trainer_two_workers_checkpoints_and_resumes(work, ray_client, tmp_path):
    from mlflow.tracking import MlflowClient

    folder, _ = work
    common = ["training.num_workers=2", "training.pairs_per_batch=4", "training.checkpoint_every=2",
              f"training.storage_path={tmp_path / 'ray_results'}", "training.run_name=t2"]
    first = train_stage.train(tiny_cfg(folder, *common, "training.max_steps=4"), threads_per_worker=1)
    assert first["step"] == 4 and first["metrics"]["start_step"] == 0
    ckpt = first["checkpoint"]
    cfg = tiny_cfg(folder, *common)
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert load_checkpoint(ckpt, model)["step"] == 4
    after = model.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained weights came back
    assert json.loads((ckpt / "config.json").read_text())["training"]["run_name"] == "t2"

    # same storage path and run name: resumes from the step-4 checkpoint
    second = train_stage.train(tiny_cfg(folder, *common, "training.max_steps=6"), threads_per_worker=1)
    assert second["metrics"]["start_step"] == 4 and second["step"] == 6
    assert (second["checkpoint"] / TRAINABLE_STATE_FILE).exists()

    client = MlflowClient(ray_client.mlflow_url)
    run_id = second["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 6]
    artefacts = {a.path for a in client.list_artifacts(run_id, "model")} | {
        a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"model/trainable_state.safetensors", "plots/loss_curve.png"} <= artefacts
    assert client.get_run(run_id).data.params["training.max_steps"] == "6"


def _train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker actors on the session's cluster."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if "TrainWorker" in (a.class_name or "") and a.pid]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/train_state.json"))


@pytest.mark.slow
def test_killed_worker_restarts_the_group_from_the_last_checkpoint(work, ray_client, tmp_path):
    """SIGKILL one real worker process mid-run: Ray Train (FailureConfig) restarts the worker group
    and training continues from the last checkpoint's step, not from 0, to the last step."""
    import signal
    import threading
    import time

    folder, _ = work
    storage = tmp_path / "ray_results"
    steps = 40  # the kill lands after the step-5 checkpoint, 35 steps (~15 s on 2 cores) before the end
    cfg = tiny_cfg(folder, "training.num_workers=2", "training.pairs_per_batch=4", f"training.max_steps={steps}",
                   "training.checkpoint_every=5", "training.max_failures=1", "training.log_every=10",
                   f"training.storage_path={storage}", "training.run_name=killed")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train_stage.train(cfg, threads_per_worker=1)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not _checkpoint_steps(storage / "killed") and thread.is_alive():
        time.sleep(0.2)
    before_kill = _checkpoint_steps(storage / "killed")
    assert before_kill and thread.is_alive(), f"no checkpoint while training ran: {outcome}"
    victims = _train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    resumed_at = result["metrics"]["start_step"]
    assert resumed_at > 0 and resumed_at % 5 == 0 and resumed_at >= before_kill[-1], (resumed_at, before_kill)
    assert resumed_at < steps and result["step"] == steps


@pytest.mark.slow
def test_smollm2_short_run_through_ray_job_submit(submit_stage, services, tmp_path):
    """The real default model (SmolLM2-135M + LoRA, bf16 autocast) for 3 steps on 2 workers,
    submitted with `ray job submit` to the local cluster; MLflow gets per-step metrics and the
    adapter-sized trainable state."""
    import re

    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    work = tmp_path / "work"
    make_inputs(work, model="smollm2-135m")
    proc = submit_stage("pipelines.train", work, "training.max_steps=3", "training.checkpoint_every=3",
                        f"training.storage_path={tmp_path / 'runs'}", "training.run_name=smol")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "step 3/3" in out and "done: step 3" in out
    assert len(re.findall(r"step \d/3 loss", out)) == 3  # one progress line per step (not Ray Train's print twice)
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out).group(1)
    client = MlflowClient(services.mlflow_url)
    assert [m.step for m in client.get_metric_history(run_id, "l_cl")] == [1, 2, 3]
    (ckpt,) = [p for p in (tmp_path / "runs" / "smol").glob("checkpoint_*") if p.is_dir()]
    state = ckpt / TRAINABLE_STATE_FILE
    assert state.stat().st_size < 30e6  # adapter + [EMB] row + head, not the 135M-parameter base (~270 MB)
    with safe_open(str(state), framework="pt") as fh:
        names = list(fh.keys())
    assert any("lora_A" in n for n in names) and any("proj" in n for n in names)
    assert client.get_run(run_id).info.status == "FINISHED"
