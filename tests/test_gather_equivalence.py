"""Cross-worker negatives: 2 real gloo DDP workers give exactly the single-process gradient.

Each of 2 spawned CPU processes runs DDP over a real tiny-llama (float64) + a Linear projection
head (d = 16) + a learnable tau, on its half of a fixed global batch of 4 pairs (8 notes). One note
appears on both ranks; the two ranks have different numbers of CSFT output tokens. Rank 0 writes
its parameter gradients (after DDP averaging) to a safetensors file; the test process computes the
loss of the whole global batch in one process without any distribution and compares.

Negative controls run in the same workers and must NOT match: the loss multiplied by the world
size, candidates gathered without gradient (other ranks' rows detached, local rows re-inserted,
as GritLM does) with and without the world-size factor, and a CSFT local token mean.
"""

from __future__ import annotations

import pytest

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from notellm.distributed import (
    gather_ids,
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
    global_token_count,
    note_id_hash,
)
from notellm.losses import csft_loss, gathered_gcl_loss, gcl_loss, pair_layout, total_loss
from notellm.models import load_causal_lm
from notellm.prompts import IGNORE_INDEX

WORLD = 2
PAIRS_PER_RANK = 2
EMB_DIM = 16
TAU_INIT = 3.0
ALPHA = 0.5  # large enough that an error in the CSFT term shows in the gradients
DTYPE = torch.float64
MATCH_TOL = 1e-9  # float64: only summation order differs
MISMATCH_MIN = 1e-6  # 1000x MATCH_TOL; the controls measure 1.7e-3 .. 1.6

# Global batch in rank order; each shard is [a_1, a_2, b_1, b_2] (pairs (a_k, b_k)).
# Note "n-dup" is a_1 on rank 0 and b_2 on rank 1. Last element: number of output tokens.
GLOBAL_NOTES: list[tuple[str, str, int]] = [
    ("n-dup", "moka pot grind size for a stovetop espresso maker", 2),
    ("n-r0a2", "rust borrow checker error with mutable references", 2),
    ("n-r0b1", "best burr grinder for espresso at home", 3),
    ("n-r0b2", "lifetime annotations in rust structs explained", 1),
    ("n-r1a1", "sourdough starter not rising after a week", 4),
    ("n-r1a2", "python asyncio gather versus wait differences", 3),
    ("n-r1b1", "how to feed a sourdough starter with rye flour", 3),
    ("n-dup", "moka pot grind size for a stovetop espresso maker", 2),
]
VARIANTS = ("correct", "world_size_factor", "detached_gather", "detached_gather_times_w",
            "csft_local_mean")


class PooledEncoder(nn.Module):
    """tiny-llama + Linear head to EMB_DIM, pooled at a given position, + learnable tau."""

    def __init__(self) -> None:
        super().__init__()
        self.lm, _ = load_causal_lm("tiny-llama", dtype=DTYPE, fresh=True)
        self.lm.requires_grad_(True)
        self.proj = nn.Linear(self.lm.config.hidden_size, EMB_DIM, dtype=DTYPE)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen, dtype=DTYPE))
            self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=gen, dtype=DTYPE))
        self.tau = nn.Parameter(torch.tensor(TAU_INIT, dtype=DTYPE))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                emb_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0]), emb_pos]
        return self.proj(pooled), hidden


def _global_batch() -> dict[str, torch.Tensor]:
    """Tokenized global batch (padded once, so every rank's slice is the same as in one process)."""
    _, tok = load_causal_lm("tiny-llama", dtype=DTYPE)
    enc = tok([text for _, text, _ in GLOBAL_NOTES], padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(dim=1)
    labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    emb_pos = torch.zeros(len(GLOBAL_NOTES), dtype=torch.int64)
    for row, ((_, _, n_out), length) in enumerate(zip(GLOBAL_NOTES, lengths.tolist())):
        labels[row, length - n_out:length] = enc["input_ids"][row, length - n_out:length]
        emb_pos[row] = length - n_out - 1
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels, "emb_pos": emb_pos,
            "ids": note_id_hash([note_id for note_id, _, _ in GLOBAL_NOTES])}


