"""GCL + CSFT training, without Ray: data, batching, schedule, one step, checkpoints.

``pipelines.train`` runs this under Ray Train (one process per worker, DDP over gloo/NCCL); the same
functions run in a single process (``torch.distributed`` not initialised: W = 1, rank 0).

Data (``load_training_data``): ``<work_dir>/pairs/train.parquet`` (note_id, related_note_id) joined
by note_id with ``<work_dir>/prompts/train/*.parquet`` (``notellm.prompts.TRAIN_SCHEMA``) for both
notes of each pair, and ``prompts/meta.json`` (tokenizer facts, checked against the model).

Batching (``epoch_batches`` / ``local_pairs``): the data position is the global step alone. Epoch
e = step // steps_per_epoch shuffles the pairs with ``numpy.random.default_rng([seed, e])``; for
length-aware batching the shuffled pairs are cut into windows of ``LENGTH_WINDOW_BATCHES`` x B
pairs, each window is sorted by pair length (the longer note), cut into global batches of B pairs,
and the batches of the epoch are shuffled again (same generator). The incomplete tail is dropped
(every rank needs the same local batch size). Rank r takes pairs ``[r*b:(r+1)*b]`` (b = B/W) of the
global batch and lays its 2b notes out ``[a_1..a_b, b_1..b_b]`` (``notellm.losses.pair_layout``).
So resuming at step s reproduces the exact batches a run without interruption would have seen,
whatever the number of workers.

With ``training.batching=same_category`` the batches are cut within each category (of the pair's
first note; pairs never cross categories here), so every in-batch negative shares the batch's
category: GCL then has to rank within a category instead of mostly telling categories apart
(``epoch_batches``).

Step (``train_step``): ONE forward (``model(batch)``, so DDP prepares its gradient all-reduce) gives
the embeddings and the hidden states; L_cl = ``gathered_gcl_loss`` (global in-batch negatives),
L_gen = ``csft_loss`` over output tokens with the global token count (exact under DDP), L =
``total_loss(alpha)``; backward, gradient clipping, AdamW and the warmup + cosine schedule.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from notellm.config import PipelineConfig
from notellm.distributed import get_rank, get_world_size, global_token_count, note_id_hash
from notellm.losses import csft_loss, gathered_gcl_loss, total_loss
from notellm.modeling import NoteLLM, pad_sequences
from notellm.prompts import IGNORE_INDEX

LENGTH_WINDOW_BATCHES = 8
"""Length-aware batching: pairs are sorted by length within windows of this many global batches."""
MIN_LR_RATIO = 0.1
"""The cosine decay ends at this fraction of ``training.lr``."""

TRAINABLE_STATE_FILE = "trainable_state.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
CHECKPOINT_FILES = (TRAINABLE_STATE_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE, CONFIG_FILE)

PAIR_COLUMNS = ["note_id", "related_note_id"]
PROMPT_COLUMNS = ["note_id", "input_ids", "labels", "length", "emb_pos"]


class TrainingDataError(ValueError):
    """Training inputs are missing, inconsistent or too small; the message says what to run."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """Tokenized training notes and the pairs as row indices.

    ``pairs`` int64 [P, 2]: rows (into the per-note lists) of each pair's two notes.
    ``pair_length`` int64 [P]: the longer of the two prompts (for length-aware batching).
    """

    note_ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]
    emb_pos: list[int]
    pairs: np.ndarray
    pair_length: np.ndarray
    meta: dict[str, Any]
    pair_group: np.ndarray | None = None
    """int64 [P] category code of each pair's first note (``training.batching=same_category``)."""

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])


def data_paths(cfg: PipelineConfig) -> dict[str, Path]:
    """Where the training inputs live under ``data.work_dir``."""
    work = cfg.resolve_path(cfg.data.work_dir)
    return {"pairs": work / "pairs" / "train.parquet", "prompts": work / "prompts" / "train",
            "meta": work / "prompts" / "meta.json", "notes": work / "ingested" / "notes.parquet"}


