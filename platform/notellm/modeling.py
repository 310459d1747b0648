"""The NoteLLM model: a causal LM + [EMB] token + LoRA + projection head + temperature.

One ``NoteLLM.encode`` serves training, batch embedding and online serving (method.md section 3):
the note embedding is the last hidden state of the token right before ``[EMB]`` (``emb_pos``, see
``notellm.prompts``), projected to ``model.emb_dim`` dimensions and L2-normalised.

Build::

    model, tokenizer = build_notellm(cfg.model, cfg.lora, for_training=True)

* The base causal LM comes from ``notellm.models.load_causal_lm(name, fresh=True)`` (a private
  copy). ``[EMB]`` is added to the tokenizer (``notellm.prompts.add_emb_token``), the token
  embeddings are resized, and the new ``[EMB]`` row is set to the mean of the original rows (the
  same for the output row when input and output embeddings are not tied).
* ``lora.enabled``: peft LoRA on ``lora.target_modules``, plus the ``[EMB]`` embedding row as a
  trainable token (peft ``LoraConfig.trainable_token_indices``). peft stores that row as a 1 x H
  delta parameter shared by the input embedding and, when the weights are tied (SmolLM2,
  tiny-llama), the LM head, so the tied row stays tied while every other base weight is frozen.
  ``lora.enabled = false``: full fine-tuning (every base weight trainable).
* Always trainable: ``proj`` (``nn.Linear(hidden, emb_dim)``, float32) and ``tau`` (float32 scalar,
  initialised to ``model.tau_init``; the similarity scale is ``exp(tau)``).

What is trainable is fixed at build time (``trainable_names``). ``for_training=False`` builds the
same structure, freezes everything and switches to eval mode: load a trained state into it with
``load_trainable_state``.

Padding. ``encode`` takes token ids padded on the right (default) or the left (``forward_train``:
right), and the true lengths; the attention mask is built from the lengths (never from ``token ==
pad``: SmolLM2's pad token is its EOS) and ``position_ids`` from the mask, so a note gets the same
embedding alone, in any batch, with either padding side (up to float rounding).

Saved state. ``save_trainable_state`` writes a safetensors file with the trainable tensors only
(LoRA A/B, the ``[EMB]`` row, ``proj``, ``tau``: adapter-sized) and metadata including
``base_model_fingerprint`` (``<kind>:<ModelSpec.sha256>``, plus the seed for ``tiny-llama``);
``load_trainable_state`` refuses a file made on another base model. For serving,
``merge_adapters`` folds LoRA and the ``[EMB]`` row into the base weights (same embeddings up to
float rounding, no adapter matmuls).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from notellm.config import LoraConfig as LoraSettings
from notellm.config import ModelConfig
from notellm.models import TINY_LLAMA_SEED, load_causal_lm, resolve_model
from notellm.prompts import add_emb_token

PaddingSide = Literal["right", "left"]

STATE_FORMAT = "notellm-trainable-state/1"
PROJ_PREFIX = "proj."
TAU_KEY = "tau"
BASE_PREFIX = "base."


class TrainableStateError(ValueError):
    """A trainable-state file does not fit this model (other base model, LoRA shape, format)."""


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def attention_mask_from_lengths(
    lengths: torch.Tensor, seq_len: int, padding_side: PaddingSide = "right"
) -> torch.Tensor:
    """[B] lengths -> [B, T] long mask (1 = real token). Right padding: tokens at
    ``0..length-1``; left padding: tokens at ``T-length..T-1``."""
    positions = torch.arange(seq_len, device=lengths.device).unsqueeze(0)
    lengths = lengths.to(torch.long).unsqueeze(1)
    if padding_side == "right":
        mask = positions < lengths
    elif padding_side == "left":
        mask = positions >= seq_len - lengths
    else:
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    return mask.to(torch.long)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B, T] position ids: 0 at each row's first real token, counting real tokens
    (padding positions get 0). Same ids for a note whatever its padding."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: PaddingSide = "right",
    emb_pos: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token-id lists into a batch.

    Returns ``input_ids`` [B, T] long, ``lengths`` [B] long and, when ``emb_pos`` (indices in the
    unpadded sequences) is given, ``emb_pos`` [B] long shifted to the padded layout (left padding
    adds ``T - length``).
    """
    if not sequences:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError("pad_sequences: empty sequence")
    seq_len = max(lengths)
    input_ids = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = 0 if padding_side == "right" else seq_len - len(seq)
        input_ids[row, start : start + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    batch = {"input_ids": input_ids, "lengths": torch.as_tensor(lengths, dtype=torch.long)}
    if emb_pos is not None:
        shift = [0 if padding_side == "right" else seq_len - n for n in lengths]
        batch["emb_pos"] = torch.as_tensor([p + s for p, s in zip(emb_pos, shift)], dtype=torch.long)
    return batch


def base_model_fingerprint(name: str, seed: int = TINY_LLAMA_SEED) -> str:
    """Identity of a base model's weights: ``<kind>:<ModelSpec.sha256>``.

    For ``tiny-llama`` (kind ``random-llama``) the spec hash is the tokenizer GGUF's, which equals
    SmolLM2's; the weights are a function of the seed, so the seed is appended (``:seed=N``).
    """
    spec = resolve_model(name)
    fingerprint = f"{spec.kind}:{spec.sha256}"
    if spec.kind == "random-llama":
        fingerprint += f":seed={seed}"
    return fingerprint


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class NoteLLM(nn.Module):
    """Causal LM (optionally LoRA-wrapped) + projection head + temperature.

    Attributes: ``causal_lm`` (the ``PreTrainedModel`` or peft ``PeftModel``), ``proj``
    (``nn.Linear(hidden, emb_dim)``, float32), ``tau`` (float32 scalar parameter),
    ``emb_token_id``, ``base_model_fingerprint``, ``trainable_names`` (sorted names of the
    parameters trained and saved). Build it with ``build_notellm``.
    """

    def __init__(
        self,
        causal_lm: nn.Module,
        *,
        emb_dim: int,
        tau_init: float,
        emb_token_id: int,
        pad_token_id: int,
        base_model_name: str,
        fingerprint: str,
        lora_enabled: bool,
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        hidden = self._base_lm().config.hidden_size
        self.proj = nn.Linear(hidden, emb_dim, dtype=torch.float32)
        self.tau = nn.Parameter(torch.tensor(float(tau_init), dtype=torch.float32))
        self.emb_token_id = emb_token_id
        self.pad_token_id = pad_token_id
        self.base_model_name = base_model_name
        self.base_model_fingerprint = fingerprint
        self.lora_enabled = lora_enabled
        self.emb_dim = emb_dim
        self.merged = False
        self.trainable_names: tuple[str, ...] = tuple(
            sorted(n for n, p in self.named_parameters() if p.requires_grad)
        )

    # ------------------------------------------------------------------ pieces

    def _base_lm(self) -> PreTrainedModel:
        """The underlying ``*ForCausalLM`` (LoRA layers injected in place when enabled)."""
        lm = self.causal_lm
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    def decoder(self) -> nn.Module:
        """The inner transformer (``LlamaModel``): hidden states only, no LM head."""
        return self._base_lm().get_decoder()

    def output_embeddings(self) -> nn.Module:
        """The LM head module (peft ``TrainableTokensWrapper`` under LoRA with tied weights)."""
        return self._base_lm().get_output_embeddings()

    def lm_head_weight(self) -> torch.Tensor:
        """The effective [V, H] LM head weight, ``logits = hidden @ W.T``.

        Under LoRA with tied embeddings it is the frozen base matrix with the trainable ``[EMB]``
        row put in (the row carries gradient, the rest does not); with full fine-tuning the whole
        matrix carries gradient. Same result as calling the LM head module.
        """
        head = self.output_embeddings()
        adapter = getattr(head, "token_adapter", None)
        if adapter is not None and not adapter.merged:
            return adapter.get_merged_weights(adapter.active_adapters)
        if adapter is not None:
            return adapter.get_base_layer().weight
        return head.weight

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [..., V] logits through the LM head module (the ``lm_head``
        callable of ``notellm.losses.csft_loss``). Gradient as for ``lm_head_weight``."""
        return self.output_embeddings()(hidden)

    def scale(self) -> torch.Tensor:
        """exp(tau): the similarity scale of the contrastive loss (0-dim, carries gradient)."""
        return self.tau.exp()

    # ------------------------------------------------------------------ forward paths

    def hidden_states(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, padding_side: PaddingSide = "right"
    ) -> torch.Tensor:
        """Last-layer hidden states [B, T, H] (model dtype) of padded ``input_ids`` [B, T] with true
        ``lengths`` [B]. Runs the inner transformer only (the LM head is not called). Carries
        gradient to the trainable parameters when grad is enabled. Padding rows are garbage."""
        device = self.tau.device
        input_ids = input_ids.to(device)
        mask = attention_mask_from_lengths(lengths.to(device), input_ids.shape[1], padding_side)
        out = self.decoder()(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def pool(self, hidden: torch.Tensor, emb_pos: torch.Tensor) -> torch.Tensor:
        """[B, T, H] hidden states, [B] pooled positions -> [B, d] float32 L2-normalised
        embeddings (``proj`` of the hidden state at ``emb_pos``). The projection runs in float32
        also under autocast: a bf16 ``proj`` output is normalised only to ~1e-2."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, emb_pos.to(hidden.device)].to(torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.normalize(self.proj(pooled), dim=-1)

    def encode(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        emb_pos: torch.Tensor,
        padding_side: PaddingSide = "right",
    ) -> torch.Tensor:
        """Note embeddings [B, d], float32, L2-normalised.

        ``input_ids`` [B, T] padded token ids, ``lengths`` [B] true lengths, ``emb_pos`` [B] index
        (in the padded layout) of the token right before ``[EMB]``. Gradient flows to the trainable
        parameters when grad is enabled; call under ``torch.inference_mode()`` to embed. Use
        ``eval()`` first: LoRA dropout is active in train mode.
        """
        return self.pool(self.hidden_states(input_ids, lengths, padding_side), emb_pos)

    def forward_train(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass shared by GCL and CSFT.

        ``batch``: ``input_ids`` [B, T] (right-padded training prompts), ``lengths`` [B],
        ``emb_pos`` [B]. Returns ``(emb, hidden)``: ``emb`` [B, d] float32 L2-normalised note
        embeddings and ``hidden`` [B, T, H] last hidden states (model dtype), both carrying
        gradient. For the losses: ``csft_loss(hidden, labels, model.lm_logits)`` and
        ``gathered_gcl_loss(emb, ids, model.tau)``. The causal attention makes ``emb``
        independent of the tokens after ``[EMB]`` (same as ``encode`` of the embed prompt).
        """
        hidden = self.hidden_states(batch["input_ids"], batch["lengths"], "right")
        return self.pool(hidden, batch["emb_pos"]), hidden

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_train``. Under DDP call the wrapper (``ddp_model(batch)``), not
        ``forward_train`` directly: DDP prepares its gradient all-reduce in ``forward``."""
        return self.forward_train(batch)

    @torch.inference_mode()
    def generate(
        self,
        prompts_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int | None = None,
    ) -> list[str]:
        """Greedy generation from ``generate``-variant prompts (token-id lists, cut after the
        Output Guidance). Batched with left padding; stops at EOS or after ``max_new_tokens``.
        Returns the decoded new text of each prompt (special tokens skipped, not stripped: the
        category usually starts with a space; see ``notellm.prompts.parse_output``). Needs the
        tokenizer handed to ``attach_tokenizer`` (``build_notellm`` does it)."""
        tokenizer = self.tokenizer
        batch = pad_sequences(prompts_ids, self.pad_token_id, "left")
        device = self.tau.device
        input_ids = batch["input_ids"].to(device)
        mask = attention_mask_from_lengths(batch["lengths"].to(device), input_ids.shape[1], "left")
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        out = self._base_lm().generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
        )
        new = out[:, input_ids.shape[1] :]
        return tokenizer.batch_decode(new, skip_special_tokens=True)

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Keep the tokenizer (with ``[EMB]``) for ``generate``; not a module, not saved."""
        object.__setattr__(self, "tokenizer", tokenizer)

    def merge_adapters(self) -> None:
        """Fold LoRA and the ``[EMB]`` row into the base weights (peft ``merge_adapter``) for
        faster inference; embeddings change only by float rounding. Only for a frozen model in
        eval mode; ``trainable_state_dict`` still works, ``load_trainable_state`` is refused
        afterwards (the merged weights would keep the old adapter). No-op without LoRA."""
        if self.training or any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("merge_adapters is for inference: build with for_training=False")
        if self.lora_enabled and not self.merged:
            self.causal_lm.merge_adapter()
            self.merged = True

    # ------------------------------------------------------------------ trainable state

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (LoRA A/B, the ``[EMB]`` row delta, ``proj.*``, ``tau``; every
        base weight too under full fine-tuning), detached, on the CPU, contiguous."""
        params = dict(self.named_parameters())
        return {n: params[n].detach().to("cpu").contiguous() for n in self.trainable_names}

    def state_metadata(self) -> dict[str, str]:
        """Metadata stored beside the trainable state (all strings, as safetensors requires)."""
        return {
            "format": STATE_FORMAT,
            "base_model_fingerprint": self.base_model_fingerprint,
            "base_model_name": self.base_model_name,
            "emb_token_id": str(self.emb_token_id),
            "emb_dim": str(self.emb_dim),
            "lora_enabled": json.dumps(self.lora_enabled),
        }

    def save_trainable_state(
        self, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Write ``trainable_state_dict`` + metadata to a safetensors file (atomically: a temporary
        sibling is renamed into place). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**self.state_metadata(), **dict(extra_metadata or {})}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(self.trainable_state_dict(), str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def load_trainable_state(self, path: str | os.PathLike) -> dict[str, str]:
        """Load a file written by ``save_trainable_state`` into this model, in place; returns its
        metadata. Raises ``TrainableStateError`` when the file was made on another base model
        (fingerprint), with another ``[EMB]`` id, or another set/shape of trainable tensors."""
        path = Path(path)
        if self.merged:
            raise TrainableStateError(f"{path}: cannot load into a model whose adapters are merged")
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if metadata.get("format") != STATE_FORMAT:
            raise TrainableStateError(
                f"{path}: not a NoteLLM trainable state (format {metadata.get('format')!r})"
            )
        theirs = metadata.get("base_model_fingerprint")
        if theirs != self.base_model_fingerprint:
            raise TrainableStateError(
                f"{path} was trained on base model {metadata.get('base_model_name')!r} "
                f"(fingerprint {theirs}), but this model is built on {self.base_model_name!r} "
                f"(fingerprint {self.base_model_fingerprint}): build the model on the same base model"
            )
        if metadata.get("emb_token_id") != str(self.emb_token_id):
            raise TrainableStateError(
                f"{path}: [EMB] token id {metadata.get('emb_token_id')} != this tokenizer's "
                f"{self.emb_token_id}"
            )
        expected = set(self.trainable_names)
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:5]
            unexpected = sorted(set(tensors) - expected)[:5]
            raise TrainableStateError(
                f"{path}: trainable tensors differ from this model's (LoRA settings or fine-tuning mode "
                f"differ?): missing {missing}, unexpected {unexpected}"
            )
        params = dict(self.named_parameters())
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise TrainableStateError(
                    f"{path}: {name} has shape {tuple(value.shape)}, this model {tuple(params[name].shape)}"
                )
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        return metadata


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _add_emb_row(model: PreTrainedModel, n_original: int, emb_token_id: int, vocab_size: int) -> None:
    """Resize the token embeddings to ``vocab_size`` rows (if smaller) and set row ``emb_token_id``
    to the mean of the first ``n_original`` rows (output embeddings too when not tied)."""
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is None:
                continue
            weight = module.weight
            weight[emb_token_id] = weight[:n_original].float().mean(dim=0).to(weight.dtype)


def base_weights_dtype(bf16: bool, base_frozen: bool) -> torch.dtype:
    """Storage dtype of the base model's weights: bfloat16 when running under bf16 autocast with
    the base frozen (LoRA training, or any embedding/generation), else float32 (full fine-tuning
    keeps float32 master weights). bf16 storage removes autocast's per-step fp32 -> bf16 weight
    casts: measured 2x per training step on the 2-core demo CPU, and half the memory. Trainable
    tensors (LoRA, the ``[EMB]`` row delta, ``proj``, ``tau``) stay float32 either way."""
    return torch.bfloat16 if bf16 and base_frozen else torch.float32


def build_notellm(
    model_cfg: ModelConfig,
    lora_cfg: LoraSettings,
    *,
    for_training: bool,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = TINY_LLAMA_SEED,
    emb_token: str | None = None,
) -> tuple[NoteLLM, PreTrainedTokenizerBase]:
    """Build a NoteLLM and its tokenizer (with ``[EMB]``) from config.

    ``for_training``: train mode with the trainable parameters requiring grad (LoRA A/B, the
    ``[EMB]`` row, ``proj``, ``tau``; or everything when ``lora_cfg.enabled`` is false). Otherwise
    eval mode, nothing requires grad. ``dtype`` is the base model's dtype (``proj`` and ``tau`` stay
    float32). ``seed`` fixes ``tiny-llama``'s weights and the projection's initialisation.
    """
    base, tokenizer = load_causal_lm(model_cfg.name, dtype=dtype, seed=seed, fresh=True)
    n_original = len(tokenizer)
    emb_token_id = add_emb_token(tokenizer, emb_token)
    _add_emb_row(base, n_original, emb_token_id, len(tokenizer))
    base.requires_grad_(not lora_cfg.enabled)
    if lora_cfg.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_cfg = PeftLoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules),
            trainable_token_indices=[emb_token_id],
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 method deprecated in favour of a new name
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            torch.manual_seed(seed)
            causal_lm: nn.Module = get_peft_model(base, peft_cfg)
    else:
        causal_lm = base
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoteLLM(
            causal_lm,
            emb_dim=model_cfg.emb_dim,
            tau_init=model_cfg.tau_init,
            emb_token_id=emb_token_id,
            pad_token_id=pad_id,
            base_model_name=model_cfg.name,
            fingerprint=base_model_fingerprint(model_cfg.name, seed),
            lora_enabled=lora_cfg.enabled,
        )
    model.attach_tokenizer(tokenizer)
    model.to(device)
    if for_training:
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()
    return model, tokenizer

