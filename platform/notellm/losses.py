r"""NoteLLM losses as pure functions of tensors: GCL (method.md section 3), CSFT (section 4), total.

Batch layout (GCL)
------------------
Each worker holds b related pairs = n = 2b notes laid out ``[a_1..a_b, b_1..b_b]`` (note k's
partner is note k+b and vice versa). The global batch is the rank-order concatenation of the W
shards (``gather_with_grad``), N = W*n notes. ``pair_layout`` gives, for each local anchor, its
own column (``anchor_index``) and its partner's column (``partner_index``) in the global batch;
``gcl_loss`` itself only needs those two index vectors, so any other layout works too.

What is masked (GCL)
--------------------
For local anchor i with global column c_i, partner column p_i, candidates are all N global notes;
the positive is column p_i, always. Removed from the softmax denominator:
* column c_i (the anchor itself, the j != i of the formula);
* every other column j != p_i whose note id equals the anchor's id (the same note repeated in the
  global batch must not be its own negative) or the partner's id (a repeat of the positive is not
  a negative either: its logit equals the positive's, it would only add a false negative).

Gradients and DDP scaling: no world-size factor
-----------------------------------------------
Single process: L = 1/N sum_i l_i. Rank r computes L_r = 1/n sum_{i in r} l_i, with its anchors
kept local (they carry gradient) and candidates from ``gather_with_grad``, whose backward sends
rank r the sum over ALL ranks' losses of the gradient w.r.t. r's rows. So rank r's parameters get
sum_s dL_s/dtheta through r's own embeddings; DDP averages over ranks:
1/W sum_r sum_s dL_s/dtheta|_r = 1/W d(sum_s L_s)/dtheta, and sum_s L_s = (N/n) L = W L,
hence exactly dL/dtheta: the loss must NOT be multiplied by W. (With a gather that detaches other
ranks' rows, the gradients of other ranks' anchors w.r.t. my rows are lost; no constant fixes
that.) The temperature is replicated: DDP averages dL_r/dtau to dL/dtau. Requires equal shards.

CSFT: the global token mean 1/T sum_t nll_t is exact under DDP if rank r divides its token sum S_r
by T/W (T = global count, ``distributed.global_token_count``): 1/W sum_r S_r W/T = sum S/T. The
default (divide by the local count) equals it only when every rank has the same count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from notellm.distributed import gather_ids, gather_with_grad, get_rank
from notellm.prompts import IGNORE_INDEX


def pair_layout(num_local_pairs: int, rank: int = 0, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (anchor_index, partner_index), int64 [2b] each, for shards laid out [a.., b..]."""
    b, offset = num_local_pairs, rank * 2 * num_local_pairs
    local = torch.arange(2 * b, device=device)
    return local + offset, (local + b) % (2 * b) + offset


def gcl_loss(local_emb: torch.Tensor, global_emb: torch.Tensor, global_ids: torch.Tensor,
             anchor_index: torch.Tensor, partner_index: torch.Tensor, log_scale: torch.Tensor
             ) -> torch.Tensor:
    """Mean over local anchors of -log softmax(cos * e^tau)[partner] (see module docstring).

    local_emb [n, d]: anchors (gradient). global_emb [N, d]: candidates, must contain the local
    rows at ``anchor_index`` (gradient if gathered with ``gather_with_grad``). Neither needs to be
    normalised: rows are L2-normalised here. global_ids int64 [N]: note-id hashes
    (``distributed.note_id_hash``). anchor_index, partner_index int64 [n]: global columns of each
    anchor and of its partner. log_scale: scalar tau (gradient). Returns a scalar.
    """
    sim = F.normalize(local_emb, dim=-1) @ F.normalize(global_emb, dim=-1).T  # [n, N]
    logits = sim * log_scale.exp()
    cols = torch.arange(global_emb.shape[0], device=global_emb.device)[None, :]  # [1, N]
    same_note = ((global_ids[None, :] == global_ids[anchor_index][:, None])
                 | (global_ids[None, :] == global_ids[partner_index][:, None]))
    masked = (cols == anchor_index[:, None]) | (same_note & (cols != partner_index[:, None]))
    logits = logits.masked_fill(masked, float("-inf"))
    return F.cross_entropy(logits, partner_index)


def gathered_gcl_loss(local_emb: torch.Tensor, local_ids: torch.Tensor, log_scale: torch.Tensor
                      ) -> torch.Tensor:
    """GCL of this rank's anchors against the whole global batch; local rows [a.., b..] [2b, d].

    Candidates are gathered with gradient; the result is the local mean, used as is under DDP.
    """
    anchor_index, partner_index = pair_layout(local_emb.shape[0] // 2, get_rank(),
                                              local_emb.device)
    return gcl_loss(local_emb, gather_with_grad(local_emb), gather_ids(local_ids),
                    anchor_index, partner_index, log_scale)


def csft_loss(hidden_states: torch.Tensor, labels: torch.Tensor,
              lm_head: Callable[[torch.Tensor], torch.Tensor],
              num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on output tokens only: sum_t -log p(o_t | o_<t) / num_tokens.

    hidden_states [B, L, h] (gradient), labels [B, L] aligned with input_ids (IGNORE_INDEX except
    output tokens; position t-1 predicts label t). The LM head is applied ONLY to the T positions
    whose next label is kept ([T, h] -> [T, vocab]). ``num_tokens`` defaults to T (local mean);
    pass global T / W under DDP (module docstring). Logits are upcast to at least float32.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden_states[:, :-1][keep])  # [T, vocab]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll_sum = F.cross_entropy(logits, targets[keep].long(), reduction="sum")
    denominator = keep.sum().clamp(min=1) if num_tokens is None else num_tokens
    return nll_sum / denominator


def total_loss(l_cl: torch.Tensor, l_gen: torch.Tensor, alpha: float) -> torch.Tensor:
    """L = (L_cl + alpha * L_gen) / (1 + alpha) (method.md section 4; paper alpha = 0.01)."""
    return (l_cl + alpha * l_gen) / (1 + alpha)