def load_training_data(cfg: PipelineConfig) -> TrainingData:
    """Read and join the pairs and the training prompts (module docstring).

    Raises ``TrainingDataError`` when an input is missing (naming the stage to run), a pair names a
    note without a prompt, or the prompts were built for another base model."""
    paths = data_paths(cfg)
    for key, stage in (("pairs", "mine_pairs"), ("prompts", "build_prompts"), ("meta", "build_prompts")):
        if not paths[key].exists():
            raise TrainingDataError(
                f"{paths[key]} does not exist: run `python -m pipelines.{stage} --config <config>` "
                f"with the same data.work_dir first")
    meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    if meta.get("model") != cfg.model.name:
        raise TrainingDataError(
            f"{paths['meta']}: prompts were tokenized for model {meta.get('model')!r}, but "
            f"model.name is {cfg.model.name!r}: rerun pipelines.build_prompts with this config")
    pairs = pq.read_table(paths["pairs"], columns=PAIR_COLUMNS)
    prompts = pq.read_table(paths["prompts"], columns=PROMPT_COLUMNS).to_pydict()
    row_of = {nid: i for i, nid in enumerate(prompts["note_id"])}
    left, right = pairs.column("note_id").to_pylist(), pairs.column("related_note_id").to_pylist()
    missing = sorted({n for n in left + right if n not in row_of})
    if missing:
        raise TrainingDataError(
            f"{len(missing)} notes of {paths['pairs']} have no training prompt in {paths['prompts']} "
            f"(e.g. {missing[:3]}): rerun pipelines.build_prompts after pipelines.mine_pairs")
    index = np.array([[row_of[a], row_of[b]] for a, b in zip(left, right)], dtype=np.int64).reshape(-1, 2)
    lengths = np.asarray(prompts["length"], dtype=np.int64)
    return TrainingData(
        note_ids=prompts["note_id"], input_ids=prompts["input_ids"], labels=prompts["labels"],
        emb_pos=prompts["emb_pos"], pairs=index,
        pair_length=lengths[index].max(axis=1) if len(index) else np.zeros(0, np.int64), meta=meta,
        pair_group=pair_categories(paths["notes"], left) if cfg.training.batching == "same_category" else None)


def pair_categories(notes_path: Path, first_notes: Sequence[str]) -> np.ndarray:
    """int64 [P] code of the category of each pair's first note (codes in sorted category order)."""
    if not notes_path.is_file():
        raise TrainingDataError(f"{notes_path} does not exist: training.batching=same_category needs the "
                                "ingested notes (run pipelines.ingest with the same data.work_dir)")
    notes = pq.read_table(notes_path, columns=["note_id", "category"]).to_pydict()
    category = dict(zip(notes["note_id"], notes["category"]))
    missing = [n for n in first_notes if n not in category]
    if missing:
        raise TrainingDataError(f"{notes_path}: {len(missing)} pair notes are not there (e.g. {missing[:3]})")
    names = sorted({str(category[n]) for n in first_notes})
    code = {c: i for i, c in enumerate(names)}
    return np.asarray([code[str(category[n])] for n in first_notes], dtype=np.int64)


def check_training_inputs(data: TrainingData, cfg: PipelineConfig, emb_token_id: int | None = None) -> None:
    """Refuse, before any compute, inputs that cannot make one global batch or do not fit the model."""
    b_global = cfg.training.pairs_per_batch
    if data.num_pairs < b_global:
        raise TrainingDataError(
            f"only {data.num_pairs} training pairs, fewer than one global batch "
            f"(training.pairs_per_batch = {b_global}): lower pairs_per_batch or mine more pairs")
    if emb_token_id is not None and data.meta.get("emb_token_id") != emb_token_id:
        raise TrainingDataError(
            f"prompts use [EMB] id {data.meta.get('emb_token_id')} but the model's tokenizer has "
            f"{emb_token_id}: rerun pipelines.build_prompts with this config")


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def steps_per_epoch(num_pairs: int, pairs_per_batch: int) -> int:
    """Complete global batches per epoch (the tail is dropped)."""
    return num_pairs // pairs_per_batch


def _length_sorted_batches(order: np.ndarray, pair_length: np.ndarray, pairs_per_batch: int,
                           window_batches: int) -> np.ndarray:
    """Pair indices ``order`` (a multiple of B long) -> int64 [len/B, B] batches, sorted by pair
    length within windows of ``window_batches`` batches."""
    window = window_batches * pairs_per_batch
    chunks = [order[i:i + window] for i in range(0, len(order), window)]
    if not chunks:
        return np.zeros((0, pairs_per_batch), np.int64)
    order = np.concatenate([c[np.argsort(pair_length[c], kind="stable")] for c in chunks])
    return order.reshape(-1, pairs_per_batch)


