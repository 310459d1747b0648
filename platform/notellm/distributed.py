"""Cross-worker helpers for in-batch negatives: rank/world, a differentiable all-gather, note ids.

Everything here is the identity (or rank 0 / world 1) when ``torch.distributed`` is not
initialised, so the same training code runs in one process and under DDP. Works with gloo (CPU)
and NCCL (GPU): only ``all_gather`` and ``all_reduce`` are used.

All gathers require every rank to pass a tensor of the SAME shape (equal local batches: the
training sampler drops the last incomplete batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

ID_HASH_BYTES = 8
ID_HASH_MASK = (1 << 63) - 1  # keep 63 bits: a non-negative int64


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This worker's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of workers W (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, in rank order; no autograd."""
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the SUM over ranks of the grads of its slice.

    Forward: ``x`` [n, ...] -> [W*n, ...] (rank r's rows at ``r*n:(r+1)*n``).
    Backward: ``grad`` [W*n, ...] differs per rank (each rank's own loss); it is all-reduced (sum)
    and this rank keeps its slice, i.e. d(sum_s L_s)/d x_r. (An all-reduce instead of a
    reduce-scatter: gloo has no reduce-scatter, and the extra traffic is W*n*d floats.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather: [n, ...] -> [W*n, ...] in rank order; identity when W = 1.

    Gradients: the output carries gradients back to every rank's ``x``: rank r's ``x`` receives
    the sum over all ranks s of dL_s/dx_r (its rows used as candidates by other ranks included).
    """
    if not is_distributed() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient: [n, ...] -> [W*n, ...] in rank order; identity when W = 1."""
    if not is_distributed() or get_world_size() == 1:
        return x
    return _all_gather_cat(x.detach())


def note_id_hash(note_ids: Sequence[str]) -> torch.Tensor:
    """Stable 63-bit hashes of string note ids -> int64 [n] (blake2b, same in every process).

    Python's ``hash()`` is salted per process and must not be used. Two distinct ids collide with
    probability ~n^2 / 2^64 per batch; a collision would only mask one extra negative.
    """
    values = [
        int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=ID_HASH_BYTES).digest(),
                       "big") & ID_HASH_MASK
        for i in note_ids
    ]
    return torch.tensor(values, dtype=torch.int64)


def gather_ids(local_ids: torch.Tensor) -> torch.Tensor:
    """Gather int64 note-id hashes ([n] -> [W*n], rank order, same order as ``gather_with_grad``).

    NCCL needs the ids on the GPU: pass them on the same device as the embeddings.
    """
    return gather_no_grad(local_ids)


def global_token_count(local_count: int | torch.Tensor, device: torch.device | str = "cpu"
                       ) -> torch.Tensor:
    """Sum over ranks of a per-rank count (e.g. CSFT output tokens), as a float64 scalar tensor."""
    count = torch.as_tensor(local_count, dtype=torch.float64, device=device).reshape(1)
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count[0]
