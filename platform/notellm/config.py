"""One typed configuration schema for the whole pipeline.

Every stage (ingest, mine, prompts, train, embed, index, evaluate, registry, serve) reads its
settings from one ``PipelineConfig`` loaded from YAML. Unknown keys are rejected with their
dotted name, so a typo never silently falls back to a default.

Usage::

    cfg = load_config("configs/demo.yaml", overrides=["training.lr=2e-4", "mining.t=5"])

Relative paths in the YAML are resolved against the repository root (the folder holding
``pyproject.toml``), so a pipeline behaves the same from any working directory and under
``ray job submit --working-dir .``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StackExchangeConfig(_Section):
    """Where the raw Stack Exchange dumps are and which sites become the default dataset."""

    raw_dir: Path = Path("../shared/datasets/raw/stackexchange")
    sites: list[str] = Field(
        default_factory=lambda: [
            "beer", "cardano", "ai", "matheducators", "iot", "augur", "coffee", "genai"
        ]
    )


class DataConfig(_Section):
    """Input tables and the bad-row policy of the validator.

    ``notes`` and ``behaviors`` are a Parquet file, a folder of Parquet files, or a JSONL file.
    ``on_row_error``: ``fail`` stops at the first row-level problem (after collecting all of
    them, so the report is complete); ``skip`` drops bad rows and reports the counts.
    """

    notes: Path = Path("data/stackexchange/notes.parquet")
    behaviors: Path = Path("data/stackexchange/behaviors.parquet")
    work_dir: Path = Path("work")
    on_row_error: Literal["fail", "skip"] = "fail"
    max_title_chars: int = Field(1_000, gt=0)
    max_content_chars: int = Field(200_000, gt=0)
    max_hashtags: int = Field(100, gt=0)
    max_hashtag_chars: int = Field(100, gt=0)
    max_id_chars: int = Field(256, gt=0)
    stackexchange: StackExchangeConfig = Field(default_factory=StackExchangeConfig)


class MiningConfig(_Section):
    """Co-occurrence pair mining (method.md section 1)."""

    window_days: float = Field(7.0, gt=0, description="co-engagement window")
    u: float = Field(30.0, gt=0, description="drop candidates scoring above u")
    l: float = Field(0.01, ge=0, description="drop candidates scoring below l")  # noqa: E741
    t: int = Field(10, gt=0, description="keep the top t related notes per note")
    max_notes_per_user: int = Field(30, gt=1, description="cap on N_i (heavy users)")
    heavy_user_policy: Literal["skip", "sample"] = "skip"
    seed: int = 0

    @model_validator(mode="after")
    def _thresholds(self) -> MiningConfig:
        if self.l > self.u:
            raise ValueError(f"mining.l ({self.l}) must not exceed mining.u ({self.u})")
        return self


class SplitConfig(_Section):
    """Time split: the last ``test_fraction`` of each category's time range is the test period.

    ``cutoff`` (ISO-8601, UTC) replaces the per-category cutoffs with one global instant.
    """

    test_fraction: float = Field(0.25, gt=0, lt=1)
    cutoff: str | None = None


class PromptConfig(_Section):
    """Note Compression Prompt settings (method.md section 2)."""

    title_max_tokens: int = Field(20, gt=0)
    content_max_tokens: int = Field(80, gt=0)
    hashtag_task_ratio: float = Field(0.4, ge=0, le=1, description="r")
    max_hashtags_sampled: int = Field(3, gt=0)
    emb_token: str = "[EMB]"
    seed: int = 0
    batch_size: int = Field(256, gt=0, description="notes per tokenizer batch (Ray Data)")
    rows_per_file: int = Field(50_000, gt=0, description="minimum rows per output Parquet shard")


class ModelConfig(_Section):
    """Base LLM: a registered name (``smollm2-135m``, ``tiny-llama``) or a local HF folder."""

    name: str = "smollm2-135m"
    emb_dim: int = Field(128, gt=0, description="d of the projection head")
    tau_init: float = Field(3.0, description="learnable temperature; scale = exp(tau)")


class LoraConfig(_Section):
    enabled: bool = True
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainingConfig(_Section):
    """GCL + CSFT training (method.md sections 3-4)."""

    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    pairs_per_batch: int = Field(8, gt=0, description="global B (pairs); 2B notes per step")
    max_steps: int = Field(100, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    alpha: float = Field(0.01, ge=0, description="weight of L_gen")
    batching: Literal["random", "same_category"] = Field(
        "random", description="random: in-batch negatives from any category (paper); same_category: "
        "each global batch from one category, so negatives are same-category notes (harder)")
    bf16: bool = Field(True, description="bf16 autocast; with LoRA the frozen base weights are also "
                       "stored in bf16 (notellm.modeling.base_weights_dtype)")
    checkpoint_every: int = Field(50, gt=0)
    num_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(1, gt=0)
    storage_path: Path = Path("work/ray_results")
    run_name: str = "notellm-train"
    seed: int = 0

    @model_validator(mode="after")
    def _divisible(self) -> TrainingConfig:
        if self.pairs_per_batch % self.num_workers:
            raise ValueError(
                f"training.pairs_per_batch ({self.pairs_per_batch}) must be divisible by "
                f"training.num_workers ({self.num_workers})"
            )
        return self


class EmbeddingConfig(_Section):
    """Batch embedding (``pipelines.embed``): which encoder, which notes, the actor pool."""

    method: Literal["notellm", "llm-mean", "llm-last", "prompteol", "minilm", "minilm-ft"] = "notellm"
    notes: Literal["all", "test_pool"] = "all"
    checkpoint: Path | None = Field(
        None, description="notellm: training checkpoint folder (default: newest of training.run_name); "
        "minilm-ft: the fine-tuned folder")
    batch_size: int = Field(32, gt=0, description="notes per forward pass")
    window_batches: int = Field(8, gt=0, description="forward batches per actor call, sorted by length")
    num_actors: int = Field(1, gt=0)
    cpus_per_actor: int = Field(1, gt=0, description="CPUs (and torch threads) per actor")
    use_gpu: bool = False
    bf16: bool = Field(False, description="LLM weights in bf16 and the forward under bf16 autocast "
                       "(faster on CPUs with bf16 matmuls; vectors then differ from fp32 by ~1e-2)")
    rows_per_file: int = Field(100_000, gt=0, description="rows per output Parquet file")


class IndexConfig(_Section):
    """faiss index of ``pipelines.build_index`` (``notellm.index``)."""

    mode: Literal["update", "rebuild"] = Field(
        "update", description="update: build when there is no index, else add the notes it lacks; "
        "rebuild: re-choose, re-train and re-tune from all embeddings")
    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_max_notes: int = Field(100_000, gt=0, description="auto: exact search up to this N")
    target_recall_at_100: float = Field(0.95, gt=0, le=1)


EvalMethod = Literal["notellm", "notellm-wo-csft", "llm-mean", "llm-last", "prompteol", "minilm",
                     "minilm-ft", "bm25", "random"]


class EvaluationConfig(_Section):
    """The comparison of ``pipelines.evaluate`` (method.md section 5)."""

    methods: list[EvalMethod] = Field(
        default_factory=lambda: ["notellm", "notellm-wo-csft", "llm-mean", "prompteol", "minilm", "minilm-ft",
                                 "bm25", "random"])
    ablation_suffix: str = Field("-wo-csft", description="run name of the w/o-CSFT ablation = "
                                 "training.run_name + this (trained with training.alpha=0)")
    ks: list[int] = Field(default_factory=lambda: [1, 10, 100])
    pool_fractions: list[float] = Field(
        default_factory=lambda: [100 / 257_937, 1_000 / 257_937, 10_000 / 257_937, 100_000 / 257_937]
    )
    max_generation_notes: int = Field(200, ge=0, description="pool notes for category/hashtag generation")
    generation_methods: list[Literal["notellm", "notellm-wo-csft"]] = Field(
        default_factory=lambda: ["notellm"], description="models whose generation is measured (the "
        "w/o-CSFT ablation never trains generation: add it to show that it cannot generate)")
    generation_batch_size: int = Field(16, gt=0)
    category_max_new_tokens: int = Field(8, gt=0)
    hashtag_max_new_tokens: int = Field(24, gt=0)
    minilm_ft_batch_size: int = Field(32, gt=1)
    minilm_ft_steps: int | None = Field(
        None, gt=0, description="default: as many pairs as NoteLLM training sees (max_steps x pairs_per_batch)")
    minilm_ft_lr: float = Field(2e-5, gt=0)
    minilm_ft_max_seq_length: int = Field(128, gt=0)


class RegistryConfig(_Section):
    model_name: str = "notellm"
    champion_alias: str = "champion"


class ServingConfig(_Section):
    num_replicas: int = Field(1, gt=0)
    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, gt=0)
    max_queued_requests: int = Field(64, gt=0)
    torch_threads: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServingConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("serving.max_ongoing_requests must be >= serving.max_batch_size")
        return self


class ServicesConfig(_Section):
    """Local Ray head + MLflow tracking server (``notellm services start``)."""

    state_dir: Path = Path(".services")
    host: str = "127.0.0.1"
    ray_port: int = 6380
    dashboard_port: int = 8265
    mlflow_port: int = 5001
    num_cpus: int | None = Field(None, gt=0, description="CPUs the Ray head offers (default: all)")


class PipelineConfig(_Section):
    """The whole pipeline's configuration; one YAML file maps onto it section by section."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)

    def resolve_path(self, path: Path) -> Path:
        """An absolute path for ``path``: relative paths are taken from the repository root."""
        return path if path.is_absolute() else (REPO_ROOT / path).resolve()

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"training.lr": 2e-4, ...}``: the resolved config as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. training.lr=1e-4")
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {override!r}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises ``ConfigError`` naming the file and every offending key.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for override in overrides or []:
        _apply_override(tree, override)
    if overrides:
        source += f" with overrides {overrides}"
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_config(cfg: PipelineConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from notellm.io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
