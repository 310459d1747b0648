"""The one config schema: every checked-in config loads; overrides and unknown keys behave."""

from pathlib import Path

import pytest

from notellm.config import REPO_ROOT, ConfigError, PipelineConfig, load_config

CONFIG_FILES = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_folder_has_the_three_documented_files():
    names = {p.name for p in CONFIG_FILES}
    assert {"demo.yaml", "tiny.yaml", "paper-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_names_its_launch_command(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    header = path.read_text().splitlines()[:12]
    assert any("ray job submit" in line or "make " in line or "pytest" in line for line in header), (
        f"{path.name}: the header comment must show how to launch it"
    )


def test_paper_config_carries_the_papers_hyperparameters():
    cfg = load_config(REPO_ROOT / "configs/paper-7b.yaml")
    assert cfg.training.pairs_per_batch == 64 and cfg.training.num_workers == 8
    assert cfg.model.emb_dim == 128 and cfg.model.tau_init == 3.0
    assert cfg.training.alpha == 0.01 and cfg.prompts.hashtag_task_ratio == 0.4
    assert (cfg.mining.u, cfg.mining.l, cfg.mining.t) == (30, 0.01, 10)
    assert (cfg.prompts.title_max_tokens, cfg.prompts.content_max_tokens) == (20, 80)


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO_ROOT / "configs/demo.yaml", ["training.lr=1e-4", "mining.t=5", "lora.enabled=false"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.mining.t == 5
    assert cfg.lora.enabled is False


def test_unknown_key_in_file_is_rejected_with_its_dotted_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training\.learning_rate'") as exc:
        load_config(bad)
    assert str(bad) in str(exc.value)


def test_unknown_key_in_override_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown key 'minig'"):
        load_config(None, ["minig.t=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"training\.max_steps.*'many'"):
        load_config(None, ["training.max_steps=many"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["training.pairs_per_batch=5", "training.num_workers=2"])
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        load_config(None, ["serving.max_batch_size=64", "serving.max_ongoing_requests=8"])
    with pytest.raises(ConfigError, match="must not exceed"):
        load_config(None, ["mining.l=40"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(notmap)


def test_relative_paths_resolve_against_repo_root():
    cfg = load_config(REPO_ROOT / "configs/demo.yaml")
    assert cfg.resolve_path(cfg.data.notes) == REPO_ROOT / "data/stackexchange/notes.parquet"
    flat = cfg.to_flat_dict()
    assert flat["training.pairs_per_batch"] == 16 and flat["model.name"] == "smollm2-135m"
