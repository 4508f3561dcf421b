"""Typed config of a served application: what to serve (a full model, or a base with LoRA
adapters), how to reach it (host, port, API key), and how it scales and sheds load.

`rayft serve` fills it from flags, an optional YAML file and `key=value` overrides; the
RayService manifest in k8s/ passes the same keys as the application's args.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal

from rollout.config import opt

API_KEY_ENV = "RAYFT_API_KEY"
LOOPBACK_NAMES = ("localhost",)


class ServeConfigError(ValueError):
    """A bad serve setting; the message starts with the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class ServeConfig:
    model: str = opt("", "Model directory or run directory to serve: a full causal LM, or a LoRA adapter "
                         "(served as its base plus the adapter).")
    model_id: str = opt("", "Name clients pass as `model` for the base; default: the model directory's name.")
    adapters: dict[str, str] = opt(dict, "LoRA adapters over the base, name: directory (adapter or run); clients select "
                               "one as `model: <model_id>:<name>`.")
    host: str = opt("127.0.0.1", "Address the HTTP proxy binds; anything but loopback, and any deployment to "
                                 "an existing cluster (--address), needs an API key (one is generated and "
                                 "printed when none is given).")
    port: int = opt(8000, "HTTP port.")
    app_name: str = opt("rayft", "Serve application name (several can share a cluster).")
    route_prefix: str = opt("/", "URL prefix of the application.")
    api_key: str = opt("", f"Key every request must carry as `Authorization: Bearer KEY`; default: ${API_KEY_ENV}.")
    num_replicas: int = opt(1, "Engine replicas when autoscaling is off (max_replicas = 0).")
    min_replicas: int = opt(1, "Autoscaling: fewest replicas (0 scales to zero when idle).")
    max_replicas: int = opt(0, "Autoscaling: most replicas; 0 turns autoscaling off.")
    target_ongoing_requests: float = opt(16.0, "Autoscaling: in-flight requests per replica it aims for.")
    max_ongoing_requests: int = opt(64, "Requests one replica's engine works on at once.")
    max_queued_requests: int = opt(128, "Requests waiting for a replica beyond those; more are refused with "
                                        "503 and Retry-After instead of queueing without bound.")
    retry_after_s: int = opt(1, "Retry-After seconds sent with a 503.")
    cpus_per_replica: float = opt(1.0, "CPUs reserved per engine replica (CPU serving).")
    tensor_parallel_size: int = opt(1, "GPUs per replica, tensor parallel (GPU serving).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Engine weights dtype: auto = bfloat16 on GPU, float32 on CPU.")
    max_model_len: int = opt(0, "Longest prompt + completion; 0 = the model's own context length.")
    kv_cache_gb: float = opt(1.0, "KV-cache memory per replica on CPU, GiB.")
    gpu_memory_utilization: float = opt(0.9, "Share of GPU memory a replica's engine may take.")
    max_loras: int = opt(4, "Adapters one engine batch can mix.")
    max_lora_rank: int = opt(0, "Largest adapter rank accepted; 0 = the largest among the adapters.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when the cluster has GPUs.")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0

    def validate(self) -> None:
        if not self.model:
            raise ServeConfigError("model", "give a model directory or run directory to serve")
        for name in self.adapters:
            if not name or ":" in name or "/" in name:
                raise ServeConfigError(f"adapters.{name}", "adapter names are non-empty and without ':' or '/'")
        if ":" in self.model_id:
            raise ServeConfigError("model_id", "must not contain ':' (it separates base and adapter names)")
        if not 0 < self.port < 65536:
            raise ServeConfigError("port", f"must be 1-65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ServeConfigError("route_prefix", "must start with '/'")
        positive = ("num_replicas", "max_ongoing_requests", "cpus_per_replica", "tensor_parallel_size",
                    "kv_cache_gb", "max_loras", "target_ongoing_requests")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ServeConfigError(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("max_queued_requests", "retry_after_s", "max_model_len", "max_lora_rank", "min_replicas"):
            if getattr(self, key) < 0:
                raise ServeConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ServeConfigError("min_replicas", f"{self.min_replicas} is above max_replicas {self.max_replicas}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ServeConfigError("gpu_memory_utilization", "must be in (0, 1]")

    def resolved_api_key(self) -> str:
        """The key from the config, else the environment; empty means no key."""
        return self.api_key or os.environ.get(API_KEY_ENV, "")

    def key_required(self, existing_cluster: bool) -> bool:
        """Whether serving without a key could be reached from other machines: a proxy bound
        beyond loopback, or any deployment to an existing cluster (`--address`), whose HTTP
        proxy may already listen on every interface whatever `host` says here."""
        return existing_cluster or not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
