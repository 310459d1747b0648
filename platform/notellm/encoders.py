"""Note encoders: NoteLLM and the dense baselines behind one interface (method.md section 5).

Every encoder turns notes (mappings of the notes contract: ``note_id``, ``title``, ``content``,
``hashtags``, ``category``) into float32 L2-normalised vectors [n, d], in two steps so that callers
can sort by length in between:

* ``tokenize(notes) -> list[TokenizedNote]``: the text the model sees, tokenized (cheap, CPU);
* ``embed(items) -> np.ndarray [n, d]``: one padded forward pass over ``items`` (no gradient).

``embed_notes`` does both with length-sorted micro-batches and is the one code path of batch
embedding (``pipelines.embed``'s actors), the benchmarks and serving.

Methods (``METHODS``):

* ``notellm``: the trained model: the ``embed`` Note Compression Prompt, the hidden state of the
  token before ``[EMB]``, projected to ``model.emb_dim`` (``NoteLLM.encode``); LoRA merged.
* ``llm-mean`` / ``llm-last``: the base LLM zero-shot on the plain note text (no prompt): mean of
  the last hidden states / the last token's (method.md: "mean/last hidden state with no prompt").
* ``prompteol``: the base LLM zero-shot with ``PROMPTEOL_TEMPLATE``; the last token's hidden state.
* ``minilm``: MiniLM (SentenceBERT) zero-shot on the plain note text; ``minilm-ft``: the same
  architecture fine-tuned contrastively on the training pairs (``notellm.baselines``), loaded from
  a folder.

The plain text and the PromptEOL prompt come from ``PromptBuilder.plain_texts`` /
``prompteol_texts`` (the same field budgets as the NoteLLM prompt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from notellm.config import PipelineConfig
from notellm.modeling import (
    attention_mask_from_lengths,
    base_model_fingerprint,
    base_weights_dtype,
    build_notellm,
    pad_sequences,
    position_ids_from_mask,
)
from notellm.models import (
    causal_lm_hidden_size,
    load_causal_lm,
    load_sentence_encoder,
    load_tokenizer,
    sentence_encoder_dim,
)
from notellm.prompts import PromptBuilder

METHODS = ("notellm", "llm-mean", "llm-last", "prompteol", "minilm", "minilm-ft")
"""Dense encoders ``load_encoder`` builds."""
SENTENCE_BASE = "minilm-l6"
"""The SentenceBERT baseline's base model (``notellm.models``)."""


class EncoderError(ValueError):
    """An encoder cannot be built: unknown method, missing checkpoint or fine-tuned folder."""


@dataclass(frozen=True)
class EncoderInfo:
    """What produced a vector: written next to embeddings and indexes, checked when they are read.

    ``version``: identity of the weights (``sha256:<16 hex>`` of the trained state file or fine-tuned
    weights, or the base model's fingerprint); ``run_id``: the MLflow training run, when known."""

    method: str
    model_name: str
    dim: int
    version: str
    run_id: str | None = None
    checkpoint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenizedNote:
    """A note as the encoder will see it: ``input_ids`` (length L) and the pooled position
    (``pool_pos`` in 0..L-1; ``-1`` = mean over all L tokens). ``text`` for text-level encoders."""

    input_ids: list[int]
    pool_pos: int
    text: str | None = None

    @property
    def length(self) -> int:
        return len(self.input_ids)


