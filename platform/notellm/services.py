"""Local services: one Ray head node and one MLflow tracking server per state folder.

``start_services(state_dir)`` starts (or finds already running) a Ray head and an MLflow server
and records their ports and processes in ``<state_dir>/services.json``. Everything a service
writes stays under ``state_dir``::

    <state_dir>/services.json          ports, process ids, Ray temp dir (written atomically)
    <state_dir>/logs/ray-start.log     output of ``ray start``
    <state_dir>/logs/ray -> <ray temp dir>/session_latest/logs   Ray's own session logs
    <state_dir>/logs/mlflow.log        MLflow server output
    <state_dir>/mlflow/mlflow.db       SQLite tracking + registry store
    <state_dir>/mlflow/artifacts/      artifacts, uploaded by clients *through* the server

Several state folders can run side by side on one machine (tests, other users): each head gets
its own ports and its own short Ray temp dir (``/tmp/notellm-ray-<hash of state_dir>``, short
because Ray's unix sockets live there and socket paths are limited to ~107 characters).

Processes are stopped by the session id they were started in, never with ``ray stop``: ``ray
stop`` kills every Ray process on the machine, including other state folders' clusters.
Both services are started with ``start_new_session=True``, so the ``ray start`` (or ``mlflow
server``) process id is the session id shared by everything it spawns (gcs_server, raylet,
dashboard, agents, task workers; uvicorn). Ray job drivers get sessions of their own, but Ray
kills them when their job supervisor (a worker of our session) exits.

Health: MLflow is healthy when its recorded process is alive and ``GET /health`` answers ``OK``.
Ray is healthy when its recorded gcs_server and a raylet of its session are alive, the GCS port
accepts connections and the dashboard's ``/api/version`` reports the recorded Ray session.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from notellm.config import ServicesConfig
from notellm.io_utils import atomic_write_text

STATE_FILE = "services.json"
LOCK_FILE = ".services.lock"
RAY_TEMP_PREFIX = "/tmp/notellm-ray-"
START_TIMEOUT_S = 180.0  # a 2-core machine busy with other work can take a while
STOP_GRACE_S = 5.0  # per shutdown phase, before SIGKILL
BROKEN_GRACE_S = 1.0  # leftovers of a dead/unhealthy service do not shut down gracefully
HTTP_TIMEOUT_S = 3.0
POLL_S = 0.25
# The local head runs without Ray token auth: its dashboard and MLflow listen on 127.0.0.1 only,
# but Ray binds its GCS port on the node's IP, so use this on a single-user machine only. Shared
# clusters (cluster.yaml) should run with RAY_AUTH_MODE=token (see the README).
RAY_AUTH_MODE = "disabled"

# `mlflow server` processes started by this Python process: kept so they are reaped (no
# zombies, no "subprocess still running" warnings) when they exit.
_CHILDREN: list[subprocess.Popen] = []


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message names the service, port and log."""


@dataclass
class ServiceInfo:
    """Where the services of one state folder answer, and the processes that serve them."""

    ray_address: str  # "127.0.0.1:<gcs port>", for ray.init(address=...) and RAY_ADDRESS
    dashboard_url: str  # "http://127.0.0.1:<port>", also the `ray job submit --address`
    mlflow_url: str  # "http://127.0.0.1:<port>", the MLFLOW_TRACKING_URI
    state_dir: Path
    log_dir: Path
    ray_temp_dir: Path  # Ray's session logs: <ray_temp_dir>/session_latest/logs
    ray_pid: int | None  # the gcs_server process
    mlflow_pid: int | None  # the `mlflow server` process (uvicorn runs as its child)


# --------------------------------------------------------------------------- small helpers


def free_port() -> int:
    """A TCP port that is free on all interfaces right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on any interface (a listener makes bind fail)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _port_answers(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=HTTP_TIMEOUT_S):
            return True
    except OSError:
        return False


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str) -> tuple[int, str] | None:
    """``(status, body)`` of a GET (never through a proxy), or None when nothing answers."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return None


