"""Shared fixtures.

``services`` starts one real Ray head and one real MLflow server for the whole test session (on
free ports, in a temporary state folder) the first time a test asks for it, points
``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS``/``MLFLOW_TRACKING_URI`` at them, and stops them at
the end. Tests that do not request it start nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from notellm.services import ServiceInfo

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceInfo]:
    """A running Ray head + MLflow server for this test session; yields their ``ServiceInfo``."""
    from notellm.services import free_port, service_env, start_services, stop_services

    state_dir = tmp_path_factory.mktemp("services")
    # Ray's own temp dir is /tmp/notellm-ray-<hash of state_dir>: short whatever state_dir is.
    info = start_services(state_dir, ray_port=free_port(), dashboard_port=free_port(),
                          mlflow_port=free_port())
    env = service_env(info)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield info
    finally:
        import ray

        # A driver still connected when its GCS goes away is ended by Ray (os._exit): pytest would
        # die before reporting. Pipelines called in-process connect with ray_init() and stay so.
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_services(state_dir)
        shutil.rmtree(info.ray_temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def submit_stage(services: ServiceInfo):
    """``submit_stage("pipelines.ingest", work_dir)``: run a stage with `ray job submit` on the
    session's cluster (demo config, ``data.work_dir`` overridden), logging to its MLflow server.

    Returns the ``CompletedProcess``; the caller asserts on its return code and output.
    """
    venv_bin = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ['PATH']}")
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": services.mlflow_url}})

    def submit(module: str, work_dir: Path, *overrides: str, config: str = "configs/demo.yaml"):
        return subprocess.run(
            [f"{venv_bin}/ray", "job", "submit", "--address", services.dashboard_url, "--working-dir", ".",
             "--runtime-env-json", runtime_env, "--",
             "python", "-m", module, "--config", config, f"data.work_dir={work_dir}", *overrides],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
        )

    return submit
