"""The command line every pipeline stage shares: ``python -m pipelines.<verb> --config FILE [key=value ...]``.

A stage supplies two functions: ``run(cfg, config_path) -> result`` does the work and prints its
summary; ``log(cfg, result) -> run_id`` logs the result to MLflow, called only when
``MLFLOW_TRACKING_URI`` is set (as ``scripts/run_demo.sh`` and ``ray job submit
--runtime-env-json`` set it); a stage that logs while it runs (training) passes ``log=None``. Expected input problems (``ConfigError`` plus the stage's own error
types) print ``error: <message>`` and exit 2; anything else is a bug and raises.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from notellm.config import ConfigError, PipelineConfig, load_config

EXIT_OK, EXIT_BAD_INPUT = 0, 2
Result = TypeVar("Result")


def run_stage(
    module: str,
    doc: str | None,
    run: Callable[[PipelineConfig, str], Result],
    log: Callable[[PipelineConfig, Result], str] | None,
    errors: tuple[type[Exception], ...],
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv``, load the config, run the stage, log to MLflow; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="pipeline YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg, str(args.config))
    except (ConfigError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if log is not None and os.environ.get("MLFLOW_TRACKING_URI"):
        run_id = log(cfg, result)
        print(f"MLflow run {run_id} at {os.environ['MLFLOW_TRACKING_URI']}")
    return EXIT_OK


def ray_init() -> None:
    """Connect to ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local Ray; idempotent."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