def epoch_batches(pair_length: np.ndarray, pairs_per_batch: int, seed: int, epoch: int,
                  window_batches: int = LENGTH_WINDOW_BATCHES, pair_group: np.ndarray | None = None
                  ) -> np.ndarray:
    """Global batches of one epoch: int64 [steps_per_epoch, B] pair indices (module docstring).

    ``pair_group`` [P] (``training.batching=same_category``): batches are cut within each group,
    so a batch's in-batch negatives share its category; each group's remainder (< B pairs) is pooled
    into mixed batches at the end, so the epoch still has ``steps_per_epoch`` batches."""
    rng = np.random.default_rng([seed, epoch])
    if pair_group is None:
        order = rng.permutation(len(pair_length))
        order = order[: steps_per_epoch(len(order), pairs_per_batch) * pairs_per_batch]
        batches = _length_sorted_batches(order, pair_length, pairs_per_batch, window_batches)
        return batches[rng.permutation(len(batches))]
    parts, rest = [], []
    for group in np.unique(pair_group):
        order = np.flatnonzero(pair_group == group)
        order = order[rng.permutation(len(order))]
        full = len(order) // pairs_per_batch * pairs_per_batch
        parts.append(_length_sorted_batches(order[:full], pair_length, pairs_per_batch, window_batches))
        rest.append(order[full:])
    leftover = np.concatenate(rest)
    leftover = leftover[rng.permutation(len(leftover))]
    leftover = leftover[: len(leftover) // pairs_per_batch * pairs_per_batch]
    parts.append(_length_sorted_batches(leftover, pair_length, pairs_per_batch, window_batches))
    batches = np.concatenate(parts)
    return batches[rng.permutation(len(batches))]


class BatchPlan:
    """The pairs of every global step (one epoch's batches cached at a time)."""

    def __init__(self, data: TrainingData, pairs_per_batch: int, seed: int) -> None:
        self.data, self.pairs_per_batch, self.seed = data, pairs_per_batch, seed
        self.steps_per_epoch = steps_per_epoch(data.num_pairs, pairs_per_batch)
        self._epoch, self._batches = -1, np.zeros((0, pairs_per_batch), np.int64)

    def global_pairs(self, step: int) -> np.ndarray:
        """Pair indices [B] of 0-based global step ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.data.pair_length, self.pairs_per_batch, self.seed, epoch,
                                          pair_group=self.data.pair_group)
        return self._batches[i]

    def local_batch(self, step: int, rank: int, world_size: int, pad_id: int) -> dict[str, torch.Tensor]:
        """This rank's b = B/W pairs of step ``step`` as a padded batch (``collate``)."""
        b = self.pairs_per_batch // world_size
        return collate(self.data, self.global_pairs(step)[rank * b:(rank + 1) * b], pad_id)


def collate(data: TrainingData, pair_indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """b pairs -> 2b notes ``[a_1..a_b, b_1..b_b]``, right-padded.

    Returns ``input_ids`` [2b, T] long, ``lengths`` [2b], ``emb_pos`` [2b], ``labels`` [2b, T]
    (IGNORE_INDEX on padding) and ``note_ids`` int64 [2b] (``note_id_hash``)."""
    pairs = data.pairs[np.asarray(pair_indices, dtype=np.int64)]
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]]).tolist()
    batch = pad_sequences([data.input_ids[r] for r in rows], pad_id,
                          emb_pos=[data.emb_pos[r] for r in rows])
    batch["labels"] = pad_sequences([data.labels[r] for r in rows], IGNORE_INDEX)["input_ids"]
    batch["note_ids"] = note_id_hash([data.note_ids[r] for r in rows])
    return batch


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = MIN_LR_RATIO) -> float:
    """Multiplier of ``training.lr`` after ``step`` scheduler steps: linear warmup from 1/(warmup+1)
    to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: NoteLLM, cfg: PipelineConfig
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (weight decay on matrices only, never on ``tau``,
    biases or the ``[EMB]`` row delta) and the warmup + cosine ``LambdaLR``."""
    t = cfg.training
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "trainable_tokens" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "trainable_tokens" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps))
    return optimizer, scheduler


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small float tensor (identity when W = 1); for logging only."""
    if get_world_size() == 1:
        return values
    out = values.detach().clone()
    torch.distributed.all_reduce(out)
    return out / get_world_size()


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: PipelineConfig) -> dict[str, float]:
    """One optimisation step on this rank's local batch (``collate``); same code with W = 1 or DDP.

    ``model``: a ``NoteLLM`` or a DDP wrapper of one. Gradients: ``emb`` and ``hidden`` of the single
    forward carry gradient to the trainable parameters; GCL candidates are gathered with gradient;
    L_gen divides by the global output-token count / W (both exact under DDP averaging). Returns
    global metrics: loss, l_cl, l_gen (means over ranks), tau, lr (before this step's scheduler
    update), tokens and notes (sums over ranks), grad_norm."""
    core: NoteLLM = getattr(model, "module", model)
    device = core.tau.device
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.training.bf16)
    with autocast:
        emb, hidden = model(batch)  # [2b, d] float32, [2b, T, H]: both carry gradient
        l_cl = gathered_gcl_loss(emb, batch["note_ids"], core.tau)
        n_out = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        num_tokens = global_token_count(n_out, device) / get_world_size()
        l_gen = csft_loss(hidden, batch["labels"], core.lm_logits, num_tokens=num_tokens.float())
        loss = total_loss(l_cl, l_gen, cfg.training.alpha)
    loss.backward()
    trainable = [p for p in core.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.training.grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = global_token_count(batch["lengths"].sum(), device)
    notes = global_token_count(batch["lengths"].numel(), device)
    loss_cl, loss_gen, loss_total = _global_mean(
        torch.stack([l_cl.detach(), l_gen.detach(), loss.detach()]).float()).tolist()
    return {"loss": loss_total, "l_cl": loss_cl, "l_gen": loss_gen, "tau": float(core.tau.detach()),
            "lr": float(lr), "grad_norm": float(grad_norm), "tokens": float(tokens), "notes": float(notes)}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(directory: str | os.PathLike, model: NoteLLM, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, cfg: PipelineConfig,
                    mlflow_run_id: str | None = None) -> Path:
    """Write a resumable checkpoint folder: the trainable state (safetensors), optimizer + scheduler
    state (``torch.save``, loaded with ``weights_only=True``), ``train_state.json`` (global step =
    data position, pairs seen, the MLflow training run when there is one) and the resolved config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_trainable_state(directory / TRAINABLE_STATE_FILE, {"step": str(step)})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               directory / OPTIMIZER_FILE)
    state = {"step": step, "pairs_seen": step * cfg.training.pairs_per_batch,
             "pairs_per_batch": cfg.training.pairs_per_batch, "seed": cfg.training.seed,
             "batching": cfg.training.batching,
             "world_size": get_world_size(), "mlflow_run_id": mlflow_run_id}
    (directory / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n",
                                         encoding="utf-8")
    return directory