def _detached_gcl(emb: torch.Tensor, ids: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Wrong on purpose: other ranks' candidates carry no gradient (GritLM-style gather)."""
    n, start = emb.shape[0], get_rank() * emb.shape[0]
    gathered = gather_no_grad(emb)
    candidates = torch.cat([gathered[:start], emb, gathered[start + n:]])
    anchor, partner = pair_layout(n // 2, get_rank())
    return gcl_loss(emb, candidates, gather_ids(ids), anchor, partner, tau)


def _variant_loss(variant: str, model: nn.Module, lm_head: nn.Module,
                  batch: dict[str, torch.Tensor]) -> torch.Tensor:
    emb, hidden = model(batch["input_ids"], batch["attention_mask"], batch["emb_pos"])
    tau, world = model.module.tau, get_world_size()
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    per_rank_tokens = global_token_count(n_tokens) / world
    l_gen = csft_loss(hidden, batch["labels"], lm_head,
                      num_tokens=None if variant == "csft_local_mean" else per_rank_tokens)
    if variant.startswith("detached_gather"):
        l_cl = _detached_gcl(emb, batch["ids"], tau)
    else:
        l_cl = gathered_gcl_loss(emb, batch["ids"], tau)
    loss = total_loss(l_cl, l_gen, ALPHA)
    if variant in ("world_size_factor", "detached_gather_times_w"):
        loss = loss * world
    return loss


def _worker(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = slice(rank * 2 * PAIRS_PER_RANK, (rank + 1) * 2 * PAIRS_PER_RANK)
        batch = {key: value[shard] for key, value in _global_batch().items()}
        encoder = PooledEncoder()
        model = DistributedDataParallel(encoder)
        out: dict[str, torch.Tensor] = {}
        for variant in VARIANTS:
            model.zero_grad(set_to_none=True)
            loss = _variant_loss(variant, model, encoder.lm.lm_head, batch)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            out[f"{variant}/loss"] = (mean_loss / world).reshape(1)
            for name, param in encoder.named_parameters():
                out[f"{variant}/{name}"] = param.grad.detach().contiguous().clone()
        if rank == 0:
            save_file(out, out_file)
    finally:
        dist.destroy_process_group()


def _single_process_reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the whole global batch in one process, no torch.distributed involved."""
    batch = _global_batch()
    encoder = PooledEncoder()
    emb, hidden = encoder(batch["input_ids"], batch["attention_mask"], batch["emb_pos"])
    layouts = [pair_layout(PAIRS_PER_RANK, rank) for rank in range(WORLD)]
    anchor = torch.cat([a for a, _ in layouts])
    partner = torch.cat([p for _, p in layouts])
    l_cl = gcl_loss(emb, emb, batch["ids"], anchor, partner, encoder.tau)
    l_gen = csft_loss(hidden, batch["labels"], encoder.lm.lm_head)
    loss = total_loss(l_cl, l_gen, ALPHA)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in encoder.named_parameters()}


def _max_rel_diff(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref|."""
    return max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in ref.items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_workers_match_single_process(tmp_path: Path) -> None:
    out_file = tmp_path / "rank0_grads.safetensors"
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out_file)), nprocs=WORLD, join=True)
    got = load_file(out_file)
    ref_loss, ref_grads = _single_process_reference()
    assert all(g.abs().max() > 0 for g in ref_grads.values())  # every parameter is exercised

    diffs = {}
    for variant in VARIANTS:
        grads = {name: got[f"{variant}/{name}"] for name in ref_grads}
        diffs[variant] = _max_rel_diff(grads, ref_grads)
    loss_diff = abs(float(got["correct/loss"][0]) - float(ref_loss)) / float(ref_loss)
    print(f"\nloss rel diff {loss_diff:.3e}; max relative gradient differences: "
          + ", ".join(f"{v}={d:.3e}" for v, d in diffs.items()))

    assert loss_diff < MATCH_TOL
    assert diffs["correct"] < MATCH_TOL
    tau_rel = abs(float(got["correct/tau"] - ref_grads["tau"])) / abs(float(ref_grads["tau"]))
    assert tau_rel < MATCH_TOL
    for variant in VARIANTS[1:]:
        assert diffs[variant] > MISMATCH_MIN, variant


def test_single_process_helpers_are_identity_and_ids_are_stable() -> None:
    assert not dist.is_initialized()
    assert (get_rank(), get_world_size()) == (0, 1)
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    assert float(global_token_count(7)) == 7.0
    ids = note_id_hash(["golden:2", "x", "golden:2"])
    assert ids.dtype == torch.int64 and bool((ids >= 0).all())
    # blake2b-based, not Python's salted hash(): the same in every process and every run.
    assert ids.tolist() == [7988461010305972894, 5395104992458594383, 7988461010305972894]
    assert torch.equal(gather_ids(ids), ids)
