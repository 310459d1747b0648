"""GCL / CSFT / total loss as pure functions: hand-computed values, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from notellm.distributed import note_id_hash
from notellm.losses import csft_loss, gathered_gcl_loss, gcl_loss, pair_layout, total_loss
from notellm.models import load_causal_lm
from notellm.prompts import IGNORE_INDEX

F64 = torch.float64


def _ids(names: list[str]) -> torch.Tensor:
    return note_id_hash(names)


def test_pair_layout() -> None:
    anchor, partner = pair_layout(2, rank=1)
    assert anchor.tolist() == [4, 5, 6, 7]
    assert partner.tolist() == [6, 7, 4, 5]


def test_gcl_hand_computed_two_pairs() -> None:
    # Layout [a1, a2, b1, b2]; pairs (a1, b1), (a2, b2). Unit vectors (given scaled by 3 and 0.5:
    # gcl_loss must normalise): a1 = (1, 0), a2 = (0, 1), b1 = (0.6, 0.8), b2 = (-1, 0).
    # Cosines: a1.a2 = 0, a1.b1 = 0.6, a1.b2 = -1, a2.b1 = 0.8, a2.b2 = 0, b1.b2 = -0.6.
    # tau = ln 2 -> scale e^tau = 2, logits = 2 * cos:
    #   a1: pos b1 = 1.2; negs a2 = 0, b2 = -2     -> l = -1.2 + log(e^1.2 + e^0 + e^-2)
    #   a2: pos b2 = 0;   negs a1 = 0, b1 = 1.6    -> l =  0   + log(e^0 + e^0 + e^1.6)
    #   b1: pos a1 = 1.2; negs a2 = 1.6, b2 = -1.2 -> l = -1.2 + log(e^1.2 + e^1.6 + e^-1.2)
    #   b2: pos a2 = 0;   negs a1 = -2, b1 = -1.2  -> l =  0   + log(e^0 + e^-2 + e^-1.2)
    # L = mean of the four = (0.29413 + 1.93918 + 0.94877 + 0.36223) / 4 = 0.88608...
    e = math.exp
    expected = (
        -1.2 + math.log(e(1.2) + 1 + e(-2))
        + math.log(2 + e(1.6))
        - 1.2 + math.log(e(1.2) + e(1.6) + e(-1.2))
        + math.log(1 + e(-2) + e(-1.2))
    ) / 4
    assert expected == pytest.approx(0.88608, abs=1e-5)
    emb = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.3, 0.4], [-0.5, 0.0]], dtype=F64)
    ids = _ids(["a1", "a2", "b1", "b2"])
    anchor, partner = pair_layout(2)
    tau = torch.tensor(math.log(2.0), dtype=F64)
    loss = gcl_loss(emb, emb, ids, anchor, partner, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Not distributed: the gathered variant is the same computation.
    assert gathered_gcl_loss(emb, ids, tau).item() == pytest.approx(expected, rel=1e-12)


def _dup_batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    # Pairs (x, y), (z, x), (u, v): note x appears twice. Layout [x, z, u | y, x, v].
    names = ["x", "z", "u", "y", "x", "v"]
    emb = torch.randn(6, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    return emb, _ids(names), names


def _single_anchor_loss(emb: torch.Tensor, names: list[str], anchor: int, partner: int,
                        drop: int | None, tau: torch.Tensor) -> torch.Tensor:
    """Loss of one anchor with column ``drop`` removed and all ids made distinct (no masking)."""
    keep = [j for j in range(len(names)) if j != drop]
    cand = emb[keep]
    distinct = _ids([f"{names[j]}#{j}" for j in keep])
    return gcl_loss(emb[[anchor]], cand, distinct, torch.tensor([keep.index(anchor)]),
                    torch.tensor([keep.index(partner)]), tau)


def test_gcl_duplicate_note_is_not_its_own_negative() -> None:
    emb, ids, names = _dup_batch()
    tau = torch.tensor(1.5, dtype=F64)
    anchor, partner = pair_layout(3)
    per_anchor = [gcl_loss(emb[[i]], emb, ids, anchor[[i]], partner[[i]], tau) for i in range(6)]
    # Anchor x (col 0), partner y (col 3): the other x (col 4) is masked == column removed.
    ref0 = _single_anchor_loss(emb, names, 0, 3, drop=4, tau=tau)
    assert per_anchor[0].item() == pytest.approx(ref0.item(), rel=1e-12)
    # Anchor z (col 1), partner x (col 4): the partner stays the positive; the other copy of the
    # partner (x at col 0) is masked == column removed.
    ref1 = _single_anchor_loss(emb, names, 1, 4, drop=0, tau=tau)
    assert per_anchor[1].item() == pytest.approx(ref1.item(), rel=1e-12)
    # Anchor u (col 2) has no duplicate involved: nothing but itself is masked.
    ref2 = _single_anchor_loss(emb, names, 2, 5, drop=None, tau=tau)
    assert per_anchor[2].item() == pytest.approx(ref2.item(), rel=1e-12)
    # The batch mean is the mean of the per-anchor losses.
    full = gcl_loss(emb, emb, ids, anchor, partner, tau)
    assert full.item() == pytest.approx(torch.stack(per_anchor).mean().item(), rel=1e-12)
    # Control: without masking (distinct ids) anchor x's loss differs (the test can fail).
    unmasked = gcl_loss(emb[[0]], emb, _ids([f"{n}#{j}" for j, n in enumerate(names)]),
                        anchor[[0]], partner[[0]], tau)
    assert abs(unmasked.item() - ref0.item()) > 1e-3


def test_gcl_identical_duplicate_gives_no_false_negative() -> None:
    # Two identical copies of a note paired with the same partner: without masking each copy
    # would be a negative as close as the positive; with masking the loss is that of a batch
    # without the copy.
    emb, ids, names = _dup_batch()
    emb[4] = emb[0]
    tau = torch.tensor(3.0, dtype=F64)
    anchor, partner = pair_layout(3)
    loss = gcl_loss(emb[[3]], emb, ids, anchor[[3]], partner[[3]], tau)  # anchor y, partner x
    assert loss.item() == pytest.approx(
        _single_anchor_loss(emb, names, 3, 0, drop=4, tau=tau).item(), rel=1e-12)


def test_gcl_gradients_reach_embeddings_and_tau() -> None:
    emb, ids, _ = _dup_batch()
    emb.requires_grad_(True)
    tau = torch.tensor(3.0, dtype=F64, requires_grad=True)
    anchor, partner = pair_layout(3)
    gcl_loss(emb, emb, ids, anchor, partner, tau).backward()
    assert emb.grad is not None and bool((emb.grad.abs().sum(dim=1) > 0).all())
    assert tau.grad is not None and tau.grad.item() != 0.0
    # Analytic gradients (anchors and candidates are the same tensor) match finite differences.
    assert torch.autograd.gradcheck(
        lambda e, t: gcl_loss(e, e, ids, anchor, partner, t),
        (emb.detach().clone().requires_grad_(True), tau.detach().clone().requires_grad_(True)))


def test_total_loss_formula() -> None:
    l_cl, l_gen = torch.tensor(2.0, dtype=F64), torch.tensor(10.0, dtype=F64)
    assert total_loss(l_cl, l_gen, 0.01).item() == pytest.approx((2.0 + 0.1) / 1.01, rel=1e-15)
    assert total_loss(l_cl, l_gen, 0.0).item() == 2.0
    assert total_loss(l_cl, l_gen, 1.0).item() == pytest.approx(6.0, rel=1e-15)


def test_csft_output_only_equals_full_computation() -> None:
    model, tok = load_causal_lm("tiny-llama", dtype=F64, fresh=True)
    model.train()
    enc = tok(["a note about coffee grinding. The category is: coffee",
               "short one. The category is: tea time now",
               "third text with more words in it. The 2 topics are: x, y"],
              padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(dim=1)
    labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    for row, (length, n_out) in enumerate(zip(lengths.tolist(), [2, 4, 3])):
        labels[row, length - n_out:length] = enc["input_ids"][row, length - n_out:length]
    n_tokens = int((labels != IGNORE_INDEX).sum())

    hidden = model.model(**enc).last_hidden_state
    ours = csft_loss(hidden, labels, model.lm_head)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))

    # Naive: logits over the full vocabulary at every position, shift, mean over kept tokens.
    full = model(**enc).logits  # [B, L, V]
    nll = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens
    naive_grads = torch.autograd.grad(nll, list(model.parameters()))
    hf = model(**enc, labels=labels).loss  # transformers' own shifted loss
    assert ours.item() == pytest.approx(nll.item(), rel=1e-12)
    assert ours.item() == pytest.approx(hf.item(), rel=1e-6)  # HF computes its loss in float32
    for a, b in zip(ours_grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # An explicit denominator replaces the local token count.
    explicit = csft_loss(hidden, labels, model.lm_head, num_tokens=2 * n_tokens)
    assert explicit.item() == pytest.approx(ours.item() / 2, rel=1e-12)
