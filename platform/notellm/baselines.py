"""Baseline retrievers evaluated on the same split as NoteLLM (method.md section 5).

* ``BM25Retriever``: lexical baseline with the maintained ``bm25s`` library (Lucene BM25,
  k1 = 1.5, b = 0.75, English stopwords, no stemming).
* ``finetune_sentence_encoder``: the paper's "SentenceBERT" baseline, a small bi-encoder
  (MiniLM-L6, ``models.load_sentence_encoder("minilm-l6", fresh=True)``) fine-tuned
  contrastively on the training pairs with sentence-transformers'
  ``MultipleNegativesRankingLoss`` (in-batch negatives, the same kind of objective as GCL).

Both read a note as ``notellm.prompts.PromptBuilder.plain_texts`` renders it (``pipelines.evaluate``
passes those texts): title, hashtags and content, cut to the same token budgets as the NoteLLM
prompt.

Training API note: sentence-transformers 6.2's current training API (``SentenceTransformerTrainer``
and ``SentenceTransformer.fit``, which wraps it) requires the ``datasets`` package, which is not in
this project's lock. ``finetune_sentence_encoder`` therefore uses ``SentenceTransformer.old_fit``,
the library's own pre-v3 loop (AdamW, linear warmup/decay, gradient clipping) that still ships in
6.2 and needs only a torch ``DataLoader``. If ``datasets`` is added, switch to the trainer with
``batch_sampler="no_duplicates"``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import bm25s
import numpy as np
import torch

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------

BM25_K1 = 1.5
"""BM25 term-frequency saturation (bm25s default)."""
BM25_B = 0.75
"""BM25 length normalisation (bm25s default)."""
BM25_METHOD = "lucene"
"""bm25s scoring variant (its default)."""
BM25_STOPWORDS = "en"
"""bm25s built-in English stopword list; tokens are lowercased ``\\w\\w+`` runs, not stemmed
(PyStemmer is not installed)."""


class BaselineInputError(ValueError):
    """Inputs to a baseline are inconsistent (lengths, duplicates, unknown categories, too few pairs)."""


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)


class BM25Retriever:
    """BM25 over a fixed pool of notes; ranks the whole pool (or a query's category) per query.

    Scores are exact (a full score vector per query; fine for pools of thousands of notes).
    Ties (e.g. the many notes sharing no term with a query, all scoring 0) are broken by a fixed
    random permutation of the pool drawn from ``seed``, so the order of the pool never leaks into
    the ranking.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.note_ids: np.ndarray = np.array([], dtype=object)
        self.categories: np.ndarray | None = None
        self._index: bm25s.BM25 | None = None
        self._tiebreak: np.ndarray = np.array([], dtype=np.int64)

    def fit(
        self,
        note_ids: Sequence[str],
        texts: Sequence[str],
        categories: Sequence[str] | None = None,
    ) -> BM25Retriever:
        """Index the pool: ``note_ids``/``texts``/``categories`` aligned, ids unique.
        ``categories`` is needed only for ``rank(..., restrict_to=...)``."""
        n = len(note_ids)
        if n == 0:
            raise BaselineInputError("BM25Retriever.fit: the pool is empty")
        if len(texts) != n or (categories is not None and len(categories) != n):
            raise BaselineInputError(
                f"BM25Retriever.fit: {n} note_ids but {len(texts)} texts"
                + ("" if categories is None else f" and {len(categories)} categories")
            )
        if len(set(note_ids)) != n:
            raise BaselineInputError("BM25Retriever.fit: note_ids repeat")
        tokens = _tokenize(texts)
        if not any(tokens):
            raise BaselineInputError(
                "BM25Retriever.fit: no text of the pool has an indexable token (words of 2+ "
                "characters that are not English stopwords)"
            )
        index = bm25s.BM25(k1=BM25_K1, b=BM25_B, method=BM25_METHOD)
        index.index(tokens, show_progress=False)
        self._index = index
        self.note_ids = np.array(list(note_ids), dtype=object)
        self.categories = None if categories is None else np.array(list(categories), dtype=object)
        self._tiebreak = np.random.default_rng(self.seed).permutation(n)
        return self

    def scores(self, query_texts: Sequence[str]) -> np.ndarray:
        """BM25 score of every pool note for every query: float32 ``(n_queries, n_pool)``."""
        if self._index is None:
            raise BaselineInputError("BM25Retriever: call fit() before scoring")
        out = np.zeros((len(query_texts), len(self.note_ids)), dtype=np.float32)
        for i, tokens in enumerate(_tokenize(query_texts)):
            if self._index.get_tokens_ids(tokens):  # a query sharing no term scores 0 everywhere
                out[i] = self._index.get_scores(tokens)
        return out

    def rank(
        self,
        query_texts: Sequence[str],
        k: int,
        exclude_ids: Sequence[str | None] | None = None,
        restrict_to: Sequence[str] | None = None,
    ) -> tuple[list[list[str]], list[np.ndarray]]:
        """Top-``k`` pool notes per query, best first.

        exclude_ids: per query, a note id to leave out (the query itself) or None.
        restrict_to: per query, a category: only pool notes of that category are candidates
        (requires ``fit(..., categories=...)``; an unknown category raises).
        Returns ``(ids, scores)``: per query a list of at most ``k`` note ids and a float32 array
        of their scores (shorter than ``k`` when fewer candidates remain).
        """
        n_q = len(query_texts)
        if k < 1:
            raise BaselineInputError(f"BM25Retriever.rank: k must be >= 1, got {k}")
        for name, per_query in (("exclude_ids", exclude_ids), ("restrict_to", restrict_to)):
            if per_query is not None and len(per_query) != n_q:
                raise BaselineInputError(
                    f"BM25Retriever.rank: {name} has {len(per_query)} entries for {n_q} queries"
                )
        category_rows: dict[str, np.ndarray] = {}
        if restrict_to is not None:
            if self.categories is None:
                raise BaselineInputError("BM25Retriever.rank: restrict_to needs fit(..., categories=...)")
            known = set(self.categories)
            unknown = sorted(set(restrict_to) - known)
            if unknown:
                raise BaselineInputError(f"BM25Retriever.rank: unknown categories {unknown[:5]}")
            category_rows = {c: np.flatnonzero(self.categories == c) for c in set(restrict_to)}
        position = {note_id: i for i, note_id in enumerate(self.note_ids)}
        all_rows = np.arange(len(self.note_ids))
        scores = self.scores(query_texts)
        ids: list[list[str]] = []
        top_scores: list[np.ndarray] = []
        for q in range(n_q):
            rows = all_rows if restrict_to is None else category_rows[restrict_to[q]]
            if exclude_ids is not None and exclude_ids[q] in position:
                rows = rows[rows != position[exclude_ids[q]]]
            order = np.lexsort((self._tiebreak[rows], -scores[q, rows]))[:k]
            ids.append(self.note_ids[rows[order]].tolist())
            top_scores.append(scores[q, rows[order]])
        return ids, top_scores


# ---------------------------------------------------------------------------------------------
# MiniLM fine-tuned contrastively ("SentenceBERT" baseline)
# ---------------------------------------------------------------------------------------------

SENTENCE_ENCODER_BASE = "minilm-l6"
"""Base model name (``notellm.models``) of the fine-tuned bi-encoder baseline."""
MNRL_SCALE = 20.0
"""Logit scale of MultipleNegativesRankingLoss (its default; GCL starts at e^3 = 20.09)."""
MNRL_DIRECTIONS = ("query_to_doc", "doc_to_query")
"""Both notes of a pair act as anchors (one softmax per direction), as in GCL where every note
of the batch is an anchor; negatives are the other side's in-batch notes."""
MAX_SEQ_LENGTH = 128
"""Default word pieces MiniLM reads per note when fine-tuned (saved with the model, so encoding
with the saved folder truncates the same way); NoteLLM reads title <= 20 + content <= 80 tokens."""
WARMUP_FRACTION = 0.1
"""Share of the training steps with a linear learning-rate warmup (then linear decay)."""
MAX_GRAD_NORM = 1.0
"""Gradient clipping norm."""
ADAMW_FUSED = True
"""Use torch's fused AdamW kernel: on 2 CPU cores its step over MiniLM's 22.7M parameters takes
0.39 s vs 2.7 s for the default per-tensor loop (measured while the machine was shared)."""


class NoDuplicatesBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size`` pair indices in which no text occurs twice.

    In-batch negatives must not contain a copy of the anchor or of its positive (a note in two
    pairs of one batch would be its own negative). Per epoch the pairs are shuffled with
    ``seed + epoch``; a pair whose text is already in the current batch waits for a later batch;
    the pairs that cannot fill a last full batch are dropped for that epoch, and a pair whose two
    texts are equal is never used (it would be its own positive). Deterministic.
    ``len()`` is the nominal ``len(pairs) // batch_size``.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], batch_size: int, seed: int) -> None:
        self.pairs = pairs
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (pair indices)."""
        order = list(range(len(self.pairs)))
        random.Random(self.seed + epoch).shuffle(order)
        batches: list[list[int]] = []
        waiting: list[int] = []
        batch: list[int] = []
        texts: set[str] = set()
        pending = iter(order)
        while True:
            added = False
            for idx in list(waiting):
                a, b = self.pairs[idx]
                if a not in texts and b not in texts and a != b:
                    waiting.remove(idx)
                    batch.append(idx)
                    texts.update((a, b))
                    added = True
                    if len(batch) == self.batch_size:
                        break
            while len(batch) < self.batch_size:
                idx = next(pending, None)
                if idx is None:
                    break
                a, b = self.pairs[idx]
                if a in texts or b in texts or a == b:
                    waiting.append(idx)
                    continue
                batch.append(idx)
                texts.update((a, b))
                added = True
            if len(batch) == self.batch_size:
                batches.append(batch)
                batch, texts = [], set()
            elif not added:
                return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch_batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(epoch_batches)

    def __len__(self) -> int:
        return len(self.pairs) // self.batch_size


def _check_pairs(train_pairs: Sequence[tuple[str, str]], batch_size: int) -> None:
    if batch_size < 2:
        raise BaselineInputError(f"batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    for i, pair in enumerate(train_pairs):
        if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
            raise BaselineInputError(f"train_pairs[{i}] must be two non-empty strings, got {pair!r}")
    if len(train_pairs) < batch_size:
        raise BaselineInputError(
            f"{len(train_pairs)} training pairs cannot fill one batch of {batch_size}"
        )


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` onto ``out_dir``. An existing ``out_dir`` is first
    renamed aside and deleted after the swap (a crash in between leaves it in a ``.old`` sibling)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rename(out_dir, old / "model")
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finetune_sentence_encoder(
    train_pairs: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 2e-5,
    seed: int = 0,
    max_steps: int | None = None,
    max_seq_length: int = MAX_SEQ_LENGTH,
    base: str = SENTENCE_ENCODER_BASE,
) -> Path:
    """Fine-tune a sentence encoder on related-note pairs and save it to ``out_dir``.

    train_pairs: ``(text_a, text_b)`` related notes (``PromptBuilder.plain_texts``). Loss:
    ``MultipleNegativesRankingLoss`` (scale ``MNRL_SCALE``, both directions), batches from
    ``NoDuplicatesBatchSampler``; AdamW with weight decay 0.01, linear warmup over
    ``WARMUP_FRACTION`` of the steps then linear decay, clipping at ``MAX_GRAD_NORM``.
    Steps: ``max_steps`` if given (one pass through ``epochs=1``), else
    ``epochs * (len(train_pairs) // batch_size)``. ``max_seq_length``: word pieces read per note
    (saved with the model). Deterministic for a seed on a CPU.

    Cost on this 2-core CPU machine (batch 32, Stack Exchange notes, 128 word pieces), measured
    while other jobs shared it: 200 steps took 2002 s (10.0 s/step) with 1 torch thread; with 2
    threads 10 steps took 23 s/step (oversubscribed). Isolated forward+backward of one batch:
    4.0 s at 128 word pieces, 1.6 s at 64; fused AdamW step 0.4 s. Callers on shared CPUs should
    set ``torch.set_num_threads`` to the cores they really own.

    The model is written with ``SentenceTransformer.save`` (safetensors) into a temporary sibling
    folder that is renamed onto ``out_dir`` (replacing an older one). The folder loads offline
    with ``notellm.models.load_sentence_encoder(out_dir)``. Returns ``out_dir``.
    """
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from notellm.models import load_sentence_encoder

    _check_pairs(train_pairs, batch_size)
    if epochs < 1 or (max_steps is not None and max_steps < 1):
        raise BaselineInputError(f"need epochs >= 1 and max_steps >= 1, got {epochs}, {max_steps}")
    pairs = [(a, b) for a, b in train_pairs]
    sampler = NoDuplicatesBatchSampler(pairs, batch_size, seed)
    if not sampler.batches(0):
        raise BaselineInputError(
            f"no batch of {batch_size} pairs without a repeated text can be formed from "
            f"{len(pairs)} pairs: lower batch_size"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    model = load_sentence_encoder(base, fresh=True)
    model.max_seq_length = max_seq_length
    examples = [InputExample(texts=[a, b]) for a, b in pairs]
    loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler)
    loss = MultipleNegativesRankingLoss(
        model, scale=MNRL_SCALE, directions=MNRL_DIRECTIONS, partition_mode="per_direction"
    )
    steps_per_epoch = max_steps if max_steps is not None else len(sampler)
    total_steps = steps_per_epoch * (1 if max_steps is not None else epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.old_fit(
            train_objectives=[(loader, loss)],
            epochs=1 if max_steps is not None else epochs,
            steps_per_epoch=steps_per_epoch,
            warmup_steps=int(WARMUP_FRACTION * total_steps),
            optimizer_params={"lr": lr, "fused": ADAMW_FUSED},
            max_grad_norm=MAX_GRAD_NORM,
            show_progress_bar=False,
        )
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save(str(tmp), safe_serialization=True)
        pickled = [p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]
        if pickled or not any(tmp.rglob("*.safetensors")):
            raise BaselineInputError(f"saving the encoder wrote {pickled or 'no safetensors weights'}")
        tmp.chmod(0o755)  # mkdtemp creates 0700
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fine-tuned %s for %d steps into %s", base, total_steps, out_dir)
    return out_dir
