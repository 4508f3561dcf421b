"""`rayft serve`: put a trained model behind an OpenAI-compatible endpoint.

    rayft serve runs/sft                                   # a full model, on a local cluster
    rayft serve runs/sft-lora --adapter other=runs/lora2   # base + adapters, `model: base:name`
    rayft serve runs/sft --address auto                    # deploy to a running cluster, return
    rayft serve --status [--address URL]                   # applications, replicas, engines
    rayft serve --stop rayft [--address URL]

Without --address it starts an embedded Ray cluster, deploys the application
(services.app), prints the URL, and serves until Ctrl-C or SIGTERM. Settings come from
flags, an optional `--config serve.yaml` (services.config keys) and `key=value`
overrides, in that order of precedence: overrides, flags, file.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import time

from cluster.config import apply_override, config_help, from_dict, read_config_file
from trainers.errors import ConfigError, UserError

STATUS_TIMEOUT_S = 10.0


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model and its LoRA adapters over the OpenAI API (Ray Serve + vLLM)",
        description="Serve a run's final model (or a model or adapter directory) as an OpenAI-compatible "
                    "endpoint: /v1/chat/completions and /v1/completions (streaming), /v1/models, /health. "
                    "A LoRA run is served as its base plus the adapter (`model: <base>:<run name>`); "
                    "--adapter adds more over the same base. Every request needs the API key when one is "
                    "set (--api-key, config api_key or $RAYFT_API_KEY); binding beyond loopback or deploying "
                    "to an existing cluster (--address) without one generates a key. See docs/serving.md.",
        epilog="example: rayft serve runs/sft-lora --adapter terse=runs/terse-lora --port 8000")
    p.add_argument("model", nargs="?", metavar="CHECKPOINT_OR_RUN", help="run directory or model directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="serve config overrides (see --help-config)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter (run or adapter directory) served as <model-id>:NAME; repeatable")
    p.add_argument("--model-id", help="name clients use for the base model (default: its directory name)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, metavar="N", help="engine replicas (fixed; see max_replicas to autoscale)")
    p.add_argument("--api-key", help="require this key on every request (prefer $RAYFT_API_KEY: flags show in ps)")
    p.add_argument("--config", metavar="FILE", help="YAML file of serve config keys")
    p.add_argument("--address", help="deploy to this running Ray cluster and return (the paths must be visible "
                                     "to its nodes)")
    p.add_argument("--status", action="store_true", help="report the served applications, replicas and engines")
    p.add_argument("--stop", metavar="APP", help="delete a served application")
    p.add_argument("--json", action="store_true", help="--status as JSON")
    p.add_argument("--help-config", action="store_true", help="list every serve config key with its default")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from services.config import ServeConfig

    if args.help_config:
        print(config_help(ServeConfig))
        return 0
    if args.status:
        report = serve_status(args.address or "auto")
        print(json.dumps(report, indent=2) if args.json else format_status(report))
        return 0 if all(app["healthy"] for app in report["applications"].values()) else 1
    if args.stop:
        return stop_app(args.stop, args.address or "auto")
    cfg = load_serve_config(args)
    return serve_model(cfg, args.address)


def load_serve_config(args):
    """File, then flags, then key=value overrides -> a checked ServeConfig."""
    from services.config import ServeConfig, ServeConfigError

    data = read_config_file(args.config) if args.config else {}
    flags = dict(model=args.model, model_id=args.model_id, host=args.host, port=args.port,
                 num_replicas=args.replicas, api_key=args.api_key)
    data.update({key: value for key, value in flags.items() if value is not None})
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter '{item}' must look like NAME=PATH")
        data.setdefault("adapters", {})[name] = path
    for item in args.overrides:
        apply_override(data, item)
    cfg = from_dict(ServeConfig, data)
    try:
        cfg.validate()
    except ServeConfigError as exc:
        raise ConfigError(exc.key, str(exc).split(": ", 1)[1]) from None
    return cfg


def serve_model(cfg, address: str | None) -> int:
    import ray
    from ray import serve

    from cluster.ray_env import ensure_ray
    from services.app import build_app
    from services.config import ServeConfigError
    from services.models import resolve_served

    try:
        served = resolve_served(cfg)
    except ServeConfigError as exc:
        raise ConfigError(exc.key, str(exc).split(": ", 1)[1]) from None
    generated_key = ensure_api_key(cfg, address)
    replicas = cfg.max_replicas if cfg.autoscaling else cfg.num_replicas
    for name in ("ray.serve", "ray.llm"):  # their INFO lines (deployment options, ...) drown ours
        logging.getLogger(name).setLevel(logging.WARNING)
    ensure_ray(address, num_cpus=replicas * cfg.cpus_per_replica + 1)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    print(f"starting {', '.join(served.model_ids())} from {served.base_dir} ...", flush=True)
    started = time.perf_counter()
    serve.run(build_app(cfg, served), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
    print(f"ready in {time.perf_counter() - started:.0f}s: {url}  models: {', '.join(served.model_ids())}", flush=True)
    if generated_key:
        why = "an existing cluster's proxy may listen beyond loopback" if address else f"host {cfg.host} is not loopback"
        print(f"API key (generated, as {why}): {generated_key}", flush=True)
    cluster = address or ray.get_runtime_context().gcs_address
    print(f"status: rayft serve --status --address {cluster}", flush=True)
    if address:
        print(f"deployed as application '{cfg.app_name}'; stop it with "
              f"`rayft serve --stop {cfg.app_name} --address {address}`")
        return 0
    return _serve_until_stopped()


def ensure_api_key(cfg, address: str | None) -> str:
    """Set a generated key on `cfg` when it has none and needs one; returns that key ("" when
    none was generated)."""
    if cfg.resolved_api_key() or not cfg.key_required(existing_cluster=address is not None):
        return ""
    cfg.api_key = secrets.token_urlsafe(24)
    return cfg.api_key


def _serve_until_stopped() -> int:
    from ray import serve

    # Ctrl-C and SIGTERM both stop it, even when started from a script in the background
    # (which starts it with SIGINT ignored, and Python then installs no handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
    return 0


def serve_status(address: str) -> dict:
    """Every application's status, its deployments' replica states, and whether each
    engine deployment answers a health check."""
    import ray
    from ray import serve

    connected = _connect(address)
    report = {"applications": {}}
    for app_name, app in serve.status().applications.items():
        deployments = {}
        for name, dep in app.deployments.items():
            states = {str(state.value if hasattr(state, "value") else state): n
                      for state, n in dep.replica_states.items() if n}
            entry = {"status": str(dep.status.value), "replicas": states}
            if name.startswith("LLMServer"):
                entry["engine"] = _probe_engine(serve.get_deployment_handle(name, app_name))
            deployments[name] = entry
        healthy = str(app.status.value) == "RUNNING" and all(d.get("engine", "alive") == "alive"
                                                               for d in deployments.values())
        report["applications"][app_name] = {"status": str(app.status.value), "healthy": healthy,
                                            "message": app.message, "deployments": deployments}
    if connected:
        ray.shutdown()
    return report


def _probe_engine(handle) -> str:
    try:
        handle.check_health.remote().result(timeout_s=STATUS_TIMEOUT_S)
        return "alive"
    except Exception as exc:  # noqa: BLE001 - any failure means the engine does not answer
        return f"not answering ({type(exc).__name__})"


def format_status(report: dict) -> str:
    if not report["applications"]:
        return "no applications are served on this cluster"
    lines = []
    for name, app in report["applications"].items():
        lines.append(f"application {name}: {app['status']}" + (f" ({app['message']})" if app["message"] else ""))
        for dep_name, dep in app["deployments"].items():
            replicas = ", ".join(f"{n} {state.lower()}" for state, n in dep["replicas"].items()) or "none"
            engine = f"  engine: {dep['engine']}" if "engine" in dep else ""
            lines.append(f"  {dep_name:28} {dep['status']:10} replicas: {replicas}{engine}")
    return "\n".join(lines)


def stop_app(name: str, address: str) -> int:
    from ray import serve

    _connect(address)
    if name not in serve.status().applications:
        raise UserError(f"no application '{name}' on this cluster (see `rayft serve --status`)")
    serve.delete(name)
    print(f"deleted application '{name}'")
    return 0


def _connect(address: str) -> bool:
    """Join the cluster unless this process already has; True when it joined here."""
    import ray

    from cluster.ray_env import join_ray

    if ray.is_initialized():
        return False
    try:
        join_ray(address, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as exc:
        raise UserError(f"no Ray cluster at '{address}' ({exc}); a `rayft serve` without --address "
                        "runs its own, found with the default --address auto") from None
    return True