def ray_temp_dir_for(state_dir: Path) -> Path:
    """The short Ray temp dir owned by ``state_dir``: ``/tmp/notellm-ray-<10 hex digits>``."""
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return Path(RAY_TEMP_PREFIX + digest)


def _venv_executable(name: str) -> Path:
    """The ``name`` console script next to the running Python (the venv's ``bin``)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise ServiceError(f"{name} executable not found at {path}; is the venv complete?")
    return path


def _log_tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir`` so concurrent start/stop calls do not race."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(state_dir: Path) -> dict[str, Any]:
    """The recorded ``services.json`` (``{}`` when absent)."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ServiceError(f"{path} is not valid JSON ({exc}); delete it and stop stray services") from exc
    if not isinstance(state, dict):
        raise ServiceError(f"{path}: top level must be an object")
    return state


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(state_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- processes


def _proc_alive(pid: int | None, create_time: float | None) -> bool:
    """True when ``pid`` runs and is the same process that was recorded (not a reused id)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def _session_procs(sid: int) -> list[psutil.Process]:
    """Every live process whose session id is ``sid`` (the services' own process tree)."""
    _CHILDREN[:] = [c for c in _CHILDREN if c.poll() is None]
    procs = []
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                procs.append(proc)
        except (OSError, psutil.Error):
            continue
    return procs


def _headless_ray_sessions(temp_dir: Path) -> set[int]:
    """Sessions of Ray heads that use ``temp_dir`` but are not in ``services.json``.

    Only sessions started by our own ``ray start`` qualify: a gcs_server or raylet whose
    command line names ``temp_dir`` and whose session leader has exited. (An interactive
    shell's session, whose leader is alive, is never returned.)
    """
    needle = f"{temp_dir}/"
    sids: set[int] = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] not in ("gcs_server", "raylet"):
                continue
            if not any(needle in arg for arg in proc.info["cmdline"] or []):
                continue
            sid = os.getsid(proc.pid)
        except (OSError, psutil.Error):
            continue
        if not psutil.pid_exists(sid):
            sids.add(sid)
    return sids


def _terminate(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM ``procs``, wait up to ``grace_s``, then SIGKILL whatever is left."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _stop_session(sid: int, ordered_names: tuple[str, ...] = (), grace_s: float = STOP_GRACE_S) -> int:
    """Stop every process of session ``sid``; returns how many processes were found running.

    Processes named in ``ordered_names[:-1]`` go first and the one named ``ordered_names[-1]``
    goes last (Ray: raylet first, gcs_server last, as ``ray stop`` does); processes spawned
    meanwhile are caught by a final sweep.
    """
    found = 0
    for _ in range(3):
        procs = _session_procs(sid)
        if not procs:
            return found
        found += len(procs)
        if ordered_names:
            first = [p for p in procs if _name(p) in ordered_names[:-1]]
            last = [p for p in procs if _name(p) == ordered_names[-1]]
            middle = [p for p in procs if p not in first and p not in last]
            phases = [first, middle, last]
        else:
            phases = [procs]
        for phase in phases:
            if phase:
                _terminate(phase, grace_s)
    left = _session_procs(sid)
    if left:
        raise ServiceError(f"could not stop processes {[p.pid for p in left]} of session {sid}")
    return found


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _wait_port_free(port: int, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_is_free(port):
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} port {port} is still in use {timeout_s:.0f}s after stopping")
        time.sleep(POLL_S)


def _require_free(port: int, what: str, hint: str) -> None:
    if not port_is_free(port):
        raise ServiceError(
            f"cannot start {what}: port {port} is already in use by another process ({hint})"
        )


# --------------------------------------------------------------------------- health


def _ray_health(host: str, ray: dict[str, Any]) -> dict[str, Any]:
    """Status of the recorded Ray head: running, healthy, address, dashboard_url, pid, detail."""
    address = f"{host}:{ray['port']}"
    dashboard_url = f"http://{host}:{ray['dashboard_port']}"
    out = {"running": False, "healthy": False, "address": address,
           "dashboard_url": dashboard_url, "pid": ray.get("gcs_pid"), "detail": ""}
    if not _proc_alive(ray.get("gcs_pid"), ray.get("gcs_create_time")):
        out["detail"] = f"gcs_server (pid {ray.get('gcs_pid')}) is not running"
        return out
    out["running"] = True
    if not any(_name(p) == "raylet" for p in _session_procs(ray["session_id"])):
        out["detail"] = "no raylet is running in the head's session"
        return out
    if not _port_answers(host, ray["port"]):
        out["detail"] = f"GCS port {address} does not answer"
        return out
    answer = _http_get(f"{dashboard_url}/api/version")
    if answer is None or answer[0] != 200:
        out["detail"] = f"dashboard {dashboard_url}/api/version does not answer"
        return out
    try:
        session_name = json.loads(answer[1]).get("session_name")
    except json.JSONDecodeError:
        session_name = None
    if session_name != ray.get("session_name"):
        out["detail"] = (f"dashboard {dashboard_url} serves Ray session {session_name!r}, "
                         f"not ours ({ray.get('session_name')!r})")
        return out
    out["healthy"] = True
    return out


def _mlflow_health(host: str, mlflow: dict[str, Any]) -> dict[str, Any]:
    """Status of the recorded MLflow server: running, healthy, url, pid, detail."""
    url = f"http://{host}:{mlflow['port']}"
    out = {"running": False, "healthy": False, "url": url, "pid": mlflow.get("pid"), "detail": ""}
    if not _proc_alive(mlflow.get("pid"), mlflow.get("create_time")):
        out["detail"] = f"mlflow server (pid {mlflow.get('pid')}) is not running"
        return out
    out["running"] = True
    answer = _http_get(f"{url}/health")
    if answer is None or answer[0] != 200 or answer[1].strip() != "OK":
        out["detail"] = f"{url}/health does not answer OK"
        return out
    out["healthy"] = True
    return out


def services_status(state_dir: Path) -> dict[str, Any]:
    """Health of the services recorded in ``state_dir``.

    Returns ``{"state_dir": str, "ray": {...}, "mlflow": {...}}`` where each service reports
    ``running`` (its recorded process is alive), ``healthy`` (it also answers), ``pid``,
    ``detail`` (why it is not healthy) and ``address``/``dashboard_url`` (Ray) or ``url``
    (MLflow). A stopped or never started service reports running and healthy False.
    """
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    settings = state.get("settings", {})
    host = settings.get("host", "127.0.0.1")
    never = "not started" if not settings else "stopped"
    status: dict[str, Any] = {"state_dir": str(state_dir)}
    if "ray" in state:
        status["ray"] = _ray_health(host, state["ray"])
    else:
        status["ray"] = {"running": False, "healthy": False, "pid": None, "detail": never,
                         "address": f"{host}:{settings['ray_port']}" if settings else None,
                         "dashboard_url": f"http://{host}:{settings['dashboard_port']}" if settings else None}
    if "mlflow" in state:
        status["mlflow"] = _mlflow_health(host, state["mlflow"])
    else:
        status["mlflow"] = {"running": False, "healthy": False, "pid": None, "detail": never,
                            "url": f"http://{host}:{settings['mlflow_port']}" if settings else None}
    return status


# --------------------------------------------------------------------------- start / stop


def _wait_healthy(check, what: str, log: Path, sid: int) -> dict[str, Any]:
    """Poll ``check()`` until healthy; raise naming the log when the session dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        health = check()
        if health["healthy"]:
            return health
        if not _session_procs(sid):
            raise ServiceError(f"{what} exited during start-up ({health['detail']}); see {log}:\n"
                               + _log_tail(log))
        if time.monotonic() > deadline:
            _stop_session(sid)
            raise ServiceError(f"{what} not healthy after {START_TIMEOUT_S:.0f}s "
                               f"({health['detail']}); see {log}:\n" + _log_tail(log))
        time.sleep(POLL_S)


def _start_ray(state_dir: Path, host: str, port: int, dashboard_port: int,
               num_cpus: int | None) -> dict[str, Any]:
    """Run ``ray start --head`` in a new session and wait until the head is healthy."""
    for p, what in ((port, "Ray GCS"), (dashboard_port, "Ray dashboard")):
        _require_free(p, what, "set services.ray_port / services.dashboard_port")
    temp_dir = ray_temp_dir_for(state_dir)
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "ray-start.log"
    # Both default to fixed ports (10001, 52365) that a second head on this machine would
    # collide with, so each head gets its own.
    client_port, agent_port = free_port(), free_port()
    cmd = [str(_venv_executable("ray")), "start", "--head",
           "--node-ip-address", host, "--port", str(port),
           "--dashboard-host", host, "--dashboard-port", str(dashboard_port),
           "--include-dashboard", "true",
           "--ray-client-server-port", str(client_port),
           "--dashboard-agent-listen-port", str(agent_port),
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Job entrypoints (`ray job submit -- python -m pipelines.x`) inherit the raylet's PATH:
    # put this interpreter's bin dir first so `python` is the project's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    # Ray 2.60 turns token auth on by itself once ~/.ray/auth_token exists (any local
    # `ray.init()` writes one), so a restart could come up in another mode than the first start.
    # The local dev cluster states its mode explicitly; clients get the same via service_env().
    env["RAY_AUTH_MODE"] = RAY_AUTH_MODE
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=state_dir, env=env, start_new_session=True)
    sid = proc.pid
    try:
        rc = proc.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop_session(sid, ("raylet", "gcs_server"))
        raise ServiceError(f"`ray start` did not finish in {START_TIMEOUT_S:.0f}s; see {log}:\n"
                           + _log_tail(log)) from None
    if rc != 0:
        _stop_session(sid, ("raylet", "gcs_server"))
        raise ServiceError(f"`ray start` failed with exit code {rc}; see {log}:\n" + _log_tail(log))
    gcs = [p for p in _session_procs(sid) if _name(p) == "gcs_server"]
    if len(gcs) != 1:
        _stop_session(sid, ("raylet", "gcs_server"))
        raise ServiceError(f"expected one gcs_server after `ray start`, found {len(gcs)}; see {log}")
    session_latest = temp_dir / "session_latest"
    ray = {"port": port, "dashboard_port": dashboard_port, "client_server_port": client_port,
           "dashboard_agent_port": agent_port, "num_cpus": num_cpus, "temp_dir": str(temp_dir),
           "session_id": sid, "session_name": session_latest.resolve().name,
           "gcs_pid": gcs[0].pid, "gcs_create_time": gcs[0].create_time()}
    _wait_healthy(lambda: _ray_health(host, ray), "Ray head", log, sid)
    link = log_dir / "ray"
    tmp_link = log_dir / ".ray.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(session_latest / "logs")
    os.replace(tmp_link, link)
    return ray


def _launch_mlflow(state_dir: Path, host: str, port: int) -> dict[str, Any]:
    """Launch ``mlflow server`` (SQLite store, proxied artifacts) in a new session.

    Returns its record for ``services.json``; ``_wait_healthy`` then waits until it answers.
    """
    _require_free(port, "MLflow", "set services.mlflow_port")
    store = state_dir / "mlflow"
    artifacts = store / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "mlflow.log"
    backend = _mlflow_backend_uri(state_dir)
    # --serve-artifacts + --artifacts-destination: new experiments get the artifact root
    # mlflow-artifacts:/, so clients upload through this server (no shared filesystem needed).
    cmd = [str(_venv_executable("mlflow")), "server", "--host", host, "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend,
           "--serve-artifacts", "--artifacts-destination", str(artifacts)]
    # Server-side MLflow jobs (GenAI evaluation) are unused here; disabling them avoids a
    # job-runner process per server.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=state_dir, env=env, start_new_session=True)
    _CHILDREN.append(proc)
    mlflow = {"port": port, "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
              "session_id": proc.pid, "backend_store_uri": backend, "artifacts_destination": str(artifacts),
              "log": str(log)}
    return mlflow


def _stop_ray(state: dict[str, Any], state_dir: Path, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the recorded Ray head (and headless leftovers using its temp dir); wait for its ports."""
    ray = state.get("ray")
    sids = _headless_ray_sessions(ray_temp_dir_for(state_dir))
    if ray:
        sids.add(ray["session_id"])
    found = sum(_stop_session(sid, ("raylet", "gcs_server"), grace_s) for sid in sids)
    if ray and found:
        _wait_port_free(ray["port"], "Ray GCS")
        _wait_port_free(ray["dashboard_port"], "Ray dashboard")


def _mlflow_backend_uri(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'mlflow' / 'mlflow.db'}"


def _headless_mlflow_sessions(state_dir: Path) -> set[int]:
    """Sessions of ``mlflow server`` processes serving this state folder's store.

    Only session leaders qualify (``start_new_session`` made ``mlflow server`` one), so a
    shell that merely mentions the path is never returned.
    """
    backend = _mlflow_backend_uri(state_dir)
    sids: set[int] = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "server" in cmdline and backend in cmdline and os.getsid(proc.pid) == proc.pid:
                sids.add(proc.pid)
        except (OSError, psutil.Error):
            continue
    return sids


def _stop_mlflow(state: dict[str, Any], state_dir: Path, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the recorded MLflow server (its whole session, uvicorn included) and any unrecorded
    server of this state folder's store; wait for the recorded port."""
    mlflow = state.get("mlflow")
    sids = _headless_mlflow_sessions(state_dir)
    if mlflow:
        sids.add(mlflow["session_id"])
    found = sum(_stop_session(sid, (), grace_s) for sid in sids)
    if mlflow and found:
        _wait_port_free(mlflow["port"], "MLflow")


def _info(state_dir: Path, state: dict[str, Any]) -> ServiceInfo:
    host = state["settings"]["host"]
    ray, mlflow = state["ray"], state["mlflow"]
    return ServiceInfo(
        ray_address=f"{host}:{ray['port']}",
        dashboard_url=f"http://{host}:{ray['dashboard_port']}",
        mlflow_url=f"http://{host}:{mlflow['port']}",
        state_dir=state_dir,
        log_dir=state_dir / "logs",
        ray_temp_dir=Path(ray["temp_dir"]),
        ray_pid=ray.get("gcs_pid"),
        mlflow_pid=mlflow.get("pid"),
    )


def start_services(state_dir: Path, host: str | None = None, ray_port: int | None = None,
                   dashboard_port: int | None = None, mlflow_port: int | None = None,
                   num_cpus: int | None = None) -> ServiceInfo:
    """Make sure the Ray head and the MLflow server of ``state_dir`` run and are healthy.

    Idempotent: a healthy service is left alone; an unhealthy or dead one is cleaned up (its
    remaining processes stopped, its ports freed) and started again, so only the broken service
    restarts. Settings not given (ports, ``num_cpus``) are those recorded in ``services.json``
    when the services ran before, else ``ServicesConfig``'s defaults (host, ports) and all CPUs. Asking
    for other settings than those of a healthy running service raises ``ServiceError``.

    Returns the ``ServiceInfo`` of the running services.
    """
    state_dir = Path(state_dir).resolve()
    defaults = ServicesConfig()
    with _locked(state_dir):
        state = _read_state(state_dir)
        old = state.get("settings", {})
        want = {
            "host": host or old.get("host") or defaults.host,
            "ray_port": ray_port or old.get("ray_port") or defaults.ray_port,
            "dashboard_port": dashboard_port or old.get("dashboard_port") or defaults.dashboard_port,
            "mlflow_port": mlflow_port or old.get("mlflow_port") or defaults.mlflow_port,
            "num_cpus": num_cpus if num_cpus is not None else old.get("num_cpus"),
        }
        old_host = old.get("host", want["host"])
        ray_keys = ("host", "ray_port", "dashboard_port", "num_cpus")
        mlflow_keys = ("host", "mlflow_port")
        ray_ok = "ray" in state and _ray_health(old_host, state["ray"])["healthy"]
        mlflow_ok = "mlflow" in state and _mlflow_health(old_host, state["mlflow"])["healthy"]
        for ok, name, keys in ((ray_ok, "Ray head", ray_keys), (mlflow_ok, "MLflow server", mlflow_keys)):
            if ok and any(want[k] != old.get(k) for k in keys):
                raise ServiceError(
                    f"the {name} of {state_dir} already runs with "
                    f"{ {k: old.get(k) for k in keys} }, not { {k: want[k] for k in keys} }; "
                    "run `notellm services stop` before changing its settings")
        state["settings"] = want
        # MLflow is launched first and waited for last, so both start up at the same time.
        if not mlflow_ok:
            _stop_mlflow(state, state_dir, BROKEN_GRACE_S)
            state["mlflow"] = _launch_mlflow(state_dir, want["host"], want["mlflow_port"])
            _write_state(state_dir, state)
        if not ray_ok:
            _stop_ray(state, state_dir, BROKEN_GRACE_S)
            state.pop("ray", None)
            _write_state(state_dir, state)
            state["ray"] = _start_ray(state_dir, want["host"], want["ray_port"], want["dashboard_port"],
                                      want["num_cpus"])
            _write_state(state_dir, state)
        if not mlflow_ok:
            mlflow = state["mlflow"]
            _wait_healthy(lambda: _mlflow_health(want["host"], mlflow), "MLflow server",
                          Path(mlflow["log"]), mlflow["session_id"])
        return _info(state_dir, state)


def ensure_services(state_dir: Path, **kwargs: Any) -> ServiceInfo:
    """Restart whichever service of ``state_dir`` is dead or unhealthy (same as ``start_services``).

    Returns the ``ServiceInfo`` of the running services.
    """
    return start_services(state_dir, **kwargs)


def stop_services(state_dir: Path) -> dict[str, list[int]]:
    """Stop the Ray head and the MLflow server of ``state_dir`` and wait until their ports are free.

    Idempotent (stopping stopped services does nothing). Never touches another state folder's
    processes. The settings stay recorded, so the next start reuses the same ports.
    Returns the ports released, e.g. ``{"ray": [6380, 8265], "mlflow": [5001]}`` (empty lists
    when nothing ran).
    """
    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        return {"ray": [], "mlflow": []}
    with _locked(state_dir):
        state = _read_state(state_dir)
        released: dict[str, list[int]] = {"ray": [], "mlflow": []}
        _stop_mlflow(state, state_dir)
        if "mlflow" in state:
            released["mlflow"] = [state.pop("mlflow")["port"]]
            _write_state(state_dir, state)
        _stop_ray(state, state_dir)
        if "ray" in state:
            ray = state.pop("ray")
            released["ray"] = [ray["port"], ray["dashboard_port"]]
            _write_state(state_dir, state)
        return released


def service_env(info: ServiceInfo) -> dict[str, str]:
    """Environment variables that point Ray, ``ray job submit`` and MLflow at these services.

    ``RAY_AUTH_MODE`` is the local head's auth mode (see ``RAY_AUTH_MODE`` above).

    Returns ``RAY_ADDRESS`` (the GCS address, read by ``ray.init()``), ``RAY_API_SERVER_ADDRESS``
    (the dashboard URL, which ``ray job submit/status/logs`` read before ``RAY_ADDRESS``; the same
    as passing ``--address http://127.0.0.1:<dashboard port>``) and ``MLFLOW_TRACKING_URI``.
    """
    return {
        "RAY_ADDRESS": info.ray_address,
        "RAY_API_SERVER_ADDRESS": info.dashboard_url,
        "RAY_AUTH_MODE": RAY_AUTH_MODE,
        "MLFLOW_TRACKING_URI": info.mlflow_url,
    }
