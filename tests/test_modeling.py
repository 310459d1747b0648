"""NoteLLM model wrapper (notellm.modeling) on the real tiny-llama (random 2-layer LLaMA, real
SmolLM2 tokenizer) and, once, on the real SmolLM2-135M: padding/batch invariance of the embedding,
which parameters train under LoRA, the adapter-sized saved state and its base-model check,
greedy generation, and that embedding never runs the LM head."""

from __future__ import annotations

import torch
import pytest
from safetensors import safe_open

from notellm.config import LoraConfig, ModelConfig, PromptConfig
from notellm.modeling import (
    NoteLLM,
    TrainableStateError,
    attention_mask_from_lengths,
    build_notellm,
    pad_sequences,
    position_ids_from_mask,
)
from notellm.losses import csft_loss, gathered_gcl_loss, total_loss
from notellm.prompts import IGNORE_INDEX, PromptBuilder

TINY = ModelConfig(name="tiny-llama", emb_dim=32, tau_init=3.0)
LORA = LoraConfig()  # default: r=16, all 7 projection modules
ATOL = 1e-5


def make_notes(n: int) -> list[dict]:
    """Notes of clearly different lengths (so a batch of 16 has a lot of padding)."""
    words = "coffee grinder espresso moka pot beer hops malt sensor mqtt broker raspberry".split()
    return [
        {
            "note_id": f"note-{i}",
            "title": f"Question {i} about {words[i % len(words)]}",
            "content": " ".join(words[(i + k) % len(words)] for k in range(3 + 9 * i)),
            "hashtags": [words[i % len(words)], words[(i + 5) % len(words)]],
            "category": ["coffee", "beer", "iot"][i % 3],
        }
        for i in range(n)
    ]


def batch_of(encoded, model: NoteLLM, side: str = "right") -> dict[str, torch.Tensor]:
    return pad_sequences([e.input_ids for e in encoded], model.pad_token_id, side, [e.emb_pos for e in encoded])


