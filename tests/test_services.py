"""Real local services: a Ray head and an MLflow server are started, used, broken and stopped.

Two state folders run side by side: the session-wide ``services`` fixture (never disturbed) and
this module's own stack ``own``, which the tests kill and stop. Tests on ``own`` run in file
order; each still works alone because the fixture (re)starts whatever is down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from notellm.services import (
    ServiceError,
    ServiceInfo,
    ensure_services,
    free_port,
    port_is_free,
    services_status,
    start_services,
    stop_services,
)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceInfo]:
    """A second, private Ray head + MLflow server that these tests may kill and stop."""
    state_dir = tmp_path_factory.mktemp("own-services")
    info = start_services(state_dir, ray_port=free_port(), dashboard_port=free_port(),
                          mlflow_port=free_port(), num_cpus=1)
    yield info
    stop_services(state_dir)
    shutil.rmtree(info.ray_temp_dir, ignore_errors=True)


def _cli(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m notellm.cli ARGS`` as a user would (package importable from platform/)."""
    env = dict(os.environ)
    paths = [str(repo_root / "platform"), str(repo_root)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "-m", "notellm.cli", *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=300)


def _session_members(sid: int) -> list[int]:
    """Pids of live (non-zombie) processes in session ``sid``."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return pids


def _heads_using(temp_dir: Path) -> list[int]:
    """Pids of gcs_server processes whose logs go to ``temp_dir`` (one per running Ray head)."""
    pids = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "gcs_server" and any(
                    f"{temp_dir}/" in arg for arg in proc.info["cmdline"] or []):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _ports(info: ServiceInfo) -> tuple[int, int, int]:
    """(GCS, dashboard, MLflow) ports of ``info``."""
    return tuple(int(u.rsplit(":", 1)[1]) for u in (info.ray_address, info.dashboard_url, info.mlflow_url))


def _state(info: ServiceInfo) -> dict:
    return json.loads((info.state_dir / "services.json").read_text())


# --------------------------------------------------------------------------- the session stack


def test_session_services_are_healthy_and_exported(services: ServiceInfo) -> None:
    status = services_status(services.state_dir)
    assert status["ray"]["healthy"], status["ray"]["detail"]
    assert status["mlflow"]["healthy"], status["mlflow"]["detail"]
    assert status["ray"]["pid"] == services.ray_pid
    assert status["mlflow"]["pid"] == services.mlflow_pid
    assert os.environ["RAY_ADDRESS"] == services.ray_address
    assert os.environ["MLFLOW_TRACKING_URI"] == services.mlflow_url
    assert os.environ["RAY_API_SERVER_ADDRESS"] == services.dashboard_url
    assert len(str(services.ray_temp_dir)) < 40  # unix socket paths under it stay short
    assert (services.log_dir / "mlflow.log").is_file()
    assert (services.log_dir / "ray-start.log").is_file()
    assert (services.log_dir / "ray").resolve().is_dir()  # Ray's own session logs


def test_ray_task_runs_on_our_head(services: ServiceInfo) -> None:
    import ray

    ray_session = _state(services)["ray"]["session_id"]
    ray.init(address=services.ray_address, log_to_driver=False)
    try:
        def square_in_worker(x: int) -> tuple[int, int, int]:
            return x * x, os.getpid(), os.getsid(0)

        remote = ray.remote(num_cpus=1)(square_in_worker)
        results = ray.get([remote.remote(i) for i in range(4)], timeout=120)
    finally:
        ray.shutdown()
    assert [r[0] for r in results] == [0, 1, 4, 9]
    assert all(pid != os.getpid() for _, pid, _ in results)
    # The workers belong to this state folder's head, not to some other cluster on the machine.
    assert {sid for _, _, sid in results} == {ray_session}


def test_ray_job_submit_reaches_our_head(services: ServiceInfo) -> None:
    # `ray job submit` finds the dashboard through RAY_API_SERVER_ADDRESS (set by the fixture);
    # the job runs on the head's dashboard agent, which needs this head's own agent port.
    ray_exe = Path(sys.executable).parent / "ray"
    # The job supervisor hands the driver its cluster's GCS address in RAY_ADDRESS.
    entrypoint = [sys.executable, "-c", "import os; print('job-gcs', os.environ['RAY_ADDRESS'])"]
    result = subprocess.run([str(ray_exe), "job", "submit", "--", *entrypoint],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("job-gcs"))
    assert int(line.split()[1].rsplit(":", 1)[1]) == _ports(services)[0]


def test_mlflow_run_is_logged_through_the_server(services: ServiceInfo, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    assert mlflow.get_tracking_uri() == services.mlflow_url  # picked up from the environment
    client = MlflowClient()
    experiment_id = client.create_experiment(f"test-services-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "recall_at_10", 0.25, step=3)
    report = tmp_path / "report.txt"
    report.write_text("recall@10 = 0.25\n")
    client.log_artifact(run_id, str(report), artifact_path="reports")
    client.set_terminated(run_id)

    run = MlflowClient(services.mlflow_url).get_run(run_id)
    assert run.data.metrics == {"recall_at_10": 0.25}
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]
    downloaded = client.download_artifacts(run_id, "reports/report.txt", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == "recall@10 = 0.25\n"
    stored = list((services.state_dir / "mlflow" / "artifacts").rglob("report.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "recall@10 = 0.25\n"


# --------------------------------------------------------------------------- a private stack


def test_two_state_dirs_run_side_by_side(services: ServiceInfo, own: ServiceInfo) -> None:
    assert services_status(own.state_dir)["ray"]["healthy"]
    assert services_status(services.state_dir)["ray"]["healthy"]
    assert own.ray_temp_dir != services.ray_temp_dir
    assert own.ray_address != services.ray_address
    assert _heads_using(own.ray_temp_dir) == [own.ray_pid]
    assert _heads_using(services.ray_temp_dir) == [services.ray_pid]


def test_start_is_idempotent(own: ServiceInfo, repo_root: Path) -> None:
    again = start_services(own.state_dir)
    assert again == own  # same ports, same processes
    assert _heads_using(own.ray_temp_dir) == [own.ray_pid]  # still exactly one head

    ray_port, dashboard_port, mlflow_port = _ports(own)
    result = _cli(repo_root, "services", "start", "--state-dir", str(own.state_dir),
                  "--set", f"services.ray_port={ray_port}",
                  "--set", f"services.dashboard_port={dashboard_port}",
                  "--set", f"services.mlflow_port={mlflow_port}")
    assert result.returncode == 0, result.stderr
    assert own.mlflow_url in result.stdout and own.dashboard_url in result.stdout
    assert f"export RAY_ADDRESS={own.ray_address}" in result.stdout
    assert start_services(own.state_dir) == own
    assert _heads_using(own.ray_temp_dir) == [own.ray_pid]

    with pytest.raises(ServiceError, match="already runs"):
        start_services(own.state_dir, mlflow_port=free_port())


def test_killed_mlflow_is_reported_and_only_it_restarts(own: ServiceInfo, repo_root: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(own.mlflow_url)
    experiment_id = client.create_experiment(f"persist-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "loss", 1.5)

    status = services_status(own.state_dir)
    assert status["mlflow"]["healthy"]
    old_pid = status["mlflow"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(old_pid)], timeout=10)

    status = services_status(own.state_dir)
    assert not status["mlflow"]["running"] and not status["mlflow"]["healthy"]
    assert status["ray"]["healthy"]
    assert _cli(repo_root, "services", "status", "--state-dir", str(own.state_dir)).returncode == 1

    restarted = ensure_services(own.state_dir)
    assert restarted.mlflow_pid != old_pid
    assert restarted.ray_pid == own.ray_pid  # Ray was healthy: left alone
    assert _session_members(old_pid) == []  # the orphaned uvicorn worker was stopped too
    assert services_status(own.state_dir)["mlflow"]["healthy"]
    result = _cli(repo_root, "services", "status", "--state-dir", str(own.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    # The run written before the crash is still there (SQLite store on disk).
    assert MlflowClient(restarted.mlflow_url).get_run(run_id).data.metrics == {"loss": 1.5}


def test_dead_ray_head_is_reported_and_only_it_restarts(own: ServiceInfo) -> None:
    before = ensure_services(own.state_dir)
    ray_session = _state(before)["ray"]["session_id"]
    os.kill(before.ray_pid, signal.SIGKILL)  # the GCS: the head is gone
    psutil.wait_procs([psutil.Process(before.ray_pid)], timeout=10)

    status = services_status(own.state_dir)
    assert not status["ray"]["healthy"]
    assert status["mlflow"]["healthy"]

    after = ensure_services(own.state_dir)
    assert after.ray_pid != before.ray_pid
    assert after.mlflow_pid == before.mlflow_pid
    assert after.ray_address == before.ray_address
    assert _session_members(ray_session) == []  # raylet, dashboard, agents of the old head
    assert services_status(own.state_dir)["ray"]["healthy"]


def test_stop_frees_ports_and_spares_other_clusters(own: ServiceInfo, services: ServiceInfo,
                                                    repo_root: Path) -> None:
    info = ensure_services(own.state_dir)
    ports = list(_ports(info))
    assert not any(port_is_free(p) for p in ports)

    released = stop_services(own.state_dir)
    assert released == {"ray": ports[:2], "mlflow": ports[2:]}
    assert all(port_is_free(p) for p in ports)
    assert _heads_using(own.ray_temp_dir) == []
    status = services_status(own.state_dir)
    assert not status["ray"]["running"] and not status["mlflow"]["running"]
    assert _cli(repo_root, "services", "status", "--state-dir", str(own.state_dir)).returncode == 1
    assert stop_services(own.state_dir) == {"ray": [], "mlflow": []}  # idempotent

    # The session's services, on the same machine, were not touched.
    other = services_status(services.state_dir)
    assert other["ray"]["healthy"] and other["mlflow"]["healthy"]
    assert other["ray"]["pid"] == services.ray_pid
