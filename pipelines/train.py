"""Train: GCL + CSFT fine-tuning of the base LLM as a Ray Train job (method.md sections 3-4).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.train --config configs/tiny.yaml [key=value ...]

Reads ``<data.work_dir>/pairs/train.parquet`` (``pipelines.mine_pairs``) and
``<data.work_dir>/prompts/{train/,meta.json}`` (``pipelines.build_prompts``); the data, batching
and the step are ``notellm.training``. The driver validates everything it can before any worker
starts (config, inputs, tokenizer, at least one global batch of pairs) and exits with code 2 and a
message otherwise. Then a ``TorchTrainer`` runs ``training.num_workers`` workers (DDP; gloo on
CPU, NCCL with ``training.use_gpu``), each seeded with ``rank_seed(training.seed, rank)`` for
dropout (the model weights are identical: DDP broadcasts rank 0's).

Checkpoints: every ``training.checkpoint_every`` steps and at the last step, rank 0 writes the
trainable state (safetensors), optimizer + scheduler state, the global step (which fixes the data
position, see ``notellm.training``) and the resolved config; every worker calls
``ray.train.report`` and only rank 0 attaches the folder. Ray keeps ``training.num_to_keep`` under
``<training.storage_path>/<training.run_name>``. A run started again with the same storage path and
run name (or restarted by Ray after a worker failure, up to ``training.max_failures`` times) resumes
from the latest checkpoint at its saved step.

MLflow (when ``MLFLOW_TRACKING_URI`` is set; experiment ``<registry.model_name>-train``): the driver
opens the run and logs ``cfg.to_flat_dict()`` as params; rank 0 logs the per-step metrics; at the
end the driver logs the final trainable state, the resolved config and a loss-curve PNG. The run id
is printed (``MLflow run <id> at <uri>``) and returned by ``train``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from notellm.config import PipelineConfig
from notellm.stage_cli import ray_init, run_stage
from notellm.modeling import TrainableStateError, base_model_fingerprint
from notellm.models import ModelResolutionError, load_tokenizer
from notellm.prompts import PromptError, add_emb_token
from notellm.training import (
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    TRAINABLE_STATE_FILE,
    TrainingDataError,
    check_training_inputs,
    load_training_data,
)

METRIC_KEYS = ("loss", "l_cl", "l_gen", "tau", "lr", "grad_norm", "tokens_per_s", "notes_per_s")


# ------------------------------------------------------------------------------------ driver


def validate_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything checkable before a worker starts; returns counts. Raises ``TrainingDataError``,
    ``ModelResolutionError`` (e.g. a base model folder without a tokenizer) or ``PromptError``."""
    tokenizer = load_tokenizer(cfg.model.name, fresh=True)
    emb_token_id = add_emb_token(tokenizer, cfg.prompts.emb_token)
    data = load_training_data(cfg)
    check_training_inputs(data, cfg, emb_token_id)
    check_previous_checkpoints(cfg)
    return {"pairs": data.num_pairs, "notes": len(data.note_ids),
            "steps_per_epoch": data.num_pairs // cfg.training.pairs_per_batch}


def check_previous_checkpoints(cfg: PipelineConfig) -> None:
    """A run resumes from ``<storage_path>/<run_name>/checkpoint_*``: refuse, before any worker
    starts, checkpoints made on another base model (``TrainableStateError``) or with another global
    batch size or data seed (``TrainingDataError``: the saved step would point at other batches)
    instead of letting every worker fail on them ``max_failures + 1`` times."""
    from safetensors import safe_open

    expected = base_model_fingerprint(cfg.model.name)
    run_dir = cfg.resolve_path(cfg.training.storage_path) / cfg.training.run_name
    for state in sorted(run_dir.glob(f"checkpoint_*/{TRAINABLE_STATE_FILE}")):
        with safe_open(str(state), framework="pt") as fh:
            theirs = (fh.metadata() or {}).get("base_model_fingerprint")
        if theirs != expected:
            raise TrainableStateError(
                f"{state} was trained on another base model (fingerprint {theirs}, this config's "
                f"{cfg.model.name!r} is {expected}); a run with training.run_name="
                f"{cfg.training.run_name!r} would resume from it: choose another run_name or storage_path")
        saved = json.loads((state.parent / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        saved.setdefault("batching", "random")  # checkpoints written before the option existed
        for key in ("pairs_per_batch", "seed", "batching"):
            if saved[key] != getattr(cfg.training, key):
                raise TrainingDataError(
                    f"{state.parent} was made with training.{key}={saved[key]}, this config has "
                    f"{getattr(cfg.training, key)}: the data position of a resumed run would not match; "
                    f"keep training.{key} or choose another run_name or storage_path")


def _start_mlflow_run(cfg: PipelineConfig) -> str:
    import mlflow

    mlflow.set_experiment(f"{cfg.registry.model_name}-train")
    with mlflow.start_run(run_name=cfg.training.run_name) as run:
        params = {k: ("" if v is None else v) for k, v in cfg.to_flat_dict().items()}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return run.info.run_id


def _finish_mlflow_run(run_id: str, checkpoint_dir: Path | None) -> None:
    """Log the final trainable state, the resolved config and the loss curve to ``run_id``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if checkpoint_dir is not None:
        client.log_artifact(run_id, str(checkpoint_dir / TRAINABLE_STATE_FILE), "model")
        client.log_artifact(run_id, str(checkpoint_dir / CONFIG_FILE), "model")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "l_cl"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in history], [m.value for m in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "loss_curve.png"
        fig.savefig(path, dpi=100)
        client.log_artifact(run_id, str(path), "plots")
    plt.close(fig)
    client.set_terminated(run_id)


def train(cfg: PipelineConfig, threads_per_worker: int | None = None) -> dict[str, Any]:
    """Validate, run the TorchTrainer, return ``{"step", "metrics", "checkpoint", "mlflow_run_id"}``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    counts = validate_inputs(cfg)
    t = cfg.training
    print(f"training on {counts['pairs']} pairs over {counts['notes']} notes: {t.max_steps} steps of "
          f"{t.pairs_per_batch} pairs on {t.num_workers} workers ({counts['steps_per_epoch']} steps/epoch)")
    run_id = _start_mlflow_run(cfg) if os.environ.get("MLFLOW_TRACKING_URI") else None
    ray_init()
    loop_config = {"cfg": cfg.model_dump(mode="json"), "mlflow_run_id": run_id,
                   "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI"), "threads": threads_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=str(cfg.resolve_path(t.storage_path)),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient().set_terminated(run_id, "FAILED")
        raise
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    if run_id is not None:
        _finish_mlflow_run(run_id, checkpoint)
    print(f"done: step {result.metrics.get('step')}, loss {result.metrics.get('loss'):.4f}, "
          f"checkpoint {checkpoint}")
    return {"step": result.metrics.get("step"), "metrics": dict(result.metrics),
            "checkpoint": checkpoint, "mlflow_run_id": run_id}


# ------------------------------------------------------------------------------------ workers


def worker_log(line: str) -> None:
    """Write one progress line from a Ray Train worker, once.

    Ray Train replaces ``print`` on its workers with a call to its logger that, when ``sys.stdout``
    is wrapped (as on these workers), also calls the real ``print``: every line reached the job's
    output twice. Writing to the stream directly prints it once (Ray forwards worker stdout).
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: build, resume, run steps, log (rank 0), checkpoint, report."""
    import ray.train
    import ray.train.torch
    import torch

    from notellm.modeling import base_weights_dtype, build_notellm
    from notellm.training import (
        BatchPlan,
        build_optimizer,
        rank_seed,
        save_checkpoint,
        seed_everything,
        train_step,
    )

    cfg = PipelineConfig.model_validate(config["cfg"])
    t = cfg.training
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(rank_seed(t.seed, rank))
    model, _ = build_notellm(cfg.model, cfg.lora, for_training=True, device=device,
                             dtype=base_weights_dtype(t.bf16, cfg.lora.enabled), emb_token=cfg.prompts.emb_token)
    data = load_training_data(cfg)
    check_training_inputs(data, cfg, model.emb_token_id)
    optimizer, scheduler = build_optimizer(model, cfg)
    start = resume(model, optimizer, scheduler, cfg)
    if rank == 0 and start:
        worker_log(f"resumed from checkpoint at step {start}")
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    plan = BatchPlan(data, t.pairs_per_batch, t.seed)

    client = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["mlflow_uri"])
    started, window_start, window_tokens, window_notes = time.perf_counter(), time.perf_counter(), 0.0, 0.0
    for step in range(start, t.max_steps):
        metrics = train_step(ddp_model, plan.local_batch(step, rank, world, model.pad_token_id),
                             optimizer, scheduler, cfg)
        done = step + 1
        window_tokens += metrics["tokens"]
        window_notes += metrics["notes"]
        if done % t.log_every == 0 or done == t.max_steps:
            now = time.perf_counter()
            elapsed = max(now - window_start, 1e-9)
            metrics["tokens_per_s"], metrics["notes_per_s"] = window_tokens / elapsed, window_notes / elapsed
            window_start, window_tokens, window_notes = now, 0.0, 0.0
            if rank == 0:
                per_step = (now - started) / (done - start)
                worker_log(f"step {done}/{t.max_steps} loss {metrics['loss']:.4f} l_cl {metrics['l_cl']:.4f} "
                           f"l_gen {metrics['l_gen']:.4f} tau {metrics['tau']:.4f} lr {metrics['lr']:.2e} "
                           f"tok/s {metrics['tokens_per_s']:.0f} notes/s {metrics['notes_per_s']:.1f} "
                           f"eta {per_step * (t.max_steps - done):.0f}s")
                if client is not None:
                    from mlflow.entities import Metric

                    stamp = int(time.time() * 1000)
                    client.log_batch(config["mlflow_run_id"], metrics=[
                        Metric(k, float(metrics[k]), stamp, done) for k in METRIC_KEYS])
        if done % t.checkpoint_every == 0 or done == t.max_steps:
            report = {"step": done, "start_step": start, "epoch": step // plan.steps_per_epoch,
                      **{k: metrics[k] for k in ("loss", "l_cl", "l_gen", "tau", "lr")}}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(tmp, model, optimizer, scheduler, done, cfg, config.get("mlflow_run_id"))
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(report)


def resume(model, optimizer, scheduler, cfg: PipelineConfig) -> int:
    """Load the newest complete checkpoint of this run (Ray Train's, or a newer one found in the run
    folder: ``notellm.training.resume_candidates``) into model, optimizer and scheduler; returns its
    step (0 when there is none). Every rank must pick the same step: checked with an all-reduce."""
    import contextlib

    import ray.train
    import torch
    import torch.distributed as dist

    from notellm.training import load_checkpoint, resume_candidates

    start = 0
    run_dir = cfg.resolve_path(cfg.training.storage_path) / cfg.training.run_name
    with contextlib.ExitStack() as stack:
        checkpoint = ray.train.get_checkpoint()
        handed = stack.enter_context(checkpoint.as_directory()) if checkpoint is not None else None
        candidates = resume_candidates(handed, run_dir=run_dir)
        if candidates:
            start = int(load_checkpoint(candidates[0][1], model, optimizer, scheduler)["step"])
    if dist.is_initialized():
        steps = torch.tensor([start, -start], device=model.tau.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if int(steps[0]) != start or -int(steps[1]) != start:
            raise RuntimeError(f"ranks resumed from different steps (max {int(steps[0])}, min "
                               f"{-int(steps[1])}): the run folder {run_dir} changed during start-up")
    return start


# ------------------------------------------------------------------------------------ CLI


def _run_and_report(cfg: PipelineConfig, _config_path: str) -> dict:
    result = train(cfg)
    if result["mlflow_run_id"]:
        print(f"MLflow run {result['mlflow_run_id']} at {os.environ['MLFLOW_TRACKING_URI']}")
    print(json.dumps({"step": result["step"], "checkpoint": str(result["checkpoint"])}))
    return result


def main(argv: list[str] | None = None) -> int:
    return run_stage("pipelines.train", __doc__, _run_and_report, None,
                     (TrainingDataError, ModelResolutionError, PromptError, TrainableStateError), argv)


if __name__ == "__main__":
    sys.exit(main())