def perturb_trainable(model: NoteLLM, seed: int, std: float = 0.05) -> None:
    """Give every trainable tensor non-initial values (LoRA B starts at zero: without this a
    save/load round trip would pass even if nothing was loaded)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in model.trainable_names:
            p = params[name]
            p.add_(std * torch.randn(p.shape, generator=gen).to(p.dtype))


@pytest.fixture(scope="module")
def tiny() -> tuple[NoteLLM, PromptBuilder]:
    model, tokenizer = build_notellm(TINY, LORA, for_training=True)
    return model, PromptBuilder(tokenizer, PromptConfig())


# --------------------------------------------------------------------------- pure helpers


def test_mask_and_positions_right_and_left() -> None:
    lengths = torch.tensor([3, 1])
    right = attention_mask_from_lengths(lengths, 4, "right")
    left = attention_mask_from_lengths(lengths, 4, "left")
    assert right.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert left.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert position_ids_from_mask(right).tolist() == [[0, 1, 2, 2], [0, 0, 0, 0]]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    batch = pad_sequences([[5, 6, 7], [8]], pad_id=2, padding_side="left", emb_pos=[1, 0])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert batch["emb_pos"].tolist() == [1, 2]


# --------------------------------------------------------------------------- embedding


def test_embedding_independent_of_batch_and_padding(tiny) -> None:
    model, builder = tiny
    model.eval()
    encoded = builder.encode_many(make_notes(16), "embed")
    lengths = sorted(len(e.input_ids) for e in encoded)
    assert lengths[-1] - lengths[0] > 50  # real padding in the batch
    with torch.inference_mode():
        solo = torch.cat([model.encode(**batch_of([e], model)) for e in encoded])
        right = model.encode(**batch_of(encoded, model, "right"))
        left = model.encode(**batch_of(encoded, model, "left"), padding_side="left")
    assert right.shape == (16, TINY.emb_dim) and right.dtype == torch.float32
    torch.testing.assert_close(right.norm(dim=1), torch.ones(16))
    assert (right - solo).abs().max() < ATOL
    assert (left - solo).abs().max() < ATOL
    # the notes get different embeddings (pooling does not read a constant position)
    assert torch.cdist(solo, solo).fill_diagonal_(1).min() > 1e-3


def test_training_prompt_embeds_like_the_embed_prompt(tiny) -> None:
    """Training pools the same hidden state that batch embedding and serving pool."""
    model, builder = tiny
    model.eval()
    notes = make_notes(6)
    train = builder.encode_many(notes, "train", task="category")
    embed = builder.encode_many(notes, "embed")
    with torch.inference_mode():
        emb_train, hidden = model.forward_train(batch_of(train, model))
        emb_embed = model.encode(**batch_of(embed, model))
    assert hidden.shape[:2] == batch_of(train, model)["input_ids"].shape
    assert hidden.shape[2] == model.causal_lm.config.hidden_size
    assert (emb_train - emb_embed).abs().max() < ATOL


def test_encode_never_runs_the_lm_head(tiny) -> None:
    model, builder = tiny
    model.eval()
    calls: list[int] = []
    hook = model.output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        encoded = builder.encode_many(make_notes(2), "embed")
        with torch.inference_mode():
            model.encode(**batch_of(encoded, model))
            model.forward_train(batch_of(encoded, model))
        assert calls == []
        model.generate([encoded[0].input_ids], max_new_tokens=1)  # the hook does fire on LM use
        assert calls
    finally:
        hook.remove()


# --------------------------------------------------------------------------- training


def test_lora_trains_emb_row_projection_and_tau_only(tiny) -> None:
    model, builder = tiny
    model.train()
    emb_id = model.emb_token_id
    names = set(model.trainable_names)
    n_layers = model.causal_lm.config.num_hidden_layers
    lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * n_layers * len(LORA.target_modules)
    token_rows = {n for n in names if "trainable_tokens_delta" in n}
    assert len(token_rows) == 1
    assert names == lora | token_rows | {"proj.weight", "proj.bias", "tau"}

    # the [EMB] row starts at the mean of the original rows; input and output rows agree (tied)
    base = model.causal_lm.get_base_model()
    original = base.get_input_embeddings().token_adapter.base_layer.weight
    torch.testing.assert_close(original[emb_id], original[:emb_id].mean(dim=0))
    head = model.lm_head_weight()
    assert head.shape == (emb_id + 1, model.causal_lm.config.hidden_size)
    torch.testing.assert_close(head, original)

    encoded = builder.encode_many(make_notes(4), "train", task="category")
    batch = batch_of(encoded, model)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, e in enumerate(encoded):
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    model.zero_grad(set_to_none=True)
    emb, hidden = model(batch)  # forward == forward_train (what a DDP wrapper calls)
    assert emb.requires_grad and hidden.requires_grad
    logits = model.lm_logits(hidden[:, :3])
    torch.testing.assert_close(logits, hidden[:, :3] @ model.lm_head_weight().T)
    l_cl = gathered_gcl_loss(emb, torch.arange(4), model.tau)  # pairs (0, 2), (1, 3)
    l_gen = csft_loss(hidden, labels, model.lm_logits)
    total_loss(l_cl, l_gen, alpha=1.0).backward()

    params = dict(model.named_parameters())
    for name in names:
        if ".lora_A." in name:  # B starts at zero, so A gets no gradient on the first step
            continue
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, p in params.items():
        if name not in names:
            assert not p.requires_grad and p.grad is None, name
    model.zero_grad(set_to_none=True)


def test_full_finetuning_when_lora_disabled() -> None:
    model, _ = build_notellm(TINY, LoraConfig(enabled=False), for_training=True)
    params = dict(model.named_parameters())
    assert set(model.trainable_names) == set(params)
    assert all(p.requires_grad for p in params.values())
    assert model.lm_head_weight() is model.causal_lm.get_input_embeddings().weight  # tied


def test_inference_build_is_frozen_and_in_eval_mode() -> None:
    model, _ = build_notellm(TINY, LORA, for_training=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert len(model.trainable_names) == 32  # the same names as the training build


# --------------------------------------------------------------------------- saved state


def test_save_load_round_trip_is_exact_and_adapter_sized(tiny, tmp_path) -> None:
    model, builder = tiny
    model.eval()
    perturb_trainable(model, seed=1)
    encoded = builder.encode_many(make_notes(5), "embed")
    with torch.inference_mode():
        expected = model.encode(**batch_of(encoded, model))
    path = model.save_trainable_state(tmp_path / "state.safetensors")

    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == set(model.trainable_names)
        assert fh.metadata()["base_model_fingerprint"] == model.base_model_fingerprint
    n_trainable = sum(t.numel() for t in model.trainable_state_dict().values())
    n_total = sum(p.numel() for p in model.parameters())
    assert n_trainable < 0.05 * n_total
    assert path.stat().st_size < 4 * n_trainable + 64_000  # float32 tensors + header

    fresh, _ = build_notellm(TINY, LORA, for_training=False)
    with torch.inference_mode():
        before = fresh.encode(**batch_of(encoded, fresh))
        assert (before - expected).abs().max() > 1e-3  # loading has something to do
        fresh.load_trainable_state(path)
        after = fresh.encode(**batch_of(encoded, fresh))
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


def test_state_from_another_base_model_is_refused(tiny, tmp_path) -> None:
    model, _ = tiny
    path = model.save_trainable_state(tmp_path / "state.safetensors")
    other_seed, _ = build_notellm(TINY, LORA, for_training=False, seed=1)
    with pytest.raises(TrainableStateError, match="fingerprint"):
        other_seed.load_trainable_state(path)
    other_rank, _ = build_notellm(TINY, LoraConfig(r=4), for_training=False)
    with pytest.raises(TrainableStateError, match="shape"):
        other_rank.load_trainable_state(path)


# --------------------------------------------------------------------------- generation


def greedy_reference(model: NoteLLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow way: a full forward of the unpadded sequence per new token, logits
    from ``lm_head_weight``."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(torch.tensor([ids]), torch.tensor([len(ids)]))
        ids.append(int((hidden[0, -1] @ model.lm_head_weight().T).argmax()))
        if ids[-1] == model.tokenizer.eos_token_id:
            break
    return ids[len(prompt) :]


def test_generate_is_greedy_left_padded_and_deterministic() -> None:
    model, tokenizer = build_notellm(TINY, LORA, for_training=False)
    # large LoRA weights: a random tiny-llama otherwise says the same thing whatever the prompt
    perturb_trainable(model, seed=2, std=1.0)
    builder = PromptBuilder(tokenizer, PromptConfig())
    prompts = [e.input_ids for e in builder.encode_many(make_notes(4), "generate", task="category")]
    assert len({len(p) for p in prompts}) == 4  # left padding is exercised
    batched = model.generate(prompts, max_new_tokens=5)
    assert len(set(batched)) > 1 and all(isinstance(s, str) for s in batched)
    assert model.generate(prompts, max_new_tokens=5) == batched
    with torch.inference_mode():
        reference = [tokenizer.decode(greedy_reference(model, p, 5), skip_special_tokens=True) for p in prompts]
    assert batched == reference


# --------------------------------------------------------------------------- real SmolLM2


def test_smollm2_embedding_padding_invariance_and_cross_model_refusal(tiny, tmp_path) -> None:
    """SmolLM2 and tiny-llama share the tokenizer GGUF (same ModelSpec.sha256): the fingerprint
    must still tell them apart."""
    model, tokenizer = build_notellm(ModelConfig(name="smollm2-135m"), LORA, for_training=False)
    builder = PromptBuilder(tokenizer, PromptConfig())
    encoded = builder.encode_many(make_notes(3), "embed")
    with torch.inference_mode():
        solo = model.encode(**batch_of(encoded[:1], model))
        left = model.encode(**batch_of(encoded, model, "left"), padding_side="left")
    assert (left[:1] - solo).abs().max() < 1e-4  # 30 layers of float32 rounding
    tiny_path = tiny[0].save_trainable_state(tmp_path / "tiny.safetensors")
    with pytest.raises(TrainableStateError, match="fingerprint"):
        model.load_trainable_state(tiny_path)


def test_merged_adapters_embed_like_unmerged(tiny, tmp_path) -> None:
    """Serving may fold LoRA and the [EMB] row into the base weights: same embeddings."""
    builder = tiny[1]
    serving, _ = build_notellm(TINY, LORA, for_training=False)
    perturb_trainable(serving, seed=3)
    path = serving.save_trainable_state(tmp_path / "state.safetensors")
    base_row = serving.causal_lm.get_base_model().get_input_embeddings().token_adapter.base_layer.weight
    row_before = base_row[serving.emb_token_id].clone()
    encoded = builder.encode_many(make_notes(4), "embed")
    with torch.inference_mode():
        unmerged = serving.encode(**batch_of(encoded, serving))
        serving.merge_adapters()
        merged = serving.encode(**batch_of(encoded, serving))
    assert (merged - unmerged).abs().max() < ATOL
    assert not torch.equal(base_row[serving.emb_token_id], row_before)  # really merged
    torch.testing.assert_close(serving.lm_head_weight(), base_row, atol=0, rtol=0)
    with pytest.raises(TrainableStateError, match="merged"):
        serving.load_trainable_state(path)