def load_checkpoint(directory: str | os.PathLike, model: NoteLLM, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, Any]:
    """Load a ``save_checkpoint`` folder into ``model`` (and optimizer/scheduler when given); returns
    ``train_state.json``. Raises ``notellm.modeling.TrainableStateError`` for another base model."""
    directory = Path(directory)
    model.load_trainable_state(directory / TRAINABLE_STATE_FILE)
    if optimizer is not None or scheduler is not None:
        states = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(states["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(states["scheduler"])
    return json.loads((directory / TRAIN_STATE_FILE).read_text(encoding="utf-8"))


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The step of a complete ``save_checkpoint`` folder (every file of ``CHECKPOINT_FILES`` present
    and ``train_state.json`` readable), else None (a folder still being copied, or another kind)."""
    directory = Path(directory)
    if not all((directory / name).is_file() for name in CHECKPOINT_FILES):
        return None
    try:
        return int(json.loads((directory / TRAIN_STATE_FILE).read_text(encoding="utf-8"))["step"])
    except (ValueError, KeyError, TypeError):
        return None


def resume_candidates(*folders: str | os.PathLike | None, run_dir: str | os.PathLike | None = None
                      ) -> list[tuple[int, Path]]:
    """Complete checkpoint folders to resume from, highest step first: the given ``folders`` (e.g.
    the one Ray Train hands over) plus every ``checkpoint_*`` under ``run_dir``.

    Why both: Ray Train registers a reported checkpoint only when its controller next polls the
    workers; a worker killed between the upload and that poll leaves a complete folder on storage
    that ``ray.train.get_checkpoint()`` does not return after the restart (measured: a SIGKILL right
    after the step-5 checkpoint restarted the run at step 0). Scanning the run folder recovers it."""
    found: dict[Path, int] = {}
    paths = [Path(f) for f in folders if f is not None]
    if run_dir is not None and Path(run_dir).is_dir():
        paths += sorted(Path(run_dir).glob("checkpoint_*"))
    for folder in paths:
        step = checkpoint_step(folder)
        if step is not None:
            found[folder.resolve()] = step
    return sorted(((step, folder) for folder, step in found.items()), key=lambda sf: (-sf[0], str(sf[1])))


def newest_checkpoint(cfg: PipelineConfig, run_name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint of ``<training.storage_path>/<run_name>`` (default
    ``training.run_name``) and its ``train_state.json``; ``TrainingDataError`` when there is none."""
    run_dir = cfg.resolve_path(cfg.training.storage_path) / (run_name or cfg.training.run_name)
    candidates = resume_candidates(run_dir=run_dir)
    if not candidates:
        raise TrainingDataError(f"no complete checkpoint under {run_dir}: run pipelines.train with "
                                f"training.run_name={run_name or cfg.training.run_name} first")
    folder = candidates[0][1]
    return folder, json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global generator (dropout, LoRA init) for this process."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def rank_seed(seed: int, rank: int | None = None) -> int:
    """Per-rank seed (different dropout masks per worker, reproducible per run)."""
    return seed * 1000 + (get_rank() if rank is None else rank)
