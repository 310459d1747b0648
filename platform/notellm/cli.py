"""The ``notellm`` command line.

Usage::

    notellm services start  [--config configs/demo.yaml] [--state-dir DIR] [--set services.mlflow_port=5002]
    notellm services status [--config ...] [--state-dir DIR] [--json]
    notellm services stop   [--config ...] [--state-dir DIR]
    python -m notellm.cli services start           # the same without the console script

Exit codes: 0 success; 1 a service failed to start/stop, or ``status`` found one unhealthy;
2 bad arguments or config.

Each command group registers itself in ``build_parser`` through an ``add_<group>_parser``
function that sets ``func`` (called with the parsed args, returns the exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from notellm.config import ConfigError, PipelineConfig, load_config
from notellm.services import (ServiceError, ServiceInfo, service_env, services_status,
                              start_services, stop_services)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set key=value`` overrides (see ``load_config``)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="pipeline YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set services.mlflow_port=5002 (repeatable)")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config named by ``--config`` with the ``--set`` overrides applied."""
    return load_config(args.config, args.overrides)


# --------------------------------------------------------------------------- services


def _state_dir(args: argparse.Namespace, cfg: PipelineConfig) -> Path:
    if args.state_dir is not None:
        return args.state_dir.resolve()
    return cfg.resolve_path(cfg.services.state_dir)


def _print_info(info: ServiceInfo) -> None:
    print(f"Ray head        {info.ray_address}  (pid {info.ray_pid})")
    print(f"Ray dashboard   {info.dashboard_url}")
    print(f"MLflow server   {info.mlflow_url}  (pid {info.mlflow_pid})")
    print(f"State dir       {info.state_dir}")
    print(f"Logs            {info.log_dir}  (ray-start.log, mlflow.log; "
          f"ray -> {info.ray_temp_dir}/session_latest/logs)")
    print("Environment for pipelines and `ray job submit`:")
    for key, value in service_env(info).items():
        print(f"  export {key}={value}")


def _services_start(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    svc = cfg.services
    info = start_services(_state_dir(args, cfg), host=svc.host, ray_port=svc.ray_port,
                          dashboard_port=svc.dashboard_port, mlflow_port=svc.mlflow_port,
                          num_cpus=args.num_cpus if args.num_cpus is not None else svc.num_cpus)
    if args.print_env:  # for `eval "$(notellm services start --print-env)"` in scripts
        for key, value in service_env(info).items():
            print(f"export {key}={value}")
        return EXIT_OK
    _print_info(info)
    return EXIT_OK


def _services_status(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    state_dir = _state_dir(args, cfg)
    status = services_status(state_dir)
    healthy = status["ray"]["healthy"] and status["mlflow"]["healthy"]
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK if healthy else EXIT_FAILED
    print(f"State dir       {state_dir}  (logs: {state_dir / 'logs'})")
    for name, where in (("ray", status["ray"]["address"]), ("mlflow", status["mlflow"]["url"])):
        s = status[name]
        word = "healthy" if s["healthy"] else ("UNHEALTHY" if s["running"] else "DOWN")
        extra = f"  dashboard {s['dashboard_url']}" if name == "ray" and s["dashboard_url"] else ""
        reason = f"  ({s['detail']})" if s["detail"] else ""
        print(f"{name:<15} {word:<10} {where or '-'}  pid {s['pid'] or '-'}{extra}{reason}")
    if not healthy:
        print("run `notellm services start` to (re)start what is down", file=sys.stderr)
    return EXIT_OK if healthy else EXIT_FAILED


def _services_stop(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    state_dir = _state_dir(args, cfg)
    released = stop_services(state_dir)
    if not released["ray"] and not released["mlflow"]:
        print(f"no services were running for {state_dir}")
    else:
        print(f"stopped services of {state_dir}; ports released: "
              f"ray {released['ray']}, mlflow {released['mlflow']}")
    return EXIT_OK


def add_services_parser(subparsers: argparse._SubParsersAction) -> None:
    """``notellm services start|status|stop``: the local Ray head and MLflow server."""
    services = subparsers.add_parser("services", help="local Ray head + MLflow tracking server")
    actions = services.add_subparsers(dest="action", required=True)
    for name, func, help_text in (
        ("start", _services_start, "start (or restart what is down); prints URLs and env"),
        ("status", _services_status, "health of both services; exit 1 if one is unhealthy"),
        ("stop", _services_stop, "stop both and wait until their ports are free"),
    ):
        p = actions.add_parser(name, help=help_text)
        add_config_args(p)
        p.add_argument("--state-dir", type=Path, default=None,
                       help="services folder (default: services.state_dir of the config)")
        p.set_defaults(func=func)
        if name == "start":
            p.add_argument("--num-cpus", type=int, default=None,
                           help="CPUs the Ray head offers (default: all)")
            p.add_argument("--print-env", action="store_true",
                           help="print only `export KEY=VALUE` lines for the pipelines' environment")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the status as JSON")


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``notellm`` parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="notellm", description="NoteLLM Platform command line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_services_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