class NoteEncoder(Protocol):
    info: EncoderInfo

    def tokenize(self, notes: Sequence[Mapping[str, Any]]) -> list[TokenizedNote]: ...

    def embed(self, items: Sequence[TokenizedNote]) -> np.ndarray: ...


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``enabled`` (``embedding.bf16``); pooling stays float32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def file_digest(path: Path) -> str:
    """``sha256:<first 16 hex>`` of a file (weights identity in ``EncoderInfo.version``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# NoteLLM
# ---------------------------------------------------------------------------------------------


class NoteLLMEncoder:
    """The trained NoteLLM (``checkpoint``: a ``save_checkpoint`` folder or one holding
    ``trainable_state.safetensors``)."""

    def __init__(self, cfg: PipelineConfig, checkpoint: str | Path, device: str | torch.device = "cpu",
                 run_id: str | None = None) -> None:
        self.info = describe_encoder(cfg, "notellm", checkpoint, run_id)
        self.model, tokenizer = build_notellm(cfg.model, cfg.lora, for_training=False, device=device,
                                              dtype=base_weights_dtype(cfg.embedding.bf16, True),
                                              emb_token=cfg.prompts.emb_token)
        self.model.load_trainable_state(_trainable_state(checkpoint))
        self.model.merge_adapters()
        self.builder = PromptBuilder(tokenizer, cfg.prompts)
        self.bf16 = cfg.embedding.bf16

    def tokenize(self, notes: Sequence[Mapping[str, Any]]) -> list[TokenizedNote]:
        return [TokenizedNote(e.input_ids, e.emb_pos) for e in self.builder.encode_many(notes, "embed")]

    @torch.inference_mode()
    def embed(self, items: Sequence[TokenizedNote]) -> np.ndarray:
        batch = pad_sequences([i.input_ids for i in items], self.model.pad_token_id, "right",
                              emb_pos=[i.pool_pos for i in items])
        with autocast(self.model.tau.device, self.bf16):
            vectors = self.model.encode(batch["input_ids"], batch["lengths"], batch["emb_pos"])
        return vectors.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Zero-shot LLM baselines
# ---------------------------------------------------------------------------------------------


def pool_hidden(hidden: torch.Tensor, lengths: torch.Tensor, pool_pos: torch.Tensor) -> torch.Tensor:
    """[B, T, H] right-padded hidden states -> [B, H] float32 L2-normalised: the row at
    ``pool_pos`` [B], or the mean over the first ``lengths`` positions where ``pool_pos`` is -1."""
    hidden = hidden.float()
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).float()
    mean = (hidden * mask[..., None]).sum(1) / lengths[:, None].float()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    at = hidden[rows, pool_pos.clamp(min=0)]
    return F.normalize(torch.where((pool_pos < 0)[:, None], mean, at), dim=-1)


class CausalLMEncoder:
    """The base LLM without training: ``llm-mean``, ``llm-last`` or ``prompteol``."""

    def __init__(self, cfg: PipelineConfig, method: str, device: str | torch.device = "cpu") -> None:
        if method not in ("llm-mean", "llm-last", "prompteol"):
            raise EncoderError(f"CausalLMEncoder does not do {method!r}")
        self.method = method
        self.info = describe_encoder(cfg, method)
        self.lm, _ = load_causal_lm(cfg.model.name, dtype=base_weights_dtype(cfg.embedding.bf16, True),
                                    device=device)
        self.builder = PromptBuilder(load_tokenizer(cfg.model.name, fresh=True), cfg.prompts)
        tokenizer = self.builder.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bf16 = cfg.embedding.bf16
        _check_dim(self.info, int(self.lm.config.hidden_size))

    def tokenize(self, notes: Sequence[Mapping[str, Any]]) -> list[TokenizedNote]:
        texts = self.builder.prompteol_texts(notes) if self.method == "prompteol" else self.builder.plain_texts(notes)
        ids = self.builder.tokenizer(texts, add_special_tokens=False)["input_ids"]
        mean = self.method == "llm-mean"
        return [TokenizedNote(i or [self.pad_id], -1 if mean else max(len(i), 1) - 1, t) for i, t in zip(ids, texts)]

    @torch.inference_mode()
    def embed(self, items: Sequence[TokenizedNote]) -> np.ndarray:
        batch = pad_sequences([i.input_ids for i in items], self.pad_id, "right")
        device = self.lm.device
        input_ids, lengths = batch["input_ids"].to(device), batch["lengths"].to(device)
        mask = attention_mask_from_lengths(lengths, input_ids.shape[1], "right")
        with autocast(device, self.bf16):
            hidden = self.lm.model(input_ids=input_ids, attention_mask=mask,
                                   position_ids=position_ids_from_mask(mask), use_cache=False).last_hidden_state
        pool_pos = torch.as_tensor([i.pool_pos for i in items], device=device)
        return pool_hidden(hidden, lengths, pool_pos).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# SentenceBERT baselines
# ---------------------------------------------------------------------------------------------


class SentenceEncoder:
    """MiniLM zero-shot (``minilm``) or fine-tuned (``minilm-ft``, ``path`` = the saved folder)."""

    def __init__(self, cfg: PipelineConfig, method: str, path: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.info = describe_encoder(cfg, method, path)
        self.model = load_sentence_encoder(SENTENCE_BASE if method == "minilm" else Path(path), device)
        _check_dim(self.info, int(self.model.get_embedding_dimension()))
        self.builder = PromptBuilder(load_tokenizer(cfg.model.name, fresh=True), cfg.prompts)

    def tokenize(self, notes: Sequence[Mapping[str, Any]]) -> list[TokenizedNote]:
        texts = self.builder.plain_texts(notes)
        ids = self.model.tokenizer(texts, add_special_tokens=True, truncation=True,
                                   max_length=self.model.max_seq_length)["input_ids"]
        return [TokenizedNote(i, -1, t) for i, t in zip(ids, texts)]

    @torch.inference_mode()
    def embed(self, items: Sequence[TokenizedNote]) -> np.ndarray:
        vectors = self.model.encode([i.text for i in items], batch_size=len(items), convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Factory and the batching loop
# ---------------------------------------------------------------------------------------------


def _trainable_state(checkpoint: str | Path) -> Path:
    from notellm.training import TRAINABLE_STATE_FILE

    state = Path(checkpoint) / TRAINABLE_STATE_FILE
    if not state.is_file():
        raise EncoderError(f"{state} does not exist: expected a training checkpoint folder")
    return state


def _finetuned_folder(method: str, path: str | Path | None) -> Path:
    if path is None or not Path(path).is_dir():
        raise EncoderError(f"{method} needs the fine-tuned model folder; {path} does not exist: "
                           "pipelines.evaluate fine-tunes it first (notellm.baselines)")
    return Path(path)


def _check_dim(info: EncoderInfo, loaded: int) -> None:
    if loaded != info.dim:
        raise EncoderError(f"{info.method}: the loaded model gives {loaded}-d vectors, its config says {info.dim}")


def describe_encoder(cfg: PipelineConfig, method: str, checkpoint: str | Path | None = None,
                     run_id: str | None = None) -> EncoderInfo:
    """The ``EncoderInfo`` that ``load_encoder(cfg, method, checkpoint, run_id=run_id)`` will have,
    from configs and file hashes only (no weights loaded): a driver checks its inputs and its
    restart state with it before any actor loads the model. Raises ``EncoderError`` for the same
    missing inputs as ``load_encoder``."""
    if method == "notellm":
        if checkpoint is None:
            raise EncoderError("method 'notellm' needs a training checkpoint folder")
        return EncoderInfo(method, cfg.model.name, cfg.model.emb_dim, file_digest(_trainable_state(checkpoint)),
                           run_id, str(Path(checkpoint)))
    if method in ("llm-mean", "llm-last", "prompteol"):
        return EncoderInfo(method, cfg.model.name, causal_lm_hidden_size(cfg.model.name),
                           base_model_fingerprint(cfg.model.name))
    if method == "minilm":
        return EncoderInfo(method, SENTENCE_BASE, sentence_encoder_dim(SENTENCE_BASE),
                           base_model_fingerprint(SENTENCE_BASE), checkpoint=None if checkpoint is None else str(checkpoint))
    if method == "minilm-ft":
        folder = _finetuned_folder(method, checkpoint)
        weights = next(iter(sorted(folder.rglob("*.safetensors"))), None)
        version = file_digest(weights) if weights is not None else base_model_fingerprint(SENTENCE_BASE)
        return EncoderInfo(method, SENTENCE_BASE, sentence_encoder_dim(folder), version, checkpoint=str(checkpoint))
    raise EncoderError(f"unknown encoder method {method!r}; expected one of {METHODS}")


def load_encoder(cfg: PipelineConfig, method: str, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", run_id: str | None = None) -> NoteEncoder:
    """Build the encoder of ``method`` (``METHODS``); ``checkpoint`` is the training checkpoint
    folder (``notellm``) or the fine-tuned folder (``minilm-ft``)."""
    if method == "notellm":
        if checkpoint is None:
            raise EncoderError("method 'notellm' needs a training checkpoint folder")
        return NoteLLMEncoder(cfg, checkpoint, device=device, run_id=run_id)
    if method in ("llm-mean", "llm-last", "prompteol"):
        return CausalLMEncoder(cfg, method, device)
    if method in ("minilm", "minilm-ft"):
        return SentenceEncoder(cfg, method, checkpoint, device)
    raise EncoderError(f"unknown encoder method {method!r}; expected one of {METHODS}")


def length_order(lengths: Sequence[int]) -> np.ndarray:
    """Indices that sort ``lengths`` ascending (stable): micro-batches of similar length pad least."""
    return np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")


def embed_notes(encoder: NoteEncoder, notes: Sequence[Mapping[str, Any]], batch_size: int,
                sort_by_length: bool = True) -> np.ndarray:
    """Vectors [len(notes), d] float32, L2-normalised, row i = notes[i].

    Tokenizes all ``notes`` once, then embeds micro-batches of ``batch_size`` notes, taken in length
    order when ``sort_by_length`` (less padding; each vector does not depend on its batch mates,
    see ``NoteLLM.encode``), and puts every vector back at its note's row."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    items = encoder.tokenize(notes)
    if not items:
        return np.zeros((0, encoder.info.dim), dtype=np.float32)
    order = length_order([i.length for i in items]) if sort_by_length else np.arange(len(items))
    out = np.empty((len(items), encoder.info.dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        out[rows] = encoder.embed([items[r] for r in rows])
    return out
