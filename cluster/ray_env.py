"""Connecting to Ray: an embedded local cluster by default, or an existing one
(`cluster.address` / `--address`, or Ray's own RAY_ADDRESS). The embedded cluster listens
on loopback only: nothing on the network can reach its GCS, raylet or workers."""

from __future__ import annotations

import contextlib
import math
import os

from services import ray_compat

# Set before Ray starts so every worker process inherits them.
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ensure_ray(address: str | None = None, num_cpus: float | None = None, verbose: bool = False):
    """Start (or join) Ray once per process; returns the cluster's resources."""
    import ray

    for key, value in _WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and _no_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address == "local":
            address = None
        kwargs = dict(log_to_driver=verbose or bool(os.environ.get("RAYFT_VERBOSE")),
                      configure_logging=True, logging_level="WARNING")
        env = {"env_vars": {k: os.environ[k] for k in (*_WORKER_ENV, "DS_ACCELERATOR") if k in os.environ}}
        if address:
            join_ray(address, runtime_env=env, **kwargs)
        else:
            cpus = max(os.cpu_count() or 1, math.ceil(num_cpus or 0))
            # "local": a cluster of our own, even where another one runs on this machine
            # (a bare ray.init() would join that one).
            with ray_compat.loopback_node():
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env, **kwargs)
    return ray.cluster_resources()


def join_ray(address: str, **init_kwargs) -> None:
    """Join the existing cluster at `address`: with the auth token when this machine has
    one, and on loopback when the cluster listens there only (an embedded one)."""
    import ray

    use_token_auth_if_available()
    loopback = ray_compat.joins_loopback_cluster(address)
    with ray_compat.loopback_node() if loopback else contextlib.nullcontext():
        ray.init(address=address, **init_kwargs)


def use_token_auth_if_available() -> None:
    """Joining a cluster by address: send the Ray auth token when this machine has one
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). Ray does this by itself
    for `address="auto"` but not for an explicit address, whose cluster then refuses the
    connection when it has token authentication on (the default)."""
    ray_compat.use_token_auth_if_available()


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _no_cuda() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:
        return True
